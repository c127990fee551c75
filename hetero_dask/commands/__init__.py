"""Command-line sub-commands, one module each (see hetero_dask.cli)."""

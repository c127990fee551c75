"""hetero_dask.report."""

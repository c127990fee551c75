"""hetero_dask.io."""

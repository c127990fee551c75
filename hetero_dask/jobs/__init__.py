"""hetero_dask.jobs."""

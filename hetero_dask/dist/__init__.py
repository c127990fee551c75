"""hetero_dask.dist."""

"""The runtime: Dask clusters, the map-reduce engine, checkpoints, progress and signals."""

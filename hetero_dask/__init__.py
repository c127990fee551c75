"""hetero_dask: heterogeneous refinement, reconstruction and regrouping of cryo-EM particles on Dask."""

__version__ = "0.1.0"

"""hetero_dask: heterogeneous refinement, reconstruction and regrouping of cryo-EM particles on Dask."""

__version__ = "0.1.0"

# The jobs are imported on first use (PEP 562), so ``hetero-dask --version``, a Dask worker
# unpickling one task function, or ``import hetero_dask.io`` does not pay for all of them
# (Dask, Zarr, numba, scipy, matplotlib: about 2 s).
_LAZY = {
    "reconstruct": "hetero_dask.jobs.reconstruct",
    "refine": "hetero_dask.jobs.refine",
    "regroup": "hetero_dask.jobs.regroup",
    "submit": "hetero_dask.runtime.submit",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'hetero_dask' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))

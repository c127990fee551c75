"""Array-namespace selection: numpy on CPU workers, CuPy on GPU workers.

Functions in ``core`` call :func:`xp_of` on their inputs and compute in that
namespace, so the same code runs on both. The module is chosen on the worker
(:func:`worker_xp`), never on the client.
"""

from __future__ import annotations

import os
from types import ModuleType

import numpy as np


def _cupy() -> ModuleType | None:
    try:
        import cupy  # noqa: PLC0415

        return cupy
    except Exception:  # ImportError, or a CUDA driver problem at import time
        return None


def xp_of(*arrays) -> ModuleType:
    """Return the array module (numpy or cupy) of the given arrays.

    Non-array arguments (Python scalars, None) are ignored; mixing numpy and
    cupy arrays is an error because it would silently copy across the bus.
    """
    modules = set()
    for a in arrays:
        mod = type(a).__module__.split(".")[0]
        if mod == "cupy":
            modules.add("cupy")
        elif isinstance(a, np.ndarray | np.generic):
            modules.add("numpy")
    if modules == {"cupy", "numpy"}:
        raise TypeError("arrays mix numpy and cupy; move them to one device first")
    if "cupy" in modules:
        return _cupy()
    return np


def gpu_available() -> bool:
    """True when CuPy imports and sees at least one CUDA device."""
    cp = _cupy()
    if cp is None:
        return False
    try:
        return cp.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def worker_xp(prefer_gpu: bool | None = None) -> ModuleType:
    """The array module a task should compute with on this worker.

    ``prefer_gpu=None`` means: CuPy when a GPU is visible, unless the
    environment variable ``HETERO_DASK_CPU=1`` forces numpy.
    """
    if prefer_gpu is None:
        prefer_gpu = os.environ.get("HETERO_DASK_CPU", "0") != "1"
    if prefer_gpu and gpu_available():
        return _cupy()
    return np


def to_host(a):
    """Return ``a`` as a numpy array (a no-op for numpy input)."""
    if type(a).__module__.split(".")[0] == "cupy":
        return a.get()
    return np.asarray(a)


def to_device(a, xp: ModuleType):
    """Move a numpy array to the namespace ``xp`` (no copy when already there)."""
    if xp is np:
        return to_host(a)
    return xp.asarray(a)

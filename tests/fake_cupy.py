"""A numpy-backed stand-in for CuPy, so the GPU branches of ``core`` run on every CI machine.

``install(monkeypatch)`` puts modules ``cupy``, ``cupyx``, ``cupyx.scipy`` and
``cupyx.scipy.ndimage`` into ``sys.modules``. Their arrays are a numpy
``ndarray`` subclass whose type lives in module ``cupy`` (so
:func:`hetero_dask.core.backend.xp_of` picks the "GPU" namespace) with CuPy's
``.get()``. What the stand-in enforces, as real CuPy does:

- no implicit host arrays: a plain numpy array given to a ``cupy.*`` function,
  a ufunc or an arithmetic operator with device arrays raises ``TypeError``
  (only ``asarray``/``array``/``asnumpy`` take host data; ``asarray`` copies);
- numpy names that CuPy 14.2 lacks raise ``AttributeError``;
- reductions and scalar indexing return 0-d device arrays, not numpy scalars;
- ``cupyx.scatter_add`` only for dtypes CUDA's atomicAdd supports.

What it cannot see: ``np.asarray(device_array)`` in library code (real CuPy
refuses it; a subclass cannot), kernel launches, streams, memory pools, the
order of atomic adds, and differences of CuPy's numerics (cuFFT, cuBLAS, TF32).
"""

from __future__ import annotations

import sys
import types

import numpy as np
import scipy.ndimage

# sorted(n for n in dir(numpy) if not hasattr(cupy, n)) for numpy 2.4 / CuPy 14.2 (public names).
_MISSING_IN_CUPY = frozenset(
    "False_ ScalarType True_ asmatrix block bmat busday_count busday_offset busdaycalendar "
    "bytes_ char character clongdouble complex256 core ctypeslib datetime64 datetime_as_string "
    "datetime_data dtypes einsum_path emath errstate f2py flexible float128 frompyfunc "
    "fromregex geomspace get_include getbufsize geterr geterrcall histogram_bin_edges info "
    "insert is_busday isnat little_endian longdouble ma matrix matvec memmap nanpercentile "
    "nanquantile ndenumerate nditer nested_iters object_ polyder polydiv polyint rec recarray "
    "record sctypeDict setbufsize seterr seterrcall show_runtime spacing str_ strings test "
    "timedelta64 typecodes unstack vecdot vecmat void".split()
)
_MISSING_IN_CUPY_LINALG = frozenset(
    "diagonal matrix_norm multi_dot outer svdvals tensordot test trace vecdot vector_norm".split()
)
# dtypes cupyx.scatter_add accepts with integer indices (CUDA atomicAdd).
_SCATTER_ADD_DTYPES = frozenset(
    np.dtype(t) for t in (np.float16, np.float32, np.float64, np.int32, np.uint32, np.uint64)
)

#: Every ``cupyx.scatter_add`` call, as (dtype, number of values): tests check the GPU scatter ran.
scatter_add_calls: list[tuple[np.dtype, int]] = []


class ndarray(np.ndarray):  # noqa: N801 (CuPy's name)
    """Device array stand-in: numpy memory, CuPy's rules at the host/device boundary."""

    def get(self, stream=None, order="C", out=None):
        """Copy to host (a plain numpy array), like ``cupy.ndarray.get``."""
        host = np.array(self.view(np.ndarray), order=order, copy=True)
        if out is not None:
            out[...] = host
            return out
        return host

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        _refuse_host((inputs, kwargs.get("where")), f"ufunc {ufunc.__name__}")
        out = kwargs.get("out")
        if out is not None:
            _refuse_host(out, f"ufunc {ufunc.__name__} out=")
            kwargs["out"] = tuple(_unwrap(o) for o in out)
        result = getattr(ufunc, method)(*_unwrap(inputs), **_unwrap(kwargs))
        if out is not None:
            return out[0] if len(out) == 1 else out
        return _wrap(result)

    def __array_function__(self, func, types_, args, kwargs):
        if func.__name__ in _MISSING_IN_CUPY:
            raise TypeError(f"numpy.{func.__name__} has no CuPy implementation")
        _refuse_host((args, kwargs), f"numpy.{func.__name__}")
        return _wrap(func(*_unwrap(args), **_unwrap(kwargs)))

    def __getitem__(self, key):
        return _wrap(super().__getitem__(_unwrap(key)))

    def __setitem__(self, key, value):
        super().__setitem__(_unwrap(key), _unwrap(value))


ndarray.__module__ = "cupy"


def _refuse_host(obj, where: str) -> None:
    if isinstance(obj, ndarray) or obj is None:
        return
    if isinstance(obj, np.ndarray):
        raise TypeError(
            f"{where}: got a numpy array {obj.shape} {obj.dtype} among device arrays; "
            "real CuPy refuses implicit host data (move it with cupy.asarray first)"
        )
    if isinstance(obj, list | tuple):
        for o in obj:
            _refuse_host(o, where)
    elif isinstance(obj, dict):
        for o in obj.values():
            _refuse_host(o, where)


def _unwrap(obj):
    if isinstance(obj, ndarray):
        return obj.view(np.ndarray)
    if isinstance(obj, tuple):
        return tuple(_unwrap(o) for o in obj)
    if isinstance(obj, list):
        return [_unwrap(o) for o in obj]
    if isinstance(obj, dict):
        return {k: _unwrap(v) for k, v in obj.items()}
    return obj


def _wrap(obj):
    if isinstance(obj, ndarray):
        return obj
    if isinstance(obj, np.ndarray):
        return obj.view(ndarray)
    if isinstance(obj, np.generic):
        return np.asarray(obj).view(ndarray)
    if isinstance(obj, tuple):
        return tuple(_wrap(o) for o in obj)
    if isinstance(obj, list):
        return [_wrap(o) for o in obj]
    return obj


class _Ufunc:
    """A numpy ufunc whose calls and methods (``reduce``, ``at``, ...) follow the device rules."""

    def __init__(self, uf: np.ufunc):
        self._uf = uf
        self.__name__ = uf.__name__

    def __call__(self, *args, **kwargs):
        return _device_call(self._uf, f"cupy.{self.__name__}")(*args, **kwargs)

    def __getattr__(self, name):
        attr = getattr(self._uf, name)
        return _device_call(attr, f"cupy.{self.__name__}.{name}") if callable(attr) else attr


def _device_call(func, where: str):
    def call(*args, **kwargs):
        _refuse_host((args, kwargs), where)
        out = kwargs.get("out")
        result = func(*_unwrap(args), **_unwrap(kwargs))
        return out if out is not None else _wrap(result)

    call.__name__ = getattr(func, "__name__", where)
    return call


def _namespace(name: str, source: types.ModuleType, missing: frozenset, own: dict):
    mod = types.ModuleType(name)
    mod.__dict__.update(own)

    def __getattr__(attr):  # noqa: N807 (module-level __getattr__, PEP 562)
        if attr.startswith("__") or attr in missing:
            raise AttributeError(f"module {name!r} has no attribute {attr!r}")
        obj = getattr(source, attr)
        if isinstance(obj, np.ufunc):
            obj = _Ufunc(obj)
        elif isinstance(obj, types.ModuleType):
            raise AttributeError(f"{name}.{attr} is not provided by the CuPy stand-in")
        elif callable(obj) and not isinstance(obj, type):
            obj = _device_call(obj, f"{name}.{attr}")
        setattr(mod, attr, obj)
        return obj

    mod.__getattr__ = __getattr__
    return mod


def asarray(a, dtype=None, order=None, *, blocking=False):
    """Host data is copied to the "device"; device arrays are returned as they are (cast if asked)."""
    if isinstance(a, ndarray):
        return a if dtype is None else a.astype(dtype, copy=False)
    return np.array(_unwrap(a), dtype=dtype, order=order or "K", copy=True).view(ndarray)


def array(a, dtype=None, copy=True, order="K", ndmin=0, *, blocking=False):
    """Always a new device array (like ``cupy.array``)."""
    return np.array(_unwrap(a), dtype=dtype, copy=True, order=order, ndmin=ndmin).view(ndarray)


def asnumpy(a, stream=None, order="C", out=None, *, blocking=True):
    """A host copy of ``a`` (device or host input)."""
    host = np.array(_unwrap(a), order=order, copy=True)
    if out is not None:
        out[...] = host
        return out
    return host


def scatter_add(a, slices, value):
    """``cupyx.scatter_add``: ``numpy.add.at`` on the device array, atomicAdd dtypes only."""
    if not isinstance(a, ndarray):
        raise TypeError(f"cupyx.scatter_add needs a cupy.ndarray target, got {type(a)}")
    if a.dtype not in _SCATTER_ADD_DTYPES:
        raise TypeError(f"cupyx.scatter_add: dtype {a.dtype} is not supported by atomicAdd")
    _refuse_host((slices, value), "cupyx.scatter_add")
    v = _unwrap(value)
    scatter_add_calls.append((a.dtype, int(np.size(v))))
    np.add.at(a.view(np.ndarray), _unwrap(slices), v)


def _build() -> dict[str, types.ModuleType]:
    runtime = types.SimpleNamespace(getDeviceCount=lambda: 1)
    cuda = types.SimpleNamespace(runtime=runtime, is_available=lambda: True)
    fft = _namespace("cupy.fft", np.fft, frozenset({"test"}), {})
    linalg = _namespace("cupy.linalg", np.linalg, _MISSING_IN_CUPY_LINALG, {})
    cupy = _namespace(
        "cupy",
        np,
        _MISSING_IN_CUPY,
        {
            "ndarray": ndarray,
            "asarray": asarray,
            "array": array,
            "asnumpy": asnumpy,
            "cuda": cuda,
            "fft": fft,
            "linalg": linalg,
            "__version__": "14.2.0+fake",
            "__fake__": True,
        },
    )
    ndimage = types.ModuleType("cupyx.scipy.ndimage")
    ndimage.distance_transform_edt = _device_call(
        scipy.ndimage.distance_transform_edt, "cupyx.scipy.ndimage.distance_transform_edt"
    )
    cupyx_scipy = types.ModuleType("cupyx.scipy")
    cupyx_scipy.ndimage = ndimage
    cupyx = types.ModuleType("cupyx")
    cupyx.scatter_add = scatter_add
    cupyx.scipy = cupyx_scipy
    return {
        "cupy": cupy,
        "cupy.fft": fft,
        "cupy.linalg": linalg,
        "cupyx": cupyx,
        "cupyx.scipy": cupyx_scipy,
        "cupyx.scipy.ndimage": ndimage,
    }


def install(monkeypatch) -> types.ModuleType:
    """Make ``import cupy`` (and the cupyx parts ``core`` uses) give the stand-in; returns ``cupy``."""
    modules = _build()
    for name, mod in modules.items():
        monkeypatch.setitem(sys.modules, name, mod)
    scatter_add_calls.clear()
    return modules["cupy"]


def is_fake(mod) -> bool:
    """True for the stand-in module (tests of real CuPy skip themselves on it)."""
    return bool(getattr(mod, "__fake__", False))

"""Compiled CPU kernels (numba) for loops numpy cannot express without large temporaries.

The array code in :mod:`hetero_dask.core` runs on numpy and CuPy alike; on a
CPU worker some inner loops are memory-bound scatters that numpy can only
write as several passes over large temporaries. Here they are written once
more as fused loops, compiled by numba when it is installed (it is a
dependency; the array code stays the reference and the fallback, and tests
check the two agree):

* :func:`backproject_trilinear`: the trilinear backprojection of
  :func:`hetero_dask.core.backprojector.backproject` (8 corners of data and
  weight in one pass over the samples, no index or weight arrays). The grids
  (~105 MB per class and half-set at box 128) do not fit in cache and each
  sample lands ~2 voxels from the previous one, so the loop waits on memory:
  it prefetches the cache lines of the sample ``PREFETCH_DISTANCE`` ahead
  (measured at box 128, one core: 0.56 -> 0.22 ms per particle,
  ``benchmarks/bench_backprojection.py``);
* :func:`shell_sums` and :func:`wiener_spectrum`: the per-shell weight sums
  and the Wiener division of :func:`hetero_dask.core.reconstruction.reconstruct`,
  fused with the Hermitian completion of the x = 0 plane and the placement
  into the uncentred FFT array (one pass over the grids instead of about ten
  grid-sized temporaries);

Set ``HETERO_DASK_NO_NUMBA=1`` to use the array code everywhere.
"""

from __future__ import annotations

import os

import numpy as np

try:
    if os.environ.get("HETERO_DASK_NO_NUMBA"):
        raise ImportError("disabled by HETERO_DASK_NO_NUMBA")
    import numba
except ImportError:  # pragma: no cover - exercised by the fallback tests via ENABLED
    numba = None

ENABLED = numba is not None
PREFETCH_DISTANCE = 32  # samples ahead: 16 / 32 / 64 gave 0.34 / 0.28 / 0.31 ms per particle (6 grids)


def enabled() -> bool:
    """True when the compiled kernels are available and not switched off."""
    return ENABLED


def _jit(fn):
    if numba is None:
        return fn
    return numba.njit(nogil=True, cache=True, boundscheck=False)(fn)


if numba is not None:
    from llvmlite import binding as _llvm
    from llvmlite import ir as _ir
    from numba.core import cgutils as _cgutils
    from numba.extending import intrinsic as _intrinsic

    # Opaque pointers from LLVM 15 on: the intrinsic's name carries the pointer type.
    _PREFETCH = "llvm.prefetch.p0" if _llvm.llvm_version_info[0] >= 15 else "llvm.prefetch.p0i8"

    @_intrinsic
    def _prefetch(typingctx, arr, idx):
        """Hint the CPU to fetch ``arr[idx]``'s cache line for writing (no fault if outside)."""

        def codegen(context, builder, signature, args):
            aryty = signature.args[0]
            ary = context.make_array(aryty)(context, builder, args[0])
            ptr = _cgutils.get_item_pointer(context, builder, aryty, ary, [args[1]], wraparound=False)
            i8p, i32 = _ir.IntType(8).as_pointer(), _ir.IntType(32)
            fn = _cgutils.get_or_insert_function(
                builder.module, _ir.FunctionType(_ir.VoidType(), [i8p, i32, i32, i32]), _PREFETCH
            )
            # rw = 1 (write), locality = 3 (keep in all levels), cache type = 1 (data)
            builder.call(fn, [builder.bitcast(ptr, i8p), i32(1), i32(3), i32(1)])
            return context.get_dummy_value()

        return numba.types.void(arr, idx), codegen
else:  # pragma: no cover

    def _prefetch(arr, idx):
        pass


@_jit
def _backproject_kernel(data, weight, rot, kx, ky, values, weights, pad, h, S, X, ahead):
    P, M = values.shape
    SX = S * X
    one = np.float32(1)
    for p in range(P):
        a0 = rot[p, 0, 0]
        a1 = rot[p, 0, 1]
        b0 = rot[p, 1, 0]
        b1 = rot[p, 1, 1]
        c0 = rot[p, 2, 0]
        c1 = rot[p, 2, 1]
        for m in range(M):
            q = m + ahead
            if q < M:
                x = (a0 * kx[q] + a1 * ky[q]) * pad
                y = (b0 * kx[q] + b1 * ky[q]) * pad
                z = (c0 * kx[q] + c1 * ky[q]) * pad
                if x < 0:
                    x, y, z = -x, -y, -z
                ahead_base = ((int(np.floor(z)) + h) * S + int(np.floor(y)) + h) * X + int(np.floor(x))
                for o in (0, X, SX, SX + X):
                    _prefetch(data, ahead_base + o)
                    _prefetch(data, ahead_base + o + 1)
                    _prefetch(weight, ahead_base + o)
                    _prefetch(weight, ahead_base + o + 1)
            x = (a0 * kx[m] + a1 * ky[m]) * pad
            y = (b0 * kx[m] + b1 * ky[m]) * pad
            z = (c0 * kx[m] + c1 * ky[m]) * pad
            v = values[p, m]
            w = weights[p, m]
            if x < 0:
                x, y, z = -x, -y, -z
                v = v.conjugate()
            fx = np.floor(x)
            fy = np.floor(y)
            fz = np.floor(z)
            tx = x - fx
            ty = y - fy
            tz = z - fz
            ix = int(fx)
            iy = int(fy) + h
            iz = int(fz) + h
            if ix < 0 or ix >= h or iy < 0 or iy >= 2 * h or iz < 0 or iz >= 2 * h:
                raise IndexError("backprojection sample outside the half-grid")
            base = (iz * S + iy) * X + ix
            ux = one - tx
            uy = one - ty
            uz = one - tz
            for dz in range(2):
                wz = tz if dz else uz
                for dy in range(2):
                    wzy = wz * (ty if dy else uy)
                    row = base + dz * SX + dy * X
                    w0 = wzy * ux
                    w1 = wzy * tx
                    data[row] += w0 * v
                    data[row + 1] += w1 * v
                    weight[row] += w0 * w
                    weight[row + 1] += w1 * w


def backproject_trilinear(data, weight, rotations, kx, ky, values, weights, pad: int, h: int) -> None:
    """Add ``values`` / ``weights`` ``(P, M)`` at ``pad * R @ (kx, ky, 0)`` into half-grids, in place.

    ``data`` complex64 and ``weight`` float32: the half-grids ``(2h+1, 2h+1, h+1)``
    of :class:`hetero_dask.core.backprojector.BackprojGrids`, C-contiguous or as
    their 1-D views (written through);
    frequencies must lie within the grids' radius (checked: IndexError).
    Same arithmetic as the array path, in float32.
    """
    S, X = 2 * h + 1, h + 1
    _backproject_kernel(
        data.reshape(-1),
        weight.reshape(-1),
        np.ascontiguousarray(rotations, dtype=np.float32),
        np.ascontiguousarray(kx, dtype=np.float32),
        np.ascontiguousarray(ky, dtype=np.float32),
        np.ascontiguousarray(values, dtype=np.complex64),
        np.ascontiguousarray(weights, dtype=np.float32),
        np.float32(pad),
        h,
        S,
        X,
        PREFETCH_DISTANCE,
    )


@_jit
def _shell_sums_kernel(values, shell, n_out):
    out = np.zeros(n_out, np.float64)
    for i in range(values.size):
        out[shell[i]] += values[i]
    return out


def shell_sums(values, shell, n_out: int):
    """``np.bincount(shell, weights=values, minlength=n_out)`` in float64 for flat float32
    ``values`` and small unsigned ``shell`` indices (all ``< n_out``), without casting them."""
    return _shell_sums_kernel(values.reshape(-1), shell.reshape(-1), n_out)


@_jit
def _wiener_kernel(B, W, shell, reg, floor, h, he, D, spec):
    c = 2 * h
    for iz in range(h - he, h + he + 1):
        zd = (iz - h) % D
        for iy in range(h - he, h + he + 1):
            yd = (iy - h) % D
            for x in range(he + 1):
                b = B[iz, iy, x]
                w = W[iz, iy, x]
                if x == 0:  # Hermitian completion: H(y, z) + conj(H(-y, -z))
                    b = b + B[c - iz, c - iy, 0].conjugate()
                    w = w + W[c - iz, c - iy, 0]
                s = shell[iz, iy, x]
                d = max(w + reg[s], floor[s])  # floor inf outside r_max or where there is no data
                spec[zd, yd, x] = np.complex64(complex(b.real / d, b.imag / d))


def wiener_spectrum(B, W, shell, reg, floor, D: int):
    """``B / max(W + reg[shell], floor[shell])`` of half-grids ``(2h+1, 2h+1, h+1)``, x = 0
    plane completed, written uncentred into a new ``(D, D, D // 2 + 1)`` complex64 array.

    ``B`` complex64, ``W`` float32, ``shell`` per-voxel indices into ``reg`` and
    ``floor`` (float32, ``floor`` inf for voxels to leave at zero); frequencies
    beyond ``(D - 1) // 2`` are dropped.
    """
    h = B.shape[-1] - 1
    he = min(h, (D - 1) // 2)
    spec = np.zeros((D, D, D // 2 + 1), np.complex64)
    _wiener_kernel(B, W, shell, np.asarray(reg, np.float32), np.asarray(floor, np.float32), h, he, D, spec)
    return spec

"""Compiled CPU kernels (numba) for loops numpy cannot express without large temporaries.

The array code in :mod:`hetero_dask.core` runs on numpy and CuPy alike; on a
CPU worker some inner loops are memory-bound scatters that numpy can only
write as several passes over large temporaries. Here they are written once
more as fused loops, compiled by numba when it is installed (it is a
dependency; the array code stays the reference and the fallback, and tests
check the two agree):

* :func:`backproject_trilinear`: the trilinear backprojection of
  :func:`hetero_dask.core.backprojector.backproject` (8 corners of data and
  weight in one pass over the samples, no index or weight arrays);

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


def enabled() -> bool:
    """True when the compiled kernels are available and not switched off."""
    return ENABLED


def _jit(fn):
    if numba is None:
        return fn
    return numba.njit(nogil=True, cache=True, boundscheck=False)(fn)


@_jit
def _backproject_kernel(data, weight, rot, kx, ky, values, weights, pad, h, S, X):
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
    )

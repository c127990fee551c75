"""Central-slice projection of a 2x-padded Fourier volume by trilinear interpolation.

Convention (README, Conventions): the 2D frequency ``k = (kx, ky)`` of the image of a
volume at rotation ``R`` samples the volume's Fourier transform at
``R @ (kx, ky, 0)``; the real-space image is the projection along z of
``V(R r)``. Frequencies are in cycles per (unpadded) box ``n``; a point
``q`` in those units sits at ``pad * q`` on the padded grid.

Trilinear interpolation on the padded grid multiplies the real-space volume
by ``prod_axis sinc^2(x / (pad * n))``: :func:`prepare_fourier_map` divides
it out beforehand (gridding pre-correction).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from . import cpu_kernels
from .backend import xp_of
from .fourier import fft_functions, freq_1d


@dataclass
class FourierMap:
    """A centred, padded Fourier volume cropped to the radius it will be sampled at.

    ``data`` is complex64 ``(D, D, D)`` indexed [z, y, x] with frequency 0 at
    ``D // 2``; its voxel spacing is ``1 / pad`` cycles per original box ``n``.
    Frequencies beyond ``r_max`` (cycles per box) read as zero.
    """

    data: object
    pad: int
    n: int
    r_max: float

    @property
    def center(self) -> int:
        return self.data.shape[-1] // 2


def gridding_correction(n: int, pad: int, xp):
    """Real-space ``(n, n, n)`` factor prod_axis sinc^2(x / (pad n)) of trilinear interpolation."""
    x = freq_1d(n, xp) / float(pad * n)
    s = xp.sinc(x) ** 2
    return (s[:, None, None] * s[None, :, None] * s[None, None, :]).astype(xp.float32)


def prepare_fourier_map(volume, pad: int = 2, r_max: float | None = None) -> FourierMap:
    """Pre-correct, zero-pad by ``pad``, Fourier transform and crop a real volume ``(n, n, n)``.

    ``r_max`` (cycles per box, default Nyquist ``n / 2``) bounds the
    frequencies kept; a small ``r_max`` makes the map small (the E-step only
    needs the alignment band).
    """
    xp = xp_of(volume)
    n = volume.shape[-1]
    if volume.shape != (n, n, n):
        raise ValueError(f"volume must be cubic (n, n, n), got {volume.shape}")
    r_max = n / 2 if r_max is None else min(float(r_max), n / 2 * 3 ** 0.5)
    v = volume.astype(xp.float32) / gridding_correction(n, pad, xp)
    big = pad * n
    half = min(int(math.ceil(pad * r_max)) + 2, big // 2 - 1)
    return FourierMap(data=_centred_band(v, big, half), pad=pad, n=n, r_max=r_max)


def _centred_band(v, D: int, half: int):
    """``fft3c`` of ``v`` ``(n, n, n)`` zero-padded to ``D^3`` (centred in it), at the
    frequencies ``-half .. half`` of every axis only: complex64 ``(2 half + 1,) * 3``.

    Per axis ``F(k) = sum_t v(t) exp(-2 pi i k (t - n // 2) / D)``: a length-``D`` FFT of the
    ``n`` samples (the rest of the padded axis is zero) times ``exp(2 pi i k (n // 2) / D)``, kept at
    ``|k| <= half``. One axis at a time, each pass on the band the passes before kept: about
    a tenth of the whole padded transform's work at box 128 and a small band.
    """
    xp = xp_of(v)
    n = v.shape[-1]
    fft, rfft = fft_functions(xp, "fft", "rfft")
    k = xp.arange(-half, half + 1)
    phase = xp.exp((2j * math.pi * (n // 2) / D) * k).astype(xp.complex64)
    # x: the real input's transform at k >= 0; k < 0 are their conjugates.
    a = rfft(v, n=D, axis=2)[:, :, : half + 1]
    a = xp.concatenate([xp.conj(a[:, :, :0:-1]), a], axis=2) * phase
    a = fft(a, n=D, axis=1)[:, k % D] * phase[:, None]
    a = fft(a, n=D, axis=0)[k % D] * phase[:, None, None]
    return xp.ascontiguousarray(a.astype(xp.complex64))


def trilinear_corners(points, size: int, center: int):
    """The 8 corner linear indices and weights of ``points`` ``(..., 3)`` (x, y, z) on a cube.

    ``points`` are in grid units relative to ``center``. Corners outside the
    cube get weight 0 (and a valid index). Returns ``(idx, w)`` each
    ``(8, ...)``; ``idx`` int64 into the cube flattened in [z, y, x] order.
    """
    xp = xp_of(points)
    p = points + center
    f = xp.floor(p)
    t = (p - f).astype(xp.float32)
    i0 = f.astype(xp.int64)
    idx = []
    wts = []
    for dz in (0, 1):
        for dy in (0, 1):
            for dx in (0, 1):
                ix, iy, iz = i0[..., 0] + dx, i0[..., 1] + dy, i0[..., 2] + dz
                w = (
                    (t[..., 0] if dx else 1 - t[..., 0])
                    * (t[..., 1] if dy else 1 - t[..., 1])
                    * (t[..., 2] if dz else 1 - t[..., 2])
                )
                inside = (ix >= 0) & (ix < size) & (iy >= 0) & (iy < size) & (iz >= 0) & (iz < size)
                w = xp.where(inside, w, 0)
                lin = (xp.clip(iz, 0, size - 1) * size + xp.clip(iy, 0, size - 1)) * size + xp.clip(ix, 0, size - 1)
                idx.append(lin)
                wts.append(w)
    return xp.stack(idx), xp.stack(wts)


def slice_points(rotations, kx, ky):
    """3D points ``(R, M, 3)`` (x, y, z) = ``R @ (kx, ky, 0)`` for rotations ``(R, 3, 3)`` and ``(M,)`` frequencies."""
    xp = xp_of(rotations, kx)
    Rf = xp.asarray(rotations, dtype=xp.float32)
    kx = xp.asarray(kx, dtype=xp.float32)
    ky = xp.asarray(ky, dtype=xp.float32)
    return Rf[:, None, :, 0] * kx[None, :, None] + Rf[:, None, :, 1] * ky[None, :, None]


def _axis_corners(coord, size: int, xp):
    """Lower/upper grid indices and weights along one axis for ``coord`` (grid units, absolute).

    Returns ``(i0, i1, w0, w1)``; indices are clipped into ``[0, size)`` and a
    corner outside the cube gets weight 0 (it reads as zero).
    """
    f = xp.floor(coord)
    t = coord - f
    i0 = f.astype(xp.int64)
    i1 = i0 + 1
    w0 = xp.where((i0 >= 0) & (i0 < size), 1 - t, 0)
    w1 = xp.where((i1 >= 0) & (i1 < size), t, 0)
    return xp.clip(i0, 0, size - 1), xp.clip(i1, 0, size - 1), w0, w1


def project(fmap: FourierMap, rotations, kx, ky):
    """Central slices ``(R, M)`` complex64 at frequencies ``(kx, ky)`` ``(M,)`` (cycles per box).

    Trilinear interpolation on the padded grid, written for speed: the three
    coordinates of ``R @ (kx, ky, 0)`` as separate contiguous ``(R, M)``
    float32 arrays, flat ``take`` gathers accumulated in place (no
    ``(8, R, M)`` temporaries). Frequencies with ``|k| > r_max`` give 0 (their
    points are moved to the origin and weighted 0); corners outside the
    stored cube read as zero. When the cube holds every corner of the
    ``r_max`` ball (the usual cropped map) the 8 gathers are at constant
    offsets from one base index; on a CPU with numba that case is the compiled
    :func:`hetero_dask.core.cpu_kernels.project_interior` (same arithmetic, one pass).

    ``fmap.data`` may hold C maps of one geometry stacked ``(C, S, S, S)``
    (:func:`stacked`): the slices are then ``(C, R, M)``, the coordinates and
    weights computed once for all of them, each map's values as from its own call.
    """
    xp = xp_of(fmap.data)
    kx = xp.asarray(kx, dtype=xp.float32)
    ky = xp.asarray(ky, dtype=xp.float32)
    S = fmap.data.shape[-1]
    inside = ((kx**2 + ky**2) <= fmap.r_max**2).astype(xp.float32)
    interior = fmap.center + math.ceil(fmap.pad * fmap.r_max) + 1 <= S - 1
    if interior and xp is np and cpu_kernels.enabled():
        out = cpu_kernels.project_interior(fmap.data, rotations, kx * inside, ky * inside, inside, fmap.pad,
                                           fmap.center)
        return out.reshape(*fmap.data.shape[:-3], *out.shape[1:])
    coords = _grid_coords(fmap, xp.asarray(rotations, dtype=xp.float32), kx * inside, ky * inside)
    flat = fmap.data.reshape(*fmap.data.shape[:-3], -1)
    if interior:
        return _gather_interior(flat, coords, inside, S, xp)
    return _gather_clipped(flat, coords, inside, S, xp)


def _grid_coords(fmap: FourierMap, Rf, kx, ky) -> list:
    """The grid coordinates x, y, z ``(R, M)`` float32 of ``R @ (kx, ky, 0)`` (padded, centred)."""
    xp = xp_of(Rf)
    sx = kx * fmap.pad
    sy = ky * fmap.pad
    coords = []
    for a in range(3):
        c = Rf[:, a, 0:1] * sx
        c += Rf[:, a, 1:2] * sy
        c += xp.float32(fmap.center)
        coords.append(c)
    return coords


def _gather_interior(flat, coords, inside, S: int, xp):
    """Trilinear gathers when every corner lies inside the cube: 8 gathers at constant
    offsets from one base index. Overwrites ``coords`` with their fractional parts."""
    idt = xp.int32 if S**3 < 2**31 else xp.int64
    base = None
    for c, stride in zip(coords, (1, S, S * S), strict=True):
        f = xp.floor(c)
        c -= f  # c now holds the fractional part
        i = f.astype(idt) * stride
        base = i if base is None else base + i
    tx, ty, tz = coords
    tx *= inside
    wx0 = inside - tx
    out = None
    for oz, wz in ((0, 1 - tz), (S * S, tz)):
        for oy, wy in ((0, 1 - ty), (S, ty)):
            wzy = wz * wy
            idx = base + (oz + oy)
            v0 = xp.take(flat, idx, axis=-1)
            v0 *= wx0 * wzy
            v1 = xp.take(flat, idx + 1, axis=-1)
            v1 *= tx * wzy
            v0 += v1
            out = v0 if out is None else out + v0
    return out


def _gather_clipped(flat, coords, inside, S: int, xp):
    """Trilinear gathers where corners may fall outside the cube (they read as zero)."""
    x0, x1, wx0, wx1 = _axis_corners(coords[0], S, xp)
    y0, y1, wy0, wy1 = _axis_corners(coords[1], S, xp)
    z0, z1, wz0, wz1 = _axis_corners(coords[2], S, xp)
    out = xp.zeros((*flat.shape[:-1], *x0.shape), dtype=xp.complex64)
    for oz, wz in ((z0 * (S * S), wz0), (z1 * (S * S), wz1)):
        for oy, wy in ((y0 * S, wy0), (y1 * S, wy1)):
            wzy = wz * wy
            ozy = oz + oy
            for ox, wx in ((x0, wx0 * inside), (x1, wx1 * inside)):
                out += xp.take(flat, ox + ozy, axis=-1) * (wzy * wx)
    return out


def stacked(fmaps) -> FourierMap:
    """One :class:`FourierMap` whose data stacks ``fmaps`` ``(C, S, S, S)`` (same n, pad,
    r_max), for :func:`project` of all C maps at the same rotations at once."""
    xp = xp_of(fmaps[0].data)
    first = fmaps[0]
    if any((f.data.shape, f.pad, f.n, f.r_max) != (first.data.shape, first.pad, first.n, first.r_max) for f in fmaps):
        raise ValueError("stacked FourierMaps need one shape, pad, n and r_max")
    return FourierMap(data=xp.stack([f.data for f in fmaps]), pad=first.pad, n=first.n, r_max=first.r_max)


def project_images(fmap: FourierMap, rotations):
    """Full centred image spectra ``(R, n, n)`` of the volume at ``rotations``."""
    xp = xp_of(fmap.data)
    n = fmap.n
    k = freq_1d(n, xp)
    ky, kx = xp.meshgrid(k, k, indexing="ij")
    out = project(fmap, rotations, kx.ravel(), ky.ravel())
    return out.reshape(-1, n, n)

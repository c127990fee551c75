"""Trilinear backprojection into Hermitian half-grids of a 2x-padded Fourier volume.

A particle contributes ``values = w * CTF * Y_centred / sigma2`` to the data
grid ``B`` and ``weights = w * CTF^2 / sigma2`` to the weight grid ``W`` at
the 3D points ``pad * R @ (kx, ky, 0)`` (the transpose of
:func:`hetero_dask.core.projector.project`, same convention). The caller
folds the posterior weight ``w``, the CTF and the noise into ``values`` and
``weights``.

Half-grid layout: arrays ``(2h+1, 2h+1, h+1)`` indexed [z, y, x], with z and
y centred at index ``h`` and x running over 0..h (padded-grid units; ``h``
covers the radius ``pad * r_max`` plus one voxel for trilinear corners).
A point with x < 0 is stored as its Friedel mate ``-p`` with the conjugate
value, so the grid keeps exactly the half of the spectrum a real volume
needs. Consequence on the plane x = 0: a deposit there stands for itself
only, and the full spectrum on that plane is ``H(y, z) + conj(H(-y, -z))``
(:func:`hermitian_x0`); every operation here is linear in the grids, so
partial grids merge by plain sums and the plane is completed once, at the end.

Each image frequency should be passed once per Friedel pair (e.g.
:func:`half_plane_freqs`): ``k`` and ``-k`` land on the same voxels.

Precision: grids are complex64 / float32 by default and samples are added
in place (``np.add.at``: no grid-sized temporary per call, so small batches
cost no more per sample than large ones); half-grids at box 128 (~8.7 M voxels, 105 MB per
class and half-set) keep K=50 refinements within memory; ``double=True``
gives complex128 / float64 grids.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from . import cpu_kernels
from .backend import to_device, xp_of
from .projector import slice_points


@dataclass
class BackprojGrids:
    """Data ``B`` (complex) and weight ``W`` (real) half-grids ``(2h+1, 2h+1, h+1)`` [z, y, x].

    ``pad``: padding factor; ``n``: original box; ``r_max``: largest
    frequency (cycles per box) accumulated.
    """

    data: object
    weight: object
    pad: int
    n: int
    r_max: float

    @property
    def half_width(self) -> int:
        """``h``: the grid covers padded-grid coordinates -h..h in z and y, 0..h in x."""
        return self.data.shape[-1] - 1

    def to(self, xp) -> BackprojGrids:
        """The same grids as arrays of namespace ``xp`` (e.g. numpy before they travel)."""
        return replace(self, data=to_device(self.data, xp), weight=to_device(self.weight, xp))


def _half_width(pad: int, r_max: float) -> int:
    h = int(math.ceil(pad * r_max)) + 1
    if (2 * h + 1) ** 2 * (h + 1) >= 1 << 24:
        raise ValueError(f"half-grid of half-width {h} too large (pad * r_max = {pad * r_max})")
    return h


def new_grids(n: int, pad: int = 2, r_max: float | None = None, xp=np, double: bool = False):
    """Zeroed :class:`BackprojGrids` for box ``n`` up to ``r_max`` (cycles per box, default Nyquist)."""
    r_max = n / 2 if r_max is None else min(float(r_max), n / 2)
    h = _half_width(pad, r_max)
    shape = (2 * h + 1, 2 * h + 1, h + 1)
    cdt, rdt = (xp.complex128, xp.float64) if double else (xp.complex64, xp.float32)
    return BackprojGrids(xp.zeros(shape, cdt), xp.zeros(shape, rdt), pad, n, r_max)


def half_plane_freqs(n: int, r_max: float | None = None, xp=np):
    """One frequency per Friedel pair of a centred ``(n, n)`` image, within ``r_max``.

    Returns ``(kx, ky, flat_idx)``: float32 frequencies (cycles per box) with
    ``kx > 0`` or (``kx == 0`` and ``ky >= 0``), and their int64 indices into
    the image spectrum raveled [y, x].
    """
    r_max = n / 2 if r_max is None else float(r_max)
    k = xp.arange(n) - n // 2
    ky, kx = xp.meshgrid(k, k, indexing="ij")
    keep = ((kx > 0) | ((kx == 0) & (ky >= 0))) & (kx**2 + ky**2 <= r_max**2)
    flat_idx = xp.nonzero(keep.ravel())[0]
    return (
        kx.ravel()[flat_idx].astype(xp.float32),
        ky.ravel()[flat_idx].astype(xp.float32),
        flat_idx,
    )


def _flat(a):
    """A 1-D view of contiguous ``a`` (a reshape that copied would drop the scatter's writes)."""
    if not a.flags.c_contiguous:
        raise ValueError("backprojection grids must be C-contiguous arrays")
    return a.reshape(-1)


def _scatter_add(target, idx, vals):
    """``target.ravel()[idx] += vals`` with repeated indices summed, in place.

    numpy: ``np.add.at`` (unbuffered fast path, no grid-sized temporary;
    complex targets in one call); cupy: atomic ``cupyx.scatter_add`` (real
    and imaginary parts separately).
    """
    xp = xp_of(target)
    flat = _flat(target)
    if xp is np:
        np.add.at(flat, idx, vals.astype(flat.dtype, copy=False))
        return
    import cupyx  # noqa: PLC0415

    if xp.iscomplexobj(flat):
        pairs = flat.view(flat.real.dtype)
        cupyx.scatter_add(pairs, 2 * idx, vals.real.astype(pairs.dtype))
        cupyx.scatter_add(pairs, 2 * idx + 1, vals.imag.astype(pairs.dtype))
    else:
        cupyx.scatter_add(flat, idx, vals.astype(flat.dtype))


def backproject(grids: BackprojGrids, rotations, values, weights, kx, ky, chunk_points=1 << 18,
                deterministic: bool = False):
    """Accumulate ``values`` ``(P, M)`` complex and ``weights`` ``(P, M)`` real into ``grids`` in place.

    ``rotations`` ``(P, 3, 3)``; ``kx``, ``ky`` ``(M,)`` in cycles per box.
    Frequencies beyond ``grids.r_max`` are skipped. Particles are processed
    in batches of about ``chunk_points`` samples (temporary memory ~ 250 bytes
    per sample: 8 corners of indices, weights and products).

    ``deterministic=True``: the call's contributions are bitwise independent
    of the particle order and of the device's atomic-add order (GPU): all
    samples are kept (~40 bytes each, plus sort temporaries), sorted by
    (voxel, value) and summed per voxel in float64 (:func:`_sorted_segment_sum`),
    then added to the grids once. Equal to the default within float rounding.
    """
    xp = xp_of(grids.data)
    kx, ky = xp.asarray(kx, dtype=xp.float32), xp.asarray(ky, dtype=xp.float32)
    values, weights = xp.asarray(values), xp.asarray(weights)
    if values.shape != weights.shape or values.shape[-1] != kx.shape[0]:
        raise ValueError(
            f"values {values.shape} and weights {weights.shape} must both be (P, M) with M = {kx.shape[0]}"
        )
    inside = kx**2 + ky**2 <= grids.r_max**2
    if not bool(xp.all(inside)):
        sel = xp.nonzero(inside)[0]
        kx, ky, values, weights = kx[sel], ky[sel], values[:, sel], weights[:, sel]
    P, M = values.shape
    rotations = xp.asarray(rotations, dtype=xp.float32)
    if (
        xp is np
        and not deterministic
        and cpu_kernels.enabled()
        and grids.data.dtype == np.complex64
        and grids.weight.dtype == np.float32
    ):
        cpu_kernels.backproject_trilinear(
            _flat(grids.data), _flat(grids.weight), rotations, kx, ky, values, weights,
            grids.pad, grids.half_width,
        )
        return grids
    step = max(1, chunk_points // max(M, 1))
    scatter = _CollectedScatter() if deterministic else _scatter_add
    for s in range(0, P, step):
        part = slice(s, s + step)
        _backproject_batch(grids, rotations[part], values[part], weights[part], kx, ky, scatter)
    if deterministic:
        scatter.flush()
    return grids


def _sorted_segment_sum(idx, vals):
    """Unique ``idx`` and the float64 sums of their real ``vals``, independent of input order.

    Entries are sorted by (index, value), so the summation order of each
    segment is a function of the multiset of entries only; no atomics.
    """
    xp = xp_of(idx)
    order = xp.argsort(vals, kind="stable")
    order = order[xp.argsort(idx[order], kind="stable")]
    i, v = idx[order], vals[order].astype(xp.float64)
    new = xp.ones(i.shape, dtype=bool)
    new[1:] = i[1:] != i[:-1]
    start = xp.flatnonzero(new)
    return i[start], xp.add.reduceat(v, start)


class _CollectedScatter:
    """A stand-in for :func:`_scatter_add` that keeps every (index, value) until :meth:`flush`."""

    def __init__(self):
        self.parts = {}  # id(target) -> (target, [idx], [vals])

    def __call__(self, target, idx, vals):
        self.parts.setdefault(id(target), (target, [], []))
        self.parts[id(target)][1].append(idx)
        self.parts[id(target)][2].append(vals)

    def flush(self):
        for target, idx_parts, val_parts in self.parts.values():
            xp = xp_of(target)
            flat = _flat(target)
            idx, vals = xp.concatenate(idx_parts), xp.concatenate(val_parts)
            u, s = _sorted_segment_sum(idx, vals.real)
            if xp.iscomplexobj(flat):
                s = s + 1j * _sorted_segment_sum(idx, vals.imag)[1]
            flat[u] += s.astype(flat.dtype)
        self.parts.clear()


def _backproject_batch(
    grids: BackprojGrids, rotations, values, weights, kx, ky, scatter=_scatter_add
):
    """Scatter one batch; samples are ordered (particle, corner, frequency) so that the 8
    corners of one slice hit the same cache-resident part of the grid."""
    xp = xp_of(grids.data)
    h = grids.half_width
    S, X = 2 * h + 1, h + 1
    P, M = values.shape
    pts = slice_points(rotations, kx, ky) * xp.float32(grids.pad)  # (P, M, 3)
    flip = pts[..., 0] < 0
    pts *= xp.where(flip, xp.float32(-1), xp.float32(1))[..., None]
    v = values.astype(xp.complex64)
    v = xp.where(flip, xp.conj(v), v)
    f = xp.floor(pts)
    t = pts - f  # (P, M, 3) float32
    # Linear index of the lower corner, exact in float32 (grids hold < 2^24 voxels); int32
    # indices halve the index traffic of the scatter.
    fh = f + xp.float32(h)
    base = ((fh[..., 2] * S + fh[..., 1]) * X + f[..., 0]).astype(xp.int32)  # (P, M)
    offsets = xp.asarray(
        [(dz * S + dy) * X + dx for dz in (0, 1) for dy in (0, 1) for dx in (0, 1)], xp.int32
    )
    lo_hi = [xp.stack([1 - t[..., a], t[..., a]], axis=1) for a in range(3)]  # (P, 2, M) each
    wx, wy, wz = lo_hi
    w8 = (wz[:, :, None, None] * wy[:, None, :, None] * wx[:, None, None, :]).reshape(P, 8, M)
    idx = (base[:, None, :] + offsets[None, :, None]).reshape(-1)
    scatter(grids.data, idx, (w8 * v[:, None, :]).reshape(-1))
    scatter(grids.weight, idx, (w8 * weights.astype(xp.float32)[:, None, :]).reshape(-1))


def symmetry_mates(rotations, ops):
    """All mates ``g @ R`` ``(G * P, 3, 3)`` (op-major) of rotations ``(P, 3, 3)`` for ops ``(G, 3, 3)``.

    Backprojecting an image at every mate (values tiled ``G`` times) is
    symmetry by expansion; :func:`symmetrise_grids` does the same once per grid.
    """
    xp = xp_of(rotations)
    ops = xp.asarray(ops, dtype=rotations.dtype)
    return (ops[:, None] @ rotations[None]).reshape(-1, 3, 3)


def merge_grids(a: BackprojGrids, b: BackprojGrids) -> BackprojGrids:
    """Sum of two partial grids of the same layout (the tree-reduction step)."""
    if (a.pad, a.n, a.data.shape) != (b.pad, b.n, b.data.shape):
        raise ValueError(
            f"cannot merge grids of pad/n/shape {(a.pad, a.n, a.data.shape)} and "
            f"{(b.pad, b.n, b.data.shape)}: crop both to one r_max first (crop_grids)"
        )
    return replace(a, data=a.data + b.data, weight=a.weight + b.weight)


def crop_grids(grids: BackprojGrids, r_max: float) -> BackprojGrids:
    """The grids restricted to frequencies up to ``r_max`` (a copy; no-op if not smaller)."""
    xp = xp_of(grids.data)
    if r_max >= grids.r_max:
        return grids
    h0, h1 = grids.half_width, _half_width(grids.pad, r_max)
    sl = (slice(h0 - h1, h0 + h1 + 1), slice(h0 - h1, h0 + h1 + 1), slice(0, h1 + 1))
    return replace(
        grids,
        data=xp.ascontiguousarray(grids.data[sl]),
        weight=xp.ascontiguousarray(grids.weight[sl]),
        r_max=float(r_max),
    )


def hermitian_x0(half):
    """Complete the x = 0 plane of a half-grid ``(2h+1, 2h+1, h+1)``: ``H + conj(H(-y, -z))`` there.

    Works for data (complex) and weight (real) grids; returns a new array.
    """
    xp = xp_of(half)
    out = half.copy()
    plane = half[:, :, 0]
    out[:, :, 0] = plane + xp.conj(plane[::-1, ::-1])
    return out


def _interpolate_half(half_full, pts):
    """Trilinear values of a completed half-grid at points ``(N, 3)`` (x, y, z) in grid units."""
    xp = xp_of(half_full)
    h = half_full.shape[-1] - 1
    S, X = 2 * h + 1, h + 1
    flip = pts[:, 0] < 0
    pts = xp.where(flip[:, None], -pts, pts)
    f = xp.floor(pts)
    t = pts - f
    i0 = f.astype(xp.int64)
    flat = half_full.reshape(-1)
    out = xp.zeros(pts.shape[0], dtype=half_full.dtype)
    for dz in (0, 1):
        for dy in (0, 1):
            for dx in (0, 1):
                lin = ((i0[:, 2] + dz + h) * S + (i0[:, 1] + dy + h)) * X + i0[:, 0] + dx
                w = (t[:, 0] if dx else 1 - t[:, 0]) * (t[:, 1] if dy else 1 - t[:, 1])
                w = w * (t[:, 2] if dz else 1 - t[:, 2])
                out += w * flat[lin]
    return xp.where(flip, xp.conj(out), out)


def symmetrise_grids(grids: BackprojGrids, ops) -> BackprojGrids:
    """Sum of the grids over a point group: ``S(q) = sum_g G(g q)`` for ops ``(G, 3, 3)``.

    Equivalent to backprojecting every particle at all symmetry mates
    ``g @ R`` (up to trilinear interpolation of the grids, as RELION does),
    at a cost independent of the number of particles. Voxels beyond radius
    ``h - 1`` (outside ``r_max``) are left as they are.
    """
    xp = xp_of(grids.data)
    ops = xp.asarray(ops, dtype=xp.float64)
    h = grids.half_width
    c = xp.arange(-h, h + 1)
    kz, ky, kx = xp.meshgrid(c, c, xp.arange(h + 1), indexing="ij")
    q = xp.stack([kx.ravel(), ky.ravel(), kz.ravel()], axis=1).astype(xp.float64)
    sel = xp.nonzero(xp.sum(q**2, axis=1) <= (h - 1) ** 2)[0]
    q = q[sel]
    out = []
    for half in (grids.data, grids.weight):
        full = hermitian_x0(half)
        acc = xp.zeros(q.shape[0], dtype=half.dtype)
        for g in ops:
            acc += _interpolate_half(full, q @ g.T)
        sym = full.copy().reshape(-1)
        sym[sel] = acc
        sym = sym.reshape(half.shape)
        # Back to the deposit convention: the x = 0 plane holds half of a Hermitian plane.
        sym[:, :, 0] *= 0.5
        out.append(sym)
    return replace(grids, data=out[0], weight=out[1])


def half_plane_spectra(images, r_max=None):
    """Centred spectra of real images ``(B, n, n)`` at :func:`half_plane_freqs` ``(kx, ky)``.

    Returns ``(kx, ky, Y (B, M) complex64)``, C-contiguous; one single-precision
    real-input FFT per image (kx >= 0 is the real FFT's half). The centring
    (origin at pixel ``n // 2``) is a phase ``exp(2 pi i (n // 2)(kx + ky) / n)``
    on the M samples, ``(-1)^(kx + ky)`` for even ``n``, instead of a shift of the images.
    """
    xp = xp_of(images)
    n = images.shape[-1]
    kx, ky, _ = half_plane_freqs(n, r_max, xp)
    images = xp.asarray(images, dtype=xp.float32)
    if xp is np:
        import scipy.fft  # noqa: PLC0415

        F = scipy.fft.rfft2(images)
    else:
        F = xp.fft.rfft2(images)
    ikx, iky = kx.astype(xp.int64), ky.astype(xp.int64)
    flat = (iky % n) * (n // 2 + 1) + ikx
    Y = xp.take(F.reshape(images.shape[0], -1), flat, axis=1).astype(xp.complex64, copy=False)
    if n % 2 == 0:
        Y *= xp.where((ikx + iky) % 2 == 0, 1, -1).astype(xp.float32)
    else:
        Y *= xp.exp((2j * np.pi * (n // 2) / n) * (ikx + iky)).astype(xp.complex64)
    return kx, ky, Y

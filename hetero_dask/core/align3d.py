"""Translational alignment of volumes ``(N, N, N)`` by 3D FFT cross-correlation.

Conventions (as in :mod:`hetero_dask.core.fourier`): array axes are (z, y, x),
shift vectors are written (x, y, z) in voxels, the real-space origin is at
index ``N // 2``. ``shift_volume(v, s)`` moves the content of ``v`` by ``+s``.
``align_translation(ref, mov)`` returns the ``s`` for which
``shift_volume(mov, s)`` best matches ``ref``, so the two compose directly.

The hand of a map is flipped by mirroring z about the origin
(:func:`flip_hand`); comparing a map with the flipped copy of another detects
classes that differ only by hand (ab-initio runs cannot tell the hand apart).
Only translations are searched: the volumes being compared come from one
refinement and share its orientation frame.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .backend import to_host, xp_of


@dataclass(frozen=True)
class PairAlignments:
    """Best translational match of ``mov`` onto ``ref`` for P pairs.

    correlation: (P,) normalised cross-correlation at the best shift (1 = identical
        up to the shift and a positive scale);
    shift_px: (P, 3) float32 (x, y, z) voxels, ``shift_volume(mov, shift) ~ ref``
        (applied after the hand flip when ``flipped``);
    flipped: (P,) bool, True where the hand-flipped ``mov`` matched better.
    """

    correlation: np.ndarray
    shift_px: np.ndarray
    flipped: np.ndarray


def flip_hand(vol):
    """Mirror ``vol`` (..., N, N, N) along z about the origin at index N // 2 (z -> -z)."""
    xp = xp_of(vol)
    n = vol.shape[-3]
    # flip maps index i to N-1-i; the roll by one (even N) keeps the origin N//2 fixed
    return xp.roll(xp.flip(vol, axis=-3), 1 if n % 2 == 0 else 0, axis=-3)


def _wave_numbers(n: int, xp):
    """Signed integer frequencies in numpy FFT order, length n, and rfft length n//2+1."""
    full = xp.fft.fftfreq(n, d=1.0 / n).astype(xp.float32)
    half = xp.fft.rfftfreq(n, d=1.0 / n).astype(xp.float32)
    return full, half


def shift_volume(vol, shift_px):
    """Move the content of ``vol`` (N, N, N) by ``shift_px`` (x, y, z) voxels (Fourier phase ramp).

    Periodic: content leaving one face re-enters at the other.
    """
    xp = xp_of(vol)
    n = vol.shape[-1]
    s = np.asarray(shift_px, dtype=np.float64)
    if not np.any(s):
        return vol
    full, half = _wave_numbers(n, xp)
    phase = (
        float(s[2]) * full[:, None, None] + float(s[1]) * full[None, :, None] + float(s[0]) * half
    )
    ramp = xp.exp(-2j * np.pi / n * phase).astype(xp.complex64)
    out = xp.fft.irfftn(
        xp.fft.rfftn(vol, axes=(-3, -2, -1)) * ramp, s=vol.shape[-3:], axes=(-3, -2, -1)
    )
    return out.astype(vol.dtype, copy=False)


def _signed(idx, n: int):
    """Wrap FFT indices 0..n-1 to signed shifts -n//2 .. n - n//2 - 1 (integer arrays)."""
    return (idx + n // 2) % n - n // 2


def shift_window(n: int, max_shift_px: float, xp=np):
    """Boolean (N, N, N) array in FFT order: True where the cyclic shift has norm <= max_shift_px."""
    k = _signed(xp.arange(n), n).astype(xp.float32)
    r2 = k[:, None, None] ** 2 + k[None, :, None] ** 2 + k[None, None, :] ** 2
    return r2 <= np.float32(max_shift_px) ** 2


def _parabolic_offset(c_minus, c0, c_plus):
    """Sub-voxel offset in [-0.5, 0.5] of the vertex of the parabola through three samples."""
    xp = xp_of(c0)
    denom = c_minus - 2.0 * c0 + c_plus
    safe = xp.where(xp.abs(denom) > 1e-12, denom, 1.0)
    off = xp.where(xp.abs(denom) > 1e-12, 0.5 * (c_minus - c_plus) / safe, 0.0)
    return xp.clip(off, -0.5, 0.5)


def _peaks(cc, window):
    """Best value and sub-voxel (x, y, z) shift of correlation maps ``cc`` (P, N, N, N) in FFT order.

    Returns (value (P,), shift (P, 3)); the integer peak is taken inside ``window``
    and refined by a parabola along each axis through its cyclic neighbours (the
    value is the sum of the three vertex heights above the integer peak).
    """
    xp = xp_of(cc)
    p, n = cc.shape[0], cc.shape[-1]
    masked = xp.where(window[None], cc, -xp.inf)
    flat = xp.argmax(masked.reshape(p, -1), axis=1)
    iz, iy, ix = xp.unravel_index(flat, (n, n, n))
    rows = xp.arange(p)
    value = cc[rows, iz, iy, ix]
    shift = xp.empty((p, 3), dtype=xp.float32)
    rise = xp.zeros(p, dtype=cc.dtype)
    for col, (axis_idx, others) in enumerate(
        (
            (ix, lambda d: (iz, iy, (ix + d) % n)),
            (iy, lambda d: (iz, (iy + d) % n, ix)),
            (iz, lambda d: ((iz + d) % n, iy, ix)),
        )
    ):
        c_minus = cc[(rows, *others(-1))]
        c_plus = cc[(rows, *others(1))]
        off = _parabolic_offset(c_minus, value, c_plus)
        shift[:, col] = _signed(axis_idx, n) + off
        # height of the parabola's vertex above the integer peak
        rise = rise - 0.25 * (c_minus - c_plus) * off
    return value + rise, shift


def correlation_maps(ref_ft, mov_ft, n: int):
    """Cyclic cross-correlation maps (P, N, N, N) in FFT order from rfftn spectra (P, N, N, N//2+1).

    ``cc[s] = sum_r ref(r) mov(r - s)`` for the shift s (index wrapped).
    """
    xp = xp_of(ref_ft)
    return xp.fft.irfftn(ref_ft * xp.conj(mov_ft), s=(n, n, n), axes=(-3, -2, -1))


def align_pairs(vols, pairs, max_shift_px: float, try_flip: bool = True, chunk: int = 16):
    """Align ``vols[j]`` onto ``vols[i]`` for each pair (i, j) by translation (and hand flip).

    vols: (K, N, N, N) float32 volumes, ideally masked and zero-mean;
    pairs: (P, 2) integer indices (ref i, moving j);
    max_shift_px: search radius in voxels (0 = no shift, only the flip is tried);
    try_flip: also compare with the hand-flipped moving volume and keep the better;
    chunk: pairs per batched inverse FFT (bounds memory: chunk * N^3 * 4 bytes).

    The correlation is normalised by the norms of the two volumes, so it lies in
    [-1, 1] and equals 1 for a copy shifted by an integer inside the window.
    """
    xp = xp_of(vols)
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    n = vols.shape[-1]
    needed = np.unique(pairs)
    local = {int(k): i for i, k in enumerate(needed)}
    sub = vols[xp.asarray(needed)]
    spectra = xp.fft.rfftn(sub.astype(xp.float32), axes=(-3, -2, -1)).astype(xp.complex64)
    norms = xp.sqrt(xp.sum(sub.astype(xp.float64) ** 2, axis=(-3, -2, -1)))
    flipped_spectra = None
    if try_flip:  # only moving volumes are flipped
        movers = np.unique(pairs[:, 1])
        flip_row = np.zeros(len(needed), dtype=np.int64)
        flip_row[[local[int(j)] for j in movers]] = np.arange(len(movers))
        flipped = flip_hand(vols[xp.asarray(movers)]).astype(xp.float32)
        flipped_spectra = xp.fft.rfftn(flipped, axes=(-3, -2, -1)).astype(xp.complex64)
    window = shift_window(n, max_shift_px, xp)

    p = len(pairs)
    best = np.empty(p, dtype=np.float64)
    shifts = np.empty((p, 3), dtype=np.float32)
    flips = np.zeros(p, dtype=bool)
    li = np.array([local[int(i)] for i in pairs[:, 0]], dtype=np.int64)
    lj = np.array([local[int(j)] for j in pairs[:, 1]], dtype=np.int64)
    for start in range(0, p, chunk):
        sl = slice(start, min(start + chunk, p))
        ri, rj = li[sl], lj[sl]
        scale = norms[ri] * norms[rj]
        scale = xp.where(scale > 0, scale, 1.0)
        value, shift = _peaks(correlation_maps(spectra[ri], spectra[rj], n), window)
        value = value / scale
        if try_flip:
            v_f, s_f = _peaks(
                correlation_maps(spectra[ri], flipped_spectra[flip_row[rj]], n), window
            )
            v_f = v_f / scale
            use = v_f > value
            value = xp.where(use, v_f, value)
            shift = xp.where(use[:, None], s_f, shift)
            flips[sl] = to_host(use)
        best[sl] = to_host(value)
        shifts[sl] = to_host(shift)
    return PairAlignments(correlation=best, shift_px=shifts, flipped=flips)


def apply_alignment(vol, shift_px, flipped: bool):
    """Bring ``vol`` onto its reference: flip the hand when ``flipped``, then move by ``shift_px``."""
    return shift_volume(flip_hand(vol) if flipped else vol, shift_px)


def invert_alignment(shift_px, flipped: bool):
    """The alignment of ``ref`` onto ``mov`` from that of ``mov`` onto ``ref`` (shift (3,) x, y, z)."""
    back = -np.asarray(shift_px, dtype=np.float64)
    if flipped:
        back[2] = -back[2]  # flip_hand(shift(v, s)) == shift(flip_hand(v), (sx, sy, -sz))
    return back, bool(flipped)


def poses_after_alignment(rotations, shifts_px, move_px, flipped: bool):
    """Particle poses for a volume after :func:`apply_alignment` (flip, then move by ``move_px``).

    rotations: (N, 3, 3) particle rotations R (image frequency k samples the volume at R k);
    shifts_px: (N, 2) image shifts (x, y) in the image model ``Y = C V^(R k) e^{+2 pi i k.s/N}``;
    move_px: (3,) (x, y, z) translation of the volume, in the same pixel size as the shifts.

    The hand flip F = diag(1, 1, -1) turns R into F R F (a rotation; F k = k in the
    image plane), and moving the volume by t adds the in-plane part of R^T t to the
    shifts. Returns (rotations (N, 3, 3), shifts (N, 2)); a particle image is then
    explained by the aligned volume exactly as it was by the original.
    """
    xp = xp_of(rotations)
    R = rotations
    if flipped:
        f = xp.asarray([1.0, 1.0, -1.0], dtype=R.dtype)
        R = f[:, None] * R * f[None, :]
    t = xp.asarray(move_px, dtype=R.dtype)
    in_plane = xp.einsum("nji,j->ni", R, t)[:, :2]
    return R, (shifts_px + in_plane).astype(shifts_px.dtype, copy=False)

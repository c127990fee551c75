"""Volumes from backprojected grids: Wiener-regularised division, inverse FFT, gridding correction.

As RELION's ``BackProjector::reconstruct``:
``V = B / max(W + 1/tau2(shell), floor(shell))`` with
``1/tau2 = mean_shell(W) / (T * SSNR)``, ``SSNR = FSC / (1 - FSC)`` and the
FSC clipped to [0.001, 0.999] (shells the curve does not reach count as
0.001); ``floor = 1e-3 * mean_shell(W)``. Without an FSC the map is the
unregularised ``B / max(W, floor)``. Shells are ``round(r_padded / pad)`` in
cycles per original box, the FSC's shells; only voxels with
``r_padded < pad * r_max`` are kept.

Scale: projections are the unnormalised DFT of the volume (the padded grid
at ``pad * k`` equals the box-``n`` DFT at ``k``), so ``B / W`` estimates the
padded volume's DFT and the inverse FFT (which divides by ``(pad n)^3``)
returns the map in the input's units. Trilinear backprojection convolves the
spectrum with a triangle kernel, i.e. multiplies the padded real-space map by
``sinc^2`` per axis: it is divided out after cropping to ``n``.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from . import cpu_kernels
from .backend import xp_of
from .backprojector import BackprojGrids, hermitian_x0
from .fourier import fft_functions
from .fsc import band_freqs, band_fsc, band_top
from .fsc import fsc as fsc_curve
from .projector import gridding_correction


def _shell_geometry(grids: BackprojGrids):
    """``(shell, n_shells, counts)``: per-voxel shell index (intp; ``n_shells`` = outside
    ``r_max``) of the half-grid and the number of full-spectrum voxels per shell.

    Cached per layout for numpy (the arrays are read-only); voxels with
    ``r_padded >= pad * r_max`` are outside.
    """
    xp = xp_of(grids.data)
    key = (grids.half_width, grids.pad, float(grids.r_max))
    if xp is np:
        return _shell_geometry_np(*key)
    return _shell_geometry_xp(*key, xp)


@functools.lru_cache(maxsize=4)
def _shell_geometry_np(h: int, pad: int, r_max: float):
    shell, n_shells, counts = _shell_geometry_xp(h, pad, r_max, np)
    shell.flags.writeable = False
    return shell, n_shells, counts


@functools.lru_cache(maxsize=4)
def _compact_shells(h: int, pad: int, r_max: float):
    """The numpy shell indices as uint8 / uint16 (a tenth of the memory traffic of intp)."""
    shell, n_shells, _ = _shell_geometry_np(h, pad, r_max)
    out = shell.astype(np.uint8 if n_shells < 255 else np.uint16)
    out.flags.writeable = False
    return out


def _use_kernels(grids: BackprojGrids) -> bool:
    return (
        xp_of(grids.data) is np
        and cpu_kernels.enabled()
        and grids.data.dtype == np.complex64
        and grids.weight.dtype == np.float32
        and grids.data.flags.c_contiguous
        and grids.weight.flags.c_contiguous
    )


def _shell_geometry_xp(h: int, pad: int, r_max: float, xp):
    c = xp.arange(-h, h + 1, dtype=xp.float32) ** 2
    x = xp.arange(h + 1, dtype=xp.float32) ** 2
    r = xp.sqrt(c[:, None, None] + c[None, :, None] + x[None, None, :])
    n_shells = int(math.floor(r_max + 0.5)) + 1
    shell = xp.rint(r / pad).astype(xp.intp)
    shell[r >= pad * r_max] = n_shells
    return shell, n_shells, _shell_sums(xp.ones(shell.shape, xp.float32), shell, n_shells)


def _shell_sums(values, shell, n_shells: int):
    """Per-shell sums ``(n_shells,)`` float64 over the full spectrum a half-grid stands for.

    Voxels with x > 0 count twice (themselves and their Friedel mates); the
    x = 0 plane of a completed half-grid holds both mates and counts once.
    """
    xp = xp_of(values)
    m = n_shells + 1
    total = xp.bincount(shell.reshape(-1), weights=values.reshape(-1), minlength=m)
    plane = xp.bincount(
        shell[:, :, 0].reshape(-1), weights=values[:, :, 0].reshape(-1), minlength=m
    )
    return (2.0 * total - plane)[:n_shells]


def shell_mean_weight(grids: BackprojGrids, weight_full=None):
    """Mean of the (completed) weight grid over each shell ``0 .. round(r_max)``, float64."""
    xp = xp_of(grids.data)
    shell, n_shells, counts = _shell_geometry(grids)
    if weight_full is None and _use_kernels(grids):
        # The completed x = 0 plane holds each Friedel pair once, so the full spectrum's
        # shell sums are twice the raw half-grid's.
        key = (grids.half_width, grids.pad, float(grids.r_max))
        sums = 2.0 * cpu_kernels.shell_sums(grids.weight, _compact_shells(*key), n_shells + 1)
        return sums[:n_shells] / np.maximum(counts, 1.0)
    W = hermitian_x0(grids.weight) if weight_full is None else weight_full
    return _shell_sums(W, shell, n_shells) / xp.maximum(counts, 1.0)


def ssnr_from_fsc(fsc, n_shells: int, xp):
    """``FSC / (1 - FSC)`` per shell ``(n_shells,)``, FSC clipped to [0.001, 0.999], missing shells 0.001."""
    f = xp.full(n_shells, 0.001, dtype=xp.float64)
    c = xp.asarray(fsc, dtype=xp.float64)[:n_shells]
    f[: c.shape[0]] = xp.clip(c, 0.001, 0.999)
    return f / (1.0 - f)


def _regularisers(grids: BackprojGrids, fsc, tau2_fudge: float, weight_floor: float, W=None):
    """Per-shell ``(reg, floor)`` float32 ``(n_shells + 1,)`` (last entry: outside ``r_max``)
    of ``B / max(W + reg, floor)``; ``W``: the completed weight grid, if already made."""
    xp = xp_of(grids.data)
    n_shells = _shell_geometry(grids)[1]
    mean_w = shell_mean_weight(grids, W)
    reg = xp.zeros(n_shells + 1, xp.float64)
    if fsc is not None:
        ssnr = ssnr_from_fsc(fsc, n_shells, xp)
        reg[:n_shells] = mean_w / (tau2_fudge * ssnr)
    floor = xp.full(n_shells + 1, xp.inf)
    floor[:n_shells] = weight_floor * mean_w
    # Shells with no data (or only float32 dust, e.g. an emptied class's decayed
    # accumulators) stay empty: dividing by ~1e-40 would overflow.
    floor[:n_shells][mean_w <= 1e-12 * float(xp.max(mean_w))] = xp.inf
    return reg.astype(xp.float32), floor.astype(xp.float32)


def _divide(grids: BackprojGrids, fsc, tau2_fudge: float, weight_floor: float):
    """The completed half-grid spectrum ``B / max(W + 1/tau2, floor)`` complex64, zero outside ``r_max``."""
    xp = xp_of(grids.data)
    B = hermitian_x0(grids.data)
    W = hermitian_x0(grids.weight)
    shell = _shell_geometry(grids)[0]
    reg, floor = _regularisers(grids, fsc, tau2_fudge, weight_floor, W)
    B /= xp.maximum(W + reg[shell], floor[shell])  # inf (outside, or no data) gives 0
    return B


def reconstruct(
    grids: BackprojGrids, fsc=None, tau2_fudge: float = 1.0, weight_floor: float = 1e-3
):
    """Real-space volume ``(n, n, n)`` float32 from accumulated grids.

    ``fsc``: per-shell FSC ``(n // 2 + 1,)`` (shell = radius in cycles per
    box) for the Wiener prior; pass the half-map FSC for a half-map, and
    :func:`hetero_dask.core.fsc.full_map_fsc` of it for the full map.
    ``tau2_fudge``: the regularisation parameter T (RELION's tau2_fudge).
    ``fsc=None`` gives the unregularised ``B / max(W, floor)``.
    """
    if _use_kernels(grids):
        reg, floor = _regularisers(grids, fsc, tau2_fudge, weight_floor)
        key = (grids.half_width, grids.pad, float(grids.r_max))
        spec = cpu_kernels.wiener_spectrum(
            grids.data, grids.weight, _compact_shells(*key), reg, floor, grids.pad * grids.n
        )
        return _spectrum_to_volume(spec, grids.n, grids.pad)
    V = _divide(grids, fsc, tau2_fudge, weight_floor)
    return _to_real_space(V, grids.n, grids.pad)


def half_map_fsc(grids_a: BackprojGrids, grids_b: BackprojGrids):
    """FSC ``(n // 2 + 1,)`` of the unregularised maps ``reconstruct(grids_a)`` and
    ``reconstruct(grids_b)``, measured to the grids' ``r_max`` as :func:`hetero_dask.core.fsc.fsc`
    measures it, from the maps' band spectra (:func:`band_spectrum`) when that is cheaper
    than making the maps."""
    n = grids_a.n
    top = band_top(n, grids_a.r_max)
    he = min(grids_a.half_width, (grids_a.pad * n - 1) // 2)
    fft_cost = n * n * grids_a.pad * n * math.log2(grids_a.pad * n)
    if 2 * top + 1 >= n or (2 * he + 1) ** 3 * (top + 1) >= fft_cost:
        return fsc_curve(reconstruct(grids_a), reconstruct(grids_b), r_max=grids_a.r_max)
    return band_fsc(band_spectrum(grids_a, top), band_spectrum(grids_b, top), n)


def band_spectrum(grids: BackprojGrids, top: int, fsc=None, tau2_fudge: float = 1.0, weight_floor: float = 1e-3):
    """The real-input FFT of the map ``reconstruct(grids, fsc, tau2_fudge, weight_floor)`` at the
    frequencies up to ``top`` (``(2 top + 1, 2 top + 1, top + 1)`` complex64, the layout of
    :func:`hetero_dask.core.fsc.band_fsc`), without making the map.

    Every step from the divided spectrum to the box's FFT (the padded inverse FFT, the crop to the
    box, the gridding correction, the forward FFT) is linear and acts on each axis alone, so each
    axis is one small matrix (:func:`_band_operator`) applied to the Hermitian-completed band: a
    few million multiplications where the map takes five FFTs of the box.
    """
    xp = xp_of(grids.data)
    n, D = grids.n, grids.pad * grids.n
    V = _divide(grids, fsc, tau2_fudge, weight_floor)
    h = V.shape[-1] - 1
    he = min(h, (D - 1) // 2)  # as _to_real_space keeps
    V = V[h - he : h + he + 1, h - he : h + he + 1, : he + 1]
    full = xp.empty((2 * he + 1,) * 3, dtype=xp.complex64)
    full[:, :, he:] = V
    full[:, :, :he] = xp.conj(V[::-1, ::-1, :0:-1])  # x = -he .. -1: the Friedel mates of x = he .. 1
    Gzy = xp.asarray(_band_operator(n, grids.pad, he, top, False))
    Gx = xp.asarray(_band_operator(n, grids.pad, he, top, True))
    F = xp.matmul(Gzy, full @ Gx.T)  # (z, ky, kx)
    return (Gzy @ F.reshape(2 * he + 1, -1)).reshape(2 * top + 1, 2 * top + 1, top + 1)


@functools.lru_cache(maxsize=8)
def _band_operator(n: int, pad: int, he: int, top: int, x_half: bool) -> np.ndarray:
    """One axis of :func:`band_spectrum`: ``(K, 2 he + 1)`` complex64 from the padded grid's
    frequencies ``-he .. he`` to the box's (``0 .. top`` for ``x_half``, else
    :func:`hetero_dask.core.fsc.band_freqs`' order): the inverse DFT of size ``D = pad n`` at
    the box's positions ``r = i - n // 2`` (1/D as the inverse FFT scales), over the gridding
    correction's ``sinc^2(r / D)``, then the box's forward DFT over its indices ``i``."""
    D = pad * n
    i = np.arange(n)
    r = i - n // 2
    f = np.arange(-he, he + 1)
    k = np.arange(top + 1) if x_half else band_freqs(n, top, np)[1]
    forward = np.exp(-2j * np.pi * np.outer(k, i) / n) / np.sinc(r / D) ** 2
    inverse = np.exp(2j * np.pi * np.outer(r, f) / D) / D
    out = (forward @ inverse).astype(np.complex64)
    out.flags.writeable = False
    return out


def _to_real_space(V_half, n: int, pad: int):
    """Inverse FFT of a completed, centred half-grid spectrum; central ``n^3`` crop over the gridding factor.

    Only the band the half-grid covers goes into the band-limited spectrum of
    :func:`_spectrum_to_volume` (the rest of the padded spectrum is zero).
    """
    xp = xp_of(V_half)
    D = pad * n
    h = V_half.shape[-1] - 1
    he = min(h, (D - 1) // 2)
    spec = xp.zeros((D, 2 * he + 1, he + 1), dtype=xp.complex64)
    src = V_half[h - he : h + he + 1, h - he : h + he + 1, : he + 1]
    # centred z index i (0..2he) = frequency i - he -> uncentred (i - he) mod D
    spec[: he + 1] = src[he:]
    spec[D - he :] = src[:he]
    return _spectrum_to_volume(spec, n, pad)


def _spectrum_to_volume(spec, n: int, pad: int):
    """The central ``n^3`` of the inverse FFT of size ``D = pad n`` of a band-limited spectrum,
    over the gridding correction (``spec`` is overwritten).

    ``spec`` ``(D, 2 he + 1, he + 1)`` complex64 holds the frequencies up to ``he`` (every other
    one of the padded ``(D, D, D // 2 + 1)`` spectrum is zero): the first axis uncentred (index
    ``f mod D``), the second centred (index ``f + he``), the last ``0 .. he``.
    """
    xp = xp_of(spec)
    D = pad * n
    if spec.shape[-1] <= BAND_INVERSE_PER_LOG2 * math.log2(D):
        return _band_inverse(spec, n, pad)
    vol = _cropped_irfftn(spec, n, D, xp)
    corr = _gridding_np(n, pad) if xp is np else gridding_correction(n, pad, xp)
    # The last axis's crop, two contiguous runs of the uncentred axis, written straight
    # into the output with the division (no gathered copy, no float32 -> float32 copy).
    out = xp.empty((n, n, n), dtype=xp.float32)
    lo = n // 2
    xp.divide(vol[:, :, D - lo :], corr[:, :, :lo], out=out[:, :, :lo])
    xp.divide(vol[:, :, : n - lo], corr[:, :, lo:], out=out[:, :, lo:])
    return out


# A band of up to this many times log2(D) frequencies on the last axis goes to the map by three
# matrix products (:func:`_band_inverse`) rather than the pruned FFTs: their cost grows with the
# band, the FFTs' with the box (at box 128 and a 29-frequency band, 4 against 13 ms per map;
# even at a band of 57, 13 against 17 ms; benchmarks/results/design_measurements.md).
BAND_INVERSE_PER_LOG2 = 5


def _band_inverse(spec, n: int, pad: int):
    """:func:`_spectrum_to_volume` as three matrix products on the band: every step (the inverse
    DFT of size ``D`` at the crop's positions, the gridding correction) acts on each axis alone,
    so the first two axes are one ``(n, 2 he + 1)`` complex matrix each and the last, with the
    real output's Hermitian weights folded in, one real ``(2 (he + 1), n)`` matrix on the
    interleaved real and imaginary parts. Equal to the FFT path to float32 round-off."""
    xp = xp_of(spec)
    D, he = pad * n, spec.shape[-1] - 1
    centred = xp.concatenate([spec[D - he :], spec[: he + 1]])  # z = -he .. he
    Ezy = xp.asarray(_inverse_operator(n, pad, he, False))
    a = (Ezy @ centred.reshape(2 * he + 1, -1)).reshape(n, 2 * he + 1, he + 1)
    b = xp.matmul(Ezy, a)  # (z, y, kx) at the crop's z and y
    Ex = xp.asarray(_inverse_operator(n, pad, he, True))
    return (b.view(xp.float32).reshape(n * n, 2 * (he + 1)) @ Ex).reshape(n, n, n)


@functools.lru_cache(maxsize=8)
def _inverse_operator(n: int, pad: int, he: int, x_half: bool) -> np.ndarray:
    """One axis of :func:`_band_inverse`: the inverse DFT of size ``D = pad n`` (1/D as the inverse
    FFT scales) from frequencies ``-he .. he`` to the box's positions ``r = i - n // 2``, over the
    gridding correction's ``sinc^2(r / D)``: ``(n, 2 he + 1)`` complex64. ``x_half``: the real
    output's last axis from frequencies ``0 .. he`` (each but 0 twice: its Friedel mate's share),
    ``(2 (he + 1), n)`` float32 whose rows ``2 f`` and ``2 f + 1`` take the real and imaginary
    parts, ``Re(c e) = Re(c) Re(e) - Im(c) Im(e)``."""
    D = pad * n
    r = np.arange(n) - n // 2
    corr = np.sinc(r / D) ** 2
    if not x_half:
        f = np.arange(-he, he + 1)
        out = (np.exp(2j * np.pi * np.outer(r, f) / D) / D / corr[:, None]).astype(np.complex64)
    else:
        f = np.arange(he + 1)
        E = np.where(f == 0, 1.0, 2.0)[:, None] * np.exp(2j * np.pi * np.outer(f, r) / D) / D / corr[None, :]
        out = np.empty((2 * (he + 1), n), np.float32)
        out[0::2], out[1::2] = E.real, -E.imag
    out.flags.writeable = False
    return out


@functools.lru_cache(maxsize=4)
def _gridding_np(n: int, pad: int):
    """The numpy gridding correction, cached per box (read-only)."""
    corr = gridding_correction(n, pad, np)
    corr.flags.writeable = False
    return corr


def _cropped_irfftn(spec, n: int, D: int, xp):
    """``irfftn`` of size ``(D, D, D)`` of the band-limited ``spec`` (see :func:`_spectrum_to_volume`)
    at the central ``n`` (indices ``(i - n // 2) mod D``) of the first two axes (the last comes
    back whole, real), pruned: each 1D inverse pass runs only on the columns that are not all
    zeros and keeps only the ``n`` outputs of the crop before the next axis."""
    he, lo = spec.shape[-1] - 1, n // 2
    ifft, irfft = fft_functions(xp, "ifft", "irfft", overwrite_x=True)  # inputs: temporaries
    a = ifft(spec, axis=0)[(xp.arange(n) - lo) % D]  # (n, 2he+1, he+1)
    b = xp.zeros((n, D, he + 1), dtype=a.dtype)
    b[:, : he + 1] = a[:, he:]  # centred -> uncentred, as in _to_real_space
    b[:, D - he :] = a[:, :he]
    del a
    b = ifft(b, axis=1)  # (n, D, he+1)
    # The y crop, two runs of the uncentred axis, copied straight into the last pass's input
    # zero-padded to D // 2 + 1 (given he + 1 values, the FFT would copy them to pad them).
    c = xp.zeros((n, n, D // 2 + 1), dtype=b.dtype)
    c[:, :lo, : he + 1] = b[:, D - lo :]
    c[:, lo:, : he + 1] = b[:, : n - lo]
    del b
    return irfft(c, n=D, axis=2)  # (n, n, D)

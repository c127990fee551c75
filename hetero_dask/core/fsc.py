"""Fourier shell correlation, resolution, phase randomisation and CryoSPARC's FSC curve set.

Shells: shell ``s`` holds the Fourier voxels whose radius (cycles per box)
rounds to ``s``; curves have ``n // 2 + 1`` entries, shells ``0 .. n // 2``
(the last one is Nyquist; corner voxels beyond it are ignored). Shell 0 is
the DC term.

The corrected FSC is Chen et al. (2013) noise substitution as CryoSPARC
computes it: both half-maps get random phases beyond the shell ``s`` where the
unmasked FSC first drops below 0.143 (every Fourier voxel of radius >= ``s``,
as ``relion_postprocess`` randomises), the mask is applied, and
``FSC_true = (FSC_t - FSC_n) / (1 - FSC_n)`` from shell ``s`` on. RELION
keeps the masked FSC for two more shells (``s`` and ``s + 1``); elsewhere the
curves agree with ``relion_postprocess --randomize_at_fsc 0.143`` on the same
maps and mask (tests/test_masked_fsc.py).

The curves are meant for unregularised half-maps (CryoSPARC's half-maps, and
what Heterogeneous Reconstruction Only writes): a Wiener-filtered half-map has
almost no power beyond its resolution, so the little a mask leaks there from
the strong low shells is all that is left, and every masked curve stays near 1.
"""

from __future__ import annotations

import functools

import numpy as np

from .backend import to_host, xp_of
from .masks import loose_and_tight_masks, spherical_window


def _radius_fft(n: int, xp):
    """Frequency radius of an uncentred ``(n, n, n)`` FFT grid (cycles per box)."""
    k = xp.fft.fftfreq(n, d=1.0 / n)
    kz, ky, kx = xp.meshgrid(k, k, k, indexing="ij")
    return xp.sqrt(kx**2 + ky**2 + kz**2)


def _radius_rfft(n: int, xp):
    """Frequency radius ``(n, n, n // 2 + 1)`` float32 of an uncentred real-input FFT grid."""
    k = xp.fft.fftfreq(n, d=1.0 / n).astype(xp.float32) ** 2
    kx = xp.arange(n // 2 + 1, dtype=xp.float32) ** 2
    return xp.sqrt(k[:, None, None] + k[None, :, None] + kx[None, None, :])


def _rfft_shells(n: int, xp):
    """``(idx, mult, n_shells)``: flat shell index of each rfft voxel (``n_shells`` = beyond
    Nyquist) and its multiplicity in the full spectrum (2 for the voxels whose mate is not stored)."""
    if xp is np:
        return _rfft_shells_np(n)
    return _rfft_shells_xp(n, xp)


@functools.lru_cache(maxsize=4)
def _rfft_shells_np(n: int):
    idx, mult, n_shells = _rfft_shells_xp(n, np)
    idx.flags.writeable = False
    mult.flags.writeable = False
    return idx, mult, n_shells


def _rfft_shells_xp(n: int, xp):
    n_shells = n // 2 + 1
    idx = xp.minimum(xp.rint(_radius_rfft(n, xp)).astype(xp.int64), n_shells).ravel()
    kx = xp.arange(n // 2 + 1)
    own = (kx == 0) | ((n % 2 == 0) & (kx == n // 2))
    mult = xp.broadcast_to(xp.where(own, 1.0, 2.0), (n, n, n // 2 + 1)).astype(xp.float32)
    return idx, mult.ravel(), n_shells


def _shells(n: int, xp):
    """Shell index (rounded radius) of each voxel of an uncentred FFT grid; ``n//2 + 1`` = outside."""
    n_shells = n // 2 + 1
    return xp.minimum(xp.rint(_radius_fft(n, xp)).astype(xp.int64), n_shells).ravel(), n_shells


def _rfftn(v, xp):
    v = xp.asarray(v, dtype=xp.float32)
    if xp is np:
        import scipy.fft  # noqa: PLC0415

        return scipy.fft.rfftn(v)
    return xp.fft.rfftn(v)


def _irfftn(F, n: int, xp):
    if xp is np:
        import scipy.fft  # noqa: PLC0415

        return scipy.fft.irfftn(F, s=(n, n, n), axes=(-3, -2, -1))
    return xp.fft.irfftn(F, s=(n, n, n), axes=(-3, -2, -1))


def fsc(v1, v2, mask=None, r_max: float | None = None):
    """FSC curve ``(n // 2 + 1,)`` float64 of two volumes ``(n, n, n)`` (optionally both masked).

    Real-input FFTs in single precision; per-shell sums in float64. ``r_max`` (cycles per box):
    only the shells up to it (and one beyond) are measured, the rest of the curve is 0; the
    forward transforms then skip the frequencies outside (:func:`_band_rfftn`), which is most
    of their work for a map whose data stop well below Nyquist.
    """
    xp = xp_of(v1, v2)
    if v1.shape != v2.shape or v1.ndim != 3:
        raise ValueError(f"fsc needs two volumes of one shape, got {v1.shape} and {v2.shape}")
    if mask is not None:
        v1, v2 = v1 * mask, v2 * mask
    n = v1.shape[-1]
    top = band_top(n, r_max)
    if 2 * top + 1 >= n:
        return _curve(_rfftn(v1, xp).ravel(), _rfftn(v2, xp).ravel(), *_rfft_shells(n, xp)[:2], n, top)
    return band_fsc(_band_rfftn(v1, top, xp), _band_rfftn(v2, top, xp), n)


def band_top(n: int, r_max: float | None) -> int:
    """The last shell :func:`fsc` measures for maps of box ``n`` whose data stop at ``r_max``
    (cycles per box; None: Nyquist): one shell beyond ``r_max``."""
    last = n // 2
    return last if r_max is None else min(last, int(np.ceil(r_max)) + 1)


def band_fsc(F1, F2, n: int):
    """FSC curve ``(n // 2 + 1,)`` of two maps of box ``n`` given as their real-input FFTs at the
    frequencies up to ``top`` (``(2 top + 1, 2 top + 1, top + 1)``, axes ordered as
    :func:`band_freqs`, ``2 top + 1 < n``); the shells beyond ``top`` are 0."""
    top = F1.shape[-1] - 1
    if F1.shape != F2.shape or F1.shape != (2 * top + 1, 2 * top + 1, top + 1) or 2 * top + 1 >= n:
        raise ValueError(f"band_fsc needs two band spectra (2 top + 1, 2 top + 1, top + 1) with 2 top + 1 < "
                         f"{n}, got {F1.shape} and {F2.shape}")
    return _curve(F1.ravel(), F2.ravel(), *_band_shells(n, top, xp_of(F1, F2)), n, top)


def _curve(F1, F2, idx, mult, n: int, top: int):
    """The FSC from flat spectra, their voxels' shells ``idx`` and multiplicities ``mult``."""
    xp = xp_of(F1, F2)
    n_shells = n // 2 + 1
    m = n_shells + 1

    def shell_sum(x):
        return xp.bincount(idx, weights=mult * x, minlength=m)[:n_shells]

    num = shell_sum((F1 * xp.conj(F2)).real)
    den = xp.sqrt(shell_sum(F1.real**2 + F1.imag**2) * shell_sum(F2.real**2 + F2.imag**2))
    curve = xp.where(den > 0, num / xp.where(den > 0, den, 1.0), 0.0)
    curve[top + 1 :] = 0.0
    return curve


def band_freqs(n: int, top: int, xp):
    """The uncentred indices (and frequencies) ``0 .. top, -top .. -1`` of an axis of length ``n``."""
    k = xp.concatenate([xp.arange(top + 1), xp.arange(-top, 0)])
    return k % n, k


def _band_rfftn(v, top: int, xp):
    """The real-input FFT of ``v`` ``(n, n, n)`` at the frequencies up to ``top`` along every
    axis, ``(2 top + 1, 2 top + 1, top + 1)`` complex64, axes ordered as :func:`band_freqs`:
    each 1D pass runs only on the lines the next one keeps."""
    v = xp.asarray(v, dtype=xp.float32)
    keep = band_freqs(v.shape[-1], top, xp)[0]
    if xp is np:
        import scipy.fft  # noqa: PLC0415

        from .scoring import cpu_threads  # noqa: PLC0415

        rfft = functools.partial(scipy.fft.rfft, workers=cpu_threads())
        fft = functools.partial(scipy.fft.fft, workers=cpu_threads(), overwrite_x=True)
    else:
        rfft, fft = xp.fft.rfft, xp.fft.fft
    F = rfft(v, axis=2)[:, :, : top + 1]
    F = fft(F, axis=1)[:, keep]
    return fft(F, axis=0)[keep]


def _band_shells(n: int, top: int, xp):
    """``(idx, mult)`` of :func:`_band_rfftn`'s voxels, as :func:`_rfft_shells` gives them for
    the whole grid (shells beyond ``top`` are ``n // 2 + 1``, outside)."""
    k = band_freqs(n, top, xp)[1].astype(xp.float32)
    kx = xp.arange(top + 1, dtype=xp.float32)
    radius = xp.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + kx[None, None, :] ** 2)
    idx = xp.rint(radius).astype(xp.int64)
    idx = xp.where(idx > top, n // 2 + 1, idx).ravel()
    own = (kx == 0) | ((n % 2 == 0) & (kx == n // 2))
    mult = xp.broadcast_to(xp.where(own, 1.0, 2.0), radius.shape).astype(xp.float32).ravel()
    return idx, mult


def shell_counts(n: int, xp=np):
    """Number of Fourier voxels per FSC shell ``(n // 2 + 1,)``: FSC of noise has sd ~ 1/sqrt(count)."""
    idx, n_shells = _shells(n, xp)
    return xp.bincount(idx, minlength=n_shells + 1)[:n_shells]


def _first_below(curve, threshold: float) -> int | None:
    """Index of the first shell >= 1 whose value is below ``threshold`` (None if none)."""
    below = np.nonzero(np.asarray(curve)[1:] < threshold)[0]
    return int(below[0]) + 1 if below.size else None


def resolution_radius(curve, threshold: float = 0.143) -> float:
    """Radius (cycles per box) where ``curve`` first crosses ``threshold``, linearly interpolated.

    A curve that never drops below the threshold gives its last shell (Nyquist).
    """
    c = np.asarray(to_host(curve), dtype=np.float64)
    i = _first_below(c, threshold)
    if i is None:
        return float(len(c) - 1)
    drop = c[i - 1] - c[i]
    return float(i - 1) + ((c[i - 1] - threshold) / drop if drop > 0 else 0.0)


def resolution_A(curve, n: int, psize_A: float, threshold: float = 0.143) -> float:
    """Resolution in A where ``curve`` crosses ``threshold`` (0.143 gold standard)."""
    r = resolution_radius(curve, threshold)
    return n * psize_A / r if r > 0 else float("inf")


def full_map_fsc(fsc_half):
    """FSC expected of the full map from the half-map FSC: ``sqrt(2 FSC / (1 + FSC))`` (RELION)."""
    xp = xp_of(fsc_half)
    f = xp.clip(xp.asarray(fsc_half, dtype=xp.float64), 0.0, 1.0)
    return xp.sqrt(2.0 * f / (1.0 + f))


def phase_randomise(vol, from_shell: int, rng: np.random.Generator):
    """``vol`` with the Fourier phases at radius ``>= from_shell`` (cycles per box) replaced by random ones.

    The random phases are those of a real white-noise volume, so the result
    stays real; amplitudes are kept. Single precision.
    """
    xp = xp_of(vol)
    n = vol.shape[-1]
    F = _rfftn(vol, xp)
    N = _rfftn(xp.asarray(rng.standard_normal(vol.shape, dtype=np.float32)), xp)
    phase = N / xp.maximum(xp.abs(N), 1e-30)
    beyond = _radius_rfft(n, xp) >= from_shell
    F = xp.where(beyond, xp.abs(F) * phase, F)
    return _irfftn(F, n, xp).astype(vol.dtype)


def randomisation_shell(fsc_unmasked, threshold: float = 0.143) -> int | None:
    """The shell from which :func:`corrected_fsc` randomises phases: the first (>= 1) where the
    unmasked FSC drops below ``threshold`` (None if it never does)."""
    return _first_below(to_host(fsc_unmasked), threshold)


def randomised_fsc(v1, v2, mask, from_shell: int, rng=None):
    """FSC ``(n // 2 + 1,)`` of the two maps with random phases from ``from_shell`` on
    (independent draws), both then masked: the correlation the mask alone creates
    (RELION's ``rlnCorrectedFourierShellCorrelationPhaseRandomizedMaskedMaps``)."""
    rng = np.random.default_rng(0) if rng is None else rng
    return fsc(phase_randomise(v1, from_shell, rng), phase_randomise(v2, from_shell, rng), mask)


def corrected_fsc(
    v1, v2, mask, from_shell: int | None = None, rng=None, fsc_unmasked=None, fsc_masked=None
):
    """Mask-corrected FSC ``(n // 2 + 1,)`` by high-resolution noise substitution.

    ``from_shell`` defaults to :func:`randomisation_shell` of the unmasked FSC
    (CryoSPARC); below it the masked FSC is returned unchanged. ``rng``
    (default seed 0) draws the random phases. ``fsc_unmasked`` /
    ``fsc_masked``: those curves, if already computed.
    """
    xp = xp_of(v1, v2)
    fsc_t = fsc(v1, v2, mask) if fsc_masked is None else xp.asarray(fsc_masked)
    if from_shell is None:
        from_shell = randomisation_shell(fsc(v1, v2) if fsc_unmasked is None else fsc_unmasked)
    if from_shell is None or from_shell >= len(fsc_t):
        return fsc_t
    fsc_n = randomised_fsc(v1, v2, mask, from_shell, rng)
    shells = xp.arange(len(fsc_t))
    denom = xp.where(1.0 - fsc_n > 1e-6, 1.0 - fsc_n, 1e-6)
    return xp.where(shells >= from_shell, (fsc_t - fsc_n) / denom, fsc_t)


def fsc_set(v1, v2, psize_A: float, user_mask=None, rng=None, no_mask=None) -> dict:
    """CryoSPARC's FSC curves of two unregularised half-maps: each ``(n // 2 + 1,)``.

    Keys: ``no_mask``, ``spherical`` (soft sphere, inner 0.85 of the box
    half-width, outer the box edge), ``loose``, ``tight`` (masks from the
    half-map average low-pass filtered to the unmasked resolution, see
    :mod:`.masks`), ``corrected`` (tight mask, noise substitution), and with a
    user mask ``user`` (masked) and ``user_corrected``. ``no_mask``:
    ``fsc(v1, v2)`` when the caller has it already (the M-step does), not
    computed again.
    """
    xp = xp_of(v1, v2)
    n = v1.shape[-1]
    out = {"no_mask": fsc(v1, v2) if no_mask is None else xp.asarray(no_mask)}
    loose, tight = loose_and_tight_masks(
        0.5 * (v1 + v2), psize_A, resolution_A(out["no_mask"], n, psize_A)
    )
    out["spherical"] = fsc(v1, v2, spherical_window(n, 0.85, 1.0, xp))
    out["loose"] = fsc(v1, v2, loose)
    out["tight"] = fsc(v1, v2, tight)
    out["corrected"] = corrected_fsc(
        v1, v2, tight, rng=rng, fsc_unmasked=out["no_mask"], fsc_masked=out["tight"]
    )
    if user_mask is not None:
        out["user"] = fsc(v1, v2, user_mask)
        out["user_corrected"] = corrected_fsc(
            v1, v2, user_mask, rng=rng, fsc_unmasked=out["no_mask"], fsc_masked=out["user"]
        )
    return out

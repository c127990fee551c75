"""FSC, resolution, phase randomisation, corrected FSC and soft masks."""

from __future__ import annotations

import numpy as np
import pytest

from hetero_dask.core.fourier import fft3c, lowpass, radius_3d
from hetero_dask.core.fsc import (
    corrected_fsc,
    fsc,
    fsc_set,
    full_map_fsc,
    phase_randomise,
    resolution_A,
    shell_counts,
)
from hetero_dask.core.masks import (
    MIN_EDGE_PX,
    loose_and_tight_masks,
    mask_from_map,
    soft_circular_mask_2d,
    spherical_window,
)
from hetero_dask.phantoms import moving_domain_phantoms

N = 32


def blob_map(n=N, seed=0):
    """A compact random 'particle': low-passed noise inside a sphere of radius n/4."""
    rng = np.random.default_rng(seed)
    v = lowpass(rng.standard_normal((n, n, n)).astype(np.float32), 4.0, 1.0, 3)
    return v * spherical_window(n, 0.4, 0.5) + 2.0 * spherical_window(n, 0.3, 0.4)


def test_fsc_self_is_one_and_noise_is_zero():
    rng = np.random.default_rng(1)
    a, b = (rng.standard_normal((N, N, N)).astype(np.float32) for _ in range(2))
    assert np.allclose(fsc(a, a), 1.0)
    curve = fsc(a, b)
    counts = shell_counts(N)
    assert curve.shape == counts.shape == (N // 2 + 1,)
    assert np.all(np.abs(curve[1:]) < 3 / np.sqrt(counts[1:]))
    # Scale does not matter; sign does.
    assert np.allclose(fsc(a, 3 * a), 1.0) and np.allclose(fsc(a, -a)[1:], -1.0)


def test_resolution_interpolates_the_crossing():
    curve = np.array([1.0, 0.9, 0.5, 0.2, 0.1, 0.05, 0.3])
    # Between shell 3 (0.2) and 4 (0.1): 3 + (0.2 - 0.143) / 0.1 = 3.57; the later rise is ignored.
    r = 3 + (0.2 - 0.143) / 0.1
    assert resolution_A(curve, 12, 1.5) == pytest.approx(12 * 1.5 / r)
    assert resolution_A(curve, 12, 1.5, threshold=0.5) == pytest.approx(12 * 1.5 / 2)
    assert resolution_A(np.ones(7), 12, 1.5) == pytest.approx(3.0)  # Nyquist


def test_full_map_fsc():
    assert np.allclose(full_map_fsc(np.array([1.0, 0.143, 0.0])), [1.0, 0.5, 0.0], atol=1e-3)


def test_phase_randomise_keeps_amplitudes_and_low_shells():
    v = blob_map()
    rng = np.random.default_rng(2)
    pr = phase_randomise(v, 8, rng)
    assert pr.dtype == v.dtype and pr.shape == v.shape
    assert np.allclose(np.abs(fft3c(pr)), np.abs(fft3c(v)), rtol=1e-3, atol=1e-3)
    curve = fsc(v, pr)
    counts = shell_counts(N)
    assert np.all(curve[:8] > 0.999)
    assert np.all(np.abs(curve[9:]) < 4 / np.sqrt(counts[9:]))


def test_corrected_fsc_removes_mask_correlation():
    """Half-maps share signal only to shell ~8; a hard mask fakes correlation beyond it."""
    rng = np.random.default_rng(3)
    signal = lowpass(blob_map(seed=3), 4.0, 1.0, 3)
    v1, v2 = (signal + 0.3 * rng.standard_normal((N, N, N)).astype(np.float32) for _ in range(2))
    hard = (radius_3d(N, np) < N / 5).astype(np.float32)
    masked = fsc(v1, v2, hard)
    corrected = corrected_fsc(v1, v2, hard, rng=np.random.default_rng(4))
    high = slice(11, N // 2)
    assert masked[high].mean() > 0.2  # the mask-induced correlation
    # Left: noise of an FSC over the few voxels inside the mask (sd ~ 0.1 per shell here).
    assert abs(corrected[high].mean()) < 0.1
    assert np.allclose(corrected[:5], masked[:5])


def test_fsc_set_curves():
    v = blob_map(seed=5)
    rng = np.random.default_rng(6)
    v1, v2 = (v + 0.2 * rng.standard_normal(v.shape).astype(np.float32) for _ in range(2))
    user = spherical_window(N, 0.5, 0.6)
    curves = fsc_set(v1, v2, psize_A=2.0, user_mask=user)
    keys = {"no_mask", "spherical", "loose", "tight", "corrected", "user", "user_corrected"}
    assert set(curves) == keys
    assert all(c.shape == (N // 2 + 1,) for c in curves.values())
    # Masks remove solvent noise: masked curves sit above the unmasked one at mid resolution.
    mid = slice(4, 10)
    assert (
        curves["tight"][mid].mean()
        > curves["spherical"][mid].mean()
        > curves["no_mask"][mid].mean()
    )
    assert np.allclose(curves["user"], fsc(v1, v2, user))
    # The unmasked curve, when the caller has it, is used as it is: the same set.
    again = fsc_set(v1, v2, psize_A=2.0, user_mask=user, no_mask=fsc(v1, v2))
    for name, c in curves.items():
        np.testing.assert_allclose(again[name], c, rtol=1e-12, atol=1e-12)


def test_spherical_window_and_circular_mask():
    m = spherical_window(N, 0.5, 0.75)
    c = N // 2
    assert m.dtype == np.float32 and m[c, c, c] == 1.0 and m[0, 0, 0] == 0.0
    assert m[c, c, c + 8] == 1.0 and m[c, c, c + 12] == 0.0  # inner 8 px, outer 12 px
    assert m[c, c, c + 10] == pytest.approx(0.5)
    d = soft_circular_mask_2d(N, 6.0, 4.0)
    assert d.shape == (N, N) and d[c, c + 6] == 1.0 and d[c, c + 10] == 0.0
    assert d[c, c + 8] == pytest.approx(0.5)


def test_mask_from_map_dilation_and_edge():
    v = np.zeros((N, N, N), np.float32)
    c = N // 2
    v[c, c, c] = 1.0
    m = mask_from_map(v, 0.5, dilate_px=3, soft_px=4)
    assert m[c, c, c + 3] == 1.0 and m[c, c, c + 5] == pytest.approx(0.5) and m[c, c, c + 7] == 0.0
    profile = m[c, c, c:]
    assert np.all(np.diff(profile) <= 0)
    with pytest.raises(ValueError, match="threshold"):
        mask_from_map(v, 2.0)


def test_loose_contains_tight():
    v = blob_map(seed=7)
    loose, tight = loose_and_tight_masks(v, 2.0)
    assert np.all(loose >= tight - 1e-6)
    assert loose.sum() > tight.sum() > 0
    assert np.all(tight[v > 0.5 * v.max()] == 1.0)
    # At 2 A/px CryoSPARC's distances hold: tight 1 within 6 A (3 px), 0 beyond 12 A (6 px).
    c = N // 2
    point = np.zeros((N, N, N), np.float32)
    point[c, c, c] = 1.0
    loose, tight = loose_and_tight_masks(point, 2.0)
    assert tight[c, c, c + 3] == 1.0 and tight[c, c, c + 6] == 0.0 and 0 < tight[c, c, c + 4] < 1
    assert loose[c, c, c + 12] == 1.0 and loose[c, c, c + 15] < 1.0  # 25 A = 12.5 px


def test_mask_edges_at_least_min_edge_px_at_coarse_pixels():
    """At 4 A/px CryoSPARC's tight fall (6 A -> 12 A) would be 1.5 px: it is MIN_EDGE_PX wide."""
    c = N // 2
    point = np.zeros((N, N, N), np.float32)
    point[c, c, c] = 1.0
    _, tight = loose_and_tight_masks(point, 4.0)
    profile = tight[c, c, c:]
    falling = np.flatnonzero((profile > 0) & (profile < 1))
    assert profile[1] == 1.0 and profile[2] < 1.0  # 1 within 6 A = 1.5 px
    assert falling.size >= MIN_EDGE_PX - 1 and profile[int(1.5 + MIN_EDGE_PX) + 1] == 0.0


def _noisy_halves(noise: float, box: int = 48, psize_A: float = 4.0, seed: int = 0):
    """Two half-maps of a phantom with independent white noise of ``noise`` x its maximum."""
    rng = np.random.default_rng(seed)
    truth = moving_domain_phantoms(box, psize_A, 1)[0]
    sd = noise * float(truth.max())
    return truth, [truth + sd * rng.standard_normal(truth.shape).astype(np.float32) for _ in range(2)]


NOISE = 0.3  # x the phantom's maximum: a ~35 A pair at 4 A/px


def test_masks_of_a_noisy_map_follow_the_molecule():
    """The raw average of noisy half-maps has noise peaks above half its maximum; the masks
    come from the average low-pass filtered to the resolution, so they hug the molecule."""
    truth, (a, b) = _noisy_halves(NOISE)
    res_A = resolution_A(fsc(a, b), 48, 4.0)
    assert 30 < res_A < 40  # a noisy, low-resolution pair
    loose, tight = loose_and_tight_masks(0.5 * (a + b), 4.0, res_A)
    molecule = truth > 0.2 * truth.max()
    assert loose[molecule].min() > 0.99  # the loose mask holds all of it
    # ... and not the box: the molecule dilated by 25-40 A is ~10% of it (from the raw
    # average, whose noise peaks pass half its maximum all over the box: 35%).
    assert loose.mean() < 0.2
    assert np.all(loose >= tight - 1e-6) and (tight[truth > 0.5 * truth.max()] > 0.99).mean() > 0.9
    # Masks remove solvent noise: each masked FSC crosses 0.143 further out than the
    # unmasked one, and the masked curve follows its expectation for white noise,
    # sum |m T|^2 / (sum |m T|^2 + noise power x sum m^2) per shell.
    for m in (loose, tight):
        masked = fsc(a, b, m)
        assert resolution_A(masked, 48, 4.0) < res_A
        sig = _shell_power(m * truth)
        noise_power = (NOISE * float(truth.max())) ** 2 * float((m**2).sum())
        expected = sig / (sig + noise_power)
        assert np.abs(masked - expected)[1:].max() < 0.15


def _shell_power(v):
    """Mean |FFT|^2 per Fourier voxel of each shell (numpy's full FFT, shells by rounded radius)."""
    n = v.shape[0]
    k = np.fft.fftfreq(n, 1.0 / n)
    r = np.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + k[None, None, :] ** 2)
    idx = np.minimum(np.rint(r).astype(int), n // 2 + 1).ravel()
    power = np.bincount(idx, np.abs(np.fft.fftn(v)).ravel() ** 2, minlength=n // 2 + 2)
    return (power / np.maximum(np.bincount(idx, minlength=n // 2 + 2), 1))[: n // 2 + 1]


@pytest.mark.parametrize("n", [32, 33, 48])
@pytest.mark.parametrize("r_max", [3.2, 9.0, 14.6])
def test_band_limited_fsc_is_the_whole_curve_up_to_its_band(n, r_max):
    """The pruned transforms give the full FFT's coefficients: the curve agrees shell by shell
    to float32 round-off up to one shell beyond ``r_max``, and is 0 beyond."""
    rng = np.random.default_rng(n)
    a = rng.standard_normal((n, n, n)).astype(np.float32)
    b = (0.5 * a + rng.standard_normal((n, n, n))).astype(np.float32)
    whole, band = fsc(a, b), fsc(a, b, r_max=r_max)
    top = min(n // 2, int(np.ceil(r_max)) + 1)
    assert band.shape == whole.shape
    np.testing.assert_allclose(band[: top + 1], whole[: top + 1], atol=1e-6)
    assert np.all(band[top + 1 :] == 0)
    assert np.all(np.abs(whole[1 : top + 1] - 0.45) < 0.25)  # the correlated pair, not zeros

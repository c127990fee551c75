"""Fourier helpers: centring, round trips, crop/pad of band-limited maps, shifts, low-pass, shells."""

from __future__ import annotations

import numpy as np
import pytest

from hetero_dask.core.fourier import (
    fft2c,
    fft3c,
    fourier_resize,
    freq_grid_2d,
    ifft2c,
    ifft3c,
    lowpass,
    radius_2d,
    radius_3d,
    radius_to_resolution,
    resolution_to_radius,
    shell_average,
    shell_index,
    soft_edge,
    translate_ft,
)

RNG = np.random.default_rng(2024)


def _band_limited(n, r_max, ndim, batch=()):
    """Real random map whose spectrum is zero at radius >= r_max (cycles per box)."""
    shape = batch + (n,) * ndim
    F = RNG.normal(size=shape) + 1j * RNG.normal(size=shape)
    r = radius_2d(n, np) if ndim == 2 else radius_3d(n, np)
    x = np.fft.fftshift(
        np.fft.ifftn(np.fft.ifftshift(F * (r < r_max), axes=range(-ndim, 0)), axes=range(-ndim, 0)),
        axes=range(-ndim, 0),
    ).real
    return x


def test_centring_delta_and_constant():
    n = 32
    delta = np.zeros((n, n))
    delta[n // 2, n // 2] = 1.0
    np.testing.assert_allclose(fft2c(delta), np.ones((n, n)), atol=1e-12)
    F = fft2c(np.full((n, n), 2.0))
    assert abs(F[n // 2, n // 2] - 2.0 * n * n) < 1e-9
    F[n // 2, n // 2] = 0
    assert np.abs(F).max() < 1e-9


def test_frequency_grid_axes():
    kx, ky = freq_grid_2d(8, np)
    assert kx[0, 0] == -4 and kx[0, 7] == 3 and kx[7, 0] == -4  # kx runs along the last axis
    assert ky[0, 0] == -4 and ky[7, 0] == 3
    # a cosine along x of 3 cycles per box has its peak at kx = +-3, ky = 0
    n = 16
    x = np.arange(n) - n // 2
    img = np.tile(np.cos(2 * np.pi * 3 * x / n), (n, 1))
    F = np.abs(fft2c(img))
    peaks = np.argwhere(F > 1)
    assert sorted(map(tuple, peaks)) == [(n // 2, n // 2 - 3), (n // 2, n // 2 + 3)]


@pytest.mark.parametrize("n", [32, 33])
def test_fft_round_trips(n):
    x = RNG.normal(size=(3, n, n))
    np.testing.assert_allclose(ifft2c(fft2c(x)).real, x, atol=1e-12)
    v = RNG.normal(size=(n, n, n))
    np.testing.assert_allclose(ifft3c(fft3c(v)).real, v, atol=1e-12)


@pytest.mark.parametrize(
    "n, small, ndim", [(64, 32, 2), (64, 40, 2), (65, 33, 2), (64, 33, 2), (33, 20, 2), (32, 20, 3)]
)
def test_band_limited_map_survives_crop_then_pad(n, small, ndim):
    x = _band_limited(n, r_max=small / 2 - 1, ndim=ndim)
    down = fourier_resize(x, small, ndim)
    assert down.shape == (small,) * ndim
    up = fourier_resize(down, n, ndim)
    np.testing.assert_allclose(up, x, atol=1e-10 * np.abs(x).max() + 1e-12)


@pytest.mark.parametrize("n, big, ndim", [(32, 48, 2), (33, 64, 2), (24, 40, 3)])
def test_pad_then_crop_is_identity(n, big, ndim):
    # an even box's Nyquist row has no conjugate partner after padding: keep it empty
    x = _band_limited(n, r_max=n / 2, ndim=ndim)
    back = fourier_resize(fourier_resize(x, big, ndim), n, ndim)
    np.testing.assert_allclose(back, x, atol=1e-10)


def test_resize_keeps_values_and_continuous_function():
    const = np.full((2, 40, 40), 3.7, dtype=np.float32)
    for m in (24, 25, 64):
        out = fourier_resize(const, m, 2)
        assert out.shape == (2, m, m) and out.dtype == np.float32
        np.testing.assert_allclose(out, 3.7, rtol=1e-5)
    # the same continuous cosine (5 cycles per box) sampled on the new grid
    n, m = 48, 32
    x = np.arange(n) - n // 2
    img = np.cos(2 * np.pi * 5 * x / n + 0.3)[None, :] * np.ones((n, 1))
    xm = np.arange(m) - m // 2
    expect = np.cos(2 * np.pi * 5 * xm / m + 0.3)[None, :] * np.ones((m, 1))
    np.testing.assert_allclose(fourier_resize(img, m, 2), expect, atol=1e-10)


@pytest.mark.parametrize("shift", [(3, 0), (0, -5), (7, 2), (-4, 11)])
def test_translate_integer_shift_is_roll(shift):
    n = 32
    img = RNG.normal(size=(n, n))
    moved = ifft2c(translate_ft(fft2c(img), np.array(shift, dtype=float))).real
    np.testing.assert_allclose(moved, np.roll(img, (shift[1], shift[0]), axis=(0, 1)), atol=1e-10)


def test_translate_batched_and_fractional_round_trip():
    n = 24
    imgs = RNG.normal(size=(4, n, n))
    shifts = RNG.uniform(-3, 3, size=(4, 2))
    F = fft2c(imgs)
    back = translate_ft(translate_ft(F, shifts), -shifts)
    np.testing.assert_allclose(back, F, atol=1e-9)
    ints = np.array([[1.0, 2.0], [-3.0, 0.0], [0.0, 0.0], [5.0, -1.0]])
    moved = ifft2c(translate_ft(F, ints)).real
    for i in range(4):
        expect = np.roll(imgs[i], (int(ints[i, 1]), int(ints[i, 0])), axis=(0, 1))
        np.testing.assert_allclose(moved[i], expect, atol=1e-10)


@pytest.mark.parametrize("ndim", [2, 3])
def test_lowpass_removes_high_frequencies(ndim):
    n, psize, res = 32, 2.0, 8.0
    x = RNG.normal(size=(n,) * ndim).astype(np.float32)
    y = lowpass(x, res, psize, ndim=ndim, width_shells=2.0)
    assert y.dtype == np.float32 and y.shape == x.shape
    axes = tuple(range(ndim))
    Fx = np.fft.fftshift(np.fft.fftn(np.fft.ifftshift(x), axes=axes))
    Fy = np.fft.fftshift(np.fft.fftn(np.fft.ifftshift(y), axes=axes))
    r = radius_2d(n, np) if ndim == 2 else radius_3d(n, np)
    r_cut = resolution_to_radius(res, n, psize)  # 8 cycles per box
    assert np.abs(Fy[r >= r_cut + 1.0]).max() < 1e-3 * np.abs(Fx).max()
    inner = r <= r_cut - 1.0
    np.testing.assert_allclose(Fy[inner], Fx[inner], atol=1e-3 * np.abs(Fx).max())


def test_soft_edge_values():
    r = np.array([0.0, 5.0, 6.0, 7.0, 9.0])
    np.testing.assert_allclose(soft_edge(r, 5.0, 2.0), [1.0, 1.0, 0.5, 0.0, 0.0], atol=1e-7)
    np.testing.assert_allclose(soft_edge(r, 5.0, 0.0), [1, 1, 0, 0, 0])


def test_shells():
    n = 32
    r = radius_2d(n, np)
    idx = shell_index(r, n // 2)
    assert idx.max() == n // 2 and idx[n // 2, n // 2] == 0 and idx[n // 2, n // 2 + 5] == 5
    profile = shell_average(np.cos(r / 3.0), r, n // 2)
    # a radial function averages to itself up to the spread of radii in a shell
    np.testing.assert_allclose(profile, np.cos(np.arange(n // 2) / 3.0), atol=0.06)
    assert profile.shape == (n // 2,)


def test_resolution_radius_inverse():
    assert resolution_to_radius(8.0, 64, 2.0) == 16.0
    assert radius_to_resolution(16.0, 64, 2.0) == 8.0
    assert radius_to_resolution(0.0, 64, 2.0) == float("inf")

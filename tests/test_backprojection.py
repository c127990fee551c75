"""Backprojection and reconstruction: round trips, grid algebra, symmetry, regularisation, RELION."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from hetero_dask.core.backprojector import (
    backproject,
    crop_grids,
    half_plane_freqs,
    merge_grids,
    new_grids,
    symmetrise_grids,
    symmetry_mates,
)
from hetero_dask.core.ctf import CTFParams, ctf_values
from hetero_dask.core.fourier import fft2c, freq_grid_2d, lowpass
from hetero_dask.core.fsc import fsc, full_map_fsc
from hetero_dask.core.masks import spherical_window
from hetero_dask.core.projector import prepare_fourier_map, project
from hetero_dask.core.reconstruction import reconstruct
from hetero_dask.core.rotations import euler_to_matrix, matrix_to_euler

PSIZE_A = 2.0


def smooth_volume(n, resolution_px, seed=0):
    """Random band-limited volume inside a soft sphere."""
    rng = np.random.default_rng(seed)
    v = lowpass(rng.standard_normal((n, n, n)).astype(np.float32), resolution_px, 1.0, 3)
    return v * spherical_window(n, 0.55, 0.75)


def random_ctf(P, n, kx, ky, seed=0):
    rng = np.random.default_rng(seed)
    dfu = rng.uniform(8000, 20000, P)
    params = CTFParams(
        dfu, dfu - rng.uniform(0, 1000, P), rng.uniform(0, np.pi, P), 300.0, 2.7, 0.1
    )
    return ctf_values(params, kx / (n * PSIZE_A), ky / (n * PSIZE_A))


def simulate(vol, P, seed=0, noise_sd=0.0):
    """Half-plane spectra Y = CTF * slice (+ complex white noise) at random poses."""
    n = vol.shape[-1]
    R = Rotation.random(P, random_state=seed).as_matrix()
    kx, ky, _ = half_plane_freqs(n)
    C = random_ctf(P, n, kx, ky, seed)
    Y = C * project(prepare_fourier_map(vol), R, kx, ky)
    if noise_sd > 0:
        rng = np.random.default_rng(seed + 100)
        Y = Y + noise_sd * (rng.standard_normal(Y.shape) + 1j * rng.standard_normal(Y.shape))
    return R, kx, ky, C, Y.astype(np.complex64)


def grids_of(n, R, kx, ky, C, Y, **kw):
    g = new_grids(n, **kw)
    return backproject(g, R, C * Y, C**2, kx, ky)


def test_round_trip_with_ctf():
    n = 32
    vol = smooth_volume(n, 2.2)
    R, kx, ky, C, Y = simulate(vol, 3000)
    out = reconstruct(grids_of(n, R, kx, ky, C, Y))
    curve = fsc(out, vol)
    assert np.all(curve[1 : int(0.8 * n / 2) + 1] > 0.9)
    scale = float((out * vol).sum() / (vol * vol).sum())
    assert abs(scale - 1) < 0.02


def test_half_plane_equals_full_plane():
    """Friedel mates land on the same voxels: passing both halves changes nothing but scale."""
    n = 24
    vol = smooth_volume(n, 3.0, seed=1)
    R = Rotation.random(400, random_state=1).as_matrix()
    kx, ky = (k.ravel().astype(np.float32) for k in freq_grid_2d(n, np))
    Y = project(prepare_fourier_map(vol), R, kx, ky)
    ones = np.ones(Y.shape, np.float32)
    full = reconstruct(backproject(new_grids(n), R, Y, ones, kx, ky))
    hk, hky, idx = half_plane_freqs(n)
    half = reconstruct(backproject(new_grids(n), R, Y[:, idx], ones[:, idx], hk, hky))
    assert np.allclose(full, half, atol=2e-3 * np.abs(half).max())


def test_merge_crop_and_precision():
    n = 24
    vol = smooth_volume(n, 3.0, seed=2)
    R, kx, ky, C, Y = simulate(vol, 600, seed=2)
    whole = grids_of(n, R, kx, ky, C, Y)
    a = grids_of(n, R[:250], kx, ky, C[:250], Y[:250])
    b = grids_of(n, R[250:], kx, ky, C[250:], Y[250:])
    merged = merge_grids(a, b)
    assert np.allclose(merged.data, whole.data, rtol=1e-5, atol=1e-4)
    assert np.allclose(merged.weight, whole.weight, rtol=1e-5, atol=1e-4)
    # Cropping a partial equals accumulating at the smaller radius directly.
    r_max = 7.5
    direct = grids_of(n, R, kx, ky, C, Y, r_max=r_max)
    cropped = crop_grids(whole, r_max)
    assert cropped.data.shape == direct.data.shape
    h = direct.half_width
    c = np.arange(-h, h + 1)
    r = np.sqrt(c[:, None, None] ** 2 + c[None, :, None] ** 2 + np.arange(h + 1) ** 2)
    # Voxels farther than a trilinear reach (sqrt 3) inside the radius see the same samples.
    inner = r <= 2 * r_max - 3**0.5
    assert np.allclose(cropped.data[inner], direct.data[inner], atol=1e-4)
    assert (
        np.abs(cropped.data[~inner]).max() > 0 and np.abs(direct.data[r > 2 * r_max + 2]).max() == 0
    )
    with pytest.raises(ValueError, match="crop_grids"):
        merge_grids(whole, direct)
    # Float32 grids (float64 per-batch sums) agree with float64 grids.
    double = grids_of(n, R, kx, ky, C, Y, double=True)
    assert double.data.dtype == np.complex128
    assert np.allclose(reconstruct(whole), reconstruct(double), atol=1e-5 * np.abs(vol).max())


def c4_ops():
    return Rotation.from_euler("z", [[0], [90], [180], [270]], degrees=True).as_matrix()


def test_symmetrise_equals_expansion():
    """Symmetrising B and W once equals backprojecting every particle at all mates g @ R."""
    n = 25  # odd: np.rot90 turns about index n // 2, our origin
    vol = smooth_volume(n, 3.0, seed=3)
    vol = sum(np.rot90(vol, k, axes=(1, 2)) for k in range(4))  # C4 about z
    R, kx, ky, C, Y = simulate(vol, 300, seed=3)
    ops = c4_ops()
    sym = reconstruct(symmetrise_grids(grids_of(n, R, kx, ky, C, Y), ops))
    Rx = symmetry_mates(R, ops)
    expanded = reconstruct(grids_of(n, Rx, kx, ky, np.tile(C, (4, 1)), np.tile(Y, (4, 1))))
    assert np.all(fsc(sym, expanded)[1:] > 0.98)
    assert np.all(fsc(sym, vol)[1 : n // 3] > 0.98)
    # The symmetrised map is C4-symmetric to float round-off: a quarter turn maps grid points
    # onto grid points (no interpolation error), and at an odd box np.rot90 turns about our origin.
    assert np.linalg.norm(sym - np.rot90(sym, 1, axes=(1, 2))) < 1e-5 * np.linalg.norm(sym)


def test_regularised_beats_unregularised_on_noisy_data():
    n = 32
    vol = smooth_volume(n, 2.5, seed=4)
    R, kx, ky, C, Y = simulate(vol, 2000, seed=4, noise_sd=300.0)
    halves = [grids_of(n, R[h::2], kx, ky, C[h::2], Y[h::2]) for h in (0, 1)]
    half_fsc = fsc(reconstruct(halves[0]), reconstruct(halves[1]))
    full = merge_grids(*halves)
    plain = reconstruct(full)
    wiener = reconstruct(full, fsc=full_map_fsc(half_fsc))
    band = slice(1, int(0.8 * n / 2))
    assert fsc(wiener, vol)[band].mean() > fsc(plain, vol)[band].mean() + 0.01
    mse = [float(np.mean((m - vol) ** 2)) for m in (plain, wiener)]
    assert mse[1] < 0.5 * mse[0]


@pytest.mark.gpu
def test_cupy_matches_numpy():
    import cupy as cp

    n = 16
    vol = smooth_volume(n, 3.0, seed=5)
    R, kx, ky, C, Y = simulate(vol, 100, seed=5)
    host = grids_of(n, R, kx, ky, C, Y)
    dev = new_grids(n, xp=cp)
    backproject(dev, cp.asarray(R), cp.asarray(C * Y), cp.asarray(C**2), kx, ky)
    assert np.allclose(dev.data.get(), host.data, atol=1e-3)
    assert np.allclose(reconstruct(dev).get(), reconstruct(host), atol=1e-4)


@pytest.mark.relion
def test_against_relion_reconstruct(tmp_path):
    """Same noisy relion_project particles: our map ~ relion_reconstruct's, and as close to the truth."""
    from hetero_dask.testing.relion import relion_project, relion_reconstruct, write_relion_star

    n, P = 40, 1500
    vol = smooth_volume(n, 2.3, seed=6)
    rng = np.random.default_rng(6)
    A = Rotation.random(P, random_state=6).as_matrix().transpose(0, 2, 1)
    euler = np.stack(matrix_to_euler(A), axis=1)
    origins_A = rng.uniform(-4, 4, (P, 2))
    dfu = rng.uniform(8000, 20000, P)
    defocus = np.stack([dfu, dfu - rng.uniform(0, 1000, P), rng.uniform(0, 180, P)], axis=1)
    star = write_relion_star(tmp_path / "in.star", euler, origins_A, PSIZE_A, n, defocus)
    images, proj_star = relion_project(tmp_path, vol, PSIZE_A, star, white_noise=2 * vol.std() * n)
    theirs, _ = relion_reconstruct(tmp_path, proj_star, PSIZE_A)

    R = euler_to_matrix(euler[:, 0], euler[:, 1], euler[:, 2]).transpose(0, 2, 1)
    kx, ky, idx = half_plane_freqs(n)
    params = CTFParams(defocus[:, 0], defocus[:, 1], np.deg2rad(defocus[:, 2]), 300.0, 2.7, 0.1)
    C = ctf_values(params, kx / (n * PSIZE_A), ky / (n * PSIZE_A))
    s = origins_A / PSIZE_A
    Y = fft2c(images).reshape(P, -1)[:, idx] * np.exp(
        -2j * np.pi * (kx * s[:, :1] + ky * s[:, 1:]) / n
    )
    ours = reconstruct(grids_of(n, R, kx, ky, C, Y.astype(np.complex64)))

    # relion_reconstruct softly masks its map outside radius n/2: compare inside that sphere.
    mask = spherical_window(n, 0.9, 1.0)
    band = slice(1, int(0.7 * n / 2) + 1)
    assert np.all(fsc(ours, theirs, mask)[band] > 0.9)
    ours_truth = fsc(ours, vol, mask)[band]
    theirs_truth = fsc(theirs, vol, mask)[band]
    assert ours_truth.mean() >= theirs_truth.mean() - 0.01
    # Same scale: compare the well-measured low-resolution content.
    low_ours, low_theirs = (lowpass(m * mask, 4 * 2.3, 1.0, 3) for m in (ours, theirs))
    assert abs(float((low_ours * low_theirs).sum() / (low_theirs**2).sum()) - 1) < 0.02


def _random_slices(n: int, count: int, seed: int):
    """Random rotations, half-plane frequencies of box ``n``, complex values and weights in [0, 1)."""
    rng = np.random.default_rng(seed)
    R = Rotation.random(count, random_state=seed).as_matrix()
    kx, ky, _ = half_plane_freqs(n)
    shape = (count, kx.size)
    vals = (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(np.complex64)
    return R, kx, ky, vals, rng.random(shape).astype(np.float32)


def test_compiled_kernel_equals_array_path(monkeypatch):
    """The numba kernel and the numpy scatter deposit the same sums (and both refuse bad input)."""
    from hetero_dask.core import cpu_kernels

    if not cpu_kernels.enabled():
        pytest.skip("numba not installed")
    n = 32
    R, kx, ky, vals, wts = _random_slices(n, 300, seed=7)
    fast = backproject(new_grids(n, r_max=12.0), R, vals, wts, kx, ky)
    monkeypatch.setattr(cpu_kernels, "ENABLED", False)
    slow = backproject(new_grids(n, r_max=12.0), R, vals, wts, kx, ky)
    scale = np.abs(slow.data).max()
    assert scale > 0 and np.abs(fast.data - slow.data).max() < 1e-5 * scale
    assert np.abs(fast.weight - slow.weight).max() < 1e-5 * slow.weight.max()
    # Both skip frequencies beyond r_max identically, and the kernel's range check holds.
    monkeypatch.setattr(cpu_kernels, "ENABLED", True)
    g = new_grids(n, r_max=12.0)
    with pytest.raises(IndexError):
        cpu_kernels.backproject_trilinear(
            g.data, g.weight, R[:1], np.array([40.0]), np.array([0.0]), vals[:1, :1], wts[:1, :1], 2, g.half_width
        )
    # The fused image kernel checks the reach of all samples once per call instead.
    acc = np.zeros(g.data.shape + (3,), np.float32)
    one = np.ones((1, 1), np.float32)
    F = np.ones((1, n, n // 2 + 1), np.complex64)
    args = (F, one, one, [0], np.zeros((1, 2)), [1.0], n, 2)
    cpu_kernels.backproject_images(acc, R[:1], np.array([11.0]), np.array([0.0]), *args)  # inside
    for k, rot in [(40.0, R[:1]), (11.0, 1.5 * R[:1]), (np.nan, R[:1])]:
        with pytest.raises(ValueError, match="outside a half-grid"):
            cpu_kernels.backproject_images(acc, rot, np.array([k]), np.array([0.0]), *args)
    with pytest.raises(ValueError, match="real FFTs"):  # spectra of another box
        cpu_kernels.backproject_images(acc, R[:1], np.array([1.0]), np.array([0.0]), F[:, :-1], *args[1:])
    with pytest.raises(ValueError, match="outside a real FFT"):  # kx < 0: not a half-plane sample
        cpu_kernels.backproject_images(acc, R[:1], np.array([-1.0]), np.array([0.0]), *args)


@pytest.mark.parametrize("r_max", [12.0, 16.0])
def test_compiled_reconstruction_equals_array_path(monkeypatch, r_max):
    """The fused Wiener kernel (shell sums, x = 0 completion, division, FFT placement) gives the
    array path's maps, regularised and not, including an r_max at Nyquist (grid beyond D / 2)."""
    from hetero_dask.core import cpu_kernels

    if not cpu_kernels.enabled():
        pytest.skip("numba not installed")
    n = 32
    R, kx, ky, vals, wts = _random_slices(n, 400, seed=11)
    wts += 0.5
    grids = backproject(new_grids(n, r_max=r_max), R, vals, wts, kx, ky)
    fsc_prior = np.linspace(0.99, 0.0, n // 2 + 1)
    fast = [reconstruct(grids), reconstruct(grids, fsc_prior, 2.0)]
    monkeypatch.setattr(cpu_kernels, "ENABLED", False)
    slow = [reconstruct(grids), reconstruct(grids, fsc_prior, 2.0)]
    for a, b in zip(fast, slow, strict=True):
        assert np.abs(b).max() > 0
        assert np.abs(a - b).max() < 1e-5 * np.abs(b).max()


def test_fused_particle_kernel_equals_array_path(monkeypatch):
    """jobs.mstep.backproject_particles inside ``accumulating`` (fused kernel: shift phases, CTF,
    noise weights and posteriors formed per sample, interleaved accumulators added into the grids
    on leaving) deposits what the array path deposits: two calls, two pose slots per particle,
    zero weights skipped, both half-sets, a per-shell 1 / sigma2."""
    from hetero_dask.core import cpu_kernels
    from hetero_dask.jobs.mstep import accumulating, backproject_particles, empty_partial

    if not cpu_kernels.enabled():
        pytest.skip("numba not installed")
    n, B = 32, 40
    rng = np.random.default_rng(5)
    imgs = rng.standard_normal((B, n, n)).astype(np.float32)
    ctf = CTFParams(rng.uniform(8000, 20000, B), rng.uniform(8000, 20000, B), rng.uniform(0, 3, B))
    rot = Rotation.random(2 * B, random_state=5).as_matrix().reshape(B, 2, 3, 3)
    shifts = rng.uniform(-3, 3, (B, 2, 2))
    w = rng.random((B, 2)).astype(np.float32)
    w[::5, 1] = 0.0
    halves = rng.integers(0, 2, B)
    isig = 1.0 / np.linspace(1.0, 3.0, n // 2 + 1)

    def deposit(part):
        for sl in (slice(0, 25), slice(25, B)):
            backproject_particles(part, imgs[sl], ctf.subset(np.arange(B)[sl]), 2.0, rot[sl], shifts[sl],
                                  w[sl], 1, halves[sl], inv_sigma2=isig)

    fast = empty_partial(2, n, r_max=12.0)
    calls = []
    real_kernel = cpu_kernels.backproject_images
    monkeypatch.setattr(cpu_kernels, "backproject_images", lambda *a, **k: calls.append(1) or real_kernel(*a, **k))
    with accumulating(fast):
        deposit(fast)
        assert not np.any(fast.grids[(1, 0)].data)  # still in the accumulators
    assert len(calls) == 8, "the fused kernel was not used (2 calls x 2 pose slots x 2 halves)"
    slow = empty_partial(2, n, r_max=12.0)
    deposit(slow)  # outside accumulating: the array path
    assert len(calls) == 8
    assert fast.weight_sum[1] == pytest.approx(slow.weight_sum[1])
    for key, g in slow.grids.items():
        scale = max(np.abs(g.data).max(), 1e-30)
        assert np.abs(fast.grids[key].data - g.data).max() <= 1e-5 * scale, key
        assert np.abs(fast.grids[key].weight - g.weight).max() <= 1e-5 * max(g.weight.max(), 1e-30), key
    assert np.abs(slow.grids[(1, 0)].data).max() > 0 and np.abs(slow.grids[(1, 1)].data).max() > 0
    # The fresh grids became the accumulators, split in place (one buffer holds data and weight);
    # a second block then adds into grids that already hold sums.
    g = fast.grids[(1, 0)]
    bounds = np.lib.array_utils.byte_bounds
    assert bounds(g.data)[1] == bounds(g.weight)[0] and g.data.flags.c_contiguous
    with accumulating(fast):
        deposit(fast)
    deposit(slow)
    for key, g in slow.grids.items():
        scale = max(np.abs(g.data).max(), 1e-30)
        assert np.abs(fast.grids[key].data - g.data).max() <= 1e-5 * scale, key
        assert np.abs(fast.grids[key].weight - g.weight).max() <= 1e-5 * max(g.weight.max(), 1e-30), key


def test_backproject_classes_fused_equals_array_path(monkeypatch):
    """mstep.backproject_classes (one FFT and CTF per batch for all classes, then the kernel by
    row index) deposits what per-class backproject_particles calls on the array path deposit:
    soft weights with zeros, an odd box (the centring is a phase, not a sign), two classes."""
    from hetero_dask.core import cpu_kernels
    from hetero_dask.jobs.mstep import accumulating, backproject_classes, empty_partial

    if not cpu_kernels.enabled():
        pytest.skip("numba not installed")
    for n in (32, 33):
        B, K = 30, 2
        rng = np.random.default_rng(n)
        imgs = rng.standard_normal((B, n, n)).astype(np.float32)
        ctf = CTFParams(rng.uniform(8000, 20000, B), rng.uniform(8000, 20000, B), rng.uniform(0, 3, B))
        rot = Rotation.random(B * K, random_state=n).as_matrix().reshape(B, K, 3, 3)
        shifts = rng.uniform(-3, 3, (B, K, 2))
        w = rng.random((B, K)).astype(np.float32)
        w[::4, 0] = 0.0
        w[1::3, 1] = 0.0
        halves = rng.integers(0, 2, B)
        fast = empty_partial(K, n, r_max=12.0)
        with accumulating(fast):
            backproject_classes(fast, imgs, ctf, 2.0, rot, shifts, w, halves)
        monkeypatch.setattr(cpu_kernels, "ENABLED", False)
        slow = empty_partial(K, n, r_max=12.0)
        backproject_classes(slow, imgs, ctf, 2.0, rot, shifts, w, halves)
        monkeypatch.setattr(cpu_kernels, "ENABLED", True)
        with pytest.raises(ValueError, match="box"):
            backproject_classes(empty_partial(K, n + 2, r_max=12.0), imgs, ctf, 2.0, rot, shifts, w, halves)
        np.testing.assert_allclose(fast.weight_sum, slow.weight_sum, rtol=1e-6)
        for key, g in slow.grids.items():
            scale = np.abs(g.data).max()
            assert scale > 0, key
            assert np.abs(fast.grids[key].data - g.data).max() <= 1e-5 * scale, (n, key)
            assert np.abs(fast.grids[key].weight - g.weight).max() <= 1e-5 * g.weight.max(), (n, key)


def test_deinterleave_in_place():
    """cpu_kernels.deinterleave turns an interleaved (re, im, weight) buffer into contiguous
    complex data and weight views of the same memory."""
    from hetero_dask.core import cpu_kernels

    buf = np.random.default_rng(1).standard_normal((5, 7, 4, 3)).astype(np.float32)
    want_data = buf[..., 0] + 1j * buf[..., 1]
    want_weight = buf[..., 2].copy()
    data, weight = cpu_kernels.deinterleave(buf)
    assert data.shape == weight.shape == (5, 7, 4) and data.dtype == np.complex64
    assert np.shares_memory(data, buf) and np.shares_memory(weight, buf)
    assert data.flags.c_contiguous and weight.flags.c_contiguous
    np.testing.assert_array_equal(data, want_data.astype(np.complex64))
    np.testing.assert_array_equal(weight, want_weight)
    with pytest.raises(ValueError, match="accumulator"):
        cpu_kernels.deinterleave(np.zeros((4, 2), np.float32))


@pytest.mark.parametrize("n", [32, 33])
def test_half_plane_spectra_are_the_centred_fft(n):
    """half_plane_spectra (centring as a phase on the samples) equals the centred 2D FFT
    of the images at its (kx, ky), for even and odd boxes, and is C-contiguous for the kernel."""
    from hetero_dask.core.backprojector import half_plane_spectra

    imgs = np.random.default_rng(n).standard_normal((4, n, n)).astype(np.float32)
    kx, ky, Y = half_plane_spectra(imgs, n / 2)
    full = np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(imgs, axes=(-2, -1))), axes=(-2, -1))
    want = full[:, ky.astype(int) + n // 2, kx.astype(int) + n // 2]
    assert Y.flags.c_contiguous and Y.dtype == np.complex64
    assert np.abs(Y - want).max() <= 1e-5 * np.abs(want).max()


def _irfftn_reference(V_half, n: int, pad: int):
    """The map of a completed, centred half-grid spectrum the plain way: the whole padded
    ``(D, D, D // 2 + 1)`` spectrum (frequencies up to ``(D - 1) // 2``), ``numpy.fft.irfftn``
    in float64, central crop, over the gridding correction."""
    from hetero_dask.core.projector import gridding_correction

    D = pad * n
    h = V_half.shape[-1] - 1
    he = min(h, (D - 1) // 2)
    full = np.zeros((D, D, D // 2 + 1), np.complex128)
    f = np.arange(-he, he + 1) % D
    full[np.ix_(f, f, np.arange(he + 1))] = V_half[h - he : h + he + 1, h - he : h + he + 1, : he + 1]
    crop = (np.arange(n) - n // 2) % D
    vol = np.fft.irfftn(full, s=(D, D, D))[np.ix_(crop, crop, crop)]
    return vol / gridding_correction(n, pad, np)


# Even and odd boxes and padded sizes, bands at Nyquist (the half-grid then reaches beyond
# (D - 1) // 2) and well inside it.
@pytest.mark.parametrize("n, pad, r_max", [(16, 2, 8.0), (15, 2, 7.5), (15, 1, 7.5), (16, 1, 8.0),
                                           (9, 3, 4.5), (20, 2, 4.0), (17, 2, 6.3)])
def test_pruned_inverse_fft_equals_the_full_one(n, pad, r_max):
    """The inverse FFT on the band's columns only (both the array path and the compiled Wiener
    kernel's spectrum) gives the map of a plain irfftn of the whole padded spectrum."""
    from hetero_dask.core.reconstruction import _divide, _to_real_space

    rng = np.random.default_rng(n * 10 + pad)
    g = new_grids(n, pad, r_max)
    g.data[...] = rng.standard_normal(g.data.shape) + 1j * rng.standard_normal(g.data.shape)
    g.weight[...] = rng.random(g.weight.shape) + 0.5
    fsc_prior = np.linspace(0.99, 0.0, n // 2 + 1)
    for prior in (None, fsc_prior):
        V_half = _divide(g, prior, 1.0, 1e-3)
        want = _irfftn_reference(V_half, n, pad)
        scale = np.abs(want).max()
        assert scale > 0
        assert np.abs(_to_real_space(V_half.copy(), n, pad) - want).max() < 1e-5 * scale
        assert np.abs(reconstruct(g, prior) - want).max() < 1e-5 * scale


# Bands well inside the box (the refinement's case), even and odd boxes, pad 1 to 3.
@pytest.mark.parametrize("n, pad, r_max", [(32, 2, 6.3), (33, 2, 7.0), (24, 1, 5.5), (20, 3, 4.0), (64, 2, 13.2)])
def test_band_spectrum_is_the_maps_fft(n, pad, r_max):
    """The map's spectrum from the per-axis band operators equals the forward FFT of the map
    itself (regularised or not), and the half-map FSC from it equals the maps' FSC."""
    from hetero_dask.core.fsc import _band_rfftn, band_top
    from hetero_dask.core.reconstruction import band_spectrum, half_map_fsc

    rng = np.random.default_rng(n + pad)
    halves = []
    for _ in range(2):
        g = new_grids(n, pad, r_max)
        g.data[...] = rng.standard_normal(g.data.shape) + 1j * rng.standard_normal(g.data.shape)
        g.weight[...] = rng.random(g.weight.shape) + 0.5
        halves.append(g)
    top = band_top(n, r_max)
    assert 2 * top + 1 < n
    for prior in (None, np.linspace(0.99, 0.0, n // 2 + 1)):
        want = _band_rfftn(reconstruct(halves[0], prior, 0.5), top, np)
        got = band_spectrum(halves[0], top, prior, 0.5)
        assert got.shape == want.shape
        assert np.abs(got - want).max() < 1e-5 * np.abs(want).max()
    want = fsc(reconstruct(halves[0]), reconstruct(halves[1]), r_max=r_max)
    got = half_map_fsc(*halves)
    assert np.abs(want[1 : top + 1]).max() > 0.01  # random grids: a curve that is not all zeros
    np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("n, pad, he", [(32, 2, 9), (33, 2, 12), (24, 1, 7), (20, 3, 10), (64, 2, 40)])
def test_band_to_map_by_matrices_equals_the_padded_inverse_fft(n, pad, he, monkeypatch):
    """A band-limited padded spectrum to the map, by the per-axis matrices and by the pruned FFTs,
    against numpy's whole inverse FFT of the padded grid, cropped and gridding-corrected."""
    from hetero_dask.core import reconstruction as rec
    from hetero_dask.core.projector import gridding_correction

    rng = np.random.default_rng(n + he)
    D = pad * n
    spec = np.zeros((D, 2 * he + 1, he + 1), np.complex64)  # axis 0 uncentred, axis 1 centred
    band = rng.standard_normal((2 * he + 1, 2 * he + 1, he + 1)) + 1j * rng.standard_normal((2 * he + 1,) * 2 + (he + 1,))
    spec[: he + 1], spec[D - he :] = band[he:], band[:he]
    full = np.zeros((D, D, D // 2 + 1), np.complex128)
    full[:, : he + 1, : he + 1] = spec[:, he:]
    full[:, D - he :, : he + 1] = spec[:, :he]
    crop = (np.arange(n) - n // 2) % D
    want = np.fft.irfftn(full, s=(D, D, D))[np.ix_(crop, crop, crop)] / gridding_correction(n, pad, np)
    scale = np.abs(want).max()
    by_matrices = rec._band_inverse(spec.copy(), n, pad)
    monkeypatch.setattr(rec, "BAND_INVERSE_PER_LOG2", 0)  # the FFT path
    by_ffts = rec._spectrum_to_volume(spec.copy(), n, pad)
    for got in (by_matrices, by_ffts):
        assert got.shape == (n, n, n) and got.dtype == np.float32
        assert np.abs(got - want).max() < 2e-6 * scale


def test_band_to_map_has_the_same_bits_for_any_blas_thread_count():
    """The same job gives the same maps on workers with different core counts: the matrix
    products of the band inverse (box 128, the M-step's band at 8 A) must not depend on how
    many threads BLAS splits them over."""
    from threadpoolctl import threadpool_limits

    from hetero_dask.core import reconstruction as rec

    n, pad, he = 128, 2, 28
    rng = np.random.default_rng(7)
    shape = (pad * n, 2 * he + 1, he + 1)
    spec = (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(np.complex64)
    maps = []
    for threads in (1, 2, 3, 4):
        with threadpool_limits(limits=threads, user_api="blas"):
            maps.append(rec._band_inverse(spec.copy(), n, pad))
    assert np.abs(maps[0]).max() > 0
    for other in maps[1:]:
        np.testing.assert_array_equal(other, maps[0])

"""E-step: brute-force oracle, chunking invariance, pose/shift/class recovery, coarse to fine."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from hetero_dask.core import pose_grids as grids
from hetero_dask.core.ctf import CTFParams, ctf_image
from hetero_dask.core.fourier import freq_grid_2d, ifft2c
from hetero_dask.core.noise import sigma2_from_residuals
from hetero_dask.core.projector import prepare_fourier_map, project, project_images
from hetero_dask.core.rotations import angle_between
from hetero_dask.core.scoring import (
    alignment_band,
    class_projections,
    prepare_particles,
    project_band,
    score_dense,
    weighted_terms,
)
from hetero_dask.core.search import SearchParams, estep

PSIZE_A = 4.0


def _blobs(n, seed, n_blobs=12):
    """A smooth random volume of Gaussian blobs (n, n, n) float32."""
    rng = np.random.default_rng(seed)
    z, y, x = np.mgrid[:n, :n, :n] - n // 2
    v = np.zeros((n, n, n))
    for _ in range(n_blobs):
        c = rng.uniform(-n / 5, n / 5, 3)
        s = rng.uniform(1.5, 3.0) * n / 32
        v += rng.uniform(0.5, 1.5) * np.exp(
            -((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2) / (2 * s**2)
        )
    return v.astype(np.float32)


def _simulate(vol, rotations, shifts_px, ctf, snr, seed):
    """Images (B, n, n) = ifft(CTF * V^(R k) * exp(+2 pi i k.s/n)) + white noise at ``snr``."""
    n = vol.shape[-1]
    fmap = prepare_fourier_map(vol)
    spec = project_images(fmap, rotations) * ctf_image(ctf, n, PSIZE_A)
    kx, ky = freq_grid_2d(n, np)
    ph = 2 * np.pi * (kx * shifts_px[:, 0, None, None] + ky * shifts_px[:, 1, None, None]) / n
    img = ifft2c(spec * np.exp(1j * ph)).real.astype(np.float32)
    if snr is None:
        return img
    rng = np.random.default_rng(seed)
    sd = np.sqrt(img.var(axis=(1, 2)).mean() / snr)
    return img + rng.normal(0, sd, img.shape).astype(np.float32)


def _ctf(B, seed):
    rng = np.random.default_rng(seed)
    df = rng.uniform(10000, 20000, B)
    return CTFParams(df1_A=df, df2_A=df - 300, df_angle_rad=rng.uniform(0, np.pi, B), bfactor=0.0)


def test_project_fast_path_equals_uncropped_map():
    """A map cropped to r_max (constant-offset gathers) and the uncropped map (bounds-checked
    gathers) interpolate the same padded transform: equal slices inside r_max; the band
    guard refuses frequencies beyond it."""
    vol = _blobs(24, 0)
    cropped = prepare_fourier_map(vol, r_max=8)
    full = prepare_fourier_map(vol)
    band = alignment_band(24, 8)
    R = Rotation.random(50, random_state=0).as_matrix().astype(np.float32)
    a = project_band(cropped, R, band.kx, band.ky)
    np.testing.assert_allclose(a, project(full, R, band.kx, band.ky), rtol=1e-5, atol=1e-3)
    assert np.abs(a).min() > 0
    wide = alignment_band(24, 10)
    assert np.all(project(cropped, R, wide.kx, wide.ky)[:, wide.radius > 8] == 0)
    with pytest.raises(ValueError, match="r_max"):
        project_band(cropped, R, wide.kx, wide.ky)


def test_compiled_projection_equals_array_path(monkeypatch):
    """On a CPU the interior projection is a compiled kernel: the array path's float32 steps, so
    the same slices for one map and for stacked maps, with zeros beyond r_max."""
    from hetero_dask.core import cpu_kernels
    from hetero_dask.core.projector import stacked

    if not cpu_kernels.enabled():
        pytest.skip("numba not installed")
    maps = [prepare_fourier_map(_blobs(24, s), r_max=8) for s in (0, 1)]
    wide = alignment_band(24, 10)  # beyond r_max: read as zero
    R = Rotation.random(40, random_state=2).as_matrix().astype(np.float32)
    calls = []
    kernel = cpu_kernels.project_interior
    monkeypatch.setattr(cpu_kernels, "project_interior", lambda *a: calls.append(1) or kernel(*a))
    fast = [project(m, R, wide.kx, wide.ky) for m in (maps[0], stacked(maps))]
    assert len(calls) == 2
    monkeypatch.setattr(cpu_kernels, "ENABLED", False)
    slow = [project(m, R, wide.kx, wide.ky) for m in (maps[0], stacked(maps))]
    assert len(calls) == 2 and fast[1].shape == (2, 40, wide.kx.size)
    for a, b in zip(fast, slow, strict=True):
        assert np.abs(b).max() > 0
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6 * np.abs(b).max())
    assert np.all(fast[0][:, wide.radius > 8] == 0)


def test_project_band_blocks_equal_one_pass(monkeypatch):
    """On a CPU project_band projects the rotations in blocks: the same slices as one pass,
    also for a last, shorter block."""
    from hetero_dask.core import scoring

    fmap = prepare_fourier_map(_blobs(24, 0), r_max=8)
    band = alignment_band(24, 8)
    R = Rotation.random(50, random_state=1).as_matrix().astype(np.float32)
    monkeypatch.setattr(scoring, "PROJECT_BLOCK_POINTS", 7 * band.kx.shape[0])  # 7 rotations
    np.testing.assert_array_equal(
        project_band(fmap, R, band.kx, band.ky), project(fmap, R, band.kx, band.ky)
    )


def test_projection_cache_rows_are_the_projections_of_their_ids():
    """The local stages' projection cache, looked up with overlapping id sets that make its
    tables grow (and with -1 entries), returns for each id the row holding that rotation's
    projection: the same values as projecting it directly."""
    from hetero_dask.core.search import _ProjectionCache

    fmaps = [prepare_fourier_map(_blobs(24, s), r_max=8) for s in (0, 1)]
    band = alignment_band(24, 8)
    m = band.size_at(6)
    cache = _ProjectionCache(fmaps, 3, band, m, np)
    rng = np.random.default_rng(0)
    n_rot = grids.n_rotations(3)
    for size in (3, 40, 7, 300, 300):
        for k in (0, 1):
            ids = rng.integers(0, n_rot, size=(size // 3 + 1, 3))
            ids[0, 0] = -1
            p_ri, pos = cache.lookup(k, ids)
            rows = pos[ids >= 0]
            want = class_projections(fmaps[k], grids.matrices_for(3, ids[ids >= 0]), band, m)
            np.testing.assert_array_equal(p_ri[rows], want.p_ri)
            assert len(np.unique(cache.ids[k])) == cache.ids[k].size == p_ri.shape[0]


def _brute_force(prep, projs_c, shifts, sigma2, prior):
    """Explicit loops in float64 over classes, rotations and shifts; returns posteriors (B, K, R, T)."""
    band = prep.band
    B, M = prep.y.shape
    K, R = len(projs_c), projs_c[0].shape[0]
    T = len(shifts)
    ll = np.zeros((B, K, R, T))
    kx, ky = band.kx.astype(np.float64), band.ky.astype(np.float64)
    inv = 1.0 / sigma2[band.shell].astype(np.float64)
    for b in range(B):
        y = prep.y[b].astype(np.complex128)
        c = prep.ctf[b].astype(np.float64)
        for k in range(K):
            for r in range(R):
                for t in range(T):
                    model = (
                        c
                        * projs_c[k][r]
                        * np.exp(2j * np.pi * (kx * shifts[t, 0] + ky * shifts[t, 1]) / band.n)
                    )
                    ll[b, k, r, t] = -np.sum(np.abs(y - model) ** 2 * inv) + np.log(prior[k])
    ll -= ll.max(axis=(1, 2, 3), keepdims=True)
    p = np.exp(ll)
    return p / p.sum(axis=(1, 2, 3), keepdims=True)


def test_posteriors_equal_brute_force_and_chunking_invariant():
    n, r = 16, 5
    vols = [_blobs(n, 1), _blobs(n, 2)]
    fmaps = [prepare_fourier_map(v, r_max=r + 1) for v in vols]
    R = grids.so3_grid(1).matrices[::4]  # 144 rotations
    shifts = grids.shift_grid(1, 1)  # 5 shifts -> K R T = 1440 poses
    true = R[[3, 50, 100]]
    imgs = _simulate(
        vols[0], true, np.array([[0, 1], [1, 0], [0, 0]], np.float32), _ctf(3, 0), 1.0, 0
    )
    band = alignment_band(n, r)
    prep = prepare_particles(imgs, _ctf(3, 0), PSIZE_A, band)
    sigma2 = np.full(r + 1, 50.0, dtype=np.float32)  # broad posteriors: a strict test of the sums
    prior = np.array([0.3, 0.7])
    M = band.kx.shape[0]
    projs = [class_projections(f, R, band, M) for f in fmaps]
    xc, cc, yy = weighted_terms(prep, sigma2, M)
    p_ref = _brute_force(
        prep, [project(f, R, band.kx, band.ky) for f in fmaps], shifts, sigma2, prior
    )
    for tile in (2**30, 4 * 5 * 64):
        top = score_dense(xc, cc, band, projs, shifts, keep=R.shape[0], max_tile_bytes=tile)
        a = top.class_lse + np.log(prior)
        tot = np.logaddexp.reduce(a, axis=1)
        np.testing.assert_allclose(np.exp(a - tot[:, None]), p_ref.sum(axis=(2, 3)), atol=1e-4)
        # Rotation posteriors (shift-marginalised) of the kept rotations.
        w = np.exp(top.logw + np.log(prior)[None, :, None] - tot[:, None, None])
        ref = np.take_along_axis(p_ref.sum(axis=3), top.rot, axis=2)
        np.testing.assert_allclose(w, ref, atol=1e-4)
        assert np.array_equal(
            np.sort(top.rot, axis=2), np.broadcast_to(np.arange(R.shape[0]), top.rot.shape)
        )


def _recovery_case(snr, B=60, n=48, seed=0, K=1):
    vols = [_blobs(n, 10 + k) for k in range(K)]
    R_true = Rotation.random(B, random_state=seed).as_matrix().astype(np.float32)
    rng = np.random.default_rng(seed)
    s_true = rng.uniform(-3, 3, (B, 2)).astype(np.float32)
    ctf = _ctf(B, seed)
    cls = rng.integers(0, K, B)
    imgs = np.concatenate(
        [
            _simulate(
                vols[c], R_true[i : i + 1], s_true[i : i + 1], ctf.subset(np.array([i])), None, 0
            )
            for i, c in enumerate(cls)
        ]
    )
    if snr is not None:
        sd = np.sqrt(imgs.var(axis=(1, 2)).mean() / snr)
        imgs = imgs + np.random.default_rng(seed + 1).normal(0, sd, imgs.shape).astype(np.float32)
        noise = np.random.default_rng(seed + 2).normal(0, sd, imgs.shape).astype(np.float32)
    else:  # noiseless: a nominal noise level for the likelihood's scale
        noise = (
            np.random.default_rng(seed + 2)
            .normal(0, 0.1 * imgs.std(), imgs.shape)
            .astype(np.float32)
        )
    return vols, R_true, s_true, ctf, cls, imgs, noise


def _run(vols, imgs, ctf, r, params, noise):
    """E-step with sigma2 measured on noise-only images through the same preparation."""
    n = vols[0].shape[-1]
    band = alignment_band(n, r)
    prep = prepare_particles(imgs, ctf, PSIZE_A, band, normalize=False)
    noise_prep = prepare_particles(noise, ctf, PSIZE_A, band, normalize=False)
    sigma2 = sigma2_from_residuals(noise_prep.y, band.shell, int(r) + 2)
    fmaps = [prepare_fourier_map(v, r_max=r + 1) for v in vols]
    return estep(prep, fmaps, sigma2, params)


@pytest.mark.parametrize("snr", [None, 0.1])
def test_recovers_poses_and_shifts(snr):
    vols, R_true, s_true, ctf, _, imgs, noise = _recovery_case(snr)
    params = SearchParams(
        radius_final=15,
        radius_coarse=10,
        order_coarse=1,
        order_final=2,
        shift_range_px=4,
        shift_step_px=2,
    )
    res = _run(vols, imgs, ctf, 15, params, noise)
    ang = np.rad2deg(
        angle_between(res.rotation[:, 0].astype(np.float64), R_true.astype(np.float64))
    )
    assert np.median(ang) < grids.angular_step_deg(2)
    err = np.abs(res.shift_px[:, 0] - s_true)
    assert np.median(err) < 0.5
    assert res.n_poses_evaluated.min() >= 576 * len(grids.shift_grid(4, 2))


def test_sigma2_from_residuals_white_noise():
    n, r = 32, 12
    band = alignment_band(n, r)
    sd = 2.0
    noise = np.random.default_rng(0).normal(0, sd, (400, n, n)).astype(np.float32)
    prep = prepare_particles(noise, None, PSIZE_A, band, normalize=False, mask_radius_px=n)
    s2 = sigma2_from_residuals(prep.y, band.shell, r + 3)
    # Unnormalised FFT of white noise: E|Y(k)|^2 = n^2 sd^2 in every shell (empty shells filled).
    np.testing.assert_allclose(s2, n * n * sd**2, rtol=0.1)


def test_true_class_wins_k2():
    vols, R_true, s_true, ctf, cls, imgs, noise = _recovery_case(0.1, B=60, K=2, seed=3)
    params = SearchParams(
        radius_final=12,
        radius_coarse=8,
        order_coarse=1,
        order_final=2,
        shift_range_px=4,
        shift_step_px=2,
    )
    res = _run(vols, imgs, ctf, 12, params, noise)
    assert np.mean(res.best_class == cls) >= 0.95
    np.testing.assert_allclose(res.class_posterior.sum(axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(res.pose_weight.sum(axis=2), 1, atol=1e-5)
    assert np.all(res.class_ess >= 1) and np.all(res.pose_ess >= 1)


def test_returned_poses_stop_at_the_posterior_mass_asked_for():
    """``out_mass`` m keeps, per (particle, class), the most probable poses until they hold m
    of the class's pose posterior (each kept pose's predecessors hold less than m), renormalised:
    the prefix of the full list (every scored pose returned) the rule picks, nothing else."""
    import dataclasses

    vols, _, _, ctf, _, imgs, noise = _recovery_case(0.03, B=40, K=2, seed=4)
    base = SearchParams(radius_final=10, order_coarse=1, order_final=2, shift_range_px=2, shift_step_px=2,
                        n_out_poses=10**6, threads=1)  # one block: one pose count
    full = _run(vols, imgs, ctf, 10, base, noise)
    np.testing.assert_allclose(full.pose_weight.sum(axis=2), 1, atol=1e-5)
    for m in (0.5, 0.9):
        cut = _run(vols, imgs, ctf, 10, dataclasses.replace(base, out_mass=m), noise)
        w = full.pose_weight.astype(np.float64)
        keep = (np.cumsum(w, axis=2) - w < m) & (w > 0)
        assert 1 < keep.sum(axis=2).mean() < (w > 0).sum(axis=2).mean()  # a broad posterior, cut
        np.testing.assert_array_equal(cut.pose_ids, np.where(keep, full.pose_ids, -1))
        expected = np.where(keep, w, 0) / np.where(keep, w, 0).sum(axis=2, keepdims=True)
        np.testing.assert_allclose(cut.pose_weight, expected, atol=1e-5)


def test_coarse_to_fine_matches_exhaustive():
    vols, R_true, s_true, ctf, _, imgs, noise = _recovery_case(1.0, B=100, n=32, seed=5)
    c2f = SearchParams(
        radius_final=12, order_coarse=2, order_final=3, shift_range_px=4, shift_step_px=2
    )
    exhaustive = SearchParams(
        radius_final=12,
        order_coarse=3,
        order_final=3,
        shift_range_px=4,
        shift_step_px=1,
        shift_shape="square",
    )
    a = _run(vols, imgs, ctf, 12, c2f, noise)
    b = _run(vols, imgs, ctf, 12, exhaustive, noise)
    # Same fine-grid rotation and the same shift as the exhaustive search (no tie tolerance).
    assert np.mean(a.rot_id[:, 0] == b.rot_id[:, 0]) >= 0.99
    assert np.mean(np.all(a.shift_px[:, 0] == b.shift_px[:, 0], axis=1)) >= 0.99
    # Cost: the dense order-2 stage (4608 x 13) plus ~1% for children and the climb,
    # against 36864 x 81 for the exhaustive search (~49x fewer).
    dense = grids.n_rotations(2) * len(grids.shift_grid(4, 2))
    assert a.n_poses_evaluated.mean() < 1.1 * dense < 0.03 * b.n_poses_evaluated.mean()


def test_class_posteriors_match_exhaustive_search():
    """Two classes that differ by one blob: every class keeps its best coarse poses into the
    fine stage, so the coarse-to-fine class posteriors are those of the exhaustive search.
    A class refined from its single best coarse pose alone loses the rest of its mass: 7 of
    these 100 particles then differ by more than 0.1 from the exhaustive posterior."""
    n, r, B = 32, 12, 100
    z, y, x = np.mgrid[:n, :n, :n] - n // 2
    bump = np.exp(-((x - n / 6) ** 2 + y**2 + z**2) / (2 * (n / 16) ** 2)).astype(np.float32)
    vols = [_blobs(n, 10), _blobs(n, 10) + bump]
    rng = np.random.default_rng(3)
    R = Rotation.random(B, random_state=3).as_matrix().astype(np.float32)
    s = rng.uniform(-2, 2, (B, 2)).astype(np.float32)
    ctf = _ctf(B, 3)
    cls = rng.integers(0, 2, B)
    imgs = np.concatenate(
        [_simulate(vols[c], R[i : i + 1], s[i : i + 1], ctf.subset(np.array([i])), None, 0)
         for i, c in enumerate(cls)]
    )  # fmt: skip
    sd = np.sqrt(imgs.var(axis=(1, 2)).mean())  # SNR 1
    imgs = imgs + rng.normal(0, sd, imgs.shape).astype(np.float32)
    noise = rng.normal(0, sd, imgs.shape).astype(np.float32)
    c2f = SearchParams(radius_final=r, radius_coarse=0.7 * r, order_coarse=2, order_final=3,
                       shift_range_px=3, shift_step_px=2)  # fmt: skip
    exhaustive = SearchParams(radius_final=r, order_coarse=3, order_final=3, shift_range_px=3,
                              shift_step_px=1, shift_shape="square")  # fmt: skip
    a = _run(vols, imgs, ctf, r, c2f, noise)
    b = _run(vols, imgs, ctf, r, exhaustive, noise)
    off = np.abs(a.class_posterior[:, 1] - b.class_posterior[:, 1]) > 0.1
    assert off.sum() <= 2
    assert np.mean(a.best_class == cls) >= np.mean(b.best_class == cls) - 0.02
    dense = 2 * grids.n_rotations(2) * len(grids.shift_grid(3, 2))
    assert a.n_poses_evaluated.mean() < 1.1 * dense


def test_threaded_particle_blocks_equal_one_block():
    """CPU threads split the particles into blocks (single-threaded BLAS each): every
    output equals the single-block E-step's, and the blocks really ran concurrently."""
    import threading

    from hetero_dask.core import search

    vols, _, _, ctf, _, imgs, noise = _recovery_case(0.5, B=40, K=2, seed=4)
    base = dict(radius_final=10, radius_coarse=8, order_coarse=1, order_final=2,
                shift_range_px=2, shift_step_px=1)  # fmt: skip
    one = _run(vols, imgs, ctf, 10, SearchParams(**base, threads=1), noise)
    seen = set()
    block = search._estep_block

    def spy(*args):
        seen.add(threading.get_ident())
        return block(*args)

    search._estep_block = spy
    try:
        three = _run(vols, imgs, ctf, 10, SearchParams(**base, threads=3), noise)
    finally:
        search._estep_block = block
    assert len(seen) == 3
    for name in ("class_posterior", "rot_id", "shift_px", "pose_ids", "pose_weight", "alpha"):
        np.testing.assert_allclose(getattr(three, name), getattr(one, name), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(three.n_poses_evaluated, one.n_poses_evaluated)


def test_local_stage_chunks_equal_one_chunk(monkeypatch):
    """On a CPU the local stage scores particles in chunks sized by bytes: one particle per
    call gives the E-step of one call for all of them."""
    from hetero_dask.core import search

    vols, _, _, ctf, _, imgs, noise = _recovery_case(0.5, B=12, K=2, seed=6)
    params = SearchParams(radius_final=10, radius_coarse=8, order_coarse=1, order_final=2,
                          shift_range_px=2, shift_step_px=1, threads=1)  # fmt: skip
    calls = []
    score = search.score_local

    def spy(xc, *args):
        calls.append(xc.shape[0])
        return score(xc, *args)

    monkeypatch.setattr(search, "score_local", spy)
    monkeypatch.setattr(search, "LOCAL_BLOCK_BYTES", 2**40)
    whole = _run(vols, imgs, ctf, 10, params, noise)
    assert max(calls) > 1
    calls.clear()
    monkeypatch.setattr(search, "LOCAL_BLOCK_BYTES", 1)
    single = _run(vols, imgs, ctf, 10, params, noise)
    assert max(calls) == 1
    for name in ("class_posterior", "rot_id", "shift_px", "pose_ids", "pose_weight", "alpha"):
        np.testing.assert_allclose(getattr(single, name), getattr(whole, name), rtol=1e-5, atol=1e-6)


def test_separable_phase_ramp_is_the_phase_ramp():
    from hetero_dask.core.backprojector import half_plane_freqs
    from hetero_dask.core.scoring import phase_ramp, separable_phase_ramp

    n = 40
    kx, ky, _ = half_plane_freqs(n)
    shifts = np.random.default_rng(1).uniform(-4, 4, (7, 2)).astype(np.float32)
    np.testing.assert_allclose(separable_phase_ramp(shifts, kx, ky, n),
                               phase_ramp(kx, ky, shifts[:, None, :], n)[:, 0], atol=2e-5)


@pytest.mark.parametrize("n, r_max", [(32, 15.0), (33, 16.0), (64, 20.0)])
def test_band_spectra_are_the_centred_fft_on_the_band(n, r_max):
    """The half-plane band from a single-precision real FFT equals the centred complex FFT
    (double precision) gathered on the band, for even and odd boxes."""
    from hetero_dask.core.fourier import fft2c
    from hetero_dask.core.scoring import alignment_band, band_spectra

    x = np.random.default_rng(n).standard_normal((5, n, n)).astype(np.float32)
    band = alignment_band(n, r_max)
    want = fft2c(x.astype(np.float64)).reshape(5, -1)[:, band.flat]
    got = band_spectra(x, band)
    assert got.dtype == np.complex64
    assert np.max(np.abs(got - want)) < 1e-6 * np.max(np.abs(want))

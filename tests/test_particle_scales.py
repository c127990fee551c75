"""Per-particle grey scales (``RefineParams.per_particle_scale``): the class medians the driver
takes from the tasks' summed histograms, and what backprojecting at a particle's scale does."""

import numpy as np

from hetero_dask.core.ctf import CTFParams
from hetero_dask.core.reconstruction import reconstruct
from hetero_dask.jobs.mstep import backproject_particles, empty_partial
from hetero_dask.jobs.refine.scales import (
    MAX_RELATIVE_SCALE,
    median_scales,
    relative_scales,
    scale_histogram,
)


def test_the_median_of_the_summed_histograms_is_the_classes_median_for_any_split():
    rng = np.random.default_rng(0)
    B = 3000
    alpha = np.stack([rng.normal(0.7, 0.1, B), rng.normal(1.6, 0.2, B)], axis=1)
    # Class 1 holds a third of pure-noise images (scale near 0): its median stays the signal's.
    alpha[: B // 3, 1] = rng.normal(0.0, 0.1, B // 3)
    post = rng.dirichlet([1.0, 1.0], B)
    post[:, 1] = np.where(np.arange(B) < B // 3, 0.5, post[:, 1])
    whole = scale_histogram(alpha, post)
    parts = sum(scale_histogram(alpha[s], post[s]) for s in np.array_split(np.arange(B), 7))
    np.testing.assert_allclose(parts, whole, rtol=1e-12)
    got = median_scales(parts, previous=np.ones(2))
    for k in range(2):
        order = np.argsort(alpha[:, k])
        cum = np.cumsum(post[order, k])
        expected = alpha[order, k][np.searchsorted(cum, 0.5 * cum[-1])]
        assert abs(got[k] - expected) <= 0.02  # one bin
    assert got[1] > 1.2  # the noise images do not pull it towards 0


def test_a_class_without_weight_or_signal_keeps_its_previous_median():
    hist = scale_histogram(np.array([[-0.5, 1.0]] * 10), np.array([[1.0, 0.0]] * 10))
    np.testing.assert_array_equal(median_scales(hist, previous=np.array([0.8, 1.3])), [0.8, 1.3])


def test_relative_scales_are_clipped_to_zero_and_the_maximum():
    rel = relative_scales(np.array([[-0.4, 0.5, 100.0]]), np.array([1.0, 0.5, 1.0]))
    np.testing.assert_array_equal(rel, [[0.0, 1.0, MAX_RELATIVE_SCALE]])


def test_backprojecting_at_each_particles_scale_recovers_the_map_at_full_strength():
    """Images ``a_i * Y`` backprojected as ``Y / s`` at weight ``s^2`` (the refine task's way)
    with ``s`` = their true scales ``a_i`` give the map of the unscaled images, pure-noise
    images (``a = 0``) adding nothing; at scale 1 for all, the map is ``mean(a)`` of it."""
    n, B = 16, 40
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[:n, :n] - n // 2
    blob = np.exp(-(xx**2 + yy**2) / 8.0).astype(np.float32)
    a = np.array([0.0, 0.5, 1.0, 2.0])[np.arange(B) % 4]
    images = (a[:, None, None] * blob[None]).astype(np.float32)
    images += rng.normal(0, 1e-3, images.shape).astype(np.float32)
    ctf = CTFParams(df1_A=np.full(B, 8000.0), df2_A=np.full(B, 8000.0), df_angle_rad=np.zeros(B))
    rot = np.broadcast_to(np.eye(3, dtype=np.float32), (B, 1, 3, 3))
    shifts = np.zeros((B, 1, 2), np.float32)
    halves = np.zeros(B, np.int64)

    def amplitude(scale, rows=slice(None)):
        part = empty_partial(1, n, r_max=n // 2 - 1)
        s = np.maximum(scale, 1e-3)[rows]
        backproject_particles(part, images[rows] / s[:, None, None], ctf.subset(rows), 2.0, rot[rows],
                              shifts[rows], (scale[rows] ** 2)[:, None], 0, halves[rows])
        vol = np.asarray(reconstruct(part.grids[(0, 0)]))
        return float(vol.sum(axis=0)[n // 2, n // 2])

    unscaled = amplitude(np.ones(B), rows=np.flatnonzero(a == 1.0))
    assert abs(amplitude(a) / unscaled - 1) < 0.01
    assert abs(amplitude(np.ones(B)) / unscaled - a.mean()) < 0.01


def test_the_state_takes_the_class_medians_and_a_resumed_run_keeps_them(tmp_path):
    import types

    from hetero_dask.jobs.refine.state import State, checkpoint, restore_state, update_state
    from hetero_dask.runtime.checkpoint import load_latest

    n = 4
    vol = np.zeros((n, n, n), np.float32)
    result = types.SimpleNamespace(vol_A=vol, vol_B=vol, resolution_A=10.0, fsc=np.ones(n // 2 + 1))
    alpha = np.array([[0.5, 1.4]] * 6 + [[0.0, 0.0]] * 5)  # class 1: 6 of 11 at 1.4
    post = np.full((11, 2), 0.5)
    stats = {"posterior_sum": np.ones(2), "sigma2_num": np.ones(3), "sigma2_den": np.ones(3),
             "scale_histogram": scale_histogram(alpha, post)}
    state = State(iteration=1, class_prior=np.full(2, 0.5), sigma2=np.ones(3), volumes=np.zeros((2, 2, n, n, n)))
    update_state(state, [result] * 2, stats, 0.5, 0.5, hold_prior=False, half_maps=True)
    np.testing.assert_allclose(state.class_scale, [0.5, 1.4], atol=0.02)
    state.iteration = 2
    checkpoint(tmp_path, state)
    np.testing.assert_array_equal(restore_state(load_latest(tmp_path)).class_scale, state.class_scale)


def test_a_class_with_pure_noise_images_keeps_its_strength_with_per_particle_scale(tmp_path):
    """End to end (the tasks' histograms, the driver's medians, the scaled backprojection): 40 of
    one class's 150 images replaced by pure noise. They stay in that class either way; without
    the option they fade its map to about the real images' share, with it the map keeps the
    strength of the other class's (least-squares amplitude against each class's truth)."""
    from hetero_dask.io.cs import read_cs
    from hetero_dask.io.mrc import read_map
    from hetero_dask.jobs.refine import refine
    from hetero_dask.phantoms import moving_domain_phantoms
    from hetero_dask.simulate import simulate, write_references, write_simulation

    box, psize = 32, 4.0
    vols = moving_domain_phantoms(box, psize, n_classes=2)
    sim = simulate(vols, psize, 150, snr=0.5, seed=3, shift_range_px=1.0)
    noise = np.flatnonzero(sim.classes == 0)[:40]
    sim.images[noise] = np.random.default_rng(0).normal(0, sim.noise_sigma, (40, box, box))
    write_simulation(tmp_path / "sim", sim, vols)
    refs = write_references(tmp_path, vols, psize)

    def run(on: bool):
        out = tmp_path / f"scale_{on}"
        refine(str(tmp_path / "sim" / "particles.cs"), refs, out, progress=False, refine_box=box,
               max_iterations=6, search_max_poses=16, backproject_poses=16, per_particle_scale=on)
        amp = [float(np.sum(read_map(out / f"class_{k}" / "map.mrc")[0] * v) / np.sum(v * v))
               for k, v in enumerate(vols)]
        cls = np.asarray(read_cs(out / "particles.cs")["alignments3D/class"])
        return amp, float(np.mean(cls[noise] == 0))

    (off0, off1), noise_off = run(False)
    (on0, on1), noise_on = run(True)
    assert noise_off >= 0.9 and noise_on >= 0.9  # the noise images are class 0's in both runs
    assert off0 < 0.8 * off1  # faded (measured 0.46 against 0.63)
    assert on0 > 0.9 * on1  # kept (measured 0.65 against 0.67)

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

"""The class-contrast filter (core.class_filter): analytic weights, the shell filter, and the
difference between classes recovered better than by filtering each class map whole."""

from __future__ import annotations

import numpy as np
import pytest

from hetero_dask.core.class_filter import contrast_filtered, shell_filtered, wiener_weight
from hetero_dask.core.fsc import _rfft_shells, _rfftn, fsc

N = 32


def shell_power(vol):
    idx, mult, n_shells = _rfft_shells(vol.shape[-1], np)
    F = _rfftn(vol, np).ravel()
    return np.bincount(idx, weights=mult * np.abs(F) ** 2, minlength=n_shells + 1)[:n_shells]


def test_wiener_weight_is_the_fsc_at_t1_and_less_below():
    f = np.array([1.0, 0.9, 0.5, 0.1, 0.0, -0.2])
    np.testing.assert_allclose(wiener_weight(f, 1.0), [0.999, 0.9, 0.5, 0.1, 0.0, 0.0])
    # T = 0.5 halves the SNR: SNR(0.5) = 1 -> 0.5 -> weight 1/3
    assert wiener_weight(np.array([0.5]), 0.5)[0] == pytest.approx(1 / 3)


def test_shell_filter_keeps_and_removes_whole_shells():
    noise = np.random.default_rng(0).standard_normal((N, N, N)).astype(np.float32)
    v = shell_filtered(noise, np.ones(N // 2 + 1))  # the corners beyond Nyquist are removed
    assert shell_power(v) == pytest.approx(shell_power(noise), rel=1e-4)
    assert np.linalg.norm(v) < np.linalg.norm(noise)
    np.testing.assert_allclose(shell_filtered(v, np.ones(N // 2 + 1)), v, atol=1e-5)
    w = np.r_[np.ones(6), np.zeros(N // 2 + 1 - 6)]
    p, q = shell_power(v), shell_power(shell_filtered(v, w))
    np.testing.assert_allclose(q[:6], p[:6], rtol=1e-4)
    assert np.all(q[6:] < 1e-6 * p[6:])


def _smooth(rng, cutoff):
    """Random volume whose spectrum falls off beyond shell ``cutoff``."""
    v = rng.standard_normal((N, N, N)).astype(np.float32)
    shells = np.arange(N // 2 + 1)
    return shell_filtered(v, 1.0 / (1.0 + (shells / cutoff) ** 4))


def test_class_difference_is_recovered_better_than_by_whole_map_filters():
    """Two classes share a detailed map and differ by a low-resolution change; each half map has
    its own noise. The contrast filter must bring the difference between the classes closer to
    the true difference than filtering each class map by its own FSC does."""
    rng = np.random.default_rng(1)
    common = 3.0 * _smooth(rng, 8.0)
    change = 5.0 * _smooth(rng, 2.5)
    truth = np.stack([common + change, common - change])
    halves = np.stack([[truth[k] + 1.5 * rng.standard_normal((N, N, N)) for _ in (0, 1)] for k in (0, 1)])
    halves = halves.astype(np.float32)

    out = contrast_filtered(halves, [0.5, 0.5])
    whole = np.stack([[shell_filtered(halves[k, h], wiener_weight(fsc(halves[k, 0], halves[k, 1])))
                       for h in (0, 1)] for k in (0, 1)])

    def diff_error(maps):
        d = maps[0] - maps[1]
        return float(np.linalg.norm(d - (truth[0] - truth[1])[None]) / np.linalg.norm(truth[0] - truth[1]))

    e_contrast, e_whole, e_raw = diff_error(out), diff_error(whole), diff_error(halves)
    # 1.0 is the error of saying the classes do not differ: the whole-map filter is worse than
    # that (the difference of two noisy maps), the contrast filter must be well below it.
    assert e_contrast < 0.85 and e_contrast < 0.6 * e_whole < e_raw, (e_contrast, e_whole, e_raw)
    # the maps themselves are no worse than the whole-map filter's
    err = lambda m: float(np.linalg.norm(m - truth[:, None]))  # noqa: E731
    assert err(out) <= 1.05 * err(whole)


def test_noise_free_classes_pass_unchanged():
    rng = np.random.default_rng(2)
    a, b = _smooth(rng, 6.0), _smooth(rng, 6.0)
    halves = np.stack([[a, a], [b, b]])
    out = contrast_filtered(halves, [0.3, 0.7])
    np.testing.assert_allclose(out, halves, atol=2e-3 * float(np.abs(halves).max()))


def test_shells_from_max_shell_on_are_removed():
    rng = np.random.default_rng(3)
    a, b = _smooth(rng, 6.0), _smooth(rng, 6.0)
    out = contrast_filtered(np.stack([[a, a], [b, b]]), [0.5, 0.5], max_shell=5)
    p = shell_power(out[0, 0])
    assert np.all(p[5:] < 1e-6 * p[:5].max())

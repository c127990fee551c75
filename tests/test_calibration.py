"""The written class posteriors' temperature, found without labels (:mod:`hetero_dask.core.calibration`)."""

import numpy as np
import pytest

from hetero_dask.core.calibration import mixture_temperature, tempered
from hetero_dask.jobs.refine import RefineParams
from hetero_dask.jobs.refine.outputs import posterior_calibration


def _overconfident(T: float, n: int = 6000, seed: int = 0, weights=(0.5, 0.3, 0.2),
                   means=((0.0, 0.0), (2.2, 0.0), (0.8, 2.0))):
    """Labels and the Bayes posteriors of a Gaussian mixture in the plane (unit covariance, so its
    log-ratios are Gaussian clouds again), then made ``T`` times too confident."""
    rng = np.random.default_rng(seed)
    means = np.asarray(means)
    labels = rng.choice(len(weights), size=n, p=weights)
    x = means[labels] + rng.standard_normal((n, 2))
    log_post = np.log(weights) - 0.5 * ((x[:, None, :] - means[None]) ** 2).sum(axis=2)
    calibrated = np.exp(log_post - log_post.max(axis=1, keepdims=True))
    calibrated /= calibrated.sum(axis=1, keepdims=True)
    return labels, calibrated, tempered(calibrated, 1.0 / T)


def _ece(post: np.ndarray, labels: np.ndarray, bins: int = 10) -> float:
    conf, right = post.max(axis=1), post.argmax(axis=1) == labels
    which = np.minimum((conf * bins).astype(int), bins - 1)
    return sum(abs(right[which == b].mean() - conf[which == b].mean()) * np.mean(which == b)
               for b in range(bins) if np.any(which == b))


@pytest.mark.parametrize("T", [1.0, 2.5])
def test_the_mixture_finds_the_overconfidence_it_was_given(T):
    labels, calibrated, post = _overconfident(T)
    t = mixture_temperature(post.astype(np.float32))
    assert t == pytest.approx(T, rel=0.1)
    if T > 1:  # the raw posteriors are far from calibrated; the tempered ones are not
        assert _ece(post, labels) > 0.08
        assert _ece(tempered(post, t), labels) < 0.03
        np.testing.assert_allclose(tempered(post, t), calibrated, atol=0.05)


def test_overlapping_states_overshoot_less_than_a_converged_mixture():
    """Where neighbouring states overlap, a mixture run to convergence sorts the particles into
    clouds of its own and its temperature overshoots; the estimate stops the mixture early."""
    T = 1.5
    in_a_row = [(1.3 * k, 0.0) for k in range(4)]  # each state next to the last, as a transition's
    ours, converged = [], []
    for seed in range(3):
        _, _, post = _overconfident(T, n=2000, seed=seed, weights=(0.6, 0.25, 0.1, 0.05), means=in_a_row)
        ours.append(abs(np.log(mixture_temperature(post) / T)))
        converged.append(abs(np.log(mixture_temperature(post, iterations=300) / T)))
    assert np.mean(ours) < 0.75 * np.mean(converged)


def test_no_estimate_below_three_populated_classes():
    _, _, post = _overconfident(2.0)
    assert mixture_temperature(post[:, :2] / post[:, :2].sum(axis=1, keepdims=True)) is None
    few = post.copy()
    few[:, 2] = 0.0  # a class with no particles is not a cloud to fit
    assert mixture_temperature(few / few.sum(axis=1, keepdims=True)) is None


def test_one_hot_posteriors_give_no_estimate_and_no_error():
    """Hard assignments (every particle certain): each class's log-ratio cloud is one point."""
    hard = np.eye(3, dtype=np.float32)[np.arange(300) % 3]
    t = mixture_temperature(hard)
    np.testing.assert_array_equal(hard if t is None else tempered(hard, t), hard)  # they stay one-hot
    from hetero_dask.jobs.refine.outputs import posterior_calibration as calibration

    assert calibration(hard, RefineParams(force_hard_classification=True))["temperature"] == 1.0


def test_tempered_keeps_the_classes_and_the_unseen_rows():
    _, _, post = _overconfident(2.0, n=200)
    post = post.astype(np.float32)
    post[:5] = 0.0  # never classified
    hot = tempered(post, 2.0)
    assert hot.dtype == np.float32
    np.testing.assert_array_equal(hot[:5], 0.0)
    np.testing.assert_allclose(hot[5:].sum(axis=1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(hot[5:].argmax(axis=1), post[5:].argmax(axis=1))
    assert (hot[5:].max(axis=1) <= post[5:].max(axis=1) + 1e-6).all()  # softer, never sharper
    assert tempered(post, 1.0) is post


def test_the_refinement_reports_how_its_posteriors_were_tempered():
    _, _, post = _overconfident(2.0)
    estimated = posterior_calibration(post, RefineParams())
    assert estimated["temperature"] == pytest.approx(2.0, rel=0.1) and "estimated" in estimated["how"]
    two = posterior_calibration(post[:, :2] / post[:, :2].sum(axis=1, keepdims=True), RefineParams())
    assert two["temperature"] == 1.0 and "no estimate" in two["how"]
    assert posterior_calibration(post, RefineParams(posterior_temperature=1.5))["temperature"] == 1.5
    with pytest.raises(ValueError, match=r"posterior_temperature.*-1.*expected None \(estimated\) or a value > 0"):
        RefineParams(posterior_temperature=-1.0).validate()


def test_refine_writes_its_posteriors_at_the_estimated_temperature(tmp_path):
    """Three classes: the run's written posteriors are those of the same run at temperature 1,
    tempered by the temperature its report gives."""
    from hetero_dask.io.cs import read_cs
    from hetero_dask.jobs.refine import refine
    from hetero_dask.phantoms import moving_domain_phantoms
    from hetero_dask.simulate import simulate, write_references, write_simulation

    box, psize = 32, 4.0
    vols = moving_domain_phantoms(box, psize, n_classes=3)
    sim = simulate(vols, psize, 40, snr=0.05, seed=2, shift_range_px=1.0)
    cs = write_simulation(tmp_path / "sim", sim, vols)["cs"]
    refs = write_references(tmp_path, vols, psize)
    run = dict(refine_box=box, num_random_iterations=0, final_full_passes=0, max_iterations=1, max_order=2,
               progress=False)
    plain = refine(cs, refs, tmp_path / "plain", posterior_temperature=1.0, **run)
    estimated = refine(cs, refs, tmp_path / "estimated", **run)
    assert plain["posterior_calibration"]["temperature"] == 1.0
    calibration = estimated["posterior_calibration"]
    assert "estimated" in calibration["how"]
    raw = read_cs(tmp_path / "plain" / "particles.cs")["alignments3D_multi/class_posterior"]
    written = read_cs(tmp_path / "estimated" / "particles.cs")["alignments3D_multi/class_posterior"]
    assert ((raw > 0.01) & (raw < 0.99)).any(axis=1).mean() > 0.1  # tempering shows on these
    assert calibration["temperature"] == mixture_temperature(raw)
    np.testing.assert_allclose(written, tempered(raw, calibration["temperature"]), atol=1e-6)

"""References alike at the starting resolution: grouped by their correlation, and the EM
started again from them with the first round's class fractions as priors within each group
(``RefineParams.similar_references_correlation``)."""

from __future__ import annotations

import types

import numpy as np
import pytest

from hetero_dask.jobs.refine import RefineParams, driver, refine
from hetero_dask.jobs.refine.outputs import round_marks
from hetero_dask.jobs.refine.references import similar_groups
from hetero_dask.jobs.refine.state import State
from hetero_dask.phantoms import moving_domain_phantoms
from hetero_dask.simulate import simulate, write_references, write_simulation


def _maps(rng, n=8):
    """Four maps: b = a + a little, c = b + a little more (so a-c agree less than a-b, b-c), d unlike."""
    a = rng.standard_normal((n, n, n))
    b = a + 0.25 * rng.standard_normal(a.shape)
    c = b + 0.25 * rng.standard_normal(a.shape)
    d = rng.standard_normal(a.shape)
    return np.stack([a, b, c, d])


def test_similar_groups_link_chains_and_keep_unlike_maps_apart():
    maps = _maps(np.random.default_rng(0))
    flat = maps.reshape(4, -1) - maps.reshape(4, -1).mean(1, keepdims=True)
    corr = np.corrcoef(flat)
    threshold = (min(corr[0, 1], corr[1, 2]) + corr[0, 2]) / 2  # links a-b and b-c, not a-c
    assert corr[0, 2] < threshold <= min(corr[0, 1], corr[1, 2])
    assert similar_groups(maps, threshold).tolist() == [0, 0, 0, 1]  # a, b, c chained; d alone
    assert similar_groups(maps, 1.0).tolist() == [0, 1, 2, 3]
    assert similar_groups(10 * maps + 3, threshold).tolist() == [0, 0, 0, 1]  # a correlation: scale and offset free
    assert similar_groups(maps[[3, 0, 1]], threshold).tolist() == [0, 1, 1]
    # a, d, c, b: a and c join only through b, which comes last; groups still numbered by first appearance
    chained = np.stack([maps[0], maps[3], maps[2], maps[1]])
    assert similar_groups(chained, threshold).tolist() == [0, 1, 0, 0]


def test_restart_priors_share_each_group_equally_in_the_rounds_proportions(monkeypatch):
    maps = _maps(np.random.default_rng(1))[[0, 1, 3]]  # groups [0, 0, 1]
    maps[1] = maps[0] + 0.1 * maps[1]  # a and b well above the threshold
    fresh = State(volumes=np.repeat(maps[:, None], 2, axis=1), sigma2=np.ones(4), class_prior=np.full(3, 1 / 3),
                  resolution_A=np.full(3, 20.0))
    monkeypatch.setattr(driver, "_prepared_state", lambda run, refs, bar: fresh)
    # 10 A pixels: the initial 20 A low-pass keeps every shell of the 8-voxel maps
    run = types.SimpleNamespace(params=RefineParams(similar_references_correlation=0.95), n_classes=3, box=8,
                                psize_A=10.0, mask=np.ones((8, 8, 8), np.float32))
    bar = types.SimpleNamespace(note=lambda message: None)
    before = State(iteration=7, history=[{"iteration": 6}], class_prior=np.array([0.5, 0.3, 0.2]))
    after = driver._similar_restart(run, before, np.array([0.6, 0.2, 0.2]), (maps, 10.0), bar)
    # the group {0, 1} keeps its 2/3 in the proportions 3 : 1; class 2, unlike them, keeps 1/3
    np.testing.assert_allclose(after.class_prior, [0.5, 1 / 6, 1 / 3])
    assert after.iteration == after.round_start == 7 and after.history is before.history
    assert after.volumes is fresh.volumes and after.converged_at is None
    # the group's classes about equal: the round would start as the first did, so none
    assert driver._similar_restart(run, before, np.array([0.35, 0.31, 0.34]), (maps, 10.0), bar) is None
    # identical references (initial_split random): a round from them would hold identical classes
    same = np.repeat(maps[:1], 3, axis=0)
    assert driver._similar_restart(run, before, np.array([0.6, 0.2, 0.2]), (same, 10.0), bar) is None
    run.params = RefineParams(similar_references_correlation=0.9999)  # nothing alike: no restart
    assert driver._similar_restart(run, before, np.array([0.6, 0.2, 0.2]), (maps, 10.0), bar) is None


@pytest.fixture(scope="module")
def alike(tmp_path_factory):
    """Two states of a moving domain (correlation about 0.98 at 20 A), 3:1, from the truth."""
    d = tmp_path_factory.mktemp("alike")
    vols = moving_domain_phantoms(32, 4.0, n_classes=2)
    sim = simulate(vols, 4.0, [240, 80], snr=0.3, seed=5, shift_range_px=1.0)
    paths = write_simulation(d / "sim", sim, vols)
    return str(paths["cs"]), write_references(d, vols, 4.0)


def _rounds(report):
    return sorted({it.get("round_start", 0) for it in report["iterations"]})


def test_alike_references_start_again_with_the_rounds_fractions(alike, tmp_path):
    """The second round starts at the first's convergence with its fractions as priors: the
    second round's first iteration is damped from them, not from 1/2 each."""
    cs, refs = alike
    # a looser convergence test ends each round in a few iterations
    kw = dict(max_iterations=30, max_order=2, search_max_poses=8, backproject_poses=8, progress=False,
              cache_dir="off", convergence_class_change=0.1)
    report = refine(cs, refs, tmp_path / "on", **kw)
    starts = _rounds(report)
    assert len(starts) == 2 and starts[0] == 0
    first = [it for it in report["iterations"] if it.get("round_start", 0) == 0]
    second = [it for it in report["iterations"] if it.get("round_start", 0) == starts[1]]
    assert second[0]["iteration"] == first[-1]["iteration"] + 1 == starts[1]
    last_fraction = np.array(first[-1]["class_fraction"])
    assert abs(last_fraction[0] - 0.5) > 0.05  # the round moved the priors away from equal
    # its first M-step moves the priors half-way (full_pass_learning_rate) from the restart's,
    # the round's fractions, to the pass's; from equal priors they would land nearer to 1/2
    restarted = second[0]["class_fraction"][0]
    assert abs(restarted - last_fraction[0]) < abs(restarted - 0.5)
    # the history plots mark where the second round starts
    assert round_marks(report["iterations"]) == {starts[1]: "round 2 starts"}
    off = refine(cs, refs, tmp_path / "off", similar_references_correlation=None, **kw)
    assert _rounds(off) == [0]
    assert round_marks(off["iterations"]) == {}


@pytest.mark.parametrize("value", [1.5, -2.0])
def test_a_correlation_outside_minus_one_to_one_is_refused(value):
    with pytest.raises(ValueError, match="similar_references_correlation"):
        RefineParams(similar_references_correlation=value).validate()

"""Heterogeneous Refinement learns on data no part of this project made.

A small set of the realistic scenarios (:mod:`hetero_dask.testing.scenarios`): adenylate
kinase open and closed, densities from the atomic models by gemmi, particles projected by
``relion_project --ctf`` with white noise, starting maps the true ones low-passed to 40 A.
The refinement, with its default schedule, must end better than where it starts: the
accuracy of its classes above that of its first E-step (the classes the starting maps
give), and its maps closer to the true maps than the starting maps are. A refinement
that does not learn stays where it starts.

The full-size scenarios are slow tests here (``pytest -m slow tests/test_refine_realistic.py``,
about an hour on 2 cores, 20 minutes of it the transition's two rounds): on a report seed (13,
never used for tuning), the defaults must come within 3 points of the oracle ceiling with
calibrated posteriors (ECE <= 0.05), the goals the defaults are held to. Scenarios where they do not yet are expected failures, with the gap
measured by ``benchmarks/bench_realistic.py`` (tables and plots in
``benchmarks/results/realistic``), which also runs RELION on the same data.
"""

from __future__ import annotations

import numpy as np
import pytest

from hetero_dask.io.cs import read_cs
from hetero_dask.jobs.refine import refine
from hetero_dask.testing import scenarios as S
from hetero_dask.testing.relion import read_mrc

pytestmark = pytest.mark.relion

SMALL = S.Scenario(
    "ci_two_conformations", "AdK open vs closed, box 48 at 2 A/px",
    (S.State("adk_open", 0.5), S.State("adk_closed", 0.5)), n_particles=600, box=48, psize_A=2.0,
    snr=0.05, shift_range_px=2.0, ref_lowpass_A=40.0,
)


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    return S.build(SMALL, seed=1, folder=tmp_path_factory.mktemp("realistic"))


def _accuracy(data: S.Dataset, out) -> tuple[float, np.ndarray]:
    post = np.asarray(read_cs(out / "particles.cs")["alignments3D_multi/class_posterior"])
    pred = post.argmax(axis=1)
    mapping = S.match_classes(pred, data.labels, 2)
    return S.accuracy(pred, data, mapping), mapping


def _map_correlation(data: S.Dataset, maps, mapping) -> float:
    return float(np.mean([m["correlation_8A"] for m in S.map_scores(maps, SMALL.psize_A, data, mapping)]))


def test_refinement_ends_above_where_it_starts(small_set, tmp_path):
    refs = [str(p) for p in small_set.references]
    star = str(small_set.particles_star)
    refine(star, refs, tmp_path / "first", max_iterations=1, final_full_passes=0, progress=False)
    refine(star, refs, tmp_path / "final", progress=False)
    acc0, _ = _accuracy(small_set, tmp_path / "first")
    acc, mapping = _accuracy(small_set, tmp_path / "final")
    corr0 = _map_correlation(small_set, [read_mrc(p) for p in refs], np.arange(2))
    corr = _map_correlation(small_set, [read_mrc(tmp_path / "final" / f"class_{k}" / "map.mrc")
                                        for k in range(2)], mapping)
    print(f"start: first E-step accuracy {acc0:.3f}, starting maps' correlation with the truth {corr0:.3f}; "
          f"refined: accuracy {acc:.3f}, map correlation {corr:.3f}")
    assert acc >= acc0 + 0.05
    assert acc >= 0.75
    assert corr >= corr0 + 0.03


# Measured gaps on seed 13 (benchmarks/results/realistic/results.json; the README's table has
# seeds 10-14): an expected failure here turns into a pass when the gap closes.
_SHORT_OF_THE_GOALS = {
    "coloured_noise": "5.8 points below the oracle (5.8 over seeds 10-14; the job's maps, TUNING.md); ECE met (0.027)",
}
FULL_SIZE = [n for n in S.SCENARIOS if n != "two_conformations_large"]


@pytest.mark.slow
@pytest.mark.parametrize("name", [
    pytest.param(n, marks=pytest.mark.xfail(reason=_SHORT_OF_THE_GOALS[n], strict=False))
    if n in _SHORT_OF_THE_GOALS else n for n in FULL_SIZE])
def test_full_size_scenario_near_the_oracle(name, tmp_path_factory):
    sc = S.SCENARIOS[name]
    folder = tmp_path_factory.mktemp(name)
    data = S.build(sc, seed=13, folder=folder / "data")
    oracle = S.oracle_accuracy(data, folder / "oracle")
    refine(str(data.particles_star), [str(p) for p in data.references], folder / "ours",
           refine_box=sc.refine_box or sc.box, symmetry=sc.symmetry, seed=13, progress=False)
    ours = S.score_refine_run(folder / "ours", data)
    print(f"{name}: oracle {oracle['accuracy']:.3f}, ours {ours['accuracy']:.3f}, "
          f"ECE {ours['calibration']['ece']:.3f}, junk recall {ours['junk_recall']} / {oracle.get('junk_recall')}")
    assert ours["accuracy"] >= oracle["accuracy"] - 0.03
    assert ours["calibration"]["ece"] <= 0.05
    if ours["junk_recall"] is not None:
        assert ours["junk_recall"] >= oracle["junk_recall"] - 0.05

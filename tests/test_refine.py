"""Heterogeneous Refinement end to end on a small simulated two-state set.

The yardstick for classification is the oracle: our E-step given the TRUE maps
and the true noise power, marginalising over the pose grid
(:func:`hetero_dask.simulate.oracle_accuracy`): the refinement, starting from
references low-passed to 30 A, must come close to it.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from hetero_dask.core.fourier import lowpass
from hetero_dask.io.cs import read_cs
from hetero_dask.io.mrc import write_map
from hetero_dask.io.star import read_star
from hetero_dask.jobs.refine import refine
from hetero_dask.phantoms import moving_domain_phantoms
from hetero_dask.simulate import (
    agreement,
    oracle_accuracy,
    simulate,
    write_references,
    write_simulation,
)

BOX, PSIZE, SNR, N_PER_CLASS = 32, 4.0, 0.5, 250


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    d = tmp_path_factory.mktemp("refine")
    vols = moving_domain_phantoms(BOX, PSIZE, n_classes=2)
    sim = simulate(vols, PSIZE, N_PER_CLASS, snr=SNR, seed=3, shift_range_px=1.0)
    write_simulation(d / "sim", sim, vols)
    return d, vols, sim, write_references(d, vols, PSIZE)


@pytest.fixture(scope="module")
def refined(dataset):
    d, vols, sim, refs = dataset
    out = d / "out"
    report = refine(str(d / "sim" / "particles.cs"), refs, out, refine_box=BOX, batch_size_per_class=150,
                    max_iterations=6, num_random_iterations=0, initial_sigma_scale=1.0, progress=False, seed=0)
    return out, report


def test_classes_near_the_oracle(dataset, refined):
    d, vols, sim, refs = dataset
    out, report = refined
    oracle = oracle_accuracy(vols, sim, 2.0)
    best = read_cs(out / "particles.cs")["alignments3D/class"]
    acc = agreement(best, sim.classes)
    print(f"refinement accuracy {acc:.3f}, oracle {oracle:.3f}")
    assert oracle > 0.8, "the test set should be classifiable"
    # CI size: 500 particles are too few to learn maps as good as the truth; the gap to the
    # oracle is wider than at full size (see the slow and benchmark runs).
    assert acc >= oracle - 0.15


def test_output_contract(dataset, refined):
    d, vols, sim, refs = dataset
    out, report = refined
    cs = read_cs(out / "particles.cs")
    assert len(cs) == 2 * N_PER_CLASS
    for k in range(2):
        for field in ("pose", "shift", "class_posterior", "error"):
            assert f"alignments_class_{k}/{field}" in cs.dtype.names
        assert (out / f"class_{k}" / "map.mrc").is_file()
        assert (out / f"class_{k}" / "particles.cs").is_file()
    post = cs["alignments3D_multi/class_posterior"]
    np.testing.assert_allclose(post.sum(axis=1), 1.0, atol=1e-3)
    assert np.array_equal(cs["alignments3D/class"], post.argmax(axis=1))
    # CryoSPARC's per-class pose_ess and alpha slots hold the E-step's, not zeros.
    best = cs["alignments3D/class"]
    for field in ("pose_ess", "alpha"):
        per_class = np.stack([cs[f"alignments_class_{k}/{field}"] for k in range(2)], axis=1)
        np.testing.assert_array_equal(per_class, cs[field])
        np.testing.assert_array_equal(cs[f"alignments3D/{field}"], per_class[np.arange(len(cs)), best])
    assert np.all(cs["alignments3D/pose_ess"] >= 1)
    star = read_star(out / "particles.star")
    particles = star["particles"]
    assert np.array_equal(particles["rlnClassNumber"].to_numpy() - 1, cs["alignments3D/class"])
    rep = json.loads((out / "report.json").read_text())
    assert len(rep["classes"]) == 2
    assert abs(sum(c["fraction"] for c in rep["classes"]) - 1) < 1e-6
    assert len(rep["iterations"]) >= 3
    page = (out / "report.html").read_text()
    pngs = ("fsc.png", "class_maps.png", "orientations.png", "class_fractions.png", "resolution.png",
            "class_changes.png")  # fmt: skip
    assert page.count("data:image/png;base64,") == len(pngs)
    for png in pngs:
        assert (out / png).stat().st_size > 1000


def test_bad_parameters_are_refused(dataset, tmp_path):
    d, vols, sim, refs = dataset
    with pytest.raises(ValueError, match=r"--box \(refine_box\) = 15"):
        refine(str(d / "sim" / "particles.cs"), refs, tmp_path / "out", refine_box=15)
    with pytest.raises(ValueError, match="learning_rate = 0"):
        refine(str(d / "sim" / "particles.cs"), refs, tmp_path / "out", learning_rate=0)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.parametrize("scale", [0.01, 100.0])
def test_reference_grey_scale_does_not_matter(dataset, refined, tmp_path, scale):
    d, vols, sim, refs = dataset
    scaled = []
    for k in range(2):
        path = tmp_path / f"ref{k}.mrc"
        write_map(path, scale * lowpass(vols[k], 30.0, PSIZE, 3), PSIZE)
        scaled.append(str(path))
    refine(str(d / "sim" / "particles.cs"), scaled, tmp_path / "out", refine_box=BOX, batch_size_per_class=150,
           max_iterations=6, num_random_iterations=0, progress=False, seed=0)
    base = read_cs(refined[0] / "particles.cs")["alignments3D/class"]
    other = read_cs(tmp_path / "out" / "particles.cs")["alignments3D/class"]
    assert agreement(base, other) >= 0.9


@pytest.fixture(scope="module")
def consensus_set(tmp_path_factory):
    """The moving-domain consensus set at half size: the same particle (domain swing 180, 1.3x
    domain) at box 32 and 8 A/px, SNR 0.2, 250 particles per class; references: two
    copies of the mean of the true maps low-passed to 30 A."""
    d = tmp_path_factory.mktemp("consensus")
    vols = moving_domain_phantoms(32, 8.0, n_classes=2, swing_deg=180.0, domain_weight=1.3)
    sim = simulate(vols, 8.0, 250, snr=0.2, seed=3, shift_range_px=1.0)
    paths = write_simulation(d / "sim", sim)
    refs = write_references(d / "consensus", np.repeat(vols.mean(axis=0)[None], 2, axis=0), 8.0)
    return d, vols, sim, str(paths["cs"]), refs


def test_identical_references_are_split_by_variability(consensus_set, tmp_path, monkeypatch):
    """Two copies of the consensus map. On this set random-assignment EM stays at chance
    (0.53) and so did the previous split (0.50: one consensus pose per particle, equal-size
    cut along the top principal component); the split by variability, held for two
    iterations, then free EM reaches 0.91 (oracle 0.95; 8 poses per search stage and
    backprojection, narrower than the defaults, keep the test short)."""
    from hetero_dask.jobs.refine import split as S

    d, vols, sim, cs, refs = consensus_set
    warm = []
    real = S._principal_components

    def recorded(res, n_vec, seed, n_used, start=None):
        warm.append(start is not None)
        return real(res, n_vec, seed, n_used, start)

    monkeypatch.setattr(S, "_principal_components", recorded)
    report = refine(cs, refs, tmp_path / "out", refine_box=32, batch_size_per_class=1000, max_iterations=10,
                    initial_lowpass_A=30.0, max_order=2, search_max_poses=8, backproject_poses=8, progress=False,
                    seed=3)
    # each candidate resolution's components start from the previous (coarser) one's
    assert warm == [False] + [True] * (len(warm) - 1) and len(warm) >= 2
    held = [h["split_assignment"] for h in report["iterations"]]
    assert held[:3] == [True, True, False]
    assert all(h["class_change_fraction"] in (None, 0.0) for h in report["iterations"][:2])
    # The held groups are no posteriors: the class priors stay equal until the classification.
    assert all(h["class_fraction"] == [0.5, 0.5] for h in report["iterations"][:2])
    # The report says at which of the candidate resolutions the split was made, and why.
    split = report["initial_split"]
    assert split["particles"] == 500 and sum(split["group_sizes"]) == 500
    seps = split["separation_by_resolution_A"]
    assert len(seps) >= 2 and seps[f"{split['resolution_A']:.2f}"] == max(seps.values())
    best = read_cs(tmp_path / "out" / "particles.cs")["alignments3D/class"]
    acc = agreement(best, sim.classes)
    print(f"consensus start: accuracy {acc:.3f}")
    assert acc >= 0.85
    # Once converged (its two final full passes done), the run started again from its classes.
    its = report["iterations"]
    r = its[-1]["round_start"]
    assert 0 < r < len(its) and [h["round_start"] for h in its] == [0] * r + [r] * (len(its) - r)
    assert its[r - 1]["full_pass"] and its[r - 2]["full_pass"]
    assert not its[r]["split_assignment"] and its[r]["class_change_fraction"] is not None


def test_restarted_round_resumes_as_if_uninterrupted(consensus_set, tmp_path, monkeypatch):
    """A run stopped inside the round that restarted from the split's classes resumes there
    (the round's schedule and its references from the checkpoint), not from the first round, and
    ends as the uninterrupted run does."""
    from hetero_dask.jobs.refine import driver

    d, vols, sim, cs, refs = consensus_set
    # A narrower pose search than the defaults': what is tested is where the run resumes.
    params = dict(refine_box=32, batch_size_per_class=1000, max_iterations=9, initial_lowpass_A=30.0, max_order=2,
                  split_iterations=1, split_lowpass_A=30.0, search_max_poses=8, backproject_poses=8,
                  progress=False, seed=3)
    whole = refine(cs, refs, tmp_path / "whole", **params)
    r = whole["iterations"][-1]["round_start"]
    assert 0 < r < len(whole["iterations"]) - 1, "no restart with two iterations after it"

    real = driver._run_iteration

    def stop_in_round_two(run, state, *args):
        if state.round_start > 0 and state.round_iteration == 1:
            raise RuntimeError("stopped")
        return real(run, state, *args)

    monkeypatch.setattr(driver, "_run_iteration", stop_in_round_two)
    with pytest.raises(RuntimeError, match="stopped"):
        refine(cs, refs, tmp_path / "resumed", **params)
    monkeypatch.setattr(driver, "_run_iteration", real)
    resumed = refine(cs, refs, tmp_path / "resumed", resume=True, **params)
    assert [h["round_start"] for h in resumed["iterations"]] == [h["round_start"] for h in whole["iterations"]]
    a, b = (read_cs(tmp_path / run / "particles.cs")["alignments3D_multi/class_posterior"] for run in ("whole", "resumed"))
    np.testing.assert_allclose(a, b, atol=1e-4)


def test_sigma_scale_schedule_and_bad_values():
    """Linear from the initial to the final scale over the annealing iterations, the final
    one once converged; non-positive scales are refused by name."""
    from hetero_dask.jobs.refine import RefineParams
    from hetero_dask.jobs.refine.schedule import sigma_scale

    p = RefineParams(initial_sigma_scale=3.0, final_sigma_scale=2.0, sigma_anneal_iterations=10)
    assert sigma_scale(0, p, False) == 3.0
    assert sigma_scale(5, p, False) == pytest.approx(2.5)
    assert sigma_scale(20, p, False) == 2.0
    assert sigma_scale(1, p, True) == 2.0  # final passes
    for name in ("initial_sigma_scale", "final_sigma_scale"):
        with pytest.raises(ValueError, match=rf"\({name}\) = 0.0: expected a value > 0"):
            RefineParams(**{name: 0.0}).validate()
    with pytest.raises(ValueError, match=r"^split_lowpass_A = -5.0: expected a resolution in A > 0"):
        RefineParams(split_lowpass_A=-5.0).validate()


def test_search_breadth_reaches_the_pose_search():
    """The coarse stage runs at ``coarse_radius_fraction`` of the alignment radius (at least 4
    shells), every later stage refines ``search_max_poses`` poses per class and the E-step
    returns ``backproject_poses`` per class; values no search can use are refused by name."""
    from hetero_dask.jobs.refine import RefineParams
    from hetero_dask.jobs.refine.schedule import Radii, search_params

    r = Radii(align=20.0, backproject=30.0, band=30.0)
    for frac, poses in ((0.6, 8), (1.0, 32)):
        p = RefineParams(coarse_radius_fraction=frac, search_max_poses=poses, backproject_poses=2 * poses,
                         backproject_mass=frac)
        s = search_params(r, 0, p, shift_range_px=3.0, mask_T=1.0, converged=False)
        assert (s.radius_coarse, s.radius_final, s.max_poses, s.n_out_poses) == (20.0 * frac, 20.0, poses, 2 * poses)
        assert s.out_mass == frac
        assert s.radius_at(0) == pytest.approx(20.0 * frac)
    small = search_params(Radii(5.0, 7.0, 7.0), 0, RefineParams(coarse_radius_fraction=0.6), 3.0, 1.0, False)
    assert small.radius_coarse == 4.0
    with pytest.raises(ValueError, match=r"--search-poses \(search_max_poses\) = 0: expected a whole number >= 1"):
        RefineParams(search_max_poses=0).validate()
    with pytest.raises(ValueError, match=r"backproject_mass = 0.0: expected a value in \(0, 1\]"):
        RefineParams(backproject_mass=0.0).validate()
    with pytest.raises(ValueError, match=r"^backproject_poses = 0: expected a whole number >= 1"):
        RefineParams(backproject_poses=0).validate()
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match=r"^coarse_radius_fraction = .*: expected a value in \(0, 1\]"):
            RefineParams(coarse_radius_fraction=bad).validate()


def test_split_resolutions_from_the_initial_lowpass_to_half_of_it():
    """Four geometric steps; resolutions the box cannot tell apart (beyond Nyquist) count once."""
    from hetero_dask.jobs.refine.split import split_resolutions

    assert split_resolutions(20.0, 64, 1.5) == pytest.approx([20.0, 20 / 2 ** (1 / 3), 20 / 2 ** (2 / 3), 10.0])
    # Box 32 at 8 A/px: Nyquist 16 A, every resolution finer than 17.1 A (radius 15) is radius 15.
    assert split_resolutions(30.0, 32, 8.0) == pytest.approx([30.0, 30 / 2 ** (1 / 3), 30 / 2 ** (2 / 3), 15.0])
    assert split_resolutions(20.0, 32, 8.0) == pytest.approx([20.0, 20 / 2 ** (1 / 3)])
    assert split_resolutions(20.0, 64, 1.5, fixed_A=12.0) == [12.0]


def test_split_separation_tells_two_states_from_one_cloud():
    """Groups cut out of one Gaussian cloud at its median: between / within scatter
    (2 / pi) / (1 - 2 / pi) = 1.75; two clouds 4 sigma apart: (2^2) / 1 = 4."""
    from hetero_dask.jobs.refine.split import _separation

    z = np.random.default_rng(0).standard_normal((200_000, 1))
    halves = (z[:, 0] > 0).astype(int)
    assert _separation(z, halves, 2) == pytest.approx((2 / np.pi) / (1 - 2 / np.pi), rel=0.01)
    labels = np.arange(z.shape[0]) % 2
    clouds = z + np.where(labels[:, None] == 1, 2.0, -2.0)
    assert _separation(clouds, labels, 2) == pytest.approx(4.0, rel=0.02)


def test_split_subspace_iteration_settles_and_warm_starts(consensus_set, monkeypatch):
    """The split's principal components: the subspace iteration stops once the components
    settle (the principal angle between two iterates), and started from its own settled
    answer it stops within two iterations (the start is low-passed and masked again) with
    the same components."""
    from hetero_dask.jobs.refine import RefineParams
    from hetero_dask.jobs.refine import split as S

    rng = np.random.default_rng(0)
    A = S._orthonormal(rng.standard_normal((2, 8, 8, 8)).astype(np.float32))
    mixed = S._orthonormal(np.stack([A[0] + A[1], A[0] - A[1]]))
    assert S._span_cosine(A, mixed) == pytest.approx(1.0, abs=1e-5)  # one span, another basis
    assert S._span_cosine(A[:1], A[1:]) == pytest.approx(0.0, abs=1e-5)  # orthogonal

    d, vols, sim, cs, refs = consensus_set
    box, psize, n, limit = 32, 8.0, 200, 40
    res = S._residuals(sim.images[:n] / sim.noise_sigma, sim.ctf.subset(np.arange(n)), vols.mean(axis=0), box,
                       psize, box / 2 - 2, S._split_radius(30.0, box, psize), 1.0, np.full(box, 1.0),
                       RefineParams(max_order=2), np.ones((box,) * 3, np.float32), 30.0)
    calls = {"n": 0}
    real = res.backproject

    def counted(*args):
        calls["n"] += 1
        return real(*args)

    res.backproject = counted
    monkeypatch.setattr(S, "_SPLIT_PCA_ITERATIONS", limit)
    V = S._principal_components(res, 3, seed=0, n_used=1)
    from_random = calls["n"] // 3  # three backprojections per iteration
    W = S._principal_components(res, 3, seed=0, n_used=1, start=V)
    assert 2 < from_random < limit
    assert calls["n"] // 3 - from_random <= 2
    assert S._span_cosine(W[:1], V[:1]) >= 0.99  # within 8 degrees; unrelated maps give about 0

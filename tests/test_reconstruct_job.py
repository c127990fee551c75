"""Heterogeneous Reconstruction Only: truth, mixtures, RELION, partitioning, symmetry, bad input.

Oracles: the phantoms the particles were simulated from (hard mode), the
posterior-weighted mixture of the phantoms (soft mode), relion_reconstruct
on the same STAR file, the same job on one worker vs three workers with
other partitions, and symmetric phantoms.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from hetero_dask.core.fourier import fourier_resize
from hetero_dask.core.fsc import fsc
from hetero_dask.io.cs import read_cs, write_cs
from hetero_dask.io.mrc import read_map, write_map
from hetero_dask.io.star import read_star
from hetero_dask.io.store import import_particles
from hetero_dask.jobs.reconstruct import reconstruct
from hetero_dask.phantoms import moving_domain_phantoms, symmetric_phantom
from hetero_dask.simulate import simulate, write_simulation

BOX, PSIZE, K, PER_CLASS = 32, 4.0, 3, 500
HALF_NYQ = BOX // 4


@pytest.fixture(scope="module")
def vols():
    return moving_domain_phantoms(BOX, PSIZE, K)


@pytest.fixture(scope="module")
def simset(tmp_path_factory, vols):
    """1500 particles of 3 classes at high SNR, written as .mrcs/.cs/.star, and a store with small chunks."""
    d = tmp_path_factory.mktemp("sim")
    sim = simulate(vols, PSIZE, PER_CLASS, snr=100.0, seed=3, shift_range_px=2.0)
    paths = write_simulation(d, sim, vols)
    # ~12 rows per chunk: partitions can be cut many ways
    store = import_particles(paths["cs"], d / "p.zarr", chunk_mb=0.05, progress=False)
    return {"dir": d, "sim": sim, "paths": paths, "store": store.path}


def _map(out, k, name="map"):
    return read_map(out / f"class_{k}" / f"{name}.mrc")[0]


def _with_fields(path_in, path_out, edit):
    table = read_cs(path_in)
    edit(table)
    write_cs(path_out, table)
    return path_out


def test_hard_mode_gives_each_class_its_truth(simset, vols, tmp_path):
    out = tmp_path / "hard"
    res = reconstruct(simset["paths"]["cs"], out, progress=False, force_hard_classification=True)
    assert res.layout == "alignments_class" and res.n_classes == K
    for k in range(K):
        curve = fsc(_map(out, k), vols[k])
        assert curve[1 : HALF_NYQ + 1].min() > 0.9, (k, curve.round(3))
        # the classes really differ: the map is closer to its own truth than to the others
        other = fsc(_map(out, k), vols[(k + 1) % K])
        assert curve[2:HALF_NYQ].mean() > other[2:HALF_NYQ].mean() + 0.05
    for name in ("particles.cs", "particles.star", "particles.csg", "volumes.zip", "fsc.png"):
        assert (out / name).is_file(), name
    report = json.loads((out / "report.json").read_text())
    assert report["class_layout"] == "alignments_class" and report["class_layout_autodetected"]
    assert [c["weight_sum"] for c in report["classes"]] == [PER_CLASS] * K
    assert {"no_mask", "spherical", "loose", "tight", "corrected"} <= set(
        report["classes"][0]["fsc"]
    )
    assert all(np.isfinite(c["resolution_A"]) for c in report["classes"])
    # particles back in the input order, best class = the true class, every input field kept
    table_in = read_cs(simset["paths"]["cs"])
    table = read_cs(out / "particles.cs")
    assert np.array_equal(table["uid"], table_in["uid"])
    assert set(table_in.dtype.names) <= set(table.dtype.names)
    assert np.array_equal(table["alignments3D/class"], simset["sim"].classes)
    assert table["alignments3D_multi/class_posterior"].shape == (3 * PER_CLASS, K)
    star = read_star(out / "particles.star")["particles"]
    assert np.array_equal(star["rlnClassNumber"].to_numpy(), simset["sim"].classes + 1)
    assert np.allclose(star[[f"rlnClassPosterior{k + 1}" for k in range(K)]].sum(axis=1), 1.0)


def test_soft_mode_gives_the_posterior_weighted_mixture(simset, vols, tmp_path):
    """Class k's map is sum_j wbar_kj V_j with wbar_kj the share of class k's weight from truth j."""
    mix = np.array([[0.6, 0.3, 0.1], [0.2, 0.6, 0.2], [0.1, 0.2, 0.7]], np.float32)
    cls = simset["sim"].classes

    def soften(t):
        for k in range(K):
            t[f"alignments_class_{k}/class_posterior"] = mix[cls, k]

    cs = _with_fields(simset["paths"]["cs"], simset["dir"] / "soft.cs", soften)
    out = tmp_path / "soft"
    reconstruct(cs, out, progress=False)
    wsum = np.array([mix[cls, k].sum() for k in range(K)])
    for k in range(K):
        wbar = np.array([mix[j, k] * (cls == j).sum() for j in range(K)]) / wsum[k]
        expected = np.tensordot(wbar, vols, axes=1)
        got = fsc(_map(out, k), expected)
        pure = fsc(_map(out, k), vols[k])
        assert got[1 : HALF_NYQ + 1].min() > 0.9, (k, got.round(3))
        assert got[3 : HALF_NYQ + 1].mean() > pure[3 : HALF_NYQ + 1].mean() + 0.02
    report = json.loads((out / "report.json").read_text())
    assert np.allclose([c["weight_sum"] for c in report["classes"]], wsum, rtol=1e-5)


def test_one_worker_equals_three_workers_with_other_partitions(simset, tmp_path):
    from distributed import Client, LocalCluster

    one = reconstruct(
        simset["store"], tmp_path / "one", progress=False, partitions=1, random_split=True
    )
    with (
        LocalCluster(
            n_workers=3, threads_per_worker=1, processes=False, dashboard_address=":0"
        ) as lc,
        Client(lc) as client,
    ):
        three = reconstruct(
            simset["store"],
            tmp_path / "three",
            client=client,
            progress=False,
            partitions=7,
            fan_in=2,
            random_split=True,
        )
    assert one.report["n_partitions"] == 1
    assert three.report["n_partitions"] == 7 and three.report["workers"] == 3
    for k in range(K):
        for name in ("map", "map_half_A", "map_half_B"):
            a, b = _map(tmp_path / "one", k, name), _map(tmp_path / "three", k, name)
            assert np.abs(a - b).max() <= 1e-4 * np.abs(a).max(), (k, name)


def test_symmetry_improves_a_symmetric_set(tmp_path):
    vol = symmetric_phantom(BOX, PSIZE, "D2")
    sim = simulate(vol[None], PSIZE, 300, snr=0.05, seed=5)
    paths = write_simulation(tmp_path / "sim", sim)
    c1 = reconstruct(paths["cs"], tmp_path / "c1", progress=False)
    d2 = reconstruct(paths["cs"], tmp_path / "d2", progress=False, symmetry="D2")
    assert c1.layout == "alignments3D" and c1.n_classes == 1  # K = 1: classes from alignments3D
    f1, f2 = (fsc(_map(tmp_path / d, 0), vol) for d in ("c1", "d2"))
    band = slice(3, BOX // 2 - 2)
    assert f2[band].mean() > f1[band].mean() + 0.05, (f1.round(2), f2.round(2))
    assert d2.report["symmetry_order"] == 4


def test_new_box_and_mask(simset, vols, tmp_path):
    box = 24
    psize = PSIZE * BOX / box
    mask = np.zeros((box,) * 3, np.float32)
    mask[4:-4, 4:-4, 4:-4] = 1.0
    write_map(tmp_path / "mask.mrc", mask, psize)
    res = reconstruct(
        simset["store"],
        tmp_path / "b24",
        progress=False,
        box_size=box,
        force_hard_classification=True,
        mask=str(tmp_path / "mask.mrc"),
    )
    assert res.box == box and res.psize_A == pytest.approx(psize)
    v, p = read_map(tmp_path / "b24" / "class_1" / "map.mrc")
    assert v.shape == (box,) * 3 and p == pytest.approx(psize, rel=1e-5)
    truth = fourier_resize(vols[1], box, ndim=3)
    assert fsc(v, truth)[1 : box // 4 + 1].min() > 0.9
    assert (tmp_path / "b24" / "mask.mrc").is_file()
    assert "user" in res.classes[0]["fsc"]
    # a mask of another box or pixel size is refused
    with pytest.raises(ValueError, match="box"):
        reconstruct(
            simset["store"], tmp_path / "bad", progress=False, mask=str(tmp_path / "mask.mrc")
        )
    write_map(tmp_path / "mask2.mrc", mask, psize * 1.1)
    with pytest.raises(ValueError, match="pixel size"):
        reconstruct(
            simset["store"],
            tmp_path / "bad",
            progress=False,
            box_size=box,
            mask=str(tmp_path / "mask2.mrc"),
        )


def _bad(simset, name, edit):
    return _with_fields(simset["paths"]["cs"], simset["dir"] / name, edit)


def test_bad_inputs_are_refused_clearly(simset, tmp_path):
    def nan_post(t):
        t["alignments_class_1/class_posterior"][7] = np.nan

    with pytest.raises(ValueError, match="not finite"):
        reconstruct(_bad(simset, "nan.cs", nan_post), tmp_path / "o1", progress=False)

    def bad_sum(t):
        t["alignments_class_0/class_posterior"][:] = 0.5

    with pytest.raises(ValueError, match="sum to"):
        reconstruct(_bad(simset, "sum.cs", bad_sum), tmp_path / "o2", progress=False)
    with pytest.raises(ValueError, match="absent"):
        reconstruct(
            simset["store"], tmp_path / "o3", progress=False, class_prefix="alignments_class3D_"
        )
    with pytest.raises(ValueError, match="class_prefix"):
        reconstruct(simset["store"], tmp_path / "o4", progress=False, class_prefix="nonsense")

    from hetero_dask.io.cs import drop_fields

    table = drop_fields(
        read_cs(simset["paths"]["cs"]), ["alignments_class_2/pose", "alignments3D/pose"]
    )
    write_cs(simset["dir"] / "nopose.cs", table)
    with pytest.raises(ValueError, match="no poses for class 2"):
        reconstruct(simset["dir"] / "nopose.cs", tmp_path / "o5", progress=False)


def test_empty_class_warns_and_is_marked(simset, tmp_path):
    def no_class_2(t):
        t["alignments_class_0/class_posterior"] += t["alignments_class_2/class_posterior"]
        t["alignments_class_2/class_posterior"] = 0.0

    cs = _bad(simset, "empty.cs", no_class_2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = reconstruct(cs, tmp_path / "e", progress=False)
    assert any("class 2 received no particles" in str(w.message) for w in caught)
    report = json.loads((tmp_path / "e" / "report.json").read_text())
    assert report["classes"][2]["empty"] and report["classes"][2]["resolution_A"] == "inf"
    assert not report["classes"][0]["empty"]
    assert np.all(_map(tmp_path / "e", 2) == 0)
    assert res.classes[2]["weight_sum"] == 0


def test_cli(simset, tmp_path):
    from hetero_dask.cli import main

    rc = main(
        [
            "reconstruct",
            "--particles",
            str(simset["store"]),
            "--out",
            str(tmp_path / "cli"),
            "--hard",
            "--workers",
            "1",
            "--no-dashboard",
            "--box",
            "24",
        ]
    )
    assert rc == 0
    assert read_map(tmp_path / "cli" / "class_0" / "map.mrc")[0].shape == (24,) * 3


@pytest.mark.relion
def test_agrees_with_relion_reconstruct_per_class(vols, tmp_path):
    """Hard mode from the STAR's rlnClassNumber vs relion_reconstruct --class k (k 1-based).

    Nearly noise-free particles: relion_reconstruct divides without a Wiener
    prior, we regularise with the FSC prior; at high SNR the two must agree
    on everything else (conventions, CTF, shifts, gridding) to 0.7 Nyquist.
    """
    from hetero_dask.testing.relion import run

    sim = simulate(vols, PSIZE, PER_CLASS, snr=1000.0, seed=4, shift_range_px=2.0)
    write_simulation(tmp_path, sim, vols)
    out = tmp_path / "star"
    res = reconstruct(tmp_path / "particles.star", out, progress=False)
    assert res.layout == "alignments3D" and res.n_classes == K
    for k in range(K):
        run(
            [
                "relion_reconstruct",
                "--i",
                "particles.star",
                "--o",
                f"rel{k}.mrc",
                "--ctf",
                "--class",
                str(k + 1),
            ],
            cwd=tmp_path,
        )
        curve = fsc(_map(out, k), read_map(tmp_path / f"rel{k}.mrc")[0])
        assert curve[1 : int(0.7 * BOX / 2) + 1].min() > 0.9, (k, curve.round(3))


@pytest.mark.slow
@pytest.mark.relion
def test_box128_agrees_with_relion_to_nyquist(tmp_path):
    """Box 128, a map with content to ~0.9 Nyquist, shifts up to 6 px, astigmatic CTF.

    (The moving-domain phantoms have no power beyond ~shell 12 at box 128,
    so there two reconstructions only share noise and their FSC says nothing
    about conventions.) Same relion_project particles through the whole job
    (STAR import, rlnClassNumber) and relion_reconstruct: the maps must agree
    to 0.85 Nyquist, and be as close to the truth as RELION's.
    """
    from scipy.spatial.transform import Rotation

    from hetero_dask.core.fourier import lowpass
    from hetero_dask.core.masks import spherical_window
    from hetero_dask.core.rotations import matrix_to_euler
    from hetero_dask.testing.relion import relion_project, relion_reconstruct, write_relion_star

    n, P, psize = 128, 3000, 1.5
    rng = np.random.default_rng(3)
    vol = lowpass(rng.standard_normal((n, n, n)).astype(np.float32), 2.2, 1.0, 3)
    vol *= spherical_window(n, 0.5, 0.7)
    A = Rotation.random(P, random_state=3).as_matrix().transpose(0, 2, 1)
    euler = np.stack(matrix_to_euler(A), axis=1)
    dfu = rng.uniform(8000, 20000, P)
    defocus = np.stack([dfu, dfu - rng.uniform(0, 1000, P), rng.uniform(0, 180, P)], axis=1)
    star = write_relion_star(
        tmp_path / "in.star",
        euler,
        rng.uniform(-6, 6, (P, 2)) * psize,
        psize,
        n,
        defocus,
        extra_columns={"rlnClassNumber": np.ones(P, int)},
    )
    _, proj = relion_project(tmp_path, vol, psize, star, white_noise=0.5 * vol.std() * n)
    theirs, _ = relion_reconstruct(tmp_path, proj, psize)
    reconstruct(proj, tmp_path / "ours", progress=False)
    ours = _map(tmp_path / "ours", 0)
    mask = spherical_window(n, 0.9, 1.0)
    band = slice(1, int(0.85 * n / 2) + 1)
    assert fsc(ours, theirs, mask)[band].min() > 0.97
    assert fsc(ours, vol, mask)[band].mean() >= fsc(theirs, vol, mask)[band].mean() - 0.01


def test_partials_report_their_size_to_dask():
    """Dask places tasks by the bytes they would move: a partial must report its grids' size
    (the default for an unknown object is ~100 bytes, which made the scheduler ship 630 MB
    partials to run a select elsewhere)."""
    from dask.sizeof import sizeof

    from hetero_dask.jobs.mstep import empty_partial

    part = empty_partial(2, 32)
    grid_bytes = sum(g.data.nbytes + g.weight.nbytes for g in part.grids.values())
    assert grid_bytes > 1e6
    assert grid_bytes <= sizeof(part) <= grid_bytes + 10_000


def test_combine_sums_partials_into_its_first_input():
    """The engine's combine accumulates into its first input (no grid-sized allocation): the
    sums, weight sums and extras equal those of explicit copies merged."""
    import copy

    from hetero_dask.jobs.mstep import empty_partial, merge_partials
    from hetero_dask.runtime.engine import _combine

    rng = np.random.default_rng(2)
    parts = []
    for i in range(3):
        p = empty_partial(2, 16)
        for g in p.grids.values():
            g.data[...] = rng.standard_normal(g.data.shape) + 1j * rng.standard_normal(g.data.shape)
            g.weight[...] = rng.random(g.weight.shape)
        p.weight_sum[:] = [i + 1.0, 2.0 * i]
        p.n_particles = 10 * (i + 1)
        p.extra["stat"] = np.full(3, float(i + 1))
        parts.append(p)
    copies = copy.deepcopy(parts)
    first = parts[0].grids[(0, 0)].data
    got = _combine(merge_partials, *parts)
    assert got is parts[0] and got.grids[(0, 0)].data is first
    for key in got.grids:
        np.testing.assert_allclose(got.grids[key].data, sum(c.grids[key].data for c in copies), rtol=1e-6)
        np.testing.assert_allclose(got.grids[key].weight, sum(c.grids[key].weight for c in copies), rtol=1e-6)
    np.testing.assert_array_equal(got.weight_sum, [6.0, 6.0])
    np.testing.assert_array_equal(got.extra["stat"], [6.0, 6.0, 6.0])
    assert got.n_particles == 60


def test_random_halves_are_balanced_and_computed_per_range(simset):
    from hetero_dask.io.store import ParticleStore
    from hetero_dask.jobs.common import random_halves, split_rows

    store = ParticleStore.open(simset["store"])
    whole = split_rows(store, 0, store.n, None, seed=7)
    assert abs(int(whole.sum()) * 2 - store.n) <= 1  # halves differ by at most one particle
    # a task's rows alone give what the whole set gives: no (N,) array on a worker
    pieces = [split_rows(store, lo, min(lo + 37, store.n), None, 7) for lo in range(0, store.n, 37)]
    assert np.array_equal(np.concatenate(pieces), whole)
    # input rows 2j and 2j+1 in opposite halves; which one varies with j and with the seed
    rows = np.arange(100_000)
    h = random_halves(rows, 7)
    assert np.all(h[0::2] != h[1::2])
    assert 0.48 < (h[0::2] == 0).mean() < 0.52
    assert 0.48 < (h != random_halves(rows, 8)).mean() < 0.52
    assert np.array_equal(h, random_halves(rows, 7))


@pytest.mark.parametrize("prior", [False, True])
def test_mstep_without_the_full_map_changes_nothing_else(prior):
    """``mstep_class(full_map=False)`` returns the same half-maps, FSC and resolution, bit for
    bit, and refuses to be read for the full map it did not make (also for an empty class)."""
    import copy

    from hetero_dask.jobs.mstep import empty_partial, mstep_class

    rng = np.random.default_rng(5)
    part = empty_partial(2, 16, r_max=6.0)
    for g in part.grids.values():
        g.data[...] = rng.standard_normal(g.data.shape) + 1j * rng.standard_normal(g.data.shape)
        g.weight[...] = rng.random(g.weight.shape) + 0.5
    part.weight_sum[:] = [50.0, 0.0]
    kw = {"psize_A": 2.0, "fsc_prior": np.linspace(0.95, 0.0, 9) if prior else None}
    for k in range(2):
        whole = mstep_class(copy.deepcopy(part), k, **kw)
        halves = mstep_class(copy.deepcopy(part), k, full_map=False, **kw)
        assert whole.has_full_map and not halves.has_full_map
        assert whole.empty == halves.empty == (k == 1)
        assert k == 1 or np.abs(whole.vol_full).max() > 0
        for name in ("vol_A", "vol_B", "fsc", "fsc_prior"):
            np.testing.assert_array_equal(getattr(halves, name), getattr(whole, name))
        assert halves.resolution_A == whole.resolution_A and halves.weight_sum == whole.weight_sum
        with pytest.raises(ValueError, match="without its full map"):
            halves.vol_full  # noqa: B018

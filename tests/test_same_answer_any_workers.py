"""The same job gives the same answer on 1, 2 or 3 workers (regroup: 1 or 2).

Partitions (and so the groups that sum their grids, and the order of every float32
sum) are fixed by the data, never by the cluster, and per-particle randomness is
keyed by the particle. An online-EM run amplifies any round-off difference into
different classes within a few iterations, so the refine check is strict: the same
classes for every particle and bitwise-equal maps. Small partitions (64 particles)
make each batch span several tasks, so a worker-dependent layout would show.
"""

from __future__ import annotations

import numpy as np
import pytest
from distributed import Client, LocalCluster

import hetero_dask.io.store as store_module
import hetero_dask.jobs.refine.results as refine_results
from hetero_dask.core.align3d import shift_volume
from hetero_dask.io.cs import empty_table, read_cs, slot_fields, with_fields
from hetero_dask.io.mrc import read_map
from hetero_dask.io.store import ParticleStore
from hetero_dask.jobs.reconstruct import reconstruct
from hetero_dask.jobs.refine import refine
from hetero_dask.jobs.regroup import regroup
from hetero_dask.phantoms import moving_domain_phantoms
from hetero_dask.simulate import simulate, write_references, write_simulation

BOX, PSIZE = 32, 4.0
WORKERS = (1, 2, 3)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    d = tmp_path_factory.mktemp("workers")
    vols = moving_domain_phantoms(BOX, PSIZE, n_classes=2)
    sim = simulate(vols, PSIZE, 160, snr=0.1, seed=5, shift_range_px=1.0)
    write_simulation(d / "sim", sim, vols)
    refs = write_references(d, vols + 0.3 * vols.mean(0), PSIZE)  # blurred towards each other
    return d, str(d / "sim" / "particles.cs"), refs


def _on_workers(n: int, job):
    # Threads in one process start in a second; the partitioning, the sums and the
    # scheduling are those of any cluster of n single-threaded workers.
    with LocalCluster(n_workers=n, threads_per_worker=1, processes=False, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        return job(client)


def test_refine_same_classes_and_maps(dataset, monkeypatch):
    d, particles, refs = dataset
    monkeypatch.setattr(refine_results, "ALIGN", 32)
    monkeypatch.setattr(refine_results, "PARTITION_ROWS", 64)
    runs = {}
    for n in WORKERS:
        out = d / f"refine_{n}"
        report = _on_workers(n, lambda c, out=out: refine(
            particles, refs, out, client=c, progress=False, refine_box=BOX, batch_size_per_class=80,
            max_iterations=3, max_order=2, search_max_poses=8, backproject_poses=8, cache_dir="off"))
        cs = read_cs(out / "particles.cs")
        runs[n] = (report, np.asarray(cs["alignments3D_multi/class_posterior"]),
                   [read_map(out / f"class_{k}" / "map.mrc")[0] for k in range(2)])
    report1, post1, maps1 = runs[1]
    # a batch spans several tasks (what the test is about) and the run classified something
    assert max(h["particles"][1] - h["particles"][0] for h in report1["iterations"]) > 2 * 64
    assert 0.05 < post1.argmax(1).mean() < 0.95
    for n in WORKERS[1:]:
        report, post, maps = runs[n]
        assert [h["particles"] for h in report["iterations"]] == [h["particles"] for h in report1["iterations"]]
        np.testing.assert_array_equal(post.argmax(1), post1.argmax(1), err_msg=f"classes on {n} workers")
        np.testing.assert_array_equal(post, post1, err_msg=f"posteriors on {n} workers")
        for k in range(2):
            np.testing.assert_array_equal(maps[k], maps1[k], err_msg=f"class {k} map on {n} workers")


def test_reconstruct_same_maps(dataset, monkeypatch):
    d, particles, _ = dataset
    real = store_module.store_layout
    # stores of 64-particle chunks: partitions (whole chunks) of 64 particles
    monkeypatch.setattr(store_module, "store_layout",
                        lambda n, box, chunk_mb, shard_mb: real(n, box, 64 * 4 * box * box / 2**20, shard_mb))
    maps = {}
    for n in WORKERS:
        out = d / f"reconstruct_{n}"
        _on_workers(n, lambda c, out=out: reconstruct(particles, out, client=c, progress=False,
                                                      partition_rows=64, cache_dir="off"))
        maps[n] = [read_map(out / f"class_{k}" / "map.mrc")[0] for k in range(2)]
        assert ParticleStore.open(out / "particles.zarr").attrs["chunk_rows"] == 64
    for n in WORKERS[1:]:
        for k in range(2):
            np.testing.assert_array_equal(maps[n][k], maps[1][k], err_msg=f"class {k} map on {n} workers")


def test_regroup_same_superclasses_maps_and_poses(tmp_path):
    # Eight classes: two structures, each four times, moved by up to 2 px and noisy. With
    # these, pairs batched for 4 or 8 tasks (as they once were on 1 or 2 workers) get shifts
    # that differ in round-off, and so do the poses of the particles moved by them.
    rng = np.random.default_rng(2)
    structures = moving_domain_phantoms(BOX, PSIZE, n_classes=2)
    vols = np.stack([
        shift_volume(structures[k // 4], rng.uniform(-2, 2, 3))
        + 0.05 * rng.standard_normal((BOX,) * 3).astype(np.float32)
        for k in range(8)
    ]).astype(np.float32)
    labels = rng.permutation(np.repeat(np.arange(8), np.arange(12, 36, 3)))
    n = len(labels)
    fields = slot_fields("alignments3D/", n, pose=rng.normal(size=(n, 3)).astype(np.float32),
                         shift=rng.uniform(-2, 2, (n, 2)).astype(np.float32), psize_A=PSIZE)
    table = with_fields(empty_table(n), {**fields, "alignments3D/class": labels.astype(np.uint32)})
    runs = {}
    for w in (1, 2):
        out = tmp_path / f"regroup_{w}"
        res = _on_workers(w, lambda c, out=out: regroup(
            table, vols, out, volumes_psize_A=PSIZE, client=c, num_superclasses=2,
            align_pairs=True, max_shift_A=3 * PSIZE, mask_radius=0.9))
        runs[w] = (res, read_cs(out / "particles.cs"),
                   [read_map(out / f"superclass_{m}" / "map.mrc")[0] for m in range(2)])
    (res1, cs1, maps1), (res2, cs2, maps2) = runs[1], runs[2]
    # the copies of one structure group together
    assert len(set(res1.superclass[:4])) == len(set(res1.superclass[4:])) == 1
    assert res1.superclass[0] != res1.superclass[4]
    assert np.abs(cs1["alignments3D/shift"] - table["alignments3D/shift"]).max() > 0.1  # moved
    np.testing.assert_array_equal(res2.superclass, res1.superclass)
    np.testing.assert_array_equal(res2.correlation, res1.correlation)
    np.testing.assert_array_equal(cs2, cs1)
    for m in range(2):
        np.testing.assert_array_equal(maps2[m], maps1[m], err_msg=f"superclass {m} map on 2 workers")

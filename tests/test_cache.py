"""The particle cache: one import per dataset, shared by every job; stale, partial and
oversized stores never used; eviction; concurrent jobs.

Oracles: how often the particle stacks are read (ParticleSet.read_images,
counted), and the same job with the cache off (images imported into its own
output folder), which must give the same maps.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from hetero_dask.io import store as store_mod
from hetero_dask.io.cache import ParticleCache, image_key
from hetero_dask.io.cs import read_cs, write_cs
from hetero_dask.io.mrc import read_map, read_stack, write_stack
from hetero_dask.io.particles import load_particles
from hetero_dask.io.store import ParticleStore
from hetero_dask.jobs.reconstruct import reconstruct
from hetero_dask.phantoms import moving_domain_phantoms
from hetero_dask.simulate import simulate, write_simulation

BOX, PSIZE = 32, 4.0
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def simulation(tmp_path_factory):
    d = tmp_path_factory.mktemp("cache-sim")
    vols = moving_domain_phantoms(BOX, PSIZE, n_classes=2)
    sim = simulate(vols, PSIZE, 200, snr=10.0, seed=2, shift_range_px=1.0)
    write_simulation(d, sim, vols)
    return d


@pytest.fixture
def data(simulation, tmp_path):
    """A private copy of the simulation (tests may rewrite its stack)."""
    d = tmp_path / "data"
    shutil.copytree(simulation, d)
    return d


@pytest.fixture
def reads(monkeypatch):
    """Counts the images imported into stores (in this process; a job's contrast check
    reads a bounded sample besides, which is not an import)."""
    counter = {"images": 0}
    real = store_mod._block_task

    def counted(path, block, particles, read_rows, dest, *rest):
        counter["images"] += len(dest)
        return real(path, block, particles, read_rows, dest, *rest)

    monkeypatch.setattr(store_mod, "_block_task", counted)
    return counter


def job(cs, out, cache, **params):
    """Heterogeneous Reconstruction Only (hard classes from the simulation): its class maps."""
    reconstruct(cs, out, progress=False, force_hard_classification=True, cache_dir=str(cache),
                **params)
    return np.stack([read_map(Path(out) / f"class_{k}" / "map.mrc")[0] for k in range(2)])


def assert_same_maps(a, b, rtol=1e-5):
    err = float(np.abs(a - b).max() / np.abs(b).max())
    assert err < rtol, f"maps differ: {err:.2e}"


def entries(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.glob("*.zarr*"))


def test_second_job_reads_no_stack(data, tmp_path, reads):
    cache = tmp_path / "cache"
    first = job(data / "particles.cs", tmp_path / "a", cache)
    assert reads["images"] == 400
    second = job(data / "particles.cs", tmp_path / "b", cache)
    assert reads["images"] == 400, "the second job read the stacks again"
    assert_same_maps(second, first)
    assert len(entries(cache)) == 1
    for out in ("a", "b"):  # each job keeps only a view (metadata, order): no images
        assert not (tmp_path / out / "particles.zarr" / "images").exists()
    off = job(data / "particles.cs", tmp_path / "off", "off")
    assert reads["images"] == 800 and (tmp_path / "off" / "particles.zarr" / "images").is_dir()
    assert_same_maps(first, off)


def test_subset_and_other_seed_read_from_the_entry(data, tmp_path, reads):
    """A subset of the particles (another file, rows reordered) and another seed: no import."""
    cache = tmp_path / "cache"
    job(data / "particles.cs", tmp_path / "full", cache)
    table = read_cs(data / "particles.cs")
    rows = np.random.default_rng(0).permutation(len(table))[:250]
    write_cs(data / "subset.cs", table[rows])
    n = reads["images"]
    subset = job(data / "subset.cs", tmp_path / "subset", cache)
    reseeded = job(data / "particles.cs", tmp_path / "seed7", cache, random_seed=7)
    assert reads["images"] == n, "the subset or the other seed was imported again"
    assert len(entries(cache)) == 1
    assert (tmp_path / "subset" / "particles.zarr" / "image_rows").is_dir()
    store = ParticleStore.open(tmp_path / "subset" / "particles.zarr")
    alone = load_particles(data / "subset.cs").read_images(store.original_index)
    np.testing.assert_array_equal(store.images(), alone)  # the subset's own images, its order
    assert_same_maps(subset, job(data / "subset.cs", tmp_path / "subset_off", "off"))
    assert_same_maps(reseeded, job(data / "particles.cs", tmp_path / "seed7_off", "off",
                                   random_seed=7))


def test_changed_stack_is_never_used(data, tmp_path, reads):
    from hetero_dask.jobs.common import open_particle_store

    cache = tmp_path / "cache"
    before = job(data / "particles.cs", tmp_path / "a", cache)
    stale = entries(cache)
    stack = data / "particles.mrcs"
    images = read_stack(stack)
    write_stack(stack, np.ascontiguousarray(images[:, ::-1]), PSIZE)  # same size, new content
    n = reads["images"]
    other = job(data / "particles.cs", tmp_path / "b", cache)
    assert reads["images"] == n + 400, "the changed stack was not imported again"
    fresh = job(data / "particles.cs", tmp_path / "off", "off")
    assert_same_maps(other, fresh)
    assert np.abs(other - before).max() > 0.1 * np.abs(before).max()
    assert not set(stale) & set(entries(cache)), "the stale entry was kept"
    # the first job's store (a view of the stale entry) is not reused for its folder either
    again = open_particle_store(data / "particles.cs", tmp_path / "a", cache_dir=str(cache),
                                progress=False)
    np.testing.assert_array_equal(again.images(), ParticleStore.open(tmp_path / "b" / "particles.zarr").images())


def test_interrupted_import_is_never_used(data, tmp_path, monkeypatch):
    cache = tmp_path / "cache"

    def crash(*args):
        raise RuntimeError("simulated crash while reading the stacks")

    with monkeypatch.context() as m:
        m.setattr(store_mod, "_block_task", crash)
        with pytest.raises(RuntimeError, match="simulated crash"):
            job(data / "particles.cs", tmp_path / "a", cache)
    (partial,) = entries(cache)
    assert partial.endswith(".zarr.partial")
    with pytest.raises(ValueError, match="incomplete"):
        ParticleStore.open(cache / partial)
    pset = load_particles(data / "particles.cs")
    assert ParticleCache(cache)._lease_entry(image_key(pset, 0)) is None
    resumed = job(data / "particles.cs", tmp_path / "a", cache)
    assert entries(cache) == [partial.removesuffix(".partial")]
    assert_same_maps(resumed, job(data / "particles.cs", tmp_path / "off", "off"))


def test_view_whose_entry_is_gone(data, tmp_path, reads):
    """Opening it names the problem; the job's store opened again imports the images again."""
    from hetero_dask.jobs.common import open_particle_store

    cache = tmp_path / "cache"
    first = open_particle_store(data / "particles.cs", tmp_path / "a", cache_dir=str(cache),
                                progress=False)
    images = first.images()
    del first  # its lease
    (entry,) = cache.glob("*.zarr")
    shutil.rmtree(entry)
    with pytest.raises(FileNotFoundError, match="evicted"):
        ParticleStore.open(tmp_path / "a" / "particles.zarr")
    again = open_particle_store(data / "particles.cs", tmp_path / "a", cache_dir=str(cache),
                                progress=False)
    np.testing.assert_array_equal(again.images(), images)
    assert reads["images"] == 800


def test_refine_regroup_reconstruct_import_once(data, tmp_path, reads):
    from hetero_dask.jobs.refine import refine
    from hetero_dask.jobs.regroup import regroup
    from hetero_dask.simulate import write_references

    cache = tmp_path / "cache"
    vols = moving_domain_phantoms(BOX, PSIZE, n_classes=2)
    refs = write_references(tmp_path / "refs", np.stack([vols[0], vols[1], vols.mean(0)]), PSIZE)
    refine(data / "particles.cs", refs, tmp_path / "refine", progress=False, cache_dir=str(cache),
           refine_box=BOX, batch_size_per_class=100, max_iterations=3, num_random_iterations=0,
           max_order=2, final_full_passes=2)  # two passes keep all three classes populated for regroup
    assert reads["images"] == 400
    regroup(tmp_path / "refine" / "particles.cs", tmp_path / "refine" / "volumes.zip",
            tmp_path / "regroup", num_superclasses=2)
    reconstruct(tmp_path / "regroup" / "particles.cs", tmp_path / "reconstruct", progress=False,
                force_hard_classification=True, stack_dir=str(data), cache_dir=str(cache))
    assert reads["images"] == 400, "reconstruct imported the particles again"
    assert len(entries(cache)) == 1
    assert (tmp_path / "reconstruct" / "class_1" / "map.mrc").is_file()


def test_eviction_least_recently_used_unless_in_use(data, tmp_path, monkeypatch):
    """Cap of 2.5 entries: a third import evicts the least recently used entry not in use."""
    from hetero_dask.jobs.common import open_particle_store

    cache = tmp_path / "cache"
    table = read_cs(data / "particles.cs")
    files = {}
    for name, sel in (("a", slice(0, 200)), ("b", slice(100, 300)), ("c", slice(200, 400))):
        # overlapping rows, but none a subset of another: three entries
        files[name] = data / f"{name}.cs"
        write_cs(files[name], table[sel])
    held = open_particle_store(files["a"], tmp_path / "ja", cache_dir=str(cache), progress=False)
    (entry,) = cache.glob("*.zarr")
    entry_bytes = sum(f.stat().st_size for f in entry.rglob("*") if f.is_file())
    monkeypatch.setenv("HETERO_DASK_CACHE_MAX_GB", str(2.5 * entry_bytes / 1e9))
    job(files["b"], tmp_path / "jb", cache)
    job(files["c"], tmp_path / "jc", cache)  # over the cap: b goes (a is in use)
    keys = {n: image_key(load_particles(f), 0) for n, f in files.items()}
    assert {e.split(".")[0] for e in entries(cache)} == {keys["a"], keys["c"]}
    del held
    job(files["b"], tmp_path / "jb2", cache)  # a is least recently used and free now
    assert {e.split(".")[0] for e in entries(cache)} == {keys["b"], keys["c"]}


def test_over_the_cap_imports_into_the_job_folder(data, tmp_path, monkeypatch, reads):
    monkeypatch.setenv("HETERO_DASK_CACHE_MAX_GB", "1e-6")
    with pytest.warns(UserWarning, match="exceed the particle cache's cap"):
        job(data / "particles.cs", tmp_path / "a", tmp_path / "cache")
    assert (tmp_path / "a" / "particles.zarr" / "images").is_dir()
    assert entries(tmp_path / "cache") == []


CONCURRENT = textwrap.dedent("""
    import json, sys
    import numpy as np
    from hetero_dask.io import store
    from hetero_dask.jobs.reconstruct import reconstruct
    real = store._block_task
    count = [0]
    def counted(path, block, particles, read_rows, dest, *rest):
        count[0] += len(dest)
        return real(path, block, particles, read_rows, dest, *rest)
    store._block_task = counted
    reconstruct(sys.argv[1], sys.argv[2], progress=False, force_hard_classification=True,
                cache_dir=sys.argv[3])
    print(json.dumps(count[0]))
""")


def test_concurrent_jobs_import_once(data, tmp_path):
    cache = tmp_path / "cache"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    procs = [
        subprocess.Popen([sys.executable, "-c", CONCURRENT, str(data / "particles.cs"),
                          str(tmp_path / out), str(cache)], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for out in ("a", "b")
    ]
    counts = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
        counts.append(json.loads(out.strip().splitlines()[-1]))
    assert sorted(counts) == [0, 400], f"images read per job: {counts}"
    assert len(entries(cache)) == 1
    a = read_map(tmp_path / "a" / "class_0" / "map.mrc")[0]
    b = read_map(tmp_path / "b" / "class_0" / "map.mrc")[0]
    assert_same_maps(a, b)


def test_cli_cache_dir_flag_and_environment(data, tmp_path, monkeypatch):
    from hetero_dask.cli import main

    flag, env = tmp_path / "flag", tmp_path / "env"
    monkeypatch.setenv("HETERO_DASK_CACHE", str(env))
    args = ["reconstruct", "--particles", str(data / "particles.cs"), "--hard", "--workers", "1"]
    assert main([*args, "--out", str(tmp_path / "a"), "--cache-dir", str(flag)]) == 0
    assert len(entries(flag)) == 1 and not env.exists()
    assert main([*args, "--out", str(tmp_path / "b")]) == 0
    assert len(entries(env)) == 1


def test_refine_command_passes_the_cache_dir(tmp_path, monkeypatch):
    from hetero_dask.cli import main
    from hetero_dask.commands import refine as command

    seen = {}

    def fake_refine(*args, **kwargs):
        seen.update(kwargs)
        return {"classes": []}

    monkeypatch.setattr(command, "refine", fake_refine)
    assert main(["refine", "--particles", "p.cs", "--volumes", "a.mrc", "b.mrc", "--out",
                 str(tmp_path), "--cache-dir", "off", "--workers", "1", "--quiet"]) == 0
    assert seen["cache_dir"] == "off"

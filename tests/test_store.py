"""Zarr particle store: round trips, order, crops, resumable and interruption-safe import."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from hetero_dask.core.fourier import fourier_resize
from hetero_dask.io.store import ParticleStore, import_particles, is_store, store_layout
from hetero_dask.phantoms import moving_domain_phantoms
from hetero_dask.simulate import simulate, simulation_table

BOX, PSIZE = 32, 4.0
# tiny chunks/shards so a few hundred particles span several shards
SMALL = {"chunk_mb": 8 * 4 * BOX * BOX / 2**20, "shard_mb": 40 * 4 * BOX * BOX / 2**20}


class MemoryParticles:
    """A ParticleSet held in memory (``.table``, ``.box``, ``.psize_A``, ``.read_images``)."""

    def __init__(self, images, table, psize_A, fail_on=None):
        self.images, self.table, self.psize_A = images, table, psize_A
        self.n, self.box = len(table), images.shape[-1]
        self.fail_on = fail_on  # raise when asked for this input index (a simulated crash)
        self.calls = 0

    def read_images(self, indices):
        self.calls += 1
        if self.fail_on is not None and self.fail_on in set(np.asarray(indices).tolist()):
            raise RuntimeError("simulated crash while reading a shard")
        return self.images[np.asarray(indices)]


@pytest.fixture(scope="module")
def particles():
    vols = moving_domain_phantoms(BOX, PSIZE, n_classes=2)
    sim = simulate(vols, PSIZE, 150, snr=1.0, seed=1, shift_range_px=2)
    table = simulation_table(sim)
    # a multi-dimensional bytes field and a big-endian field exercise the column encoding
    extra = np.zeros(sim.n, dtype=table.dtype.descr + [("x/tags", "S3", (2,)), ("x/be", ">f8")])
    for name in table.dtype.names:
        extra[name] = table[name]
    extra["x/tags"] = [[b"a%d" % (i % 10), b"bcd"] for i in range(sim.n)]
    extra["x/be"] = np.linspace(-1, 1, sim.n)
    return MemoryParticles(sim.images, extra, PSIZE)


def test_layout_rule():
    # box 128: 64 KiB images, 2 MiB chunks -> 32 images, 128 MiB shards -> 2048 images
    assert store_layout(100_000, 128) == (32, 2048)
    assert store_layout(100, 128) == (32, 128)  # capped at what N needs
    assert store_layout(5, 512) == (2, 6)  # 1 MiB images: 2 per chunk
    with pytest.raises(ValueError, match="0 particles"):
        store_layout(0, 64)


def test_round_trip_values_images_and_order(particles, tmp_path):
    st = import_particles(
        particles, tmp_path / "s.zarr", seed=5, crop_boxes=[16], progress=False, **SMALL
    )
    assert (st.n, st.box, st.psize_A, st.seed) == (300, BOX, PSIZE, 5)
    assert st.shard_rows == 40 and len(st.shard_ranges()) == 8
    orig = st.original_index
    assert sorted(orig.tolist()) == list(range(300)) and not np.array_equal(orig, np.arange(300))
    assert np.array_equal(orig, np.random.default_rng(5).permutation(300))
    # every field keeps its dtype and every value, in input order
    t = st.table()
    assert t.dtype == particles.table.dtype
    back = st.to_input_order(t)
    assert back.tobytes() == particles.table.tobytes()
    # images: store row i is input particle orig[i]; bit-exact
    assert np.array_equal(st.images(), particles.images[orig])
    assert np.array_equal(st.to_input_order(st.images()), particles.images)
    assert np.array_equal(st.to_store_order(particles.images), st.images())
    # a range read equals the same rows of the table
    assert st.table(50, 90).tobytes() == t[50:90].tobytes()
    assert np.array_equal(st.column("ctf/df1_A", 10, 20), particles.table["ctf/df1_A"][orig[10:20]])
    ctf = st.ctf(3, 9)
    assert np.array_equal(ctf.df2_A, particles.table["ctf/df2_A"][orig[3:9]])
    assert ctf.df1_A.shape == (6,)
    # crops: Fourier-cropped copies at the stored box, on-the-fly for others
    crop = st.images_at_box(16, 0, 40)
    assert np.allclose(crop, fourier_resize(particles.images[orig[:40]], 16, ndim=2), atol=1e-5)
    assert st.images_at_box(24, 0, 3).shape == (3, 24, 24)
    assert st.psize_at_box(16) == pytest.approx(2 * PSIZE)
    # ... all read straight from the shard files (io.shard_reader), not through zarr
    assert all(type(r).__name__ == "ShardRowReader" for r in st._readers.values())
    assert set(st._readers) == {"images", "images_16"}


def test_shard_ranges_cover_and_align(particles, tmp_path):
    st = import_particles(particles, tmp_path / "s.zarr", progress=False, **SMALL)
    r = st.shard_ranges(min_rows=100)  # 3 shards of 40 per range
    assert r == [(0, 120), (120, 240), (240, 300)]
    assert all(a % st.shard_rows == 0 for a, _ in r)


def test_dask_import_equals_serial_import(particles, tmp_path):
    from distributed import Client, LocalCluster

    from hetero_dask.io.cs import write_cs
    from hetero_dask.io.mrc import write_stack

    # the same particles as files: a ParticleSet is cut per shard instead of broadcast
    write_stack(tmp_path / "particles.mrcs", particles.images, PSIZE)
    write_cs(tmp_path / "p.cs", particles.table)
    kw = dict(seed=2, crop_boxes=[16], progress=False, **SMALL)
    serial = import_particles(particles, tmp_path / "a.zarr", **kw)
    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
    ) as lc:
        with Client(lc) as client:
            par = import_particles(particles, tmp_path / "b.zarr", client=client, **kw)
            files = import_particles(tmp_path / "p.cs", tmp_path / "c.zarr", client=client, **kw)
    for st in (par, files):
        assert np.array_equal(st.images(), serial.images())
        assert np.array_equal(st.images_at_box(16), serial.images_at_box(16))
        assert st.table().tobytes() == serial.table().tobytes()


def test_resume_after_crash_and_completion_marker(particles, tmp_path):
    out = tmp_path / "s.zarr"
    clean = import_particles(particles, tmp_path / "clean.zarr", seed=9, progress=False, **SMALL)
    # input particle 163 is in the 5th import block (a shard's worth of input rows each, in
    # file order, which is input order for this source; blocks start in order)
    bad = MemoryParticles(particles.images, particles.table, PSIZE, fail_on=4 * clean.shard_rows + 3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        import_particles(bad, out, seed=9, progress=False, **SMALL)
    assert not out.exists()
    with pytest.raises(ValueError, match="re-run `hetero-dask import`"):
        ParticleStore.open(out)
    partial = tmp_path / "s.zarr.partial"
    assert is_store(partial)
    with pytest.raises(ValueError, match="incomplete"):
        ParticleStore.open(partial)
    # re-run: only the unfinished blocks (the 5th, and those not started: blocks run on one
    # thread per core) are read again, and the result equals a clean import
    done = zarr.open_group(str(partial), mode="r")["import_done"][:]
    assert done[:4].all() and not done[4]
    done = int(done.sum())
    good = MemoryParticles(particles.images, particles.table, PSIZE)
    st = import_particles(good, out, seed=9, progress=False, **SMALL)
    assert good.calls == len(clean.shard_ranges()) - done
    assert not partial.exists()
    assert np.array_equal(st.images(), clean.images())
    assert st.table().tobytes() == clean.table().tobytes()
    assert np.array_equal(st.original_index, clean.original_index)
    # importing the same input again returns the complete store without reading anything
    again = MemoryParticles(particles.images, particles.table, PSIZE)
    assert import_particles(again, out, seed=9, progress=False, **SMALL).n == st.n
    assert again.calls == 0


def test_interrupted_reimport_keeps_previous_store(particles, tmp_path):
    out = tmp_path / "s.zarr"
    first = import_particles(particles, out, seed=1, progress=False, **SMALL)
    before = first.images()
    bad = MemoryParticles(
        particles.images, particles.table, PSIZE, fail_on=int(first.original_index[0])
    )
    with pytest.raises(RuntimeError):
        import_particles(bad, out, seed=3, progress=False, **SMALL)
    again = ParticleStore.open(out)  # still the complete first store
    assert again.seed == 1 and np.array_equal(again.images(), before)
    # a different seed rebuilds (the stale partial from seed 3 is discarded) and replaces it
    st = import_particles(particles, out, seed=3, progress=False, **SMALL)
    assert st.seed == 3 and np.array_equal(st.to_input_order(st.images()), particles.images)


def test_refuses_bad_input(particles, tmp_path):
    imgs = particles.images.copy()
    imgs[7, 3, 3] = np.nan
    with pytest.raises(ValueError, match=r"particle 7 .*NaN or inf"):
        import_particles(
            MemoryParticles(imgs, particles.table, PSIZE), tmp_path / "n.zarr", progress=False
        )
    (tmp_path / "other").mkdir()
    with pytest.raises(ValueError, match="not a hetero_dask particle store"):
        import_particles(particles, tmp_path / "other", progress=False)
    with pytest.raises(ValueError, match="crop box 64"):
        import_particles(particles, tmp_path / "c.zarr", crop_boxes=[64], progress=False)
    with pytest.raises(FileNotFoundError):
        ParticleStore.open(tmp_path / "missing.zarr")


# ---------------------------------------------------------------- real and simulated files


def _stack_images(path, idx):
    import warnings

    import mrcfile

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # relion31.mrcs lacks the MAP id
        with mrcfile.mmap(path, mode="r", permissive=True) as m:
            return np.asarray(m.data[np.asarray(idx)], dtype=np.float32)


@pytest.mark.parametrize("name", ["relion31.star", "sample_particles_relion31.star"])
def test_star_store_star_keeps_every_value(shared_data, tmp_path, name):
    from hetero_dask.io.convert import cs_to_star
    from hetero_dask.io.particles import load_particles
    from hetero_dask.io.star import read_star, write_star

    src = shared_data / "relion" / name
    st = import_particles(src, tmp_path / "s.zarr", progress=False)
    table = st.to_input_order(st.table())
    assert table.tobytes() == load_particles(src).table.tobytes()
    write_star(tmp_path / "back.star", cs_to_star(table))
    a, b = read_star(src), read_star(tmp_path / "back.star")
    for block in ("optics", "particles"):
        for col in a[block].columns:
            x, y = a[block][col].to_numpy(), b[block][col].to_numpy()
            if x.dtype.kind in "fiu":
                assert np.allclose(x, y.astype(np.float64), rtol=1e-6, atol=1e-6), col
            else:
                assert (x.astype(str) == y.astype(str)).all(), col
    # images: RELION stacks hold positive density (blob/sign = +1), 1-based rlnImageName
    names = a["particles"]["rlnImageName"].str.split("@")
    for i in range(st.n):
        k, stack = int(names.iloc[i][0]) - 1, names.iloc[i][1]
        want = _stack_images(src.parent / stack, [k])[0]
        assert np.array_equal(st.to_input_order(st.images())[i], want)


def test_cs_store_cs_keeps_every_value_and_sign(shared_data, tmp_path):
    from hetero_dask.io.cs import read_cs, write_cs

    src = shared_data / "cryosparc" / "empiar_10076_7.cs"
    st = import_particles(
        src, tmp_path / "s.zarr", stack_dir=shared_data / "relion", progress=False
    )
    write_cs(tmp_path / "back.cs", st.to_input_order(st.table()))
    assert read_cs(tmp_path / "back.cs").tobytes() == read_cs(src).tobytes()
    t = read_cs(src)
    raw = _stack_images(shared_data / "relion" / "empiar_10076_7.mrc", t["blob/idx"])
    assert (t["blob/sign"] == -1).all()
    assert np.array_equal(st.to_input_order(st.images()), -raw)


def test_simulated_files_through_the_store(tmp_path):
    from hetero_dask.io.cs import read_cs, write_cs
    from hetero_dask.simulate import write_simulation

    vols = moving_domain_phantoms(BOX, PSIZE, n_classes=2)
    sim = simulate(vols, PSIZE, 40, snr=2.0, seed=3, shift_range_px=2)
    paths = write_simulation(tmp_path / "sim", sim, vols)
    for key in ("cs", "star"):
        st = import_particles(paths[key], tmp_path / f"{key}.zarr", seed=4, progress=False)
        assert np.array_equal(st.to_input_order(st.images()), sim.images)
        assert np.array_equal(st.to_input_order(st.column("alignments3D/class")), sim.classes)
        assert np.allclose(
            st.to_input_order(st.column("alignments3D/shift")), sim.shifts_px, atol=1e-5
        )
        assert np.allclose(st.to_input_order(st.ctf().df1_A), sim.ctf.df1_A, rtol=1e-6)
    cs_store = ParticleStore.open(tmp_path / "cs.zarr")
    write_cs(tmp_path / "back.cs", cs_store.to_input_order(cs_store.table()))
    assert read_cs(tmp_path / "back.cs").tobytes() == read_cs(paths["cs"]).tobytes()


def test_cli_simulate_and_import(tmp_path):
    from hetero_dask.cli import main

    out = tmp_path / "sim"
    assert (
        main(["simulate", "--n-per-class", "20", "--snr", "1", "--out", str(out), "--box", "32"])
        == 0
    )
    truth = np.load(out / "truth.npz", allow_pickle=False)
    assert truth["class"].shape == (60,) and truth["pose"].shape == (60, 3)
    rc = main(
        [
            "import",
            "--particles",
            str(out / "particles.star"),
            "--out",
            str(tmp_path / "s.zarr"),
            "--serial",
            "--quiet",
            "--crop-box",
            "16",
            "--seed",
            "7",
        ]
    )
    assert rc == 0
    st = ParticleStore.open(tmp_path / "s.zarr")
    assert (st.n, st.box, st.crop_boxes, st.seed) == (60, 32, [16], 7)
    assert (
        main(
            [
                "import",
                "--particles",
                str(out / "missing.star"),
                "--out",
                str(tmp_path / "x.zarr"),
                "--serial",
                "--quiet",
            ]
        )
        == 2
    )


def test_ensure_store_opens_or_imports(shared_data, tmp_path):
    from hetero_dask.io.store import ensure_store

    src = shared_data / "relion" / "relion31.star"
    st = ensure_store(src, tmp_path / "job")
    assert st.path == tmp_path / "job" / "particles.zarr" and st.n == 5
    assert ensure_store(st.path, tmp_path / "elsewhere").path == st.path

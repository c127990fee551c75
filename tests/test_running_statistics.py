"""Refine's running M-step statistics: kept in the worker's memory for the next M-step, the file
(the checkpoint's record) read when the copy is gone or the file changed, same results either way."""

import copy

import numpy as np
import pytest

from hetero_dask.jobs.mstep import empty_partial
from hetero_dask.jobs.refine import tasks
from hetero_dask.jobs.refine.state import grids_file
from hetero_dask.runtime.kept import Kept

N, R = 16, 6.0


def _partial(seed: int):
    part = empty_partial(1, N, 2, r_max=R)
    rng = np.random.default_rng(seed)
    for g in part.grids.values():
        g.data[...] = rng.standard_normal(g.data.shape) + 1j * rng.standard_normal(g.data.shape)
        g.weight[...] = rng.random(g.weight.shape) + 0.5
    part.weight_sum[:] = 50.0
    return part


def _mstep(run_dir, iteration, prev, part):
    return tasks.mstep_task(copy.deepcopy(part), 0, str(run_dir), iteration, prev, 0.8, R, None, 0.5, 2.0, None,
                            full_map=False)


@pytest.fixture
def running(monkeypatch):
    kept = Kept()
    monkeypatch.setattr(tasks, "KEPT", kept)
    return kept


def _no_file_reads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the running statistics were read back from the file")

    monkeypatch.setattr(tasks.np, "load", refuse)


def test_next_mstep_takes_the_kept_statistics_and_gets_the_files_result(tmp_path, running, monkeypatch):
    first, second = _partial(0), _partial(1)
    _mstep(tmp_path, 0, None, first)
    with monkeypatch.context() as m:
        _no_file_reads(m)
        kept = _mstep(tmp_path, 1, 0, second)
    running.clear()  # as on another worker, or after a resume
    read = _mstep(tmp_path / "again", 0, None, first)
    running.clear()
    read = _mstep(tmp_path / "again", 1, 0, second)
    np.testing.assert_array_equal(kept.vol_A, read.vol_A)
    np.testing.assert_array_equal(kept.vol_B, read.vol_B)
    np.testing.assert_array_equal(kept.fsc, read.fsc)
    with np.load(grids_file(str(tmp_path), 1, 0)) as f, np.load(grids_file(str(tmp_path / "again"), 1, 0)) as g:
        for name in f.files:
            np.testing.assert_array_equal(f[name], g[name])


def test_a_rewritten_file_is_read_not_the_kept_copy(tmp_path, running):
    """Another run in the same folder (or another worker) rewrote the file: its content counts."""
    def rewrite(run_dir):
        path = grids_file(str(run_dir), 0, 0)
        np.savez(path.with_name("other.npz"), **other)
        path.with_name("other.npz").replace(path)

    _mstep(tmp_path / "a", 0, None, _partial(0))
    with np.load(grids_file(str(tmp_path / "a"), 0, 0)) as f:
        other = {name: f[name] * (2 if name != "r_max" else 1) for name in f.files}
    rewrite(tmp_path / "a")
    got = _mstep(tmp_path / "a", 1, 0, _partial(1))

    running.clear()  # the same files, nothing kept
    _mstep(tmp_path / "b", 0, None, _partial(0))
    rewrite(tmp_path / "b")
    running.clear()
    read = _mstep(tmp_path / "b", 1, 0, _partial(1))
    np.testing.assert_array_equal(got.vol_A, read.vol_A)

    running.clear()  # and the kept copy would have given another answer
    _mstep(tmp_path / "c", 0, None, _partial(0))
    stale = _mstep(tmp_path / "c", 1, 0, _partial(1))
    assert not np.array_equal(stale.vol_A, got.vol_A)


def test_kept_arrays_are_read_only_and_bounded(tmp_path):
    kept = Kept(max_bytes=3000)
    small = {"a": np.zeros(200, np.float32)}  # 800 bytes
    for i in range(5):
        kept.write(tmp_path / f"s{i}.npz", {"a": np.full(200, i, np.float32)})
    assert len(kept._kept) == 3  # 2400 of 3000 bytes: the two oldest dropped
    assert kept.read(tmp_path / "s4.npz")["a"][0] == 4
    with pytest.raises(ValueError):
        kept.read(tmp_path / "s3.npz")["a"][0] = 1.0
    kept.write(tmp_path / "big.npz", {"a": np.zeros(1000, np.float32)})  # over the cap: file only
    assert str(tmp_path / "big.npz") not in kept._kept
    assert np.load(tmp_path / "big.npz")["a"].shape == (1000,)
    assert small["a"].flags.writeable


@pytest.mark.parametrize("symmetric", [False, True])
def test_kept_references_are_rebuilt_equal_from_the_statistics(tmp_path, running, symmetric):
    """The half maps an M-step keeps (the next references) and their rebuild from the running
    statistics it wrote (a lost worker's, another process's) are the same arrays."""
    from hetero_dask.core.symmetry import symmetry_group

    ops = symmetry_group("C2") if symmetric else None
    prior = np.linspace(0.99, 0.0, N // 2 + 1)
    tasks.mstep_task(copy.deepcopy(_partial(0)), 0, str(tmp_path), 0, None, 0.8, R, ops, 0.5, 2.0, prior,
                     full_map=False)
    kept = tasks.mstep_task(copy.deepcopy(_partial(1)), 0, str(tmp_path), 1, 0, 0.8, R, ops, 0.5, 2.0, prior,
                            full_map=False, keep="refs")
    assert kept.result.vol_A is None and kept.worker is None
    maps = running.take("refs")
    assert maps.shape == (2, N, N, N) and np.abs(maps).max() > 0
    running.clear()  # another process: the statistics from the file
    np.testing.assert_array_equal(kept.rebuild(), maps)
    plain = tasks.mstep_task(copy.deepcopy(_partial(1)), 0, str(tmp_path / "again"), 1, None, 0.8, R, ops, 0.5, 2.0,
                             prior, full_map=False)
    assert not np.array_equal(plain.vol_A, maps[0])  # the decayed statistics made them

"""The refine driver's checkpoint writer: a snapshot written in a thread, in order, errors raised."""

import threading

import numpy as np
import pytest

from hetero_dask.jobs.refine import state as refine_state
from hetero_dask.jobs.refine.state import CheckpointWriter, State, restore_state
from hetero_dask.runtime import checkpoint as ckpt


def _state(iteration: int) -> State:
    return State(iteration=iteration, volumes=np.full((2, 2, 4, 4, 4), float(iteration), np.float32),
                 sigma2=np.ones(3), class_prior=np.array([0.5, 0.5]), resolution_A=np.array([9.0, 9.0]),
                 history=[{"iteration": i} for i in range(iteration)])


def test_written_state_is_the_one_at_write_time_and_resumable(tmp_path, monkeypatch):
    gate, real_checkpoint = threading.Event(), refine_state.checkpoint

    def gated(run_dir, state):  # the write starts only after the driver has moved on
        assert gate.wait(10)
        real_checkpoint(run_dir, state)

    monkeypatch.setattr(refine_state, "checkpoint", gated)
    writer = CheckpointWriter(tmp_path)
    state = _state(2)
    writer.write(state)
    # what the driver does next, while the write runs
    state.history.append({"iteration": 2})
    state.volumes = np.zeros_like(state.volumes)
    state.iteration = 3
    gate.set()
    writer.wait()
    back = restore_state(ckpt.load_latest(tmp_path))
    assert back.iteration == 2 and len(back.history) == 2
    assert np.all(back.volumes == 2.0)
    assert ckpt.read_status(tmp_path)["iteration"] == 2


def test_writes_run_one_at_a_time_in_order(tmp_path, monkeypatch):
    started, release, order = threading.Event(), threading.Event(), []

    def slow_checkpoint(run_dir, state):
        order.append(("start", state.iteration))
        if state.iteration == 1:
            started.set()
            assert release.wait(10)
        order.append(("end", state.iteration))

    monkeypatch.setattr(refine_state, "checkpoint", slow_checkpoint)
    writer = CheckpointWriter(tmp_path)
    writer.write(_state(1))
    assert started.wait(10)
    threading.Timer(0.2, release.set).start()
    writer.write(_state(2))  # waits for the first
    writer.wait()
    assert order == [("start", 1), ("end", 1), ("start", 2), ("end", 2)]


def test_a_failed_write_is_raised_by_the_next_wait_once(tmp_path, monkeypatch):
    def full_disk(run_dir, state):
        raise ckpt.CheckpointWriteError(28, "No space left on device", str(run_dir))

    monkeypatch.setattr(refine_state, "checkpoint", full_disk)
    writer = CheckpointWriter(tmp_path)
    writer.write(_state(1))  # returns: the write runs in its thread
    with pytest.raises(ckpt.CheckpointWriteError):
        writer.wait()
    writer.wait()  # reported once
    writer.write(_state(2))
    with pytest.raises(ckpt.CheckpointWriteError):
        writer.write(_state(3))  # the next write reports the one before
    writer.wait(raise_error=False)


def test_references_kept_on_the_workers_are_checkpointed_rebuilt(tmp_path):
    """An iteration whose M-steps kept their maps on the workers (state.volumes None): the
    checkpoint holds the maps rebuilt from the running statistics, equal to the kept ones."""
    from hetero_dask.jobs.mstep import empty_partial
    from hetero_dask.jobs.refine.tasks import mstep_task
    from hetero_dask.runtime.kept import KEPT

    rng = np.random.default_rng(0)
    part = empty_partial(2, 8, 2, r_max=3.0)
    for g in part.grids.values():
        g.data[...] = rng.standard_normal(g.data.shape) + 1j * rng.standard_normal(g.data.shape)
        g.weight[...] = rng.random(g.weight.shape) + 0.5
    part.weight_sum[:] = 10.0
    kept = tuple(mstep_task(part, k, str(tmp_path), 0, None, 0.0, 3.0, None, 0.5, 2.0, None, full_map=False,
                            keep=f"test-class{k}") for k in range(2))
    maps = np.stack([KEPT.take(r.key) for r in kept])  # as in a driver whose workers kept them
    state = _state(1)
    state.volumes, state.kept = None, kept
    writer = CheckpointWriter(tmp_path)
    writer.write(state)
    writer.wait()
    back = restore_state(ckpt.load_latest(tmp_path))
    np.testing.assert_array_equal(back.volumes, maps)
    assert back.kept is None

"""Values left by a task where it ran (runtime.kept): taken by the next graph on that worker,
rebuilt from their recipe after the worker's loss, and never through the driver."""

from __future__ import annotations

import functools
import os
import signal
import time

import numpy as np
import pytest
from distributed import Client

from hetero_dask.runtime.cluster import make_local_cluster
from hetero_dask.runtime.engine import map_reduce, partition_ranges
from hetero_dask.runtime.kept import KEPT, Kept, Recall, worker_address

N, DIM = 96, 5
DATA = np.arange(N * DIM, dtype=np.float64).reshape(N, DIM) % 7


def _weighted(p, weights):
    """The partition's rows summed after scaling by the recalled arrays (a list of one)."""
    (w,) = weights
    return DATA[p.start : p.stop].sum(0) * w


def _add(a, b):
    return a + b


def _keep(key: str, value: np.ndarray) -> str | None:
    KEPT.keep(key, value)
    return worker_address()


def _holds(key: str) -> bool:
    return KEPT.holds(key)


def _never() -> np.ndarray:
    raise AssertionError("rebuilt where a copy was kept")


@pytest.fixture(scope="module")
def two_workers():
    """Two worker processes (each its own KEPT), as on a cluster."""
    cluster = make_local_cluster(workers=2, dashboard=False)
    with cluster, Client(cluster) as client:
        yield client


def _kept_on(client, worker: str, key: str, value) -> str:
    return client.submit(_keep, key, value, workers=[worker], allow_other_workers=False, pure=False).result()


def test_recall_takes_the_copy_on_the_worker_that_kept_it(two_workers):
    client = two_workers
    a, b = sorted(client.nthreads())
    w = np.linspace(1.0, 2.0, DIM)
    assert _kept_on(client, b, "w", w) == b
    assert client.run(_holds, "w") == {a: False, b: True}
    parts = partition_ranges(N, 6, 8)
    got = map_reduce(client, _weighted, parts, _add, fan_in=3, shared={"weights": Recall(("w",), (b,), (_never,))})
    np.testing.assert_allclose(got, DATA.sum(0) * w, rtol=1e-12)
    # the recall ran on b and took its copy (released to the graph); a never held one
    assert client.run(_holds, "w") == {a: False, b: False}
    # without a client: this process's copy
    KEPT.keep("w-here", w)
    np.testing.assert_allclose(map_reduce(None, _weighted, parts, _add, shared={"weights": Recall(("w-here",), (None,), (_never,))}),
                               DATA.sum(0) * w, rtol=1e-12)
    assert not KEPT.holds("w-here")


def test_a_lost_workers_value_is_rebuilt_from_its_recipe(two_workers, tmp_path):
    client = two_workers
    a, _ = sorted(client.nthreads())
    w = np.linspace(3.0, 1.0, DIM)
    np.save(tmp_path / "w.npy", w)
    _kept_on(client, a, "lost", w)
    pid = client.run(os.getpid, workers=[a])[a]
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while a in client.nthreads() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert a not in client.nthreads()
    parts = partition_ranges(N, 6, 8)
    rebuild = functools.partial(np.load, str(tmp_path / "w.npy"))
    got = map_reduce(client, _weighted, parts, _add, fan_in=3, shared={"weights": Recall(("lost",), (a,), (rebuild,))})
    np.testing.assert_allclose(got, DATA.sum(0) * w, rtol=1e-12)


def test_a_kept_copy_is_only_used_while_its_file_is_unchanged(tmp_path):
    kept = Kept()
    path = tmp_path / "x.npz"
    kept.write(path, {"v": np.zeros(3)})
    assert kept.read(path, release=False)["v"].sum() == 0 and kept.holds(path)
    np.savez(tmp_path / "y.npz", v=np.ones(3))
    (tmp_path / "y.npz").replace(path)  # another run wrote the file since
    assert kept.read(path)["v"].sum() == 3
    assert not kept.holds(path)


def test_recall_needs_a_worker_and_a_rebuild_per_key():
    with pytest.raises(ValueError, match="one worker"):
        Recall(("a", "b"), (None,), (_never, _never))
    with pytest.raises(ValueError, match="one rebuild"):
        Recall(("a",), (None,), ())


def test_refine_sends_the_references_once_and_keeps_the_rest_on_the_workers(two_workers, tmp_path):
    """Refine's engine contract for the references: the driver's copy reaches the cluster for
    the first iteration only; every later one takes the maps its M-steps left on the workers
    (one recall task per class), and the driver receives no map until the last iteration. (One
    round: a restart from alike references sends them again.)"""
    from distributed import get_task_stream

    from hetero_dask.jobs.refine import driver, refine
    from hetero_dask.phantoms import moving_domain_phantoms
    from hetero_dask.simulate import simulate, write_references, write_simulation

    box, psize, its = 24, 5.0, 4
    vols = moving_domain_phantoms(box, psize, n_classes=2)
    write_simulation(tmp_path / "sim", simulate(vols, psize, 128, snr=0.2, seed=3, shift_range_px=1.0), vols)
    refs = write_references(tmp_path, vols + 0.3 * vols.mean(0), psize)
    received = []
    real = driver.update_state

    def recording(state, results, *args, **kwargs):
        received.append([getattr(r, "vol_A", "kept") for r in results])
        return real(state, results, *args, **kwargs)

    with pytest.MonkeyPatch.context() as m, get_task_stream(two_workers) as ts:
        m.setattr(driver, "update_state", recording)
        report = refine(str(tmp_path / "sim" / "particles.cs"), refs, tmp_path / "out", client=two_workers,
                        progress=False, max_iterations=its, final_full_passes=0, max_order=1, search_max_poses=8,
                        backproject_poses=8, cache_dir="off", similar_references_correlation=None)
    ran = len(report["iterations"])
    assert ran >= 3 and len(received) == ran
    keys = [str(t["key"]) for t in ts.data]
    assert sum(k.startswith("shared-") for k in keys) == 1
    assert sum(k.startswith("recall-") for k in keys) == 2 * (ran - 1)
    assert received[:-1] == [["kept", "kept"]] * (ran - 1)
    assert all(isinstance(v, np.ndarray) for v in received[-1])

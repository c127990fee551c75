"""Values left by a task where it ran (runtime.kept): read by the next graph on that worker, from
the file elsewhere or after the worker's loss, and never through the driver."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest
from distributed import Client

from hetero_dask.runtime.cluster import make_local_cluster
from hetero_dask.runtime.engine import map_reduce, partition_ranges
from hetero_dask.runtime.kept import KEPT, KeptFiles, Recall, worker_address

N, DIM = 96, 5
DATA = np.arange(N * DIM, dtype=np.float64).reshape(N, DIM) % 7


def _weighted(p, weights):
    """The partition's rows summed after scaling by the recalled arrays (a list of one)."""
    (w,) = weights
    return DATA[p.start : p.stop].sum(0) * w


def _add(a, b):
    return a + b


def _keep(path: str, value: np.ndarray) -> str | None:
    KEPT.write(path, value)
    return worker_address()


def _holds(path: str) -> bool:
    return KEPT.holds(path)


@pytest.fixture(scope="module")
def two_workers():
    """Two worker processes (each its own KEPT), as on a cluster."""
    cluster = make_local_cluster(workers=2, dashboard=False)
    with cluster, Client(cluster) as client:
        yield client


def _kept_on(client, worker: str, path: str, value) -> str:
    return client.submit(_keep, path, value, workers=[worker], allow_other_workers=False, pure=False).result()


def test_recall_reads_the_copy_on_the_worker_that_kept_it(two_workers, tmp_path):
    client = two_workers
    a, b = sorted(client.nthreads())
    w = np.linspace(1.0, 2.0, DIM)
    path = str(tmp_path / "w.npy")
    assert _kept_on(client, b, path, w) == b
    assert client.run(_holds, path) == {a: False, b: True}
    parts = partition_ranges(N, 6, 8)
    got = map_reduce(client, _weighted, parts, _add, fan_in=3, shared={"weights": Recall((path,), (b,))})
    np.testing.assert_allclose(got, DATA.sum(0) * w, rtol=1e-12)
    # the recall ran on b and took its copy (released to the graph); a never loaded one
    assert client.run(_holds, path) == {a: False, b: False}
    # without a client: the file, in this process
    np.testing.assert_allclose(map_reduce(None, _weighted, parts, _add, shared={"weights": Recall((path,), (None,))}),
                               DATA.sum(0) * w, rtol=1e-12)


def test_a_lost_workers_kept_value_is_read_from_its_file(two_workers, tmp_path):
    client = two_workers
    a, _ = sorted(client.nthreads())
    w = np.linspace(3.0, 1.0, DIM)
    path = str(tmp_path / "lost.npy")
    _kept_on(client, a, path, w)
    pid = client.run(os.getpid, workers=[a])[a]
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while a in client.nthreads() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert a not in client.nthreads()
    parts = partition_ranges(N, 6, 8)
    got = map_reduce(client, _weighted, parts, _add, fan_in=3, shared={"weights": Recall((path,), (a,))})
    np.testing.assert_allclose(got, DATA.sum(0) * w, rtol=1e-12)


def test_a_kept_copy_is_only_used_while_its_file_is_unchanged(tmp_path):
    kept = KeptFiles()
    path = tmp_path / "x.npz"
    kept.write(path, {"v": np.zeros(3)})
    assert kept.read(path, release=False)["v"].sum() == 0 and kept.holds(path)
    np.savez(tmp_path / "y.npz", v=np.ones(3))
    (tmp_path / "y.npz").replace(path)  # another run wrote the file since
    assert kept.read(path)["v"].sum() == 3
    assert not kept.holds(path)


def test_recall_needs_a_worker_or_none_per_path():
    with pytest.raises(ValueError, match="one worker"):
        Recall(("a.npy", "b.npy"), (None,))

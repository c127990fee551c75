"""The map/reduce engine, checkpoints, submit-and-walk-away, faults."""

from __future__ import annotations

import errno
import functools
import json
import os
import signal
import sys
import threading
import time

import cloudpickle
import dask
import numpy as np
import pytest
import zarr
from distributed import Client, LocalCluster

from hetero_dask.cli import main as cli_main
from hetero_dask.runtime import checkpoint as ck
from hetero_dask.runtime.cluster import blas_threads_per_worker, make_local_cluster, open_client
from hetero_dask.runtime.engine import (
    Partition,
    _combine,
    build_graph,
    clear_worker_cache,
    map_reduce,
    partition_ranges,
    row_hash,
    task_rng,
    worker_cached,
)
from hetero_dask.runtime.submit import JobHandle, submit

# Worker processes cannot import this test module: ship its functions by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

N_PARTICLES, DIM = 2000, 16
DATA = np.random.default_rng(7).standard_normal((N_PARTICLES, DIM))


def toy_process(p: Partition, sleep_s: float = 0.0) -> dict:
    """Partial: sum and sum of squares of the partition's rows, and its size."""
    if sleep_s:
        time.sleep(sleep_s)
    x = DATA[p.start : p.stop]
    return {"sum": x.sum(0), "sq": (x**2).sum(0), "n": p.size}


def toy_merge(a: dict, b: dict) -> dict:
    a["sum"] += b["sum"]  # in place: the engine passes an input only this merge reads
    a["sq"] += b["sq"]
    a["n"] += b["n"]
    return a


def expected() -> dict:
    return {"sum": DATA.sum(0), "sq": (DATA**2).sum(0), "n": N_PARTICLES}


def assert_partial_close(got: dict, want: dict) -> None:
    np.testing.assert_allclose(got["sum"], want["sum"], rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(got["sq"], want["sq"], rtol=1e-12)
    assert got["n"] == want["n"]


@pytest.fixture(scope="module")
def client3():
    """Three in-process workers: enough for scheduling tests, starts in a fraction of a second."""
    with LocalCluster(
        n_workers=3, threads_per_worker=1, processes=False, dashboard_address=":0"
    ) as c:
        with Client(c) as client:
            yield client


# ---------------------------------------------------------------- partitions, RNG, cache


@pytest.mark.parametrize("n,parts,align", [(2000, 7, 64), (1000, 3, 1), (10, 8, 4), (64, 4, 64)])
def test_partition_ranges_cover_contiguously_and_align(n, parts, align):
    ps = partition_ranges(n, parts, align)
    assert ps[0].start == 0 and ps[-1].stop == n
    assert all(a.stop == b.start for a, b in zip(ps, ps[1:], strict=False))
    assert all(p.start % align == 0 and p.size > 0 for p in ps)
    assert [p.index for p in ps] == list(range(len(ps)))
    assert len(ps) == min(parts, -(-n // align))
    sizes = [p.size for p in ps]
    assert max(sizes) - min(sizes) <= align  # balanced to within one shard


def test_task_rng_depends_only_on_seed_iteration_partition():
    a = task_rng(1, 2, 3).random(5)
    np.testing.assert_array_equal(a, task_rng(1, 2, 3).random(5))
    for other in (task_rng(1, 2, 4), task_rng(1, 3, 3), task_rng(2, 2, 3), task_rng(1, 2, (3, 0))):
        assert not np.allclose(a, other.random(5))
    with pytest.raises(ValueError, match="non-negative"):
        task_rng(-1, 0, 0)


def test_row_hash_depends_only_on_the_row_and_key_and_is_uniform():
    rows = np.arange(200_000)
    h = row_hash(rows, 1, 2)
    np.testing.assert_array_equal(h[1234:5678], row_hash(rows[1234:5678], 1, 2))  # any slice alone
    for other in (row_hash(rows, 1, 3), row_hash(rows, 2, 2), row_hash(rows, 1, 2, 0)):
        assert (other != h).mean() > 0.999
    counts = np.bincount((h % np.uint64(4)).astype(np.int64), minlength=4)
    assert np.abs(counts / rows.size - 0.25).max() < 0.005  # binomial sd ~0.001
    bits = (h & np.uint64(1)).astype(np.int64)  # neighbouring rows independent
    assert abs(np.corrcoef(bits[:-1], bits[1:])[0, 1]) < 0.01
    with pytest.raises(ValueError, match="non-negative"):
        row_hash(rows, -1)


def test_worker_cached_loads_once_per_key_and_evicts_lru():
    clear_worker_cache()
    calls = []

    def loader(tag):
        calls.append(tag)
        return np.full(3, len(calls))

    first = worker_cached(("vol.zarr", 0), functools.partial(loader, "a"))
    again = worker_cached(("vol.zarr", 0), functools.partial(loader, "a"))
    assert again is first and calls == ["a"]
    for it in range(1, 4):
        worker_cached(("vol.zarr", it), functools.partial(loader, it), max_entries=2)
    worker_cached(("vol.zarr", 0), functools.partial(loader, "a2"), max_entries=2)
    assert calls == ["a", 1, 2, 3, "a2"]  # iteration 0 was evicted, so loaded again
    clear_worker_cache()


# ---------------------------------------------------------------- graph shape and results


@pytest.mark.parametrize("n_parts,fan_in", [(20, 4), (64, 8), (9, 8), (1, 8), (11, 2)])
def test_groups_of_fan_in_are_folded_in_partition_order(n_parts, fan_in):
    """Group g sums partitions [g * fan_in, (g + 1) * fan_in); the running sum takes in the
    groups one by one in order; group g's process tasks wait for the token of running sum
    g - in_flight, and the fold that changes a running sum waits for its token."""
    in_flight = 2
    parts = partition_ranges(N_PARTICLES, n_parts)
    nodes, out = build_graph(
        toy_process, parts, toy_merge, fan_in=fan_in, key_prefix="toy", token="t",
        in_flight=in_flight,
    )
    n_groups = -(-n_parts // fan_in)
    members = [range(g * fan_in, min(n_parts, (g + 1) * fan_in)) for g in range(n_groups)]

    def group_sum(g):
        return ("toy-merge-t", 0, g) if len(members[g]) > 1 else ("toy-process-t", members[g][0])

    def total(g):
        return group_sum(0) if g == 0 else ("toy-merge-t", 1, g)

    def gated(g):  # the token of running sum g, where one exists
        return {("toy-gate-t", g)} if 0 <= g and g + in_flight < n_groups else set()

    want = {}
    for g, group in enumerate(members):
        want.update({("toy-process-t", i): gated(g - in_flight) for i in group})
        if len(group) > 1:
            want[group_sum(g)] = {("toy-process-t", i) for i in group}
        if g > 0:
            want[total(g)] = {total(g - 1), group_sum(g)} | gated(g - 1)
        want.update({key: {total(g)} for key in gated(g)})
    assert out.__dask_graph__().get_all_dependencies() == want
    assert {n.key for n in nodes} == set(want)
    assert [n.key for n in nodes[:n_parts]] == [("toy-process-t", i) for i in range(n_parts)]
    assert out.key == total(n_groups - 1)


def test_map_reduce_sync_equals_direct_computation():
    got = map_reduce(None, toy_process, partition_ranges(N_PARTICLES, 11, 32), toy_merge, fan_in=4)
    assert_partial_close(got, expected())


def test_each_partial_has_one_consumer_and_the_graph_recomputes_the_same():
    """Merges accumulate into their first input (no copy): that is safe because every process
    output and sum feeds exactly one merge (a running sum's token, which reads nothing, runs
    before the fold that changes it), and a re-run recomputes its inputs."""
    parts = partition_ranges(N_PARTICLES, 11, 32)
    nodes, out = build_graph(toy_process, parts, toy_merge, fan_in=3, token="once")
    graph = out.__dask_graph__()
    deps = graph.get_all_dependencies()
    consumers = {}
    for key, ds in deps.items():
        for d in ds:
            consumers.setdefault(d, []).append(key)
    inner = [n.key for n in nodes if n.key != out.key and "-gate-" not in n.key[0]]
    with_token = 0
    for key in inner:
        tokens = [c for c in consumers[key] if "-gate-" in c[0]]
        (merge,) = [c for c in consumers[key] if c not in tokens]
        assert len(tokens) <= 1 and set(tokens) <= deps[merge]
        with_token += len(tokens)
    assert with_token == 2  # 4 groups, 2 in flight: running sums 0 and 1 gate groups 2 and 3
    first = dask.compute(out, scheduler="sync")[0]
    again = dask.compute(out, scheduler="sync")[0]
    assert_partial_close(first, expected())
    assert_partial_close(again, expected())
    a, b = toy_process(parts[0]), toy_process(parts[1])
    assert _combine(toy_merge, a, b) is a


def test_keys_are_deterministic():
    parts = partition_ranges(N_PARTICLES, 5)
    k1 = [n.key for n in build_graph(toy_process, parts, toy_merge)[0]]
    k2 = [n.key for n in build_graph(toy_process, parts, toy_merge)[0]]
    k3 = [n.key for n in build_graph(toy_process, partition_ranges(N_PARTICLES, 6), toy_merge)[0]]
    assert k1 == k2 and k1 != k3


def test_finish_tasks_per_key_with_select(client3):
    def select(merged, key):
        name, half = key
        return merged[name][half::2]

    finish = {(name, h): functools.partial(np.sum) for name in ("sum", "sq") for h in (0, 1)}
    parts = partition_ranges(N_PARTICLES, 9, 16)
    got = map_reduce(
        client3,
        toy_process,
        parts,
        toy_merge,
        fan_in=4,
        finish=finish,
        select=select,
        key_prefix="toy",
        progress=True,
    )
    want = expected()
    assert set(got) == set(finish)
    for (name, h), value in got.items():
        assert value == pytest.approx(want[name][h::2].sum(), rel=1e-12)
    one = map_reduce(None, toy_process, parts, toy_merge, finish=lambda m: m["n"])
    assert one == N_PARTICLES


def test_one_worker_and_three_workers_with_different_partitions_agree(client3):
    with LocalCluster(
        n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0"
    ) as c1:
        with Client(c1) as client1:
            r1 = map_reduce(client1, toy_process, partition_ranges(N_PARTICLES, 3, 64), toy_merge)
    r3 = map_reduce(
        client3, toy_process, partition_ranges(N_PARTICLES, 17, 16), toy_merge, fan_in=5
    )
    assert_partial_close(r1, expected())
    assert_partial_close(r3, r1)


def _scaled_process(p: Partition, scale: np.ndarray) -> dict:
    part = toy_process(p)
    part["sum"] *= scale
    return part


def test_shared_values_reach_every_task_in_memory_and_are_released(client3):
    scale = np.linspace(1.0, 2.0, DIM)
    parts = partition_ranges(N_PARTICLES, 9, 16)
    want = {**expected(), "sum": DATA.sum(0) * scale}
    assert_partial_close(map_reduce(None, _scaled_process, parts, toy_merge, shared={"scale": scale}), want)
    got = map_reduce(client3, _scaled_process, parts, toy_merge, fan_in=3, shared={"scale": scale})
    assert_partial_close(got, want)
    # a second graph with the same token and another value reads the new value, and the
    # first graph's copies are gone from the workers
    again = map_reduce(client3, _scaled_process, parts, toy_merge, token="same", shared={"scale": 2 * scale})
    assert_partial_close(again, {**want, "sum": 2 * want["sum"]})
    deadline = time.monotonic() + 10  # releases reach the scheduler asynchronously
    while any(client3.has_what().values()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(client3.has_what().values())


def _process_with_rows(p: Partition) -> tuple[dict, np.ndarray]:
    return toy_process(p), DATA[p.start : p.stop].max(axis=1)


def _write_row_max(p: Partition, rows: np.ndarray, path: str) -> None:
    zarr.open_array(path, mode="r+")[p.start : p.stop] = rows


@pytest.mark.parametrize("on_cluster", [False, True])
def test_declared_rows_are_written_by_the_engine_and_only_partials_merge(on_cluster, tmp_path, request):
    """process returns (partial, rows); every partition's rows land in the output array and the
    merges see the partials alone (toy_merge would fail on a tuple)."""
    client = request.getfixturevalue("client3") if on_cluster else None
    path = str(tmp_path / "row_max.zarr")
    zarr.create_array(path, shape=(N_PARTICLES,), chunks=(16,), dtype="f8", fill_value=np.nan)
    parts = partition_ranges(N_PARTICLES, 10, 16)
    got = map_reduce(client, _process_with_rows, parts, toy_merge, fan_in=3,
                     write_rows=functools.partial(_write_row_max, path=path))
    assert_partial_close(got, expected())
    np.testing.assert_array_equal(zarr.open_array(path, mode="r")[:], DATA.max(axis=1))


def test_worker_cached_inside_tasks_loads_once_per_worker(client3, tmp_path):
    clear_worker_cache()
    log = tmp_path / "loads.txt"  # tasks run on copies of this test's objects: count in a file

    def load():
        with open(log, "a") as f:
            f.write("load\n")
        return np.arange(DIM, dtype=float)

    def process(p):
        vol = worker_cached((str(log), 1), load)
        return {"sum": DATA[p.start : p.stop].sum(0) + vol, "sq": np.zeros(DIM), "n": p.size}

    parts = partition_ranges(N_PARTICLES, 12)
    got = map_reduce(client3, process, parts, toy_merge)
    np.testing.assert_allclose(got["sum"], DATA.sum(0) + len(parts) * np.arange(DIM))
    # the three in-process workers share one cache; a process cluster loads once per worker
    assert log.read_text().count("load") == 1


def test_task_errors_reach_the_driver(client3):
    def bad(p):
        raise ValueError(f"partition {p.index} is broken")

    with pytest.raises(ValueError, match="is broken"):
        map_reduce(client3, bad, partition_ranges(100, 3), toy_merge, progress=True)


# ---------------------------------------------------------------- faults: a worker killed


def test_worker_killed_during_map_gives_same_result():
    """Three worker processes; one is SIGKILLed while process tasks run."""
    cluster = make_local_cluster(workers=3, dashboard=False)
    with cluster, Client(cluster) as client:
        # project configuration reached the scheduler, BLAS threads the workers
        assert client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.allowed_failures) == 3
        blas = client.run(lambda: os.environ.get("OPENBLAS_NUM_THREADS"))
        assert set(blas.values()) == {str(blas_threads_per_worker(3))}

        pids = list(client.run(os.getpid).values())
        killed = []

        def kill_one():
            os.kill(pids[0], signal.SIGKILL)
            killed.append(pids[0])

        timer = threading.Timer(1.0, kill_one)
        timer.start()
        parts = partition_ranges(N_PARTICLES, 24, 16)
        t0 = time.monotonic()
        got = map_reduce(
            client, functools.partial(toy_process, sleep_s=0.25), parts, toy_merge, fan_in=4
        )
        timer.join()
        assert killed and time.monotonic() - t0 > 1.0  # the kill happened mid-run
        assert_partial_close(got, expected())


# ---------------------------------------------------------------- checkpoints


def _arrays(it: int) -> dict:
    return {
        "volumes": np.full((2, 8, 8, 8), it, np.float32),
        "posterior": np.full((50, 2), it / 10),
    }


def test_checkpoint_round_trip_and_resume_reads_last_complete(tmp_path):
    rng = np.random.default_rng(5)
    for it in range(3):
        ck.write_iteration(
            tmp_path, it, _arrays(it), {"iteration": it, "rng": ck.rng_state(rng)}, keep=None
        )
        rng.random(10)
    latest = ck.load_latest(tmp_path)
    assert latest.iteration == 2 and latest.meta["iteration"] == 2
    np.testing.assert_array_equal(latest.array("volumes"), _arrays(2)["volumes"])
    np.testing.assert_array_equal(
        latest.array("posterior", slice(10, 20)), _arrays(2)["posterior"][10:20]
    )
    restored = ck.rng_from_state(latest.meta["rng"])
    np.testing.assert_array_equal(restored.random(10), np.random.default_rng(5).random(30)[20:])
    with pytest.raises(ValueError, match="iterations must increase"):
        ck.write_iteration(tmp_path, 2, _arrays(2))
    assert ck.load_latest(tmp_path / "fresh") is None


def test_marker_is_written_last_and_a_crash_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    ck.write_iteration(tmp_path, 0, _arrays(0))
    replaced = []
    real_replace = os.replace
    monkeypatch.setattr(
        ck.os, "replace", lambda a, b: (replaced.append(str(b)), real_replace(a, b))[1]
    )
    ck.write_iteration(tmp_path, 1, _arrays(1))
    assert replaced[-1].endswith(ck.MARKER) and replaced[-2].endswith("iter_0001.zarr")

    # the process dies while writing iteration 2's arrays: marker still says 1
    real_create = zarr.Group.create_array

    def dying(self, name, **kw):
        if name == "posterior":
            raise KeyboardInterrupt("driver killed")
        return real_create(self, name, **kw)

    monkeypatch.setattr(zarr.Group, "create_array", dying)
    with pytest.raises(KeyboardInterrupt):
        ck.write_iteration(tmp_path, 2, _arrays(2))
    monkeypatch.setattr(zarr.Group, "create_array", real_create)
    latest = ck.load_latest(tmp_path)
    assert latest.iteration == 1
    np.testing.assert_array_equal(latest.array("volumes"), _arrays(1)["volumes"])
    # resuming rewrites iteration 2 over the leftover temporary folder
    assert ck.write_iteration(tmp_path, 2, _arrays(2)).iteration == 2
    assert ck.load_latest(tmp_path).iteration == 2
    assert sorted(p.name for p in (tmp_path / ck.ITERATIONS).iterdir()) == [
        "iter_0001.zarr",
        "iter_0002.zarr",
    ]


def test_disk_full_gives_clear_error_and_keeps_previous_checkpoint(tmp_path, monkeypatch):
    ck.write_iteration(tmp_path, 4, _arrays(4))

    def full(self, name, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(zarr.Group, "create_array", full)
    with pytest.raises(ck.CheckpointWriteError, match="No space left.*iteration 4 is intact"):
        ck.write_iteration(tmp_path, 5, _arrays(5))
    monkeypatch.undo()
    assert ck.load_latest(tmp_path).iteration == 4
    assert [p.name for p in (tmp_path / ck.ITERATIONS).iterdir()] == [
        "iter_0004.zarr"
    ]  # no temp left


def test_run_dir_that_cannot_exist_gives_clear_error(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(ck.CheckpointWriteError, match="cannot write the checkpoint of iteration 0"):
        ck.write_iteration(blocker / "run", 0, _arrays(0))


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_unwritable_run_dir_gives_clear_error(tmp_path):
    ck.write_iteration(tmp_path, 0, _arrays(0))
    os.chmod(tmp_path, 0o500)
    os.chmod(tmp_path / ck.ITERATIONS, 0o500)
    try:
        with pytest.raises(ck.CheckpointWriteError, match="iteration 0 is intact"):
            ck.write_iteration(tmp_path, 1, _arrays(1))
    finally:
        os.chmod(tmp_path, 0o700)
        os.chmod(tmp_path / ck.ITERATIONS, 0o700)
    assert ck.load_latest(tmp_path).iteration == 0


# ---------------------------------------------------------------- submit, status


def toy_job(params: dict, client) -> dict:
    """A driver: a few map_reduce iterations, a checkpoint and a status update each."""
    run_dir = params["run_dir"]
    latest = ck.load_latest(run_dir)
    start = 0 if latest is None else latest.iteration + 1
    for it in range(start, params["n_iterations"]):
        r = map_reduce(
            client, toy_process, partition_ranges(N_PARTICLES, 6), toy_merge, token=f"it{it}"
        )
        ck.write_iteration(run_dir, it, {"sum": r["sum"]})
        ck.write_status(
            run_dir, job="toy", state="running", iteration=it, n_iterations=params["n_iterations"]
        )
        time.sleep(params.get("pause_s", 0.0))
    ck.write_status(run_dir, state="done", results={"sum": str(ck.load_latest(run_dir).path)})
    return {"n": int(r["n"]), "last": it}


def test_submitted_job_survives_client_disconnect(tmp_path):
    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=False, dashboard_address=":0"
    ) as c:
        first = Client(c, set_as_default=False)
        params = {"run_dir": str(tmp_path), "n_iterations": 6, "pause_s": 0.2}
        handle = submit(toy_job, params, first, run_dir=tmp_path)
        deadline = time.monotonic() + 20
        while handle.progress()[0] is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert handle.status()["state"] == "running"
        job_id = handle.job_id
        first.close()  # the submitting client goes away mid-run
        with Client(c, set_as_default=False) as second:
            again = JobHandle.attach(job_id, second, tmp_path)
            assert again.result(timeout=30) == {"n": N_PARTICLES, "last": 5}
            assert again.status()["state"] == "done" and again.progress() == (5, 6)
    np.testing.assert_allclose(ck.load_latest(tmp_path).array("sum"), DATA.sum(0))


def test_failed_job_reports_failure(client3, tmp_path):
    handle = submit(toy_job, {"run_dir": str(tmp_path)}, client3)  # no n_iterations
    with pytest.raises(KeyError):
        handle.result(timeout=20)
    assert handle.status()["state"] == "failed"
    assert "KeyError" in handle.status()["error"]


def test_status_command(tmp_path, capsys):
    ck.write_iteration(tmp_path, 3, _arrays(3))
    ck.write_status(
        tmp_path,
        job="reconstruct",
        state="running",
        iteration=4,
        n_iterations=9,
        results={"map": "class_0/map.mrc"},
    )
    assert cli_main(["status", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"{tmp_path}: Heterogeneous Reconstruction Only, running in iteration 5 of at most 9" in out
    assert "4 iteration(s) completed" in out
    assert cli_main(["status", str(tmp_path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (
        info["last_complete_iteration"] == 3
        and info["status"]["results"]["map"] == "class_0/map.mrc"
    )
    assert cli_main(["status", str(tmp_path / "nope")]) == 2


def test_open_client_passes_an_existing_client_through(client3):
    with open_client(client3) as c:
        assert c is client3
    assert client3.status == "running"


def test_blas_threads_share_the_cores():
    assert blas_threads_per_worker(2, 1, cores=16) == 8
    assert blas_threads_per_worker(3, 1, cores=2) == 1
    assert blas_threads_per_worker(1, 2, cores=8) == 4


def timed_process(p: Partition) -> dict:
    out = toy_process(p, sleep_s=0.05)
    out["end"] = time.time()
    return out


def timed_merge(a: dict, b: dict) -> dict:
    end = max(a.pop("end"), b["end"])
    a = toy_merge(a, {k: v for k, v in b.items() if k != "end"})
    a["end"] = end
    return a


def slow_finish(merged: dict) -> tuple:
    time.sleep(1.0)
    return merged["end"], time.time()


def failing_process(p: Partition) -> dict:
    if p.index == 2:
        raise RuntimeError("partition 2 failed")
    return toy_process(p)


@pytest.mark.parametrize("progress", [False, True])
def test_after_map_overlaps_the_merges_and_finishing(client3, progress):
    """after_map starts once every process task is done and before the finishing tasks end
    (it overlaps them); its exception reaches the caller; a failed graph never runs it."""
    started = []
    parts = partition_ranges(N_PARTICLES, 6, 16)
    (last_process_end, finish_end) = map_reduce(
        client3, timed_process, parts, timed_merge, fan_in=3, finish=slow_finish,
        progress=progress, after_map=lambda: started.append(time.time()),
    )
    assert len(started) == 1
    assert last_process_end <= started[0] < finish_end - 0.5

    def broken():
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        map_reduce(client3, toy_process, parts, toy_merge, after_map=broken, progress=progress)
    ran = []
    with pytest.raises(RuntimeError, match="partition 2 failed"):
        map_reduce(client3, failing_process, parts, toy_merge, after_map=lambda: ran.append(1),
                   progress=progress)
    assert ran == []
    # Without a client it runs after the graph.
    assert map_reduce(None, toy_process, parts, toy_merge, finish=lambda m: m["n"],
                      after_map=lambda: ran.append(2)) == N_PARTICLES
    assert ran == [2]


def _big_process(p: Partition) -> np.ndarray:
    return np.full(10_000_000, float(p.index))  # 80 MB: the scheduler prices moving it at ~1 s


def _where_it_ran(x) -> str:
    from distributed import get_worker

    time.sleep(0.2)
    return get_worker().address


def test_finish_tasks_are_spread_over_the_workers():
    """Keyed finishing tasks prefer one task thread each in turn: left to itself, the scheduler
    runs them all next to the merged partial (its default bandwidth makes moving it look slow)."""
    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=False, dashboard_address=":0"
    ) as cluster, Client(cluster) as client:
        finish = {k: _where_it_ran for k in range(4)}
        ran = map_reduce(client, _big_process, partition_ranges(4, 2), np.add, finish=finish)
        workers = sorted(client.nthreads())
    assert sorted(set(ran.values())) == workers
    assert [ran[k] for k in range(4)] == [workers[k % 2] for k in range(4)]


def _select_half(merged, key):
    name, half = key
    return {"v": merged[name][half::2].copy(), "n": merged["n"]}


def _merge_selected(a, b):
    if "v" in a:
        a["v"] += b["v"]
        a["n"] += b["n"]
        return a
    return toy_merge(a, b)


def _total(part):
    return float(part["v"].sum())


def _with_count(total):
    return (total, "chained")


@pytest.mark.parametrize("use_client", [False, True])
def test_select_first_and_chains_equal_merge_then_select(use_client, client3):
    """Chained finishing steps run in order, and selecting each key's part before merging (one
    reduction per key) gives what merging everything then selecting gives."""
    client = client3 if use_client else None
    parts = partition_ranges(N_PARTICLES, 7, 16)
    keys = [(name, h) for name in ("sum", "sq") for h in (0, 1)]
    finish = {k: (_total, _with_count) for k in keys}
    late = map_reduce(client, toy_process, parts, _merge_selected, fan_in=3, finish=finish,
                      select=_select_half, key_prefix="late")
    early = map_reduce(client, toy_process, parts, _merge_selected, fan_in=3, finish=finish,
                       select=_select_half, key_prefix="early", select_first=True)
    want = expected()
    for name, h in keys:
        assert late[(name, h)][1] == early[(name, h)][1] == "chained"
        assert late[(name, h)][0] == pytest.approx(want[name][h::2].sum(), rel=1e-12)
        assert early[(name, h)][0] == pytest.approx(want[name][h::2].sum(), rel=1e-12)


def test_select_first_pins_each_partition_and_its_selects_to_one_slot():
    """With select_first, process i and its selects prefer the same task thread (so the selects
    never pull a whole partial across), and key j's sums and first finishing step prefer
    slot j, and the later steps continue the round robin over the slots."""
    parts = partition_ranges(100, 3)
    finish = {k: (_total, _with_count) for k in ("a", "b")}
    nodes, outs = build_graph(toy_process, parts, toy_merge, fan_in=4, finish=finish,
                              select=_select_half, token="pin", slots=["w0", "w1"],
                              select_first=True)
    prefers = {}
    for node in nodes:
        for name, layer in node.__dask_graph__().layers.items():
            if name == node.key:
                prefers[name] = (layer.annotations or {}).get("workers")
    for i in range(3):
        slot = ["w0", "w1"][i % 2]
        assert prefers[("map_reduce-process-pin", i)] == [slot]
        assert all(prefers[("map_reduce-select-pin", j, i)] == [slot] for j in range(2))
    for j in range(2):
        assert prefers[("map_reduce-merge-pin", j, 0, 0)] == [["w0", "w1"][j]]
        assert prefers[("map_reduce-finish-pin", j, 0)] == [["w0", "w1"][j]]
        assert prefers[("map_reduce-finish-pin", j)] == [["w0", "w1"][(2 + j) % 2]]
    with pytest.raises(ValueError, match="select_first"):
        build_graph(toy_process, parts, toy_merge, select_first=True)


def _slow_total(part):
    time.sleep(1.5)  # long enough to be killed in
    return float(part["v"].sum())


def test_worker_killed_during_finishing_recomputes_the_same_sums():
    """Combines accumulate into their first input. A worker SIGKILLed while the finishing tasks
    run (after those in-place merges) still gives the exact sums: what it held is recomputed
    from scratch, and the surviving worker only ever sent copies."""
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    try:
        with LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
        ) as cluster, Client(cluster) as client:
            pids = client.run(os.getpid)
            killed = []

            def kill_one_finisher():
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline and not killed:
                    for worker, keys in client.processing().items():
                        if any("-finish-" in str(k) for k in keys):
                            time.sleep(0.5)
                            os.kill(pids[worker], signal.SIGKILL)
                            killed.append(worker)
                            return
                    time.sleep(0.02)

            killer = threading.Thread(target=kill_one_finisher, daemon=True)
            killer.start()
            keys = [(name, h) for name in ("sum", "sq") for h in (0, 1)]
            got = map_reduce(client, toy_process, partition_ranges(N_PARTICLES, 6, 16),
                             _merge_selected, fan_in=2, finish={k: _slow_total for k in keys},
                             select=_select_half, key_prefix="killed", select_first=True)
            killer.join()
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    assert killed, "no finishing task was seen running: nothing was killed"
    want = expected()
    for name, h in keys:
        assert got[(name, h)] == pytest.approx(want[name][h::2].sum(), rel=1e-12)


def test_after_map_join_waits_for_a_start_under_way():
    """The done-callback that starts after_map runs on the client's event loop; the caller's
    join can come while that start is under way and must wait for it, not find the thread
    flagged as started but not yet started (a race seen once in CI)."""
    from hetero_dask.runtime.engine import _DriverSide

    ran = []
    side = _DriverSide(lambda: ran.append(1))
    real_start = side.thread.start

    def slow_start():
        time.sleep(0.3)
        real_start()

    side.thread.start = slow_start
    starter = threading.Thread(target=side.start)
    starter.start()
    time.sleep(0.05)  # the start is under way, the thread not yet running
    side.join()
    starter.join()
    assert ran == [1]

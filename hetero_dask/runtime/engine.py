"""The generic map / reduce engine every job runs on (LiberTEM UDF style).

:func:`map_items` runs ``fn(shared, item)`` once per work item and returns
the results in item order, for work whose results are small and needed one by
one (regroup's pair alignments, the import's blocks). The rest of this page is
about :func:`map_reduce`, which merges what its tasks produce.

A job supplies three pure functions that know nothing about Dask:

``process(partition) -> partial``
    Work on one contiguous particle range (a :class:`Partition`), streaming
    it from the store and accumulating into ONE partial (grids, statistics).
    Bind static arguments with ``functools.partial``; big static inputs
    (class volumes) are read on the worker through :func:`worker_cached`,
    never put in the graph.
``merge(a, b) -> partial``
    Combine two partials. It may update ``a`` in place and return it, and
    the engine lets it: a merge task accumulates into its first input
    instead of a copy. Every partial and group sum has exactly one consumer
    (the merge that takes it); a running sum has one more, its token, which
    reads nothing and runs before the next fold. Each is released once
    those are done, so nothing else reads the modified object; a merge that
    is re-run after a worker loss gets inputs recomputed or kept on the
    surviving workers (which only ever sent copies), so the result is the
    same. Copying instead would put every merge through hundreds of MB of
    freshly faulted memory, twenty times slower (``benchmarks/results/design_measurements.md``).
``finish[key](merged) -> summary``
    Optional per-key finishing tasks (e.g. one M-step per class), each a
    separate task, or a chain of them (``(mstep, fsc)``: one task per step);
    ``select(merged, key)`` optionally cuts the merged partial down to what
    that key needs, in a small task next to the data, so only that piece
    travels. With ``select_first`` the cut happens on every process partial
    where it was computed, and each key is reduced on its own (see
    :func:`build_graph`). With a client, the finishing steps are spread over
    the task threads in turn.

:func:`map_reduce` builds ONE graph per call: P process tasks; one task per
group of ``fan_in`` consecutive partitions summing their partials, the group
sums folded into one running sum in partition order (so the order of every
float sum is fixed by the data, whatever the cluster); small token tasks
that hold each group's process tasks back until the running sum has taken
in the group a few groups earlier, so a bounded number of partials exist at
once, whatever P; and the finishing tasks. Only the finishing results (the
summaries) come back to the driver. Keys are deterministic (prefix, stage,
token, index), so the same call gives the same graph and a task lost with
its worker is recomputed to the same value.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
import re
import threading
import uuid
import warnings
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import dask
import numpy as np
from dask import delayed
from dask.base import tokenize

from hetero_dask.runtime.kept import Recall, recall, recall_all
from hetero_dask.runtime.progress import StageProgress, wait_with_progress


class Partition(NamedTuple):
    """A contiguous range ``[start, stop)`` of particles; ``index`` orders partitions."""

    index: int
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start


def partition_ranges(n: int, n_parts: int, align: int = 1) -> list[Partition]:
    """Split ``range(n)`` into at most ``n_parts`` contiguous, nearly equal partitions.

    Every boundary except the final ``n`` is a multiple of ``align`` (the
    store's shard length), so a partition streams whole shards and
    per-particle outputs land in disjoint shards. Fewer partitions are
    returned when ``n`` has fewer than ``n_parts`` shards; none when n == 0.
    """
    if n < 0 or n_parts < 1 or align < 1:
        raise ValueError(
            f"partition_ranges needs n >= 0, n_parts >= 1, align >= 1; got {n}, {n_parts}, {align}"
        )
    n_blocks = math.ceil(n / align)
    k = min(n_parts, n_blocks)
    if k == 0:
        return []
    edges = [min(n, (i * n_blocks // k) * align) for i in range(k + 1)]
    edges[-1] = n
    return [Partition(i, edges[i], edges[i + 1]) for i in range(k)]


def task_rng(seed: int, iteration: int, partition: int | Sequence[int]) -> np.random.Generator:
    """A generator that depends only on (seed, iteration, partition).

    ``partition`` is an int or tuple of ints: use the partition index for
    randomness private to a task, or a shard index / particle offset where
    the draws must not depend on how the particles were partitioned.
    """
    parts = tuple(partition) if isinstance(partition, Sequence) else (partition,)
    entropy = (seed, iteration, *parts)
    if any(int(e) < 0 for e in entropy):
        raise ValueError(f"task_rng needs non-negative integers, got {entropy}")
    # The length goes in too: SeedSequence treats trailing zeros as absent, (3,) == (3, 0).
    words = [int(e) for e in (seed, iteration, len(parts), *parts)]
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(words)))


def row_hash(rows, *key: int) -> np.ndarray:
    """A well-mixed ``uint64`` per entry of ``rows`` that depends only on ``key`` and that row.

    For per-particle random draws keyed by the particle's index (e.g. ``row_hash(rows, seed,
    iteration) % K``): a task computes its rows' values alone, so the draws depend neither on
    the partitioning nor on N (no ``(N,)`` stream drawn to take a slice of).
    """
    if any(int(k) < 0 for k in key):
        raise ValueError(f"row_hash needs non-negative integer keys, got {key}")
    h = np.asarray(rows, dtype=np.uint64)
    for k in (len(key), *key):  # the length too: (3,) and (3, 0) differ
        h = _splitmix64(h ^ _splitmix64(np.uint64(int(k) & (2**64 - 1))))
    return h


def _splitmix64(x):
    """The splitmix64 finaliser, elementwise on uint64 (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = np.asarray(x, dtype=np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


_CACHE: OrderedDict[Hashable, Any] = OrderedDict()
_CACHE_LOCK = threading.Lock()
_LOAD_LOCKS: dict[Hashable, threading.Lock] = {}
CACHE_ENTRIES = 4


def worker_cached(key: Hashable, loader: Callable[[], Any], max_entries: int | None = None) -> Any:
    """Return ``loader()``, computed once per worker process for ``key``.

    For static inputs tasks read from the run directory: use
    ``key=(path, iteration)`` so a new iteration's volumes replace the old
    ones. Entries are kept least-recently-used, at most ``max_entries``
    (default ``CACHE_ENTRIES``); concurrent tasks asking for the same key
    wait for one load. The value is shared: treat it as read-only.
    """
    limit = CACHE_ENTRIES if max_entries is None else max_entries
    with _CACHE_LOCK:
        if key in _CACHE:
            _CACHE.move_to_end(key)
            return _CACHE[key]
        load_lock = _LOAD_LOCKS.setdefault(key, threading.Lock())
    with load_lock:
        with _CACHE_LOCK:
            if key in _CACHE:
                return _CACHE[key]
        value = loader()
        with _CACHE_LOCK:
            _CACHE[key] = value
            while len(_CACHE) > limit:
                old, _ = _CACHE.popitem(last=False)
                _LOAD_LOCKS.pop(old, None)
    return value


def clear_worker_cache() -> None:
    """Drop every :func:`worker_cached` entry in this process."""
    with _CACHE_LOCK:
        _CACHE.clear()
        _LOAD_LOCKS.clear()


def _combine(merge: Callable, *partials):
    """The sum of the inputs, accumulated into the first (each input has this task as its only
    consumer: see the module docstring)."""
    acc = partials[0]
    for p in partials[1:]:
        acc = merge(acc, p)
    return acc


def _gated(process: Callable, partition, shared, *gates):
    """``process(partition, **shared)``; the gates (tokens, see :func:`_reduce`) only make it
    wait."""
    return process(partition, **(shared or {}))


def _writing(process: Callable, write_rows: Callable, partition, **shared):
    """``process``'s partial, its per-particle rows written by ``write_rows`` (see :func:`map_reduce`)."""
    result, rows = process(partition, **shared)
    write_rows(partition, rows)
    return result


def _fold(merge: Callable, total, group_sum, *gate):
    """``total + group_sum``, accumulated into ``total``; ``gate`` (the token of ``total``,
    which must run before ``total`` changes) is not read."""
    return merge(total, group_sum)


def _token(total) -> None:
    """Nothing: a small stand-in for ``total`` that later process tasks wait for."""
    return None


def _prefer(slots: Sequence[str] | None, j: int):
    """Annotate the tasks built inside to prefer task thread ``j`` of ``slots`` (any worker
    may still run them); no annotation without slots."""
    if not slots:
        return contextlib.nullcontext()
    return dask.annotate(workers=[slots[j % len(slots)]], allow_other_workers=True)


# Groups in flight without a client: the synchronous scheduler runs one task at a time, so as
# for a client with one thread.
IN_FLIGHT_WITHOUT_CLIENT = 2


def build_graph(
    process: Callable,
    partitions: Sequence,
    merge: Callable,
    fan_in: int = 8,
    finish: Callable | Mapping[Hashable, Callable | Sequence[Callable]] | None = None,
    select: Callable | None = None,
    key_prefix: str = "map_reduce",
    token: str | None = None,
    slots: Sequence[str] | None = None,
    select_first: bool = False,
    in_flight: int | None = None,
    shared: Mapping[str, Any] | None = None,
) -> tuple[list, Any]:
    """The delayed nodes of a :func:`map_reduce` graph.

    Returns ``(nodes, outputs)``: every node, the P process nodes first in
    partition order, and the outputs (the merged partial, one finish node,
    or a dict key -> finish node).

    The reduction (:func:`_reduce`) sums groups of ``fan_in`` consecutive
    partials and folds the group sums into one running sum in partition
    order; the process tasks of a group wait until the running sum has taken
    in the group ``in_flight`` groups earlier. ``in_flight`` defaults to
    ``1 + ceil(len(slots) / fan_in)``, and to :data:`IN_FLIGHT_WITHOUT_CLIENT`
    without slots; it orders the tasks only, never the sums. ``slots``:
    worker addresses, one per task thread; process ``i`` prefers slot
    ``i % len(slots)`` (a gated task would otherwise go where its token is).
    ``finish[key]`` may be a chain ``(f1, f2, ...)``: one task each
    (:func:`_finish_chain`). ``select_first`` (needs ``select`` and keyed
    ``finish``): cut each process partial into its keys' parts where it was
    computed and reduce each key on its own. ``shared``: keyword arguments of every process
    task (values, or futures of values already on the workers).

    Keys: ``(f"{key_prefix}-process-{token}", i)``; group sums
    ``(f"{key_prefix}-merge-{token}", 0, g)`` and running sums ``(..., 1, g)``
    (a group of one partition and the first running sum are no task of
    their own), per key ``(..., key, 0, g)``; tokens
    ``(f"{key_prefix}-gate-{token}", g)``, per key ``(..., key, g)``;
    ``(f"{key_prefix}-select-{token}", key)``, per partition ``(..., key, i)``;
    ``(f"{key_prefix}-finish-{token}", key)`` for the last step of a chain,
    ``(..., key, step)`` for the others.
    """
    finish_keys = list(finish) if isinstance(finish, Mapping) else None
    _check_graph_arguments(partitions, fan_in, key_prefix, select, finish_keys, select_first)
    in_flight = _in_flight(in_flight, slots, fan_in)
    if token is None:
        token = tokenize(process, list(partitions), merge, fan_in, finish, select, select_first, shared)
    names = {
        s: f"{key_prefix}-{s}-{token}" for s in ("process", "merge", "gate", "select", "finish")
    }
    nodes, totals = _reduce(
        process, partitions, merge, fan_in, in_flight, names, slots, select,
        finish_keys if select_first else None, shared,
    )
    finishing, outputs = _finishing(finish, finish_keys, select, select_first, totals, slots, names)
    return nodes + finishing, outputs


def _check_graph_arguments(
    partitions: Sequence,
    fan_in: int,
    key_prefix: str,
    select: Callable | None,
    finish_keys: list | None,
    select_first: bool,
) -> None:
    """Raise ValueError, saying what was wrong, for arguments :func:`build_graph` cannot use."""
    if not partitions:
        raise ValueError("map_reduce needs at least one partition (no particles to process?)")
    if fan_in < 2:
        raise ValueError(f"fan_in must be >= 2, got {fan_in}")
    if not re.fullmatch(r"[A-Za-z][A-Za-z_]*(-[A-Za-z]+)*", key_prefix):
        # dask.utils.key_split must recover "<prefix>-<stage>" from keys for progress bars
        raise ValueError(f"key_prefix must be words of letters joined by '-', got {key_prefix!r}")
    if select_first and (select is None or finish_keys is None):
        raise ValueError("select_first needs select and a dict of finishing tasks")


def _in_flight(in_flight: int | None, slots: Sequence[str] | None, fan_in: int) -> int:
    """``in_flight``, checked, or its default: with slots, enough groups that a group's sum and
    fold overlap the next groups' tasks on every thread."""
    if in_flight is None:
        in_flight = 1 + math.ceil(len(slots) / fan_in) if slots else IN_FLIGHT_WITHOUT_CLIENT
    if in_flight < 1:
        raise ValueError(f"in_flight must be >= 1, got {in_flight}")
    return in_flight


def _reduce(
    process: Callable,
    partitions: Sequence,
    merge: Callable,
    fan_in: int,
    in_flight: int,
    names: Mapping[str, str],
    slots: Sequence[str] | None,
    select: Callable | None,
    select_keys: list | None,
    shared: Mapping[str, Any] | None = None,
) -> tuple[list, dict[tuple, Any]]:
    """The process tasks and the reduction of their partials: ``(nodes, totals)``, the process
    nodes first in partition order, and each tree's running sum through the last group.

    Partitions ``[g * fan_in, (g + 1) * fan_in)`` form group ``g``; one task
    sums a group's partials in partition order, and the group sums are folded
    into one running sum in group order (``total_g = total_{g-1} + sum_g``),
    so the order of every float sum is fixed by the data and ``fan_in``. A
    token task (``None``) follows each running sum, and the process tasks of
    group ``g`` wait for the token of ``total_{g - in_flight}``: at most
    ``in_flight`` groups' partials exist at once, however many partitions
    there are, where a tree with every process task ready at the start holds
    more partials the more partitions there are (tests/test_engine_memory.py).

    One tree, ``()``, reduces the whole partials; with ``select_keys``
    (``select_first``), tree ``(j,)`` reduces their parts for
    ``select_keys[j]`` (:func:`_select_parts`), and a process task waits for
    every tree's token.
    """
    trees = [(j,) for j in range(len(select_keys))] if select_keys is not None else [()]
    totals: dict[tuple, Any] = {}
    tokens: dict[tuple, Any] = {}
    gates: list[list] = []  # gates[g]: every tree's token of its running sum through group g
    processes, nodes = [], []
    n_groups = math.ceil(len(partitions) / fan_in)
    for g in range(n_groups):
        wait = gates[g - in_flight] if g >= in_flight else []
        members = range(g * fan_in, min(len(partitions), (g + 1) * fan_in))
        level = [
            _placed(
                slots, i, _gated, process, partitions[i], shared, *wait,
                key=(names["process"], i),
            )
            for i in members
        ]
        processes += level
        for t in trees:
            parts = level
            if select_keys is not None:
                parts = _select_parts(select, select_keys[t[0]], level, members, slots, names, t)
                nodes += parts
            totals[t], tokens[t], added = _fold_group(
                merge, parts, totals.get(t), tokens.get(t), names, t, g,
                g + in_flight < n_groups, slots,
            )
            nodes += added
        gates.append([tokens[t] for t in trees if tokens[t] is not None])
    return processes + nodes, totals


def _placed(slots: Sequence[str] | None, j: int, fn: Callable, *args, key: tuple):
    """The node ``fn(*args)`` named ``key``, preferring task thread ``j`` of ``slots``."""
    with _prefer(slots, j):
        return delayed(fn, pure=True)(*args, dask_key_name=key)


def _select_parts(
    select: Callable,
    finish_key: Hashable,
    level: list,
    members: range,
    slots: Sequence[str] | None,
    names: Mapping[str, str],
    tree: tuple,
) -> list:
    """``select(partial, finish_key)`` of each process node in ``level`` (partitions
    ``members``), for tree ``tree`` that reduces that key alone (``select_first``).

    Each select prefers the slot of its process task, so the cut is made where the partial
    was computed and only the key's part travels; the tree's sums run next to its finishing
    chain (:func:`_fold_group`), so the keys' merges and transfers run in parallel and
    overlap the finishing tasks instead of funnelling every partial into one.
    """
    return [
        _placed(slots, i, select, node, finish_key, key=(names["select"], *tree, i))
        for i, node in zip(members, level, strict=True)
    ]


def _fold_group(
    merge: Callable,
    parts: list,
    previous,
    gate,
    names: Mapping[str, str],
    tree: tuple,
    g: int,
    with_token: bool,
    slots: Sequence[str] | None,
) -> tuple[Any, Any, list]:
    """Tree ``tree``'s running sum through group ``g``, its token (None without
    ``with_token``) and the nodes that make them.

    ``parts`` are summed in partition order (a lone part is its own sum) and
    the sum is folded into ``previous``, the running sum through group
    ``g - 1`` (None for the first group, whose sum is the running sum).
    ``gate``, the token of ``previous`` (or None), must run first, since the
    fold accumulates into ``previous``. A per-key tree's sums prefer the slot
    of its finishing chain (tree ``(j,)``: slot ``j``).
    """
    added = []
    with _prefer(slots if tree else None, tree[0] if tree else 0):
        total = parts[0]
        if len(parts) > 1:
            total = delayed(_combine, pure=True)(
                merge, *parts, dask_key_name=(names["merge"], *tree, 0, g)
            )
            added.append(total)
        if previous is not None:
            total = delayed(_fold, pure=True)(
                merge, previous, total, *([gate] if gate is not None else []),
                dask_key_name=(names["merge"], *tree, 1, g),
            )
            added.append(total)
    token = None
    if with_token:
        # Not annotated: a token runs where its running sum is (never moves it).
        token = delayed(_token, pure=True)(total, dask_key_name=(names["gate"], *tree, g))
        added.append(token)
    return total, token, added


def _finishing(
    finish: Callable | Mapping[Hashable, Callable | Sequence[Callable]] | None,
    finish_keys: list | None,
    select: Callable | None,
    select_first: bool,
    totals: dict[tuple, Any],
    slots: Sequence[str] | None,
    names: Mapping[str, str],
) -> tuple[list, Any]:
    """The finishing nodes after the reduction's ``totals`` (see :func:`_reduce`), and the
    outputs of :func:`build_graph`."""
    if finish is None:
        return [], totals[()]
    if finish_keys is None:
        out = delayed(finish, pure=True)(totals[()], dask_key_name=(names["finish"], 0))
        return [out], out
    nodes, outputs = [], {}
    for j, k in enumerate(finish_keys):
        if select_first:
            arg = totals[(j,)]
        elif select is not None:
            arg = delayed(select, pure=True)(totals[()], k, dask_key_name=(names["select"], j))
            nodes.append(arg)
        else:
            arg = totals[()]
        steps = finish[k] if isinstance(finish[k], Sequence) else (finish[k],)
        outputs[k], chain = _finish_chain(steps, arg, j, len(finish_keys), slots, names["finish"])
        nodes += chain
    return nodes, outputs


def _finish_chain(
    steps: Sequence[Callable],
    arg,
    j: int,
    n_chains: int,
    slots: Sequence[str] | None,
    name: str,
) -> tuple[Any, list]:
    """Keyed finishing chain ``j``, ``steps[-1](... steps[0](arg))``, one task per step:
    its output and its nodes.

    The last step is keyed ``(name, j)``, step ``s`` before it ``(name, j, s)``. With more
    than one chain, step ``s`` prefers slot ``(s * n_chains + j) % len(slots)``, a round
    robin over every chain's steps (any worker may still run it): left to the scheduler, a
    light later step stays next to its input, so one worker runs the later steps of its
    chains while another sits idle. Step ``s`` runs at priority ``-s``, so the later steps
    yield to the merges and first steps of the other chains, which are on the critical path.
    """
    spread = slots if n_chains > 1 else None
    nodes = []
    for s, step in enumerate(steps):
        key = (name, j) if s == len(steps) - 1 else (name, j, s)
        with _prefer(spread, s * n_chains + j), dask.annotate(priority=-s):
            arg = delayed(step, pure=True)(arg, dask_key_name=key)
        nodes.append(arg)
    return arg, nodes


def map_reduce(
    client,
    process: Callable,
    partitions: Sequence,
    merge: Callable,
    fan_in: int = 8,
    finish: Callable | Mapping[Hashable, Callable | Sequence[Callable]] | None = None,
    select: Callable | None = None,
    key_prefix: str = "map_reduce",
    token: str | None = None,
    progress: bool | None = False,
    after_map: Callable[[], Any] | None = None,
    select_first: bool = False,
    shared: Mapping[str, Any] | None = None,
    write_rows: Callable[[Any, Any], None] | None = None,
):
    """Run process -> merge (groups folded in partition order) -> finish as one graph;
    return the finished results.

    ``client``: a ``distributed.Client``, or None for Dask's synchronous
    scheduler in this process (same results, for tests and debugging).
    ``finish``: None (return the merged partial), a callable (one task,
    return its result) or a dict key -> callable or chain of callables (see
    :func:`build_graph`; return a dict key -> result); with a client, the
    chains start spread over the task threads. ``select(merged, key)`` feeds
    each keyed finishing task only its part; ``select_first``: select
    before merging, one reduction per key (see :func:`build_graph`). ``token`` names the
    graph (default: a hash of the arguments); pass e.g. ``f"it{iteration}"`` for readable keys.
    ``progress``: one bar per stage (None: only when stderr is a terminal).
    ``after_map``: driver work that needs no result (e.g. writing particle
    files), run in a driver thread as soon as every process task is done, so
    it overlaps the merges and finishing tasks (which leave cores idle)
    instead of following them; joined (and its exception raised) before
    returning. Without a client it runs after the graph.
    ``shared``: name -> value given to every process task as a keyword argument (e.g. an
    iteration's references): with a client, sent to each worker once for the graph
    (:func:`hold`) and held in memory there, not written to a file by the driver and
    read back by each task; released with the graph. A
    :class:`~hetero_dask.runtime.kept.Recall` value is what earlier tasks left on their
    workers: the tasks get the list of its arrays, which never pass through the driver
    (:func:`recalled`).
    ``write_rows``: the job's declared per-particle outputs. ``process`` then returns
    ``(partial, rows)`` and the engine hands ``rows`` to ``write_rows(partition, rows)`` in the
    same task, on the worker (e.g. into Zarr arrays chunked on partition boundaries), before
    the partial goes on to the merges; a task re-run after a worker loss writes the same rows
    again. Nothing per particle travels to the driver.
    """
    # Spread over the task threads: the scheduler's default bandwidth prices a class's grids far
    # above its finishing task, so it would run every finishing task where the merged partial is.
    slots = _task_slots(client) if client is not None else None
    if write_rows is not None:
        process = functools.partial(_writing, process, write_rows)
    nodes, outputs = build_graph(
        process, partitions, merge, fan_in, finish, select, key_prefix, token, slots,
        select_first, shared=_in_cluster(client, shared),
    )
    finals = list(outputs.values()) if isinstance(outputs, dict) else [outputs]
    results = _run_graph(client, nodes, finals, len(partitions), progress, _DriverSide(after_map))
    if isinstance(outputs, dict):
        return dict(zip(outputs, results, strict=True))
    return results[0]


def _run_graph(client, nodes: list, finals: list, n_parts: int, progress, side) -> tuple:
    """The values of ``finals`` (see :func:`map_reduce`), the driver's ``side`` work run beside
    the graph and joined before returning; after a failure it is joined without running."""
    try:
        if client is None:
            with StageProgress(enabled=progress):
                results = dask.compute(*finals, scheduler="sync", optimize_graph=False)
            side.start()
        elif progress is False:
            results = _gather_finals(client, nodes, finals, n_parts, side)
        else:
            results = _gather_with_progress(client, nodes, finals, n_parts, progress, side)
    except BaseException:
        side.join(run_now=False)  # a failed job writes nothing more
        raise
    side.join()
    return results


def _in_cluster(client, shared: Mapping[str, Any] | None) -> dict | None:
    """``shared`` with each value replaced by a future of it (see :func:`hold`); a
    :class:`~hetero_dask.runtime.kept.Recall` by the list of its arrays, each read where it
    was kept (:func:`recalled`)."""
    if not shared:
        return None
    return {name: _shared_value(client, value) for name, value in shared.items()}


def _shared_value(client, value):
    if isinstance(value, Recall):
        return recalled(client, value)
    return value if client is None else hold(client, value)


def recalled(client, spec: Recall) -> list:
    """The values of ``spec``: taken or rebuilt here without a client; with one, futures of
    tasks that take them, each on the worker that kept it (a preference: a lost worker's value is
    rebuilt by another), under a new key each time. The tasks depend on nothing: their lineage
    is their recipe."""
    if client is None:
        return recall_all(spec)
    return [
        client.submit(recall, key, rebuild, key=f"recall-{uuid.uuid4().hex}", pure=False,
                      workers=None if worker is None else [worker], allow_other_workers=True)
        for key, worker, rebuild in zip(spec.keys, spec.workers, spec.rebuilds, strict=True)
    ]


def hold(client, value) -> Any:
    """A future of ``value`` in the cluster, under a new key each time (a later graph never
    reads an earlier value); each worker fetches one copy, from a peer, when a task first needs it.

    Submitted as a task rather than scattered: scattered data cannot be recovered, and the
    scheduler's active memory manager trims broadcast copies to one once the tasks reading them
    are done, so a single lost worker would fail the graph. A task's value is recomputed from its
    spec, which the scheduler keeps until the future is released.
    """
    with warnings.catch_warnings():  # the value is meant to travel with the graph, once
        warnings.filterwarnings("ignore", message="Sending large graph")
        return client.submit(_value_of, value, key=f"shared-{uuid.uuid4().hex}", pure=False)


def _value_of(value):
    return value


def _gather_finals(client, nodes: list, finals: list, n_process: int, side: _DriverSide) -> list:
    """The results of ``finals``, computing the graph with futures for the first ``n_process``
    nodes (the process tasks, which start ``side``) and the finals only."""
    futures = client.compute(nodes[:n_process] + finals, optimize_graph=False)
    side.start_when_done(futures[:n_process])
    final_futures = futures[n_process:]
    del futures  # held, the process futures would pin their partials in memory until the end
    return client.gather(final_futures)


def _gather_with_progress(
    client, nodes: list, finals: list, n_process: int, progress: bool | None, side: _DriverSide
) -> list:
    """The results of ``finals``, with futures for every task, so the bars can count each
    stage; the wait releases each as it completes so partials are not pinned in memory."""
    futures = client.compute(nodes, optimize_graph=False)
    side.start_when_done(futures[:n_process])
    by_key = {f.key: f for f in futures}
    final_futures = [by_key[d.key] for d in finals]
    del by_key
    wait_with_progress(futures, enabled=progress)
    return client.gather(final_futures)


def _task_slots(client) -> list[str]:
    """Worker addresses, each repeated once per thread, interleaved across workers."""
    threads = client.nthreads()
    rounds = max(threads.values(), default=0)
    return [w for r in range(rounds) for w in sorted(threads) if threads[w] > r]


class _DriverSide:
    """``fn()`` in a driver thread, started once given futures are all done (see ``after_map``)."""

    def __init__(self, fn: Callable[[], Any] | None):
        self.fn = fn
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="hetero-dask-after-map", daemon=True)
        self.started = False
        self.failed = False
        self._lock = threading.Lock()

    def _run(self):
        try:
            self.fn()
        except BaseException as err:  # re-raised in the calling thread by join()
            self.error = err

    def start(self):
        # Under the lock: join() calls start() too, and must not find `started` set before the
        # thread is (a done-callback on the client's event loop races the caller's join:
        # "cannot join thread before it is started", seen once in CI).
        with self._lock:
            if self.fn is None or self.started:
                return
            self.started = True
            self.thread.start()

    def start_when_done(self, futures: list):
        """Start when every future is done; the futures are not kept (partials can be freed)."""
        if self.fn is None:
            return
        pending = {f.key for f in futures}
        if not pending:
            self.start()
            return

        def done(future):
            with self._lock:
                if future.status != "finished":
                    self.failed = True
                pending.discard(future.key)
                last = not pending and not self.failed
            if last:
                self.start()

        for f in futures:
            f.add_done_callback(done)

    def join(self, run_now: bool = True):
        """Wait for ``fn`` and re-raise its error; ``run_now``: run it first if not started
        (``False`` after a failure: only wait for a run already under way)."""
        if self.fn is None:
            return
        if run_now:
            self.start()
        if self.started:
            self.thread.join()
        if self.error is not None and run_now:
            raise self.error


def map_items(
    client,
    fn: Callable[[Any, Any], Any],
    items: Iterable,
    shared: Any = None,
    key_prefix: str = "map_items",
    token: str | None = None,
    window: int | None = None,
    on_done: Callable[[int], Any] | None = None,
) -> list:
    """``[fn(shared, item) for item in items]``, one task per item; results in item order.

    ``shared``: a large read-only input every task needs (e.g. volumes); with a
    client it is sent to every worker once, not once per task. ``items``: the
    work, cut by the caller from the data alone (never from the cluster size),
    so every item's result is the same on any number of workers. ``client``:
    a ``distributed.Client``, or None to run in this process. ``window``: at
    most this many tasks submitted and unfinished at once (default: all);
    ``items`` is then read only as tasks are submitted, so a generator of big
    items (blocks of an input) keeps about ``window`` of them in memory.
    ``on_done(i)``: called in the driver as item ``i`` finishes (progress).
    Keys: ``(f"{key_prefix}-item-{token}", i)``; ``token`` defaults to a hash
    of the arguments, and must be given when ``items`` is not a sequence.
    """
    if client is None:
        return [_done(fn(shared, item), i, on_done) for i, item in enumerate(items)]
    if token is None:
        if not isinstance(items, Sequence):
            raise ValueError("map_items needs a token when items is not a sequence")
        token = tokenize(fn, list(items), shared)
    name = f"{key_prefix}-item-{token}"
    ref = hold(client, shared) if shared is not None else None
    return _submit_window(client, fn, ref, enumerate(items), name, window, on_done)


def _done(result, i: int, on_done: Callable[[int], Any] | None):
    if on_done is not None:
        on_done(i)
    return result


def _submit_window(client, fn, ref, numbered: Iterator, name: str, window, on_done) -> list:
    """Run ``fn(ref, item)`` for every ``(i, item)``, at most ``window`` unfinished at once."""
    from distributed import as_completed

    def submit(i: int, item) -> Any:
        return client.submit(fn, ref, item, key=(name, i))

    first = numbered if window is None else itertools.islice(numbered, window)
    running = as_completed([submit(i, item) for i, item in first])
    results = {}
    try:
        for future in running:
            i = future.key[1]
            results[i] = _done(future.result(), i, on_done)  # a task's error is raised here
            for j, item in itertools.islice(numbered, 1):
                running.add(submit(j, item))
    finally:
        client.cancel(list(running.futures))
    return [results[i] for i in range(len(results))]

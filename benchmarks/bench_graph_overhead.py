"""Per-iteration graph overhead of map_reduce: scheduler and transfer time vs compute.

One "iteration" = one map_reduce graph over N particles: process tasks, their
merges, one finishing task per class and half set (like the M-step). Two task
kinds:

- trivial: each task sums its particle range into a tiny partial (pure overhead);
- realistic: each task does E-step-like BLAS work per particle (a float32
  (1000 x M) @ (M x R) product per 1000 particles) and returns a partial the
  size of the M-step grids (K classes x 2 halves of a 2x-padded Hermitian
  half grid at box 64: 6 x 128 x 128 x 65 complex64 + float32 weights, 76 MB).

Reported per (kind, N, partitions per task slot): wall time, summed task
compute, transfer time, the ideal wall time compute / slots, and the
overhead = wall - ideal (scheduler latency, serialisation, imbalance).

    python benchmarks/bench_graph_overhead.py                  # 2 worker processes
    python benchmarks/bench_graph_overhead.py --workers 1 --sizes 10000
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from distributed import Client, get_task_stream

from hetero_dask.runtime.cluster import make_local_cluster
from hetero_dask.runtime.engine import Partition, map_reduce, partition_ranges

GRID_SHAPE = (6, 128, 128, 65)  # K=3 classes x 2 halves, box 64 padded 2x, Hermitian half
M_COEFFS, N_ROTATIONS, BATCH = 1024, 4096, 1000


def trivial_process(p: Partition) -> dict:
    return {"s": float(np.arange(p.start, p.stop).sum()), "n": p.size}


def trivial_merge(a: dict, b: dict) -> dict:
    a["s"] += b["s"]
    a["n"] += b["n"]
    return a


def realistic_process(p: Partition) -> dict:
    rng = np.random.default_rng(p.index)
    refs = rng.standard_normal((M_COEFFS, N_ROTATIONS), dtype=np.float32)  # shared slices
    best = np.empty(p.size, np.float32)
    for s in range(p.start, p.stop, BATCH):
        images = rng.standard_normal((min(BATCH, p.stop - s), M_COEFFS), dtype=np.float32)
        best[s - p.start : s - p.start + len(images)] = (images @ refs).max(axis=1)
    grids = np.zeros(GRID_SHAPE, np.complex64)
    weights = np.zeros(GRID_SHAPE, np.float32)
    grids[:, 0, 0, 0] = best.sum()
    weights[:, 0, 0, 0] = p.size
    return {"B": grids, "W": weights, "n": p.size}


def realistic_merge(a: dict, b: dict) -> dict:
    a["B"] += b["B"]
    a["W"] += b["W"]
    a["n"] += b["n"]
    return a


def select_class_half(merged: dict, key: int) -> dict:
    return {"B": merged["B"][key], "W": merged["W"][key], "n": merged["n"]}


def finish_one(part: dict) -> float:
    return float(part["W"][0, 0, 0])


def run_once(client: Client, kind: str, n: int, per_slot: int) -> dict:
    slots = sum(client.nthreads().values())
    parts = partition_ranges(n, per_slot * slots, align=BATCH)
    if kind == "trivial":
        process, merge, finish, select = trivial_process, trivial_merge, None, None
    else:
        process, merge = realistic_process, realistic_merge
        finish = {k: finish_one for k in range(GRID_SHAPE[0])}
        select = select_class_half
    t0 = time.perf_counter()
    with get_task_stream(client) as ts:
        map_reduce(
            client,
            process,
            parts,
            merge,
            fan_in=8,
            finish=finish,
            select=select,
            key_prefix=kind,
            token=f"n{n}-p{per_slot}-{time.time_ns()}",
        )
    wall = time.perf_counter() - t0
    compute = transfer = 0.0
    for task in ts.data:
        for ss in task["startstops"]:
            if ss["action"] == "compute":
                compute += ss["stop"] - ss["start"]
            elif ss["action"] == "transfer":
                transfer += ss["stop"] - ss["start"]
    ideal = compute / slots
    return dict(
        kind=kind,
        n=n,
        parts=len(parts),
        tasks=len(ts.data),
        wall_s=wall,
        compute_s=compute,
        transfer_s=transfer,
        ideal_s=ideal,
        overhead_s=wall - ideal,
        overhead_frac=(wall - ideal) / wall,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument(
        "--per-slot",
        type=int,
        nargs="+",
        default=[3, 12],
        help="partitions per task slot (3: the engine's default; 12: finer)",
    )
    ap.add_argument(
        "--repeats", type=int, default=2, help="iterations per setting; the best is shown"
    )
    args = ap.parse_args()
    cluster = make_local_cluster(workers=args.workers, dashboard=False)
    with cluster, Client(cluster) as client:
        print(
            f"{args.workers} worker process(es), {sum(client.nthreads().values())} task slot(s); "
            f"realistic partial = {np.prod(GRID_SHAPE) * 12 / 1e6:.0f} MB"
        )
        header = (
            f"{'kind':9s} {'N':>7s} {'parts':>5s} {'tasks':>5s} {'wall s':>7s} {'compute s':>9s} "
            f"{'xfer s':>7s} {'ideal s':>7s} {'overhead s':>10s} {'ovh %':>6s}"
        )
        print(header)
        for kind in ("trivial", "realistic"):
            for n in args.sizes:
                for per_slot in args.per_slot:
                    runs = [run_once(client, kind, n, per_slot) for _ in range(args.repeats)]
                    r = min(runs, key=lambda r: r["wall_s"])
                    print(
                        f"{r['kind']:9s} {r['n']:7d} {r['parts']:5d} {r['tasks']:5d} {r['wall_s']:7.3f} "
                        f"{r['compute_s']:9.3f} {r['transfer_s']:7.3f} {r['ideal_s']:7.3f} "
                        f"{r['overhead_s']:10.3f} {100 * r['overhead_frac']:6.1f}",
                        flush=True,
                    )


if __name__ == "__main__":
    main()

"""Scaling on this machine: 1 vs 2 workers, per-iteration graph overhead, peak worker memory.

Particles: a simulated two-state set (moving-domain phantoms, box 32, 4 A/px,
SNR 0.5) of ``--n-small`` particles; the large set repeats its rows
(``--n-large / --n-small`` copies, each a separate row of the store), so the
work per particle is the same and the only difference is the particle count.
Each measurement uses a fresh ``LocalCluster`` (single-threaded worker
processes), so a worker's peak RSS is that run's.

- reconstruct (Heterogeneous Reconstruction Only, one graph) at both sizes,
  1 and 2 workers: wall time of the reconstruction graph, summed task compute
  (Dask task stream), overhead = wall - compute / workers (scheduling,
  transfers, imbalance), speed-up and efficiency, peak worker RSS (the store
  is streamed in batches of ``--batch-size`` images: the large set should need
  about the memory of the small one).
- refine: ONE full-pass EM iteration (``max_iterations=1``, no final passes,
  ``--refine-order`` HEALPix order cap) over ``--n-refine`` particles, 1 and 2
  workers: the iteration's graph wall time, summed task compute, overhead.
  The refine graph has ``min(2 x slots, N / 128)`` E-step tasks whatever N, so
  its scheduler overhead is per iteration, not per particle: the overhead
  fraction at 10k and 100k particles is extrapolated from the measured
  per-particle compute and per-iteration overhead (labelled ``extrapolated``).

    python benchmarks/bench_scaling.py                       # defaults below
    python benchmarks/bench_scaling.py --n-small 2000 --n-large 20000 --n-refine 600   # quick
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BOX, PSIZE, SNR = 32, 4.0, 0.5


def simulate_set(work: Path, n: int, seed: int = 0) -> tuple[Path, list[str]]:
    from hetero_dask.phantoms import moving_domain_phantoms
    from hetero_dask.simulate import simulate, write_references, write_simulation

    vols = moving_domain_phantoms(BOX, PSIZE, n_classes=2)
    sim = simulate(vols, PSIZE, [n // 2, n - n // 2], snr=SNR, seed=seed, shift_range_px=1.0)
    write_simulation(work / "sim", sim, vols)
    return work / "sim" / "particles.cs", write_references(work, vols, PSIZE)


def repeated_cs(cs: Path, copies: int) -> Path:
    """The same particles ``copies`` times (rows repeated, same stack): a larger set, same work per row."""
    from hetero_dask.io.cs import read_cs, write_cs

    table = read_cs(cs)
    big = np.concatenate([table] * copies)
    if "uid" in big.dtype.names:
        big["uid"] = np.arange(len(big), dtype=big["uid"].dtype)
    out = cs.with_name(f"particles_x{copies}.cs")
    write_cs(out, big)
    return out


def _reset_peak_rss() -> None:
    # A forked worker inherits its parent's peak RSS (ru_maxrss, VmHWM): reset it (Linux >= 4.0).
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024.0


def reset_worker_peak_rss(client) -> None:
    client.run(_reset_peak_rss)


def worker_peak_rss_mb(client) -> float:
    """Largest peak RSS of the workers since :func:`reset_worker_peak_rss`."""
    return max(client.run(_peak_rss_mb).values())


def task_compute_s(stream: list[dict]) -> float:
    return sum(s["stop"] - s["start"] for t in stream for s in t["startstops"] if s["action"] == "compute")


def run_reconstruct(store: Path, out: Path, workers: int, batch_size: int | None) -> dict:
    from distributed import Client, get_task_stream

    from hetero_dask.jobs.reconstruct import reconstruct
    from hetero_dask.runtime.cluster import make_local_cluster

    with make_local_cluster(workers=workers, dashboard=False) as lc, Client(lc) as client:
        client.run(lambda: __import__("hetero_dask.jobs.reconstruct"))  # imports are not the job's memory
        reset_worker_peak_rss(client)
        base_rss = worker_peak_rss_mb(client)
        with get_task_stream(client) as ts:
            res = reconstruct(str(store), out, client=client, progress=False, force_hard_classification=True,
                              batch_size=batch_size)
        compute = task_compute_s(ts.data)
        rss = worker_peak_rss_mb(client)
    wall = res.report["timings"]["reconstruct_s"]
    return {"graph_wall_s": wall, "task_compute_s": compute, "overhead_s": wall - compute / workers,
            "n_partitions": res.report["n_partitions"], "worker_peak_rss_mb": rss,
            "worker_rss_at_start_mb": base_rss, "total_s": res.report["timings"]["total_s"]}


def run_refine(store: Path, refs: list[str], out: Path, workers: int, order: int) -> dict:
    from distributed import Client, get_task_stream

    from hetero_dask.jobs.refine import refine
    from hetero_dask.runtime.cluster import make_local_cluster

    with make_local_cluster(workers=workers, dashboard=False) as lc, Client(lc) as client:
        reset_worker_peak_rss(client)
        with get_task_stream(client) as ts, contextlib.redirect_stdout(sys.stderr):
            report = refine(str(store), refs, out, client=client, progress=False, refine_box=BOX,
                            batch_size_per_class=10**9, max_iterations=1, final_full_passes=0,
                            num_random_iterations=0, initial_sigma_scale=1.0, max_order=order)
        rss = worker_peak_rss_mb(client)
        n = report["n_particles"]
    it = report["iterations"][-1]
    # Only the iteration's graph: E-step ("refine-process"), merges, selects, M-steps.
    stream = [t for t in ts.data if str(t["key"]).find("refine-") >= 0]
    compute = task_compute_s(stream)
    wall = it["seconds"]
    return {"n": n, "iteration_wall_s": wall, "task_compute_s": compute,
            "overhead_s": wall - compute / workers, "healpix_order": it["healpix_order"],
            "worker_peak_rss_mb": rss}


def speedup(one: float, two: float) -> dict:
    return {"speedup": one / two, "efficiency": one / two / 2}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-small", type=int, default=10000)
    ap.add_argument("--n-large", type=int, default=100000)
    ap.add_argument("--n-refine", type=int, default=2000, help="particles of the refine iteration")
    ap.add_argument("--refine-order", type=int, default=3, help="HEALPix order cap of the refine search")
    ap.add_argument("--dir", default=None, help="work folder (default: a temporary one)")
    ap.add_argument("--batch-size", type=int, default=1024,
                    help="reconstruct's images per batch, the same at both sizes (0: its automatic size, "
                         "up to 16384 at box 32, which the small set does not reach)")
    ap.add_argument("--skip-refine", action="store_true", help="only reconstruct and memory")
    args = ap.parse_args(argv)

    from hetero_dask.io.store import import_particles

    work = Path(args.dir or tempfile.mkdtemp(prefix="bench_scaling_"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    cs, refs = simulate_set(work, args.n_small)
    result = {"box": BOX, "machine_cores": len(os.sched_getaffinity(0)),
              "load_average_at_start": os.getloadavg(),
              "simulate_s": time.perf_counter() - t0, "reconstruct": {}, "refine": {}}
    stores = {args.n_small: import_particles(cs, work / f"store_{args.n_small}.zarr", progress=False).path}
    copies = max(1, args.n_large // args.n_small)
    big_cs = repeated_cs(cs, copies)
    stores[args.n_small * copies] = import_particles(big_cs, work / "store_large.zarr", progress=False).path

    for n, store in stores.items():
        r = {w: run_reconstruct(store, work / f"rec_{n}_{w}", w, args.batch_size or None) for w in (1, 2)}
        r["scaling"] = speedup(r[1]["graph_wall_s"], r[2]["graph_wall_s"])
        result["reconstruct"][n] = r
        print(f"reconstruct {n}: {r[1]['graph_wall_s']:.1f} s / {r[2]['graph_wall_s']:.1f} s", file=sys.stderr)
    small, large = (result["reconstruct"][n] for n in stores)
    result["memory"] = {
        f"{w}_workers": {"peak_rss_small_mb": small[w]["worker_peak_rss_mb"],
                         "peak_rss_large_mb": large[w]["worker_peak_rss_mb"],
                         "ratio_large_over_small": large[w]["worker_peak_rss_mb"] / small[w]["worker_peak_rss_mb"]}
        for w in (1, 2)
    }

    if args.skip_refine:
        print(json.dumps(result, indent=1, default=lambda x: round(x, 3) if isinstance(x, float) else str(x)))
        return 0
    ref_cs = repeated_cs(cs, 1) if args.n_refine >= args.n_small else None
    if ref_cs is None:
        from hetero_dask.io.cs import read_cs, write_cs

        table = read_cs(cs)
        pick = np.random.default_rng(0).permutation(len(table))[: args.n_refine]
        ref_cs = cs.with_name(f"particles_{args.n_refine}.cs")
        write_cs(ref_cs, table[np.sort(pick)])
    ref_store = import_particles(ref_cs, work / "store_refine.zarr", progress=False).path
    r = {w: run_refine(ref_store, refs, work / f"refine_{w}", w, args.refine_order) for w in (1, 2)}
    r["scaling"] = speedup(r[1]["iteration_wall_s"], r[2]["iteration_wall_s"])
    result["refine"] = r
    # Per-iteration overhead is per graph (fixed task count); compute grows with N.
    per_particle = r[2]["task_compute_s"] / r[2]["n"]
    result["refine_overhead_extrapolated"] = {
        n: {"compute_per_worker_s": per_particle * n / 2, "overhead_s": r[2]["overhead_s"],
            "overhead_fraction": r[2]["overhead_s"] / (per_particle * n / 2 + r[2]["overhead_s"])}
        for n in (10000, 100000)
    }
    result["load_average_at_end"] = os.getloadavg()
    print(json.dumps(result, indent=1, default=lambda x: round(x, 3) if isinstance(x, float) else str(x)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Fixed cost of one refine iteration, and its share of an iteration of 4,000 particles.

Online EM runs many small iterations; what each costs besides scoring and backprojecting
its particles decides the speed of a whole job on fast (GPU) workers. Measured on the
local cluster, for each refinement box and worker count:

- **fixed cost per iteration**: refine with the smallest batch (one chunk of results rows,
  128 particles, whatever ``--tiny-batch`` asks below it) for ``--short`` and ``--long``
  iterations on the same client; the difference of the two runs per iteration, so start-up,
  import (the store is cached after the first run) and one-off work cancel. Its E-step
  (the one task that scores and backprojects the batch, compute from Dask's task stream) is
  taken out: what is left is what an iteration costs whatever its size (graph submission,
  references to the workers, merges, the K M-steps, the driver's state update and
  checkpoint). The M-step's compute is printed as a part of it. This difference of two runs
  is as noisy as the E-step's time on a shared machine, so the median time from one
  iteration's E-step to the next's (the task stream of the long run) is printed too: the
  same fixed cost on the critical path, measured directly;
- **an iteration of 4,000 particles** (``--batch-per-class`` x K): the same difference of
  two runs, of one and ``1 + --big-its`` iterations; the fixed cost's share of it.

Particles: the project's simulator (speed, not accuracy: which program made them does not
matter here), K moving-domain phantoms at SNR 0.1, ``--n`` particles.

    python benchmarks/bench_fixed_cost.py                                   # box 64 and 128, 1 and 2 workers
    python benchmarks/bench_fixed_cost.py --boxes 64 --workers 1 --big-its 1  # quick
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_scaling import task_compute_s

from hetero_dask.jobs.refine.results import partitions

PSIZE_AT_64 = 3.0  # A/px at box 64; box 128 halves it (same particle, twice the sampling)


def dataset(work: Path, box: int, n: int, K: int) -> tuple[str, list[str], float]:
    """``(particles.cs, reference paths, pixel size)`` of the set at ``box``, simulated once into ``work``."""
    from hetero_dask.phantoms import moving_domain_phantoms
    from hetero_dask.simulate import simulate, write_references, write_simulation

    psize = PSIZE_AT_64 * 64 / box
    sim_dir, ref_dir = work / f"sim{box}", work / f"refs{box}"
    if not sim_dir.exists():
        vols = moving_domain_phantoms(box, psize, n_classes=K)
        sim = simulate(vols, psize, [n // K + (k < n % K) for k in range(K)], snr=0.1, seed=1, shift_range_px=1.0)
        write_simulation(sim_dir, sim, vols)
        write_references(ref_dir, vols, psize)
    return str(sim_dir / "particles.cs"), sorted(str(p) for p in ref_dir.glob("*.mrc")), psize


def timed_refine(cs: str, refs: list[str], out: Path, client, cache: Path, **params) -> tuple[float, dict, list]:
    """Wall time of one refine run, its report and the task stream of its graphs."""
    from distributed import get_task_stream

    from hetero_dask.jobs.refine import refine

    shutil.rmtree(out, ignore_errors=True)  # this benchmark's own run folder, from an earlier run
    t0 = time.perf_counter()
    with get_task_stream(client) as ts, contextlib.redirect_stdout(sys.stderr):
        report = refine(cs, refs, out, client=client, progress=False, cache_dir=cache, final_full_passes=0,
                        **params)
    return time.perf_counter() - t0, report, ts.data


def compute_s(stream: list[dict], kind: str) -> float:
    """Summed compute of the engine's ``kind`` tasks ("process": E-step, "finish": M-step) in a
    task stream."""
    return task_compute_s([t for t in stream if f"-{kind}-" in str(t["key"])])


def estep_gaps(stream: list[dict]) -> list[float]:
    """The time from each iteration's last E-step task to the next iteration's first, in a task
    stream: what the critical path spends on everything else (merges, M-steps, the driver, the
    references reaching the workers), measured directly rather than as a difference of runs."""
    spans: dict[int, list[float]] = {}
    for t in stream:
        m = re.search(r"-process-it(\d+)-", str(t["key"]))
        for ss in t["startstops"]:
            if m and ss["action"] == "compute":
                span = spans.setdefault(int(m.group(1)), [ss["start"], ss["stop"]])
                span[0], span[1] = min(span[0], ss["start"]), max(span[1], ss["stop"])
    its = sorted(spans)
    return [spans[b][0] - spans[a][1] for a, b in zip(its, its[1:], strict=False) if b == a + 1]


def per_iteration(cs, refs, work: Path, client, cache: Path, short: int, long: int, tag: str, workers: int,
                  **params) -> dict:
    """Per-iteration wall, E-step and M-step compute, and the fixed cost (wall less the E-step's
    share), from the difference of a short and a long run; and the median gap between
    consecutive iterations' E-steps in the long run (:func:`estep_gaps`)."""
    runs = {}
    for its in (short, long):
        wall, report, stream = timed_refine(cs, refs, work / f"{tag}-{its}", client, cache, max_iterations=its,
                                            **params)
        runs[its] = (wall, compute_s(stream, "process"), compute_s(stream, "finish"), report["iterations"])
        if its == long:
            gaps = estep_gaps(stream)
    d = long - short
    wall, estep, mstep = ((runs[long][i] - runs[short][i]) / d for i in range(3))
    last = runs[long][3][-1]
    n = last["particles"][1] - last["particles"][0]
    tasks = len(partitions(0, n))  # E-step tasks of the batch: they share the workers
    return {"wall_s": wall, "estep_compute_s": estep, "mstep_compute_s": mstep,
            "fixed_s": wall - estep / min(tasks, workers), "particles_per_iteration": n,
            "gap_median_s": float(np.median(gaps)), "gap_quartiles_s": np.percentile(gaps, [25, 75]).tolist(),
            "estep_tasks": tasks, "r_align_last": last["r_align"], "healpix_order_last": last["healpix_order"]}


def measure(box: int, workers: int, args, work: Path) -> dict:
    from distributed import Client

    from hetero_dask.runtime.cluster import make_local_cluster

    cs, refs, psize = dataset(work, box, args.n, args.classes)
    cache = work / "cache"
    common = dict(refine_box=box, max_order=args.max_order)
    with make_local_cluster(workers=workers, dashboard=False) as lc, Client(lc) as client:
        # Warm-up: imports on the workers, the particle store into the cache.
        timed_refine(cs, refs, work / f"warm-{box}-{workers}", client, cache, max_iterations=1,
                     batch_size_per_class=args.tiny_batch, **common)
        tiny = per_iteration(cs, refs, work, client, cache, args.short, args.long, f"tiny-{box}-{workers}",
                             workers, batch_size_per_class=args.tiny_batch, **common)
        big = per_iteration(cs, refs, work, client, cache, 1, 1 + args.big_its, f"big-{box}-{workers}",
                            workers, batch_size_per_class=args.batch_per_class, **common) if args.big_its else None
    row = {"box": box, "psize_A": psize, "workers": workers, "K": args.classes, "fixed": tiny, "big": big}
    if big:
        row["fixed_share_of_big"] = tiny["fixed_s"] / big["wall_s"]
    else:  # the big iteration from the measured E-step per particle, spread over the workers
        n_big = args.batch_per_class * args.classes
        estep = tiny["estep_compute_s"] / tiny["particles_per_iteration"] * n_big / workers
        row["big_particles"] = n_big
        row["big_extrapolated_s"] = tiny["fixed_s"] + estep
        row["fixed_share_extrapolated"] = tiny["fixed_s"] / row["big_extrapolated_s"]
    return row


def print_row(r: dict) -> None:
    f = r["fixed"]
    q = f["gap_quartiles_s"]
    line = (f"box {r['box']:4d}  workers {r['workers']}  fixed/iteration {f['fixed_s']:6.2f} s "
            f"(E-step to E-step {f['gap_median_s']:.2f} s, quartiles {q[0]:.2f}-{q[1]:.2f}; "
            f"M-step compute {f['mstep_compute_s']:.2f} s over {r['K']} classes; "
            f"{f['particles_per_iteration']}-particle iteration {f['wall_s']:.2f} s, its E-step "
            f"{f['estep_compute_s']:.2f} s)")
    if r["big"]:
        b = r["big"]
        line += (f"  |  {b['particles_per_iteration']} particles: {b['wall_s']:7.2f} s/iteration, "
                 f"fixed share {100 * r['fixed_share_of_big']:.1f}%")
    else:
        line += (f"  |  {r['big_particles']} particles (extrapolated from the E-step per particle): "
                 f"{r['big_extrapolated_s']:7.2f} s/iteration, fixed share {100 * r['fixed_share_extrapolated']:.1f}%")
    print(line, flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--boxes", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--classes", type=int, default=4)
    ap.add_argument("--n", type=int, default=8000, help="particles simulated")
    ap.add_argument("--tiny-batch", type=int, default=2, help="particles per class in the fixed-cost iterations (a batch is at least 128)")
    ap.add_argument("--short", type=int, default=3)
    ap.add_argument("--long", type=int, default=13)
    ap.add_argument("--batch-per-class", type=int, default=1000, help="the 4,000-particle iteration at K=4")
    ap.add_argument("--big-its", type=int, default=2,
                    help="iterations of the big batch measured (0: extrapolated from the small batches' E-step)")
    ap.add_argument("--max-order", type=int, default=3, help="HEALPix order cap (the search's cost)")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None, help="write the rows here too")
    args = ap.parse_args(argv)
    if args.long <= args.short:
        ap.error(f"--long ({args.long}) must exceed --short ({args.short})")
    with contextlib.ExitStack() as stack:
        work = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fixed_cost_")))
        work.mkdir(parents=True, exist_ok=True)
        rows = []
        for box in args.boxes:
            for w in args.workers:
                rows.append(measure(box, w, args, work))
                print_row(rows[-1])
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

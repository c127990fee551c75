"""A million particles: simulate, import, reconstruct, a few online-EM iterations; flat memory.

    python benchmarks/bench_million.py --sizes 100000 1000000 --workers 2 --workdir /work/bench_million
    python benchmarks/bench_million.py --sizes 100000 --stages import reconstruct --partition-rows 2500 --no-relion

Simulates max(--sizes) particles of two moving-domain states at box 64
(3 A/px, SNR 0.1, astigmatic CTF, shifts up to 2 px) with the project's
simulator, in chunks of --chunk particles (one .mrcs stack each, written by
--workers processes; the set is kept in --workdir and reused by a later run
with the same size, box and seed), plus a CryoSPARC .cs. Each size N runs
on the first N particles (a .cs of those rows), with its own particle cache,
every stage on a fresh local cluster of --workers single-threaded worker
processes (cluster start and the workers' imports excluded from the stage
times); --stages runs some of these stages only (a reconstruct or refine
without import imports the cache inside its own stage):

* import: the job's particle store (the cache imports the images), next to
  ``cat`` reading the same stacks;
* reconstruct: Heterogeneous Reconstruction Only, 2 classes, hard, from the
  cached store (--partition-rows: particles per task, default the job's);
* refine: --refine-iterations online-EM iterations of Heterogeneous
  Refinement (K = 2, batches of 1000 per class, HEALPix order up to 3, no
  final full pass: an iteration's time and memory do not depend on N),
  references = the truth low-passed to 30 A.

Printed (JSON, one object per size, then a summary): each stage's wall
time, particles/s (refine: particles of the online-EM iterations per
second, and the median iteration time), the largest worker's peak resident
memory (VmHWM) per stage, the disk used (cache entry and job folders), and
the time extrapolated to one worker (stage wall x workers; refine: a full
epoch over N particles). The summary compares worker peaks across sizes
(flat: within 20%).

Then, unless --no-relion: Heterogeneous Reconstruction Only at box 128
(--relion-n particles, 2 classes) through the command line as a user runs
it (Python start-up, local cluster, store from the cache, reconstruction,
all outputs), once to fill the cache and once timed with the store cached,
against ``relion_reconstruct --ctf --class k`` for both classes run one
after the other on the same STAR file; ratio = RELION's wall / ours.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

BOX, PSIZE, SNR, K = 64, 3.0, 0.1, 2
# The iterations of every size then search the same grids (sizes see other particles, so
# their resolutions, and without a cap the order of their last iterations, may differ).
MAX_ORDER = 3
STAGES = ("import", "reconstruct", "refine")


def _simulate_chunk(workdir: str, index: int, n: int, box: int, psize: float, seed: int):
    """Simulate ``n`` particles into ``stack_{index}.mrcs``; return their table."""
    from hetero_dask.io.mrc import write_stack
    from hetero_dask.phantoms import moving_domain_phantoms
    from hetero_dask.simulate import simulate, simulation_table

    vols = moving_domain_phantoms(box, psize, K)
    counts = [n // K + (1 if k < n % K else 0) for k in range(K)]
    sim = simulate(vols, psize, counts, snr=SNR, seed=seed * 100_003 + index, shift_range_px=2.0)
    name = f"stack_{index:05d}.mrcs"
    write_stack(Path(workdir) / name, sim.images, psize)
    return simulation_table(sim, name, seed=seed * 100_003 + index)


def simulate_set(workdir: Path, n: int, box: int, chunk: int, workers: int, seed: int):
    """``(workdir/particles.cs, reused)``: at least ``n`` simulated particles (a kept set of as
    many or more is reused: each stack is seeded by its index, so the first ``n`` particles of
    a larger set are the ``n``-particle set)."""
    from hetero_dask.io.cs import write_cs

    manifest = workdir / "simulation.json"
    want = {"n": n, "box": box, "psize_A": PSIZE, "snr": SNR, "chunk": chunk, "seed": seed}
    cs = workdir / "particles.cs"
    if manifest.is_file() and cs.is_file():
        kept = json.loads(manifest.read_text())
        if kept.get("n", 0) >= n and {**kept, "n": n} == want:
            return cs, True
    workdir.mkdir(parents=True, exist_ok=True)
    sizes = [min(chunk, n - s) for s in range(0, n, chunk)]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        tables = list(pool.map(_simulate_chunk, [str(workdir)] * len(sizes), range(len(sizes)),
                               sizes, [box] * len(sizes), [PSIZE] * len(sizes),
                               [seed] * len(sizes)))
    table = np.concatenate(tables)
    table["uid"] = np.arange(1, n + 1, dtype=np.uint64)
    write_cs(cs, table)
    manifest.write_text(json.dumps(want))
    return cs, False


def _references(workdir: Path, box: int) -> list[str]:
    from hetero_dask.phantoms import moving_domain_phantoms
    from hetero_dask.simulate import write_references

    return write_references(workdir / "references", moving_domain_phantoms(box, PSIZE, K), PSIZE)


def _subset(cs: Path, n: int) -> Path:
    from hetero_dask.io.cs import read_cs, write_cs

    out = cs.with_name(f"particles_{n}.cs")
    if not out.is_file():
        write_cs(out, read_cs(cs)[:n])
    return out


def _peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM; ru_maxrss survives exec on Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def _cat_mb_s(files) -> float:
    total = sum(Path(f).stat().st_size for f in files) / 1e6
    t0 = time.perf_counter()
    subprocess.run(["cat", *map(str, files)], stdout=subprocess.DEVNULL, check=True)
    return total / (time.perf_counter() - t0)


def _load_modules() -> None:
    import hetero_dask.jobs.reconstruct  # noqa: F401
    import hetero_dask.jobs.refine  # noqa: F401


def _stage(workers: int, fn) -> tuple[object, float, float]:
    """``fn(client)`` on a fresh local cluster whose workers have imported the jobs' modules
    (start-up is not the stage's): ``(result, wall s, largest worker peak MB)``."""
    from distributed import Client

    from hetero_dask.runtime.cluster import make_local_cluster

    with make_local_cluster(workers=workers, dashboard=False) as lc, Client(lc) as client:
        client.run(_load_modules)
        t0 = time.perf_counter()
        result = fn(client)
        wall = time.perf_counter() - t0
        peak = max(client.run(_peak_rss_mb).values())
    return result, wall, peak


def run_size(cs_all: Path, refs, n: int, workers: int, iterations: int, work: Path,
             stages=STAGES, partition_rows: int | None = None) -> dict:
    from hetero_dask.io.particles import load_particles
    from hetero_dask.jobs.common import open_particle_store
    from hetero_dask.jobs.reconstruct import reconstruct

    cs = _subset(cs_all, n)
    cache = work / f"cache_{n}"
    shutil.rmtree(cache, ignore_errors=True)
    jobs = work / f"jobs_{n}"
    shutil.rmtree(jobs, ignore_errors=True)
    stacks = sorted(load_particles(cs).stacks)
    image_mb = n * BOX * BOX * 4 / 1e6
    out = {"n": n, "workers": workers, "box": BOX, "image_MB": round(image_mb, 1)}

    if "import" in stages:
        cat = _cat_mb_s(stacks)
        store, wall, peak = _stage(workers, lambda c: open_particle_store(
            cs, jobs / "import", client=c, cache_dir=str(cache), progress=False))
        out["import"] = {"wall_s": round(wall, 2), "particles_per_s": round(n / wall),
                         "MB_per_s": round(image_mb / wall), "cat_MB_per_s": round(cat),
                         "worker_peak_MB": round(peak), "one_worker_s": round(wall * workers, 1)}
        del store  # its lease on the cache entry

    if "reconstruct" in stages:
        rows = {} if partition_rows is None else {"partition_rows": partition_rows}
        res, wall, peak = _stage(workers, lambda c: reconstruct(
            cs, jobs / "reconstruct", client=c, progress=False, force_hard_classification=True,
            cache_dir=str(cache), **rows))
        out["reconstruct"] = {
            "wall_s": round(wall, 2), "particles_per_s": round(n / wall),
            "partitions": res.report["n_partitions"],
            "timings_s": {k: round(v, 2) for k, v in res.report["timings"].items()},
            "worker_peak_MB": round(peak), "one_worker_s": round(wall * workers, 1)}

    if "refine" in stages:
        out["refine"] = _refine_stage(cs, refs, n, workers, iterations, jobs, cache)
    out["disk_MB"] = {"cache": round(_du(cache) / 1e6, 1),
                      "job_folders": round(_du(jobs) / 1e6, 1),
                      "stacks": round(sum(s.stat().st_size for s in stacks) / 1e6, 1)}
    return out


def _refine_stage(cs: Path, refs, n: int, workers: int, iterations: int, jobs: Path,
                  cache: Path) -> dict:
    from hetero_dask.jobs.refine import refine

    report, wall, peak = _stage(workers, lambda c: refine(
        cs, refs, jobs / "refine", client=c, progress=False, cache_dir=str(cache),
        refine_box=BOX, num_random_iterations=1, max_iterations=iterations, final_full_passes=0,
        max_order=MAX_ORDER))
    its = report["iterations"]
    per_it = [h["seconds"] for h in its]
    batch = int(np.median([h["particles"][1] - h["particles"][0] for h in its]))
    t_it = statistics.median(per_it)
    return {
        "wall_s": round(wall, 2), "iterations": len(its), "iteration_s": [round(t, 2) for t in per_it],
        "median_iteration_s": round(t_it, 2), "particles_per_iteration": batch,
        "particles_per_s": round(batch / t_it), "worker_peak_MB": round(peak),
        "one_worker_epoch_s": round(n / batch * t_it * workers, 1),
    }


def relion_comparison(work: Path, n: int, workers: int) -> dict:
    """Reconstruct at box 128 through the CLI (store cached) vs relion_reconstruct per class."""
    from hetero_dask.phantoms import moving_domain_phantoms
    from hetero_dask.simulate import simulate, write_simulation

    box, psize = 128, 2.0
    sim_dir = work / f"box128_{n}"
    if not (sim_dir / "particles.star").is_file():
        vols = moving_domain_phantoms(box, psize, K)
        sim = simulate(vols, psize, [n // 2, n - n // 2], snr=10.0, seed=5, shift_range_px=3.0)
        write_simulation(sim_dir, sim, vols)
        del sim
    cache = work / "cache_box128"
    for old in (cache, work / "box128_cold", work / "box128_cached"):
        shutil.rmtree(old, ignore_errors=True)

    def ours(out: str) -> float:
        cmd = [sys.executable, "-m", "hetero_dask.cli", "reconstruct", "--particles",
               str(sim_dir / "particles.star"), "--out", str(work / out), "--hard", "--workers",
               str(workers), "--no-dashboard", "--cache-dir", str(cache)]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return time.perf_counter() - t0

    cold = ours("box128_cold")
    warm = ours("box128_cached")
    relion = []
    for c in range(K):
        cmd = ["relion_reconstruct", "--i", "particles.star", "--o", f"relion_class{c}.mrc",
               "--ctf", "--angpix", str(psize), "--class", str(c + 1)]
        t0 = time.perf_counter()
        subprocess.run(cmd, cwd=sim_dir, check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        relion.append(time.perf_counter() - t0)
    return {"n": n, "box": box, "classes": K, "workers": workers,
            "ours_cold_cache_s": round(cold, 1), "ours_cached_s": round(warm, 1),
            "relion_per_class_s": [round(t, 1) for t in relion],
            "relion_s": round(sum(relion), 1), "speedup_cached": round(sum(relion) / warm, 2)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES),
                    help="the stages to run per size (default: all)")
    ap.add_argument("--partition-rows", type=int, default=None,
                    help="particles per reconstruct task (default: the job's)")
    ap.add_argument("--refine-iterations", type=int, default=4)
    ap.add_argument("--chunk", type=int, default=20_000, help="particles per simulated stack")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--relion-n", type=int, default=50_000, help="particles of the box-128 set")
    ap.add_argument("--no-relion", action="store_true")
    ap.add_argument("--workdir", default="bench_million_work",
                    help="folder for the simulation (kept), caches and job folders")
    args = ap.parse_args(argv)
    work = Path(args.workdir).resolve()
    n_max = max(args.sizes)
    # stacks + cache entry + job folders, and the box-128 set's stack and cache entry, less what
    # an earlier run left in the workdir (a kept simulation and cache are reused, not rewritten)
    need_gb = (n_max * BOX * BOX * 4 * 2.3 + (0 if args.no_relion else args.relion_n * 128**2 * 4 * 2.2)) / 1e9
    if work.exists():
        need_gb = max(0.0, need_gb - _du(work) / 1e9)
    free_gb = shutil.disk_usage(work.parent if not work.exists() else work).free / 1e9
    if free_gb < need_gb:
        raise SystemExit(f"{work}: {free_gb:.0f} GB free, about {need_gb:.0f} GB needed")

    t0 = time.perf_counter()
    cs, reused = simulate_set(work / "simulation", n_max, BOX, args.chunk, args.workers, args.seed)
    simulate_s = time.perf_counter() - t0
    print(json.dumps({"simulate": {"n": n_max, "reused": reused, "wall_s": round(simulate_s, 1),
                                   "particles_per_s": round(n_max / simulate_s)}}), flush=True)
    refs = _references(work, BOX)
    results = []
    for n in sorted(args.sizes):
        results.append(run_size(cs, refs, n, args.workers, args.refine_iterations, work,
                                args.stages, args.partition_rows))
        print(json.dumps(results[-1]), flush=True)
    summary = {"sizes": [r["n"] for r in results]}
    if len(results) > 1:
        for stage in args.stages:
            peaks = [r[stage]["worker_peak_MB"] for r in results]
            ratio = max(peaks) / min(peaks)
            summary[f"{stage}_worker_peak_MB"] = peaks
            summary[f"{stage}_peak_ratio"] = round(ratio, 3)
            summary[f"{stage}_flat_within_20pct"] = bool(ratio <= 1.2)
    if not args.no_relion:
        summary["box128_vs_relion"] = relion_comparison(work, args.relion_n, args.workers)
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Import throughput: MB/s into the Zarr store next to what ``cat`` reads from the same stacks.

Builds (once, cached in --workdir) N simulated particles at --box in
.mrcs stacks of --stack-size images with a CryoSPARC .cs file (a
--unique-particle simulation tiled to N, which is all an import benchmark
needs: images are stored uncompressed, so their content does not matter),
then, for each mode, times ``cat`` reading every stack to /dev/null and
right after it ``import_particles`` from the .cs: ``threads`` imports in
this process (one thread per core, what ``hetero-dask import --serial``
does), ``N`` on a fresh local cluster of N single-threaded worker processes
(cluster start and module imports excluded; reading the .cs included). Reported: wall time, particles/s, MB/s of image
data read from the stacks, ``cat``'s MB/s on the same files and the ratio,
the target (300 MB/s or 80% of ``cat``, whichever is lower) and whether it
was met; the peak resident memory of the largest worker (or of this
process, threads: it holds the .cs table too). The stacks were just read by
``cat``, so both figures are for warm reads (the page cache).

    python benchmarks/bench_import.py --n 100000 --box 128 --modes threads 1 2
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np


def build_input(
    workdir: Path, n: int, box: int, unique: int, stack_size: int, seed: int = 0
) -> Path:
    """Write ``n`` particles (stacks + particles.cs) into ``workdir`` unless already there."""
    from hetero_dask.io.cs import write_cs
    from hetero_dask.io.mrc import write_stack
    from hetero_dask.phantoms import moving_domain_phantoms
    from hetero_dask.simulate import simulate, simulation_table

    cs_path = workdir / f"particles_{n}_{box}.cs"
    if cs_path.exists():
        return cs_path
    workdir.mkdir(parents=True, exist_ok=True)
    psize = 2.0
    vols = moving_domain_phantoms(box, psize, n_classes=2)
    sim = simulate(vols, psize, unique // 2, snr=0.1, seed=seed, shift_range_px=4)
    base = simulation_table(sim, class_slots=False)
    rows = np.arange(n) % sim.n
    table = base[rows]
    table["uid"] = np.arange(1, n + 1, dtype=np.uint64)
    names = []
    for s0 in range(0, n, stack_size):
        name = f"stack_{n}_{box}_{s0 // stack_size:04d}.mrcs"
        write_stack(workdir / name, sim.images[rows[s0 : s0 + stack_size]], psize)
        names.append(name)
    width = max(len(x) for x in names)
    paths = np.array([names[i // stack_size].encode() for i in range(n)], dtype=f"S{width}")
    from hetero_dask.io.cs import with_fields

    table = with_fields(
        table, {"blob/path": paths, "blob/idx": (np.arange(n) % stack_size).astype(np.uint32)}
    )
    write_cs(cs_path, table)
    return cs_path


def _peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM; ru_maxrss survives exec on Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def cat_rate_mb_s(files) -> float:
    """MB/s of ``cat`` reading ``files`` to /dev/null."""
    total = sum(Path(f).stat().st_size for f in files) / 1e6
    t0 = time.perf_counter()
    subprocess.run(["cat", *map(str, files)], stdout=subprocess.DEVNULL, check=True)
    return total / (time.perf_counter() - t0)


def _load_modules() -> None:
    import hetero_dask.io.particles  # noqa: F401
    import hetero_dask.io.store  # noqa: F401


def run_once(cs_path: Path, out: Path, mode: str, crop_boxes, image_dtype: str) -> dict:
    from distributed import Client, LocalCluster

    from hetero_dask.io.store import import_particles

    _load_modules()  # start-up (module imports) is not the import's

    shutil.rmtree(out, ignore_errors=True)
    kw = dict(crop_boxes=crop_boxes, progress=False, image_dtype=image_dtype)
    stacks = sorted(cs_path.parent.glob(cs_path.stem.replace("particles", "stack") + "_*.mrcs"))
    if mode == "threads":
        cat = cat_rate_mb_s(stacks)
        t0 = time.perf_counter()
        st = import_particles(cs_path, out, **kw)
        wall = time.perf_counter() - t0
        peak = _peak_rss_mb()
    else:
        with (
            LocalCluster(
                n_workers=int(mode), threads_per_worker=1, processes=True, dashboard_address=":0"
            ) as lc,
            Client(lc) as client,
        ):
            client.run(_load_modules)
            cat = cat_rate_mb_s(stacks)
            t0 = time.perf_counter()
            st = import_particles(cs_path, out, client=client, **kw)
            wall = time.perf_counter() - t0
            peak = max(client.run(_peak_rss_mb).values())
    image_mb = st.n * st.box * st.box * 4 / 1e6  # float32 pixels read from the stacks
    rate = image_mb / wall
    target = min(300.0, 0.8 * cat)
    return {
        "mode": mode if mode == "threads" else f"{mode} workers",
        "n": st.n,
        "box": st.box,
        "image_dtype": st.image_dtype.name,
        "shards": len(st.shard_ranges()),
        "shard_rows": st.shard_rows,
        "wall_s": round(wall, 2),
        "particles_per_s": round(st.n / wall, 1),
        "MB_per_s": round(rate, 1),
        "cat_MB_per_s": round(cat, 1),
        "ratio_to_cat": round(rate / cat, 3),
        "target_MB_per_s": round(target, 1),
        "target_met": bool(rate >= target),
        "peak_rss_MB": round(peak, 1),  # the workers' largest, or this process's (threads)
    }


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--n", type=int, default=100_000, help="particles (default 100000)")
    p.add_argument("--box", type=int, default=128)
    p.add_argument("--unique", type=int, default=1000, help="distinct simulated particles")
    p.add_argument("--stack-size", type=int, default=10_000, help="images per .mrcs stack")
    p.add_argument("--modes", nargs="+", default=["threads", "1", "2"],
                   help="'threads' (in this process) and/or numbers of worker processes")
    p.add_argument("--image-dtype", default="float32", choices=["float32", "float16"])
    p.add_argument("--crop-box", type=int, nargs="*", default=[])
    p.add_argument("--workdir", default="/tmp/hetero_dask_bench_import")
    p.add_argument("--keep", action="store_true", help="keep the input stacks for another run")
    args = p.parse_args()
    workdir = Path(args.workdir)
    t0 = time.perf_counter()
    cs_path = build_input(workdir, args.n, args.box, args.unique, args.stack_size)
    print(f"input: {cs_path} ({time.perf_counter() - t0:.1f} s to build or find)")
    results = []
    for mode in args.modes:
        r = run_once(cs_path, workdir / "store.zarr", mode, args.crop_box, args.image_dtype)
        results.append(r)
        print(json.dumps(r))
    shutil.rmtree(workdir / "store.zarr", ignore_errors=True)
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()

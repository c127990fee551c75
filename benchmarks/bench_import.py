"""Import throughput: particles/s and MB/s into the Zarr store with 1 and 2 Dask workers.

Builds (once, cached in --workdir) N simulated particles at box 128 in
.mrcs stacks of --stack-size images with a CryoSPARC .cs file (a
--unique-particle simulation tiled to N, which is all an import benchmark
needs: images are stored uncompressed, so their content does not matter),
then times ``import_particles`` from the .cs on a fresh local cluster per
worker count. Reported: wall time of the import (cluster start excluded),
particles/s, MB/s of image data written, the workers' peak RSS
(``ru_maxrss``, which counts memory-mapped stack pages too), their peak
traced allocation (tracemalloc: numpy buffers) and the client's peak traced
allocation.
The stacks were just written, so they are likely in the page cache: the
figures are for warm reads.

    python benchmarks/bench_import.py --n 100000 --workers 1 2
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import time
import tracemalloc
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


def _worker_peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_once(cs_path: Path, out: Path, workers: int, crop_boxes) -> dict:
    from distributed import Client, LocalCluster

    from hetero_dask.io.store import import_particles

    shutil.rmtree(out, ignore_errors=True)
    with (
        LocalCluster(
            n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0"
        ) as lc,
        Client(lc) as client,
    ):
        client.run(tracemalloc.start)
        tracemalloc.start()
        t0 = time.perf_counter()
        st = import_particles(cs_path, out, client=client, crop_boxes=crop_boxes, progress=False)
        wall = time.perf_counter() - t0
        _, client_peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        rss = client.run(_worker_peak_rss_mb)
        traced = client.run(lambda: tracemalloc.get_traced_memory()[1] / 1e6)
    image_mb = st.n * st.box * st.box * 4 / 1e6
    return {
        "workers": workers,
        "n": st.n,
        "box": st.box,
        "shards": len(st.shard_ranges()),
        "shard_rows": st.shard_rows,
        "wall_s": round(wall, 2),
        "particles_per_s": round(st.n / wall, 1),
        "MB_per_s": round(image_mb / wall, 1),
        "worker_peak_rss_MB": round(max(rss.values()), 1),
        "worker_peak_traced_MB": round(max(traced.values()), 1),
        "client_peak_traced_MB": round(client_peak / 1e6, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--n", type=int, default=100_000, help="particles (default 100000)")
    p.add_argument("--box", type=int, default=128)
    p.add_argument("--unique", type=int, default=1000, help="distinct simulated particles")
    p.add_argument("--stack-size", type=int, default=10_000, help="images per .mrcs stack")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--crop-box", type=int, nargs="*", default=[])
    p.add_argument("--workdir", default="/tmp/hetero_dask_bench_import")
    p.add_argument("--keep", action="store_true", help="keep the input stacks for another run")
    args = p.parse_args()
    workdir = Path(args.workdir)
    t0 = time.perf_counter()
    cs_path = build_input(workdir, args.n, args.box, args.unique, args.stack_size)
    print(f"input: {cs_path} ({time.perf_counter() - t0:.1f} s to build or find)")
    results = []
    for w in args.workers:
        r = run_once(cs_path, workdir / "store.zarr", w, args.crop_box)
        results.append(r)
        print(json.dumps(r))
    shutil.rmtree(workdir / "store.zarr", ignore_errors=True)
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()

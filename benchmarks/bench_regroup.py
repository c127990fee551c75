"""Benchmark Regroup 3D Classes: K class volumes with pair alignment on 1 and 2 Dask workers.

    python benchmarks/bench_regroup.py --classes 50 --box 128 --workers 1 2

K volumes are made from K/10 blob structures (random sub-voxel shifts up to 2 px,
noise); each run regroups them into K/10 superclasses with ``align_pairs`` on a
local cluster of single-threaded worker processes, started and warmed up (one
small regroup) before the clock runs.
Prints, per worker count, the pair-alignment stage (K(K-1)/2 pairs, each two
inverse 3D FFTs at the comparison box: plain and hand-flipped) and the whole job,
and checks that the superclasses match the structures.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import numpy as np


def blob_structure(rng, n: int, n_blobs: int = 16) -> np.ndarray:
    """Gaussian blobs at random places within a sphere of radius n/4 (chiral, so flips show)."""
    z, y, x = np.ogrid[:n, :n, :n]
    vol = np.zeros((n, n, n), dtype=np.float32)
    for _ in range(n_blobs):
        c = rng.uniform(-n / 4, n / 4, size=3) + n // 2
        s = rng.uniform(n / 40, n / 20)
        vol += np.exp(-((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2) / (2 * s * s)).astype(
            np.float32
        )
    return vol


def make_inputs(k: int, box: int, seed: int = 0):
    """(vols (K, box, box, box), truth (K,), particle table with alignments_class_k posteriors)."""
    from hetero_dask.core.align3d import shift_volume
    from hetero_dask.io.cs import empty_table, slot_fields, with_fields

    rng = np.random.default_rng(seed)
    n_struct = max(2, k // 10)
    structures = [blob_structure(rng, box) for _ in range(n_struct)]
    truth = np.arange(k) % n_struct
    vols = np.empty((k, box, box, box), dtype=np.float32)
    for i, g in enumerate(truth):
        v = shift_volume(structures[g], rng.uniform(-2, 2, size=3))
        vols[i] = v + 0.05 * structures[g].max() * rng.standard_normal(v.shape, dtype=np.float32)
    sizes = rng.integers(200, 2000, size=k)
    labels = rng.permutation(np.repeat(np.arange(k), sizes))
    n = len(labels)
    fields = {"alignments3D/class": labels.astype(np.uint32)}
    for c in range(k):
        fields.update(
            slot_fields(
                f"alignments_class_{c}/",
                n,
                class_posterior=(labels == c).astype(np.float32),
                psize_A=1.0,
                class_=c,
            )
        )
    return vols, truth, with_fields(empty_table(n), fields)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--classes", type=int, default=50)
    ap.add_argument("--box", type=int, default=128)
    ap.add_argument(
        "--crop-box", type=int, default=64, help="comparison box (RegroupParams.crop_box)"
    )
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--json", help="also write the figures to this JSON file")
    args = ap.parse_args(argv)

    from distributed import Client

    from hetero_dask.jobs.regroup import RegroupParams, regroup
    from hetero_dask.runtime.cluster import make_local_cluster

    t = time.perf_counter()
    vols, truth, table = make_inputs(args.classes, args.box)
    print(
        f"inputs: {args.classes} volumes {args.box}^3, {len(table)} particles "
        f"({time.perf_counter() - t:.1f} s to make)"
    )
    m = int(truth.max()) + 1
    warm = make_inputs(4, 32, seed=1)
    warm_params = RegroupParams(num_superclasses=2, align_pairs=True)
    params = RegroupParams(
        num_superclasses=m,
        align_pairs=True,
        mask_radius=0.9,
        crop_box=args.crop_box,
        max_shift_A=8.0,
    )
    rows = []
    for w in args.workers:
        with make_local_cluster(workers=w, dashboard=False) as cluster, Client(cluster) as client:
            client.wait_for_workers(w)
            with tempfile.TemporaryDirectory() as out:  # warm-up: imports on the workers
                regroup(warm[2], warm[0], out, warm_params, volumes_psize_A=1.0, client=client)
            with tempfile.TemporaryDirectory() as out:
                t = time.perf_counter()
                res = regroup(table, vols, out, params, volumes_psize_A=1.0, client=client)
                total = time.perf_counter() - t
                with open(f"{out}/report.json") as f:
                    timings = json.load(f)["timings"]
        pairs = args.classes * (args.classes - 1) // 2
        ok = (
            len({(a, b) for a, b in zip(res.superclass.tolist(), truth.tolist(), strict=True)}) == m
        )
        row = {
            "workers": w,
            "pairs": pairs,
            "align_s": timings["compare_s"],
            "total_s": round(total, 2),
            "pairs_per_s": round(pairs / timings["compare_s"], 1),
            "correct": ok,
            **timings,
        }
        rows.append(row)
        print(
            f"workers={w}: pair alignment {timings['compare_s']:.2f} s ({row['pairs_per_s']} pairs/s), "
            f"whole job {total:.2f} s (prepare {timings['prepare_s']:.2f} s, write "
            f"{timings['write_s']:.2f} s); superclasses correct: {ok}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "runs": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

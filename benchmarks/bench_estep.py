"""E-step benchmark: dense-stage GFLOP/s vs a same-run GEMM peak, and particle-iterations/s.

    python benchmarks/bench_estep.py --particles 256 --radius 16

(1) Dense stage (HEALPix order 2 = 4608 rotations x 21 shifts, K classes) of
:func:`hetero_dask.core.scoring.score_dense`; flops = B*K*R*(4*M*T + 2*M).
Peak: a float32 GEMM (B*T x 2M) @ (2M x R) timed in the same run.
(2) A full E-step pass at RELION's sampling (order 2 + oversampling 1 = coarse
order 2, fine order 3; offset range 5 step 2; K=4; box 64): particles/s and
poses evaluated per particle. The RELION side (relion_refine --K 4 --iter 1)
is not scripted yet.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from hetero_dask.core import grids
from hetero_dask.core.projector import prepare_fourier_map
from hetero_dask.core.scoring import (
    alignment_band,
    class_projections,
    prepare_particles,
    score_dense,
    weighted_terms,
)
from hetero_dask.core.search import SearchParams, estep


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--particles", type=int, default=256)
    ap.add_argument("--box", type=int, default=64)
    ap.add_argument("--classes", type=int, default=4)
    ap.add_argument("--radius", type=float, default=16.0)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    n, K, B, r = args.box, args.classes, args.particles, args.radius
    vols = [rng.standard_normal((n, n, n)).astype(np.float32) for _ in range(K)]
    fmaps = [prepare_fourier_map(v, r_max=r + 1) for v in vols]
    band = alignment_band(n, r)
    imgs = rng.standard_normal((B, n, n)).astype(np.float32)
    prep = prepare_particles(imgs, None, 1.0, band)
    sigma2 = np.full(int(r) + 2, float(np.mean(np.abs(prep.y) ** 2)), np.float32)
    M = band.kx.shape[0]
    grid = grids.so3_grid(2)
    shifts = grids.shift_grid(5, 2)
    T, R = len(shifts), len(grid.ids)
    projs = [class_projections(f, grid.matrices, band, M) for f in fmaps]
    xc, cc, _ = weighted_terms(prep, sigma2, M)
    a = rng.standard_normal((min(B, 64) * T, 2 * M)).astype(np.float32)
    b = rng.standard_normal((R, 2 * M)).astype(np.float32)
    a @ b.T
    t0 = time.perf_counter()
    for _ in range(3):
        a @ b.T
    peak = 3 * 2 * a.shape[0] * a.shape[1] * R / (time.perf_counter() - t0) / 1e9
    t0 = time.perf_counter()
    score_dense(xc, cc, band, projs, shifts, keep=8)
    dt = time.perf_counter() - t0
    dense = B * K * R * (4 * M * T + 2 * M) / dt / 1e9
    print(
        f"dense stage: M={M} R={R} T={T} K={K} B={B}: {dense:.1f} GFLOP/s, GEMM peak {peak:.1f} "
        f"GFLOP/s, ratio {dense / peak:.2f}; {B / dt:.1f} particles/s"
    )
    params = SearchParams(
        radius_final=r, order_coarse=2, order_final=3, shift_range_px=5, shift_step_px=2
    )
    t0 = time.perf_counter()
    res = estep(prep, fmaps, sigma2, params)
    dt = time.perf_counter() - t0
    print(
        f"full E-step (order 2 -> 3, incl. projections): {B / dt:.1f} particle-iterations/s, "
        f"{res.n_poses_evaluated.mean():.0f} poses evaluated per particle"
    )


if __name__ == "__main__":
    main()

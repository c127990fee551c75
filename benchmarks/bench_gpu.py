"""GPU benchmark: E-step particle-iterations/s per GPU and the scoring stage's TFLOP/s.

    python benchmarks/bench_gpu.py                      # needs CuPy and a CUDA GPU
    python benchmarks/bench_gpu.py --cpu --box 32 --crop 16 --particles 64   # smoke test

Without a GPU (and without ``--cpu``) it prints why and exits 0.

(1) Matrix-product peak of the card: float32 and TF32 GEMMs of the dense stage's
shape (B*T x 2M) @ (2M x R), timed with device synchronisation.
(2) Dense stage (:func:`hetero_dask.core.scoring.score_dense`, HEALPix order 2 =
4608 rotations x 21 shifts, K classes) at each scoring precision; flops =
B*K*R*(4*M*T + 2*M); printed as TFLOP/s and as a fraction of (1).
(3) One E-step pass per particle (the issue's figure): images simulated at box
``--box`` (128), moved to the device, Fourier-cropped to ``--crop`` (64),
prepared (normalisation, mask, FFT, band, CTF) and searched coarse to fine
(order 2 -> 3, shifts 5 px step 2, K=4, band to ``--radius``): particles/s =
particle-iterations/s on this one GPU (target >= 2e4).
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from hetero_dask.core import backend
from hetero_dask.core import pose_grids as grids
from hetero_dask.core.ctf import CTFParams, ctf_image
from hetero_dask.core.fourier import fourier_resize, ifft2c
from hetero_dask.core.noise import sigma2_from_residuals
from hetero_dask.core.projector import prepare_fourier_map, project_images
from hetero_dask.core.scoring import (
    PRECISIONS,
    alignment_band,
    class_projections,
    prepare_particles,
    score_dense,
    scoring_matmul,
    weighted_terms,
)
from hetero_dask.core.search import SearchParams, estep

SHIFT_RANGE_PX, SHIFT_STEP_PX = 5.0, 2.0


def _sync(xp) -> None:
    if xp is not np:
        xp.cuda.Device().synchronize()


def timed(xp, fn, repeats: int = 1) -> float:
    """Seconds per call of ``fn`` (one warm-up call first)."""
    fn()
    _sync(xp)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    _sync(xp)
    return (time.perf_counter() - t0) / repeats


def blob_volumes(K: int, n: int, seed: int = 0) -> list[np.ndarray]:
    """K smooth random volumes (n, n, n) float32 of Gaussian blobs."""
    rng = np.random.default_rng(seed)
    z, y, x = (np.mgrid[:n, :n, :n] - n // 2).astype(np.float32)
    out = []
    for _ in range(K):
        v = np.zeros((n, n, n), np.float32)
        for _ in range(12):
            c = rng.uniform(-n / 5, n / 5, 3)
            s = rng.uniform(1.5, 3.0) * n / 32
            v += np.exp(-((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2) / (2 * s**2))
        out.append(v)
    return out


def simulate_images(vols, B: int, psize_A: float, snr: float, xp, seed: int = 0):
    """Noisy CTF-modulated projections (B, n, n) float32 (host) of random classes and poses."""
    from scipy.spatial.transform import Rotation

    rng = np.random.default_rng(seed)
    n = vols[0].shape[-1]
    R = Rotation.random(B, random_state=seed).as_matrix().astype(np.float32)
    cls = rng.integers(0, len(vols), B)
    df = rng.uniform(10000, 20000, B)
    ctf = CTFParams(df1_A=df, df2_A=df - 300, df_angle_rad=rng.uniform(0, np.pi, B))
    spec = xp.zeros((B, n, n), dtype=xp.complex64)
    for k, v in enumerate(vols):
        sel = np.flatnonzero(cls == k)
        if sel.size:
            fm = prepare_fourier_map(xp.asarray(v))
            spec[xp.asarray(sel)] = project_images(fm, xp.asarray(R[sel]))
    spec = spec * ctf_image(ctf.to(xp), n, psize_A, xp)
    img = backend.to_host(ifft2c(spec).real).astype(np.float32)
    sd = np.sqrt(img.var(axis=(1, 2)).mean() / snr)
    return img + rng.normal(0, sd, img.shape).astype(np.float32), ctf


def gemm_peak(xp, rows: int, m2: int, R: int) -> dict:
    """TFLOP/s of the dense stage's GEMM shape at each precision."""
    rng = np.random.default_rng(0)
    a = xp.asarray(rng.standard_normal((rows, m2)).astype(np.float32))
    b = xp.asarray(rng.standard_normal((m2, R)).astype(np.float32))
    out = {}
    for p in PRECISIONS:
        dt = timed(xp, lambda p=p: scoring_matmul(a, b, p), repeats=5)
        out[p] = 2 * rows * m2 * R / dt / 1e12
    return out


def dense_stage(xp, B: int, n: int, K: int, r: float) -> None:
    rng = np.random.default_rng(1)
    vols = [xp.asarray(rng.standard_normal((n, n, n)).astype(np.float32)) for _ in range(K)]
    fmaps = [prepare_fourier_map(v, r_max=r + 1) for v in vols]
    band = alignment_band(n, r, xp)
    imgs = xp.asarray(rng.standard_normal((B, n, n)).astype(np.float32))
    prep = prepare_particles(imgs, None, 1.0, band)
    sigma2 = xp.full(int(r) + 2, float(xp.mean(xp.abs(prep.y) ** 2)), dtype=xp.float32)
    M = band.kx.shape[0]
    grid = grids.so3_grid(2)
    shifts = xp.asarray(grids.shift_grid(SHIFT_RANGE_PX, SHIFT_STEP_PX))
    T, R = shifts.shape[0], grid.matrices.shape[0]
    projs = [class_projections(f, xp.asarray(grid.matrices), band, M) for f in fmaps]
    xc, cc, _ = weighted_terms(prep, sigma2, M)
    peak = gemm_peak(xp, min(B, 64) * T, 2 * M, R)
    flops = B * K * R * (4 * M * T + 2 * M)
    print(f"(1) GEMM ({min(B, 64) * T} x {2 * M}) @ ({2 * M} x {R}):", end="")
    print("".join(f"  {p} {v:.2f} TFLOP/s" for p, v in peak.items()))
    for p in PRECISIONS:
        dt = timed(xp, lambda p=p: score_dense(xc, cc, band, projs, shifts, keep=8, precision=p))
        tf = flops / dt / 1e12
        print(
            f"(2) dense stage {p:7s} M={M} R={R} T={T} K={K} B={B}: {tf:.2f} TFLOP/s = "
            f"{tf / peak[p]:.2f} of the {p} GEMM; {B / dt:.0f} particles/s"
        )


def estep_pass(xp, args) -> None:
    vols = blob_volumes(args.classes, args.box)
    imgs, ctf = simulate_images(vols, args.particles, args.psize, args.snr, xp)
    psize_crop = args.psize * args.box / args.crop
    vols_crop = [fourier_resize(xp.asarray(v), args.crop, 3) for v in vols]
    fmaps = [prepare_fourier_map(v, r_max=args.radius + 1) for v in vols_crop]
    band = alignment_band(args.crop, args.radius, xp)
    for p in PRECISIONS if args.all_precisions else ("float32",):
        params = SearchParams(
            radius_final=args.radius,
            order_coarse=2,
            order_final=3,
            shift_range_px=SHIFT_RANGE_PX,
            shift_step_px=SHIFT_STEP_PX,
            precision=p,
        )

        def run(params=params):
            x = fourier_resize(xp.asarray(imgs), args.crop, 2)
            prep = prepare_particles(x, ctf.to(xp), psize_crop, band)
            sigma2 = sigma2_from_residuals(prep.y, band.shell, int(args.radius) + 2)
            return estep(prep, fmaps, sigma2, params)

        dt = timed(xp, run)
        print(
            f"(3) E-step {p:7s} box {args.box} -> {args.crop}, K={args.classes}, "
            f"radius {args.radius}, B={args.particles}: {args.particles / dt:.0f} "
            f"particle-iterations/s on one {'GPU' if xp is not np else 'CPU'}"
        )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true", help="run on numpy (smoke test of the script)")
    ap.add_argument("--box", type=int, default=128)
    ap.add_argument("--crop", type=int, default=64, help="alignment box")
    ap.add_argument("--radius", type=float, default=16.0, help="alignment radius (cycles/box)")
    ap.add_argument("--classes", type=int, default=4)
    ap.add_argument("--particles", type=int, default=4096)
    ap.add_argument("--dense-particles", type=int, default=1024)
    ap.add_argument("--psize", type=float, default=2.0, help="pixel size at --box (A)")
    ap.add_argument("--snr", type=float, default=0.1)
    ap.add_argument("--all-precisions", action="store_true", help="E-step at every precision")
    args = ap.parse_args()
    if args.cpu:
        xp = np
    elif backend.gpu_available():
        xp = backend.worker_xp(prefer_gpu=True)
        print(f"GPU: {xp.cuda.runtime.getDeviceProperties(0)['name'].decode()}")
    else:
        print("bench_gpu: no CUDA GPU visible (CuPy missing or no device); nothing to measure.")
        return 0
    dense_stage(xp, args.dense_particles, args.crop, args.classes, args.radius)
    estep_pass(xp, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

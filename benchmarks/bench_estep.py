"""E-step benchmark: dense-stage GFLOP/s vs a same-run GEMM peak; one E-step pass vs RELION's.

    python benchmarks/bench_estep.py --particles 400 --seeds 0 1 2 --threads 2

(1) Dense stage (HEALPix order 2 = 4608 rotations x 21 shifts, K classes) of
:func:`hetero_dask.core.scoring.score_dense` on random data at the alignment
radius; flops = B*K*R*(4*M*T + 2*M). Peak: a float32 GEMM
(B*T x 2M) @ (2M x R) timed in the same run.

(2) One E-step pass at RELION's sampling on the SAME simulated particles,
one set of ``--particles`` per seed (moving-domain phantoms, K=4, box 64,
SNR 0.5, shifts up to 3 px): ours (coarse order 2 -> fine order 3, offset
range 5 step 2, band to ``--ini-high``) against ``relion_refine --K 4
--iter 1`` (HEALPix order 2, oversampling 1, same offsets, ``--ctf``,
``--tau2_fudge 4``, ``--ini_high``), both given the 4 true class volumes as
references (``--ref refs.star``): with a single reference RELION's first
iteration scores only one random class per particle (seed generation), a
quarter of the work. ``--ctf_corrected_ref``: the references are true
structures (without it RELION's first iteration uses |CTF| on them and
aligns nothing). Both read the images as written, on the true maps'
greyscale: RELION with ``--dont_check_norm``, ours without background
normalisation (``prepare_particles(normalize=False)``); normalised images
against maps on the raw greyscale would make every projection
``noise_sigma`` times too bright (the refine job normalises the particles and
fits the maps' greyscale to them, ``RefineParams.estimate_scale``).
RELION's time is its own "Expectation iteration 1"
progress-bar seconds (start-up, noise estimation and the M-step excluded;
the whole run's wall time is printed too). Our time is image preparation +
:func:`hetero_dask.core.search.estep` (projections included), measured
before and after the RELION run (other programs load the cores: compare
the same-run ratio). Poses evaluated per particle: ours from
``EStepResult.n_poses_evaluated``; RELION's coarse pass scores
K x 4608 rotations x 21 translations (its log's ``NrHiddenVariableSamplingPoints``
at oversampling 0) and then, for each significant coarse sample
(``rlnNrOfSignificantSamples``, adaptive fraction 0.999), 2^3 rotations x
2^2 translations = 32 oversampled ones.

(3) One E-step at the refine job's sampling of its late iterations (``--late-particles``, 0
skips it): the search the job itself builds (``jobs.refine.schedule.search_params`` with the
default ``RefineParams``) at a 8.3 A class resolution, box 64 at 1.5 A (the realistic
benchmark's geometry: alignment radius 11.6, HEALPix order 3 dense, order 4 local, 64 poses per
class), K classes, SNR 0.05; the median of ``--late-repeat`` passes in particles/s. No RELION
peer: it times the stage that dominates a refinement's late iterations.

Per set: class accuracy (best class against the truth) and median pose error
(the best class's rotation against the true one, degrees). Pooled over the
sets: 95% bootstrap intervals (particles resampled), the paired differences
ours - RELION on the same particles, and the speed ratio from the summed
times of the same run.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from hetero_dask.core import pose_grids as grids
from hetero_dask.core.noise import sigma2_from_residuals
from hetero_dask.core.projector import prepare_fourier_map
from hetero_dask.core.rotations import angle_between, euler_to_matrix, pose_to_matrix
from hetero_dask.core.scoring import (
    alignment_band,
    class_projections,
    cpu_threads,
    prepare_particles,
    score_dense,
    weighted_terms,
)
from hetero_dask.core.search import SearchParams, estep, in_particle_blocks
from hetero_dask.io.star import read_star, write_star
from hetero_dask.phantoms import moving_domain_phantoms
from hetero_dask.simulate import simulate, write_simulation

SHIFT_RANGE_PX, SHIFT_STEP_PX = 5, 2


def dense_stage(B: int, n: int, K: int, r: float) -> None:
    """Print the dense stage's GFLOP/s against a GEMM of the same shape, same run."""
    rng = np.random.default_rng(0)
    vols = [rng.standard_normal((n, n, n)).astype(np.float32) for _ in range(K)]
    fmaps = [prepare_fourier_map(v, r_max=r + 1) for v in vols]
    band = alignment_band(n, r)
    prep = prepare_particles(rng.standard_normal((B, n, n)).astype(np.float32), None, 1.0, band)
    sigma2 = np.full(int(r) + 2, float(np.mean(np.abs(prep.y) ** 2)), np.float32)
    M = band.kx.shape[0]
    grid = grids.so3_grid(2)
    shifts = grids.shift_grid(SHIFT_RANGE_PX, SHIFT_STEP_PX)
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
    # As the E-step runs it: particle blocks in threads, single-threaded BLAS each.
    threads = cpu_threads()

    def run_dense(n: int):
        return in_particle_blocks(
            lambda i, j: score_dense(xc[i:j], cc[i:j], band, projs, shifts, keep=8), n, threads
        )

    run_dense(min(B, 16 * threads))  # thread start-up and BLAS buffers outside the clock
    t0 = time.perf_counter()
    run_dense(B)
    dt = time.perf_counter() - t0
    dense = B * K * R * (4 * M * T + 2 * M) / dt / 1e9
    print(
        f"(1) dense stage M={M} R={R} T={T} K={K} B={B}, {threads} threads: {dense:.1f} GFLOP/s; GEMM peak "
        f"{peak:.1f} GFLOP/s; ratio {dense / peak:.2f}; {B / dt:.1f} particles/s"
    )


def late_stage(B: int, K: int, repeat: int, max_poses: list[int] | None = None) -> None:
    """Print section (3): one E-step at the refine job's late-iteration sampling, once per
    number of poses kept per class between stages (``max_poses``; default the job's)."""
    from hetero_dask.jobs.refine.images import image_mask_radius_px, likelihood_temperature
    from hetero_dask.jobs.refine.params import RefineParams
    from hetero_dask.jobs.refine.schedule import default_shift_range_px, radii, search_params

    n, psize, defaults = 64, 1.5, RefineParams()
    r = radii(np.full(K, 8.3), n, psize, defaults.backproject_factor)
    mask_px = image_mask_radius_px(None, n, psize)
    volumes = moving_domain_phantoms(n, psize, K)
    sim = simulate(volumes, psize, -(-B // K), 0.05, seed=0, shift_range_px=3)
    for poses in max_poses or [defaults.search_max_poses]:
        params = search_params(r, 50, replace(defaults, search_max_poses=poses), default_shift_range_px(n),
                               likelihood_temperature(n, mask_px), converged=True)
        _late_passes(sim, volumes, psize, r.align, mask_px, params, repeat)


def _late_passes(sim, volumes, psize, radius, mask_px, params, repeat: int) -> None:
    """``repeat`` timed E-step passes with ``params``; prints their median and poses scored."""
    runs = [run_ours(sim, volumes, psize, radius, mask_px, params=params) for _ in range(repeat)]
    times, res = [t for t, _ in runs], runs[-1][1]
    dt = float(np.median(times))
    print(
        f"(3) late-iteration E-step, K={len(volumes)}, box {sim.box}, alignment radius {radius:.1f}, HEALPix order "
        f"{params.order_coarse} dense -> {params.order_final} local, {params.max_poses} poses per class: "
        f"{sim.images.shape[0]} particles, median of {repeat} passes {dt:.2f} s ({sim.images.shape[0] / dt:.1f} "
        f"particles/s; passes {', '.join(f'{t:.2f}' for t in times)} s), "
        f"{int(np.median(res.n_poses_evaluated))} poses evaluated per particle"
    )


def write_relion_inputs(work: Path, sim, volumes) -> tuple[Path, Path]:
    """Simulation files plus ``parts.star`` (no angles, origins or classes) and ``refs.star``."""
    paths = write_simulation(work, sim, volumes)
    blocks = read_star(paths["star"])
    drop = ["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst"]
    blocks["particles"] = blocks["particles"].drop(columns=drop + ["rlnClassNumber"])
    write_star(work / "parts.star", blocks)
    refs = [paths[f"volume_{k:02d}"].name for k in range(len(volumes))]
    write_star(work / "refs.star", {"": pd.DataFrame({"rlnReferenceImage": refs})})
    return work / "parts.star", work / "refs.star"


def relion_coarse_radius(n: int, psize_A: float, diameter_A: float, radius: float) -> float:
    """RELION's coarse-pass band radius (shells) for HEALPix order 2 (15 degrees).

    MlOptimiser::updateImageSizeAndResolutionPointers: rotated_distance =
    15/360 * pi * diameter, coarse_ires = round(1.2 * n * psize / rotated_distance),
    at most the current radius.
    """
    rotated_distance = grids.angular_step_deg(2) / 360.0 * np.pi * diameter_A
    return float(min(radius, round(1.2 * n * psize_A / rotated_distance)))


def run_ours(sim, volumes, psize_A: float, radius: float, mask_radius_px: float, r_coarse=None,
             params: SearchParams | None = None):
    """Image preparation + E-step on the simulated images; returns (seconds, EStepResult).
    ``params``: the search (default: RELION's sampling of section (2))."""
    n = sim.box
    band = alignment_band(n, radius)
    fmaps = [prepare_fourier_map(v, r_max=radius + 1) for v in volumes]
    params = params or SearchParams(
        radius_final=radius,
        radius_coarse=r_coarse,
        order_coarse=2,
        order_final=3,
        shift_range_px=SHIFT_RANGE_PX,
        shift_step_px=SHIFT_STEP_PX,
    )
    t0 = time.perf_counter()
    # The images as written, as RELION reads them: the true maps are on their greyscale.
    prep = prepare_particles(
        sim.images, sim.ctf, psize_A, band, mask_radius_px=mask_radius_px, normalize=False
    )
    sigma2 = sigma2_from_residuals(prep.y, band.shell, int(radius) + 2)  # RELION's start too
    res = estep(prep, fmaps, sigma2, params)
    return time.perf_counter() - t0, res


def run_relion(work: Path, parts: Path, refs: Path, args) -> dict:
    """Run ``relion_refine --K --iter 1``; return its command, times and pose counts."""
    cmd = [
        "relion_refine", "--i", parts.name, "--ref", refs.name, "--o", "out/run",
        "--K", str(args.classes), "--iter", "1", "--healpix_order", "2", "--oversampling", "1",
        "--offset_range", str(SHIFT_RANGE_PX), "--offset_step", str(SHIFT_STEP_PX),
        "--ctf", "--ctf_corrected_ref",
        "--tau2_fudge", "4", "--particle_diameter", str(args.particle_diameter),
        "--ini_high", str(args.ini_high), "--j", str(args.threads), "--pool", "3",
        "--pad", "2", "--dont_check_norm", "--random_seed", "0",
        "--dont_combine_weights_via_disc",
    ]  # fmt: skip
    (work / "out").mkdir(exist_ok=True)
    t0 = time.perf_counter()
    proc = subprocess.run(
        cmd, cwd=work, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    wall = time.perf_counter() - t0
    log = proc.stdout
    (work / "out" / "relion.log").write_text(log)
    if proc.returncode != 0:
        raise RuntimeError(f"relion_refine failed ({proc.returncode}):\n{log[-3000:]}")
    expectation = log.split("Expectation iteration")[1].split("Maximization")[0]
    # Progress bar lines "elapsed/estimated unit"; the last one holds the total.
    _, total, unit = re.findall(r"([\d.]+)/\s*([\d.]+) (sec|min|hrs)", expectation)[-1]
    e_sec = float(total) * {"sec": 1, "min": 60, "hrs": 3600}[unit]
    coarse = int(re.search(r"Oversampling= 0 NrHiddenVariableSamplingPoints= (\d+)", log)[1])
    fine = int(re.search(r"Oversampling= 1 NrHiddenVariableSamplingPoints= (\d+)", log)[1])
    data = read_star(work / "out" / "run_it001_data.star")["particles"]
    n_sig = data["rlnNrOfSignificantSamples"].to_numpy(dtype=np.float64)
    return {
        "cmd": " ".join(cmd),
        "wall_s": wall,
        "expectation_s": e_sec,
        "poses": coarse + (fine // coarse) * n_sig.mean(),
        "coarse": coarse,
        "fine_factor": fine // coarse,
        "n_sig": n_sig.mean(),
        "classes": data["rlnClassNumber"].to_numpy(dtype=np.int64) - 1,
        "rotations": euler_to_matrix(
            data["rlnAngleRot"].to_numpy(np.float64),
            data["rlnAngleTilt"].to_numpy(np.float64),
            data["rlnAnglePsi"].to_numpy(np.float64),
        ).swapaxes(-1, -2),
    }


def ci95(stat, *arrays, n_boot: int = 2000) -> tuple[float, float]:
    """95% bootstrap interval of ``stat(*arrays)``, particles resampled (paired across arrays)."""
    rng = np.random.default_rng(0)
    n = len(arrays[0])
    draws = [stat(*(a[idx] for a in arrays)) for idx in rng.integers(0, n, (n_boot, n))]
    lo, hi = np.percentile(draws, [2.5, 97.5])
    return float(lo), float(hi)


def one_set(args, volumes, seed: int, radius: float, mask_px: float, r_coarse: float) -> dict:
    """Ours and (unless skipped) RELION on one simulated set; per-particle results and times."""
    K = args.classes
    sim = simulate(
        volumes, args.psize, -(-args.particles // K), args.snr, seed=seed, shift_range_px=3
    )
    t_before, res = run_ours(sim, volumes, args.psize, radius, mask_px, r_coarse)
    R_true = pose_to_matrix(sim.poses)
    R_ours = res.rotation[np.arange(sim.n), res.best_class].astype(np.float64)
    out = {
        "n": sim.n,
        "ours_ok": np.asarray(res.best_class) == sim.classes,
        "ours_err": np.rad2deg(angle_between(R_ours, R_true)),
        "ours_poses": float(np.mean(res.n_poses_evaluated)),
        "t_ours": [t_before],
    }
    line = (
        f"    seed {seed}: {sim.n} particles; ours {t_before:.1f} s, {out['ours_poses']:.0f} poses "
        f"evaluated per particle, class accuracy {out['ours_ok'].mean():.3f}, median pose error "
        f"{np.median(out['ours_err']):.2f} deg"
    )
    if not args.run_relion:
        print(line, flush=True)
        return out
    work = (args.workdir or Path(tempfile.mkdtemp(prefix="bench_estep_"))) / f"seed{seed}"
    work.mkdir(parents=True, exist_ok=True)
    parts, refs = write_relion_inputs(work, sim, volumes)
    rel = run_relion(work, parts, refs, args)
    t_after, _ = run_ours(sim, volumes, args.psize, radius, mask_px, r_coarse)
    out["t_ours"].append(t_after)
    out.update(
        rel_ok=rel["classes"] == sim.classes,
        rel_err=np.rad2deg(angle_between(rel["rotations"], R_true)),
        rel=rel,
    )
    print(
        f"{line} ({t_after:.1f} s after RELION); RELION expectation {rel['expectation_s']:.0f} s "
        f"({rel['wall_s']:.0f} s whole run), poses per particle {rel['poses']:.0f} = "
        f"{rel['coarse']} coarse + {rel['fine_factor']} x {rel['n_sig']:.2f} significant, class "
        f"accuracy {out['rel_ok'].mean():.3f}, median pose error {np.median(out['rel_err']):.2f} deg",
        flush=True,
    )
    if args.workdir is None:
        shutil.rmtree(work.parent)
    return out


def summarise(sets: list[dict], run_relion: bool) -> None:
    """Pooled accuracy and pose error with 95% intervals, paired differences, same-run speed ratio."""
    cat = {k: np.concatenate([s[k] for s in sets]) for k in sets[0] if k.endswith(("_ok", "_err"))}
    n = sum(s["n"] for s in sets)
    t_ours = sum(float(np.mean(s["t_ours"])) for s in sets)

    def fmt(x, ci, digits, sign=""):
        return f"{x:{sign}.{digits}f} [{ci[0]:{sign}.{digits}f}, {ci[1]:{sign}.{digits}f}]"

    ok, err = cat["ours_ok"].astype(np.float64), cat["ours_err"]
    print(
        f"    pooled, {n} particles (95% bootstrap intervals): ours class accuracy "
        f"{fmt(ok.mean(), ci95(np.mean, ok), 3)}, median pose error "
        f"{fmt(np.median(err), ci95(np.median, err), 2)} deg; {n / t_ours:.1f} particle-iterations/s"
    )
    if not run_relion:
        return
    rok, rerr = cat["rel_ok"].astype(np.float64), cat["rel_err"]
    t_rel = sum(s["rel"]["expectation_s"] for s in sets)
    wall_rel = sum(s["rel"]["wall_s"] for s in sets)

    def d_med(a, b):
        return np.median(a) - np.median(b)

    print(
        f"    RELION class accuracy {fmt(rok.mean(), ci95(np.mean, rok), 3)}, median pose error "
        f"{fmt(np.median(rerr), ci95(np.median, rerr), 2)} deg; {n / t_rel:.2f} particle-iterations/s"
    )
    print(
        f"    ours - RELION (paired): class accuracy {fmt((ok - rok).mean(), ci95(np.mean, ok - rok), 3, '+')} "
        f"({int(np.sum(ok > rok))} particles right in ours only, {int(np.sum(rok > ok))} in RELION's "
        f"only); median pose error {fmt(d_med(err, rerr), ci95(d_med, err, rerr), 2, '+')} deg"
    )
    print(
        f"    speed ratio ours/RELION {t_rel / t_ours:.1f}x (expectation; whole RELION run "
        f"{wall_rel / t_ours:.1f}x); per set: "
        + ", ".join(f"{s['rel']['expectation_s'] / np.mean(s['t_ours']):.1f}x" for s in sets)
    )


def _whole_number(text: str) -> int:
    """An argument that must be a whole number >= 1 (poses kept per class)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--particles", type=int, default=400, help="simulated particles per set")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one set per seed")
    ap.add_argument("--dense-particles", type=int, default=256)
    ap.add_argument("--box", type=int, default=64)
    ap.add_argument("--classes", type=int, default=4)
    ap.add_argument("--psize", type=float, default=4.0, help="pixel size (A)")
    ap.add_argument("--snr", type=float, default=0.5)
    ap.add_argument("--ini-high", type=float, default=20.0, help="alignment resolution (A)")
    ap.add_argument("--particle-diameter", type=float, default=200.0, help="(A)")
    ap.add_argument("--threads", type=int, default=2, help="relion_refine --j")
    ap.add_argument("--workdir", type=Path, default=None, help="kept if given")
    ap.add_argument("--skip-relion", action="store_true")
    ap.add_argument("--late-particles", type=int, default=1000, help="section (3); 0 skips it")
    ap.add_argument("--late-repeat", type=int, default=3)
    ap.add_argument("--late-poses", type=_whole_number, nargs="+", default=None,
                    help="section (3) once per value of poses kept per class between stages "
                         "(default: the job's search_max_poses)")
    args = ap.parse_args()
    args.run_relion = not args.skip_relion and shutil.which("relion_refine") is not None
    n, K = args.box, args.classes
    # RELION rounds ini_high to a whole Fourier shell; use the same band radius.
    radius = float(round(n * args.psize / args.ini_high))
    dense_stage(args.dense_particles, n, K, radius)
    if args.late_particles:
        late_stage(args.late_particles, K, args.late_repeat, args.late_poses)

    volumes = moving_domain_phantoms(n, args.psize, K)
    mask_px = args.particle_diameter / (2 * args.psize)
    r_coarse = relion_coarse_radius(n, args.psize, args.particle_diameter, radius)
    print(
        f"(2) E-step pass, K={K}, box {n}, band radius {radius:g} ({n * args.psize / radius:.1f} A; "
        f"coarse pass {r_coarse:g}, as RELION's coarse_size), SNR {args.snr}, seeds {args.seeds}"
    )
    if not args.run_relion:
        print("    relion_refine skipped (not requested or not on PATH)")
    sets = [one_set(args, volumes, s, radius, mask_px, r_coarse) for s in args.seeds]
    summarise(sets, args.run_relion)
    if args.run_relion:
        print(f"    RELION: {sets[0]['rel']['cmd']}")


if __name__ == "__main__":
    main()

"""Heterogeneous Refinement vs ``relion_refine --K 2``: class accuracy and time to an answer.

The moving-domain accuracy set: two classes differing by a domain
(:func:`hetero_dask.phantoms.moving_domain_phantoms`), CTF, SNR 0.05, box 64,
``--n-per-class`` particles per class. Printed, all from the same run:

1. the oracle's accuracy: our E-step on the TRUE maps with the TRUE noise
   power, marginalising over the pose grid (HEALPix order 2 -> 3, the
   simulation's shift range at 1 px) — a yardstick, not a bound (it shares the
   E-step's approximations);
2. ``hetero_dask.refine`` from the truth low-passed to 30 A (one reference
   per class), or with ``--consensus`` from K copies of the consensus (the mean
   of the true maps, low-passed): wall time from the particle file to the final
   classes, and the accuracy up to the label swap;
3. ``relion_refine --K 2`` on the same particles and references (HEALPix
   order 2, oversampling 1, offset range 5 step 2, tau2_fudge 4,
   --ctf --ctf_corrected_ref): its first ``--relion-iter`` iterations are run
   and timed, accuracy from the last one's ``rlnClassNumber`` (matched to the
   truth by image name); the time to 25 iterations (RELION's default) is
   EXTRAPOLATED from its last measured iteration.

Example: python benchmarks/bench_refine.py --n-per-class 400 --workdir /tmp/bench_refine
The consensus start: python benchmarks/bench_refine.py --n-per-class 400 --swing 180
--domain-weight 1.3 --consensus --skip-relion
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from hetero_dask.io.cs import read_cs
from hetero_dask.io.star import read_star, write_star
from hetero_dask.jobs.refine import RefineParams, refine
from hetero_dask.phantoms import moving_domain_phantoms
from hetero_dask.simulate import (
    agreement,
    oracle_accuracy,
    simulate,
    write_references,
    write_simulation,
)
from hetero_dask.testing.relion import cpu_seconds

RELION_DEFAULT_ITERATIONS = 25






def write_inputs(work: Path, volumes, sim, ref_lowpass_A: float, consensus: bool = False) -> dict:
    """Simulation files, references (truth low-passed; ``consensus``: K copies of the mean of
    the true maps, low-passed), RELION's particle and reference STARs."""
    paths = write_simulation(work / "sim", sim, volumes)
    starts = np.repeat(volumes.mean(axis=0)[None], len(volumes), axis=0) if consensus else volumes
    refs = [Path(p) for p in write_references(work / "sim", starts, sim.psize_A, ref_lowpass_A)]
    blocks = read_star(paths["star"])
    drop = ["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst", "rlnClassNumber"]
    blocks["particles"] = blocks["particles"].drop(columns=[c for c in drop if c in blocks["particles"]])
    write_star(work / "sim" / "relion_particles.star", blocks)
    write_star(work / "sim" / "relion_refs.star", {"": pd.DataFrame({"rlnReferenceImage": [p.name for p in refs]})})
    names = blocks["particles"]["rlnImageName"].to_numpy()
    return dict(cs=paths["cs"], refs=refs, relion_particles=work / "sim" / "relion_particles.star",
                relion_refs=work / "sim" / "relion_refs.star", image_names=names)


def run_ours(inputs: dict, work: Path, args) -> tuple[float, np.ndarray, dict]:
    """``refine`` from the references; returns (wall seconds, best class, dict: report, params,
    cpu = CPU seconds of this process, all threads: the in-process scheduler runs every task here)."""
    out = work / "ours"
    shutil.rmtree(out, ignore_errors=True)
    params = dict(refine_box=args.box, batch_size_per_class=args.batch_size_per_class,
                  max_iterations=args.max_iterations, num_random_iterations=0,
                  initial_lowpass_A=args.ref_lowpass, initial_sigma_scale=args.initial_sigma_scale,
                  max_order=args.max_order, seed=args.seed)
    t0, c0 = time.perf_counter(), time.process_time()
    report = refine(str(inputs["cs"]), [str(p) for p in inputs["refs"]], out, client=None, progress=False, **params)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    best = read_cs(out / "particles.cs")["alignments3D/class"]
    return wall, np.asarray(best), dict(report=report, params=params, cpu=cpu)


def relion_command(inputs: dict, args) -> list[str]:
    return [
        "relion_refine", "--i", inputs["relion_particles"].name, "--ref", inputs["relion_refs"].name,
        "--o", "relion/run", "--K", "2", "--iter", str(args.relion_iter),
        "--healpix_order", "2", "--oversampling", "1", "--offset_range", "5", "--offset_step", "2",
        "--tau2_fudge", "4", "--ctf", "--ctf_corrected_ref", "--particle_diameter", str(args.particle_diameter),
        "--ini_high", "30", "--j", str(args.relion_threads), "--pool", "3", "--pad", "2",
        "--dont_combine_weights_via_disc", "--random_seed", str(args.seed),
    ]  # fmt: skip


def run_relion(inputs: dict, work: Path, args) -> dict:
    """Run ``relion_refine``; wall and CPU time at the end of each iteration (its data.star appearing).

    CPU seconds matter on a shared machine: wall time there depends on the other load.
    """
    cwd = inputs["relion_particles"].parent
    (cwd / "relion").mkdir(exist_ok=True)
    cmd = relion_command(inputs, args)
    log = open(cwd / "relion" / "relion.log", "w")
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, text=True)
    wall_marks, cpu_marks = [0.0], [0.0]  # index i + 1: iteration i's data.star written
    cpu = 0.0
    while proc.poll() is None:
        cpu = cpu_seconds(proc.pid) or cpu
        i = len(wall_marks) - 1
        if (cwd / "relion" / f"run_it{i:03d}_data.star").exists():
            wall_marks.append(time.time() - t0)
            cpu_marks.append(cpu)
        time.sleep(0.5)
    log.close()
    if proc.returncode != 0:
        tail = (cwd / "relion" / "relion.log").read_text()[-3000:]
        raise RuntimeError(f"relion_refine failed ({proc.returncode}):\n{tail}")
    while len(wall_marks) < args.relion_iter + 2:  # the last iteration ends with the process
        wall_marks.append(time.time() - t0)
        cpu_marks.append(cpu)
    data = read_star(cwd / "relion" / f"run_it{args.relion_iter:03d}_data.star")["particles"]
    index = {name: i for i, name in enumerate(inputs["image_names"])}
    order = np.array([index[name] for name in data["rlnImageName"]])
    classes = np.full(len(inputs["image_names"]), -1)
    classes[order] = data["rlnClassNumber"].to_numpy(dtype=np.int64) - 1
    rest = RELION_DEFAULT_ITERATIONS - args.relion_iter
    per_it_wall, per_it_cpu = np.diff(wall_marks[1:]), np.diff(cpu_marks[1:])
    return dict(cmd=" ".join(cmd), cwd=cwd, setup=wall_marks[1], per_iteration=per_it_wall,
                per_iteration_cpu=per_it_cpu, measured=wall_marks[-1], measured_cpu=cpu_marks[-1],
                extrapolated=wall_marks[-1] + rest * per_it_wall[-1],
                extrapolated_cpu=cpu_marks[-1] + rest * per_it_cpu[-1], classes=classes)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-per-class", type=int, default=400)
    ap.add_argument("--box", type=int, default=64)
    ap.add_argument("--psize", type=float, default=4.0, help="pixel size (A)")
    ap.add_argument("--snr", type=float, default=0.05)
    ap.add_argument("--shift-range", type=float, default=2.0, help="simulated shifts, disc radius (px)")
    ap.add_argument("--ref-lowpass", type=float, default=30.0, help="references: truth low-passed to (A)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--swing", type=float, default=90.0, help="domain swing between the classes (deg)")
    ap.add_argument("--domain-weight", type=float, default=1.0, help="domain density (phantoms)")
    ap.add_argument("--batch-size-per-class", type=int, default=1000,
                    help="online-EM batch per class (>= particles per class: full EM passes)")
    ap.add_argument("--max-iterations", type=int, default=15)
    ap.add_argument("--initial-sigma-scale", type=float, default=None,
                    help="default 1 from references, the job's default (3) with --consensus")
    ap.add_argument("--consensus", action="store_true",
                    help="references: K copies of the consensus (mean of the true maps, low-passed)")
    ap.add_argument("--max-order", type=int, default=3,
                    help="finest HEALPix order (3: 7.5 deg, enough for the 20-30 A alignment band here)")
    ap.add_argument("--particle-diameter", type=float, default=180.0, help="relion --particle_diameter (A)")
    ap.add_argument("--relion-iter", type=int, default=3)
    ap.add_argument("--relion-threads", type=int, default=2)
    ap.add_argument("--skip-relion", action="store_true")
    ap.add_argument("--skip-oracle", action="store_true")
    ap.add_argument("--skip-ours", action="store_true")
    ap.add_argument("--workdir", type=Path, default=None, help="kept if given")
    args = ap.parse_args()
    if args.initial_sigma_scale is None:
        args.initial_sigma_scale = RefineParams.initial_sigma_scale if args.consensus else 1.0

    volumes = moving_domain_phantoms(args.box, args.psize, n_classes=2, swing_deg=args.swing,
                                     domain_weight=args.domain_weight)
    sim = simulate(volumes, args.psize, args.n_per_class, snr=args.snr, seed=args.seed,
                   shift_range_px=args.shift_range)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_refine_"))
    work.mkdir(parents=True, exist_ok=True)
    inputs = write_inputs(work, volumes, sim, args.ref_lowpass, consensus=args.consensus)
    starts = "copies of the consensus (mean of the true maps)" if args.consensus else "truth"
    print(f"data: {sim.n} particles ({args.n_per_class} per class), box {args.box}, {args.psize} A/px, "
          f"SNR {args.snr}, CTF, shifts <= {args.shift_range} px; references = {starts} low-passed to "
          f"{args.ref_lowpass} A (in {work})", flush=True)

    oracle = acc_ours = t_ours = cpu_ours = float("nan")
    if not args.skip_oracle:
        t0 = time.perf_counter()
        oracle = oracle_accuracy(volumes, sim, args.shift_range)
        print(f"(1) oracle (our E-step on the true maps, true noise power, pose grid order 2->3): {oracle:.3f} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    if not args.skip_ours:
        t_ours, cpu_ours, acc_ours = report_ours(inputs, work, sim, oracle, args)
    if args.skip_relion or shutil.which("relion_refine") is None:
        print("relion_refine skipped (not requested or not on PATH)")
        if args.workdir is None:
            shutil.rmtree(work)
        return
    rel = run_relion(inputs, work, args)
    acc_rel = agreement(rel["classes"], sim.classes)
    rest = RELION_DEFAULT_ITERATIONS - args.relion_iter
    print(f"(3) RELION: {rel['cmd']}  (in {rel['cwd']})")
    print(f"    setup {rel['setup']:.0f} s; iterations {np.round(rel['per_iteration'], 0).tolist()} s wall, "
          f"{np.round(rel['per_iteration_cpu'], 0).tolist()} s CPU; accuracy after {args.relion_iter} "
          f"iterations {acc_rel:.3f}")
    print(f"    RELION time to {RELION_DEFAULT_ITERATIONS} iterations: EXTRAPOLATED {rel['extrapolated']:.0f} s wall "
          f"/ {rel['extrapolated_cpu']:.0f} s CPU (measured {rel['measured']:.0f} s wall / "
          f"{rel['measured_cpu']:.0f} s CPU for {args.relion_iter} iterations + {rest} x its last iteration)")
    print(f"summary: oracle {oracle:.3f} | ours {acc_ours:.3f} in {t_ours:.0f} s wall / {cpu_ours:.0f} s CPU | "
          f"RELION {acc_rel:.3f} after {args.relion_iter} iterations, 25 iterations EXTRAPOLATED "
          f"{rel['extrapolated']:.0f} s wall / {rel['extrapolated_cpu']:.0f} s CPU | ratio RELION/ours "
          f"{rel['extrapolated'] / t_ours:.1f}x wall, {rel['extrapolated_cpu'] / cpu_ours:.1f}x CPU "
          f"(RELION's {args.relion_iter} measured iterations alone: {rel['measured'] / t_ours:.1f}x wall, "
          f"{rel['measured_cpu'] / cpu_ours:.1f}x CPU)")
    if args.workdir is None:
        shutil.rmtree(work)


def report_ours(inputs: dict, work: Path, sim, oracle: float, args) -> tuple[float, float, float]:
    t_ours, best, info = run_ours(inputs, work, args)
    acc_ours = agreement(best, sim.classes)
    n_it = len(info["report"]["iterations"])
    print(f"(2) hetero_dask.refine({', '.join(f'{k}={v}' for k, v in info['params'].items())}), "
          f"in-process scheduler: {n_it} iterations, {t_ours:.1f} s wall / {info['cpu']:.0f} s CPU to the "
          f"final classes; accuracy {acc_ours:.3f}; resolution "
          f"{[round(c['resolution_A'], 1) for c in info['report']['classes']]} A", flush=True)
    target = "target from a consensus: accuracy >= 0.90" if args.consensus else "target >= -3"
    print(f"    ours - oracle = {100 * (acc_ours - oracle):+.1f} points ({target})", flush=True)
    return t_ours, info["cpu"], acc_ours


if __name__ == "__main__":
    main()

"""Heterogeneous Refinement: classify particles into K classes while refining K structures.

Example: hetero-dask refine --particles J42_particles.cs --volumes a.mrc b.mrc c.mrc
--out hetero/ --box 128 --symmetry C1 --workers 2
"""

from __future__ import annotations

import argparse
import os
import shlex
import time
from pathlib import Path

from hetero_dask.io.cache import add_store_arguments, names_folder
from hetero_dask.jobs.preflight import check_refine, describe_run
from hetero_dask.jobs.refine import REFERENCE_MODES, RefineParams, refine
from hetero_dask.report.summary import print_summary
from hetero_dask.runtime.checkpoint import read_status
from hetero_dask.runtime.cluster import add_cluster_arguments, client_from_args, cluster_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = RefineParams()
    parser.add_argument("--particles", required=True, help="particles: .cs, .star or a particle store (.zarr)")
    parser.add_argument("--volumes", required=True, nargs="+",
                        help="initial volumes: one .mrc per class, a folder, or a volumes.zip of another run")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--stack-dir", help="folder to find particle stacks in (if not beside the metadata)")
    parser.add_argument("--box", type=int, default=d.refine_box,
                        help="refinement box (even, >= 16): the particles are Fourier-cropped or padded to it "
                             "(default: the particles' box, at most 128)")
    parser.add_argument("--symmetry", default=d.symmetry,
                        help="point group: C<n>, D<n>, T, O, I (default C1); under C2, C4, D2, D4 the pose search "
                             "starts from one asymmetric unit of its grid")
    parser.add_argument("--symmetry-convention", choices=("cryosparc", "relion"), default=d.symmetry_convention,
                        help="D<n> 2-fold along y (cryosparc) or x (relion)")
    parser.add_argument("--hard", action="store_true", help="force hard classification")
    parser.add_argument("--flip-contrast", action="store_true",
                        help="multiply the images by -1 (protein-dark stacks; blob/sign is negated in the outputs)")
    parser.add_argument("--mask-diameter", type=float, help="inner diameter of the spherical window mask (A)")
    parser.add_argument("--mask-diameter-outer", type=float, help="outer diameter (A; default 1.2x inner)")
    parser.add_argument("--batch-size", type=int, default=d.batch_size_per_class,
                        help=f"online-EM batch size per class (default {d.batch_size_per_class})")
    parser.add_argument("--random-iterations", type=int, default=d.num_random_iterations,
                        help=f"initial random-assignment iterations (default {d.num_random_iterations})")
    parser.add_argument("--initial-lowpass", type=float, default=d.initial_lowpass_A,
                        help=f"initial low-pass resolution (A, default {d.initial_lowpass_A})")
    parser.add_argument("--sigma-scale", type=float, default=d.initial_sigma_scale,
                        help=f"initial noise sigma scale, annealed to the final one (default {d.initial_sigma_scale})")
    parser.add_argument("--final-sigma-scale", type=float, default=d.final_sigma_scale,
                        help="sigma scale the annealing ends at (default "
                        f"{d.final_sigma_scale}: tempers the overconfident likelihood of masked, "
                        "correlated Fourier coefficients; 1 = CryoSPARC's)")
    parser.add_argument("--max-order", type=int, default=d.max_order,
                        help=f"finest HEALPix order of the pose search (default {d.max_order})")
    parser.add_argument("--search-poses", type=int, default=d.search_max_poses,
                        help="poses of each class refined at every finer stage of the pose search "
                             f"(default {d.search_max_poses}); more costs time and keeps more of a broad "
                             "pose posterior")
    parser.add_argument("--reference-mode", choices=REFERENCE_MODES, default=d.reference_mode,
                        help="score each half-set against the other half's maps (cross), its own (half) or the "
                             "full map (full)")
    parser.add_argument("--iterations", type=int, default=d.max_iterations,
                        help=f"at most this many EM iterations in all, the {d.final_full_passes} final full "
                             f"passes included (default {d.max_iterations}); the run ends earlier when it "
                             "converges")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out from its last completed iteration (same parameters "
                             "and inputs)")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--quiet", action="store_true", help="no progress output (bars or lines)")
    parser.add_argument("--detach", action="store_true",
                        help="with --scheduler: run the job on the cluster and return at once; it survives "
                             "this command exiting (follow it with hetero-dask status OUT)")
    add_store_arguments(parser)
    add_cluster_arguments(parser)


def main(args: argparse.Namespace) -> int:
    params = dict(
        refine_box=args.box, symmetry=args.symmetry, symmetry_convention=args.symmetry_convention,
        force_hard_classification=args.hard, mask_diameter_A=args.mask_diameter,
        mask_diameter_outer_A=args.mask_diameter_outer, batch_size_per_class=args.batch_size,
        num_random_iterations=args.random_iterations, initial_lowpass_A=args.initial_lowpass,
        max_iterations=args.iterations, seed=args.seed, initial_sigma_scale=args.sigma_scale,
        max_order=args.max_order, search_max_poses=args.search_poses, reference_mode=args.reference_mode,
        final_sigma_scale=args.final_sigma_scale, flip_contrast=args.flip_contrast,
    )
    volumes = args.volumes[0] if len(args.volumes) == 1 else args.volumes
    if args.detach:
        return _detach(args, volumes, params)
    report = refine(args.particles, volumes, args.out, client=cluster_from_args(args, quiet=args.quiet),
                    stack_dir=args.stack_dir, cache_dir=args.cache_dir, image_dtype=args.image_dtype,
                    resume=args.resume, progress=False if args.quiet else None,
                    **params)
    print_summary(report, args.out)
    return 0


def interrupted(args: argparse.Namespace) -> str:
    """Where an interrupted run stopped, and the command that continues it."""
    status = read_status(Path(args.out) / "run") if (Path(args.out) / "run").is_dir() else None
    if status is None or status.get("pid") != os.getpid():
        return "interrupted before the run started; nothing was written or changed"
    where = describe_run(status).replace("interrupted ", "", 1)
    return f"interrupted {where}; continue with: {resume_command(args)}"


def resume_command(args: argparse.Namespace) -> str:
    """The command the user typed, with ``--resume``."""
    argv = list(getattr(args, "argv", None) or [args.command, "--out", str(args.out)])
    return shlex.join(["hetero-dask", *argv, *([] if "--resume" in argv else ["--resume"])])


def refine_job(job: dict, client) -> dict:
    """Driver of a detached refinement (:func:`hetero_dask.submit` runs it on a worker).

    The run records its own failure or interruption in ``OUT/run/status.json``
    (:func:`~hetero_dask.runtime.checkpoint.run_status`). When the worker holding the
    driver dies, Dask starts this function again elsewhere: finding its own run record
    (``_detach`` refused a folder holding another run before submitting), it resumes.
    """
    resume = job["resume"] or (Path(job["out"]) / "run" / "run.json").is_file()
    # The default client for code that looks one up (e.g. distributed.as_completed).
    with client.as_current():
        report = refine(job["particles"], job["volumes"], job["out"], client=client,
                        stack_dir=job["stack_dir"], cache_dir=job.get("cache_dir"),
                        image_dtype=job.get("image_dtype", "float32"), resume=resume, progress=False,
                        **job["params"])
    return {"report": str(Path(job["out"]) / "report.json"),
            "resolution_A": [c["resolution_A"] for c in report["classes"]]}


def _detach(args: argparse.Namespace, volumes, params: dict, wait_s: float = 60.0) -> int:
    """Submit :func:`refine_job` to ``--scheduler``; print the job id and run directory."""
    from hetero_dask.runtime.submit import submit

    if not args.scheduler:
        raise ValueError("--detach needs --scheduler ADDRESS (a local cluster ends with this command)")
    # Checked here, before the job is submitted: the workers see the same files (shared filesystem).
    check_refine(args.particles, volumes, args.out, stack_dir=args.stack_dir, resume=args.resume, **params)
    # Workers may run elsewhere: absolute paths (on a filesystem they share).
    absolute = lambda p: None if p is None else str(Path(p).resolve())  # noqa: E731
    out = Path(absolute(args.out))
    job = dict(particles=absolute(args.particles),
               volumes=absolute(volumes) if isinstance(volumes, str) else [absolute(v) for v in volumes],
               out=str(out), stack_dir=absolute(args.stack_dir), resume=args.resume, params=params,
               cache_dir=absolute(args.cache_dir) if names_folder(args.cache_dir) else args.cache_dir,
               image_dtype=args.image_dtype)
    with client_from_args(args, quiet=True) as client:
        handle = submit(refine_job, job, client, run_dir=out / "run")
        deadline = time.monotonic() + wait_s
        while handle.status()["state"] == "unknown" and time.monotonic() < deadline:
            time.sleep(0.2)  # until the driver runs: the scheduler holds the job, not this client
        state = handle.status()["state"]
    print(f"job {handle.job_id} submitted to {args.scheduler} ({state})")
    print(f"run dir {out / 'run'} (follow with: hetero-dask status {out})")
    return 0

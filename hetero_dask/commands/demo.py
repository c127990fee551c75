"""Run the whole product on a simulated two-state dataset: simulate, refine, regroup, reconstruct.

Simulates particles of two built-in moving-domain phantoms (CTF, noise),
runs Heterogeneous Refinement with three starting maps on a local Dask
cluster, regroups the three classes into two superclasses, reconstructs
them, and prints where the results are and how well the two states were
recovered against the simulation's truth (also in OUT/demo_summary.json).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out", default="hetero_dask_demo", help="output folder (default ./hetero_dask_demo)"
    )
    parser.add_argument(
        "--size",
        choices=("default", "ci"),
        default="default",
        help="default: box 64, 1600 particles, SNR 0.15; ci: box 48, 600 particles, SNR 0.5",
    )
    parser.add_argument("--workers", type=int, help="local Dask workers (default: one per core)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted demo in --out (without it, an earlier demo there is replaced)",
    )


def main(args: argparse.Namespace) -> int:
    from hetero_dask.jobs.demo import run_demo

    s = run_demo(
        args.out,
        size=args.size,
        workers=args.workers,
        seed=args.seed,
        progress=False if args.quiet else None,
        resume=args.resume,
    )
    t = s["timings_s"]
    print()
    print(f"simulated particles and truth:   {s['simulation']['folder']}")
    print(
        f"heterogeneous refinement (K={s['refine']['n_classes']}): {s['refine']['folder']} "
        f"(report.json, particles.cs/.star, class_*/map.mrc)"
    )
    print(
        f"regroup into 2 superclasses:     {s['regroup']['folder']} "
        f"(classes -> superclasses {s['regroup']['superclass_of_class']})"
    )
    print(
        f"reconstruction of the 2 groups:  {s['reconstruct']['folder']} "
        f"(class_*/map.mrc, resolutions {[round(r, 1) for r in s['reconstruct']['resolution_A']]} A)"
    )
    print(
        f"refined classes' purity {s['refine']['class_purity']:.3f}; two-state accuracy after regroup "
        f"{s['accuracy']:.3f} (chance {s['chance_accuracy']:.2f}): "
        f"{'classes recovered' if s['classes_recovered'] else 'classes NOT recovered'}"
    )
    print(
        f"total {t['total_s']:.0f} s (refine {t['refine_s']:.0f} s); summary in {args.out}/demo_summary.json"
    )
    for job, page in s["reports"].items():
        print(f"report of {job}: {page}")
    return 0


def interrupted(args: argparse.Namespace) -> str:
    """Where the demo stopped, and the command that continues it."""
    from hetero_dask.commands.refine import resume_command
    from hetero_dask.jobs.preflight import describe_run
    from hetero_dask.runtime.checkpoint import read_status

    status = read_status(Path(args.out) / "refine" / "run")
    where = "before the refinement"
    if status is not None and status.get("pid") == os.getpid():
        where = ("after the refinement" if status.get("state") == "done"
                 else "during the refinement, " + describe_run(status).replace("interrupted ", "", 1))
    return f"interrupted {where}; continue with: {resume_command(args)}"

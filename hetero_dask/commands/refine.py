"""Heterogeneous Refinement: classify particles into K classes while refining K structures.

Example: hetero-dask refine --particles J42_particles.cs --volumes a.mrc b.mrc c.mrc
--out hetero/ --box 128 --symmetry C1 --workers 2
"""

from __future__ import annotations

import argparse
import json

from hetero_dask.dist.cluster import add_cluster_arguments, client_from_args
from hetero_dask.jobs.refine import RefineParams, refine


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = RefineParams()
    parser.add_argument("--particles", required=True, help="particles: .cs, .star or a particle store (.zarr)")
    parser.add_argument("--volumes", required=True, nargs="+",
                        help="initial volumes: one .mrc per class, a folder, or a volumes.zip of another run")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--stack-dir", help="folder to find particle stacks in (if not beside the metadata)")
    parser.add_argument("--box", type=int, default=d.refine_box, help=f"refinement box size (default {d.refine_box})")
    parser.add_argument("--symmetry", default=d.symmetry, help="point group: C<n>, D<n>, T, O, I (default C1)")
    parser.add_argument("--symmetry-convention", choices=("cryosparc", "relion"), default=d.symmetry_convention,
                        help="D<n> 2-fold along y (cryosparc) or x (relion)")
    parser.add_argument("--hard", action="store_true", help="force hard classification")
    parser.add_argument("--mask-diameter", type=float, help="inner diameter of the spherical window mask (A)")
    parser.add_argument("--mask-diameter-outer", type=float, help="outer diameter (A; default 1.2x inner)")
    parser.add_argument("--batch-size", type=int, default=d.batch_size_per_class,
                        help=f"online-EM batch size per class (default {d.batch_size_per_class})")
    parser.add_argument("--random-iterations", type=int, default=d.num_random_iterations,
                        help=f"initial random-assignment iterations (default {d.num_random_iterations})")
    parser.add_argument("--initial-lowpass", type=float, default=d.initial_lowpass_A,
                        help=f"initial low-pass resolution (A, default {d.initial_lowpass_A})")
    parser.add_argument("--iterations", type=int, default=d.max_iterations, help="cap on EM iterations")
    parser.add_argument("--resume", action="store_true", help="continue from the last completed iteration")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    add_cluster_arguments(parser)


def main(args: argparse.Namespace) -> int:
    params = dict(
        refine_box=args.box, symmetry=args.symmetry, symmetry_convention=args.symmetry_convention,
        force_hard_classification=args.hard, mask_diameter_A=args.mask_diameter,
        mask_diameter_outer_A=args.mask_diameter_outer, batch_size_per_class=args.batch_size,
        num_random_iterations=args.random_iterations, initial_lowpass_A=args.initial_lowpass,
        max_iterations=args.iterations, seed=args.seed,
    )
    volumes = args.volumes[0] if len(args.volumes) == 1 else args.volumes
    with client_from_args(args) as client:
        report = refine(args.particles, volumes, args.out, client=client, stack_dir=args.stack_dir,
                        resume=args.resume, progress=None if not args.quiet else False, **params)
    print(json.dumps({c["class"]: {"fraction": round(c["fraction"], 3), "resolution_A": c["resolution_A"]}
                      for c in report["classes"]}))
    print(f"results in {args.out} (report.json, particles.cs, particles.star, class_*/map.mrc)")
    return 0

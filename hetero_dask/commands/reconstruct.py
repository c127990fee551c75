"""Heterogeneous Reconstruction Only: reconstruct K class maps from per-class poses and posteriors.

Example: hetero-dask reconstruct --particles J42_particles.cs --out rec/ --symmetry C4
--box 128 --mask mask.mrc --workers 2
"""

from __future__ import annotations

import argparse

from hetero_dask.io.cache import add_store_arguments
from hetero_dask.jobs.reconstruct import ReconstructParams, reconstruct
from hetero_dask.report.summary import print_summary
from hetero_dask.runtime.cluster import add_cluster_arguments, cluster_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # The order of the calls is the order of the options in --help.
    _add_input_output_arguments(parser)
    _add_reconstruction_arguments(parser, ReconstructParams())
    _add_image_arguments(parser)
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    add_store_arguments(parser)
    add_cluster_arguments(parser)


def _add_input_output_arguments(parser: argparse.ArgumentParser) -> None:
    """The particles, the output folder and how the classes are read from the particles."""
    parser.add_argument(
        "--particles",
        required=True,
        help="particles with per-class poses and posteriors (.cs, .star or a .zarr particle store)",
    )
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument(
        "--prefix",
        default=None,
        choices=["alignments_class_", "alignments_class3D_", "alignments3D_multi", "alignments3D"],
        help="class alignment layout (default: autodetected; alignments3D = hard classes from "
        "alignments3D/class, i.e. rlnClassNumber of a STAR file)",
    )
    parser.add_argument(
        "--hard", action="store_true", help="force hard classification (argmax of the posteriors)"
    )


def _add_reconstruction_arguments(parser: argparse.ArgumentParser, d: ReconstructParams) -> None:
    """Symmetry, box, mask and half-set split of the reconstructions."""
    parser.add_argument(
        "--symmetry",
        default=d.symmetry,
        help=f"point group, e.g. C4, D2, T, O, I (default {d.symmetry})",
    )
    parser.add_argument(
        "--symmetry-convention",
        default=d.symmetry_convention,
        choices=["cryosparc", "relion"],
        help="D_n 2-fold axis along y (cryosparc, default) or x (relion)",
    )
    parser.add_argument(
        "--box",
        type=int,
        default=None,
        metavar="N",
        help="reconstruction box, even and >= 16 (Fourier crop/pad; the pixel size scales; default: the "
        "particles' box)",
    )
    parser.add_argument(
        "--mask", default=None, help="mask .mrc (reconstruction box) for an extra FSC"
    )
    parser.add_argument(
        "--random-split",
        action="store_true",
        help="draw random half-sets (reproducible with --seed) even if the input has a split",
    )
    parser.add_argument("--seed", type=int, default=d.random_seed, help="random seed (default 0)")


def _add_image_arguments(parser: argparse.ArgumentParser) -> None:
    """Where the particle images are and how their contrast is taken."""
    parser.add_argument(
        "--stack-dir",
        default=None,
        help="folder of the particle stacks when not where the file says (CryoSPARC: the project folder)",
    )
    parser.add_argument(
        "--flip-contrast",
        action="store_true",
        help="multiply the images by -1 (protein-dark stacks; blob/sign is negated in the outputs)",
    )
    parser.add_argument(
        "--no-contrast-check",
        action="store_true",
        help="do not refuse particles whose contrast looks inverted (e.g. particles not centred)",
    )


def main(args: argparse.Namespace) -> int:
    params = ReconstructParams(
        class_prefix=args.prefix,
        force_hard_classification=args.hard,
        symmetry=args.symmetry,
        symmetry_convention=args.symmetry_convention,
        box_size=args.box,
        mask=args.mask,
        random_split=args.random_split,
        random_seed=args.seed,
        stack_dir=args.stack_dir,
        flip_contrast=args.flip_contrast,
        contrast_check=not args.no_contrast_check,
        cache_dir=args.cache_dir,
        image_dtype=args.image_dtype,
    )
    result = reconstruct(
        args.particles,
        args.out,
        client=cluster_from_args(args, quiet=args.quiet),
        params=params,
        progress=False if args.quiet else None,
    )
    print(f"class layout: {result.layout}")
    print_summary(result.report, result.out_dir)
    return 0

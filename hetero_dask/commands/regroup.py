"""Regroup 3D classes into superclasses by spectral clustering of their volumes.

Example: hetero-dask regroup --particles J42_particles.cs --volumes J42_volumes.zip
--superclasses 3 --exclude 0,7 --min-class-size 500 --align-pairs --max-shift 10
--mask-radius 0.9 --out regrouped/
"""

from __future__ import annotations

import argparse
import json

from hetero_dask.jobs.regroup import RegroupParams, regroup
from hetero_dask.report.summary import print_summary
from hetero_dask.runtime.cluster import add_cluster_arguments, cluster_from_args


def _index_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--exclude {text!r}: expected comma-separated zero-based class indices, e.g. 0,3"
        ) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # The order of the calls is the order of the options in --help.
    defaults = RegroupParams(num_superclasses=1)
    _add_required_arguments(parser)
    _add_class_selection_arguments(parser, defaults)
    _add_alignment_arguments(parser)
    _add_comparison_arguments(parser, defaults)
    _add_clustering_arguments(parser, defaults)
    add_cluster_arguments(parser)


def _add_required_arguments(parser: argparse.ArgumentParser) -> None:
    """The particles, the class volumes, the number of superclasses and the output folder."""
    parser.add_argument(
        "--particles",
        required=True,
        help="particles with per-class posteriors or class numbers (.cs or .star)",
    )
    parser.add_argument(
        "--volumes",
        required=True,
        nargs="+",
        help="class volumes: a folder, a volume-series .zip, or one .mrc per class in class order",
    )
    parser.add_argument(
        "--superclasses",
        type=int,
        required=True,
        metavar="M",
        help="number of superclasses, 1 <= M <= included classes - 1",
    )
    parser.add_argument("--out", required=True, help="output folder")


def _add_class_selection_arguments(parser: argparse.ArgumentParser, d: RegroupParams) -> None:
    """Which classes take part in the clustering."""
    parser.add_argument(
        "--min-class-size",
        type=int,
        default=d.min_class_size,
        help="classes with fewer particles go to the remaining particles "
        f"(default {d.min_class_size})",
    )
    parser.add_argument(
        "--exclude",
        type=_index_list,
        default=(),
        help="comma-separated zero-based classes to leave out, e.g. 0,3",
    )


def _add_alignment_arguments(parser: argparse.ArgumentParser) -> None:
    """Pairwise alignment and masking of the volumes before they are compared."""
    parser.add_argument(
        "--align-pairs",
        action="store_true",
        help="align every pair of volumes (translation and hand flip) first",
    )
    parser.add_argument(
        "--max-shift",
        type=float,
        default=None,
        metavar="A",
        help="largest alignment shift in A (default 10%% of the box)",
    )
    parser.add_argument(
        "--mask-radius",
        type=float,
        default=None,
        metavar="F",
        help="soft spherical mask, fraction of half the box (1.0 = box diameter); "
        "no mask when absent",
    )
    parser.add_argument(
        "--mask", default=None, help="mask .mrc at the volumes' box (overrides --mask-radius)"
    )


def _add_comparison_arguments(parser: argparse.ArgumentParser, d: RegroupParams) -> None:
    """The box, resolution and voxel size at which the volumes are compared."""
    parser.add_argument(
        "--crop-box",
        type=int,
        default=d.crop_box,
        help=f"box the volumes are compared at, even and >= 16 (default {d.crop_box})",
    )
    parser.add_argument(
        "--lowpass",
        type=float,
        default=None,
        metavar="A",
        help="common resolution for the comparison (default 4 x cropped pixel size)",
    )
    parser.add_argument(
        "--psize",
        type=float,
        default=None,
        metavar="A",
        help="voxel size of the volumes when their headers say 0",
    )


def _add_clustering_arguments(parser: argparse.ArgumentParser, d: RegroupParams) -> None:
    """How the classes are clustered, and the names of the output particle files."""
    parser.add_argument(
        "--count-classes-once",
        action="store_true",
        help="cluster the classes as equals (default: weigh each class by its particles, "
        "so near-empty noisy classes do not decide the grouping)",
    )
    parser.add_argument("--seed", type=int, default=d.random_seed, help="k-means seed")
    parser.add_argument("--prefix", default="", help="prefix of the output particle file names")


def main(args: argparse.Namespace) -> int:
    params = RegroupParams(
        num_superclasses=args.superclasses,
        exclude_classes=args.exclude,
        min_class_size=args.min_class_size,
        align_pairs=args.align_pairs,
        max_shift_A=args.max_shift,
        mask_radius=args.mask_radius,
        crop_box=args.crop_box,
        lowpass_res_A=args.lowpass,
        weight_by_size=not args.count_classes_once,
        random_seed=args.seed,
        prefix=args.prefix,
    )
    volumes = args.volumes[0] if len(args.volumes) == 1 else args.volumes
    result = regroup(
        args.particles,
        volumes,
        args.out,
        params,
        mask=args.mask,
        volumes_psize_A=args.psize,
        client=cluster_from_args(args),  # started only for --align-pairs, once the inputs are checked
    )
    print_summary(json.loads((result.out_dir / "report.json").read_text()), result.out_dir)
    return 0

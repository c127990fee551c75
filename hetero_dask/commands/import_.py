"""Copy particles (.star or .cs + stacks) into a Zarr particle store for fast parallel reads.

The store holds the images (float32, or float16 with --image-dtype, chunked
and sharded along the particle axis) in a seeded random order, every
metadata field of the input as a column, and optional Fourier-cropped
copies. The import reads the stacks sequentially in blocks, one task per
block on a Dask cluster, resumes where an interrupted run stopped (re-run
the same command), and replaces an existing store at --out only once the
new one is complete. Workers are CPU processes unless --gpus is given.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from hetero_dask.io.store import CHUNK_MB, IMAGE_DTYPES, SHARD_MB
    from hetero_dask.runtime.cluster import add_cluster_arguments

    parser.add_argument(
        "--particles", required=True, help="particles: RELION .star or CryoSPARC .cs"
    )
    parser.add_argument(
        "--stack-dir",
        help="folder to look for the image stacks in when not found where the file says",
    )
    parser.add_argument("--out", required=True, help="output store, e.g. particles.zarr")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the random particle order (default 0)"
    )
    parser.add_argument(
        "--crop-box",
        type=int,
        nargs="+",
        default=[],
        metavar="BOX",
        help="also store Fourier-cropped copies at these box sizes (e.g. 64 for early iterations)",
    )
    parser.add_argument(
        "--chunk-mb",
        type=float,
        default=CHUNK_MB,
        help=f"Zarr chunk size in MiB (default {CHUNK_MB:g})",
    )
    parser.add_argument(
        "--shard-mb",
        type=float,
        default=SHARD_MB,
        help=f"Zarr shard size in MiB, the unit of job partitions and the size of import blocks (default {SHARD_MB:g})",
    )
    parser.add_argument(
        "--image-dtype",
        choices=IMAGE_DTYPES,
        default="float32",
        help="store images as float32 or float16 (half the disk; default float32)",
    )
    parser.add_argument(
        "--serial",
        action="store_true",
        help="import in this process (one thread per core), without a Dask cluster",
    )
    parser.add_argument(
        "--flip-contrast",
        action="store_true",
        help="multiply the images by -1 (protein-dark stacks; blob/sign is negated in the store)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_cluster_arguments(parser)


def main(args: argparse.Namespace) -> int:
    from hetero_dask.io.errors import InputError
    from hetero_dask.io.paths import check_allowed
    from hetero_dask.io.store import import_particles
    from hetero_dask.jobs.preflight import check_even_box, check_particles
    from hetero_dask.runtime.cluster import cluster_from_args

    # Everything is checked before a cluster starts or a byte is written.
    checked = check_particles(args.particles, args.stack_dir, flip_contrast=args.flip_contrast)
    if checked.particle_set is None:
        raise InputError("--particles", f"{args.particles} is a particle store already",
                         expected="a .star or .cs file to import")
    check_allowed(Path(args.out), "--out")
    for box in args.crop_box:
        check_even_box("crop_box", box)
    if args.gpus is None:
        args.gpus = 0  # reading stacks and writing Zarr is CPU and I/O work
    spec = None if args.serial else cluster_from_args(args, quiet=args.quiet)
    kwargs = dict(
        seed=args.seed,
        crop_boxes=args.crop_box,
        progress=False if args.quiet else None,
        chunk_mb=args.chunk_mb,
        shard_mb=args.shard_mb,
        image_dtype=args.image_dtype,
    )
    if spec is None:
        store = import_particles(checked.particle_set, args.out, **kwargs)
    else:
        with spec.open() as client:
            store = import_particles(checked.particle_set, args.out, client=client, **kwargs)
    crops = ", crops " + " ".join(map(str, store.crop_boxes)) if store.crop_boxes else ""
    print(
        f"{store.path}: {store.n} particles, box {store.box}, {store.psize_A:g} A/px, "
        f"{store.image_dtype.name}, "
        f"{len(store.shard_ranges())} shards of {store.shard_rows}{crops}"
    )
    return 0


def interrupted(args: argparse.Namespace) -> str:
    return "interrupted; the shards written are kept: run the same command again to finish the import"

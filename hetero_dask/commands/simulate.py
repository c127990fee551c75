"""Simulate particle images of given volumes (or built-in phantoms) with ground truth.

Image model: Y = CTF * projection(V_class, pose) * exp(+2 pi i k.s / n) plus
white Gaussian noise; poses uniform on SO(3), shifts uniform in a disc,
astigmatic defocus. SNR is the mean over particles of the variance of the
clean (CTF-modulated) particle image inside the disc of radius box/2,
divided by the noise variance. Writes particles.mrcs, particles.star
(RELION 3.1), particles.cs (CryoSPARC, blob/sign = +1; true poses, shifts and
classes in alignments3D and alignments_class_k), truth.npz (class, pose,
shift_px, CTF) and the volumes as volume_XX.mrc.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--volumes",
        nargs="+",
        metavar="MRC",
        help="one volume per class (cubic, same box); default: built-in moving-domain phantoms",
    )
    parser.add_argument("--n-per-class", type=int, required=True, help="particles per class")
    parser.add_argument(
        "--snr",
        type=float,
        required=True,
        help="signal-to-noise ratio: mean variance of the clean particle image inside the "
        "disc of radius box/2 over the noise variance (inf: no noise)",
    )
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--box", type=int, default=64, help="phantom box in pixels (default 64)")
    parser.add_argument(
        "--psize",
        type=float,
        help="pixel size in A (default: the volumes' header; 3.0 for phantoms)",
    )
    parser.add_argument(
        "--classes", type=int, default=3, help="number of phantom classes (default 3)"
    )
    parser.add_argument(
        "--defocus-range",
        type=float,
        nargs=2,
        default=[10000.0, 25000.0],
        metavar=("MIN_A", "MAX_A"),
        help="defocus range in A (default 10000 25000)",
    )
    parser.add_argument(
        "--astigmatism", type=float, default=500.0, help="maximum df1 - df2 in A (default 500)"
    )
    parser.add_argument(
        "--shift-range", type=float, default=0.0, help="maximum shift in pixels (default 0)"
    )
    parser.add_argument("--voltage", type=float, default=300.0, help="kV (default 300)")
    parser.add_argument(
        "--cs", type=float, default=2.7, help="spherical aberration mm (default 2.7)"
    )
    parser.add_argument(
        "--amp-contrast", type=float, default=0.1, help="amplitude contrast (default 0.1)"
    )
    parser.add_argument("--bfactor", type=float, default=0.0, help="CTF B-factor A^2 (default 0)")


def main(args: argparse.Namespace) -> int:
    import numpy as np

    from hetero_dask.phantoms import moving_domain_phantoms
    from hetero_dask.simulate import simulate, write_simulation

    if args.volumes:
        from hetero_dask.io.mrc import read_map

        maps = [read_map(p, psize_A=args.psize) for p in args.volumes]
        shapes = {v.shape for v, _ in maps}
        if len(shapes) != 1:
            raise ValueError(f"--volumes must all have one box, got shapes {sorted(shapes)}")
        volumes = np.stack([v for v, _ in maps])
        psize = maps[0][1]
    else:
        psize = 3.0 if args.psize is None else args.psize
        volumes = moving_domain_phantoms(args.box, psize, n_classes=args.classes)
    sim = simulate(
        volumes,
        psize,
        args.n_per_class,
        args.snr,
        seed=args.seed,
        defocus_range_A=tuple(args.defocus_range),
        astigmatism_A=args.astigmatism,
        shift_range_px=args.shift_range,
        accel_kv=args.voltage,
        cs_mm=args.cs,
        amp_contrast=args.amp_contrast,
        bfactor=args.bfactor,
    )
    paths = write_simulation(args.out, sim, volumes, seed=args.seed)
    print(
        f"{sim.n} particles ({volumes.shape[0]} classes, box {sim.box}, {psize:g} A/px, "
        f"SNR {sim.snr:g}, noise sigma {sim.noise_sigma:.4g}) -> {paths['star'].parent}"
    )
    return 0

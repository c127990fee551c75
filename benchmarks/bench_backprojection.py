"""Backprojection rate (particles/s) at box 64 and 128, one and two cores, against relion_reconstruct.

Particles are simulated by ``relion_project --ctf --add_noise`` from the
hand test map (Fourier-resized to each box) at random poses, origins and
defoci. Ours: the jobs' backprojection (centred image FFT; origin phase, CTF and
half-plane trilinear deposit fused in the compiled kernel, into complex64/float32
half-grids), then one Wiener-free
reconstruction. Two cores = two processes, each backprojecting half of the
particles into its own grids, merged at the end (the Dask engine's model).
RELION: ``relion_reconstruct --ctf`` (one process) and
``mpirun -n 2 relion_reconstruct_mpi --ctf`` on the same STAR file, timed in
the same run. Reported rates count the whole job (image FFTs to final map);
the backprojection-only rate is printed too.

    python benchmarks/bench_backprojection.py --n 2000 --boxes 64 128
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import multiprocessing as mp  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from scipy.spatial.transform import Rotation  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

from hetero_dask.core.backprojector import merge_grids  # noqa: E402
from hetero_dask.core.ctf import CTFParams  # noqa: E402
from hetero_dask.core.fourier import fourier_resize  # noqa: E402
from hetero_dask.core.fsc import fsc  # noqa: E402
from hetero_dask.core.masks import spherical_window  # noqa: E402
from hetero_dask.core.reconstruction import reconstruct  # noqa: E402
from hetero_dask.core.rotations import euler_to_matrix, matrix_to_euler  # noqa: E402
from hetero_dask.jobs.mstep import accumulating, backproject_particles, empty_partial  # noqa: E402
from hetero_dask.testing.relion import (  # noqa: E402
    read_mrc,
    relion_project,
    relion_reconstruct,
    run,
    write_relion_star,
)

HAND_MAP = ROOT.parent / "shared" / "data" / "maps" / "hand-vol.mrc"
PSIZE_64_A = 2.0
BATCH = 500

# Set in the parent before forking, read by the workers (no pickling of stacks).
_JOB: dict = {}


def simulate(workdir: Path, n: int, box: int, seed: int):
    """relion_project particles at box ``box``: (images, euler, origins_A, defocus, psize, star)."""
    psize = PSIZE_64_A * 64 / box
    vol = fourier_resize(read_mrc(HAND_MAP), box, 3)
    rng = np.random.default_rng(seed)
    A = Rotation.random(n, random_state=seed).as_matrix().transpose(0, 2, 1)
    euler = np.stack(matrix_to_euler(A), axis=1)
    origins_A = rng.uniform(-3, 3, (n, 2)) * psize
    dfu = rng.uniform(8000, 25000, n)
    defocus = np.stack([dfu, dfu - rng.uniform(0, 1000, n), rng.uniform(0, 180, n)], axis=1)
    star = write_relion_star(workdir / "in.star", euler, origins_A, psize, box, defocus)
    images, proj_star = relion_project(
        workdir, vol, psize, star, white_noise=float(vol.std() * box)
    )
    return vol, images, euler, origins_A, defocus, psize, proj_star


def backproject_range(lo: int, hi: int):
    """Backproject particles ``lo:hi`` of ``_JOB`` into new grids (one worker's partial), as the
    jobs' tasks do (:func:`hetero_dask.jobs.mstep.backproject_particles` in ``accumulating``)."""
    j = _JOB
    box, psize = j["box"], j["psize"]
    part = empty_partial(1, box)
    with accumulating(part):
        for s in range(lo, hi, BATCH):
            e = min(s + BATCH, hi)
            eu, d = j["euler"][s:e], j["defocus"][s:e]
            R = euler_to_matrix(eu[:, 0], eu[:, 1], eu[:, 2]).transpose(0, 2, 1)
            params = CTFParams(d[:, 0], d[:, 1], np.deg2rad(d[:, 2]), 300.0, 2.7, 0.1)
            backproject_particles(
                part, j["images"][s:e], params, psize, R[:, None], (j["origins_A"][s:e] / psize)[:, None],
                np.ones((e - s, 1), np.float32), 0, np.zeros(e - s, np.int64),
            )
    return part.grids[(0, 0)]


def cpu_seconds() -> float:
    """CPU seconds used so far by this process and its reaped children (robust to a busy machine)."""
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + kids.ru_utime + kids.ru_stime


def ours(n_particles: int, workers: int):
    """(map, backprojection seconds, total seconds, total CPU seconds) with ``workers`` processes."""
    c0 = cpu_seconds()
    t0 = time.perf_counter()
    if workers == 1:
        grids = backproject_range(0, n_particles)
    else:
        edges = np.linspace(0, n_particles, workers + 1).astype(int)
        with mp.get_context("fork").Pool(workers) as pool:
            parts = pool.starmap(backproject_range, zip(edges[:-1], edges[1:], strict=True))
        grids = parts[0]
        for p in parts[1:]:
            grids = merge_grids(grids, p)
    t1 = time.perf_counter()
    vol = reconstruct(grids)
    return vol, t1 - t0, time.perf_counter() - t0, cpu_seconds() - c0


def relion_times(workdir: Path, star: Path, psize: float, box: int):
    """(map, seconds, CPU seconds) of relion_reconstruct, and seconds of 2-rank relion_reconstruct_mpi."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    c0 = cpu_seconds()
    vol, t1 = relion_reconstruct(workdir, star, psize, env=env)
    cpu1 = cpu_seconds() - c0
    t2 = None
    mpirun = shutil.which("mpirun")
    if mpirun and shutil.which("relion_reconstruct_mpi"):
        out = workdir / "relion_mpi.mrc"
        cmd = [mpirun, "--allow-run-as-root", "--oversubscribe", "-n", "2"]
        cmd += ["relion_reconstruct_mpi", "--i", str(star), "--o", str(out)]
        cmd += ["--angpix", str(psize), "--ctf"]
        try:
            t2 = run(cmd, cwd=workdir, env=env)
        except RuntimeError as err:
            print(f"  (relion_reconstruct_mpi failed: {str(err).splitlines()[0]})")
    return vol, t1, cpu1, t2


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000, help="particles per box size")
    ap.add_argument("--boxes", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--no-relion", action="store_true", help="skip the relion_reconstruct timings")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print(f"{args.n} particles, cores available: {os.cpu_count()}, numpy {np.__version__}")
    for box in args.boxes:
        with tempfile.TemporaryDirectory() as tmp:
            workdir = Path(tmp)
            vol, images, euler, origins_A, defocus, psize, star = simulate(
                workdir, args.n, box, args.seed
            )
            _JOB.update(
                box=box, psize=psize, images=images, euler=euler, origins_A=origins_A,
                defocus=defocus,
            )  # fmt: skip
            print(f"box {box} ({psize:.2f} A/px):")
            ours_map, totals, cpus = None, {}, {}
            for w in args.workers:
                ours_map, t_bp, t_all, cpu = ours(args.n, w)
                totals[w] = t_all
                cpus[w] = cpu
                print(
                    f"  ours  {w} core(s): {args.n / t_all:8.1f} particles/s "
                    f"(total {t_all:6.2f} s, {cpu:6.2f} CPU s; "
                    f"backprojection only {args.n / t_bp:8.1f} particles/s)"
                )
            if args.no_relion:
                continue
            rel_map, t1, cpu1, t2 = relion_times(workdir, star, psize, box)
            print(
                f"  RELION 1 core     : {args.n / t1:8.1f} particles/s "
                f"(total {t1:6.2f} s, {cpu1:6.2f} CPU s)"
            )
            if t2 is not None:
                print(f"  RELION 2 MPI ranks: {args.n / t2:8.1f} particles/s (total {t2:6.2f} s)")
            mask = spherical_window(box, 0.9, 1.0)
            c = fsc(ours_map, rel_map, mask)
            for w, t_rel in ((1, t1), (2, t2)):
                if w in totals and t_rel is not None:
                    print(f"  speed-up ours/RELION, {w} core(s): {t_rel / totals[w]:.2f}x (wall)")
            if 1 in cpus:
                print(f"  CPU-time ratio RELION/ours, 1 core: {cpu1 / cpus[1]:.2f}x")
            print(
                f"  masked FSC ours-RELION, min to 0.7 Nyquist: {c[1 : int(0.35 * box) + 1].min():.3f}"
            )


if __name__ == "__main__":
    main()

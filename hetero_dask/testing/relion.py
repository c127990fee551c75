"""Helpers for tests and benchmarks that use RELION as an oracle (the real programs, run for real).

``write_relion_star`` writes a RELION 3.1 particle STAR file (optics +
particles blocks) from plain arrays; ``relion_project`` and
``relion_reconstruct`` run the programs in a folder and read back their
output; ``run`` runs any command and fails with its output on error.
Conventions: Euler angles in degrees (rot, tilt, psi), origins
``rlnOriginX/YAngst`` in A (CryoSPARC shift in pixels times the pixel size),
defocus in A, defocus angle in degrees.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import starfile


def run(cmd: list[str], cwd: Path | str | None = None, env: dict | None = None) -> float:
    """Run ``cmd`` (list of strings); raise with its output if it fails. Returns wall seconds."""
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(
            f"{' '.join(map(str, cmd))} failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
        )
    return time.perf_counter() - t0


def write_relion_star(
    path: Path | str,
    euler_deg,
    origins_A,
    psize_A: float,
    box: int,
    defocus_A=None,
    voltage_kv: float = 300.0,
    cs_mm: float = 2.7,
    amp_contrast: float = 0.1,
    image_names=None,
    extra_columns: dict | None = None,
) -> Path:
    """Write a RELION 3.1 particle STAR file and return its path.

    ``euler_deg`` ``(P, 3)`` (rot, tilt, psi); ``origins_A`` ``(P, 2)``;
    ``defocus_A`` ``(P, 3)`` (defocus U, V in A, angle in degrees) or None
    for no CTF columns; ``image_names`` ``(P,)`` strings like
    ``000001@stack.mrcs`` or None; ``extra_columns`` name -> ``(P,)`` values.
    """
    euler_deg = np.asarray(euler_deg, dtype=np.float64)
    origins_A = np.asarray(origins_A, dtype=np.float64)
    p = len(euler_deg)
    optics = pd.DataFrame(
        {
            "rlnOpticsGroup": [1],
            "rlnOpticsGroupName": ["opticsGroup1"],
            "rlnVoltage": [float(voltage_kv)],
            "rlnSphericalAberration": [float(cs_mm)],
            "rlnAmplitudeContrast": [float(amp_contrast)],
            "rlnImagePixelSize": [float(psize_A)],
            "rlnImageSize": [int(box)],
            "rlnImageDimensionality": [2],
        }
    )
    cols = {
        "rlnAngleRot": euler_deg[:, 0],
        "rlnAngleTilt": euler_deg[:, 1],
        "rlnAnglePsi": euler_deg[:, 2],
        "rlnOriginXAngst": origins_A[:, 0],
        "rlnOriginYAngst": origins_A[:, 1],
        "rlnOpticsGroup": np.ones(p, dtype=int),
    }
    if defocus_A is not None:
        d = np.asarray(defocus_A, dtype=np.float64)
        cols.update(rlnDefocusU=d[:, 0], rlnDefocusV=d[:, 1], rlnDefocusAngle=d[:, 2])
    if image_names is not None:
        cols["rlnImageName"] = list(image_names)
    cols.update(extra_columns or {})
    path = Path(path)
    starfile.write({"optics": optics, "particles": pd.DataFrame(cols)}, path, overwrite=True)
    return path


def write_map(path: Path | str, vol, psize_A: float) -> Path:
    """Write a float32 MRC map with its voxel size."""
    with mrcfile.new(path, np.asarray(vol, dtype=np.float32), overwrite=True) as m:
        m.voxel_size = psize_A
    return Path(path)


def read_mrc(path: Path | str) -> np.ndarray:
    """The data of an MRC file as float32 (stack or volume)."""
    with mrcfile.open(path, permissive=True) as m:
        return np.asarray(m.data, dtype=np.float32).copy()


def relion_project(
    workdir: Path | str,
    vol,
    psize_A: float,
    star: Path | str,
    ctf: bool = True,
    white_noise: float = 0.0,
    extra_args: list[str] | None = None,
) -> tuple[np.ndarray, Path]:
    """Run ``relion_project`` on ``vol`` at the poses of ``star``; returns (images (P, n, n), output STAR)."""
    workdir = Path(workdir)
    map_path = write_map(workdir / "relion_project_input.mrc", vol, psize_A)
    cmd = ["relion_project", "--i", str(map_path), "--o", str(workdir / "proj"), "--ang", str(star)]
    cmd += ["--angpix", str(psize_A)]
    if ctf:
        cmd.append("--ctf")
    if white_noise > 0:
        cmd += ["--add_noise", "--white_noise", str(white_noise)]
    run(cmd + list(extra_args or []), cwd=workdir)
    return read_mrc(workdir / "proj.mrcs"), workdir / "proj.star"


def relion_reconstruct(
    workdir: Path | str,
    star: Path | str,
    psize_A: float,
    ctf: bool = True,
    out_name: str = "relion_rec.mrc",
    extra_args: list[str] | None = None,
    env: dict | None = None,
) -> tuple[np.ndarray, float]:
    """Run ``relion_reconstruct`` on ``star``; returns (volume (n, n, n), wall seconds)."""
    workdir = Path(workdir)
    out = workdir / out_name
    cmd = ["relion_reconstruct", "--i", str(star), "--o", str(out), "--angpix", str(psize_A)]
    if ctf:
        cmd.append("--ctf")
    seconds = run(cmd + list(extra_args or []), cwd=workdir, env=env)
    return read_mrc(out), seconds


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a running process (Linux /proc), None where unavailable."""
    import os  # noqa: PLC0415

    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def relion_class3d(
    workdir: Path | str,
    particles_star: Path | str,
    references_star: Path | str,
    n_classes: int,
    iterations: int,
    particle_diameter_A: float,
    seed: int = 0,
    threads: int = 2,
    extra_args: list[str] | None = None,
    offset_range_px: float = 5.0,
    executable: str = "relion_refine",
) -> dict:
    """Run ``relion_refine`` 3D classification (``--K``) in ``workdir`` and time each iteration;
    ``executable``: another ``relion_refine``, e.g. a build with RELION's vectorised CPU code.

    HEALPix order 2 (15 deg; 7.5 deg after oversampling 1), offsets up to ``offset_range_px``
    (RELION's default 5) by 1 px, tau2_fudge 4 (RELION's Class3D habit), CTF, references taken
    as CTF-free maps, initial low-pass 30 A. Returns
    ``cmd``, ``setup`` (s to the first iteration's output), ``per_iteration`` /
    ``per_iteration_cpu`` (s), ``wall`` / ``cpu`` (s in all) and ``data_star`` (the last
    iteration's particles). CPU seconds matter on a shared machine, where wall time
    depends on the other load.
    """
    workdir = Path(workdir).resolve()
    out = workdir / "relion"
    out.mkdir(parents=True, exist_ok=True)
    # RELION reads the image and reference names in the STAR files relative to its working
    # directory: run it where they lie, writing into workdir.
    cwd = Path(particles_star).resolve().parent
    cmd = [
        executable, "--i", Path(particles_star).name, "--ref", str(Path(references_star).resolve()),
        "--o", str(out / "run"),
        "--K", str(n_classes), "--iter", str(iterations), "--healpix_order", "2", "--oversampling", "1",
        "--offset_range", f"{offset_range_px:g}", "--offset_step", "1", "--tau2_fudge", "4", "--ctf", "--ctf_corrected_ref",
        "--particle_diameter", str(particle_diameter_A), "--ini_high", "30", "--j", str(threads), "--pool", "3",
        "--pad", "2", "--dont_combine_weights_via_disc", "--random_seed", str(seed),
    ] + list(extra_args or [])  # fmt: skip
    t0 = time.time()
    wall, cpu_marks, cpu = [0.0], [0.0], 0.0  # index i + 1: iteration i's data.star written
    with open(out / "relion.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, text=True)
        while proc.poll() is None:
            cpu = cpu_seconds(proc.pid) or cpu
            if (out / f"run_it{len(wall) - 1:03d}_data.star").exists():
                wall.append(time.time() - t0)
                cpu_marks.append(cpu)
            time.sleep(0.5)
    if proc.returncode != 0:
        raise RuntimeError(f"relion_refine failed ({proc.returncode}):\n{(out / 'relion.log').read_text()[-3000:]}")
    while len(wall) < iterations + 2:  # the last iteration ends with the process
        wall.append(time.time() - t0)
        cpu_marks.append(cpu)
    return dict(cmd=" ".join(cmd), setup=wall[1], per_iteration=np.diff(wall[1:]).tolist(),
                per_iteration_cpu=np.diff(cpu_marks[1:]).tolist(), wall=wall[-1], cpu=cpu_marks[-1],
                data_star=out / f"run_it{iterations:03d}_data.star", model_star=out / f"run_it{iterations:03d}_model.star")

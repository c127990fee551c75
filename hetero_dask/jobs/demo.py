"""The demo: simulate a two-state dataset, then refine, regroup and reconstruct it on a local cluster.

Steps (each writes its own folder under ``out``):

1. ``simulation/``: two moving-domain phantoms (:func:`hetero_dask.phantoms.moving_domain_phantoms`),
   particles with CTF and white noise (:func:`hetero_dask.simulate.simulate`), written as
   ``particles.mrcs``, ``particles.cs``, ``particles.star``, ``truth.npz`` and ``volume_XX.mrc``;
2. ``initial_volumes/``: K = 3 starting maps, the two true maps and their average, all
   low-passed to ``initial_lowpass_A`` (the average holds no class-specific domain position);
3. ``refine/``: Heterogeneous Refinement (:func:`hetero_dask.refine`) of the particles from the
   three starting maps on a local Dask cluster;
4. ``regroup/``: Regroup 3D Classes (:func:`hetero_dask.regroup`) of the three classes into two
   superclasses;
5. ``reconstruct/``: Heterogeneous Reconstruction Only (:func:`hetero_dask.reconstruct`) of the
   regrouped particles, hard classes.

The folder is the demo's own: run again into it, the demo replaces its earlier
results (only the files and folders above); with ``resume`` it continues an interrupted
demo (the refinement from its last completed iteration). A folder holding anything
else is refused.

Class accuracy is measured against the simulation's truth, matched by particle ``uid``:
for the K refined classes, the fraction of particles whose class's majority true state is
their own (purity); for the two superclasses, the fraction correctly labelled under the best
of the two label permutations.
"""

from __future__ import annotations

import itertools
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class DemoSize:
    """Simulation and refinement settings of one demo size; the refinement's other
    parameters are the job's defaults (a demo shows what a user gets)."""

    box: int
    psize_A: float
    n_per_class: int
    snr: float
    refine_box: int
    batch_size_per_class: int
    max_iterations: int
    max_order: int = 3
    initial_lowpass_A: float = 30.0
    swing_deg: float = 90.0


SIZES = {
    "default": DemoSize(
        box=64,
        psize_A=3.0,
        n_per_class=800,
        snr=0.15,
        refine_box=64,
        batch_size_per_class=400,
        max_iterations=14,
    ),
    "ci": DemoSize(
        box=32,
        psize_A=6.0,
        n_per_class=200,
        snr=1.0,
        refine_box=32,
        batch_size_per_class=200,
        max_iterations=4,
        max_order=2,
    ),
}


def purity(pred: np.ndarray, truth: np.ndarray) -> float:
    """Fraction of particles whose predicted class's majority true class is their own.

    ``pred``, ``truth`` ``(N,)`` non-negative ints; equals the permutation accuracy when
    every predicted class has a distinct majority.
    """
    pred, truth = np.asarray(pred), np.asarray(truth)
    if pred.size == 0:
        return float("nan")
    counts = np.zeros((pred.max() + 1, truth.max() + 1), np.int64)
    np.add.at(counts, (pred, truth), 1)
    return float(counts.max(axis=1).sum() / pred.size)


def permutation_accuracy(pred: np.ndarray, truth: np.ndarray) -> float:
    """Best fraction of equal labels over all relabellings of ``pred`` (same number of labels)."""
    pred, truth = np.asarray(pred), np.asarray(truth)
    n = int(max(pred.max(), truth.max())) + 1
    best = 0.0
    for perm in itertools.permutations(range(n)):
        best = max(best, float(np.mean(np.asarray(perm)[pred] == truth)))
    return best


def _true_class_by_uid(table) -> dict[int, int]:
    return dict(zip(table["uid"].tolist(), table["alignments3D/class"].tolist(), strict=True))


def _labels(path: Path, truth: dict[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(predicted best class, true class) per particle of the ``.cs`` at ``path``."""
    from hetero_dask.io.cs import read_cs

    t = read_cs(path)
    pred = np.asarray(t["alignments3D/class"], np.int64)
    true = np.array([truth[u] for u in t["uid"].tolist()], np.int64)
    return pred, true


def _initial_volumes(
    truth_vols: np.ndarray, psize_A: float, lowpass_A: float, out: Path
) -> list[Path]:
    """The two true maps and their average, low-passed to ``lowpass_A``, written as MRC files."""
    from hetero_dask.core.fourier import lowpass
    from hetero_dask.io.mrc import write_map

    starts = [truth_vols[0], truth_vols[1], truth_vols.mean(axis=0)]
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, v in enumerate(starts):
        p = out / f"initial_{k}.mrc"
        write_map(p, np.asarray(lowpass(v, lowpass_A, psize_A, ndim=3), np.float32), psize_A)
        paths.append(p)
    return paths


MARKER = "demo.json"
PARTS = ("simulation", "initial_volumes", "refine", "regroup", "reconstruct", "demo_summary.json", MARKER)


def _claim_folder(out: Path, size: str, seed: int, resume: bool) -> bool:
    """Check (and, for a new run, clear) the demo's folder; True when its refinement is to resume."""
    from hetero_dask.io.errors import InputError

    if out.exists() and not out.is_dir():
        raise InputError("--out", f"{out} is a file", expected="a folder for the demo")
    marker = out / MARKER
    if not marker.is_file():
        if resume:
            raise InputError("--out", f"--resume: {out} holds no demo to resume",
                             expected="the --out of an earlier demo, or no --resume")
        if out.is_dir() and any(out.iterdir()):
            raise InputError("--out", f"{out} is not empty and holds no demo",
                             expected="a new or empty folder, or the folder of an earlier demo")
        return False
    earlier = json.loads(marker.read_text())
    if resume:
        if (earlier.get("size"), earlier.get("seed")) != (size, seed):
            raise InputError("--resume", f"the demo in {out} ran with --size {earlier.get('size')} --seed "
                             f"{earlier.get('seed')}", expected="the same --size and --seed to resume it")
        return (out / "refine" / "run").is_dir()
    print(f"replacing the earlier demo in {out}", flush=True)
    for name in PARTS:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    return False


def run_demo(
    out,
    size: str = "default",
    workers: int | None = None,
    seed: int = 0,
    progress: bool | None = None,
    resume: bool = False,
) -> dict:
    """Run the demo into ``out`` and return its summary (also written to ``out/demo_summary.json``).

    ``size``: ``"default"`` (box 64, 1600 particles, SNR 0.15; a few minutes on 2 cores)
    or ``"ci"`` (box 48, 600 particles, SNR 0.5); ``workers``: local Dask workers
    (None: Dask's choice for this machine); ``resume``: continue the interrupted demo in
    ``out`` (else an earlier demo there is replaced; see the module doc).
    """
    from hetero_dask.runtime.checkpoint import write_json_atomic
    from hetero_dask.runtime.cluster import open_client

    if size not in SIZES:
        raise ValueError(f"--size {size!r}: expected one of {sorted(SIZES)}")
    if workers is not None and workers < 1:
        raise ValueError(f"--workers {workers}: expected a number >= 1")
    s = SIZES[size]
    out = Path(out)
    resume_refine = _claim_folder(out, size, seed, resume)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text(json.dumps({"size": size, "seed": seed}))
    for job in ("regroup", "reconstruct"):  # quick: always run again
        shutil.rmtree(out / job, ignore_errors=True)
    t0 = time.perf_counter()
    data = _simulated_inputs(out, s, seed, resume_refine, progress)
    timings = {"simulate_s": time.perf_counter() - t0}
    with open_client(workers=workers, quiet=progress is False) as client:
        reports = _run_jobs(out, s, data, client, progress, resume_refine, seed, timings)
    timings["total_s"] = time.perf_counter() - t0
    summary = _summary(out, size, s, data, reports, timings, workers, seed)
    write_json_atomic(out / "demo_summary.json", summary)
    return summary


@dataclass
class _Inputs:
    """The demo's simulated particles, starting maps and truth."""

    n: int
    classes: np.ndarray  # (n,) true state per simulated particle
    particles_cs: Path
    initial_volumes: list[Path]
    truth: dict  # uid -> true state


def _simulated_inputs(out: Path, s: DemoSize, seed: int, resume_refine: bool, progress) -> _Inputs:
    """Simulate the two states' particles and low-passed starting maps (the files of the
    interrupted run when resuming: the refinement read them, so they are complete)."""
    from hetero_dask.io.cs import read_cs
    from hetero_dask.phantoms import moving_domain_phantoms
    from hetero_dask.simulate import simulate, write_simulation

    vols = moving_domain_phantoms(s.box, s.psize_A, n_classes=2, swing_deg=s.swing_deg)
    sim = simulate(vols, s.psize_A, s.n_per_class, s.snr, seed=seed, shift_range_px=2.0)
    if resume_refine:
        particles_cs = out / "simulation" / "particles.cs"
        init = sorted((out / "initial_volumes").glob("initial_*.mrc"))
    else:
        particles_cs = write_simulation(out / "simulation", sim, vols, seed=seed)["cs"]
        init = _initial_volumes(vols, s.psize_A, s.initial_lowpass_A, out / "initial_volumes")
    if progress is not False:
        print(f"simulated {sim.n} particles (2 states, box {s.box}, {s.psize_A} A/px, SNR {s.snr}) "
              f"in {out / 'simulation'}", flush=True)
    return _Inputs(int(sim.n), np.asarray(sim.classes), Path(particles_cs), list(init),
                   _true_class_by_uid(read_cs(particles_cs)))


def _run_jobs(out: Path, s: DemoSize, data: _Inputs, client, progress, resume_refine: bool, seed: int,
              timings: dict) -> dict:
    """Refine from the starting maps, regroup its classes into two, reconstruct the superclasses;
    each job's wall time into ``timings``. Returns the three jobs' results by name."""
    from hetero_dask.jobs.reconstruct import reconstruct
    from hetero_dask.jobs.refine import refine
    from hetero_dask.jobs.regroup import regroup

    t = time.perf_counter()
    refined = refine(data.particles_cs, [str(p) for p in data.initial_volumes], out / "refine", client=client,
                     progress=progress, resume=resume_refine, refine_box=s.refine_box,
                     batch_size_per_class=s.batch_size_per_class, max_iterations=s.max_iterations,
                     initial_lowpass_A=s.initial_lowpass_A, max_order=s.max_order, seed=seed)
    timings["refine_s"] = time.perf_counter() - t
    t = time.perf_counter()
    regrouped = regroup(out / "refine" / "particles.cs", out / "refine" / "volumes.zip", out / "regroup",
                        num_superclasses=2)
    timings["regroup_s"] = time.perf_counter() - t
    t = time.perf_counter()
    rec = reconstruct(out / "regroup" / "particles.cs", out / "reconstruct", client=client, progress=progress,
                      force_hard_classification=True)
    timings["reconstruct_s"] = time.perf_counter() - t
    return {"refine": refined, "regroup": regrouped, "reconstruct": rec}


def _summary(out: Path, size: str, s: DemoSize, data: _Inputs, reports: dict, timings: dict, workers, seed) -> dict:
    """What the demo reports: each job's result against the simulation's truth, where to look."""
    pred_refine, true_refine = _labels(out / "refine" / "particles.cs", data.truth)
    pred_sc, true_sc = _labels(out / "regroup" / "particles.cs", data.truth)
    refined = reports["refine"]
    accuracy = permutation_accuracy(pred_sc, true_sc)
    return {
        "size": size,
        "simulation": {"n_particles": data.n, "n_states": 2, "box": s.box, "psize_A": s.psize_A, "snr": s.snr,
                       "folder": str(out / "simulation")},
        "refine": {
            "n_classes": len(data.initial_volumes),
            "class_purity": purity(pred_refine, true_refine),
            "class_fractions": [c["fraction"] for c in refined["classes"]],
            "resolution_A": [c["resolution_A"] for c in refined["classes"]],
            "iterations": len(refined["iterations"]),
            "folder": str(out / "refine"),
        },
        "regroup": {"superclass_of_class": np.asarray(reports["regroup"].superclass).tolist(),
                    "accuracy": accuracy, "folder": str(out / "regroup")},
        "reconstruct": {"resolution_A": [c.get("resolution_A") for c in reports["reconstruct"].report.get("classes", [])],
                        "folder": str(out / "reconstruct")},
        "reports": {job: str((out / job / "report.html").resolve()) for job in ("refine", "regroup", "reconstruct")},
        "chance_accuracy": float(max(np.bincount(data.classes)) / data.n),
        "timings_s": timings,
        "workers": workers,
        "seed": seed,
        "accuracy": accuracy,
        "classes_recovered": bool(accuracy >= 0.8),
    }

"""What a finished refinement writes: particles, class maps, subsets, figures and the report."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import zarr

from hetero_dask.core.calibration import mixture_temperature, tempered
from hetero_dask.jobs.common import output_table

from .params import RefineParams
from .state import State

# How identical references were split, in the run folder (driver._split), copied into the report.
SPLIT_SUMMARY = "initial_split.json"


def write_outputs(out: Path, store, state: State, results, p: RefineParams, box, psize, K, names, t0,
                  run_dir: Path, stack_dir) -> dict:
    """Write the particles (input order) with every class's poses and posteriors, the class maps,
    volume series and per-class subsets, the figures, ``report.json`` and ``report.html``;
    returns the report. ``results``: the last M-step's, one per class; ``t0``: the run's start."""
    from hetero_dask.jobs import outputs

    res = zarr.open_group(run_dir / "results.zarr", mode="r")
    post = store.to_input_order(res["class_posterior"][:])
    calibration = posterior_calibration(post, p)
    post = tempered(post, calibration["temperature"])
    pose = store.to_input_order(res["pose"][:])
    shift = store.to_input_order(res["shift"][:])
    best = store.to_input_order(res["best_class"][:])
    table = output_table(store, stack_dir)
    extra = {"ll": store.to_input_order(res["ll"][:]), "alpha": store.to_input_order(res["alpha"][:]),
             "pose_ess": store.to_input_order(res["pose_ess"][:])}
    split = store.to_input_order(np.load(run_dir / "split.npy", allow_pickle=False))
    paths = outputs.write_particles(out, table, post, pose, shift, psize, best_class=best, extra_fields=extra,
                                    split=split, class_values={"alpha": extra["alpha"], "pose_ess": extra["pose_ess"]})
    vols = []
    for k in range(K):
        outputs.write_class_maps(out, k, results[k], psize)
        vols.append(results[k].vol_full)
    outputs.write_volume_series(out, np.stack(vols), psize)
    outputs.write_subsets(out, paths.pop("table"), best, K, post)
    plots = _plots(out, state, results, pose, best, box, psize, K)
    report = {
        "job": "heterogeneous_refinement",
        "parameters": dataclasses.asdict(p),
        "n_particles": int(store.n),
        "refine_box": box, "psize_A": psize,
        "initial_volumes": list(names),
        "classes": [
            {"class": k, "fraction": float(np.mean(best == k)), "fraction_soft": float(np.mean(post[:, k])),
             "n_particles": int(np.sum(best == k)), "resolution_A": float(results[k].resolution_A),
             "fsc": computed_fsc(results[k].fsc)}
            for k in range(K)
        ],
        "posterior_calibration": calibration,
        "iterations": state.history,
        "converged_at_iteration": state.converged_at,
        "seconds": time.time() - t0,
        "outputs": {k: str(v) for k, v in {**paths, **plots}.items()},
    }
    if (run_dir / SPLIT_SUMMARY).is_file():
        report["initial_split"] = json.loads((run_dir / SPLIT_SUMMARY).read_text())
    outputs.write_report_json(out, report)
    outputs.write_job_html(out, "Heterogeneous Refinement", report, plots.values())
    return report


def posterior_calibration(posterior: np.ndarray, p: RefineParams) -> dict:
    """The temperature the written class posteriors take (``p.posterior_temperature``, or
    estimated from them) and how it was chosen, for the report."""
    if p.posterior_temperature is not None:
        return {"temperature": float(p.posterior_temperature), "how": "given (posterior_temperature)"}
    if p.force_hard_classification:
        return {"temperature": 1.0, "how": "as computed (hard classification)"}
    t = mixture_temperature(posterior)
    if t is None:
        return {"temperature": 1.0, "how": "as computed (fewer than three populated classes, or their "
                                           "log-ratios too flat to fit: no estimate)"}
    return {"temperature": t, "how": "estimated from the posteriors (Gaussian mixture of their log-ratios)"}


def computed_fsc(curve) -> np.ndarray:
    """The FSC with NaN beyond the shells computed (mstep_task sets them to 0: beyond the
    backprojection radius the half-maps hold no data)."""
    c = np.asarray(curve, dtype=np.float64).copy()
    nonzero = np.flatnonzero(c != 0)
    c[(nonzero[-1] + 1 if nonzero.size else 1):] = np.nan
    return c


def _plots(out: Path, state: State, results, pose, best, box, psize, K) -> dict:
    """The report's figures (FSC, maps, viewing directions, the history); their paths by name."""
    from hetero_dask.core.rotations import pose_to_matrix
    from hetero_dask.jobs.outputs import map_figures
    from hetero_dask.report import plots

    hist = state.history
    frac = np.array([h["class_fraction"] for h in hist])
    resA = np.array([h["resolution_A"] for h in hist])
    changes = np.array([np.nan if h["class_change_fraction"] is None else h["class_change_fraction"] for h in hist])
    iters = np.array([h["iteration"] for h in hist])
    out_plots = {}
    out_plots["fsc_plot"] = plots.plot_fsc_classes(
        {f"class {k}": {"half maps": computed_fsc(results[k].fsc)} for k in range(K)}, psize, box, out / "fsc.png")
    out_plots.update(map_figures(out, {f"class {k}": results[k].vol_full for k in range(K)}))
    views = []
    for k in range(K):
        sel = best == k
        R = pose_to_matrix(pose[sel, k].astype(np.float64)) if np.any(sel) else np.eye(3)[None]
        views.append(R[:, :, 2])
    out_plots["orientations_plot"] = plots.plot_orientation_distribution(
        {f"class {k}": views[k] for k in range(K)}, out / "orientations.png",
        title="Viewing directions of each class's particles (best class)")
    marks = round_marks(hist)
    out_plots["class_fractions_plot"] = plots.plot_class_fractions(
        frac, out / "class_fractions.png", iterations=iters,
        title="Class fractions per iteration (soft: the class priors, mean posteriors)", marks=marks)
    out_plots["resolution_plot"] = plots.plot_resolution_history(resA, out / "resolution.png", iterations=iters,
                                                                 marks=marks)
    out_plots["class_changes_plot"] = plots.plot_class_changes(changes, out / "class_changes.png", iterations=iters,
                                                               marks=marks)
    return out_plots


def round_marks(history) -> dict[int, str]:
    """The first iteration of each EM round after the first (``round_start`` in ``history``'s
    records; checkpoints written before rounds existed have none) with its label, for the
    history plots: where a restart makes the fractions and resolutions jump."""
    starts = sorted({h["round_start"] for h in history if h.get("round_start", 0) > 0})
    return {s: f"round {n} starts" for n, s in enumerate(starts, start=2)}


def load_report(out) -> dict:
    """The report of the refinement in ``out``."""
    with open(Path(out) / "report.json") as f:
        return json.load(f)


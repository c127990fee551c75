"""The few lines a job prints when it ends: what came out, and where the report is.

Read from the job's ``report.json`` alone, so ``hetero-dask status OUT`` prints
the same summary for a finished run as the job did.
"""

from __future__ import annotations

import math
from pathlib import Path

TITLES = {
    "heterogeneous_refinement": "Heterogeneous Refinement",
    "heterogeneous_reconstruction_only": "Heterogeneous Reconstruction Only",
    "regroup": "Regroup 3D Classes",
}


def _resolution(value) -> str:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return "no resolution"
    return "no resolution (empty)" if not math.isfinite(value) else f"{value:.1f} A"


def _convergence(report: dict) -> str:
    """Whether the refinement converged, in words (the cap on iterations also starts the final passes)."""
    n = len(report.get("iterations", []))
    p = report.get("parameters", {})
    at = report.get("converged_at_iteration")
    passes = p.get("final_full_passes", 0)
    cap = p.get("max_iterations")
    if at is None:
        return f"not converged ({n} iterations)"
    if cap is not None and at >= cap - passes:
        return (f"stopped by the cap of {cap} iterations without converging earlier "
                f"({n} iterations, the last {n - at} final full passes)")
    return f"converged after iteration {at}, then {n - at} final full passes ({n} iterations)"


def summary_lines(report: dict, out) -> list[str]:
    """A job's summary from its ``report.json`` (refine, reconstruct or regroup)."""
    out = Path(out)
    job = report.get("job", "")
    title = TITLES.get(job, job)
    n = report.get("n_particles")
    lines = []
    if job == "heterogeneous_refinement":
        classes = report["classes"]
        lines.append(f"{title}: {n} particles into {len(classes)} classes (box {report.get('refine_box')}, "
                     f"{report.get('psize_A', 0):.3g} A/px); {_convergence(report)}")
        for c in classes:
            lines.append(f"  class {c['class']}: {c['n_particles']} particles ({100 * c['fraction']:.1f}%), "
                         f"{_resolution(c['resolution_A'])}")
    elif job == "heterogeneous_reconstruction_only":
        classes = report["classes"]
        kind = "hard" if report.get("hard_classification") else "soft"
        lines.append(f"{title}: {n} particles, {len(classes)} classes ({kind} assignment, box "
                     f"{report.get('box')}, {report.get('psize_A', 0):.3g} A/px)")
        for c in classes:
            lines.append(f"  class {c['class']}: {c.get('n_particles_best', 0)} particles at best, weight "
                         f"{c.get('weight_sum', 0):.1f}, {_resolution(c.get('resolution_A'))}")
    elif job == "regroup":
        supers = report.get("superclasses", [])
        lines.append(f"{title}: {report.get('n_classes')} classes of {n} particles into "
                     f"{len(supers)} superclasses")
        for s in supers:
            lines.append(f"  superclass {s['superclass']}: classes {s['classes']}, {s['n_particles']} particles")
        lines.append(f"  remaining: {report.get('n_remaining_particles', 0)} particles")
        if report.get("flipped_pairs"):
            lines.append(f"  hand-flipped pairs: {report['flipped_pairs']}")
    else:
        lines.append(f"{title or 'job'}: finished")
    lines.append(f"report: {(out / 'report.html').resolve()}")
    return lines


def print_summary(report: dict, out) -> None:
    print("\n".join(summary_lines(report, out)), flush=True)

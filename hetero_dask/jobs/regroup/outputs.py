"""What regroup writes into ``OUT``::

    {prefix}particles.cs|.csg (or .star)        every particle of a clustered class, regrouped
    {prefix}remaining_particles.cs|.csg|.star   particles of the classes set aside, as they came
    superclass_{m}/{prefix}particles.*, map.mrc each superclass's particles and average map
    volumes.zip                                 the superclass maps (superclass_000.mrc, ...)
    mask.mrc                                    a copy of the user's mask, if one was given
    affinity.png, eigenvalues.png, classes.png, superclass_maps.png, class_maps.png
    report.json, report.html

A superclass map is the size-weighted average of its classes' maps (aligned to
the reference class first with ``align_pairs``). Particle files are STAR when
the particles came as STAR, else ``.cs`` with its ``.csg``.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np

from hetero_dask.core.align3d import apply_alignment
from hetero_dask.jobs.outputs import (
    map_figures,
    write_job_html,
    write_report_json,
    write_table_files,
    write_volume_series,
)

from .classes import References
from .compare import Comparison
from .inputs import Inputs
from .params import RegroupParams, RegroupResult
from .tables import regrouped_table

JOB = "hetero-dask regroup"


def average_map(vols, members, sizes, moves_px=None, flips=None) -> np.ndarray:
    """Size-weighted average of ``vols[members]``, each first aligned by (move, flip) when given."""
    acc = np.zeros(vols.shape[1:], dtype=np.float64)
    total = float(sizes[members].sum()) or 1.0
    for c in members:
        v = np.asarray(vols[c], np.float32)
        if moves_px is not None:
            v = apply_alignment(v, moves_px[c], bool(flips[c]))
        acc += (sizes[c] / total) * v
    return acc.astype(np.float32)


def superclass_maps(params: RegroupParams, inputs: Inputs, superclass, refs: References) -> list:
    """The average map (N, N, N) of each superclass (members moved onto the reference with
    ``align_pairs``)."""
    moves_px = refs.move_A / inputs.psize_A if params.align_pairs else None
    return [
        average_map(
            inputs.vols, np.flatnonzero(superclass == m), inputs.sizes, moves_px, refs.flipped
        )
        for m in range(params.num_superclasses)
    ]


def write_outputs(out_dir: Path, params: RegroupParams, inputs: Inputs, superclass, refs, maps):
    """Particle files, superclass maps ``maps``, volumes.zip and the mask; returns {name: path}."""
    from hetero_dask.io.mrc import write_map

    moves = (refs.move_A, refs.flipped) if params.align_pairs else None
    keep, regrouped = regrouped_table(
        inputs.table, inputs.layout, inputs.labels, superclass, len(maps), moves, inputs.psize_A
    )
    outputs = _particle_files(out_dir, params.prefix, "particles", regrouped, inputs.is_star)
    outputs |= _particle_files(
        out_dir, params.prefix, "remaining_particles", inputs.table[~keep], inputs.is_star
    )
    row_superclass = superclass[inputs.labels[keep]]
    for m, vol in enumerate(maps):
        d = out_dir / f"superclass_{m}"
        d.mkdir(exist_ok=True)
        subset = regrouped[row_superclass == m]
        key = f"superclass_{m}/particles"
        outputs |= _particle_files(d, params.prefix, "particles", subset, inputs.is_star, key)
        write_map(d / "map.mrc", vol, inputs.psize_A)
        outputs[f"superclass_{m}/map"] = d / "map.mrc"
    outputs["volumes_zip"] = write_volume_series(
        out_dir, np.stack(maps), inputs.psize_A, members="superclass"
    )
    if inputs.mask is not None:
        outputs["mask"] = out_dir / f"mask{Path(inputs.mask).suffix or '.mrc'}"
        shutil.copyfile(inputs.mask, outputs["mask"])
    return outputs


def _particle_files(directory: Path, prefix, name, table, is_star: bool, key=None) -> dict:
    """``{prefix}{name}.star`` (RELION input) or ``.cs`` + ``.csg`` (CryoSPARC input):
    ``{key: path}`` (``key`` defaults to ``name``), and ``{key}_csg`` for the ``.csg``."""
    key = key or name
    paths = write_table_files(
        directory, prefix + name, table, job=JOB, formats=("star",) if is_star else ("cs",)
    )
    if is_star:
        return {key: paths["star"]}
    return {key: paths["cs"], f"{key}_csg": paths["csg"]}


def write_plots(out_dir: Path, result: RegroupResult, vols, maps) -> dict:
    """Affinity, eigenvalues, class sizes, and sections and projections of the class maps
    ``vols`` ``(K, n, n, n)`` and of the superclass maps ``maps``."""
    from hetero_dask.report.plots import plot_affinity, plot_class_table, plot_eigenvalues

    inc = result.included
    figures = map_figures(
        out_dir, {f"superclass {m}": v for m, v in enumerate(maps)}, name="superclass_maps"
    )
    figures |= map_figures(
        out_dir, {f"class {k}": v for k, v in enumerate(vols)}, name="class_maps"
    )
    return {f"plot_{stem}": path for stem, path in figures.items()} | {
        "plot_affinity": plot_affinity(
            result.affinity,
            result.superclass[inc],
            out_dir / "affinity.png",
            labels=[str(c) for c in inc],
        ),
        "plot_eigenvalues": plot_eigenvalues(
            result.eigenvalues, out_dir / "eigenvalues.png", n_superclasses=len(maps)
        ),
        "plot_class_table": plot_class_table(
            result.class_sizes, result.superclass, out_dir / "classes.png"
        ),
    }


def build_report(params, inputs: Inputs, comparison: Comparison, result, refs, timings) -> dict:
    """report.json's content (outputs named relative to ``result.out_dir``)."""
    corr = comparison.correlation
    return {
        "job": "regroup",
        "params": asdict(params),
        "inputs": inputs.described,
        "n_particles": len(inputs.table),
        "n_classes": len(inputs.vols),
        "box": int(inputs.vols.shape[-1]),
        "psize_A": inputs.psize_A,
        "comparison": {
            "box": comparison.box,
            "psize_A": comparison.psize_A,
            "lowpass_res_A": comparison.lowpass_res_A,
            "max_shift_A": comparison.max_shift_A,
        },
        "classes": _class_rows(params, inputs.sizes, result.superclass, refs),
        "superclasses": _superclass_rows(inputs.sizes, result.superclass, refs),
        "n_remaining_particles": int(inputs.sizes[result.superclass < 0].sum()),
        "included_classes": result.included.tolist(),
        "correlation": np.round(corr, 5).tolist(),
        "affinity": np.round(result.affinity, 5).tolist(),
        "eigenvalues": np.round(result.eigenvalues, 6).tolist(),
        "flipped_pairs": result.flipped_pairs,
        "timings": {key: round(v, 3) for key, v in timings.items()},
        "outputs": {
            key: str(Path(v).relative_to(result.out_dir)) for key, v in result.outputs.items()
        },
    }


def _class_rows(params: RegroupParams, sizes, superclass, refs: References) -> list[dict]:
    def status(c):
        if c in params.exclude_classes:
            return "excluded"
        return "too small" if superclass[c] < 0 else "included"

    return [
        {
            "class": c,
            "n_particles": int(sizes[c]),
            "superclass": int(superclass[c]) if superclass[c] >= 0 else None,
            "status": status(c),
            "move_to_reference_A": refs.move_A[c].round(3).tolist(),
            "hand_flipped_to_reference": bool(refs.flipped[c]),
        }
        for c in range(len(sizes))
    ]


def _superclass_rows(sizes, superclass, refs: References) -> list[dict]:
    return [
        {
            "superclass": m,
            "classes": np.flatnonzero(superclass == m).tolist(),
            "reference_class": refs.reference[m],
            "n_particles": int(sizes[superclass == m].sum()),
        }
        for m in sorted(refs.reference)
    ]


def write_report(out_dir: Path, report: dict, outputs: dict) -> None:
    """report.json and report.html (its plots first); adds both to ``outputs``."""
    outputs["report"] = write_report_json(out_dir, report)
    plots = [outputs.get(k) for k in ("plot_affinity", "plot_eigenvalues", "plot_class_table")]
    plots += [
        v
        for key, v in outputs.items()
        if key.startswith(("plot_superclass_maps", "plot_class_maps"))
    ]
    outputs["report_html"] = write_job_html(out_dir, "Regroup 3D Classes", report, plots)

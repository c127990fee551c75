"""The job's files besides the class maps the M-step tasks write: particles, volume series,
figures and ``report.json`` / ``report.html`` (file formats in :mod:`hetero_dask.jobs.outputs`)."""

from __future__ import annotations

from dataclasses import asdict
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np

import hetero_dask
from hetero_dask.io.mrc import read_map
from hetero_dask.jobs.common import output_table, split_rows
from hetero_dask.jobs.outputs import (
    fsc_figure,
    map_figures,
    write_job_html,
    write_particles,
    write_report_json,
    write_volume_series,
)

from .inputs import Prepared
from .layouts import class_inputs, class_poses
from .params import ReconstructParams

TITLE = "Heterogeneous Reconstruction Only"


def write_particle_files(out_dir: Path, job: Prepared, p: ReconstructParams) -> dict:
    """``OUT/particles.cs|.star|.csg`` in input order: every input field, the class posteriors,
    poses and shifts (pixels at the input box), the best class and the half-set."""
    store = job.store
    to_input = store.to_input_order
    return write_particles(
        out_dir,
        output_table(store, p.stack_dir),
        to_input(job.post),
        to_input(class_poses(job.cols, job.layout)),
        to_input(class_inputs(job.cols, job.layout, store.psize_A, store.psize_A)[2]),
        store.psize_A,
        best_class=to_input(job.best),
        split=to_input(split_rows(store, 0, store.n, job.split_field, p.random_seed)),
        job="hetero_dask reconstruct",
    )


def write_volumes_and_figures(
    out_dir: Path, job: Prepared, classes: list[dict], particle_files: dict
) -> tuple[dict, list]:
    """``OUT/volumes.zip``, the map and FSC figures; returns every output path by name (the
    class maps, the mask and ``particle_files`` too) and the figures for ``report.html``."""
    K = job.layout.n_classes
    vols = np.stack([read_map(out_dir / f"class_{k}" / "map.mrc")[0] for k in range(K)])
    outputs = {"volumes": write_volume_series(out_dir, vols, job.psize_A)}
    maps_png = map_figures(out_dir, {f"class {k}": v for k, v in enumerate(vols)})
    outputs.update(maps_png)
    del vols
    curves = {
        f"class {c['class']}" + (" (empty)" if c["empty"] else ""): c["fsc"]
        for c in classes
        if c["fsc"]
    }
    if curves:
        outputs["fsc_png"] = fsc_figure(out_dir, curves, job.psize_A, job.box)
    outputs.update({f"particles_{k}": v for k, v in particle_files.items() if k != "table"})
    for k in range(K):
        outputs[f"class_{k}_map"] = out_dir / f"class_{k}" / "map.mrc"
    if job.mask_path is not None:
        outputs["mask"] = job.mask_path
    return outputs, [outputs.get("fsc_png"), *maps_png.values()]


def build_report(
    job: Prepared,
    p: ReconstructParams,
    classes: list[dict],
    engine: dict,
    timings: dict,
    outputs: dict,
    out_dir: Path,
) -> dict:
    """``report.json``'s content; ``engine``: ``n_partitions``, ``batch_size``, ``workers``."""
    store, layout = job.store, job.layout
    n_best = np.bincount(job.best, minlength=layout.n_classes)
    return {
        "job": "heterogeneous_reconstruction_only",
        "particles": job.source,
        "store": str(store.path),
        "n_particles": store.n,
        "class_layout": layout.layout,
        "class_layout_autodetected": p.class_prefix is None,
        "n_classes": layout.n_classes,
        "hard_classification": bool(job.hard),
        "box": job.box,
        "input_box": store.box,
        "psize_A": job.psize_A,
        "symmetry": p.symmetry,
        "symmetry_order": int(len(job.symmetry_ops)),
        **engine,
        "parameters": asdict(p),
        "classes": [_class_report(c, int(n_best[c["class"]])) for c in classes],
        "fsc_shells": list(range(job.box // 2 + 1)),
        "timings": {key: round(v, 3) for key, v in timings.items()},
        "versions": _versions(),
        "outputs": {key: str(Path(v).relative_to(out_dir)) for key, v in outputs.items()},
    }


def _class_report(c: dict, n_particles_best: int) -> dict:
    """One class's entry of ``report.json`` from its summary (:func:`.tasks.class_fsc_set`)."""
    return {
        "class": c["class"],
        "weight_sum": c["weight_sum"],
        "n_particles_best": n_particles_best,
        "empty": c["empty"],
        "resolution_A": c["resolution_A"],
        "resolution_corrected_A": c["resolutions_A"].get("corrected", float("inf")),
        "resolutions_A": c["resolutions_A"],
        "fsc": c["fsc"],
        "map": f"class_{c['class']}/map.mrc",
    }


def write_report(out_dir: Path, report: dict, figures: list) -> dict[str, Path]:
    """``OUT/report.json`` and ``OUT/report.html`` (with ``figures``)."""
    return {
        "report": write_report_json(out_dir, report),
        "report_html": write_job_html(out_dir, TITLE, report, figures),
    }


def _versions() -> dict:
    out = {"hetero_dask": hetero_dask.__version__}
    for pkg in ("numpy", "scipy", "dask", "distributed", "zarr"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out

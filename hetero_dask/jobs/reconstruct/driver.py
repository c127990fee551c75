"""Heterogeneous Reconstruction Only: K class maps from particles with per-class poses and posteriors.

Steps:

1. particles (``.cs``, ``.star`` or a particle store) -> Zarr store
   (:func:`hetero_dask.jobs.common.open_particle_store`);
2. the class layout: ``alignments_class_{k}/*`` (heterogeneous refinement),
   ``alignments_class3D_{k}/*`` (3D classification), ``alignments3D_multi/*``,
   or ``alignments3D/class`` alone (hard classes, e.g. ``rlnClassNumber`` of a
   STAR file, all classes at ``alignments3D/pose``); autodetected in that
   order unless ``class_prefix`` is given; the choice is reported;
3. weights ``w_ik`` = class posteriors (or one-hot argmax with
   ``force_hard_classification``); class ``k``'s pose and shift from its slot
   (``alignments3D`` when the slot has none);
4. on Dask (:func:`hetero_dask.runtime.engine.map_reduce`): one task per
   particle range backprojects every class into half-grids at the
   reconstruction box (Fourier crop/pad of the images; the pixel size
   scales, shifts in A are kept); each partial is cut into its classes where
   it was computed and every class merges in its own tree next to its
   M-step task (``select_first``), which symmetrises, reconstructs (Wiener,
   FSC prior) and writes its maps; a second task per class computes
   CryoSPARC's FSC curves; the driver gets only these summaries;
5. outputs (see :func:`reconstruct`).
"""

from __future__ import annotations

import functools
import math
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np

from hetero_dask.io.errors import InputError

from .layouts import (
    LAYOUT_HARD,
    check_posteriors,
    class_inputs,
    class_layout,
    class_poses,
)
from .params import ReconstructParams, ReconstructResult
from .tasks import auto_batch, backproject_range, class_fsc_set, finish_class, split_of

# --------------------------------------------------------------------------- driver


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    import hetero_dask

    out = {"hetero_dask": hetero_dask.__version__}
    for pkg in ("numpy", "scipy", "dask", "distributed", "zarr"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def _load_mask(path, box: int, psize_A: float):
    from hetero_dask.io.mrc import read_map

    vol, psize = read_map(path)
    if vol.shape != (box,) * 3:
        raise InputError(
            path, f"mask of box {vol.shape[0]}", expected=f"a {box}^3 mask (the reconstruction box)"
        )
    if not np.isclose(psize, psize_A, rtol=2e-3):
        raise InputError(
            path,
            f"mask pixel size {psize:.5g} A",
            expected=f"{psize_A:.5g} A (the reconstruction's)",
        )
    if vol.min() < -1e-3 or vol.max() > 1 + 1e-3 or vol.max() <= 0:
        raise InputError(
            path, f"mask values in [{vol.min():.3g}, {vol.max():.3g}]", expected="values in [0, 1]"
        )
    return np.clip(vol, 0, 1)


def reconstruct(
    particles, out, client=None, progress: bool | None = None, **params
) -> ReconstructResult:
    """Heterogeneous Reconstruction Only (see the module doc); ``params``: :class:`ReconstructParams`.

    ``particles``: ``.cs``, ``.star`` or particle store; ``out``: output
    folder; ``client``: a ``distributed.Client`` (else ``workers`` /
    ``scheduler`` params open one, else the work runs in this process).

    Writes ``OUT/particles.cs|.star|.csg`` (input order, every input field
    kept, class fields of :mod:`hetero_dask.jobs.outputs`),
    ``OUT/class_{k}/map.mrc``, ``map_half_A.mrc``, ``map_half_B.mrc``,
    ``OUT/volumes.zip``, ``OUT/mask.mrc`` (when a mask is given),
    ``OUT/fsc.png`` and ``OUT/report.json``. An empty class gives a warning
    and zero maps marked ``"empty": true`` in the report.
    """
    from hetero_dask.jobs.preflight import check_reconstruct
    from hetero_dask.runtime.checkpoint import run_status
    from hetero_dask.runtime.cluster import ClusterSpec, job_client

    p = params.pop("params", None) or ReconstructParams(**params)
    plan = check_reconstruct(particles, out, p)  # everything, before a cluster starts or a byte is written
    if client is None and (p.workers is not None or p.scheduler is not None):
        client = ClusterSpec(scheduler=p.scheduler, workers=p.workers)
    with job_client(client) as c, run_status(plan.output.run_dir, "reconstruct"):
        return _run(particles, out, c, p, progress, plan)


def _run(particles, out, client, p: ReconstructParams, progress, plan) -> ReconstructResult:
    from hetero_dask.core.symmetry import symmetry_group
    from hetero_dask.io.mrc import read_map, write_map
    from hetero_dask.jobs.common import open_particle_store, output_table
    from hetero_dask.jobs.mstep import merge_partials, select_class
    from hetero_dask.jobs.outputs import (
        fsc_figure,
        map_figures,
        write_job_html,
        write_particles,
        write_report_json,
        write_volume_series,
    )
    from hetero_dask.runtime.checkpoint import write_status
    from hetero_dask.runtime.engine import map_reduce, partition_ranges

    t0 = time.perf_counter()
    timings = {}
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    source = str(particles)
    store = open_particle_store(
        particles,
        out_dir,
        client,
        stack_dir=p.stack_dir,
        seed=p.random_seed,
        progress=progress,
        flip_contrast=p.flip_contrast,
        contrast_check=p.contrast_check,
        particle_set=plan.particles.particle_set,
        cache_dir=p.cache_dir,
        image_dtype=p.image_dtype,
    )
    timings["import_s"] = time.perf_counter() - t0

    t = time.perf_counter()
    # Only the class fields now; the whole table is read by the particle writer, off the
    # critical path (after_map below).
    light = store.table(fields=[f for f in store.fields if f.startswith("alignments")])
    layout = class_layout(light, p.class_prefix, source)
    if layout.n_classes < 1:
        raise InputError(source, "no particles with a class")
    cols = {name: light[name] for name in layout.columns()}
    box = plan.box
    psize_out = store.psize_at_box(box)
    post, rot, shifts = class_inputs(cols, layout, store.psize_A, psize_out)
    del rot
    check_posteriors(post, p.posterior_tolerance, source, store.original_index)
    hard = p.force_hard_classification or layout.layout == LAYOUT_HARD
    mask_out = None
    if p.mask is not None:
        mask = _load_mask(p.mask, box, psize_out)
        mask_out = out_dir / "mask.mrc"
        write_map(mask_out, mask, psize_out)
    ops = symmetry_group(p.symmetry, p.symmetry_convention)
    timings["prepare_s"] = time.perf_counter() - t

    t = time.perf_counter()
    align = int(store.attrs.get("chunk_rows", 1))
    n_parts = p.partitions if p.partitions is not None else max(1, math.ceil(store.n / p.partition_rows))
    parts = partition_ranges(store.n, n_parts, align)
    batch = p.batch_size or auto_batch(box, layout.n_classes)
    process = functools.partial(
        backproject_range,
        store_path=str(store.path),
        layout=layout,
        box=box,
        hard=hard,
        random_split=p.random_split,
        seed=p.random_seed,
        batch_size=batch,
    )
    # Per class: the M-step (maps written), then its FSC set as a second, light task that
    # runs wherever a core is free (3 classes on 2 workers: the FSCs fill the idle core).
    fsc_task = functools.partial(
        class_fsc_set, psize_A=psize_out, mask_path=None if mask_out is None else str(mask_out)
    )
    finish = {
        k: (
            functools.partial(
                finish_class,
                k=k,
                out_dir=str(out_dir),
                symmetry_ops=ops,
                tau2_fudge=p.tau2_fudge,
                psize_A=psize_out,
            ),
            fsc_task,
        )
        for k in range(layout.n_classes)
    }
    best = np.argmax(post, axis=1)
    written = {}

    def write_particle_files():
        # Needs no map: runs in a driver thread while the merges and M-steps run.
        t_write = time.perf_counter()
        to_input = store.to_input_order
        written.update(
            write_particles(
                out_dir,
                output_table(store, p.stack_dir),
                to_input(post),
                to_input(class_poses(cols, layout)),
                to_input(class_inputs(cols, layout, store.psize_A, store.psize_A)[2]),
                store.psize_A,
                best_class=to_input(best),
                split=to_input(split_of(str(store.path), p.random_split, p.random_seed)),
                job="hetero_dask reconstruct",
            )
        )
        timings["write_particles_s"] = time.perf_counter() - t_write

    summaries = map_reduce(
        client,
        process,
        parts,
        merge_partials,
        fan_in=p.fan_in,
        finish=finish,
        select=select_class,
        key_prefix="reconstruct",
        progress=progress,
        after_map=write_particle_files,
        select_first=True,
    )
    timings["reconstruct_s"] = time.perf_counter() - t

    t = time.perf_counter()
    classes = [summaries[k] for k in range(layout.n_classes)]
    for c in classes:
        if c["empty"]:
            warnings.warn(
                f"class {c['class']} received no particles (weight {c['weight_sum']:.3g}): "
                "its maps are zeros and it is marked empty in report.json",
                stacklevel=2,
            )
    vols = np.stack(
        [read_map(out_dir / f"class_{k}" / "map.mrc")[0] for k in range(layout.n_classes)]
    )
    outputs = {"volumes": write_volume_series(out_dir, vols, psize_out)}
    maps_png = map_figures(out_dir, {f"class {k}": v for k, v in enumerate(vols)})
    outputs.update(maps_png)
    del vols
    curves = {
        f"class {c['class']}" + (" (empty)" if c["empty"] else ""): c["fsc"]
        for c in classes
        if c["fsc"]
    }
    if curves:
        outputs["fsc_png"] = fsc_figure(out_dir, curves, psize_out, box)
    outputs.update({f"particles_{k}": v for k, v in written.items() if k != "table"})
    for k in range(layout.n_classes):
        outputs[f"class_{k}_map"] = out_dir / f"class_{k}" / "map.mrc"
    if mask_out is not None:
        outputs["mask"] = mask_out
    timings["write_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t0

    n_hard = np.bincount(best, minlength=layout.n_classes)
    report = {
        "job": "heterogeneous_reconstruction_only",
        "particles": source,
        "store": str(store.path),
        "n_particles": store.n,
        "class_layout": layout.layout,
        "class_layout_autodetected": p.class_prefix is None,
        "n_classes": layout.n_classes,
        "hard_classification": bool(hard),
        "box": box,
        "input_box": store.box,
        "psize_A": psize_out,
        "symmetry": p.symmetry,
        "symmetry_order": int(len(ops)),
        "n_partitions": len(parts),
        "batch_size": batch,
        "workers": None if client is None else len(client.scheduler_info()["workers"]),
        "parameters": asdict(p),
        "classes": [
            {
                "class": c["class"],
                "weight_sum": c["weight_sum"],
                "n_particles_best": int(n_hard[c["class"]]),
                "empty": c["empty"],
                "resolution_A": c["resolution_A"],
                "resolution_corrected_A": c["resolutions_A"].get("corrected", float("inf")),
                "resolutions_A": c["resolutions_A"],
                "fsc": c["fsc"],
                "map": f"class_{c['class']}/map.mrc",
            }
            for c in classes
        ],
        "fsc_shells": list(range(box // 2 + 1)),
        "timings": {key: round(v, 3) for key, v in timings.items()},
        "versions": _versions(),
        "outputs": {key: str(Path(v).relative_to(out_dir)) for key, v in outputs.items()},
    }
    outputs["report"] = write_report_json(out_dir, report)
    outputs["report_html"] = write_job_html(
        out_dir, "Heterogeneous Reconstruction Only", report, [outputs.get("fsc_png"), *maps_png.values()]
    )
    write_status(
        out_dir / "run",
        state="done",
        message="finished",
        results={"report": str(outputs["report"]), "report_html": str(outputs["report_html"])},
    )
    return ReconstructResult(
        out_dir, layout.layout, layout.n_classes, box, psize_out, classes, outputs, report
    )

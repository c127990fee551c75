"""The reconstruct driver: import, prepare, reconstruct every class on the engine, write (see
the package docstring)."""

from __future__ import annotations

import contextlib
import functools
import math
import time
import warnings
from collections.abc import Callable
from pathlib import Path

from hetero_dask.io.store import ParticleStore
from hetero_dask.jobs.common import open_particle_store
from hetero_dask.jobs.mstep import merge_partials, select_class
from hetero_dask.jobs.preflight import ReconstructPlan, check_reconstruct
from hetero_dask.runtime.checkpoint import run_status, write_status
from hetero_dask.runtime.cluster import ClusterSpec, job_client
from hetero_dask.runtime.engine import map_reduce, partition_ranges

from .inputs import Prepared, prepare
from .outputs import build_report, write_particle_files, write_report, write_volumes_and_figures
from .params import ReconstructParams, ReconstructResult
from .tasks import auto_batch, backproject_range, class_fsc_set, finish_class


def reconstruct(
    particles, out, client=None, progress: bool | None = None, **params
) -> ReconstructResult:
    """Heterogeneous Reconstruction Only (see the package doc); ``params``: :class:`ReconstructParams`.

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
    p = params.pop("params", None) or ReconstructParams(**params)
    # Everything is checked before a cluster starts or a byte is written.
    plan = check_reconstruct(particles, out, p)
    if client is None and (p.workers is not None or p.scheduler is not None):
        client = ClusterSpec(scheduler=p.scheduler, workers=p.workers)
    with job_client(client) as c, run_status(plan.output.run_dir, "reconstruct"):
        return _run(particles, out, c, p, progress, plan)


def _run(
    particles, out, client, p: ReconstructParams, progress, plan: ReconstructPlan
) -> ReconstructResult:
    """The job on ``client`` (None: this process): import, prepare, reconstruct, write."""
    start = time.perf_counter()
    timings: dict[str, float] = {}
    out_dir = Path(out)
    with _timed(timings, "import_s"):
        out_dir.mkdir(parents=True, exist_ok=True)
        store = _import_particles(particles, out_dir, client, p, progress, plan)
    with _timed(timings, "prepare_s"):
        job = prepare(store, str(particles), out_dir, p, plan.box)
    particle_files = {}

    def write_particles():
        # Needs no map: runs in a driver thread while the merges and M-steps run.
        with _timed(timings, "write_particles_s"):
            particle_files.update(write_particle_files(out_dir, job, p))

    with _timed(timings, "reconstruct_s"):
        parts = _partitions(store, p)
        batch = p.batch_size or auto_batch(job.box, job.layout.n_classes)
        summaries = _reconstruct_classes(
            client, job, parts, batch, out_dir, p, progress, write_particles
        )
    with _timed(timings, "write_s"):
        classes = [summaries[k] for k in range(job.layout.n_classes)]
        _warn_empty(classes)
        outputs, figures = write_volumes_and_figures(out_dir, job, classes, particle_files)
    timings["total_s"] = time.perf_counter() - start
    workers = None if client is None else len(client.scheduler_info()["workers"])
    engine = {"n_partitions": len(parts), "batch_size": batch, "workers": workers}
    report = build_report(job, p, classes, engine, timings, outputs, out_dir)
    outputs |= write_report(out_dir, report, figures)
    done = {key: str(outputs[key]) for key in ("report", "report_html")}
    write_status(out_dir / "run", state="done", message="finished", results=done)
    layout = job.layout
    return ReconstructResult(
        out_dir, layout.layout, layout.n_classes, job.box, job.psize_A, classes, outputs, report
    )


def _import_particles(
    particles, out_dir: Path, client, p: ReconstructParams, progress, plan: ReconstructPlan
) -> ParticleStore:
    """The job's particle store (see :func:`hetero_dask.jobs.common.open_particle_store`)."""
    return open_particle_store(
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


def _partitions(store: ParticleStore, p: ReconstructParams) -> list:
    """Particle ranges of whole store chunks: ``partitions`` of them, else ``partition_rows`` each."""
    align = int(store.attrs.get("chunk_rows", 1))
    n_parts = (
        p.partitions if p.partitions is not None else max(1, math.ceil(store.n / p.partition_rows))
    )
    return partition_ranges(store.n, n_parts, align)


def _reconstruct_classes(
    client,
    job: Prepared,
    parts,
    batch: int,
    out_dir: Path,
    p: ReconstructParams,
    progress,
    after_map: Callable[[], None],
) -> dict:
    """Every class's summary (:func:`.tasks.class_fsc_set`) by class; its maps are written.

    One process task per particle range (:func:`.tasks.backproject_range`), one merge tree per
    class, then its tasks (:func:`_class_tasks`); ``after_map`` runs in a driver thread once every
    range is backprojected.
    """
    process = functools.partial(
        backproject_range,
        store_path=str(job.store.path),
        layout=job.layout,
        box=job.box,
        hard=job.hard,
        split_field=job.split_field,
        seed=p.random_seed,
        batch_size=batch,
    )
    return map_reduce(
        client,
        process,
        parts,
        merge_partials,
        fan_in=p.fan_in,
        finish=_class_tasks(job, out_dir, p),
        select=select_class,
        key_prefix="reconstruct",
        progress=progress,
        after_map=after_map,
        select_first=True,
    )


def _class_tasks(job: Prepared, out_dir: Path, p: ReconstructParams) -> dict:
    """Per class ``k``: its M-step (maps written), then its FSC set as a second, light task that
    runs wherever a core is free (3 classes on 2 workers: the FSCs fill the idle core)."""
    fsc_task = functools.partial(
        class_fsc_set,
        psize_A=job.psize_A,
        mask_path=None if job.mask_path is None else str(job.mask_path),
    )
    return {
        k: (
            functools.partial(
                finish_class,
                k=k,
                out_dir=str(out_dir),
                symmetry_ops=job.symmetry_ops,
                tau2_fudge=p.tau2_fudge,
                psize_A=job.psize_A,
            ),
            fsc_task,
        )
        for k in range(job.layout.n_classes)
    }


def _warn_empty(classes: list[dict]) -> None:
    """A warning for each class that received no particles (its maps are zeros)."""
    for c in classes:
        if c["empty"]:
            warnings.warn(
                f"class {c['class']} received no particles (weight {c['weight_sum']:.3g}): "
                "its maps are zeros and it is marked empty in report.json",
                stacklevel=3,  # shown at reconstruct()
            )


@contextlib.contextmanager
def _timed(timings: dict[str, float], name: str):
    """``timings[name]``: the seconds the block took (not set if it raises)."""
    t = time.perf_counter()
    yield
    timings[name] = time.perf_counter() - t

"""The regroup driver: read and check, compare, cluster, write (see the package docstring)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import NamedTuple

import numpy as np

from hetero_dask.core.spectral import SpectralResult

from .classes import References, cluster_classes, flipped_pairs, references
from .compare import Comparison, compare, prepare_volumes
from .inputs import Inputs, load_inputs
from .outputs import build_report, superclass_maps, write_outputs, write_plots, write_report
from .params import RegroupParams, RegroupResult


def regroup(
    particles,
    volumes,
    out_dir,
    params: RegroupParams | None = None,
    *,
    mask=None,
    volumes_psize_A: float | None = None,
    client=None,
    scheduler=None,
    workers: int | None = None,
    **param_values,
) -> RegroupResult:
    """Regroup K classes into superclasses and write the outputs to ``out_dir``.

    particles: .cs or .star path (or a structured array) with per-class posteriors
        or class numbers; volumes: folder, volume-series .zip, list of .mrc paths,
        or an array (K, N, N, N) with ``volumes_psize_A``; mask: optional .mrc path.
    params: a :class:`RegroupParams`, or its fields as keywords
        (``regroup(p, v, out, num_superclasses=3, align_pairs=True)``).
    client / scheduler / workers: where the pair alignment runs (an existing
        ``distributed.Client`` or :class:`~hetero_dask.runtime.cluster.ClusterSpec`,
        a scheduler address, or a local cluster of ``workers`` processes); no
        cluster is started without ``align_pairs``.
    """
    from hetero_dask.jobs.preflight import check_output
    from hetero_dask.runtime.checkpoint import write_status

    params = _params(params, param_values)
    laps = _Laps()
    # Everything is checked before a cluster starts or a byte is written.
    output = check_output(out_dir, "regroup")
    inputs = load_inputs(particles, volumes, mask, volumes_psize_A, params)
    laps.lap("load_s")
    # No cleanup on failure or Ctrl-C: the status is left at running, and a rerun sees that
    # its process is gone (preflight.check_output).
    write_status(output.run_dir, job="regroup", state="running", error=None)
    grouping = _group(params, inputs, _cluster(client, scheduler, workers), laps)
    result = _write(Path(out_dir), params, inputs, grouping, laps)
    done = {key: str(result.outputs[key]) for key in ("report", "report_html")}
    write_status(output.run_dir, state="done", message="finished", results=done)
    return result


class _Grouping(NamedTuple):
    """What the job decided before writing anything."""

    comparison: Comparison
    superclass: np.ndarray
    spectral: SpectralResult
    refs: References


def _group(params: RegroupParams, inputs: Inputs, cluster, laps: _Laps) -> _Grouping:
    """Prepare and compare the included volumes, cluster them, find each superclass's reference."""
    included = inputs.included
    prepared, psize_crop, _ = prepare_volumes(
        inputs.vols[included], inputs.psize_A, params, inputs.mask_vol
    )
    laps.lap("prepare_s")
    box_A = inputs.vols.shape[-1] * inputs.psize_A
    comparison = compare(prepared, psize_crop, box_A, params, cluster)
    laps.lap("compare_s")
    superclass, spectral = cluster_classes(comparison.correlation, inputs.sizes, included, params)
    refs = references(
        superclass, inputs.sizes, included, comparison.shift_px, comparison.flipped, psize_crop
    )
    laps.lap("cluster_s")
    return _Grouping(comparison, superclass, spectral, refs)


def _write(
    out_dir: Path, params: RegroupParams, inputs: Inputs, grouping: _Grouping, laps: _Laps
) -> RegroupResult:
    """Every output file (see :mod:`.outputs`); the result names them."""
    comparison, superclass, spectral, refs = grouping
    out_dir.mkdir(parents=True, exist_ok=True)
    maps = superclass_maps(params, inputs, superclass, refs)
    result = RegroupResult(
        superclass=superclass,
        class_sizes=inputs.sizes,
        included=inputs.included,
        correlation=comparison.correlation,
        affinity=spectral.affinity,
        eigenvalues=spectral.eigenvalues,
        flipped_pairs=flipped_pairs(superclass, inputs.included, comparison.flipped),
        out_dir=out_dir,
        outputs=write_outputs(out_dir, params, inputs, superclass, refs, maps),
    )
    result.outputs |= write_plots(out_dir, result, inputs.vols, maps)
    laps.lap("write_s")
    laps.seconds["total_s"] = time.perf_counter() - laps.start
    report = build_report(params, inputs, comparison, result, refs, laps.seconds)
    write_report(out_dir, report, result.outputs)
    return result


def _params(params: RegroupParams | None, values: dict) -> RegroupParams:
    if params is None:
        return RegroupParams(**values)
    if values:
        raise TypeError("regroup: pass either params or parameter keywords, not both")
    return params


def _cluster(client, scheduler, workers):
    """Where the pair alignments run: ``client`` as given, else a cluster described (not started)."""
    if client is not None:
        return client
    from hetero_dask.runtime.cluster import ClusterSpec

    return ClusterSpec(scheduler=scheduler, workers=workers)


class _Laps:
    """Seconds of each step of the job, for report.json's timings."""

    def __init__(self):
        self.start = self.last = time.perf_counter()
        self.seconds: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = now - self.last
        self.last = now

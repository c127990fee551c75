"""The engine's tasks of one EM iteration (pure functions of partition, iteration, run files and seed).

:func:`estep_task` scores particles ``[start, stop)`` against every class and backprojects
them into per-class, per-half partial grids, and returns their results, which the engine
hands to :func:`write_rows` (the declared per-particle outputs); the engine sums the partials
in a tree; :func:`mstep_task` turns class ``k``'s sum into its maps, and
:func:`statistics_task` hands the summed statistics to the driver.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr

from hetero_dask.core import pose_grids as so3
from hetero_dask.core.backend import to_host, worker_xp, xp_of
from hetero_dask.core.backprojector import BackprojGrids, crop_grids
from hetero_dask.core.calibration import tempered
from hetero_dask.core.fsc import resolution_A
from hetero_dask.core.scoring import alignment_band, prepare_particles
from hetero_dask.core.search import SearchParams, estep
from hetero_dask.jobs.common import worker_store
from hetero_dask.jobs.mstep import (
    ClassGridsPartial,
    ClassResult,
    accumulating,
    backproject_particles,
    empty_partial,
    mstep_class,
    select_class,
)
from hetero_dask.runtime.engine import Partition, row_hash
from hetero_dask.runtime.kept import KEPT, worker_address

from .images import normalised_images
from .noise import ResidualPower
from .references import class_maps
from .results import TaskResults, previous_classes, write_results
from .scales import relative_scales, scale_histogram
from .schedule import class_change_sums
from .state import KeptClassResult, grids_file


@dataclass
class EStepContext:
    """Static inputs of one iteration's E-step tasks (small: the references reach the workers
    in memory, see :func:`estep_task`; the particles are read from the store)."""

    store_path: str
    references_id: str  # names this iteration's references in each worker's cache
    results_path: str
    split_file: str
    iteration: int
    box: int
    psize_A: float
    n_classes: int
    search: SearchParams
    sigma2: np.ndarray
    class_prior: np.ndarray
    r_backproject: float
    r_band: float
    mask_radius_px: float
    random_assignment: bool
    reference_mode: str
    seed: int
    assignment_file: str | None = None  # (N,) class per particle held fixed, -1 free
    class_scale: np.ndarray | None = None  # (K,) median grey scale per class (per_particle_scale)
    class_temperature: float = 1.0
    backproject_sharpness: float = 1.0


def estep_task(part: Partition, ctx: EStepContext, references) -> tuple[ClassGridsPartial, RowResults]:
    """E-step + backprojection of particles ``[part.start, part.stop)``: one partial and the
    particles' results (the engine's declared per-particle outputs, :func:`write_rows`).

    ``references``: the iteration's half-maps, ``(K, 2, n, n, n)`` or K arrays ``(2, n, n, n)``,
    one copy per worker (the engine's ``shared``).

    Each half-set is scored against every class (``reference_mode``: the other half's
    maps, its own, or the full map) and its particles backprojected; the partial carries
    the statistics the driver needs (class changes, class sums, residual power).
    """
    xp = worker_xp()
    store = worker_store(ctx.store_path)
    start, stop = part.start, part.stop
    images = normalised_images(store, ctx.box, start, stop, ctx.mask_radius_px, xp)
    ctf = store.ctf(start, stop)
    halves = np.load(ctx.split_file, mmap_mode="r", allow_pickle=False)[start:stop].astype(np.int64)
    band = alignment_band(ctx.box, ctx.r_band, xp)
    maps = class_maps(references, ctx.references_id, ctx.r_band, xp)
    found = TaskResults.empty(stop - start, ctx.n_classes)
    out = empty_partial(ctx.n_classes, ctx.box, r_max=ctx.r_backproject, xp=xp)
    noise = ResidualPower.empty(ctx.r_band)
    prior = xp.asarray(weighted_prior(ctx.class_prior, ctx.class_temperature))
    for h in (0, 1):
        sel = np.flatnonzero(halves == h)
        if sel.size == 0:
            continue
        x, c = images[xp.asarray(sel)], ctf.subset(sel)
        ref = 1 - h if ctx.reference_mode == "cross" else h
        refs = [maps[k][ref] for k in range(ctx.n_classes)]
        prep = prepare_particles(x, c, ctx.psize_A, band, normalize=False, mask_radius_px=ctx.mask_radius_px)
        res = estep(prep, refs, xp.asarray(ctx.sigma2), ctx.search, class_prior=prior)
        p = _class_posterior(ctx, res, start + sel)
        found.put(sel, tempered(p, ctx.class_temperature), res)
        noise.add(prep, res, p, refs, ctx.box, xp)
        _backproject(out, ctx, res, tempered(p, 1 / ctx.backproject_sharpness), x, c, h)
    group = zarr.open_group(ctx.results_path, mode="r")
    prev, prev_post = previous_classes(group, start, stop, ctx.iteration)
    out.extra["class_changed"] = class_change_sums(found.posterior, prev, prev_post)
    out.extra["posterior_sum"] = found.posterior.sum(axis=0).astype(np.float64)
    if ctx.class_scale is not None:  # per_particle_scale: the class medians of the next iteration
        out.extra["scale_histogram"] = scale_histogram(found.alpha, found.posterior)
    out.extra["sigma2_num"] = noise.num
    out.extra["sigma2_den"] = noise.den
    return _to_numpy(out), RowResults(ctx.iteration, prev, prev_post, found)


@dataclass
class RowResults:
    """An E-step task's per-particle results and the classes they replace (:func:`previous_classes`)."""

    iteration: int
    previous_class: np.ndarray
    previous_posterior: np.ndarray
    found: TaskResults


def write_rows(part: Partition, rows: RowResults, results_path: str) -> None:
    """Write an E-step task's per-particle results into the run's results (rows on chunk
    boundaries: no two tasks write one chunk)."""
    group = zarr.open_group(results_path, mode="r+")
    write_results(group, part.start, rows.iteration, rows.previous_class, rows.previous_posterior, rows.found)


def _class_posterior(ctx: EStepContext, res, rows: np.ndarray) -> np.ndarray:
    """``(len(rows), K)`` class posteriors of the particles at store rows ``rows``: the
    E-step's, or the assignments that replace them (random ones in random-assignment
    iterations; the split's groups while they are held)."""
    K = ctx.n_classes
    p = to_host(res.class_posterior)
    if ctx.random_assignment:
        # Random hard assignment keyed by (seed, iteration, particle): it does not depend on
        # the partitioning (number of workers), and a task draws for its own rows only.
        drawn = row_hash(rows, ctx.seed, ctx.iteration) % np.uint64(K)
        p = np.eye(K, dtype=np.float32)[drawn.astype(np.int64)]
    if ctx.assignment_file is not None:
        a = np.load(ctx.assignment_file, mmap_mode="r", allow_pickle=False)[rows]
        p = np.where((a >= 0)[:, None], np.eye(K, dtype=np.float32)[np.maximum(a, 0)], p)
    return p


def weighted_prior(prior: np.ndarray, T: float) -> np.ndarray:
    """The class prior ``(K,)`` weighed ``T`` times in the E-step: ``prior^T``, normalised. With a
    likelihood ``T`` times too confident, the E-step's posteriors then rank the classes as the
    tempered model ``prior x likelihood^(1/T)`` does (:func:`tempered` gives its posteriors)."""
    if T == 1:
        return prior
    w = np.power(np.asarray(prior, dtype=np.float64), T)
    return w / w.sum()


def _backproject(out: ClassGridsPartial, ctx: EStepContext, res, p: np.ndarray, images, ctf, h: int) -> None:
    """Backproject half-set ``h``'s particles into ``out`` at each class's significant poses,
    weight = class posterior ``p`` x pose weight."""
    ids = to_host(res.pose_ids)
    pw = to_host(res.pose_weight)
    pshift = to_host(res.pose_shift_px)
    B, P_out = ids.shape[0], ids.shape[2]
    inv_sigma2 = 1.0 / np.maximum(ctx.sigma2, 1e-12)
    scale = None if ctx.class_scale is None else relative_scales(to_host(res.alpha), ctx.class_scale)
    with accumulating(out):  # fused CPU kernel; each (class, half) folded once per task
        for k in range(ctx.n_classes):
            w = p[:, k, None] * pw[:, k, :]
            x = images
            if scale is not None:
                # Y at scale s: value s C Y, weight s^2 C^2, i.e. Y / s at weight s^2.
                w = w * scale[:, k, None] ** 2
                x = images / xp_of(images).asarray(np.maximum(scale[:, k], 1e-3)[:, None, None])
            if not np.any(w > 0):
                continue
            mats = so3.matrices_for(res.order, np.maximum(ids[:, k, :], 0).ravel()).reshape(B, P_out, 3, 3)
            backproject_particles(
                out, x, ctf, ctx.psize_A, mats, pshift[:, k], w, k,
                np.full(B, h), inv_sigma2=inv_sigma2, r_max=ctx.r_backproject,
            )


def _to_numpy(part: ClassGridsPartial) -> ClassGridsPartial:
    part.grids = {key: g.to(np) for key, g in part.grids.items()}
    return part


def _resize_grids(g: BackprojGrids, r_max: float) -> BackprojGrids:
    """Crop or zero-pad half-grids to ``r_max`` (cycles per box)."""
    if r_max <= g.r_max:
        return crop_grids(g, r_max)
    from hetero_dask.core.backprojector import new_grids

    big = new_grids(g.n, g.pad, r_max)
    hb, hs = big.half_width, g.half_width
    sl = (slice(hb - hs, hb + hs + 1), slice(hb - hs, hb + hs + 1), slice(0, hs + 1))
    big.data[sl] += g.data
    big.weight[sl] += g.weight
    return big


def mstep_task(part_k: ClassGridsPartial, k: int, run_dir: str, iteration: int, prev_iteration: int | None,
               decay: float, r_backproject: float, symmetry_ops, tau2_fudge: float, psize_A: float,
               fsc_prior, full_map: bool = True, keep: str | None = None):
    """Running half-map statistics of class ``k`` (decay, then add), then the class's maps and FSC
    (:class:`hetero_dask.jobs.mstep.ClassResult`; the full map only with ``full_map``).

    ``keep`` (a key, new each iteration and run): the half maps, the next iteration's references,
    stay in this process under that key, and a :class:`KeptClassResult` comes back: the result
    without them, with the recipe that rebuilds them from the statistics just written
    (:func:`rebuild_references`).
    """
    old = None
    if prev_iteration is not None and decay > 0:
        old = KEPT.read(grids_file(run_dir, prev_iteration, k))
    for h in (0, 1):
        g = part_k.grids[(k, h)]
        if old is not None:
            before = _resize_grids(BackprojGrids(old[f"data{h}"], old[f"weight{h}"], g.pad, g.n,
                                                 float(old["r_max"])), r_backproject)
            g = _resize_grids(g, r_backproject)
            g = dataclasses.replace(g, data=decay * before.data + g.data, weight=decay * before.weight + g.weight)
        part_k.grids[(k, h)] = g
    path = grids_file(run_dir, iteration, k)
    KEPT.write(path, {
        "data0": part_k.grids[(k, 0)].data, "weight0": part_k.grids[(k, 0)].weight,
        "data1": part_k.grids[(k, 1)].data, "weight1": part_k.grids[(k, 1)].weight,
        "r_max": np.array(part_k.grids[(k, 0)].r_max)})
    map_args = dict(symmetry_ops=symmetry_ops, tau2_fudge=tau2_fudge, psize_A=psize_A, fsc_prior=fsc_prior)
    result = mstep_class(part_k, k, full_map=full_map, **map_args)
    # Beyond the backprojection radius the half-maps hold no data, only the shared gridding
    # correction's leakage, which correlates: the FSC there says nothing and is set to 0.
    fsc = np.asarray(result.fsc, dtype=np.float64).copy()
    fsc[int(math.floor(r_backproject)):] = 0.0
    result = dataclasses.replace(result, fsc=fsc, resolution_A=resolution_A(fsc, result.vol_A.shape[-1], psize_A))
    if keep is None:
        return result
    if full_map:
        raise ValueError("mstep_task keeps the half maps of an iteration without full maps only")
    half = part_k.grids[(k, 0)]
    rebuild = functools.partial(rebuild_references, str(path), k, half.n, half.pad, float(part_k.weight_sum[k]),
                                **map_args)
    KEPT.keep(keep, _half_maps(result))
    return KeptClassResult(dataclasses.replace(result, vol_A=None, vol_B=None), keep, worker_address(), rebuild)


def rebuild_references(grids_path: str, k: int, n: int, pad: int, weight: float, **map_args) -> np.ndarray:
    """Class ``k``'s half maps ``(2, n, n, n)`` as :func:`mstep_task` made them (``keep``), from
    the running statistics it wrote to ``grids_path`` (``map_args``: its map arguments): where the
    kept copy is gone (another process, a lost worker). Equal to the copy: the same grids through
    the same :func:`~hetero_dask.jobs.mstep.mstep_class`."""
    stats = KEPT.read(Path(grids_path), release=False)  # the class's next M-step takes the copy
    grids = {(k, h): BackprojGrids(stats[f"data{h}"], stats[f"weight{h}"], pad, n, float(stats["r_max"]))
             for h in (0, 1)}
    part = ClassGridsPartial(grids, np.full(k + 1, weight))
    return _half_maps(mstep_class(part, k, full_map=False, **map_args))


def _half_maps(result: ClassResult) -> np.ndarray:
    return np.stack([np.asarray(result.vol_A, np.float32), np.asarray(result.vol_B, np.float32)])


# The finishing key whose task returns the iteration's summed E-step statistics (class changes,
# posterior sums, residual power), beside one M-step per class.
STATISTICS = "statistics"


def select_part(merged: ClassGridsPartial, key) -> ClassGridsPartial | dict:
    """What finishing task ``key`` needs of the merged partial: class ``key``'s grids, or for
    :data:`STATISTICS` the summed statistics alone (small)."""
    if key == STATISTICS:
        return dict(merged.extra)
    return select_class(merged, key)


def statistics_task(statistics: dict) -> dict:
    """The summed E-step statistics, as the driver reads them (see :func:`select_part`)."""
    return statistics



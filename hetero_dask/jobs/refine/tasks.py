"""The engine's tasks of one EM iteration (pure functions of partition, iteration, run files and seed).

:func:`estep_task` scores particles ``[start, stop)`` against every class, writes their
results and backprojects them into per-class, per-half partial grids; the engine sums
the partials in a tree; :func:`mstep_task` turns class ``k``'s sum into its maps.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import zarr

from hetero_dask.core import pose_grids as so3
from hetero_dask.core.backend import to_host, worker_xp
from hetero_dask.core.backprojector import BackprojGrids, crop_grids
from hetero_dask.core.fsc import resolution_A
from hetero_dask.core.noise import sigma2_from_residuals
from hetero_dask.core.rotations import matrix_to_pose
from hetero_dask.core.scoring import alignment_band, phase_ramp, prepare_particles, project_band
from hetero_dask.core.search import SearchParams, estep
from hetero_dask.jobs.mstep import (
    ClassGridsPartial,
    accumulating,
    backproject_particles,
    empty_partial,
    mstep_class,
)
from hetero_dask.runtime.engine import Partition, task_rng

from .images import normalised_images, open_store
from .references import class_maps
from .state import grids_file


@dataclass
class EStepContext:
    """Static inputs of one iteration's E-step tasks (small: everything big is read from files)."""

    store_path: str
    run_dir: str
    volumes_file: str
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
    write_results: bool
    seed: int
    symmetry_ops: np.ndarray | None = None
    assignment_file: str | None = None  # (N,) class per particle held fixed, -1 free


def estep_task(part: Partition, ctx: EStepContext) -> ClassGridsPartial:
    """E-step + backprojection of particles ``[part.start, part.stop)`` into one partial."""
    xp = worker_xp()
    store = open_store(ctx.store_path)
    start, stop = part.start, part.stop
    K, box = ctx.n_classes, ctx.box
    images = normalised_images(store, box, start, stop, ctx.mask_radius_px, xp)
    ctf = store.ctf(start, stop)
    halves = np.load(ctx.split_file, mmap_mode="r", allow_pickle=False)[start:stop].astype(np.int64)
    band = alignment_band(box, ctx.r_band, xp)
    maps = class_maps(ctx.volumes_file, ctx.r_band, xp)
    B = stop - start
    post = np.zeros((B, K), np.float32)
    rot = np.zeros((B, K, 3, 3), np.float32)
    shift = np.zeros((B, K, 2), np.float32)
    ll = np.zeros((B, K), np.float32)
    alpha = np.zeros((B, K), np.float32)
    pose_ess = np.zeros((B, K), np.float32)
    out = empty_partial(K, box, r_max=ctx.r_backproject, xp=xp)
    sig_num = np.zeros(int(math.ceil(ctx.r_band)) + 2)
    sig_den = np.zeros_like(sig_num)
    for h in (0, 1):
        sel = np.flatnonzero(halves == h)
        if sel.size == 0:
            continue
        sel_x = xp.asarray(sel)
        prep = prepare_particles(
            images[sel_x], ctf.subset(sel), ctx.psize_A, band, normalize=False,
            mask_radius_px=ctx.mask_radius_px,
        )
        ref = 1 - h if ctx.reference_mode == "cross" else h
        res = estep(prep, [maps[k][ref] for k in range(K)], xp.asarray(ctx.sigma2), ctx.search,
                    class_prior=xp.asarray(ctx.class_prior))
        p = to_host(res.class_posterior)
        if ctx.random_assignment:
            # Random hard assignment: draw i of one (seed, iteration, half) stream goes to particle i,
            # so it does not depend on the partitioning (number of workers).
            rng = task_rng(ctx.seed, ctx.iteration, (h,))
            p = np.eye(K, dtype=np.float32)[rng.integers(0, K, stop)[start + sel]]
        if ctx.assignment_file is not None:
            a = np.load(ctx.assignment_file, mmap_mode="r", allow_pickle=False)[start:stop][sel]
            p = np.where((a >= 0)[:, None], np.eye(K, dtype=np.float32)[np.maximum(a, 0)], p)
        post[sel] = p
        rot[sel] = to_host(res.rotation)
        shift[sel] = to_host(res.shift_px)
        ll[sel] = to_host(res.ll_best)
        alpha[sel] = to_host(res.alpha)
        pose_ess[sel] = to_host(res.pose_ess)
        # Noise: residual power at the best pose of the best class.
        best = p.argmax(axis=1)
        for k in range(K):
            idx = np.flatnonzero(best == k)
            if idx.size == 0:
                continue
            ix = xp.asarray(idx)
            P = project_band(maps[k][ref], res.rotation[ix, k], band.kx, band.ky)
            y = prep.y[ix] * phase_ramp(band.kx, band.ky, res.shift_px[ix, k][:, None, :], box)[:, 0]
            r = y - prep.ctf[ix] * P * res.alpha[ix, k][:, None]
            num = to_host(sigma2_from_residuals(r, band.shell, sig_num.shape[0]))
            sig_num += num * idx.size
            sig_den += idx.size
        # Backprojection at each class's significant poses, weight = class posterior x pose weight.
        ids = to_host(res.pose_ids)
        pw = to_host(res.pose_weight)
        pshift = to_host(res.pose_shift_px)
        P_out = ids.shape[2]
        inv_sigma2 = 1.0 / np.maximum(ctx.sigma2, 1e-12)
        with accumulating(out):  # fused CPU kernel; each (class, half) folded once per task
            for k in range(K):
                w = p[:, k, None] * pw[:, k, :]
                if not np.any(w > 0):
                    continue
                mats = so3.matrices_for(res.order, np.maximum(ids[:, k, :], 0).ravel()).reshape(
                    sel.size, P_out, 3, 3
                )
                backproject_particles(
                    out, images[sel_x], ctf.subset(sel), ctx.psize_A, mats, pshift[:, k], w, k,
                    np.full(sel.size, h), inv_sigma2=inv_sigma2, r_max=ctx.r_backproject,
                )
    # Changes of class against the previous visit of these particles, then the results.
    res_group = zarr.open_group(ctx.results_path, mode="r+")
    # A task re-run (worker loss, resume) finds its own iteration's classes already
    # written: it then compares against the classes those replaced, so the change
    # fraction (and the convergence decision) does not depend on re-runs.
    written_at = res_group["class_iteration"][start:stop]
    rerun = written_at == ctx.iteration
    prev = np.where(rerun, res_group["previous_class"][start:stop], res_group["best_class"][start:stop])
    prev_post = np.where(rerun[:, None], res_group["previous_posterior"][start:stop],
                         res_group["class_posterior"][start:stop])
    best = post.argmax(axis=1).astype(np.int32)
    seen = prev >= 0
    # Soft class change (total variation between the posteriors): for hard posteriors the
    # fraction of particles that changed class, but a particle on the fence between two
    # similar states that flips from 0.51 to 0.49 counts 0.02, not 1: EM has converged when
    # the posteriors stop moving, which their argmax on the fence never does.
    change = 0.5 * np.abs(post - prev_post).sum(axis=1)
    out.extra["class_changed"] = np.array([float(np.sum(change[seen])), float(np.sum(seen))])
    out.extra["posterior_sum"] = post.sum(axis=0).astype(np.float64)
    out.extra["sigma2_num"] = sig_num
    out.extra["sigma2_den"] = sig_den
    if ctx.write_results:
        res_group["previous_class"][start:stop] = prev
        res_group["previous_posterior"][start:stop] = prev_post
        res_group["class_iteration"][start:stop] = np.full(B, ctx.iteration, np.int32)
        res_group["best_class"][start:stop] = best
        res_group["class_posterior"][start:stop] = post
        res_group["pose"][start:stop] = matrix_to_pose(rot.reshape(-1, 3, 3)).reshape(B, K, 3).astype(np.float32)
        res_group["shift"][start:stop] = shift
        res_group["ll"][start:stop] = ll
        res_group["alpha"][start:stop] = alpha
        res_group["pose_ess"][start:stop] = pose_ess
    return _to_numpy(out)


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
               fsc_prior):
    """Running half-map statistics of class ``k`` (decay, then add), then the class's maps and FSC."""
    for h in (0, 1):
        g = part_k.grids[(k, h)]
        if prev_iteration is not None and decay > 0:
            with np.load(grids_file(run_dir, prev_iteration, k), allow_pickle=False) as f:
                old = BackprojGrids(f[f"data{h}"], f[f"weight{h}"], g.pad, g.n, float(f["r_max"]))
            old = _resize_grids(old, r_backproject)
            g = _resize_grids(g, r_backproject)
            g = dataclasses.replace(g, data=decay * old.data + g.data, weight=decay * old.weight + g.weight)
        part_k.grids[(k, h)] = g
    path = grids_file(run_dir, iteration, k)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez(tmp, data0=part_k.grids[(k, 0)].data, weight0=part_k.grids[(k, 0)].weight,
             data1=part_k.grids[(k, 1)].data, weight1=part_k.grids[(k, 1)].weight,
             r_max=np.array(part_k.grids[(k, 0)].r_max))
    tmp.replace(path)
    result = mstep_class(part_k, k, symmetry_ops=symmetry_ops, tau2_fudge=tau2_fudge, psize_A=psize_A,
                         fsc_prior=fsc_prior)
    # Beyond the backprojection radius the half-maps hold no data, only the shared gridding
    # correction's leakage, which correlates: the FSC there says nothing and is set to 0.
    fsc = np.asarray(result.fsc, dtype=np.float64).copy()
    fsc[int(math.floor(r_backproject)):] = 0.0
    result = dataclasses.replace(result, fsc=fsc, resolution_A=resolution_A(fsc, result.vol_A.shape[-1], psize_A))
    return result, part_k.extra


"""Heterogeneous Refinement: classify particles into K classes while refining K structures.

Each EM iteration is ONE Dask graph (:func:`hetero_dask.runtime.engine.map_reduce`):
E-step tasks over contiguous particle ranges of the permuted store (score
every class at every pose of a coarse-to-fine search, write the per-particle
results to disjoint regions of the run's Zarr results, backproject into
per-class, per-half partial grids), a tree reduction of the partials, and one
M-step task per class (running half-map statistics with decay, half-map FSC,
Wiener reconstruction). Class volumes reach the workers through files
in the run directory, read once per worker per iteration.

Schedule (:class:`RefineParams`): online EM on batches of ``batch_size_per_class * K``
particles (contiguous ranges), learning rate 0.1 halving every
``learning_rate_halflife`` iterations; a batch that covers every particle is a full
pass, damped by ``full_pass_learning_rate``; each half-set classified against the other
half's maps; the likelihood's temperature that of the image mask (sigma scale 1); class
fractions as priors; backprojection to 1.5x the best class resolution; all classes
filtered with the max FSC across classes; convergence when the class posteriors move by
less than 5% (total variation, averaged over particles), the class fractions by less
than 1 point and the resolution by at most one shell, then ``final_full_passes`` passes
over every particle.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import zarr

from hetero_dask.core import pose_grids as so3
from hetero_dask.core.backend import to_host, worker_xp
from hetero_dask.core.backprojector import BackprojGrids, crop_grids
from hetero_dask.core.fourier import resolution_to_radius
from hetero_dask.core.fsc import resolution_A
from hetero_dask.core.noise import sigma2_from_residuals
from hetero_dask.core.rotations import matrix_to_pose
from hetero_dask.core.scoring import (
    alignment_band,
    circular_mask,
    mask_temperature,
    phase_ramp,
    prepare_particles,
    project_band,
)
from hetero_dask.core.search import SearchParams, estep
from hetero_dask.core.symmetry import symmetry_group
from hetero_dask.io.store import IMAGE_DTYPES
from hetero_dask.jobs.common import open_particle_store, output_table, particle_split
from hetero_dask.jobs.mstep import (
    ClassGridsPartial,
    accumulating,
    backproject_particles,
    empty_partial,
    merge_partials,
    mstep_class,
    select_class,
)
from hetero_dask.jobs.preflight import RefinePlan, bad_value, check_refine
from hetero_dask.runtime import checkpoint as ckpt
from hetero_dask.runtime.cluster import job_client
from hetero_dask.runtime.engine import (
    Partition,
    map_reduce,
    task_rng,
)
from hetero_dask.runtime.progress import IterationProgress

from .images import normalised_images, open_store
from .noise import extend_shells, initial_sigma2
from .params import RefineParams
from .references import class_maps, estimate_scales, mask_for, prepare_references
from .results import batch_rows, init_results, partitions
from .schedule import class_change, fractions_settled, learning_rate, orders_for, sigma_scale
from .split import identical_references, split_by_variability
from .state import (
    State,
    checkpoint,
    grids_file,
    prune_iteration_files,
    references_file,
    restore_state,
    update_state,
)


@dataclass
class _Context:
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


# ---------------------------------------------------------------------------
# Task functions (pure functions of partition, iteration, run files and seed)
# ---------------------------------------------------------------------------


def estep_task(part: Partition, ctx: _Context) -> ClassGridsPartial:
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


# ---------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------


def refine(particles, volumes, out, client=None, stack_dir=None, resume: bool = False,
           progress: bool | None = None, cache_dir=None, image_dtype: str = "float32",
           **params) -> dict:
    """Run Heterogeneous Refinement; returns the report (also written to ``out/report.json``).

    ``particles``: a particle store (``.zarr``), a CryoSPARC ``.cs`` or a RELION
    ``.star``; ``volumes``: K initial volumes (MRC paths, a folder, or a
    ``volumes.zip``); ``client``: a ``distributed.Client`` (None: Dask's
    synchronous scheduler in this process); ``params``: :class:`RefineParams` fields.

    Every input and parameter is checked first (:func:`~hetero_dask.jobs.preflight.check_refine`),
    before a cluster starts (``client`` may be a
    :class:`~hetero_dask.runtime.cluster.ClusterSpec`) or a byte is written. ``out`` must be new or
    empty; with ``resume`` it must hold a run of the same parameters and inputs, which continues
    from its last completed iteration (a finished run is left as it is and its report returned).
    ``progress``: None (a bar on a terminal, a line per iteration otherwise), False (silent).
    """
    if image_dtype not in IMAGE_DTYPES:
        raise bad_value("image_dtype", image_dtype, " or ".join(IMAGE_DTYPES))
    plan = check_refine(particles, volumes, out, stack_dir=stack_dir, resume=resume, **params)
    if plan.output.action == "finished":
        print(f"{plan.output.out}: this refinement finished already; nothing to resume (its results are "
              "unchanged)", file=sys.stderr, flush=True)
        return load_report(plan.output.out)
    with job_client(client) as client:
        ckpt.write_run_record(plan.output.run_dir, plan.record)
        with ckpt.run_status(plan.output.run_dir, "refine"):
            return _refine(plan, client, progress, cache_dir, image_dtype)


def _refine(plan: RefinePlan, client, progress: bool | None, cache_dir, image_dtype: str) -> dict:
    p = plan.params
    out = plan.output.out
    resume = plan.output.action == "resume"
    run_dir = plan.output.run_dir
    t0 = time.time()
    store = open_particle_store(plan.particles.path, out, client=client, stack_dir=plan.stack_dir, seed=p.seed,
                                progress=progress, particle_set=plan.particles.particle_set,
                                flip_contrast=p.flip_contrast, cache_dir=cache_dir,
                                image_dtype=image_dtype)
    vols_in, psize_vol, names = plan.volumes, plan.volumes_psize_A, plan.volume_names
    K = vols_in.shape[0]
    box = plan.box
    psize = store.psize_at_box(box)
    N = store.n
    mask = mask_for(p, box, psize)
    mask_radius_px = 0.85 * box / 2 if p.mask_diameter_A is None else min(
        0.5 * p.mask_diameter_A / psize, box / 2 - 2)
    # The E-step's images are masked twice (normalised_images, then prepare_particles).
    mask_T = mask_temperature(circular_mask(box, mask_radius_px, 4.0) ** 2)
    ops = symmetry_group(p.symmetry, p.symmetry_convention)
    ops = None if len(ops) == 1 else ops
    split = particle_split(store, p.seed)
    split_file = run_dir / "split.npy"
    np.save(split_file, split.astype(np.int8))
    results_path = init_results(run_dir / "results.zarr", N, K, resume)
    shift_range = p.shift_range_px if p.shift_range_px is not None else max(2.0, round(box / 16))

    state = State()
    random_its = p.num_random_iterations
    assignment_file = run_dir / "assignment.npy"  # the split's groups (-1: not in the split)
    last = ckpt.load_latest(run_dir) if resume else None
    bar = IterationProgress("refine", p.max_iterations, done=0 if last is None else last.meta["iteration"],
                            enabled=progress)
    if last is not None:
        state = restore_state(last)
        if assignment_file.exists():
            random_its = 0
    else:
        assignment_file.unlink(missing_ok=True)
        refs = prepare_references(vols_in, psize_vol, box, psize, p, mask)
        state.sigma2 = initial_sigma2(store, box, psize, box / 2, mask_radius_px, 0, min(N, 500))
        if p.estimate_scale:
            r0 = min(resolution_to_radius(p.initial_lowpass_A, box, psize), box / 2 - 1)
            scales = estimate_scales(store, refs, box, psize, mask_radius_px, state.sigma2, r0, shift_range,
                                      source=plan.particles.path)
            bar.note(f"reference grey scales: {np.round(scales, 4).tolist()}")
            refs = refs * scales[:, None, None, None].astype(np.float32)
        if p.initial_split == "pca" and K > 1 and identical_references(refs):
            r0 = min(resolution_to_radius(p.initial_lowpass_A, box, psize), box / 2 - 1)
            refs, groups = split_by_variability(store, refs[0], K, box, psize, mask_radius_px, r0, shift_range,
                                                 state.sigma2 * mask_T, p, mask, n=min(N, p.split_particles))
            assignment = np.full(N, -1, np.int16)
            assignment[: groups.size] = groups
            np.save(assignment_file, assignment)
            random_its = 0
            bar.note(f"identical references: {groups.size} particles split by their variability into groups of "
                     f"{np.bincount(groups, minlength=K).tolist()}, held for {p.split_iterations} iterations")
        state.volumes = np.repeat(refs[:, None], 2, axis=1)
        state.class_prior = np.full(K, 1.0 / K)
        state.resolution_A = np.full(K, p.initial_lowpass_A)
    assigned_its = p.split_iterations if assignment_file.exists() else 0
    ckpt.write_status(run_dir, iteration=state.iteration, n_iterations=p.max_iterations)

    def run_iteration(it: int, start: int, stop: int, full_pass: bool, decay: float, random: bool):
        r_nyq = box / 2 - 1
        r_best = min(resolution_to_radius(float(np.min(state.resolution_A)), box, psize), r_nyq)
        r_align = max(min(r_best, r_nyq), 4.0)
        r_bp = min(max(p.backproject_factor * r_best, r_align + 2), box / 2)
        order_c, order_f = orders_for(r_align, p.max_order)
        search = SearchParams(
            radius_final=r_align, radius_coarse=max(4.0, 0.6 * r_align), order_coarse=order_c,
            order_final=order_f, shift_range_px=shift_range, shift_step_px=max(1.0, shift_range / 2.5),
            sigma2_scale=mask_T * sigma_scale(it, p, state.converged_at is not None) ** 2,
            hard=p.force_hard_classification,
        )
        r_band = max(r_align, r_bp)
        vol_file = references_file(run_dir, it)
        np.save(vol_file, state.volumes.astype(np.float32))
        ctx = _Context(
            store_path=str(store.path), run_dir=str(run_dir), volumes_file=str(vol_file),
            results_path=str(results_path), split_file=str(split_file), iteration=it, box=box,
            psize_A=psize, n_classes=K, search=search, sigma2=extend_shells(state.sigma2, int(math.ceil(r_band)) + 2),
            class_prior=state.class_prior, r_backproject=r_bp, r_band=r_band,
            mask_radius_px=mask_radius_px, random_assignment=random,
            reference_mode=p.reference_mode, write_results=True, seed=p.seed,
            assignment_file=str(assignment_file) if it < assigned_its else None,
        )
        parts = partitions(start, stop)
        prev = state.iteration - 1 if (decay > 0 and state.iteration > 0) else None
        fsc_prior = None
        if p.filter_max_fsc and state.fsc is not None:
            fsc_prior = np.max(state.fsc, axis=0)
        finish = {
            k: partial(mstep_task, k=k, run_dir=str(run_dir), iteration=it, prev_iteration=prev,
                       decay=decay, r_backproject=r_bp, symmetry_ops=ops, tau2_fudge=p.tau2_fudge,
                       psize_A=psize, fsc_prior=fsc_prior)
            for k in range(K)
        }
        t_it = time.time()
        results = map_reduce(client, partial(estep_task, ctx=ctx), parts, merge_partials, fan_in=8,
                             finish=finish, select=select_class, key_prefix="refine",
                             token=f"it{it}-{start}-{stop}", progress=False)
        # Every class's task returns the merged (small) statistics too: take class 0's.
        stats = results[0][1]
        results = [results[k][0] for k in range(K)]
        return results, stats, dict(r_align=r_align, r_bp=r_bp, order=order_f, t=time.time() - t_it,
                                    n=stop - start, search=search)

    batch = batch_rows(N, K, p.batch_size_per_class)
    it = state.iteration
    # Convergence bookkeeping continues from a resumed checkpoint as if uninterrupted.
    final_passes_done = 0 if state.converged_at is None else it - state.converged_at
    prev_res_radius = (resolution_to_radius(float(np.min(state.resolution_A)), box, psize)
                       if state.history else None)
    while True:
        full = state.converged_at is not None or batch >= N
        if full:
            start, stop = 0, N
        else:
            start = state.batch_start
            stop = min(N, start + batch)
        random = it < random_its and K > 1
        lr = p.full_pass_learning_rate if full else learning_rate(it, p)
        decay = 0.0 if (full and state.converged_at is not None) else 1.0 - lr
        if it == 0:
            decay = 0.0
        results, stats, info = run_iteration(it, start, stop, full, decay, random)
        update_state(state, results, stats, lr, random, p.reference_mode != "full")
        changed = class_change(stats)
        res_radius = resolution_to_radius(float(np.min(state.resolution_A)), box, psize)
        state.history.append({
            "iteration": it, "particles": [int(start), int(stop)], "full_pass": bool(full),
            "random_assignment": bool(random), "split_assignment": it < assigned_its, "learning_rate": lr,
            "class_fraction": state.class_prior.tolist(), "resolution_A": state.resolution_A.tolist(),
            "class_change_fraction": changed, "r_align": info["r_align"], "healpix_order": info["order"],
            "seconds": info["t"], "particle_iterations_per_s": info["n"] / max(info["t"], 1e-9),
        })
        bar.iteration_done(f"particles {start}-{stop} res {np.round(state.resolution_A, 1).tolist()} A "
                           f"fractions {np.round(state.class_prior, 3).tolist()} changed "
                           f"{'-' if changed is None else f'{changed:.3f}'} "
                           f"r_align {info['r_align']:.1f} r_bp {info['r_bp']:.1f} order {info['order']}")
        state.batch_start = 0 if stop >= N else stop
        it += 1
        state.iteration = it
        done = False
        if state.converged_at is not None:
            final_passes_done += 1
            done = final_passes_done >= p.final_full_passes
        elif not random and it > assigned_its and (
            (changed is not None and changed < p.convergence_class_change and prev_res_radius is not None
             and abs(res_radius - prev_res_radius) <= p.convergence_res_shells
             and fractions_settled(state.history, p.convergence_class_change))
            or it >= p.max_iterations - p.final_full_passes
        ):
            state.converged_at = it
        prev_res_radius = res_radius
        if done or it >= p.max_iterations:
            break
        # The checkpoint comes after the convergence decision, so --resume repeats it.
        checkpoint(run_dir, state)
        prune_iteration_files(run_dir, it - 2)
        ckpt.write_status(run_dir, iteration=it, message=f"iteration {it - 1} done")
    bar.close()
    bar.note(f"writing outputs to {out}")
    ckpt.write_status(run_dir, message="writing outputs")
    report = _write_outputs(out, store, state, results, p, box, psize, K, names, t0, run_dir, plan.stack_dir)
    # The last iteration's checkpoint follows its outputs: a run stopped while writing them
    # resumes from the one before, repeats the last iteration and writes them.
    checkpoint(run_dir, state)
    prune_iteration_files(run_dir, it - 2)
    ckpt.write_status(run_dir, state="done", iteration=it, message="finished",
                      results={"report": str(out / "report.json"), "report_html": str(out / "report.html")})
    return report


def _write_outputs(out: Path, store, state: State, results, p: RefineParams, box, psize, K, names, t0,
                   run_dir: Path, stack_dir) -> dict:
    from hetero_dask.jobs import outputs

    res = zarr.open_group(run_dir / "results.zarr", mode="r")
    post = store.to_input_order(res["class_posterior"][:])
    pose = store.to_input_order(res["pose"][:])
    shift = store.to_input_order(res["shift"][:])
    best = store.to_input_order(res["best_class"][:])
    table = output_table(store, stack_dir)
    extra = {"ll": store.to_input_order(res["ll"][:]), "alpha": store.to_input_order(res["alpha"][:]),
             "pose_ess": store.to_input_order(res["pose_ess"][:])}
    split = store.to_input_order(np.load(run_dir / "split.npy", allow_pickle=False))
    paths = outputs.write_particles(out, table, post, pose, shift, psize, best_class=best, extra_fields=extra,
                                    split=split)
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
             "fsc": _computed_fsc(results[k].fsc)}
            for k in range(K)
        ],
        "iterations": state.history,
        "converged_at_iteration": state.converged_at,
        "seconds": time.time() - t0,
        "outputs": {k: str(v) for k, v in {**paths, **plots}.items()},
    }
    outputs.write_report_json(out, report)
    outputs.write_job_html(out, "Heterogeneous Refinement", report, plots.values())
    return report


def _computed_fsc(curve) -> np.ndarray:
    """The FSC with NaN beyond the shells computed (mstep_task sets them to 0: beyond the
    backprojection radius the half-maps hold no data)."""
    c = np.asarray(curve, dtype=np.float64).copy()
    nonzero = np.flatnonzero(c != 0)
    c[(nonzero[-1] + 1 if nonzero.size else 1):] = np.nan
    return c


def _plots(out: Path, state: State, results, pose, best, box, psize, K) -> dict:
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
        {f"class {k}": {"half maps": _computed_fsc(results[k].fsc)} for k in range(K)}, psize, box, out / "fsc.png")
    out_plots.update(map_figures(out, {f"class {k}": results[k].vol_full for k in range(K)}))
    views = []
    for k in range(K):
        sel = best == k
        R = pose_to_matrix(pose[sel, k].astype(np.float64)) if np.any(sel) else np.eye(3)[None]
        views.append(R[:, :, 2])
    out_plots["orientations_plot"] = plots.plot_orientation_distribution(
        {f"class {k}": views[k] for k in range(K)}, out / "orientations.png",
        title="Viewing directions of each class's particles (best class)")
    out_plots["class_fractions_plot"] = plots.plot_class_fractions(
        frac, out / "class_fractions.png", iterations=iters,
        title="Class fractions per iteration (soft: the class priors, mean posteriors)")
    out_plots["resolution_plot"] = plots.plot_resolution_history(resA, out / "resolution.png", iterations=iters)
    out_plots["class_changes_plot"] = plots.plot_class_changes(changes, out / "class_changes.png", iterations=iters)
    return out_plots


def load_report(out) -> dict:
    with open(Path(out) / "report.json") as f:
        return json.load(f)

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

import math
import sys
import time
from functools import partial

import numpy as np

from hetero_dask.core.fourier import resolution_to_radius
from hetero_dask.core.scoring import (
    circular_mask,
    mask_temperature,
)
from hetero_dask.core.search import SearchParams
from hetero_dask.core.symmetry import symmetry_group
from hetero_dask.io.store import IMAGE_DTYPES
from hetero_dask.jobs.common import open_particle_store, particle_split
from hetero_dask.jobs.mstep import (
    merge_partials,
    select_class,
)
from hetero_dask.jobs.preflight import RefinePlan, bad_value, check_refine
from hetero_dask.runtime import checkpoint as ckpt
from hetero_dask.runtime.cluster import job_client
from hetero_dask.runtime.engine import (
    map_reduce,
)
from hetero_dask.runtime.progress import IterationProgress

from .noise import extend_shells, initial_sigma2
from .outputs import load_report, write_outputs
from .references import estimate_scales, mask_for, prepare_references
from .results import batch_rows, init_results, partitions
from .schedule import class_change, fractions_settled, learning_rate, orders_for, sigma_scale
from .split import identical_references, split_by_variability
from .state import (
    State,
    checkpoint,
    prune_iteration_files,
    references_file,
    restore_state,
    update_state,
)
from .tasks import EStepContext, estep_task, mstep_task


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
        ctx = EStepContext(
            store_path=str(store.path), volumes_file=str(vol_file),
            results_path=str(results_path), split_file=str(split_file), iteration=it, box=box,
            psize_A=psize, n_classes=K, search=search, sigma2=extend_shells(state.sigma2, int(math.ceil(r_band)) + 2),
            class_prior=state.class_prior, r_backproject=r_bp, r_band=r_band,
            mask_radius_px=mask_radius_px, random_assignment=random,
            reference_mode=p.reference_mode, seed=p.seed,
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
    report = write_outputs(out, store, state, results, p, box, psize, K, names, t0, run_dir, plan.stack_dir)
    # The last iteration's checkpoint follows its outputs: a run stopped while writing them
    # resumes from the one before, repeats the last iteration and writes them.
    checkpoint(run_dir, state)
    prune_iteration_files(run_dir, it - 2)
    ckpt.write_status(run_dir, state="done", iteration=it, message="finished",
                      results={"report": str(out / "report.json"), "report_html": str(out / "report.html")})
    return report



"""The refinement driver: check, open the run, start or resume, iterate, write the outputs.

Each iteration is one engine graph (:func:`_run_iteration`); what it does is the
schedule's (:mod:`.schedule`), what it leaves is the state (:mod:`.state`).
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
import uuid
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from hetero_dask.core.fourier import resolution_to_radius
from hetero_dask.core.symmetry import symmetry_group
from hetero_dask.io.store import IMAGE_DTYPES
from hetero_dask.jobs.common import open_particle_store, particle_split
from hetero_dask.jobs.mstep import merge_partials
from hetero_dask.jobs.preflight import RefinePlan, bad_value, check_refine
from hetero_dask.runtime import checkpoint as ckpt
from hetero_dask.runtime.cluster import job_client
from hetero_dask.runtime.engine import map_reduce
from hetero_dask.runtime.kept import Recall
from hetero_dask.runtime.progress import IterationProgress

from .images import image_mask_radius_px, likelihood_temperature
from .noise import extend_shells, initial_sigma2
from .outputs import SPLIT_SUMMARY, load_report, write_outputs
from .params import RefineParams
from .references import estimate_scales, mask_for, prepare_references, similar_groups
from .results import batch_rows, init_results, partitions
from .schedule import (
    Step,
    class_change,
    default_shift_range_px,
    em_converged,
    next_step,
    radii,
    search_params,
)
from .split import identical_references, split_by_variability, split_resolutions
from .state import (
    CheckpointWriter,
    State,
    restore_state,
    update_state,
)
from .tasks import (
    STATISTICS,
    EStepContext,
    estep_task,
    mstep_task,
    select_part,
    statistics_task,
    write_rows,
)

# A second round from alike references whose priors all stay within this factor of 1/K would
# retrace the first (two equal states end near 1/2 each, and a restart there only costs time).
_RESTART_PRIOR_RATIO = 1.25


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


@dataclass
class _Run:
    """What stays fixed over a run's iterations."""

    params: RefineParams
    client: object  # a distributed.Client, or None: Dask's synchronous scheduler
    store: object  # the permuted particle store (hetero_dask.io.store.ParticleStore)
    run_dir: Path
    box: int  # the refinement box (px)
    psize_A: float  # at the refinement box
    n_classes: int
    mask: np.ndarray  # (box, box, box) soft mask of the maps
    mask_radius_px: float  # of the images' soft circular mask
    mask_T: float  # the likelihood's temperature under that mask
    symmetry_ops: np.ndarray | None  # None: C1
    shift_range_px: float
    split_file: Path  # (N,) int8 half-set of each particle
    results_path: Path  # the per-particle results (results.init_results)
    assignment_file: Path  # (N,) int16 the split's groups (-1: not in the split), while held
    # Names what this run's M-steps keep on the workers (new for every start or resume).
    token: str = dataclasses.field(default_factory=lambda: uuid.uuid4().hex)

    @property
    def n_particles(self) -> int:
        return self.store.n


def _refine(plan: RefinePlan, client, progress: bool | None, cache_dir, image_dtype: str) -> dict:
    t0 = time.time()
    run = _open_run(plan, client, progress, cache_dir, image_dtype)
    p = run.params
    last = ckpt.load_latest(run.run_dir) if plan.output.action == "resume" else None
    bar = IterationProgress("refine", p.max_iterations, done=0 if last is None else last.meta["iteration"],
                            enabled=progress)
    state = restore_state(last) if last is not None else _start(run, plan, bar)
    ckpt.write_status(run.run_dir, iteration=state.iteration, n_iterations=p.max_iterations)
    writer = CheckpointWriter(run.run_dir)
    try:
        state, results = _iterate(run, state, bar, writer, (plan.volumes, plan.volumes_psize_A))
    except BaseException:
        writer.wait(raise_error=False)  # the run's own error is the one to report
        raise
    writer.wait()
    bar.close()
    bar.note(f"writing outputs to {plan.output.out}")
    ckpt.write_status(run.run_dir, message="writing outputs")
    report = write_outputs(plan.output.out, run.store, state, results, p, run.box, run.psize_A, run.n_classes,
                           plan.volume_names, t0, run.run_dir, plan.stack_dir)
    # The last iteration's checkpoint follows its outputs: a run stopped while writing them
    # resumes from the one before, repeats the last iteration and writes them.
    writer.write(state)
    writer.wait()
    out = plan.output.out
    ckpt.write_status(run.run_dir, state="done", iteration=state.iteration, message="finished",
                      results={"report": str(out / "report.json"), "report_html": str(out / "report.html")})
    return report


def _open_run(plan: RefinePlan, client, progress: bool | None, cache_dir, image_dtype: str) -> _Run:
    """Import the particles (or find them imported), split them into half-sets, create the results."""
    p, run_dir = plan.params, plan.output.run_dir
    store = open_particle_store(plan.particles.path, plan.output.out, client=client, stack_dir=plan.stack_dir,
                                seed=p.seed, progress=progress, particle_set=plan.particles.particle_set,
                                flip_contrast=p.flip_contrast, cache_dir=cache_dir, image_dtype=image_dtype)
    box, K = plan.box, plan.volumes.shape[0]
    psize = store.psize_at_box(box)
    mask_radius_px = image_mask_radius_px(p.mask_diameter_A, box, psize)
    ops = symmetry_group(p.symmetry, p.symmetry_convention)
    split_file = run_dir / "split.npy"
    np.save(split_file, particle_split(store, p.seed).astype(np.int8))
    return _Run(
        params=p, client=client, store=store, run_dir=run_dir, box=box, psize_A=psize, n_classes=K,
        mask=mask_for(p, box, psize), mask_radius_px=mask_radius_px,
        mask_T=likelihood_temperature(box, mask_radius_px), symmetry_ops=None if len(ops) == 1 else ops,
        shift_range_px=p.shift_range_px if p.shift_range_px is not None else default_shift_range_px(box),
        split_file=split_file,
        results_path=init_results(run_dir / "results.zarr", store.n, K, plan.output.action == "resume"),
        assignment_file=run_dir / "assignment.npy",
    )


def _start(run: _Run, plan: RefinePlan, bar: IterationProgress) -> State:
    """The state before the first iteration (:func:`_references_state`), identical references
    split by the particles' variability."""
    run.assignment_file.unlink(missing_ok=True)
    (run.run_dir / SPLIT_SUMMARY).unlink(missing_ok=True)
    state = _references_state(run, plan.volumes, plan.volumes_psize_A, bar, source=plan.particles.path)
    refs = state.volumes[:, 0]
    if run.params.initial_split == "pca" and run.n_classes > 1 and identical_references(refs):
        refs = _split(run, refs[0], state.sigma2, bar)
        state.volumes = np.repeat(refs[:, None], 2, axis=1)
    return state


def _references_state(run: _Run, volumes: np.ndarray, volumes_psize_A: float, bar: IterationProgress,
                      source="particles") -> State:
    """A round's state before its first iteration: the references on the refinement grid,
    low-passed and masked, at the particles' grey scale, the first noise estimate, equal class
    priors (``source``: the particles' input file, for the grey scale's messages)."""
    refs = prepare_references(volumes, volumes_psize_A, run.box, run.psize_A, run.params, run.mask)
    return _prepared_state(run, refs, bar, source)


def _prepared_state(run: _Run, refs: np.ndarray, bar: IterationProgress, source="particles") -> State:
    """:func:`_references_state` from references already prepared (:func:`prepare_references`)."""
    p, store, box, psize, K = run.params, run.store, run.box, run.psize_A, run.n_classes
    sigma2 = initial_sigma2(store, box, psize, box / 2, run.mask_radius_px, 0, min(run.n_particles, 500))
    r0 = min(resolution_to_radius(p.initial_lowpass_A, box, psize), box / 2 - 1)
    if p.estimate_scale:
        scales = estimate_scales(store, refs, box, psize, run.mask_radius_px, sigma2, r0, run.shift_range_px,
                                 source=source)
        bar.note(f"reference grey scales: {np.round(scales, 4).tolist()}")
        refs = refs * scales[:, None, None, None].astype(np.float32)
    return State(volumes=np.repeat(refs[:, None], 2, axis=1), sigma2=sigma2, class_prior=np.full(K, 1.0 / K),
                 resolution_A=np.full(K, p.initial_lowpass_A))


def _restart(run: _Run, state: State, results: list, bar: IterationProgress) -> State:
    """The next round after ``state``'s converged one: it starts from that round's class maps
    (``results``' full maps) as from given references; iterations and history go on."""
    maps = np.stack([r.vol_full for r in results])
    bar.note(f"iteration {state.iteration}: EM starts again from the classes it found from the split, as "
             f"references (low-passed to {run.params.initial_lowpass_A:g} A)")
    new = _references_state(run, maps, run.psize_A, bar)
    return dataclasses.replace(new, iteration=state.iteration, round_start=state.iteration, history=state.history)


def _similar_restart(run: _Run, state: State, pass_fraction: np.ndarray, references, bar: IterationProgress):
    """The next round after ``state``'s converged one when some ``references`` (the job's input
    volumes and their pixel size) are alike (``similar_references_correlation``): the same start
    as the first round's but for the priors, which share each group's 1/K per class in the
    proportions of the round's last pass (``pass_fraction``). None when no two are alike, when
    all are identical (``initial_split`` random), or when no prior would move by a factor of
    ``_RESTART_PRIOR_RATIO`` from 1/K: the round would retrace the first."""
    p, K = run.params, run.n_classes
    refs = prepare_references(*references, run.box, run.psize_A, p, run.mask)
    if identical_references(refs):  # only the random phase made their classes differ: no round from them
        return None
    groups = similar_groups(refs, p.similar_references_correlation)
    if np.bincount(groups).max() < 2:
        return None
    prior = np.empty(K)
    for g in np.unique(groups):
        members = groups == g
        share = np.maximum(pass_fraction[members], 1e-4)
        prior[members] = members.sum() / K * share / share.sum()
    if np.max(np.abs(np.log(prior * K))) < np.log(_RESTART_PRIOR_RATIO):
        bar.note(f"iteration {state.iteration}: references alike at {p.initial_lowpass_A:g} A, but the classes' "
                 f"fractions {np.round(prior, 3).tolist()} are near the equal start: no second round")
        return None
    bar.note(f"iteration {state.iteration}: EM starts again from the references, alike at "
             f"{p.initial_lowpass_A:g} A in groups {groups.tolist()}, with priors {np.round(prior, 3).tolist()} "
             "from the classes it found")
    new = _prepared_state(run, refs, bar)
    return dataclasses.replace(new, class_prior=prior, iteration=state.iteration, round_start=state.iteration,
                               history=state.history)


def _split(run: _Run, consensus: np.ndarray, sigma2: np.ndarray, bar: IterationProgress):
    """K starting maps from one consensus map; the particles' groups saved to hold them
    (``run.assignment_file``) for ``split_iterations`` iterations."""
    p, N, K = run.params, run.n_particles, run.n_classes
    resolutions = split_resolutions(p.initial_lowpass_A, run.box, run.psize_A, p.split_lowpass_A)
    split = split_by_variability(run.store, consensus, K, run.box, run.psize_A, run.mask_radius_px, resolutions,
                                 run.shift_range_px, sigma2 * run.mask_T, p, run.mask, n=min(N, p.split_particles))
    groups = split.groups
    sizes = np.bincount(groups, minlength=K).tolist()
    assignment = np.full(N, -1, np.int16)
    assignment[: groups.size] = groups
    np.save(run.assignment_file, assignment)
    ckpt.write_json_atomic(run.run_dir / SPLIT_SUMMARY, {
        "particles": int(groups.size), "resolution_A": split.resolution_A,
        "separation_by_resolution_A": {f"{res:.2f}": sep for res, sep in split.separation.items()},
        "group_sizes": sizes, "held_iterations": p.split_iterations})
    tried = ", ".join(f"{res:.1f} A: {sep:.2f}" for res, sep in split.separation.items())
    bar.note(f"identical references: {groups.size} particles split by their variability at {split.resolution_A:.1f} A "
             f"(group separation {tried}) into groups of {sizes}, held for {p.split_iterations} iterations")
    return split.refs


def _iterate(run: _Run, state: State, bar: IterationProgress, writer: CheckpointWriter,
             references) -> tuple[State, list]:
    """EM iterations from ``state`` until the final full passes after convergence are done, or
    ``max_iterations``; returns the final state and the last iteration's M-step results (one
    per class). Each iteration but the last is checkpointed by ``writer`` while the next one
    runs. A run started from a split (identical references) converges once, then starts again
    from its classes (:func:`_restart`, ``split_restart``); one started from ``references``
    (volumes, pixel size) of which some are alike starts again from them with the classes'
    fractions as priors (:func:`_similar_restart`).

    Convergence bookkeeping continues from a resumed checkpoint as if uninterrupted.
    """
    p, N = run.params, run.n_particles
    held = run.assignment_file.exists()  # the split's groups hold for the first iterations
    random_its = 0 if held else p.num_random_iterations
    assigned_its = p.split_iterations if held else 0
    batch = batch_rows(N, run.n_classes, p.batch_size_per_class)
    while True:
        step = next_step(state, p, N, batch, random_its, run.n_classes)
        last = _ends_run(p, state.converged_at, step.iteration)
        prev_res_radius = _res_radius(run, state) if state.round_iteration > 0 else None
        # Full maps are read by the outputs (the last iteration's results), as full-map
        # references and by a restart; every other iteration's M-step skips them.
        full_map = last or p.reference_mode == "full"
        results, stats, info = _run_iteration(run, state, step, assigned_its, full_map)
        # Neither random nor the split's held groups are posteriors: the priors stay where they are.
        held_prior = step.random or step.iteration < assigned_its
        update_state(state, results, stats, step.lr, step.prior_lr, held_prior, p.reference_mode != "full")
        changed = class_change(stats)
        _record(state, step, changed, info, step.iteration < assigned_its, bar)
        state.batch_start = 0 if step.stop >= N else step.stop
        it = state.iteration = step.iteration + 1
        if state.converged_at is None and not step.random and it > assigned_its:
            moved = None if prev_res_radius is None else abs(_res_radius(run, state) - prev_res_radius)
            if em_converged(p, changed, moved, state.history) or it >= p.max_iterations - p.final_full_passes:
                state.converged_at = it
        if last:
            again = state.round_start == 0 and it < p.max_iterations
            if held and p.split_restart and again:
                state = _restart(run, state, results, bar)  # once: the first round began from the split
            elif not held and p.similar_references_correlation is not None and again and run.n_classes > 1:
                fraction = stats["posterior_sum"] / max(float(stats["posterior_sum"].sum()), 1e-12)
                restarted = _similar_restart(run, state, fraction, references, bar)
                if restarted is None:
                    return state, results
                state = restarted
            else:
                return state, results
        # The checkpoint comes after the convergence decision, so --resume repeats it.
        writer.write(state)


def _ends_run(p: RefineParams, converged_at: int | None, iteration: int) -> bool:
    """Whether ``iteration`` is its round's last (the run's, but for a round that restarts): it
    completes the final full passes after convergence, or ``max_iterations``. Known before it
    runs (its M-step makes the full maps then): convergence is decided after an iteration and
    is never the last one's."""
    it = iteration + 1
    return (converged_at is not None and it - converged_at >= p.final_full_passes) or it >= p.max_iterations


def _res_radius(run: _Run, state: State) -> float:
    """The best class resolution as a Fourier radius (shells at the refinement box)."""
    return resolution_to_radius(float(np.min(state.resolution_A)), run.box, run.psize_A)


def _run_iteration(run: _Run, state: State, step: Step, assigned_its: int, full_map: bool):
    """One EM iteration on the engine: E-step tasks over the batch, their tree sum, one M-step per class.

    Returns the classes' M-step results (with their full maps only if ``full_map``), the summed
    E-step statistics, and what the history records.
    """
    p, it = run.params, step.iteration
    r = radii(state.resolution_A, run.box, run.psize_A, p.backproject_factor)
    search = search_params(r, state.round_iteration, p, run.shift_range_px, run.mask_T, state.converged_at is not None)
    ctx = EStepContext(
        store_path=str(run.store.path), references_id=f"{uuid.uuid4().hex}-it{it}",
        results_path=str(run.results_path),
        split_file=str(run.split_file), iteration=it, box=run.box, psize_A=run.psize_A,
        n_classes=run.n_classes, search=search, sigma2=extend_shells(state.sigma2, int(math.ceil(r.band)) + 2),
        class_prior=state.class_prior, r_backproject=r.backproject, r_band=r.band,
        mask_radius_px=run.mask_radius_px, random_assignment=step.random, reference_mode=p.reference_mode,
        seed=p.seed, assignment_file=str(run.assignment_file) if it < assigned_its else None,
        class_scale=_class_scale(state, run.n_classes) if p.per_particle_scale else None,
        class_temperature=p.class_temperature, backproject_sharpness=p.backproject_sharpness,
    )
    finish = _finish_tasks(run, state, step, r.backproject, full_map)
    t_it = time.time()
    results = map_reduce(run.client, partial(estep_task, ctx=ctx), partitions(step.start, step.stop),
                         merge_partials, fan_in=8, finish=finish, select=select_part, key_prefix="refine",
                         token=f"it{it}-{step.start}-{step.stop}", progress=False,
                         shared={"references": _references(state)},
                         write_rows=partial(write_rows, results_path=str(run.results_path)))
    info = dict(r_align=r.align, r_bp=r.backproject, order=search.order_final, t=time.time() - t_it,
                n=step.stop - step.start)
    return [results[k] for k in range(run.n_classes)], results[STATISTICS], info


def _references(state: State):
    """The iteration's references as the engine's shared value: the maps the last M-steps kept
    on their workers, recalled there, or the driver's (the start, a restart, a resume)."""
    if state.kept is not None:
        return Recall(tuple(r.key for r in state.kept), tuple(r.worker for r in state.kept),
                      tuple(r.rebuild for r in state.kept))
    return state.volumes.astype(np.float32)


def _class_scale(state: State, K: int) -> np.ndarray:
    """Each class's median grey scale of the iteration before (1 before any: the references'
    grey scales were fitted to the particles)."""
    return np.ones(K) if state.class_scale is None else state.class_scale


def _finish_tasks(run: _Run, state: State, step: Step, r_backproject: float, full_map: bool) -> dict:
    """The finishing tasks: each class's M-step (the previous iteration's running statistics
    decayed by ``step.decay``, none to read when it is 0, plus the batch's; FSC prior: the max
    over classes; the full map only if ``full_map``, its half maps kept on its worker unless
    ``full_map``, which the driver then reads), and :data:`STATISTICS`, the batch's summed
    E-step statistics."""
    p = run.params
    prev = step.iteration - 1 if (step.decay > 0 and step.iteration > 0) else None
    fsc_prior = np.max(state.fsc, axis=0) if p.filter_max_fsc and state.fsc is not None else None
    tasks = {
        k: partial(mstep_task, k=k, run_dir=str(run.run_dir), iteration=step.iteration, prev_iteration=prev,
                   decay=step.decay, r_backproject=r_backproject, symmetry_ops=run.symmetry_ops,
                   tau2_fudge=p.tau2_fudge, psize_A=run.psize_A, fsc_prior=fsc_prior, full_map=full_map,
                   keep=None if full_map else f"{run.token}-it{step.iteration}-class{k}")
        for k in range(run.n_classes)
    }
    return {**tasks, STATISTICS: statistics_task}


def _record(state: State, step: Step, changed: float | None, info: dict, split_held: bool,
            bar: IterationProgress) -> None:
    """The iteration in the history (the report's) and on the progress bar."""
    state.history.append({
        "iteration": step.iteration, "particles": [int(step.start), int(step.stop)], "full_pass": bool(step.full),
        "random_assignment": bool(step.random), "split_assignment": split_held, "learning_rate": step.lr,
        "class_fraction": state.class_prior.tolist(), "resolution_A": state.resolution_A.tolist(),
        "class_change_fraction": changed, "r_align": info["r_align"], "healpix_order": info["order"],
        "seconds": info["t"], "particle_iterations_per_s": info["n"] / max(info["t"], 1e-9),
        "round_start": state.round_start,
    })
    bar.iteration_done(f"particles {step.start}-{step.stop} res {np.round(state.resolution_A, 1).tolist()} A "
                       f"fractions {np.round(state.class_prior, 3).tolist()} changed "
                       f"{'-' if changed is None else f'{changed:.3f}'} "
                       f"r_align {info['r_align']:.1f} r_bp {info['r_bp']:.1f} order {info['order']}")



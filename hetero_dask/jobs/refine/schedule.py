"""The iteration schedule: which particles, learning rate, noise annealing, search radii and
orders, and convergence."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from hetero_dask.core.fourier import resolution_to_radius
from hetero_dask.core.search import SearchParams

from .params import RefineParams
from .state import State


@dataclass(frozen=True)
class Step:
    """What one EM iteration does."""

    iteration: int
    start: int  # particles [start, stop)
    stop: int
    full: bool  # a pass over every particle
    random: bool  # random class assignments
    lr: float  # learning rate of the noise (and of the class priors on a batch)
    prior_lr: float  # learning rate of the class priors
    decay: float  # weight of the running half-map statistics before this iteration's are added


def next_step(state: State, p: RefineParams, n_particles: int, batch: int, random_its: int, n_classes: int) -> Step:
    """The iteration after ``state``: the next batch of ``batch`` particles, or all of them once
    converged (or when a batch covers them); random assignments for the first ``random_its``.
    The learning rate counts the iterations of the state's round."""
    it, t = state.iteration, state.round_iteration
    full = state.converged_at is not None or batch >= n_particles
    start, stop = (0, n_particles) if full else (state.batch_start, min(n_particles, state.batch_start + batch))
    lr = p.full_pass_learning_rate if full else learning_rate(t, p)
    # A round's first M-step has no running statistics of its own to decay.
    decay = 0.0 if (full and state.converged_at is not None) or t == 0 else 1.0 - lr
    prior_lr = lr if not full or p.full_pass_prior_rate is None else p.full_pass_prior_rate
    return Step(it, start, stop, full, it < random_its and n_classes > 1, lr, prior_lr, decay)


@dataclass(frozen=True)
class Radii:
    """One iteration's Fourier radii (shells at the refinement box), from the best class resolution."""

    align: float  # the pose search's
    backproject: float
    band: float  # what the E-step reads: the larger of the two


def radii(resolution_A: np.ndarray, box: int, psize_A: float, backproject_factor: float) -> Radii:
    """Alignment to the best class resolution (at least 4 shells, below Nyquist), backprojection
    to ``backproject_factor`` times it (at least 2 shells beyond the alignment's)."""
    r_nyq = box / 2 - 1
    r_best = min(resolution_to_radius(float(np.min(resolution_A)), box, psize_A), r_nyq)
    r_align = max(min(r_best, r_nyq), 4.0)
    r_bp = min(max(backproject_factor * r_best, r_align + 2), box / 2)
    return Radii(r_align, r_bp, max(r_align, r_bp))


def default_shift_range_px(box: int) -> float:
    """The translation search's range (pixels at the refinement box) when none is given."""
    return max(2.0, round(box / 16))


def search_params(r: Radii, it: int, p: RefineParams, shift_range_px: float, mask_T: float,
                  converged: bool) -> SearchParams:
    """The coarse-to-fine pose search of iteration ``it`` at radii ``r``; the likelihood's
    temperature ``mask_T`` times the annealed sigma scale squared."""
    order_c, order_f = orders_for(r.align, p.max_order)
    return SearchParams(
        radius_final=r.align, radius_coarse=max(4.0, p.coarse_radius_fraction * r.align),
        order_coarse=order_c, order_final=order_f, max_poses=p.search_max_poses,
        n_out_poses=p.backproject_poses, out_mass=p.backproject_mass, shift_range_px=shift_range_px, shift_step_px=max(1.0, shift_range_px / 2.5),
        sigma2_scale=mask_T * sigma_scale(it, p, converged) ** 2,
        hard=p.force_hard_classification, symmetry=p.symmetry, symmetry_convention=p.symmetry_convention,
    )


def orders_for(r_align: float, max_order: int) -> tuple[int, int]:
    """(coarse, final) HEALPix orders: the final step nearest 1/r_align radians, coarse one below.

    Rounding to the nearest order rather than up: one order finer costs 8x the local poses
    and classified worse on the accuracy benchmark (``benchmarks/results/refine.md``).
    """
    step_deg = math.degrees(1.0 / max(r_align, 1.0))
    final = int(np.clip(round(math.log2(60.0 / step_deg)), 1, max_order))
    return max(1, final - 1), final


def learning_rate(it: int, params: RefineParams) -> float:
    """Online EM's step size: ``learning_rate_init`` during random assignments, then
    ``learning_rate`` halving every ``learning_rate_halflife`` iterations."""
    if it < params.num_random_iterations:
        return params.learning_rate_init
    t = it - params.num_random_iterations
    return params.learning_rate * 0.5 ** (t / params.learning_rate_halflife)


def sigma_scale(it: int, params: RefineParams, converged: bool) -> float:
    """CryoSPARC's annealing, linear over ``sigma_anneal_iterations`` from
    ``initial_sigma_scale`` to ``final_sigma_scale`` (1 in CryoSPARC); the final full
    passes after convergence run at ``final_sigma_scale``."""
    if converged:
        return params.final_sigma_scale
    t = min(1.0, it / max(1, params.sigma_anneal_iterations))
    return params.initial_sigma_scale + (params.final_sigma_scale - params.initial_sigma_scale) * t


def fractions_settled(history: list, class_change: float) -> bool:
    """Whether no class fraction moved by more than a fifth of ``class_change`` in the last
    iteration. EM on overlapping classes can move few particles per iteration and still
    drift steadily towards other fractions: that is not convergence."""
    if len(history) < 2:
        return False
    a, b = (np.asarray(h["class_fraction"]) for h in history[-2:])
    return float(np.max(np.abs(a - b))) <= class_change / 5


def em_converged(p: RefineParams, changed: float | None, shells_moved: float | None, history: list) -> bool:
    """Whether EM has converged: the class posteriors moved by less than
    ``convergence_class_change`` (``changed``, None before any particle was seen twice), the
    best resolution by at most ``convergence_res_shells`` (``shells_moved``, None on the first
    iteration) and the class fractions settled."""
    return (changed is not None and changed < p.convergence_class_change and shells_moved is not None
            and shells_moved <= p.convergence_res_shells
            and fractions_settled(history, p.convergence_class_change))


def class_change_sums(posterior: np.ndarray, prev: np.ndarray, prev_post: np.ndarray) -> np.ndarray:
    """``[sum of class changes, particles seen before]`` of a task's particles: ``posterior``
    ``(B, K)`` against their previous classes ``prev`` ``(B,)`` (-1: not seen) and posteriors.

    Soft class change (total variation between the posteriors): for hard posteriors the
    fraction of particles that changed class, but a particle on the fence between two
    similar states that flips from 0.51 to 0.49 counts 0.02, not 1: EM has converged when
    the posteriors stop moving, which their argmax on the fence never does.
    """
    seen = prev >= 0
    change = 0.5 * np.abs(posterior - prev_post).sum(axis=1)
    return np.array([float(np.sum(change[seen])), float(np.sum(seen))])


def class_change(stats) -> float | None:
    """Mean class change of the particles seen before (E-step statistics), None when none was."""
    ch = stats["class_changed"]
    return None if ch[1] == 0 else float(ch[0] / ch[1])

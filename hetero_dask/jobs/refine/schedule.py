"""The iteration schedule: learning rate, noise annealing, pose-search orders and convergence."""

from __future__ import annotations

import math

import numpy as np

from .params import RefineParams


def orders_for(r_align: float, max_order: int) -> tuple[int, int]:
    """(coarse, final) HEALPix orders: the final step nearest 1/r_align radians, coarse one below.

    Rounding to the nearest order rather than up: one order finer costs 8x the local poses
    and, measured on the accuracy benchmark, classified worse (0.743 vs 0.775).
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

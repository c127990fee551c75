"""The refinement's schedule and state update: how fast the class priors follow the E-step."""

import types

import numpy as np
import pytest

from hetero_dask.jobs.refine.params import RefineParams
from hetero_dask.jobs.refine.schedule import learning_rate, next_step
from hetero_dask.jobs.refine.state import State, update_state


def _class_result(n=4):
    vol = np.zeros((n, n, n), np.float32)
    return types.SimpleNamespace(vol_A=vol, vol_B=vol, resolution_A=10.0, fsc=np.ones(n // 2 + 1))


def _stats(posterior_sum):
    return {"posterior_sum": np.asarray(posterior_sum, np.float64),
            "sigma2_num": np.full(3, 2.0), "sigma2_den": np.full(3, 1.0)}


@pytest.mark.parametrize("rate", [None, 1.0, 0.3])
def test_a_full_pass_moves_the_priors_by_the_full_pass_prior_rate(rate):
    p = RefineParams(full_pass_prior_rate=rate, full_pass_learning_rate=0.4)
    state = State(iteration=3, class_prior=np.array([0.25, 0.25, 0.5]), sigma2=np.ones(3))
    step = next_step(state, p, n_particles=100, batch=3000, random_its=0, n_classes=3)
    assert step.full and step.lr == p.full_pass_learning_rate
    if rate is None:  # the default: as the maps
        rate = p.full_pass_learning_rate
    assert step.prior_lr == rate
    update_state(state, [_class_result()] * 3, _stats([60.0, 30.0, 10.0]), step.lr, step.prior_lr,
                 hold_prior=False, half_maps=True)
    expected = (1 - rate) * np.array([0.25, 0.25, 0.5]) + rate * np.array([0.6, 0.3, 0.1])
    np.testing.assert_allclose(state.class_prior, expected, rtol=1e-12)
    # The noise keeps the maps' damping, not the priors' rate.
    lr = p.full_pass_learning_rate
    np.testing.assert_allclose(state.sigma2, (1 - lr) * 1.0 + lr * 2.0)


def test_a_batch_moves_the_priors_by_the_online_learning_rate():
    p = RefineParams(full_pass_prior_rate=1.0)  # for full passes only
    state = State(iteration=5, class_prior=np.array([0.5, 0.5]), sigma2=np.ones(3))
    step = next_step(state, p, n_particles=100_000, batch=2000, random_its=0, n_classes=2)
    assert not step.full and step.prior_lr == step.lr == learning_rate(5, p) < 1
    update_state(state, [_class_result()] * 2, _stats([900.0, 100.0]), step.lr, step.prior_lr,
                 hold_prior=False, half_maps=True)
    np.testing.assert_allclose(state.class_prior, 0.5 + step.lr * (np.array([0.9, 0.1]) - 0.5))


def test_held_assignments_leave_the_priors():
    state = State(class_prior=np.array([0.5, 0.5]), sigma2=np.ones(3))
    update_state(state, [_class_result()] * 2, _stats([900.0, 100.0]), 0.5, 1.0, hold_prior=True, half_maps=True)
    np.testing.assert_array_equal(state.class_prior, [0.5, 0.5])


@pytest.mark.parametrize("rate", [0.0, 1.5])
def test_the_prior_rate_is_checked(rate):
    with pytest.raises(ValueError, match="full_pass_prior_rate"):
        RefineParams(full_pass_prior_rate=rate).validate()

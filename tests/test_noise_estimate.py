"""The refinement's noise estimate (``jobs/refine/noise.py``): each particle's residual power in
its best class, averaged over that class's significant poses by their posterior weights."""

from __future__ import annotations

import dataclasses

import numpy as np

from hetero_dask.core import pose_grids
from hetero_dask.core.noise import sigma2_from_residuals
from hetero_dask.core.projector import prepare_fourier_map
from hetero_dask.core.scoring import alignment_band, phase_ramp, prepare_particles, project_band
from hetero_dask.core.search import SearchParams, estep
from hetero_dask.jobs.refine.noise import ResidualPower
from hetero_dask.phantoms import moving_domain_phantoms
from hetero_dask.simulate import simulate

N, R = 32, 5.0


def _estep(snr: float):
    """Particles of class 1 of two phantoms, the E-step's result against both, and what it used."""
    vols = moving_domain_phantoms(N, 4.0, n_classes=2)
    sim = simulate(vols[1:], 4.0, 60, snr=snr, seed=2, shift_range_px=1.0)
    band = alignment_band(N, R)
    prep = prepare_particles(sim.images, sim.ctf, 4.0, band, normalize=False, mask_radius_px=N)
    refs = [prepare_fourier_map(v, r_max=R + 1) for v in vols]
    search = SearchParams(radius_final=R, radius_coarse=R, order_coarse=2, order_final=4, shift_range_px=2.0,
                          shift_step_px=0.5)
    sigma2 = np.full(int(R) + 3, N * N * (sim.noise_sigma**2 if np.isfinite(snr) else 1.0))
    res = estep(prep, refs, sigma2, search, class_prior=np.full(2, 0.5))
    return prep, res, refs


def _estimate(prep, res, posterior, refs):
    noise = ResidualPower.empty(R)
    noise.add(prep, res, posterior, refs, N, np)
    return noise.num / noise.den


def test_noise_free_particles_leave_little_residual_at_their_poses():
    """Noise-free particles at the poses the E-step found leave a small part of their power:
    the residual uses the E-step's rotations and shifts as it scored them (a flipped shift or a
    wrong rotation would leave about twice the particles' power)."""
    prep, res, refs = _estep(float("inf"))
    posterior = np.asarray(res.class_posterior)
    assert np.all(posterior.argmax(axis=1) == 1)
    residual = _estimate(prep, res, posterior, refs)
    power = np.asarray(sigma2_from_residuals(prep.y, prep.band.shell, len(residual)))  # the particles' own
    assert np.all(residual[1:5] < 0.1 * power[1:5]), (residual[1:5] / power[1:5])


def test_residual_power_is_the_pose_posterior_average():
    """Weights moved between a particle's two best poses move the estimate by the weighted
    difference of the two poses' residual powers, computed here pose by pose."""
    prep, res, refs = _estep(0.5)
    posterior = np.asarray(res.class_posterior)
    best = posterior.argmax(axis=1)
    w = np.zeros_like(np.asarray(res.pose_weight))
    w[:, :, 0], w[:, :, 1] = 0.3, 0.7
    moved = dataclasses.replace(res, pose_weight=w.astype(np.float32))
    got = _estimate(prep, moved, posterior, refs)

    band, rows = prep.band, np.arange(len(best))
    want = np.zeros_like(got)
    for j, wj in ((0, 0.3), (1, 0.7)):
        ids = np.asarray(res.pose_ids)[rows, best, j]
        assert np.all(ids >= 0)
        P = np.stack([project_band(refs[k], pose_grids.matrices_for(res.order, ids[i : i + 1]), band.kx, band.ky)[0]
                      for i, k in enumerate(best)])
        shift = np.asarray(res.pose_shift_px)[rows, best, j]
        y = prep.y * phase_ramp(band.kx, band.ky, shift[:, None, :], N)[:, 0]
        r2 = (np.abs(y - prep.ctf * P) ** 2).mean(axis=0)
        shell = np.asarray(band.shell)
        want += wj * np.bincount(shell, r2, minlength=len(got))[: len(got)] / np.maximum(
            np.bincount(shell, minlength=len(got))[: len(got)], 1)
    np.testing.assert_allclose(got[1 : int(R) + 1], want[1 : int(R) + 1], rtol=1e-4)  # shell 0: no coefficient
    plain = _estimate(prep, res, posterior, refs)
    assert np.abs(plain - got)[1 : int(R) + 1].max() > 1e-3 * plain[1 : int(R) + 1].min()  # the weights matter

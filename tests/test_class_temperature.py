"""``RefineParams.class_temperature`` T: the E-step weighs the class prior T times and the
written posteriors are those of the tempered model ``prior x likelihood^(1/T)``."""

import numpy as np
import pytest

from hetero_dask.core.calibration import tempered
from hetero_dask.core.noise import sigma2_from_residuals
from hetero_dask.core.projector import prepare_fourier_map
from hetero_dask.core.scoring import alignment_band, prepare_particles
from hetero_dask.core.search import SearchParams, estep
from hetero_dask.io.cs import read_cs
from hetero_dask.jobs.refine import RefineParams, refine
from hetero_dask.jobs.refine.tasks import weighted_prior
from hetero_dask.phantoms import moving_domain_phantoms
from hetero_dask.simulate import simulate, write_references, write_simulation

BOX, PSIZE = 32, 4.0


def test_tempered_posteriors_analytic():
    p = np.array([[0.8, 0.2], [1.0, 0.0], [0.5, 0.5]], np.float32)
    np.testing.assert_allclose(tempered(p, 2.0), [[2 / 3, 1 / 3], [1.0, 0.0], [0.5, 0.5]], rtol=1e-6)
    assert tempered(p, 1.0) is p
    np.testing.assert_allclose(weighted_prior(np.array([0.6, 0.3, 0.1]), 2.0), np.array([36, 9, 1]) / 46)


def test_the_estep_ranks_classes_as_the_tempered_model():
    """With the prior weighed T times, tempering the E-step's posteriors gives
    ``prior x likelihood^(1/T)`` normalised, the likelihood read off a run with a flat prior."""
    vols = moving_domain_phantoms(BOX, PSIZE, n_classes=3)
    sim = simulate(vols, PSIZE, 12, snr=0.05, seed=4, shift_range_px=0.0)
    r = 9
    band = alignment_band(BOX, r)
    prep = prepare_particles(sim.images, sim.ctf, PSIZE, band, normalize=False)
    noise = np.random.default_rng(0).normal(0, sim.noise_sigma, sim.images.shape).astype(np.float32)
    sigma2 = sigma2_from_residuals(prepare_particles(noise, sim.ctf, PSIZE, band, normalize=False).y,
                                   band.shell, r + 2)
    fmaps = [prepare_fourier_map(v, r_max=r + 1) for v in vols]
    params = SearchParams(radius_final=r, radius_coarse=6, order_coarse=1, order_final=1, shift_range_px=0,
                          shift_step_px=1, climb_steps=0)
    prior, T = np.array([0.7, 0.2, 0.1]), 2.5
    flat = estep(prep, fmaps, sigma2, params, class_prior=np.full(3, 1 / 3)).class_posterior
    got = tempered(estep(prep, fmaps, sigma2, params, class_prior=weighted_prior(prior, T)).class_posterior, T)
    expected = flat.astype(np.float64) ** (1 / T) * prior
    expected /= expected.sum(axis=1, keepdims=True)
    mixed = (flat.max(axis=1) < 0.99).mean()
    assert mixed > 0.2, f"only {mixed:.2f} of the particles are ambiguous: the test would show nothing"
    np.testing.assert_allclose(got, expected, atol=2e-3)


def test_refine_writes_the_tempered_posteriors(tmp_path):
    """The first iteration starts from a flat prior, which weighing leaves flat: the run at T
    writes the plain run's posteriors tempered."""
    vols = moving_domain_phantoms(BOX, PSIZE, n_classes=2)
    sim = simulate(vols, PSIZE, 60, snr=0.1, seed=5, shift_range_px=1.0)
    cs = write_simulation(tmp_path / "sim", sim, vols)["cs"]
    refs = write_references(tmp_path, vols, PSIZE)
    run = dict(refine_box=BOX, batch_size_per_class=1000, num_random_iterations=0, final_full_passes=0,
               max_iterations=1, max_order=2, progress=False)
    refine(cs, refs, tmp_path / "plain", **run)
    refine(cs, refs, tmp_path / "T3", class_temperature=3.0, **run)
    plain = read_cs(tmp_path / "plain" / "particles.cs")["alignments3D_multi/class_posterior"]
    hot = read_cs(tmp_path / "T3" / "particles.cs")["alignments3D_multi/class_posterior"]
    assert ((plain > 0.01) & (plain < 0.99)).any(axis=1).mean() > 0.1
    np.testing.assert_allclose(hot, tempered(plain, 3.0), atol=1e-5)


def test_a_temperature_below_one_is_refused():
    with pytest.raises(ValueError, match=r"class_temperature.*0.5.*expected a value >= 1"):
        RefineParams(class_temperature=0.5).validate()

"""Simulator and phantoms: image model, SNR definition, SO(3) sampling, files, reconstruction."""

from __future__ import annotations

import numpy as np
import pytest

from hetero_dask.core.ctf import CTFParams
from hetero_dask.core.fourier import fft2c
from hetero_dask.core.symmetry import symmetry_group
from hetero_dask.phantoms import moving_domain_phantoms, symmetric_phantom
from hetero_dask.simulate import (
    disc_variance,
    oracle_accuracy,
    random_rotations,
    render_clean,
    simulate,
)

BOX, PSIZE = 32, 4.0


@pytest.fixture(scope="module")
def vols():
    return moving_domain_phantoms(BOX, PSIZE, n_classes=3)


def test_phantom_classes_differ_only_by_domain(vols):
    d01 = np.abs(vols[0] - vols[1])
    assert d01.max() > 0.3 * vols[0].max()  # the domain moved
    # far from the hinge side (x < 0 half of the box) the classes agree
    assert np.abs(vols[0] - vols[2])[:, :, : BOX // 2 - 2].max() < 1e-3 * vols[0].max()


@pytest.mark.parametrize("sym", ["C2", "C4", "D2", "D3"])
def test_symmetric_phantom_is_invariant(sym):
    from scipy.ndimage import affine_transform

    vol = symmetric_phantom(BOX, PSIZE, sym, convention="relion")
    c = BOX // 2
    for g in symmetry_group(sym, "relion")[1:]:
        # V(g^T r) on the [z, y, x] grid: matrix g^T acting on (x, y, z) -> reverse axes
        M = g.T[::-1, ::-1]
        moved = affine_transform(vol, M, offset=c - M @ np.full(3, c), order=3)
        assert np.abs(moved - vol).max() < 0.05 * vol.max()
    # and not symmetric under a rotation outside the group (z by 90 deg is in C4 only)
    if sym != "C4":
        r90 = np.rot90(vol, 1, axes=(1, 2))
        assert np.abs(r90 - vol).max() > 0.2 * vol.max()


def test_shift_and_ctf_convention_against_real_space_projection(vols):
    """Pose identity, CTF = 1: image = z-projection of V moved by -s (Y = P exp(+2 pi i k.s/N))."""
    s = np.array([[3.0, -2.0], [0.0, 5.0]], np.float32)
    flat = CTFParams(
        df1_A=np.zeros(2), df2_A=np.zeros(2), df_angle_rad=np.zeros(2), cs_mm=0.0, amp_contrast=1.0
    )
    img = render_clean(vols[:1], PSIZE, np.zeros(2, int), np.zeros((2, 3)), s, flat)
    proj = vols[0].sum(axis=0)
    for i in range(2):
        want = np.roll(proj, (-int(s[i, 1]), -int(s[i, 0])), axis=(0, 1))
        wrong = np.roll(proj, (int(s[i, 1]), int(s[i, 0])), axis=(0, 1))
        # 2-3% is trilinear interpolation of 1-pixel-wide blobs; the other sign is off by ~100%
        assert np.abs(img[i] - want).max() < 0.04 * proj.max()
        if s[i].any():
            assert np.abs(img[i] - wrong).max() > 0.5 * proj.max()


def test_ctf_is_applied_in_fourier_space(vols):
    rng = np.random.default_rng(0)
    poses = random_rotations(2, rng)
    ctf = CTFParams(
        df1_A=np.array([15000.0, 20000.0]),
        df2_A=np.array([14000.0, 19500.0]),
        df_angle_rad=np.array([0.3, 1.0]),
    )
    flat = CTFParams(
        df1_A=np.zeros(2), df2_A=np.zeros(2), df_angle_rad=np.zeros(2), cs_mm=0.0, amp_contrast=1.0
    )
    cls, sh = np.zeros(2, int), np.zeros((2, 2), np.float32)
    a = fft2c(render_clean(vols[:1], PSIZE, cls, poses, sh, ctf))
    b = fft2c(render_clean(vols[:1], PSIZE, cls, poses, sh, flat))
    from hetero_dask.core.ctf import ctf_image

    want = b * ctf_image(ctf, BOX, PSIZE)
    assert np.abs(a - want).max() < 1e-3 * np.abs(b).max()


def test_snr_definition_holds_numerically(vols):
    sim = simulate(vols, PSIZE, 100, snr=0.3, seed=2, shift_range_px=2, keep_clean=True)
    noise = sim.images - sim.clean
    assert noise.std() == pytest.approx(sim.noise_sigma, rel=0.01)
    measured = disc_variance(sim.clean, BOX / 2).mean() / noise.var()
    assert measured == pytest.approx(0.3, rel=0.02)
    assert abs(noise.mean()) < 0.01 * sim.noise_sigma


def test_deterministic_and_counts(vols):
    a = simulate(vols, PSIZE, [5, 7, 3], snr=1.0, seed=7)
    b = simulate(vols, PSIZE, [5, 7, 3], snr=1.0, seed=7)
    c = simulate(vols, PSIZE, [5, 7, 3], snr=1.0, seed=8)
    assert np.array_equal(a.images, b.images) and np.array_equal(a.poses, b.poses)
    assert not np.array_equal(a.images, c.images)
    assert np.bincount(a.classes).tolist() == [5, 7, 3]
    assert a.images.dtype == np.float32 and a.images.shape == (15, BOX, BOX)
    assert (a.ctf.df1_A >= a.ctf.df2_A).all()


def test_rotations_uniform_on_so3():
    from hetero_dask.core.rotations import pose_to_matrix

    R = pose_to_matrix(random_rotations(20000, np.random.default_rng(0)))
    # Haar measure: E[R] = 0 and E[R_ij^2] = 1/3
    assert np.abs(R.mean(axis=0)).max() < 0.02
    assert np.abs((R**2).mean(axis=0) - 1 / 3).max() < 0.02


def test_particles_reconstruct_to_the_input_volume_with_true_poses(vols):
    """Backprojecting the simulated particles with the true poses gives the phantom back."""
    from hetero_dask.core.backprojector import backproject, half_plane_freqs, new_grids
    from hetero_dask.core.ctf import ctf_image
    from hetero_dask.core.fourier import translate_ft
    from hetero_dask.core.fsc import fsc
    from hetero_dask.core.reconstruction import reconstruct
    from hetero_dask.core.rotations import pose_to_matrix

    sim = simulate(vols[1:2], PSIZE, 3000, snr=20.0, seed=4, shift_range_px=3)
    kx, ky, flat = half_plane_freqs(BOX)
    Yc = translate_ft(fft2c(sim.images), sim.shifts_px).reshape(sim.n, -1)[:, flat]
    C = ctf_image(sim.ctf, BOX, PSIZE).reshape(sim.n, -1)[:, flat]
    grids = new_grids(BOX)
    backproject(grids, pose_to_matrix(sim.poses), C * Yc, C * C, kx, ky)
    curve = fsc(reconstruct(grids), vols[1])
    assert curve[1 : BOX // 4 + 1].min() > 0.9


@pytest.mark.relion
def test_relion_reconstructs_the_simulated_star(tmp_path, vols):
    """Independent oracle: relion_reconstruct on particles.star gives the phantom back."""
    import subprocess

    from hetero_dask.core.fsc import fsc
    from hetero_dask.io.mrc import read_map
    from hetero_dask.simulate import write_simulation

    sim = simulate(vols[2:3], PSIZE, 1500, snr=20.0, seed=6, shift_range_px=3)
    write_simulation(tmp_path, sim, vols[2:3])
    subprocess.run(
        ["relion_reconstruct", "--i", "particles.star", "--o", "rec.mrc", "--ctf"],
        cwd=tmp_path,
        check=True,
        capture_output=True,
    )
    rec, psize = read_map(tmp_path / "rec.mrc")
    assert psize == pytest.approx(PSIZE)
    assert fsc(rec, vols[2])[1 : BOX // 4 + 1].min() > 0.9


def test_oracle_accuracy_is_our_e_step_given_the_truth(vols):
    """Chance on two copies of one map (nothing tells them apart), near 1 on distinct maps at
    high SNR: the accuracy of the E-step handed the true maps and noise, not a bound."""
    two = vols[[0, 2]]
    sim = simulate(two, PSIZE, 40, snr=2.0, seed=5, shift_range_px=1.0)
    assert oracle_accuracy(two, sim, 1.0) >= 0.9
    same = np.stack([vols[0], vols[0]])
    sim = simulate(same, PSIZE, 40, snr=2.0, seed=5, shift_range_px=1.0)
    assert abs(oracle_accuracy(same, sim, 1.0) - 0.5) < 0.15

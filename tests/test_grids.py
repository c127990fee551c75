"""SO(3) HEALPix grid and shift grid: counts, coverage, nesting, convention."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from hetero_dask.core import pose_grids as grids
from hetero_dask.core.rotations import euler_to_matrix


def _dirs(order):
    theta, phi = grids.pix2ang_nest(order, np.arange(grids.n_directions(order)))
    return np.stack(
        [np.sin(theta) * np.cos(phi), np.sin(theta) * np.sin(phi), np.cos(theta)], axis=-1
    )


def _min_angle_deg(R_query, R_grid):
    tr = np.einsum("qij,gij->qg", R_query.astype(np.float64), R_grid.astype(np.float64))
    return np.rad2deg(np.arccos(np.clip((tr.max(axis=1) - 1) / 2, -1, 1)))


@pytest.mark.parametrize("order", [0, 1, 2, 3])
def test_counts(order):
    g = grids.so3_grid(order)
    assert g.matrices.shape == (72 * 8**order, 3, 3)
    assert g.matrices.dtype == np.float32
    assert np.array_equal(g.ids, np.arange(72 * 8**order))
    assert grids.n_directions(order) == 12 * 4**order and grids.n_psi(order) == 6 * 2**order
    assert g.step_deg == 60 / 2**order


def test_healpix_order0_known_centres():
    # nside = 1: rings at z = 2/3, 0, -2/3; polar faces at phi = 45 + 90 j, equatorial at 90 j.
    theta, phi = grids.pix2ang_nest(0, np.arange(12))
    np.testing.assert_allclose(np.cos(theta), np.repeat([2 / 3, 0, -2 / 3], 4), atol=1e-12)
    np.testing.assert_allclose(
        np.rad2deg(phi), [45, 135, 225, 315, 0, 90, 180, 270, 45, 135, 225, 315]
    )


@pytest.mark.parametrize("order", [1, 2, 3])
def test_directions_equal_area_uniform(order):
    v = _dirs(order)
    assert len(np.unique(np.round(v, 6), axis=0)) == len(v)
    np.testing.assert_allclose(v.mean(axis=0), 0, atol=1e-9)  # equal-area pixels balance
    d = v @ v.T
    np.fill_diagonal(d, -2)
    nn = np.rad2deg(np.arccos(np.clip(d.max(axis=1), -1, 1)))
    step = grids.angular_step_deg(order)
    assert nn.max() < 1.05 * step and nn.min() > 0.8 * step


@pytest.mark.parametrize("order", [1, 2])
def test_so3_covers_random_rotations(order):
    g = grids.so3_grid(order)
    Rq = Rotation.random(500, random_state=order).as_matrix()
    assert _min_angle_deg(Rq, g.matrices).max() < grids.angular_step_deg(order)


@pytest.mark.parametrize("order", [0, 1, 2])
def test_children_within_one_step(order):
    ids = np.arange(grids.n_rotations(order))
    ch = grids.children(order, ids)
    assert ch.shape == (len(ids), 8)
    assert all(len(set(row)) == 8 for row in ch)
    assert np.array_equal(
        np.unique(ch), np.arange(grids.n_rotations(order + 1))
    )  # they cover the finer grid
    Rp = grids.matrices_for(order, ids).astype(np.float64)
    Rc = grids.matrices_for(order + 1, ch.ravel()).astype(np.float64).reshape(len(ids), 8, 3, 3)
    tr = np.einsum("pij,pcij->pc", Rp, Rc)
    ang = np.rad2deg(np.arccos(np.clip((tr - 1) / 2, -1, 1)))
    assert ang.max() < 0.75 * grids.angular_step_deg(order)


def test_matrix_convention_viewing_direction_and_psi():
    order = 2
    ids = np.arange(0, grids.n_rotations(order), 37)
    R = grids.matrices_for(order, ids).astype(np.float64)
    npsi = grids.n_psi(order)
    theta, phi = grids.pix2ang_nest(order, ids // npsi)
    view = np.stack(
        [np.sin(theta) * np.cos(phi), np.sin(theta) * np.sin(phi), np.cos(theta)], axis=-1
    )
    np.testing.assert_allclose(R[:, :, 2], view, atol=1e-6)
    psi = (ids % npsi + 0.5) * 360 / npsi
    A = euler_to_matrix(np.rad2deg(phi), np.rad2deg(theta), psi)
    np.testing.assert_allclose(R, A.swapaxes(-1, -2), atol=1e-6)
    np.testing.assert_allclose(
        R @ R.swapaxes(-1, -2), np.broadcast_to(np.eye(3), R.shape), atol=1e-6
    )


def test_shift_grid_relion_semantics():
    s = grids.shift_grid(5, 2)
    assert s.shape == (21, 2) and s.dtype == np.float32  # RELION: offset range 5, step 2 -> 21
    assert np.array_equal(s[0], [0, 0])
    assert np.all(np.hypot(s[:, 0], s[:, 1]) <= 5)
    assert len(grids.shift_grid(5, 2, shape="square")) == 25
    assert len(grids.shift_grid(0, 1)) == 1
    with pytest.raises(ValueError):
        grids.shift_grid(3, 0)

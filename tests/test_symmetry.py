"""Symmetry groups: group axioms, orders, axis conventions, RELION's operators, projection side."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from hetero_dask.core import pose_grids
from hetero_dask.core.fourier import ifft2c
from hetero_dask.core.noise import sigma2_from_residuals
from hetero_dask.core.projector import prepare_fourier_map, project_images
from hetero_dask.core.rotations import euler_to_matrix
from hetero_dask.core.scoring import alignment_band, prepare_particles
from hetero_dask.core.search import SearchParams, coarse_rotation_ids, estep
from hetero_dask.core.symmetry import (
    asymmetric_unit,
    close_group,
    expand_poses,
    pose_error_modulo_symmetry,
    symmetry_group,
)

ORDERS = {"C1": 1, "C2": 2, "C4": 4, "C7": 7, "D1": 2, "D2": 4, "D7": 14, "T": 12, "O": 24, "I": 60}


def _index_of(mat, group, tol=1e-6):
    """Index of ``mat`` in ``group`` or -1."""
    d = np.abs(group - mat[None]).max(axis=(1, 2))
    i = int(np.argmin(d))
    return i if d[i] < tol else -1


@pytest.mark.parametrize("convention", ["cryosparc", "relion"])
@pytest.mark.parametrize("name", sorted(ORDERS))
def test_group_axioms_and_order(name, convention):
    ops = symmetry_group(name, convention)
    assert ops.shape == (ORDERS[name], 3, 3)
    assert ops.dtype == np.float64
    np.testing.assert_allclose(ops[0], np.eye(3), atol=1e-12)
    np.testing.assert_allclose(np.linalg.det(ops), 1.0, atol=1e-10)
    np.testing.assert_allclose(
        ops @ ops.transpose(0, 2, 1), np.broadcast_to(np.eye(3), ops.shape), atol=1e-10
    )
    # closure: every product and every inverse is in the group; no duplicates
    for a in ops:
        for b in ops:
            assert _index_of(a @ b, ops) >= 0
        assert _index_of(a.T, ops) >= 0
    d = np.abs(ops[:, None] - ops[None]).max(axis=(2, 3)) + 10 * np.eye(len(ops))
    assert d.min() > 1e-3


def test_names_case_insensitive_and_errors():
    np.testing.assert_allclose(symmetry_group("d7", "RELION"), symmetry_group("D7", "relion"))
    np.testing.assert_allclose(symmetry_group(" i "), symmetry_group("I"))
    for bad in ("X3", "C", "C0", "D-2", "I3", "", "C2.5"):
        with pytest.raises(ValueError, match="symmetry group"):
            symmetry_group(bad)
    with pytest.raises(ValueError, match="convention"):
        symmetry_group("C2", "eman")


def test_cyclic_axis_is_z():
    ops = symmetry_group("C5")
    np.testing.assert_allclose(
        ops @ np.array([0, 0, 1.0]), np.tile([0, 0, 1.0], (5, 1)), atol=1e-12
    )
    angles = np.sort(np.round(np.rad2deg(Rotation.from_matrix(ops).magnitude()), 6))
    np.testing.assert_allclose(angles, [0, 72, 72, 144, 144], atol=1e-6)


@pytest.mark.parametrize("n", [3, 7])
def test_dihedral_twofold_axis_conventions(n):
    """Odd n tells the conventions apart: the dyad is along x (RELION) or y (CryoSPARC)."""
    two_x = np.diag([1.0, -1.0, -1.0])
    two_y = np.diag([-1.0, 1.0, -1.0])
    rel = symmetry_group(f"D{n}", "relion")
    cs = symmetry_group(f"D{n}", "cryosparc")
    assert _index_of(two_x, rel) >= 0 and _index_of(two_y, rel) < 0
    assert _index_of(two_y, cs) >= 0 and _index_of(two_x, cs) < 0


def test_d2_holds_both_dyads_in_both_conventions():
    for conv in ("relion", "cryosparc"):
        ops = symmetry_group("D2", conv)
        for d in (np.diag([1.0, -1, -1]), np.diag([-1.0, 1, -1]), np.diag([-1.0, -1, 1])):
            assert _index_of(d, ops) >= 0


def test_close_group_rejects_infinite_generators():
    irrational = Rotation.from_rotvec([0, 0, 1.0]).as_matrix()  # 1 rad: never closes
    with pytest.raises(ValueError, match="finite"):
        close_group([irrational], max_order=50)


def test_pose_error_modulo_symmetry():
    rng = np.random.default_rng(0)
    ops = symmetry_group("D7", "relion")
    R_true = Rotation.random(50, random_state=1).as_matrix()
    g = ops[rng.integers(0, len(ops), 50)]
    small = Rotation.from_rotvec(rng.normal(size=(50, 3)) * 0.01).as_matrix()
    R_est = small @ g @ R_true
    err = pose_error_modulo_symmetry(R_est, R_true, ops)
    assert err.shape == (50,)
    np.testing.assert_allclose(err, Rotation.from_matrix(small).magnitude(), atol=1e-9)
    # without symmetry the error is large for most particles
    plain = pose_error_modulo_symmetry(R_est, R_true, ops[:1])
    assert np.mean(plain > 0.3) > 0.8
    # single pose, C1
    assert pose_error_modulo_symmetry(R_true[0], R_true[0], np.eye(3)[None]) < 1e-7


def test_expand_poses_shape_and_identity_first():
    ops = symmetry_group("T")
    R = Rotation.random(4, random_state=2).as_matrix()
    out = expand_poses(R, ops)
    assert out.shape == (4, 12, 3, 3)
    np.testing.assert_allclose(out[:, 0], R, atol=1e-12)
    np.testing.assert_allclose(out[2, 5], ops[5] @ R[2], atol=1e-12)


def _symmetric_volume(ops, n=32, sigma=1.0, seed=0):
    """Sum of Gaussian blobs at g @ p for random p: V(g r) = V(r) exactly (up to the box)."""
    rng = np.random.default_rng(seed)
    pts = rng.uniform(-7, 7, size=(5, 3))
    centres = np.einsum("gij,pj->gpi", ops, pts).reshape(-1, 3)
    c = np.arange(n) - n // 2
    z, y, x = np.meshgrid(c, c, c, indexing="ij")
    r = np.stack([x, y, z], axis=-1).astype(np.float64)
    vol = np.zeros((n, n, n))
    for q in centres:
        vol += np.exp(-np.sum((r - q) ** 2, axis=-1) / (2 * sigma**2))
    return vol.astype(np.float32)


def _corr(a, b):
    a, b = a.ravel(), b.ravel()
    return float(np.real(np.vdot(a, b)) / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_symmetric_volume_projects_equal_at_g_times_R():
    """The image at R equals the image at g @ R (left), not in general at R @ g."""
    ops = symmetry_group("T", "cryosparc")
    vol = _symmetric_volume(ops)
    fmap = prepare_fourier_map(vol, pad=2)
    R = Rotation.from_euler("zyz", [0.3, 1.1, -0.7]).as_matrix()
    left = project_images(fmap, expand_poses(R[None], ops)[0])
    right = project_images(fmap, np.einsum("ij,gjk->gik", R, ops))
    ref = left[0]
    for g in range(1, len(ops)):
        assert _corr(ref, left[g]) > 0.999
    assert max(_corr(ref, right[g]) for g in range(1, len(ops))) < 0.9


@pytest.mark.parametrize("name", ["C2", "C3", "D7", "O", "I"])
def test_asymmetric_unit_holds_one_pose_of_each_set_of_mates(name):
    """Of the |G| poses g @ R that give one image, exactly one is in the unit; the unit
    holds about 1/|G| of a uniform grid."""
    ops = symmetry_group(name)
    R = Rotation.random(400, random_state=1).as_matrix()
    inside = np.stack([asymmetric_unit(expand_poses(R, ops)[:, g], ops) for g in range(len(ops))], axis=1)
    assert np.all(inside.sum(axis=1) == 1)
    grid = pose_grids.so3_grid(3).matrices
    share = asymmetric_unit(grid, ops).mean() * len(ops)
    assert abs(share - 1) < 0.1  # the cell's edge cuts the grid: 0.98-1.06 at order 3


@pytest.mark.parametrize("convention", ["cryosparc", "relion"])
def test_dense_stage_keeps_one_unit_only_where_the_grid_holds_every_mate(convention):
    """C2, C4, D2, D4 map the HEALPix grid onto itself (each grid pose's mates are grid poses):
    the dense stage scores one unit. Under C3, D3, T, O, I the mates fall between grid poses and
    the whole grid is kept, as without symmetry."""
    grid = pose_grids.so3_grid(2).matrices
    for name in ("C2", "C4", "D2", "D4"):
        ops = symmetry_group(name, convention)
        ids = coarse_rotation_ids(2, name, convention)
        assert np.array_equal(ids, np.flatnonzero(asymmetric_unit(grid, ops)))
        assert ids.size == len(grid) // len(ops)
    for name in ("C1", "C3", "D3", "T", "O", "I"):
        assert coarse_rotation_ids(2, name, convention) is None


def _mates_among(rotations, ops, within_deg):
    """Number of (ordered) pairs of ``rotations`` (P, 3, 3) that are symmetry mates of each
    other (not the same pose) to ``within_deg``."""
    R = np.asarray(rotations, np.float64)
    n = 0
    for i in range(len(R)):
        same = np.degrees(pose_error_modulo_symmetry(R, np.repeat(R[i : i + 1], len(R), 0), ops[:1]))
        mate = np.degrees(pose_error_modulo_symmetry(R, np.repeat(R[i : i + 1], len(R), 0), ops[1:]))
        n += int(np.sum((mate < within_deg) & (same > within_deg)))
    return n


def test_symmetric_search_keeps_distinct_poses_and_finds_the_pose():
    """With the maps' symmetry the E-step's dense stage scores one asymmetric unit: the poses it
    keeps are not mates of each other (over the whole grid many are), it scores fewer poses, and
    it finds each particle's pose (modulo the symmetry) as well as the whole-grid search."""
    ops = symmetry_group("C4")
    vol = _symmetric_volume(ops, n=32, sigma=1.5, seed=3)
    fmap = prepare_fourier_map(vol)
    R_true = Rotation.random(12, random_state=5).as_matrix().astype(np.float32)
    clean = ifft2c(project_images(fmap, R_true)).real.astype(np.float32)
    rng = np.random.default_rng(0)
    sd = 0.5 * clean.std()
    imgs = clean + rng.normal(0, sd, clean.shape).astype(np.float32)
    band = alignment_band(32, 12)
    prep = prepare_particles(imgs, None, 4.0, band, normalize=False)
    noise = prepare_particles(rng.normal(0, sd, clean.shape).astype(np.float32), None, 4.0, band, normalize=False)
    sigma2 = sigma2_from_residuals(noise.y, band.shell, 14)
    fmaps = [prepare_fourier_map(vol, r_max=13)]
    found = {}
    for sym in ("C1", "C4"):
        params = SearchParams(radius_final=12, order_coarse=2, order_final=3, max_poses=12, n_out_poses=12,
                              shift_range_px=0, symmetry=sym)
        res = estep(prep, fmaps, sigma2, params)
        err = np.degrees(pose_error_modulo_symmetry(res.rotation[:, 0], R_true, ops))
        mates = sum(_mates_among(pose_grids.matrices_for(3, ids[ids >= 0]), ops, 3.0)
                    for ids in res.pose_ids[:, 0])
        found[sym] = (np.median(err), mates, res.n_poses_evaluated.mean())
    assert found["C4"][0] < pose_grids.angular_step_deg(3)
    assert found["C4"][0] <= found["C1"][0] + 1.0
    # Over the whole grid most poses a particle keeps come with a mate; the finer stage can step
    # out of the unit, so a mate may still reach the list where a particle's poses meet its edge.
    assert 0 < found["C1"][1] and found["C4"][1] <= found["C1"][1] / 4
    assert found["C4"][2] < 0.6 * found["C1"][2]


def _relion_ops(name):
    out = subprocess.run(
        ["relion_refine", "--sym", name, "--print_symmetry_ops"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    lines = out.splitlines()
    mats, eulers = [], []
    for i, line in enumerate(lines):
        if line.strip().startswith("R("):
            mats.append([[float(v) for v in lines[i + j].split()] for j in (1, 2, 3)])
            nxt = lines[i + 4] if i + 4 < len(lines) else ""
            eulers.append([float(v) for v in nxt.split(":")[1].split()] if "Euler" in nxt else None)
    return np.array(mats), eulers


@pytest.mark.relion
@pytest.mark.parametrize("name", ["C4", "D2", "D7", "T", "O", "I"])
def test_relion_print_symmetry_ops(name):
    """RELION's operators equal ours as sets (printed to ~5 significant digits)."""
    rel, eulers = _relion_ops(name)
    ours = symmetry_group(name, "relion")
    assert len(rel) == len(ours) == ORDERS[name]
    d = np.abs(rel[:, None] - ours[None]).max(axis=(2, 3))
    assert d.min(axis=1).max() < 1e-4
    assert d.min(axis=0).max() < 1e-4
    # The printed matrix is RELION's Euler matrix A of the printed angles.
    for m, e in zip(rel, eulers, strict=True):
        if e is not None:
            np.testing.assert_allclose(euler_to_matrix(*e), m, atol=1e-4)


@pytest.mark.relion
def test_relion_d7_is_not_the_cryosparc_d7():
    rel, _ = _relion_ops("D7")
    cs = symmetry_group("D7", "cryosparc")
    d = np.abs(rel[:, None] - cs[None]).max(axis=(2, 3)).min(axis=1)
    assert d.max() > 0.1

"""Rotations: CryoSPARC pose <-> matrix <-> RELION Euler, checked against scipy and by round trips."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from hetero_dask.core.rotations import (
    angle_between,
    euler_to_matrix,
    euler_to_pose,
    matrix_to_euler,
    matrix_to_pose,
    pose_to_euler,
    pose_to_matrix,
    viewing_direction,
)

RNG = np.random.default_rng(12345)


def _random_poses(n=500):
    return Rotation.random(n, random_state=7).as_rotvec()


def test_pose_to_matrix_matches_scipy():
    pose = _random_poses()
    np.testing.assert_allclose(
        pose_to_matrix(pose), Rotation.from_rotvec(pose).as_matrix(), atol=1e-12
    )


def test_pose_to_matrix_small_angles():
    pose = RNG.normal(size=(20, 3)) * np.logspace(-12, -6, 20)[:, None]
    pose[0] = 0.0
    np.testing.assert_allclose(
        pose_to_matrix(pose), Rotation.from_rotvec(pose).as_matrix(), atol=1e-14
    )
    np.testing.assert_allclose(matrix_to_pose(pose_to_matrix(pose)), pose, atol=1e-14)


def test_matrix_to_pose_round_trip_and_scipy():
    R = Rotation.random(500, random_state=3).as_matrix()
    pose = matrix_to_pose(R)
    np.testing.assert_allclose(pose_to_matrix(pose), R, atol=1e-10)
    np.testing.assert_allclose(np.linalg.norm(pose, axis=-1) <= np.pi + 1e-12, True)
    np.testing.assert_allclose(pose, Rotation.from_matrix(R).as_rotvec(), atol=1e-8)


@pytest.mark.parametrize("eps", [0.0, 1e-9, 1e-6, 1e-4, 1e-2])
def test_angles_near_pi(eps):
    axes = RNG.normal(size=(50, 3))
    axes /= np.linalg.norm(axes, axis=1, keepdims=True)
    pose = axes * (np.pi - eps)
    R = pose_to_matrix(pose)
    back = matrix_to_pose(R)
    np.testing.assert_allclose(pose_to_matrix(back), R, atol=1e-9)
    np.testing.assert_allclose(np.linalg.norm(back, axis=1), np.pi - eps, atol=1e-7)
    if eps > 0:  # the axis sign is determined away from exactly pi
        np.testing.assert_allclose(back, pose, atol=1e-6)


def test_euler_matrix_is_scipy_intrinsic_zyz_transposed():
    """RELION's A(rot, tilt, psi) = R.T with R = scipy from_euler('ZYZ', [rot, tilt, psi])."""
    eul = np.stack(
        [RNG.uniform(-180, 180, 300), RNG.uniform(0, 180, 300), RNG.uniform(-180, 180, 300)],
        axis=1,
    )
    A = euler_to_matrix(eul[:, 0], eul[:, 1], eul[:, 2])
    R = Rotation.from_euler("ZYZ", eul, degrees=True).as_matrix()
    np.testing.assert_allclose(A, R.transpose(0, 2, 1), atol=1e-12)


def test_euler_matrix_known_values():
    # psi only: in-plane rotation as RELION prints it (relion_refine --print_symmetry_ops, C4)
    np.testing.assert_allclose(
        euler_to_matrix(0.0, 0.0, 90.0), [[0, 1, 0], [-1, 0, 0], [0, 0, 1]], atol=1e-12
    )
    # tilt 90: the viewing direction (third row of A) is along x
    np.testing.assert_allclose(euler_to_matrix(0.0, 90.0, 0.0)[2], [1, 0, 0], atol=1e-12)


def test_pose_euler_round_trips():
    pose = _random_poses()
    rot, tilt, psi = pose_to_euler(pose)
    assert np.all((tilt >= 0) & (tilt <= 180))
    np.testing.assert_allclose(
        pose_to_matrix(euler_to_pose(rot, tilt, psi)), pose_to_matrix(pose), atol=1e-10
    )
    # A = R.T
    np.testing.assert_allclose(
        euler_to_matrix(rot, tilt, psi), pose_to_matrix(pose).transpose(0, 2, 1), atol=1e-10
    )
    # Euler -> matrix -> Euler recovers generic angles exactly
    e = np.stack(
        [RNG.uniform(-179, 179, 200), RNG.uniform(1, 179, 200), RNG.uniform(-179, 179, 200)]
    )
    back = np.stack(matrix_to_euler(euler_to_matrix(*e)))
    np.testing.assert_allclose(back, e, atol=1e-9)


@pytest.mark.parametrize("tilt", [0.0, 180.0, 1e-9, 180.0 - 1e-9])
def test_gimbal_lock(tilt):
    rot = RNG.uniform(-180, 180, 20)
    psi = RNG.uniform(-180, 180, 20)
    A = euler_to_matrix(rot, np.full(20, tilt), psi)
    r2, t2, p2 = matrix_to_euler(A)
    assert np.all(np.isfinite(r2)) and np.all(np.isfinite(p2))
    np.testing.assert_allclose(t2, tilt, atol=1e-6)
    np.testing.assert_allclose(euler_to_matrix(r2, t2, p2), A, atol=1e-9)


def test_viewing_direction_and_angle_between():
    R = Rotation.random(100, random_state=5).as_matrix()
    # the viewing direction is the image of the z axis (the projection axis)
    np.testing.assert_allclose(viewing_direction(R), R @ np.array([0, 0, 1.0]), atol=1e-14)
    small = Rotation.from_rotvec(RNG.normal(size=(100, 3)) * 0.3)
    R2 = small.as_matrix() @ R
    np.testing.assert_allclose(angle_between(R2, R), small.magnitude(), atol=1e-7)
    assert np.all(angle_between(R, R) < 1e-6)


def test_float32_input_and_shapes():
    pose = _random_poses(10).astype(np.float32).reshape(2, 5, 3)
    R = pose_to_matrix(pose)
    assert R.shape == (2, 5, 3, 3)
    np.testing.assert_allclose(matrix_to_pose(R), pose, atol=1e-6)


def test_module_is_cupy_free():
    """The numpy path must not import cupy (CPU workers have none)."""
    import subprocess
    import sys

    code = (
        "import sys, numpy as np; import hetero_dask.core.rotations as r; "
        "r.pose_to_euler(np.zeros((2, 3))); print('cupy' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"

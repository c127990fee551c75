"""Rotations: CryoSPARC axis-angle poses, rotation matrices and RELION ZYZ Euler angles.

Conventions (README, Conventions; tested by round trips in tests/test_rotations.py):

* A CryoSPARC pose is an axis-angle vector in radians; ``R = pose_to_matrix(pose)``
  equals ``scipy.spatial.transform.Rotation.from_rotvec(pose).as_matrix()``.
* A 2D frequency ``k = (kx, ky)`` of a particle image samples the volume's
  Fourier transform at ``R @ (kx, ky, 0)``; equivalently the image is the
  projection along z of ``V(R r)``.
* RELION's Euler matrix ``A(rot, tilt, psi)`` (ZYZ, degrees) equals ``R.T``.
* The viewing direction (for orientation plots) is ``R[..., :, 2]``.

All functions are vectorised over leading axes and run on numpy or cupy.
"""

from __future__ import annotations

from .backend import xp_of


def _skew(v):
    xp = xp_of(v)
    z = xp.zeros_like(v[..., 0])
    return xp.stack(
        [
            xp.stack([z, -v[..., 2], v[..., 1]], axis=-1),
            xp.stack([v[..., 2], z, -v[..., 0]], axis=-1),
            xp.stack([-v[..., 1], v[..., 0], z], axis=-1),
        ],
        axis=-2,
    )


def pose_to_matrix(pose):
    """Axis-angle vectors ``(..., 3)`` (radians) -> rotation matrices ``(..., 3, 3)``."""
    xp = xp_of(pose)
    pose = xp.asarray(pose, dtype=xp.float64)
    theta = xp.linalg.norm(pose, axis=-1)[..., None, None]
    K = _skew(pose)
    small = theta < 1e-8
    safe = xp.where(small, 1.0, theta)
    # Rodrigues: R = I + sin(t)/t K + (1 - cos t)/t^2 K^2, with Taylor terms near 0.
    a = xp.where(small, 1.0 - theta**2 / 6.0, xp.sin(safe) / safe)
    b = xp.where(small, 0.5 - theta**2 / 24.0, (1.0 - xp.cos(safe)) / safe**2)
    eye = xp.eye(3, dtype=xp.float64)
    return eye + a * K + b * (K @ K)


def matrix_to_pose(R):
    """Rotation matrices ``(..., 3, 3)`` -> axis-angle vectors ``(..., 3)`` (radians, angle in [0, pi])."""
    xp = xp_of(R)
    R = xp.asarray(R, dtype=xp.float64)
    tr = R[..., 0, 0] + R[..., 1, 1] + R[..., 2, 2]
    cos_t = (tr - 1.0) / 2.0
    # v = 2 sin(theta) * axis, from the antisymmetric part.
    v = xp.stack(
        [R[..., 2, 1] - R[..., 1, 2], R[..., 0, 2] - R[..., 2, 0], R[..., 1, 0] - R[..., 0, 1]],
        axis=-1,
    )
    sin_t = 0.5 * xp.linalg.norm(v, axis=-1)
    theta = xp.arctan2(sin_t, cos_t)
    scale = xp.where(sin_t > 1e-12, theta / xp.where(sin_t > 1e-12, 2.0 * sin_t, 1.0), 0.5)
    out = v * scale[..., None]
    # Near theta = pi the antisymmetric part vanishes: take the axis from the symmetric
    # part S = (R + R^T)/2 - cos(theta) I = (1 - cos(theta)) a a^T.
    near_pi = (sin_t < 1e-3) & (cos_t < 0)
    if bool(xp.any(near_pi)):
        eye = xp.eye(3, dtype=xp.float64)
        S = 0.5 * (R + R.swapaxes(-1, -2)) - cos_t[..., None, None] * eye
        diag = xp.stack([S[..., 0, 0], S[..., 1, 1], S[..., 2, 2]], axis=-1)
        i = xp.argmax(diag, axis=-1)
        col = xp.take_along_axis(S, xp.broadcast_to(i[..., None, None], S.shape[:-1] + (1,)), axis=-1)[..., 0]
        axis = col / xp.linalg.norm(col, axis=-1, keepdims=True)
        sgn = xp.where(xp.sum(axis * v, axis=-1) < 0, -1.0, 1.0)
        out = xp.where(near_pi[..., None], axis * (theta * sgn)[..., None], out)
    return out


def euler_to_matrix(rot_deg, tilt_deg, psi_deg):
    """RELION ZYZ Euler angles (degrees) -> RELION matrix ``A`` ``(..., 3, 3)``.

    Same formula as RELION's ``Euler_angles2matrix``. The CryoSPARC matrix of
    the same orientation is ``A.T`` (see :func:`euler_to_pose`).
    """
    xp = xp_of(rot_deg, tilt_deg, psi_deg)
    a, b, g = (xp.deg2rad(xp.asarray(x, dtype=xp.float64)) for x in (rot_deg, tilt_deg, psi_deg))
    ca, sa, cb, sb, cg, sg = xp.cos(a), xp.sin(a), xp.cos(b), xp.sin(b), xp.cos(g), xp.sin(g)
    cc, cs, sc, ss = cb * ca, cb * sa, sb * ca, sb * sa
    rows = [
        [cg * cc - sg * sa, cg * cs + sg * ca, -cg * sb],
        [-sg * cc - cg * sa, -sg * cs + cg * ca, sg * sb],
        [sc, ss, cb],
    ]
    return xp.stack([xp.stack(r, axis=-1) for r in rows], axis=-2)


def matrix_to_euler(A):
    """RELION matrix ``A`` ``(..., 3, 3)`` -> (rot, tilt, psi) in degrees, tilt in [0, 180].

    At tilt 0 or 180 (gimbal lock) rot is set to 0 and psi carries the in-plane angle.
    """
    xp = xp_of(A)
    A = xp.asarray(A, dtype=xp.float64)
    sb = xp.sqrt(A[..., 0, 2] ** 2 + A[..., 1, 2] ** 2)
    tilt = xp.arctan2(sb, A[..., 2, 2])
    generic = sb > 16 * 1.1920929e-07
    rot = xp.where(generic, xp.arctan2(A[..., 2, 1], A[..., 2, 0]), 0.0)
    psi_generic = xp.arctan2(A[..., 1, 2], -A[..., 0, 2])
    psi_lock = xp.where(
        A[..., 2, 2] > 0, xp.arctan2(-A[..., 1, 0], A[..., 0, 0]), xp.arctan2(A[..., 1, 0], -A[..., 0, 0])
    )
    psi = xp.where(generic, psi_generic, psi_lock)
    return xp.rad2deg(rot), xp.rad2deg(tilt), xp.rad2deg(psi)


def euler_to_pose(rot_deg, tilt_deg, psi_deg):
    """RELION Euler angles (degrees) -> CryoSPARC axis-angle pose (radians)."""
    A = euler_to_matrix(rot_deg, tilt_deg, psi_deg)
    return matrix_to_pose(A.swapaxes(-1, -2))


def pose_to_euler(pose):
    """CryoSPARC axis-angle pose (radians) -> RELION (rot, tilt, psi) in degrees."""
    R = pose_to_matrix(pose)
    return matrix_to_euler(R.swapaxes(-1, -2))


def viewing_direction(R):
    """Unit viewing direction ``(..., 3)`` of rotation matrices ``(..., 3, 3)``: ``R[..., :, 2]``."""
    return R[..., :, 2]


def angle_between(R1, R2):
    """Geodesic angle (radians) between rotation matrices, vectorised."""
    xp = xp_of(R1, R2)
    tr = xp.einsum("...ij,...ij->...", R1, R2)
    return xp.arccos(xp.clip((tr - 1.0) / 2.0, -1.0, 1.0))

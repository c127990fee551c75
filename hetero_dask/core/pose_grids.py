"""SO(3) and shift grids for pose search: HEALPix directions x in-plane angles, nested.

Directions come from HEALPix in NESTED ordering (Gorski et al. 2005; the
pixel -> (theta, phi) formula of the reference C library ``pix2ang_nest``),
written here without healpy. At order ``o`` (nside = 2^o) there are
``12 * 4^o`` directions and ``6 * 2^o`` in-plane angles, so ``72 * 8^o``
rotations, about ``60 / 2^o`` degrees apart (RELION's sampling: order 2 is
4608 rotations at 15 degrees).

A grid rotation is identified by ``id = pixel * n_psi(o) + psi_index``. In
nested ordering the 4 sub-pixels of pixel ``p`` at order ``o + 1`` are
``4p .. 4p + 3``; in-plane angle ``j`` sits at ``(j + 1/2) * 360 / n_psi``.
A rotation's 8 children (:func:`children`) are its 4 sub-pixels, each with
the 2 finer in-plane angles nearest to the parent rotation.

Convention (README, Conventions): direction (theta, phi) and in-plane psi are RELION's
(tilt, rot) and psi, ``A = euler(rot=phi, tilt=theta, psi)`` and the
CryoSPARC matrix is ``R = A.T``, so the viewing direction ``R[:, 2]`` is
``(sin theta cos phi, sin theta sin phi, cos theta)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .rotations import euler_to_matrix

_JRLL = np.array([2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4], dtype=np.int64)
_JPLL = np.array([1, 3, 5, 7, 0, 2, 4, 6, 1, 3, 5, 7], dtype=np.int64)


def n_directions(order: int) -> int:
    """Number of HEALPix directions ``12 * 4^order``."""
    return 12 * 4**order


def n_psi(order: int) -> int:
    """Number of in-plane angles ``6 * 2^order``."""
    return 6 * 2**order


def n_rotations(order: int) -> int:
    """Number of SO(3) grid rotations ``72 * 8^order``."""
    return n_directions(order) * n_psi(order)


def angular_step_deg(order: int) -> float:
    """Nominal angular step of the grid (degrees): ``60 / 2^order``."""
    return 60.0 / 2**order


def _compress_bits(v):
    """Keep the even bits of ``v`` (int64), packed: the inverse of bit interleaving."""
    out = np.zeros_like(v)
    for b in range(31):
        out |= ((v >> (2 * b)) & 1) << b
    return out


def pix2ang_nest(order: int, pixels):
    """HEALPix NESTED pixel centres: ``pixels`` (P,) -> (theta, phi) radians, each (P,)."""
    nside = 2**order
    pix = np.asarray(pixels, dtype=np.int64)
    if pix.size and (pix.min() < 0 or pix.max() >= n_directions(order)):
        raise ValueError(f"HEALPix pixel out of range for order {order}")
    npface = nside * nside
    face = pix // npface
    ipf = pix % npface
    ix = _compress_bits(ipf)
    iy = _compress_bits(ipf >> 1)
    jr = _JRLL[face] * nside - (ix + iy) - 1
    jpt = ix - iy
    north = jr < nside
    south = jr > 3 * nside
    nr = np.where(north, jr, np.where(south, 4 * nside - jr, nside))
    z_cap = nr.astype(np.float64) ** 2 / (3.0 * npface)
    z = np.where(
        north, 1.0 - z_cap, np.where(south, z_cap - 1.0, (2 * nside - jr) * 2.0 / (3.0 * nside))
    )
    kshift = np.where(north | south, 0, (jr - nside) & 1)
    jp = (_JPLL[face] * nr + jpt + 1 + kshift) // 2
    jp = np.where(jp > 4 * nside, jp - 4 * nside, jp)
    jp = np.where(jp < 1, jp + 4 * nside, jp)
    phi = (jp - (kshift + 1) * 0.5) * (0.5 * np.pi / nr)
    return np.arccos(np.clip(z, -1.0, 1.0)), phi


@dataclass
class SO3Grid:
    """Rotations of a HEALPix x in-plane grid: ``matrices`` (R, 3, 3) float32, ``ids`` (R,) int64."""

    order: int
    matrices: np.ndarray
    ids: np.ndarray

    @property
    def step_deg(self) -> float:
        return angular_step_deg(self.order)


def matrices_for(order: int, ids) -> np.ndarray:
    """CryoSPARC rotation matrices ``(len(ids), 3, 3)`` float32 of grid ``ids`` at ``order``."""
    ids = np.asarray(ids, dtype=np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= n_rotations(order)):
        raise ValueError(
            f"rotation id out of range for order {order} (0..{n_rotations(order) - 1})"
        )
    npsi = n_psi(order)
    theta, phi = pix2ang_nest(order, ids // npsi)
    psi_deg = (ids % npsi + 0.5) * (360.0 / npsi)
    A = euler_to_matrix(np.rad2deg(phi), np.rad2deg(theta), psi_deg)
    return np.ascontiguousarray(A.swapaxes(-1, -2), dtype=np.float32)


def so3_grid(order: int) -> SO3Grid:
    """The full SO(3) grid of ``order`` (``72 * 8^order`` rotations), ids in increasing order."""
    if order < 0:
        raise ValueError(f"grid order must be >= 0, got {order}")
    ids = np.arange(n_rotations(order), dtype=np.int64)
    return SO3Grid(order=order, matrices=matrices_for(order, ids), ids=ids)


def children(order: int, ids) -> np.ndarray:
    """The 8 children (order + 1) of grid ids at ``order``: ``(..., 8)`` int64.

    The 4 nested sub-pixels of the direction, each with the 2 finer in-plane
    angles that straddle the in-plane angle best aligned with the parent
    rotation. Aligning (rather than reusing the parent's psi index) matters
    near the poles, where sub-pixels differ from their parent in phi by up to
    45 degrees and phi and psi rotate about nearly the same axis.
    """
    ids = np.asarray(ids, dtype=np.int64)
    shape = ids.shape
    ids = ids.reshape(-1)
    npsi_f = n_psi(order + 1)
    Rp = matrices_for(order, ids).astype(np.float64)
    child_pix = (4 * (ids // n_psi(order))[:, None] + np.arange(4)).reshape(-1)
    theta, phi = pix2ang_nest(order + 1, child_pix)
    Rc0 = euler_to_matrix(np.rad2deg(phi), np.rad2deg(theta), np.zeros_like(phi)).swapaxes(-1, -2)
    # R(psi) = R(psi=0) @ G(psi), G = [[c, -s, 0], [s, c, 0], [0, 0, 1]]: maximise trace(Rp^T R(psi)).
    Q = np.einsum("pji,pcjk->pcik", Rp, Rc0.reshape(len(ids), 4, 3, 3))
    psi = np.arctan2(Q[..., 0, 1] - Q[..., 1, 0], Q[..., 0, 0] + Q[..., 1, 1]) % (2 * np.pi)
    j_lo = np.floor(psi / (2 * np.pi / npsi_f) - 0.5).astype(np.int64) % npsi_f
    j = np.stack([j_lo, (j_lo + 1) % npsi_f], axis=-1)
    out = child_pix.reshape(len(ids), 4, 1) * npsi_f + j
    return out.reshape(shape + (8,))


def shift_grid(range_px: float, step_px: float, shape: str = "disc") -> np.ndarray:
    """In-plane shifts ``(T, 2)`` float32 (x, y) in pixels on a square lattice of ``step_px``.

    RELION's ``--offset_range R --offset_step S`` semantics: lattice points
    ``S * (i, j)`` with ``|S * (i, j)| <= R`` (``shape="disc"``; range 5, step 2
    gives RELION's 21 shifts) or ``max(|i|, |j|) * S <= R`` (``"square"``).
    The zero shift is first. ``range_px = 0`` gives the single zero shift.
    """
    if step_px <= 0:
        raise ValueError(f"shift step must be > 0 pixels, got {step_px}")
    m = int(np.floor(range_px / step_px + 1e-6))
    i = np.arange(-m, m + 1)
    jy, ix = np.meshgrid(i, i, indexing="ij")
    pts = np.stack([ix.ravel(), jy.ravel()], axis=-1) * float(step_px)
    if shape == "disc":
        keep = np.sum(pts**2, axis=-1) <= range_px**2 * (1 + 1e-6)
    elif shape == "square":
        keep = np.ones(len(pts), dtype=bool)
    else:
        raise ValueError(f"shift grid shape must be 'disc' or 'square', got {shape!r}")
    pts = pts[keep]
    order = np.argsort(np.sum(pts**2, axis=-1), kind="stable")
    return pts[order].astype(np.float32)

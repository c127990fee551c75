"""Built-in test volumes: sums of 3D Gaussian blobs.

* :func:`moving_domain_phantoms` — ``K`` classes that share an asymmetric
  body and differ by the position of one domain swinging about a hinge
  (what heterogeneous refinement should separate).
* :func:`symmetric_phantom` — an asymmetric motif replicated by a point group
  (``C<n>``, ``D<n>``, ... via :func:`hetero_dask.core.symmetry.symmetry_group`),
  for symmetry tests.

Geometry is defined in units of the particle radius, so the phantoms look
the same at every box; ``diameter_A`` (default 60% of the box) sets the
physical size and with it how many pixels the particle spans.
Volumes are ``(box, box, box)`` float32 indexed [z, y, x], centred at
``box // 2``; blob centres are written (x, y, z).
"""

from __future__ import annotations

import numpy as np

from .core.symmetry import symmetry_group

# Asymmetric body: blob centres (x, y, z) in particle radii, relative widths and heights.
_BODY = np.array(
    [
        [0.00, 0.00, 0.00],
        [0.30, 0.05, -0.10],
        [-0.25, 0.20, 0.05],
        [0.05, -0.35, 0.10],
        [-0.15, -0.15, -0.30],
        [0.20, 0.30, 0.25],
        [-0.35, -0.05, 0.30],
    ]
)
_BODY_SIGMA = np.array([0.28, 0.22, 0.22, 0.20, 0.18, 0.16, 0.15])
_BODY_AMP = np.array([1.0, 0.9, 0.8, 0.9, 0.7, 0.8, 0.6])

# Domain: two blobs on an arm from the hinge; the arm swings about z by the class angle.
_HINGE = np.array([0.45, 0.0, 0.0])
_DOMAIN = np.array([[0.25, 0.0, 0.05], [0.42, 0.0, -0.05]])  # relative to the hinge, angle 0
_DOMAIN_SIGMA = np.array([0.15, 0.13])
_DOMAIN_AMP = np.array([1.0, 0.9])

# Symmetric motif (replicated by the group): off-axis, no symmetry of its own.
_MOTIF = np.array([[0.35, 0.10, 0.15], [0.50, 0.25, 0.05], [0.30, -0.15, 0.35]])
_MOTIF_SIGMA = np.array([0.16, 0.12, 0.11])
_MOTIF_AMP = np.array([1.0, 0.8, 0.7])


def _render(box: int, psize_A: float, centres_A, sigmas_A, amps) -> np.ndarray:
    """Sum of isotropic Gaussians ``amp * exp(-|r - c|^2 / 2 sigma^2)``, float32 ``(box, box, box)``."""
    ax = (np.arange(box) - box // 2) * float(psize_A)
    vol = np.zeros((box, box, box), dtype=np.float32)
    for c, s, a in zip(centres_A, sigmas_A, amps, strict=True):
        gz = np.exp(-((ax - c[2]) ** 2) / (2 * s**2)).astype(np.float32)
        gy = np.exp(-((ax - c[1]) ** 2) / (2 * s**2)).astype(np.float32)
        gx = np.exp(-((ax - c[0]) ** 2) / (2 * s**2)).astype(np.float32)
        vol += np.float32(a) * gz[:, None, None] * gy[None, :, None] * gx[None, None, :]
    return vol


def _radius_A(box: int, psize_A: float, diameter_A: float | None) -> float:
    d = 0.6 * box * psize_A if diameter_A is None else float(diameter_A)
    if d <= 0 or d > box * psize_A:
        raise ValueError(f"diameter_A must be in (0, box * psize_A = {box * psize_A:g}], got {d:g}")
    return d / 2


def moving_domain_phantoms(
    box: int,
    psize_A: float,
    n_classes: int = 3,
    swing_deg: float = 90.0,
    diameter_A: float | None = None,
    domain_weight: float = 1.0,
) -> np.ndarray:
    """``n_classes`` volumes ``(K, box, box, box)`` float32 differing by a swinging domain.

    Class ``k`` has the domain arm rotated about z (through the hinge) by
    ``k * swing_deg / (K - 1)`` degrees; the body is the same in every class.
    ``domain_weight`` scales the domain's density (1: as heavy as two body blobs):
    how much of the signal tells the classes apart.
    """
    if n_classes < 1:
        raise ValueError(f"n_classes must be >= 1, got {n_classes}")
    r_A = _radius_A(box, psize_A, diameter_A)
    body = _render(box, psize_A, _BODY * r_A, _BODY_SIGMA * r_A, _BODY_AMP)
    vols = np.empty((n_classes, box, box, box), dtype=np.float32)
    for k in range(n_classes):
        t = np.deg2rad(swing_deg * k / max(n_classes - 1, 1))
        rz = np.array([[np.cos(t), -np.sin(t), 0.0], [np.sin(t), np.cos(t), 0.0], [0.0, 0.0, 1.0]])
        centres = (_HINGE + _DOMAIN @ rz.T) * r_A
        vols[k] = body + _render(box, psize_A, centres, _DOMAIN_SIGMA * r_A, domain_weight * _DOMAIN_AMP)
    return vols


def symmetric_phantom(
    box: int,
    psize_A: float,
    symmetry: str = "C4",
    convention: str = "cryosparc",
    diameter_A: float | None = None,
) -> np.ndarray:
    """A ``(box, box, box)`` float32 volume with exactly the point-group symmetry ``symmetry``.

    The motif is placed at ``g @ c`` for every group element ``g`` (matrices
    acting on (x, y, z), from :func:`~hetero_dask.core.symmetry.symmetry_group`
    with ``convention``), so ``V(g^T r) = V(r)`` for all ``g``.
    """
    r_A = _radius_A(box, psize_A, diameter_A)
    ops = symmetry_group(symmetry, convention)
    centres = np.concatenate([_MOTIF @ g.T for g in ops]) * r_A
    sig = np.tile(_MOTIF_SIGMA, len(ops)) * r_A
    amp = np.tile(_MOTIF_AMP, len(ops))
    return _render(box, psize_A, centres, sig, amp)

"""Soft real-space masks: spherical window, circular image mask, masks from a map.

All masks are float32 in [0, 1] with raised-cosine edges (1 inside, 0
outside). Real-space coordinates are centred at index ``n // 2`` (the
convention of :mod:`hetero_dask.core.fourier`). The loose and tight masks
follow CryoSPARC's FSC masks: threshold the map at half its maximum, then 1
within a distance of the thresholded region and a cosine fall to 0 over a
second distance (loose 25 A -> 40 A, tight 6 A -> 12 A). Two departures, both
for noisy maps at coarse pixels: the map is first low-pass filtered to its
resolution (the average of two raw half-maps has noise peaks above half its
maximum, which scatter the mask over the box), and the cosine fall is at least
``MIN_EDGE_PX`` pixels wide (at 4 A/px CryoSPARC's tight fall is 1.5 px: such a
steep edge puts the mask's own spectrum into every shell, and the tight FSC of
a 20 A map stays near 1 to Nyquist).
"""

from __future__ import annotations

import numpy as np

from .backend import xp_of
from .fourier import freq_1d, lowpass, soft_edge

LOOSE_MASK_A = (25.0, 40.0)
TIGHT_MASK_A = (6.0, 12.0)
MIN_EDGE_PX = 3.0


def _radius_real(n: int, ndim: int, xp):
    """Distance (pixels) from the centre ``n // 2`` of an ``(n,) * ndim`` grid."""
    c = freq_1d(n, xp).astype(xp.float32)
    grids = xp.meshgrid(*([c] * ndim), indexing="ij")
    return xp.sqrt(sum(g**2 for g in grids))


def spherical_window(n: int, inner_frac: float = 0.85, outer_frac: float = 0.99, xp=np):
    """Soft sphere ``(n, n, n)``: 1 within ``inner_frac * n/2``, cosine to 0 at ``outer_frac * n/2``.

    CryoSPARC's "window inner/outer radius" are these fractions of the box
    half-width (defaults 0.85 and 0.99).
    """
    if not 0 <= inner_frac <= outer_frac:
        raise ValueError(f"need 0 <= inner_frac <= outer_frac, got {inner_frac}, {outer_frac}")
    r_in = inner_frac * n / 2
    return soft_edge(_radius_real(n, 3, xp), r_in, outer_frac * n / 2 - r_in)


def soft_circular_mask_2d(n: int, radius_px: float, width_px: float, xp=np):
    """Soft disc ``(n, n)``: 1 within ``radius_px``, cosine to 0 at ``radius_px + width_px``."""
    return soft_edge(_radius_real(n, 2, xp), radius_px, width_px)


def _distance_transform(outside):
    """Euclidean distance (pixels) of each voxel to the nearest ``False`` voxel of ``outside``."""
    xp = xp_of(outside)
    if xp is np:
        from scipy.ndimage import distance_transform_edt  # noqa: PLC0415
    else:
        from cupyx.scipy.ndimage import distance_transform_edt  # noqa: PLC0415
    return distance_transform_edt(outside)


def _distance_to_region(vol, threshold: float):
    xp = xp_of(vol)
    inside = vol > threshold
    if not bool(xp.any(inside)):
        raise ValueError(
            f"no voxel above the mask threshold {threshold} (map max {float(vol.max())})"
        )
    return _distance_transform(~inside)


def mask_from_map(vol, threshold: float, dilate_px: float = 0.0, soft_px: float = 0.0):
    """Soft mask ``(n, n, n)`` float32 from a map: binarise at ``threshold``, dilate, cosine edge.

    Voxels within ``dilate_px`` of the region ``vol > threshold`` get 1;
    beyond, the mask falls to 0 with a raised cosine over ``soft_px``.
    """
    return soft_edge(_distance_to_region(vol, threshold), float(dilate_px), float(soft_px))


def auto_threshold(vol, fraction: float = 0.5) -> float:
    """CryoSPARC's FSC-mask threshold: ``fraction`` of the map's maximum."""
    return fraction * float(vol.max())


def loose_and_tight_masks(vol, psize_A: float, resolution_A: float | None = None):
    """CryoSPARC's loose and tight FSC masks ``(n, n, n)`` float32 of a map (see the module doc).

    ``resolution_A``: the map is low-pass filtered to it before the threshold
    (half the maximum); None uses the map as it is. Loose: 1 within 25 A of the
    thresholded region, 0 beyond 40 A; tight: 6 A and 12 A; cosine falls at
    least ``MIN_EDGE_PX`` wide.
    """
    if resolution_A is not None and resolution_A > 2 * psize_A:
        vol = lowpass(vol, resolution_A, psize_A, ndim=3)
    dist = _distance_to_region(vol, auto_threshold(vol))
    return tuple(
        soft_edge(dist, near_A / psize_A, max((far_A - near_A) / psize_A, MIN_EDGE_PX))
        for near_A, far_A in (LOOSE_MASK_A, TIGHT_MASK_A)
    )

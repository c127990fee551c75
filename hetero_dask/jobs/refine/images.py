"""Particle images as the refinement scores and backprojects them.

Every step that compares images with maps (E-step, backprojection, the first noise
estimate, the grey scales, the split of identical references) reads them here, so
they all see the same normalised, masked images.
"""

from __future__ import annotations

from hetero_dask.core.scoring import circular_mask, mask_temperature, normalise_background


def image_mask_radius_px(mask_diameter_A: float | None, box: int, psize_A: float) -> float:
    """Radius of the images' soft circular mask: half ``mask_diameter_A``, at most 2 px inside
    the box; without one, 85% of the half box."""
    return 0.85 * box / 2 if mask_diameter_A is None else min(0.5 * mask_diameter_A / psize_A, box / 2 - 2)


def likelihood_temperature(box: int, mask_radius_px: float) -> float:
    """The temperature of the likelihood of images under the soft circular mask
    (:func:`hetero_dask.core.scoring.mask_temperature`): the E-step's images are masked
    twice (:func:`normalised_images`, then ``prepare_particles``)."""
    return mask_temperature(circular_mask(box, mask_radius_px, 4.0) ** 2)


def normalised_images(store, box: int, start: int, stop: int, mask_radius_px: float, xp):
    """Images ``(stop - start, box, box)``, background-normalised (as ``prepare_particles``
    does) and softly masked.

    The E-step and the backprojection both use these, so maps come out in the units
    the log-likelihood compares them in.
    """
    x = normalise_background(xp.asarray(store.images_at_box(box, start, stop)), mask_radius_px)
    return x * circular_mask(box, mask_radius_px, 4.0, xp)

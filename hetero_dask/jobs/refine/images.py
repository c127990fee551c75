"""Particle images as the refinement scores and backprojects them.

Every step that compares images with maps (E-step, backprojection, the first noise
estimate, the grey scales, the split of identical references) reads them here, so
they all see the same normalised, masked images.
"""

from __future__ import annotations

from hetero_dask.core.scoring import circular_mask, normalise_background
from hetero_dask.runtime.engine import worker_cached


def open_store(path: str):
    """The particle store at ``path``, opened once per worker (and again when it changes)."""
    from hetero_dask.io.store import ParticleStore, store_version

    return worker_cached(("store", path, store_version(path)), lambda: ParticleStore.open(path),
                         max_entries=8)


def normalised_images(store, box: int, start: int, stop: int, mask_radius_px: float, xp):
    """Images ``(stop - start, box, box)``, background-normalised (as ``prepare_particles``
    does) and softly masked.

    The E-step and the backprojection both use these, so maps come out in the units
    the log-likelihood compares them in.
    """
    x = normalise_background(xp.asarray(store.images_at_box(box, start, stop)), mask_radius_px)
    return x * circular_mask(box, mask_radius_px, 4.0, xp)

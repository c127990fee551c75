"""What every job does first: open the particle store, and draw the half-set split.

A job accepts a particle store (``*.zarr`` made by ``hetero-dask import``) or
a ``.cs``/``.star`` file. For a file, the job's ``OUT/particles.zarr`` is a
view of the particle cache's store of the same images, imported once for
every job (:mod:`hetero_dask.io.cache`; with the cache off, the images are
imported there); a complete store already there that was made from the same
table, images and seed is reused as it is (a re-run of a job does not copy
the images again).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from hetero_dask.io.store import ParticleStore, is_store

SPLIT_FIELDS = ("alignments3D/split", "alignments3D_multi/split")


def open_particle_store(
    particles, out_dir, client=None, stack_dir=None, seed: int = 0, progress: bool = True,
    cache_dir=None, image_dtype: str = "float32",
) -> ParticleStore:
    """The job's :class:`ParticleStore` for ``particles`` (a store path, or a ``.cs``/``.star`` file).

    A file gets ``out_dir/particles.zarr`` (see the module doc; ``cache_dir``:
    the particle cache's folder, ``"off"``, or None for ``$HETERO_DASK_CACHE``
    or the default; ``image_dtype``: float32 or float16 images); imports run on
    ``client``'s workers when given.
    """
    if is_store(particles):
        return ParticleStore.open(particles)
    from hetero_dask.io.cache import job_store
    from hetero_dask.io.particles import load_particles

    path = Path(particles)
    if not path.is_file():
        raise FileNotFoundError(
            f"particles {path} not found (expected a .cs, .star or .zarr store)"
        )
    pset = load_particles(path, stack_dir=stack_dir)
    return job_store(pset, out_dir, client=client, seed=seed, progress=progress,
                     cache_dir=cache_dir, image_dtype=image_dtype)


def particle_split(store: ParticleStore, seed: int = 0) -> np.ndarray:
    """Half-set (0/1) of every particle ``(N,)`` int64, in store order.

    From ``alignments3D/split`` (or ``alignments3D_multi/split``) when the
    input has one with both half-sets present; else random, balanced and
    reproducible: it depends only on ``seed`` and the input order, not on
    the store's permutation or on how the work is partitioned.
    """
    for name in SPLIT_FIELDS:
        if store.has_field(name):
            split = np.asarray(store.column(name), dtype=np.int64).reshape(store.n)
            if np.isin(split, (0, 1)).all() and np.unique(split).size == 2:
                return split
    by_input = np.random.default_rng([int(seed), 2]).permutation(store.n) % 2
    return by_input[store.original_index].astype(np.int64)

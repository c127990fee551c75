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

from hetero_dask.io.errors import InputError
from hetero_dask.io.store import ParticleStore, is_store, store_version
from hetero_dask.runtime.engine import row_hash, worker_cached

SPLIT_FIELDS = ("alignments3D/split", "alignments3D_multi/split")


def worker_store(path: str) -> ParticleStore:
    """The particle store at ``path`` as a task sees it: opened once per worker, and again when
    the store changes (its version is part of the key)."""
    return worker_cached(("store", path, store_version(path)), lambda: ParticleStore.open(path),
                         max_entries=8)


def open_particle_store(
    particles,
    out_dir,
    client=None,
    stack_dir=None,
    seed: int = 0,
    progress: bool = True,
    flip_contrast: bool = False,
    contrast_check: bool = False,
    particle_set=None,
    cache_dir=None,
    image_dtype: str = "float32",
) -> ParticleStore:
    """The job's :class:`ParticleStore` for ``particles`` (a store path, or a ``.cs``/``.star`` file).

    A file gets ``out_dir/particles.zarr`` (see the module doc; ``cache_dir``:
    the particle cache's folder, ``"off"``, or None for ``$HETERO_DASK_CACHE``
    or the default; ``image_dtype``: float32 or float16 images); imports run on
    ``client``'s workers when given. ``flip_contrast`` negates ``blob/sign``
    before the import; ``contrast_check`` refuses inverted particles first
    (:func:`hetero_dask.jobs.contrast.check_contrast`). ``particle_set``: the
    file already loaded (by the job's checks, with ``flip_contrast``
    applied), so it is not read again.
    """
    from hetero_dask.jobs.contrast import FLIP_OPTION, check_contrast

    if is_store(particles):
        if flip_contrast:
            raise InputError(
                particles,
                f"{FLIP_OPTION} cannot flip a particle store (its images were stored with "
                "blob/sign applied)",
                expected="the .cs/.star file, or a store made by hetero-dask import --flip-contrast",
            )
        store = ParticleStore.open(particles)
        if contrast_check:
            check_contrast(store, particles)
        return store
    from hetero_dask.io.cache import job_store
    from hetero_dask.io.particles import load_particles

    path = Path(particles)
    if not path.is_file():
        raise FileNotFoundError(
            f"particles {path} not found (expected a .cs, .star or .zarr store)"
        )
    if particle_set is not None:
        pset = particle_set
    else:
        pset = load_particles(path, stack_dir=stack_dir, flip_contrast=flip_contrast)
    if contrast_check:
        check_contrast(pset, path, seed)
    return job_store(pset, out_dir, client=client, seed=seed, progress=progress,
                     cache_dir=cache_dir, image_dtype=image_dtype)


def split_field(store: ParticleStore) -> str | None:
    """The input field holding usable half-sets (values 0/1, both present), or None.

    Read once by the driver: whether the input's halves are usable is a property of the
    whole column, so tasks get the answer and read only their rows (:func:`split_rows`).
    """
    for name in SPLIT_FIELDS:
        if store.has_field(name):
            split = np.asarray(store.column(name)).reshape(store.n)
            if np.isin(split, (0, 1)).all() and np.unique(split).size == 2:
                return name
    return None


def split_rows(store: ParticleStore, start: int, stop: int, field: str | None, seed: int) -> np.ndarray:
    """Half-set (0/1) ``(stop - start,)`` int64 of store rows ``[start, stop)``: the input's
    ``field`` (see :func:`split_field`), or random halves (:func:`random_halves`) when None."""
    if field is not None:
        return np.asarray(store.column(field, start, stop), dtype=np.int64).reshape(-1)
    return random_halves(store.input_rows(start, stop), seed)


def random_halves(input_rows: np.ndarray, seed: int) -> np.ndarray:
    """Random, balanced, reproducible half-sets of particles by their input row.

    Input rows ``2j`` and ``2j + 1`` fall in opposite halves, which one decided by
    :func:`~hetero_dask.runtime.engine.row_hash` of ``j``: the halves differ by at most one
    particle, and a particle's half depends only on ``seed`` and its input row, so any row
    range is computed alone (no ``(N,)`` permutation on a worker: 80 MB per worker at 10^7
    particles) and the answer depends neither on the store's permutation nor on how the work
    is partitioned.
    """
    rows = np.asarray(input_rows, dtype=np.uint64)
    flip = row_hash(rows >> np.uint64(1), int(seed), 2)
    return ((rows ^ flip) & np.uint64(1)).astype(np.int64)


def particle_split(store: ParticleStore, seed: int = 0) -> np.ndarray:
    """Half-set (0/1) of every particle ``(N,)`` int64, in store order: the input's
    ``alignments3D/split`` (or ``alignments3D_multi/split``) when it has both half-sets,
    else :func:`random_halves`."""
    return split_rows(store, 0, store.n, split_field(store), seed)


def output_table(store: ParticleStore, stack_dir=None) -> np.ndarray:
    """The particles' metadata in input order, each stack named by its absolute path where found.

    Output particle files are written from it, so the next job reads them from any
    folder with no ``--stack-dir`` (:func:`hetero_dask.io.particles.locate_stacks`).
    """
    from hetero_dask.io.particles import locate_stacks

    source = store.source_files[0] if store.source_files else None
    return locate_stacks(store.to_input_order(store.table()), source=source, stack_dir=stack_dir)

"""What regroup reads, checked before a cluster starts or a byte is written."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .classes import class_assignments, select_classes
from .params import RegroupParams


@dataclass
class Inputs:
    """The particles, the class volumes and the classes to cluster.

    table: the particle table; source: its name in messages and the report;
    is_star: the particles came from a STAR file (the outputs are STAR too);
    vols: (K, N, N, N) float32 class volumes of voxel size psize_A;
    mask_vol: (N, N, N) or None, read from ``mask`` (a path, kept to be copied);
    labels: (N_particles,) class of each particle; layout: its per-class layout
    (None: only ``alignments3D/class``); sizes: (K,) particles per class;
    included: the classes clustered; described: the inputs, for the report.
    """

    table: np.ndarray
    source: str
    is_star: bool
    vols: np.ndarray
    psize_A: float
    mask: object
    mask_vol: np.ndarray | None
    labels: np.ndarray
    layout: str | None
    sizes: np.ndarray
    included: np.ndarray
    described: dict


def load_inputs(particles, volumes, mask, volumes_psize_A, params: RegroupParams) -> Inputs:
    """Read and check everything regroup needs (see :func:`hetero_dask.jobs.regroup.regroup`)."""
    from hetero_dask.jobs.preflight import for_option

    table, source, is_star = _read_particles(particles)
    vols, psize_A = _read_volumes(volumes, volumes_psize_A)
    mask_vol = None if mask is None else _read_mask(mask, vols, psize_A)
    try:
        labels, layout = class_assignments(table, len(vols), source)
    except ValueError as exc:
        raise for_option("--particles", exc) from None
    sizes = np.bincount(labels, minlength=len(vols))
    described = {"particles": source, "volumes": _describe(volumes), "mask": _describe(mask)}
    return Inputs(
        table,
        source,
        is_star,
        vols,
        psize_A,
        mask,
        mask_vol,
        labels,
        layout,
        sizes,
        included=select_classes(sizes, params),
        described=described,
    )


def _read_particles(particles) -> tuple[np.ndarray, str, bool]:
    """(table, source name, STAR input?) of a .cs or .star path, or of a structured array."""
    from hetero_dask.io.errors import InputError
    from hetero_dask.io.paths import check_allowed
    from hetero_dask.jobs.preflight import for_option

    if isinstance(particles, np.ndarray):
        return particles, "particles", False
    source = str(particles)
    is_star = source.lower().endswith(".star")
    try:
        check_allowed(Path(source), "--particles")
        if is_star:
            from hetero_dask.io.convert import star_to_cs
            from hetero_dask.io.star import read_star

            return star_to_cs(read_star(particles), source), source, True
        from hetero_dask.io.cs import read_cs

        return read_cs(particles), source, False
    except (InputError, ValueError, OSError) as exc:
        raise for_option("--particles", exc) from None


def _read_volumes(volumes, psize_A: float | None) -> tuple[np.ndarray, float]:
    """(K, N, N, N) float32 and the voxel size; maps of different boxes or voxel sizes are refused."""
    from hetero_dask.jobs.preflight import check_volumes

    if not isinstance(volumes, np.ndarray):
        vols, psize, _ = check_volumes(volumes, psize_A=psize_A)
        return vols, psize
    if psize_A is None:
        raise ValueError("regroup: volumes given as an array need volumes_psize_A (--psize)")
    return np.asarray(volumes, np.float32), float(psize_A)


def _read_mask(mask, vols, psize_A: float) -> np.ndarray:
    """The mask at ``mask`` (a path), which must have the volumes' box and voxel size."""
    from hetero_dask.io.errors import InputError
    from hetero_dask.io.mrc import read_map
    from hetero_dask.io.paths import check_allowed
    from hetero_dask.jobs.preflight import for_option

    try:
        check_allowed(Path(mask), "--mask")
        mask_vol, mask_psize = read_map(mask, psize_A)
    except (InputError, ValueError, OSError) as exc:
        raise for_option("--mask", exc) from None
    if mask_vol.shape != vols.shape[1:] or abs(mask_psize - psize_A) > 1e-3 * psize_A:
        raise InputError(
            "--mask",
            f"{mask} is {mask_vol.shape[0]}^3 at {mask_psize} A but the volumes "
            f"are {vols.shape[-1]}^3 at {psize_A} A",
            expected="a mask of the volumes' box and voxel size",
        )
    return mask_vol


def _describe(spec):
    """An input as the report names it: a path, a list of paths, an array's shape, or None."""
    if spec is None or isinstance(spec, np.ndarray):
        return None if spec is None else f"array {spec.shape}"
    if isinstance(spec, str | Path):
        return str(spec)
    return [str(s) for s in spec]

"""Volume groups: K class maps in and out.

A group is given as a list of MRC files, a folder of ``*.mrc`` files (sorted
by name), or a ``.zip`` "series" of MRC files (CryoSPARC's volume series
export). All members must share box and voxel size.
"""

from __future__ import annotations

import tempfile
import zipfile
from pathlib import Path

import numpy as np

from .errors import InputError, atomic_output
from .mrc import read_map, write_map

_MAP_SUFFIXES = (".mrc", ".map", ".mrcs")


def _member_files(spec) -> list:
    if isinstance(spec, (str, Path)):
        p = Path(spec)
        if p.is_dir():
            files = sorted(f for f in p.iterdir() if f.suffix.lower() in _MAP_SUFFIXES)
            if not files:
                raise InputError(p, "folder holds no .mrc/.map files", expected="K class maps")
            return files
        return [p]
    return [Path(f) for f in spec]


def _read_zip(path: Path, psize_A):
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as err:
        raise InputError(path, f"not a readable zip ({err})") from None
    with zf, tempfile.TemporaryDirectory() as tmp:
        members = sorted(m for m in zf.namelist() if Path(m).suffix.lower() in _MAP_SUFFIXES)
        if not members:
            raise InputError(path, "zip holds no .mrc/.map files", expected="a volume series")
        vols, psizes, names = [], [], []
        for m in members:
            # Extract by content (not by the member's path) so names like ../x cannot escape tmp.
            local = Path(tmp) / f"member{len(vols)}.mrc"
            local.write_bytes(zf.read(m))
            try:
                v, p = read_map(local, psize_A)
            except InputError as err:
                raise InputError(f"{path}[{m}]", str(err).split(": ", 1)[-1]) from None
            vols.append(v)
            psizes.append(p)
            names.append(Path(m).stem)
    return vols, psizes, names


def read_volume_group(spec, psize_A: float | None = None):
    """Read K maps: ``spec`` = list of files, a folder, or a ``.zip`` series.

    Returns ``(vols float32 (K, n, n, n), psize_A, names)``. Different boxes or
    voxel sizes (beyond 0.1%) raise :class:`InputError`.
    """
    if isinstance(spec, (str, Path)) and Path(spec).suffix.lower() == ".zip":
        vols, psizes, names = _read_zip(Path(spec), psize_A)
        where = [f"{spec}[{n}]" for n in names]
    else:
        files = _member_files(spec)
        if not files:
            raise InputError("volumes", "no volumes given", expected="at least one map")
        vols, psizes = zip(*(read_map(f, psize_A) for f in files), strict=True)
        names = [f.stem for f in files]
        where = [str(f) for f in files]
    for v, p, w in zip(vols, psizes, where, strict=True):
        if v.shape != vols[0].shape:
            raise InputError(
                w, f"box {v.shape[0]}", expected=f"the box of {where[0]}: {vols[0].shape[0]}"
            )
        if abs(p - psizes[0]) > 1e-3 * psizes[0]:
            raise InputError(
                w,
                f"voxel size {p:.5g} A",
                expected=f"the voxel size of {where[0]}: {psizes[0]:.5g} A",
            )
    return np.stack(vols).astype(np.float32, copy=False), float(psizes[0]), list(names)


def write_volume_series_zip(path, vols, psize_A: float, names=None) -> None:
    """Write K maps ``(K, n, n, n)`` as a zip of ``<name>.mrc`` files, atomically."""
    vols = np.asarray(vols, dtype=np.float32)
    if vols.ndim != 4:
        raise ValueError(f"write_volume_series_zip: expected (K, n, n, n), got {vols.shape}")
    names = [f"class_{k:03d}" for k in range(len(vols))] if names is None else list(names)
    if len(names) != len(vols) or len(set(names)) != len(names):
        raise ValueError("write_volume_series_zip: need one distinct name per volume")
    with atomic_output(path) as tmp, tempfile.TemporaryDirectory() as work:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:
            for v, name in zip(vols, names, strict=True):
                f = Path(work) / f"{name}.mrc"
                write_map(f, v, psize_A)
                zf.write(f, arcname=f"{name}.mrc")

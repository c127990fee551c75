"""MRC maps and MRCS particle stacks via ``mrcfile``.

Maps are returned as float32 arrays indexed ``[z, y, x]`` with their voxel
size in Angstrom. Headers are opened permissively (real files often lack the
``MAP`` id or a machine stamp); problems that change the meaning of the data
(voxel size 0, non-cubic boxes or voxels, crystallographic space groups) are
refused with an :class:`~hetero_dask.io.errors.InputError` naming the file.
Writes are atomic: a temporary file in the same folder, then a rename.
"""

from __future__ import annotations

import os
import warnings

import mrcfile
import mrcfile.utils
import numpy as np

from .errors import InputError, atomic_output

# ispg 0: image stack; 1: single volume (P1); 401: stack of volumes.
_SINGLE_PARTICLE_SPACE_GROUPS = (0, 1, 401)


def _open(path, *, mmap: bool):
    opener = mrcfile.mmap if mmap else mrcfile.open
    try:
        with warnings.catch_warnings():
            # Permissive mode warns about header quirks we tolerate (no MAP id, machine stamp).
            warnings.simplefilter("ignore", RuntimeWarning)
            return opener(path, mode="r", permissive=True)
    except FileNotFoundError:
        raise InputError(path, "file not found") from None
    except (ValueError, OSError) as err:
        raise InputError(path, f"not a readable MRC file ({err})") from None


def _check_data(path, mrc):
    if mrc.data is None:
        raise InputError(path, "MRC header is unreadable or the file is truncated (no data block)")


def _header_psize_A(mrc) -> float:
    """Header voxel size along x to 6 significant digits (cella/mx in float32: 4.4, not 4.4000001)."""
    return float(f"{float(mrc.voxel_size.x):.6g}")


def _voxel_size_A(path, header_psize: float, psize_A: float | None) -> float:
    if psize_A is not None:
        if psize_A <= 0:
            raise InputError(path, f"psize_A={psize_A} given", expected="a positive pixel size")
        if header_psize > 0 and abs(header_psize - psize_A) > 1e-3 * psize_A:
            warnings.warn(
                f"{path}: header voxel size {header_psize:.5g} A overridden by psize_A={psize_A}",
                stacklevel=3,
            )
        return float(psize_A)
    if header_psize <= 0:
        raise InputError(
            path,
            "header voxel size is 0",
            field="voxel size",
            expected="a positive voxel size; pass psize_A (or --psize-A) to give it",
        )
    return header_psize


def _zyx(data, header):
    """Reorder ``data`` (section, row, column) to ``[z, y, x]`` using mapc/mapr/maps."""
    axes = (int(header.mapc), int(header.mapr), int(header.maps))  # physical axis of col, row, sec
    if axes == (1, 2, 3):
        return data
    data_axis_of = {axes[0]: 2, axes[1]: 1, axes[2]: 0}
    return np.transpose(data, (data_axis_of[3], data_axis_of[2], data_axis_of[1]))


def read_map(path, psize_A: float | None = None):
    """Read a cubic 3D map.

    Returns ``(vol, psize_A)``: ``vol`` float32 ``(n, n, n)`` indexed ``[z, y, x]``,
    ``psize_A`` the voxel size in Angstrom (the ``psize_A`` argument when given,
    which is required when the header says 0). Odd boxes are fine. Refused:
    non-cubic boxes or voxels, crystallographic space groups, 2D images.
    """
    with _open(path, mmap=False) as mrc:
        _check_data(path, mrc)
        h = mrc.header
        if mrc.data.ndim != 3:
            raise InputError(path, f"{mrc.data.ndim}D data, not a volume", expected="a 3D map")
        vol = _zyx(mrc.data, h)
        vs = mrc.voxel_size
        voxel = (float(vs.x), float(vs.y), float(vs.z))
        problems = []
        if len(set(vol.shape)) != 1:
            problems.append(f"non-cubic map of shape (z, y, x) = {vol.shape}")
        if not np.allclose(voxel, voxel[0], rtol=1e-4):
            problems.append(f"non-cubic voxels (x, y, z) = {tuple(round(v, 5) for v in voxel)} A")
        if int(h.ispg) not in _SINGLE_PARTICLE_SPACE_GROUPS:
            problems.append(f"crystallographic space group {int(h.ispg)} (ispg)")
        if problems:
            raise InputError(
                path,
                "; ".join(problems),
                expected="a cubic single-particle map: n x n x n box, equal voxel sizes, ispg 1",
            )
        psize = _voxel_size_A(path, _header_psize_A(mrc), psize_A)
        vol = np.array(vol, dtype=np.float32)
    if not np.isfinite(vol).all():
        raise InputError(
            path, f"{int((~np.isfinite(vol)).sum())} NaN/inf voxels", expected="finite values"
        )
    return vol, psize


def write_map(path, vol, psize_A: float, origin=None) -> None:
    """Write a 3D map atomically (float32, mode 2) with voxel size and origin (Angstrom, x y z)."""
    vol = np.asarray(vol, dtype=np.float32)
    if vol.ndim != 3:
        raise ValueError(f"write_map: expected a 3D array, got shape {vol.shape}")
    if not psize_A > 0:
        raise ValueError(f"write_map: psize_A must be positive, got {psize_A}")
    with atomic_output(path) as tmp:
        with mrcfile.new(tmp, overwrite=True) as mrc:
            mrc.set_data(vol)
            mrc.voxel_size = float(psize_A)
            if origin is not None:
                mrc.header.origin = tuple(float(o) for o in origin)
            mrc.update_header_stats()


def stack_info(path):
    """``(n_images, ny, nx, header_psize_A)`` of an MRC/MRCS stack from its header alone.

    ``header_psize_A`` is 0 when unset. A file shorter than its header promises
    (truncated copy) raises :class:`InputError`.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            with mrcfile.open(path, mode="r", permissive=True, header_only=True) as mrc:
                h = mrc.header
                nx, ny, nz = int(h.nx), int(h.ny), int(h.nz)
                try:
                    itemsize = mrcfile.utils.dtype_from_mode(h.mode).itemsize
                except ValueError:
                    raise InputError(
                        path, f"unknown MRC mode {int(h.mode)}", field="mode"
                    ) from None
                data_start = 1024 + int(h.nsymbt)
                psize = _header_psize_A(mrc)
    except FileNotFoundError:
        raise InputError(path, "stack file not found") from None
    except (ValueError, OSError) as err:
        raise InputError(path, f"not a readable MRC file ({err})") from None
    need = data_start + nx * ny * nz * itemsize
    size = os.path.getsize(path)
    if size < need:
        raise InputError(
            path,
            f"file is {size} bytes but its header ({nz} images of {ny}x{nx}) needs {need}",
            expected="a complete stack (truncated copy?)",
        )
    return nz, ny, nx, psize


def read_stack(path, indices=None):
    """Read images ``indices`` (0-based, any order; all when None) of a stack.

    Returns float32 ``(k, ny, nx)``. A single 2D image counts as a stack of one.
    Indices past the end raise an :class:`InputError` naming the file and index.
    Native float32 stacks are read with one ``preadv`` per run of consecutive
    indices straight into the result (one copy from the page cache, against
    two through a memory map); other modes through the memory map.
    """
    with _open(path, mmap=True) as mrc:
        _check_data(path, mrc)
        data = mrc.data
        if data.ndim == 2:
            data = data[None]
        n = data.shape[0]
        if indices is None:
            return np.array(data, dtype=np.float32)
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        bad = (idx < 0) | (idx >= n)
        if bad.any():
            raise InputError(
                path,
                f"image index {int(idx[bad][0])} (0-based) is past the end of the stack",
                expected=f"0 <= index < {n}",
            )
        if data.dtype == np.float32 and data.flags.c_contiguous:
            return _pread_images(path, 1024 + int(mrc.header.nsymbt), data.shape[1:], idx)
        if idx.size > 1 and np.all(np.diff(idx) == 1):
            return np.asarray(data[idx[0] : idx[-1] + 1], dtype=np.float32).copy()
        return np.asarray(data[idx], dtype=np.float32)


def _pread_images(path, data_offset: int, shape, idx: np.ndarray) -> np.ndarray:
    """Native float32 images ``idx`` of the stack whose data starts at ``data_offset``."""
    out = np.empty((idx.size, *shape), dtype=np.float32)
    if idx.size == 0:
        return out
    frame = out[0].nbytes
    flat = out.reshape(-1).view(np.uint8)
    starts = np.flatnonzero(np.diff(idx) != 1) + 1
    bounds = np.concatenate([[0], starts, [idx.size]]).astype(np.int64)
    with open(path, "rb", buffering=0) as f:
        fd = f.fileno()
        for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True):
            view = memoryview(flat[a * frame : b * frame])
            offset = data_offset + int(idx[a]) * frame
            got = 0
            while got < len(view):
                k = os.preadv(fd, [view[got:]], offset + got)
                if k <= 0:
                    raise InputError(path, "file ended inside an image", expected="a complete stack")
                got += k
    return out


def write_stack(path, images, psize_A: float) -> None:
    """Write images ``(k, n, n)`` as an MRCS image stack (float32, ispg 0) atomically."""
    images = np.asarray(images, dtype=np.float32)
    if images.ndim == 2:
        images = images[None]
    if images.ndim != 3:
        raise ValueError(f"write_stack: expected (k, n, n) images, got shape {images.shape}")
    if not psize_A > 0:
        raise ValueError(f"write_stack: psize_A must be positive, got {psize_A}")
    with atomic_output(path) as tmp:
        with mrcfile.new(tmp, overwrite=True) as mrc:
            mrc.set_data(images)
            mrc.set_image_stack()
            mrc.voxel_size = float(psize_A)
            mrc.update_header_stats()

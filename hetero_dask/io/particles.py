"""Particle sets from a CryoSPARC ``.cs`` or RELION ``.star`` file and its image stacks.

:func:`load_particles` checks everything it can before any image is read:
the metadata (CTF present, optics supported), every stack (found, complete,
square images of the expected box, indices inside the stack). Images then come
from :meth:`ParticleSet.read_images` multiplied by ``blob/sign`` and resampled
to one common grid: optics groups with another pixel size are Fourier
cropped/padded to the first particle's pixel size (field of view kept) and
then centre-cropped/padded to its box.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..core.ctf import CTFParams
from ..core.fourier import fourier_resize
from .convert import check_cs_optics, star_to_cs
from .cs import read_cs, resolve_blob_path, with_fields
from .errors import InputError
from .mrc import read_stack, stack_info
from .star import read_star

_CTF_FIELDS = (
    "ctf/df1_A",
    "ctf/df2_A",
    "ctf/df_angle_rad",
    "ctf/accel_kv",
    "ctf/cs_mm",
    "ctf/amp_contrast",
)
# Largest relative pixel-size error left after resampling a group to the common grid:
# 0.5% moves the edge of a 200 px box by half a pixel.
PSIZE_RTOL = 5e-3


@dataclass
class ParticleSet:
    """Particles with their metadata table and resolved stacks.

    ``table``: structured array ``(n,)`` with CryoSPARC field names (see :mod:`.cs`).
    ``box``, ``psize_A``: the common image grid that :meth:`read_images` returns.
    ``stacks``: resolved stack files; ``stack_of_row`` ``(n,)`` indexes them.
    """

    table: np.ndarray
    source: str
    box: int
    psize_A: float
    stacks: list
    stack_of_row: np.ndarray

    @property
    def n(self) -> int:
        return len(self.table)

    def ctf(self, indices=None) -> CTFParams:
        """CTF parameters of rows ``indices`` (all when None) as float32 arrays."""
        t = self.table if indices is None else self.table[np.asarray(indices)]
        names = t.dtype.names

        def col(f, default):
            return np.asarray(t[f] if f in names else np.full(len(t), default), dtype=np.float32)

        return CTFParams(
            df1_A=col("ctf/df1_A", 0),
            df2_A=col("ctf/df2_A", 0),
            df_angle_rad=col("ctf/df_angle_rad", 0),
            accel_kv=col("ctf/accel_kv", 300),
            cs_mm=col("ctf/cs_mm", 2.7),
            amp_contrast=col("ctf/amp_contrast", 0.1),
            phase_shift_rad=col("ctf/phase_shift_rad", 0),
            bfactor=col("ctf/bfactor", 0),
            scale=col("ctf/scale", 1),
        )

    def read_images(self, indices) -> np.ndarray:
        """Images of rows ``indices`` as float32 ``(k, box, box)``, times ``blob/sign``, on the common grid.

        Reads each stack once, its images in file order. NaN/inf pixels raise
        :class:`InputError` naming the stack file and the row.
        """
        rows = np.asarray(indices, dtype=np.int64).reshape(-1)
        if rows.size and (rows.min() < 0 or rows.max() >= self.n):
            raise IndexError(
                f"particle rows must be in [0, {self.n}), got {rows.min()}..{rows.max()}"
            )
        out = np.empty((rows.size, self.box, self.box), dtype=np.float32)
        t = self.table
        stack_ids = self.stack_of_row[rows]
        order = np.argsort(stack_ids, kind="stable")
        bounds = np.flatnonzero(np.diff(stack_ids[order])) + 1
        for pos in np.split(order, bounds):
            if pos.size == 0:
                continue
            path = self.stacks[stack_ids[pos[0]]]
            local = np.asarray(t["blob/idx"][rows[pos]], dtype=np.int64)
            pos = pos[np.argsort(local, kind="stable")]  # file order
            r = rows[pos]
            imgs = read_stack(path, np.asarray(t["blob/idx"][r], dtype=np.int64))
            bad = ~np.isfinite(imgs).all(axis=(1, 2))
            if bad.any():
                i = int(np.argmax(bad))
                raise InputError(
                    path,
                    f"NaN/inf pixels in image {int(t['blob/idx'][r[i]]) + 1} (1-based)",
                    row=int(r[i]),
                    expected="finite pixel values",
                )
            imgs = self._to_grid(imgs, r)
            if "blob/sign" in t.dtype.names:
                sign = np.asarray(t["blob/sign"][r], dtype=np.float32)
                if (sign != 1).any():
                    imgs *= sign[:, None, None]
            out[pos] = imgs
        return out

    def _to_grid(self, imgs, rows):
        """Resample images of one stack (one box and pixel size) to the common grid."""
        n_in = imgs.shape[-1]
        p_in = float(self.table["blob/psize_A"][rows[0]])
        if n_in == self.box and np.isclose(p_in, self.psize_A, rtol=1e-6):
            return imgs
        new_n = _resampled_box(n_in, p_in, self.psize_A)
        imgs = fourier_resize(imgs, new_n, ndim=2) if new_n != n_in else imgs
        return _center_crop_pad(imgs, self.box)


def _resampled_box(n_in: int, psize_in: float, psize_out: float) -> int:
    return max(2, int(round(n_in * psize_in / psize_out)))


def _center_crop_pad(imgs, box: int):
    """Centre crop or zero-pad ``(k, n, n)`` images to ``(k, box, box)`` keeping the centre pixel n//2."""
    n = imgs.shape[-1]
    if n == box:
        return imgs
    out = np.zeros((imgs.shape[0], box, box), dtype=imgs.dtype)
    src0, dst0 = max(n // 2 - box // 2, 0), max(box // 2 - n // 2, 0)
    m = min(n, box)
    out[:, dst0 : dst0 + m, dst0 : dst0 + m] = imgs[:, src0 : src0 + m, src0 : src0 + m]
    return out


def _read_table(path: Path, psize_A, allow_ignore_aberrations, ctf_defaults) -> np.ndarray:
    suffix = path.suffix.lower()
    if suffix == ".cs":
        table = read_cs(path)
        check_cs_optics(table, path, allow_ignore_aberrations)
        for f in ("blob/path", "blob/idx", *_CTF_FIELDS):
            if f not in table.dtype.names:
                raise InputError(
                    path,
                    "missing field",
                    field=f,
                    expected="CryoSPARC particles with blob/* and ctf/*",
                )
        if psize_A is not None:
            table = with_fields(table, {"blob/psize_A": np.full(len(table), psize_A, np.float32)})
        return table
    if suffix == ".star":
        return star_to_cs(
            read_star(path),
            path,
            psize_A=psize_A,
            ctf_defaults=ctf_defaults,
            allow_ignore_aberrations=allow_ignore_aberrations,
        )
    raise InputError(path, f"unknown particle file type {suffix!r}", expected=".cs or .star")


def _check_stacks(path, table, stacks, stack_of_row):
    """Fill ``blob/shape`` from stack headers when unknown; check boxes and indices."""
    shape = (
        np.array(table["blob/shape"])
        if "blob/shape" in table.dtype.names
        else np.zeros((len(table), 2), np.uint32)
    )
    idx = np.asarray(table["blob/idx"], dtype=np.int64)
    for s, stack in enumerate(stacks):
        rows = np.flatnonzero(stack_of_row == s)
        n_img, ny, nx, _ = stack_info(stack)
        if ny != nx:
            raise InputError(
                stack, f"images are {ny}x{nx}", row=int(rows[0]), expected="square images"
            )
        declared = shape[rows, -1]
        wrong = (declared != 0) & (declared != nx)
        if wrong.any():
            r = int(rows[np.argmax(wrong)])
            raise InputError(
                path,
                f"box {int(shape[r, -1])} in the metadata but stack {stack} holds {nx}x{nx} images",
                row=r,
                field="blob/shape (rlnImageSize)",
                expected=f"{nx}",
            )
        past = idx[rows] >= n_img
        if past.any():
            r = int(rows[np.argmax(past)])
            raise InputError(
                path,
                f"image {idx[r] + 1} (1-based) requested but stack {stack} holds {n_img} images",
                row=r,
                field="blob/idx (rlnImageName)",
                expected=f"an index <= {n_img}",
            )
        shape[rows] = nx
    return with_fields(table, {"blob/shape": shape.astype(np.uint32)})


def load_particles(
    path,
    stack_dir=None,
    psize_A: float | None = None,
    *,
    allow_ignore_aberrations: bool = False,
    ctf_defaults: dict | None = None,
    flip_contrast: bool = False,
) -> ParticleSet:
    """Load particles from ``.cs`` or ``.star``; resolve and check their stacks.

    Stack paths are resolved as RELION and CryoSPARC do (:func:`.cs.resolve_blob_path`:
    absolute paths as written; relative ones against the working directory, the
    particle file's folder, then ``stack_dir``, which is also the CryoSPARC project
    folder of ``>`` paths). ``psize_A`` supplies or overrides the pixel size
    (stack header voxel sizes are never used: they are often 0 or 1).
    ``flip_contrast`` negates ``blob/sign`` (a STAR file does not record which
    way round its stack's contrast is; ``.star`` particles read as +1).
    """
    path = Path(path)
    table = _read_table(path, psize_A, allow_ignore_aberrations, ctf_defaults)
    if len(table) == 0:
        raise InputError(path, "no particles", expected="at least one row")
    if flip_contrast:
        table = _flipped_contrast(table)
    psizes = _pixel_sizes(path, table)
    stacks, stack_of_row = _resolve_stacks(path, table, stack_dir)
    table = _check_stacks(path, table, stacks, stack_of_row)
    box0 = int(table["blob/shape"][0, -1])
    psize0 = float(str(np.float32(psizes[0])))  # 2.806, not 2.80599999 (table is float32)
    _check_resampling(path, table["blob/shape"][:, -1], psizes, psize0)
    return ParticleSet(
        table=table,
        source=os.path.abspath(path),
        box=box0,
        psize_A=psize0,
        stacks=stacks,
        stack_of_row=stack_of_row.reshape(-1),
    )


def _flipped_contrast(table: np.ndarray) -> np.ndarray:
    """``table`` with ``blob/sign`` negated (absent: +1, so it becomes -1)."""
    sign = table["blob/sign"] if "blob/sign" in table.dtype.names else np.ones(len(table))
    return with_fields(table, {"blob/sign": -np.asarray(sign, dtype=np.float32)})


def _pixel_sizes(path: Path, table: np.ndarray) -> np.ndarray:
    """``blob/psize_A`` ``(n,)`` float64; refuses a row without a positive pixel size."""
    psizes = np.asarray(table["blob/psize_A"], dtype=np.float64)
    bad = ~(psizes > 0)
    if bad.any():
        raise InputError(
            path,
            "pixel size is 0",
            row=int(np.argmax(bad)),
            field="blob/psize_A",
            expected="a positive pixel size; pass psize_A (--psize-A)",
        )
    return psizes


def _resolve_stacks(path: Path, table: np.ndarray, stack_dir):
    """The stack files named in ``blob/path``, resolved (:func:`.cs.resolve_blob_path`), and
    ``(n,)`` the stack of each row; a stack not found is reported at its first row."""
    names, stack_of_row = np.unique(table["blob/path"], return_inverse=True)
    stacks = []
    for s, name in enumerate(names):
        try:
            stacks.append(resolve_blob_path(name, source=path, stack_dir=stack_dir))
        except InputError as err:
            row = int(np.argmax(stack_of_row == s))
            raise InputError(
                path, str(err).split(": ", 2)[-1], row=row, field="blob/path (rlnImageName)"
            ) from None
    return stacks, stack_of_row


def _check_resampling(path: Path, boxes, psizes, psize0: float) -> None:
    """Refuse optics groups (box, pixel size of the rows' ``boxes``, ``psizes`` ``(n,)``) that a
    Fourier crop/pad to ``psize0`` would leave more than :data:`PSIZE_RTOL` off in pixel size."""
    groups = np.unique(np.stack([boxes.astype(np.float64), psizes], axis=1), axis=0)
    for n_g, p_g in groups:
        new_n = _resampled_box(int(n_g), p_g, psize0)
        err = abs(n_g * p_g / new_n - psize0) / psize0
        if err > PSIZE_RTOL:
            raise InputError(
                path,
                f"particles at {p_g:.5g} A (box {int(n_g)}) cannot be resampled to {psize0:.5g} A "
                f"by Fourier crop/pad (pixel size error {100 * err:.2f}%)",
                field="blob/psize_A (rlnImagePixelSize)",
                expected=f"pixel sizes whose box ratio is within {100 * PSIZE_RTOL:.1f}%",
            )


def locate_stacks(table: np.ndarray, source=None, stack_dir=None) -> np.ndarray:
    """``table`` with each ``blob/path`` made the absolute path of the stack it names.

    Resolved as :func:`load_particles` does (``source``: the file the table came
    from); a stack not found where it was (e.g. particles read from a store whose
    stacks have moved) keeps its path as written. Jobs write their output particle
    files from this table, so the next job reads them from any working directory
    without ``--stack-dir``.
    """
    if "blob/path" not in (table.dtype.names or ()):
        return table
    names, row_of = np.unique(table["blob/path"], return_inverse=True)
    located = []
    for name in names:
        try:
            located.append(str(resolve_blob_path(name, source=source, stack_dir=stack_dir)).encode())
        except InputError:
            located.append(name)
    return with_fields(table, {"blob/path": np.array(located)[row_of.reshape(-1)]})

"""The Zarr v3 particle store: images in a seeded random order, metadata as columns.

Layout of ``S.zarr`` (one Zarr v3 group)::

    zarr.json                 attributes["hetero_dask_store"]: format_version, n, box,
                              psize_A, seed, source_files, fingerprint, chunk_rows,
                              shard_rows, crop_boxes, fields, complete, image_dtype
    images                    (N, box, box) float32 (or float16: half the disk; read
                              back as float32), chunks (chunk_rows, box, box),
                              shards (shard_rows, box, box), uncompressed
    images_<b>                (N, b, b) Fourier-cropped copies (optional),
                              same chunk/shard rows, pixel size psize_A * box / b
    original_index            (N,) int64: store row i holds input particle original_index[i]
    meta/<field>              one array per field of the CryoSPARC-style table (e.g.
                              meta/ctf/df1_A, meta/alignments3D/pose (N, 3)); fixed-width
                              bytes fields are stored as uint8 (N, width)
    import_done               (n_shards,) uint8: done markers of the import blocks (a
                              shard's worth of input rows each, in file order)

A **view** (what a job writes into ``OUT/particles.zarr`` when its images
come from the particle cache, :mod:`hetero_dask.io.cache`) has the same
``original_index`` and ``meta/`` but no images: ``attributes["images_from"]``
names the store holding them (``path``, its ``image_key``) and, unless view
row i is that store's row i, ``image_rows`` ``(N,)`` int64 gives the row of
the other store showing view row i. Every store records ``image_key``: what
its images were read from (see :func:`hetero_dask.io.cache.image_key`).

Order: rows are a seeded random permutation of the input (``perm =
default_rng(seed).permutation(N)``), so an online-EM batch is a contiguous
range and a full pass streams the store; results go back to the input order
with :meth:`ParticleStore.to_input_order`.

Sizes (the rule): an image is ``4 box^2`` bytes; ``chunk_rows`` holds about
``chunk_mb`` (default 2 MiB, at least one image) and ``shard_rows`` is a
multiple of it holding about ``shard_mb`` (default 128 MiB), capped at what N
needs. At box 128: 32 images per chunk, 2048 per shard (a float16 store keeps
the rows of a float32 one, in half the bytes). Shards are the unit of Dask
partitions (:meth:`ParticleStore.shard_ranges`). Images are stored uncompressed (noisy
float32 pixels gain only a few percent from compression and cost CPU on
every read); metadata columns use Zarr's default compressor.

Import: the input is read in **blocks** of a shard's worth of particles in
file order (stack, then index: every stack read sequentially, one ``preadv``
per run of images), and each image is written straight to its place in the
(preallocated) shard files, wherever the random order puts it
(:meth:`~hetero_dask.io.shard_reader.ShardRowReader.write_rows`): a stream
in, page-cache writes out, one task per block, in parallel.

Import safety: the store is built in ``<out>.partial`` and marked complete
(attribute written last) only after every block's done marker is set; then
it is renamed to ``<out>``. An existing store at ``<out>`` stays untouched
until that final swap (``<out>`` -> ``<out>.old-<pid>``, partial -> ``<out>``,
old removed), so an interrupted import never damages it. Re-running the
same import resumes the partial store, skipping blocks already done; a
partial store built from different input (other fingerprint, seed or
sizes) is discarded and rebuilt. Importing into a complete store built from
the same input, seed and sizes returns it as it is (a job importing on the
fly into its output directory does it once).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import shutil
import uuid
from collections.abc import Sequence
from dataclasses import fields as dc_fields
from pathlib import Path

import numpy as np
import zarr

from ..core.ctf import CTFParams
from ..core.fourier import fourier_resize
from .shard_reader import ShardRowReader

FORMAT_VERSION = 1
ATTR = "hetero_dask_store"
CHUNK_MB = 2.0
SHARD_MB = 128.0
_META_SHARD_ROWS = 1 << 20  # metadata columns: one Zarr shard per ~1M rows
_CTF_OPTIONAL = {"phase_shift_rad": 0.0, "bfactor": 0.0, "scale": 1.0}
_IMPORT_UNIT = "block"  # import_done marks blocks of input rows in file order


# float16 keeps 11 significant bits (relative rounding error <= 2^-11): noise-dominated
# particle images lose nothing measurable (tests/test_float16_store.py states the tolerance).
IMAGE_DTYPES = ("float32", "float16")


def check_image_dtype(image_dtype) -> str:
    """The name (``"float32"`` or ``"float16"``) of a store's image dtype; refuse others."""
    try:
        name = np.dtype(image_dtype).name
    except TypeError:
        name = None
    if name not in IMAGE_DTYPES:
        raise ValueError(f"image dtype {image_dtype!r}: expected one of {', '.join(IMAGE_DTYPES)}")
    return name


def store_layout(
    n: int, box: int, chunk_mb: float = CHUNK_MB, shard_mb: float = SHARD_MB
) -> tuple[int, int]:
    """``(chunk_rows, shard_rows)`` along N for ``n`` images of ``box^2`` float32 (see module doc)."""
    if n < 1:
        raise ValueError("cannot build a particle store from 0 particles")
    image_bytes = 4 * box * box
    chunk = int(min(max(1, round(chunk_mb * 2**20 / image_bytes)), n))
    per_shard = max(1, round(shard_mb * 2**20 / image_bytes / chunk))
    per_shard = min(per_shard, -(-n // chunk))
    return chunk, chunk * per_shard


def is_store(path) -> bool:
    """Whether ``path`` is a (complete or not) hetero_dask particle store."""
    if not isinstance(path, str | os.PathLike):
        return False
    p = Path(path)
    if not (p / "zarr.json").is_file():
        return False
    try:
        return ATTR in zarr.open_group(str(p), mode="r").attrs
    except Exception:
        return False


def _field_specs(dtype: np.dtype) -> list[list]:
    """``[[name, dtype.str, shape], ...]`` of a structured dtype, in field order."""
    out = []
    for name in dtype.names:
        sub = dtype.fields[name][0]
        base, shape = sub.subdtype if sub.subdtype else (sub, ())
        out.append([name, base.str, list(shape)])
    return out


def _table_dtype(specs) -> np.dtype:
    return np.dtype([(name, np.dtype(s), tuple(shape)) for name, s, shape in specs])


def fingerprint(table: np.ndarray, box: int, psize_A: float) -> str:
    """SHA-256 of the table's dtype and bytes, box and pixel size (identifies an import's input)."""
    h = hashlib.sha256()
    h.update(repr((table.dtype.descr, int(box), float(psize_A))).encode())
    flat = np.ascontiguousarray(table)
    step = max(1, (64 << 20) // max(flat.dtype.itemsize, 1))
    for i in range(0, flat.size, step):
        h.update(flat[i : i + step].tobytes())
    return h.hexdigest()


def store_version(path) -> tuple[int, int]:
    """Identifies the store now at ``path`` (its ``zarr.json``'s inode and modification time):
    a store replaced at the same path (a job re-run with other input) gets another, so
    caches of opened stores can key on ``(path, store_version(path))``."""
    st = (Path(path) / "zarr.json").stat()
    return st.st_ino, st.st_mtime_ns


class ParticleStore:
    """Read access to a complete particle store (see the module docstring).

    Open with :meth:`ParticleStore.open`; row ranges ``[start, stop)`` are in
    store order.
    """

    def __init__(self, path, group: zarr.Group):
        self.path = Path(path)
        self._group = group
        self.attrs: dict = dict(group.attrs[ATTR])
        self._orig: np.ndarray | None = None
        self._readers: dict[str, ShardRowReader | None] = {}
        self._source: ParticleStore | None = None  # a view's image store
        link = self.attrs.get("images_from")
        if link:
            self._source = ParticleStore.open(link["path"])
            if self._source.attrs.get("image_key") != link["image_key"]:
                raise ValueError(
                    f"particle store {self.path} takes its images from {link['path']}, which now "
                    "holds other images: run the job again (it imports the particles again)"
                )

    @classmethod
    def open(cls, path) -> ParticleStore:
        """Open a complete store read-only; refuse a missing or incomplete one clearly."""
        p = Path(path)
        if not (p / "zarr.json").is_file():
            partial = _partial_path(p)
            if (partial / "zarr.json").is_file():
                raise ValueError(
                    f"particle store {p} does not exist, but an interrupted import left {partial}: "
                    "re-run `hetero-dask import` with the same arguments to finish it"
                )
            raise FileNotFoundError(f"particle store {p} not found (no zarr.json)")
        group = zarr.open_group(str(p), mode="r")
        if ATTR not in group.attrs:
            raise ValueError(
                f"{p} is a Zarr group but not a hetero_dask particle store (no '{ATTR}' attribute)"
            )
        attrs = group.attrs[ATTR]
        if attrs.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"particle store {p} has format_version {attrs.get('format_version')}, "
                f"this hetero_dask reads {FORMAT_VERSION}: re-run `hetero-dask import`"
            )
        if not attrs.get("complete", False):
            raise ValueError(
                f"particle store {p} is incomplete (its import was interrupted): "
                "re-run `hetero-dask import` with the same arguments to finish it"
            )
        link = attrs.get("images_from")
        if link and not (Path(link["path"]) / "zarr.json").is_file():
            raise FileNotFoundError(
                f"particle store {p} takes its images from {link['path']}, which is gone (evicted "
                "from the particle cache?): run the job again (it imports the particles again)"
            )
        return cls(p, group)

    # -- dataset attributes -------------------------------------------------
    @property
    def n(self) -> int:
        return int(self.attrs["n"])

    @property
    def box(self) -> int:
        return int(self.attrs["box"])

    @property
    def psize_A(self) -> float:
        return float(self.attrs["psize_A"])

    @property
    def seed(self) -> int:
        return int(self.attrs["seed"])

    @property
    def source_files(self) -> list[str]:
        return list(self.attrs["source_files"])

    @property
    def image_dtype(self) -> np.dtype:
        """How the images are stored (float32, or float16: half the disk, same reads)."""
        return np.dtype(self.attrs.get("image_dtype", "float32"))

    @property
    def crop_boxes(self) -> list[int]:
        return [int(b) for b in self.attrs["crop_boxes"]]

    @property
    def shard_rows(self) -> int:
        return int(self.attrs["shard_rows"])

    @property
    def fields(self) -> list[str]:
        """Names of the per-particle metadata fields, in the input table's order."""
        return [f[0] for f in self.attrs["fields"]]

    def psize_at_box(self, box: int) -> float:
        """Pixel size in A of the images at ``box`` (the full box or a stored crop)."""
        return self.psize_A * self.box / int(box)

    # -- images -------------------------------------------------------------
    def images(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Images ``(stop - start, box, box)`` float32 of rows ``[start, stop)`` (a float16
        store's values widened)."""
        return self._image_rows("images", start, stop)

    def _image_rows(self, name: str, start, stop) -> np.ndarray:
        if self._source is not None:
            if "image_rows" not in self._group:  # view row i is the source's row i
                return self._source._image_rows(name, start, stop)
            return self._source._take(name, self._group["image_rows"][start:stop])
        reader = self._reader(name)
        rows = self._group[name][start:stop] if reader is None else reader.read(start, stop)
        return rows.astype(np.float32, copy=False)

    def _take(self, name: str, rows: np.ndarray) -> np.ndarray:
        """Images of store rows ``rows`` (any order) of array ``name``."""
        reader = self._reader(name)
        if reader is None:
            wanted, inverse = np.unique(rows, return_inverse=True)
            taken = self._group[name].oindex[wanted][inverse.reshape(-1)]
        else:
            taken = reader.take(rows)
        return taken.astype(np.float32, copy=False)

    def _reader(self, name: str) -> ShardRowReader | None:
        # Straight from the shard files when the layout allows (io.shard_reader: ~7x less
        # time than through zarr), else None: read through zarr.
        if name not in self._readers:
            self._readers[name] = ShardRowReader.for_array(self.path / name)
        return self._readers[name]

    def images_at_box(self, box: int, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Images at ``box``: the full box, a stored crop, or Fourier-resized on the fly."""
        box = int(box)
        if box == self.box:
            return self.images(start, stop)
        if box in self.crop_boxes:
            return self._image_rows(f"images_{box}", start, stop)
        return fourier_resize(self.images(start, stop), box, ndim=2)

    # -- metadata -----------------------------------------------------------
    def column(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Values of field ``name`` (e.g. ``"ctf/df1_A"``) for rows ``[start, stop)``, input dtype."""
        spec = {f[0]: f for f in self.attrs["fields"]}.get(name)
        if spec is None:
            raise KeyError(
                f"particle store {self.path} has no field '{name}' (fields: {', '.join(self.fields)})"
            )
        raw = self._group[f"meta/{name}"][start:stop]
        dt = np.dtype(spec[1])
        if dt.kind == "S":
            return np.ascontiguousarray(raw).view(dt).reshape(raw.shape[:1] + tuple(spec[2]))
        return raw.astype(dt, copy=False)

    def has_field(self, name: str) -> bool:
        return name in self.fields

    def table(self, start: int | None = None, stop: int | None = None, fields=None) -> np.ndarray:
        """The CryoSPARC-style structured array of rows ``[start, stop)``, store order
        (``fields``: only these, in the store's order)."""
        start = 0 if start is None else start
        stop = self.n if stop is None else min(stop, self.n)
        specs = self.attrs["fields"]
        if fields is not None:
            wanted = set(fields)
            unknown = wanted - {f[0] for f in specs}
            if unknown:
                raise KeyError(f"particle store {self.path} has no field(s) {sorted(unknown)}")
            specs = [f for f in specs if f[0] in wanted]
        out = np.empty(max(stop - start, 0), dtype=_table_dtype(specs))
        for name in out.dtype.names:
            out[name] = self.column(name, start, stop)
        return out

    def ctf(self, start: int = 0, stop: int | None = None) -> CTFParams:
        """Per-particle CTF parameters (``(B,)`` arrays) of rows ``[start, stop)``."""
        values = {}
        for f in dc_fields(CTFParams):
            name = f"ctf/{f.name}"
            if self.has_field(name):
                values[f.name] = self.column(name, start, stop).astype(np.float32)
            elif f.name in _CTF_OPTIONAL:
                m = len(range(*slice(start, stop).indices(self.n)))
                values[f.name] = np.full(m, _CTF_OPTIONAL[f.name], np.float32)
            else:
                raise ValueError(
                    f"particle store {self.path} lacks CTF field '{name}' (needed for the CTF)"
                )
        return CTFParams(**values)

    # -- order --------------------------------------------------------------
    @property
    def original_index(self) -> np.ndarray:
        """``(N,)`` int64: store row ``i`` holds input particle ``original_index[i]``."""
        if self._orig is None:
            self._orig = self._group["original_index"][:]
        return self._orig

    def input_rows(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """``original_index[start:stop]``, read without loading all N (a task's rows only)."""
        if self._orig is not None:
            return self._orig[start:stop]
        return np.asarray(self._group["original_index"][start:stop], dtype=np.int64)

    def to_input_order(self, values) -> np.ndarray:
        """Per-particle ``values`` ``(N, ...)`` in store order -> the user's input order."""
        values = np.asarray(values)
        if values.shape[0] != self.n:
            raise ValueError(f"expected {self.n} per-particle values, got {values.shape[0]}")
        out = np.empty_like(values)
        out[self.original_index] = values
        return out

    def to_store_order(self, values) -> np.ndarray:
        """Per-particle ``values`` ``(N, ...)`` in input order -> store order."""
        values = np.asarray(values)
        if values.shape[0] != self.n:
            raise ValueError(f"expected {self.n} per-particle values, got {values.shape[0]}")
        return values[self.original_index]

    def shard_ranges(self, min_rows: int = 0) -> list[tuple[int, int]]:
        """Contiguous ``(start, stop)`` row ranges aligned to shards, covering all rows.

        Each range is a whole number of shards holding at least ``min_rows``
        rows (except possibly the last): Dask partitions that never split a shard.
        """
        step = self.shard_rows * max(1, -(-int(min_rows) // self.shard_rows))
        return [(s, min(s + step, self.n)) for s in range(0, self.n, step)]


# --------------------------------------------------------------------------
# Import
# --------------------------------------------------------------------------


def _partial_path(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def _create_image_arrays(
    g: zarr.Group, n: int, box: int, crop_boxes: Sequence[int], chunk: int, shard: int,
    image_dtype: str,
) -> None:
    """Empty image arrays (full box and crops), their shard files preallocated, and the
    import's done markers."""
    n_shards = -(-n // shard)
    for b in [box, *crop_boxes]:
        g.create_array(
            "images" if b == box else f"images_{b}",
            shape=(n, b, b),
            dtype=image_dtype,
            chunks=(chunk, b, b),
            shards=(shard, b, b),
            compressors=None,
        )
    for b in [box, *crop_boxes]:
        files = _shard_files(g, "images" if b == box else f"images_{b}")
        for s in range(n_shards):
            files.create_shard(s)
    # one marker per import block: a shard's worth of input rows in file order
    g.create_array("import_done", shape=(n_shards,), dtype="uint8", chunks=(1,), fill_value=0)


def _write_order_and_meta(g: zarr.Group, table: np.ndarray, specs, seed: int, shard: int) -> None:
    """``original_index`` (the seeded permutation) and one ``meta/<field>`` array per field
    of ``table``, in store order."""
    n = len(table)
    perm = np.random.default_rng(seed).permutation(n).astype(np.int64)
    mrows = shard * max(1, _META_SHARD_ROWS // shard)
    g.create_array("original_index", data=perm, chunks=(shard,), shards=(mrows,))
    for name, dstr, shape in specs:
        dt = np.dtype(dstr)
        col = table[name][perm]
        if dt.kind == "S":  # fixed-width bytes as uint8 (N, ..., width): a stable Zarr v3 type
            col = np.ascontiguousarray(col).view(np.uint8).reshape((n, *shape, dt.itemsize))
        else:
            col = col.astype(dt.newbyteorder("="), copy=False)
        tail = col.shape[1:]
        g.create_array(f"meta/{name}", data=col, chunks=(shard, *tail), shards=(mrows, *tail))


def _create_layout(
    path: Path,
    table: np.ndarray,
    box: int,
    psize_A: float,
    seed: int,
    sources: list[str],
    fp: str,
    crop_boxes: Sequence[int],
    chunk: int,
    shard: int,
    image_key: str | None,
    images: bool = True,
    extra_attrs: dict | None = None,
    image_dtype: str = "float32",
) -> zarr.Group:
    """Create the store (order, metadata columns; empty image arrays unless ``images`` is
    False, as for a view) at ``path``; not yet complete."""
    specs = _field_specs(table.dtype)
    attrs = {
        "format_version": FORMAT_VERSION,
        "n": len(table),
        "box": int(box),
        "psize_A": float(psize_A),
        "seed": int(seed),
        "source_files": sources,
        "fingerprint": fp,
        "chunk_rows": chunk,
        "shard_rows": shard,
        "crop_boxes": [int(b) for b in crop_boxes],
        "fields": specs,
        "complete": False,
        "meta_written": False,
        "image_key": image_key,
        "image_dtype": image_dtype,
        "import_unit": _IMPORT_UNIT,
        **(extra_attrs or {}),
    }
    g = zarr.open_group(str(path), mode="w", attributes={ATTR: attrs})
    if images:
        _create_image_arrays(g, len(table), box, crop_boxes, chunk, shard, image_dtype)
    _write_order_and_meta(g, table, specs, seed, shard)
    attrs["meta_written"] = True  # written last: a resumed import trusts the columns from here on
    g.attrs[ATTR] = attrs
    return g


def _shard_files(g: zarr.Group, name: str) -> ShardRowReader:
    files = ShardRowReader.for_array(Path(g.store.root) / name)
    if files is None:  # the layout _create_layout made; anything else is a bug
        raise RuntimeError(f"{Path(g.store.root) / name}: not the sharded layout of an import")
    return files


def _block_task(
    path: str, block: int, particles, read_rows, dest, input_rows, crop_boxes: Sequence[int]
) -> int:
    """Read one import block and write its images (and crops) where they go, then mark it done.

    ``particles.read_images(read_rows[i])`` is input particle ``input_rows[i]``,
    which goes to store row ``dest[i]``. A block's rows are consecutive in the
    stacks (file order), so they are read sequentially; they land all over
    the store (its order is random), written into the shard files in place.
    A ParticleSet has checked its pixels are finite; other sources are
    checked here.
    """
    from .particles import ParticleSet

    g = zarr.open_group(path, mode="r+")
    a = g.attrs[ATTR]
    imgs = np.asarray(particles.read_images(read_rows), dtype=np.float32)
    if not isinstance(particles, ParticleSet):
        # float64 sums of float32 pixels cannot overflow: a non-finite sum means NaN/inf pixels
        bad = ~np.isfinite(imgs.sum(axis=(1, 2), dtype=np.float64))
        if bad.any():
            raise ValueError(
                f"particle {int(input_rows[int(np.argmax(bad))])} (0-based, input order) has NaN "
                f"or inf pixels; {int(bad.sum())} such particle(s) in this import block"
            )
    if np.dtype(a.get("image_dtype", "float32")) == np.float16:
        peaks = np.abs(imgs).max(axis=(1, 2))
        if peaks.max() > np.finfo(np.float16).max:
            raise ValueError(
                f"particle {int(input_rows[int(np.argmax(peaks))])} (0-based, input order) has "
                f"pixel values up to {float(peaks.max()):.4g}, beyond float16's "
                f"{np.finfo(np.float16).max:.0f}: import as float32"
            )
    _shard_files(g, "images").write_rows(dest, imgs)
    chunk = int(a["chunk_rows"])
    for b in crop_boxes:
        crops = np.concatenate(
            [fourier_resize(imgs[i : i + chunk], int(b), ndim=2) for i in range(0, len(imgs), chunk)]
        )
        _shard_files(g, f"images_{b}").write_rows(dest, crops)
    g["import_done"][block] = 1
    return len(dest)


def _block_item(shared, item, path: str, crop_boxes: Sequence[int]) -> int:
    """Engine task: import block ``item = (block, particles, read_rows, dest, input_rows)``,
    reading the block's own ``particles``, or ``shared`` (the whole source) when that is None."""
    block, particles, *rows = item
    return _block_task(path, block, shared if particles is None else particles, *rows, crop_boxes)


def _file_order(particles) -> np.ndarray:
    """Input rows sorted by where their images are (stack, then index in it)."""
    from .particles import ParticleSet

    if isinstance(particles, ParticleSet):
        idx = np.asarray(particles.table["blob/idx"], dtype=np.int64)
        return np.lexsort((idx, particles.stack_of_row)).astype(np.int64)
    return np.arange(len(particles.table), dtype=np.int64)


def _block_inputs(particles, rows: np.ndarray, store_row: np.ndarray):
    """``(particles_for_task, read_rows, dest, input_rows)`` of the block of input ``rows``.

    A :class:`~hetero_dask.io.particles.ParticleSet` is cut to the block's
    rows, so a task carries only its own metadata (worker memory independent
    of N); other sources are used whole.
    """
    from .particles import ParticleSet

    dest = store_row[rows]
    if isinstance(particles, ParticleSet):
        sub = dataclasses.replace(
            particles, table=particles.table[rows], stack_of_row=particles.stack_of_row[rows]
        )
        return sub, np.arange(rows.size), dest, rows
    return particles, rows, dest, rows


def _run_blocks(path: Path, todo: list[int], particles, crop_boxes, client, progress: bool) -> None:
    """Run the import blocks as engine tasks on ``client`` (at most 2 per worker thread
    unfinished), or in threads of this process (one per core: reading, copying and writing
    release the GIL)."""
    from tqdm.auto import tqdm

    g = zarr.open_group(str(path), mode="r")
    perm = g["original_index"][:]
    store_row = np.empty_like(perm)
    store_row[perm] = np.arange(perm.size)
    order = _file_order(particles)
    block_rows = int(g.attrs[ATTR]["shard_rows"])

    def inputs(blk):
        return _block_inputs(particles, order[blk * block_rows : (blk + 1) * block_rows], store_row)

    bar = tqdm(total=len(todo), desc="import", unit="block",
               disable=None if progress is None else not progress)
    try:
        if client is None:
            _run_blocks_in_threads(path, todo, inputs, crop_boxes, bar)
        else:
            _run_blocks_on_cluster(path, todo, inputs, particles, crop_boxes, client, bar)
    finally:
        bar.close()


def _run_blocks_in_threads(path: Path, todo: list[int], inputs, crop_boxes, bar) -> None:
    """Run blocks ``todo`` in threads of this process, one per core; ``inputs(block)`` gives
    a block's ``_block_task`` arguments. The first task error is raised, the rest cancelled."""
    from concurrent.futures import ThreadPoolExecutor

    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1

    def task(blk):  # a block's inputs are cut when it starts: memory stays one block
        return _block_task(str(path), blk, *inputs(blk), crop_boxes)

    with ThreadPoolExecutor(max_workers=threads) as pool:
        try:
            for _ in pool.map(task, todo):  # raises a task's error here
                bar.update(1)
        except BaseException:
            pool.shutdown(cancel_futures=True)
            raise


def _run_blocks_on_cluster(
    path: Path, todo: list[int], inputs, particles, crop_boxes, client, bar
) -> None:
    """Run blocks ``todo`` as engine tasks on ``client``, at most 2 per worker thread
    unfinished; ``inputs(block)`` gives a block's ``_block_task`` arguments."""
    from hetero_dask.runtime.engine import map_items

    from .particles import ParticleSet

    # A ParticleSet is cut per block (each task carries only its rows); other sources are
    # shared, sent to every worker once.
    cut = isinstance(particles, ParticleSet)

    def items():  # a block's inputs are cut when its task is submitted: memory is a window
        for blk in todo:
            own, *rows = inputs(blk)
            yield blk, own if cut else None, *rows

    map_items(
        client,
        functools.partial(_block_item, path=str(path), crop_boxes=list(crop_boxes)),
        items(),
        shared=None if cut else particles,
        key_prefix="import",
        # tasks write files: keys of this call only, never a result kept from another import
        token=uuid.uuid4().hex,
        window=2 * max(1, sum(client.nthreads().values())),
        on_done=lambda _: bar.update(1),
    )


def _matches(path: Path, expected: dict) -> bool:
    a = zarr.open_group(str(path), mode="r").attrs[ATTR]
    return all(a.get(k) == v for k, v in expected.items())


def _import_source(source, stack_dir) -> tuple:
    """``(particles, source_files)`` of a ``.cs``/``.star`` path (loaded, stacks resolved
    with ``stack_dir``) or of a ParticleSet (its ``source``, if any, recorded)."""
    if isinstance(source, (str, os.PathLike)):
        from .particles import load_particles

        particles = load_particles(source, stack_dir=stack_dir)
        return particles, [str(Path(source).resolve())]
    src = getattr(source, "source", None)
    return source, [str(src)] if src else []


def _checked_crop_boxes(crop_boxes: Sequence[int], box: int) -> list[int]:
    """The distinct crop boxes other than ``box``, sorted; refuses one outside ``[2, box)``."""
    crop_boxes = sorted({int(b) for b in crop_boxes} - {int(box)})
    for b in crop_boxes:
        if not 2 <= b < box:
            raise ValueError(
                f"crop box {b} must be between 2 and the particle box {box} (exclusive)"
            )
    return crop_boxes


def _partial_store(partial: Path, expected: dict, particles, seed, sources, extra_attrs):
    """The store to import into at ``partial``: the one an interrupted import of the same
    input (``expected`` attributes) left there, its done blocks kept, else a new layout
    replacing whatever is there."""
    g = None
    if is_store(partial) and _matches(partial, {**expected, "meta_written": True}):
        g = zarr.open_group(str(partial), mode="r+")
    if g is not None and g.attrs[ATTR].get("import_unit") != _IMPORT_UNIT:
        g = None  # its done markers mean something else
    if g is not None:
        return g
    if partial.exists():
        shutil.rmtree(partial)
    return _create_layout(
        partial,
        particles.table,
        particles.box,
        particles.psize_A,
        seed,
        sources,
        expected["fingerprint"],
        expected["crop_boxes"],
        expected["chunk_rows"],
        expected["shard_rows"],
        expected["image_key"],
        extra_attrs=extra_attrs,
        image_dtype=expected["image_dtype"],
    )


def import_particles(
    source,
    out_path,
    client=None,
    seed: int = 0,
    stack_dir=None,
    crop_boxes: Sequence[int] = (),
    progress: bool = True,
    chunk_mb: float = CHUNK_MB,
    shard_mb: float = SHARD_MB,
    image_key: str | None = None,
    extra_attrs: dict | None = None,
    image_dtype: str = "float32",
) -> ParticleStore:
    """Copy particles into a Zarr store at ``out_path`` and return it opened.

    ``source``: a ``.cs``/``.star`` path (read with
    :func:`hetero_dask.io.particles.load_particles`, stacks resolved with
    ``stack_dir``) or a ParticleSet (``.table``, ``.box``, ``.psize_A``,
    ``.read_images(indices)``). One task per import block (see the module
    docstring), on ``client``'s cluster (a ParticleSet is cut per block;
    other sources are broadcast once) or on threads of this process. Memory
    per task is one block of images.
    Resumable and safe against interruption (see the module docstring).
    ``image_key`` is recorded (and must match for a resumed or reused store),
    and so are ``extra_attrs`` (from the start: no store lacks them).
    ``image_dtype`` ``"float16"`` halves the store (see :data:`IMAGE_DTYPES`).
    """
    image_dtype = check_image_dtype(image_dtype)
    out = Path(out_path)
    particles, sources = _import_source(source, stack_dir)
    crop_boxes = _checked_crop_boxes(crop_boxes, particles.box)
    if out.exists() and not is_store(out):
        raise ValueError(
            f"{out} exists and is not a hetero_dask particle store; choose another --out"
        )
    fp = fingerprint(particles.table, particles.box, particles.psize_A)
    chunk_rows, shard_rows = store_layout(len(particles.table), particles.box, chunk_mb, shard_mb)
    expected = {
        "format_version": FORMAT_VERSION,
        "fingerprint": fp,
        "seed": int(seed),
        "crop_boxes": crop_boxes,
        "chunk_rows": chunk_rows,
        "shard_rows": shard_rows,
        "image_key": image_key,
        "image_dtype": image_dtype,
    }
    if is_store(out) and _matches(out, {**expected, "complete": True}):
        return ParticleStore.open(out)  # already imported from the same input
    partial = _partial_path(out)
    g = _partial_store(partial, expected, particles, seed, sources, extra_attrs)
    todo = [int(s) for s in np.flatnonzero(g["import_done"][:] == 0)]
    _run_blocks(partial, todo, particles, crop_boxes, client, progress)
    if not (g["import_done"][:] == 1).all():
        raise RuntimeError(f"import into {partial} left blocks unfinished; re-run to finish")
    return _finish(g, partial, out)


def _finish(g: zarr.Group, partial: Path, out: Path) -> ParticleStore:
    """Mark the store built at ``partial`` complete, then swap it in at ``out``."""
    attrs = dict(g.attrs[ATTR])
    attrs["complete"] = True
    g.attrs[ATTR] = attrs  # written last: the store is complete from here on
    old = out.with_name(f"{out.name}.old-{os.getpid()}")
    if out.exists():
        out.rename(old)
    partial.rename(out)
    if old.exists():
        shutil.rmtree(old)
    return ParticleStore.open(out)


def write_view(
    table: np.ndarray,
    out_path,
    source: ParticleStore,
    source_rows: np.ndarray,
    seed: int,
    image_key: str,
    sources: Sequence[str] = (),
) -> ParticleStore:
    """A view at ``out_path``: ``table``'s metadata, images read from ``source``.

    ``source_rows[j]`` is the row of ``source`` holding the image of input
    particle ``j`` (row ``j`` of ``table``). The view's rows are in the same
    seeded order an import of ``table`` would give, so a job's results do not
    depend on which store its images come from. Written under a temporary
    name and swapped in like an import (see the module docstring).
    """
    out = Path(out_path)
    if out.exists() and not is_store(out):
        raise ValueError(f"{out} exists and is not a hetero_dask particle store")
    n = len(table)
    perm = np.random.default_rng(seed).permutation(n)
    image_rows = np.asarray(source_rows, dtype=np.int64)[perm]
    same_rows = n == source.n and np.array_equal(image_rows, np.arange(n))
    if same_rows:  # share the source's partitioning: tasks then read whole shards of it
        chunk, shard = int(source.attrs["chunk_rows"]), source.shard_rows
    else:
        chunk, shard = store_layout(n, source.box)
    partial = _partial_path(out)
    if partial.exists():
        shutil.rmtree(partial)
    fp = fingerprint(table, source.box, source.psize_A)
    g = _create_layout(partial, table, source.box, source.psize_A, seed, list(sources), fp,
                       source.crop_boxes, chunk, shard, image_key, images=False,
                       image_dtype=source.image_dtype.name)
    if not same_rows:
        mrows = shard * max(1, _META_SHARD_ROWS // shard)
        g.create_array("image_rows", data=image_rows, chunks=(shard,), shards=(mrows,))
    attrs = dict(g.attrs[ATTR])
    attrs["images_from"] = {"path": str(source.path.resolve()),
                            "image_key": source.attrs["image_key"]}
    g.attrs[ATTR] = attrs
    return _finish(g, partial, out)


def ensure_store(
    source,
    work_dir,
    client=None,
    seed: int = 0,
    stack_dir=None,
    crop_boxes: Sequence[int] = (),
    progress: bool = True,
) -> ParticleStore:
    """A job's particles: open ``source`` if it is a store, else import it into ``work_dir/particles.zarr``."""
    if is_store(source):
        return ParticleStore.open(source)
    return import_particles(
        source,
        Path(work_dir) / "particles.zarr",
        client=client,
        seed=seed,
        stack_dir=stack_dir,
        crop_boxes=crop_boxes,
        progress=progress,
    )

"""The particle cache: one store of images per dataset, shared by every job.

A job given a ``.cs``/``.star`` file needs its images in a particle store
(:mod:`hetero_dask.io.store`). Rather than copying them into each job's
``OUT/particles.zarr``, the images are imported once into the cache folder
and each job writes only a small **view** there (its own metadata, the
order of its rows, and where the images are), so refine -> regroup ->
reconstruct on the same particles reads the stacks once.

**Where**: ``cache_dir`` (the jobs' ``--cache-dir``), else
``$HETERO_DASK_CACHE``, else ``$XDG_CACHE_HOME/hetero_dask/particles``
(``~/.cache/hetero_dask/particles``). ``off`` turns the cache off (stores are
then imported into ``OUT/particles.zarr``, as before). On a cluster every
worker must see the folder: put it on fast storage all nodes mount (like
CryoSPARC's SSD cache, but shared).

**Which entry**: an entry ``<key>.zarr`` holds the images of a list of
particles, identified by :func:`image_key`: the rows' image fields of the
particle file (``blob/idx``, ``blob/sign``, ``blob/psize_A``, ``blob/shape``
and which stack each row is in) and each stack's resolved path, size and
modification time, the common box and pixel size, the store's seed and its
image dtype (float32 or float16).
A job whose particles hash to an existing entry reuses it as it is; one
whose particles are a subset of an entry's (or the same particles under
another seed) reads its images from that entry through a row map; other
metadata (poses, classes, CTF) never matters, since it lives in the view.
A stack rewritten since the import (another size or modification time)
gives another key, so a stale entry is never used; it is evicted first.

**Complete**: an entry is built under ``<key>.zarr.partial`` and renamed to
``<key>.zarr`` only after its ``complete`` attribute was written (last), so
an interrupted import is never mistaken for an entry; the next job to need
the same key resumes it (finished shards are kept).

**Concurrency** (``flock``): ``<key>.import.lock`` is held exclusively
while the entry is imported (a second job needing it waits, then reuses
it); ``<key>.lock`` is held shared while a job imports or uses the entry,
and eviction takes it exclusively without waiting, so an entry in use is
never removed.

**Size cap and eviction**: before an import, entries are evicted until the
cache plus the new entry fit under the cap (``max_gb``,
``$HETERO_DASK_CACHE_MAX_GB``, default half the size of the cache's file
system): stale entries first, then abandoned partial imports, then the least
recently used. An entry larger than the cap on its own is not cached (the
job imports into its output folder and says so).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import os
import shutil
import sys
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr

from .store import (
    ATTR,
    FORMAT_VERSION,
    IMAGE_DTYPES,
    ParticleStore,
    check_image_dtype,
    fingerprint,
    import_particles,
    is_store,
    write_view,
)

ENV_DIR = "HETERO_DASK_CACHE"
ENV_MAX_GB = "HETERO_DASK_CACHE_MAX_GB"
OFF = ("off", "none", "no", "0", "false")
_IMAGE_FIELDS = ("blob/idx", "blob/sign", "blob/psize_A", "blob/shape")
_STACK_FIELD = "cache/stack"  # an entry's column: which of its stacks a row is in
_LAST_USED = "last_used"  # file in an entry whose modification time is its last use


def add_store_arguments(parser) -> None:
    """``--cache-dir`` and ``--image-dtype`` for the job commands that read particle images."""
    parser.add_argument(
        "--cache-dir",
        default=None,
        metavar="DIR",
        help=f"particle cache folder: images are imported there once and shared by every job "
        f"('off': import into OUT/particles.zarr; default ${ENV_DIR} or "
        f"~/.cache/hetero_dask/particles; size cap ${ENV_MAX_GB}, default half the disk)",
    )
    parser.add_argument(
        "--image-dtype",
        default="float32",
        choices=IMAGE_DTYPES,
        help="how imported particle images are stored: float16 halves the disk and the reads "
        "(results within stated tolerances of float32's; see the README) (default float32)",
    )


def names_folder(setting) -> bool:
    """Whether a ``--cache-dir`` value is a folder (not None, which defers to the
    environment, nor ``off``)."""
    return setting is not None and str(setting).strip().lower() not in OFF


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "hetero_dask" / "particles"


def stack_identity(path) -> tuple[str, int, int]:
    """``(resolved path, size in bytes, modification time in ns)`` of a stack file."""
    p = Path(path).resolve()
    st = p.stat()
    return str(p), int(st.st_size), int(st.st_mtime_ns)


def image_key(pset, seed: int, image_dtype: str = "float32") -> str:
    """SHA-256 naming the images a store of ``pset`` (a ParticleSet) holds, in its order.

    Covers what :meth:`ParticleSet.read_images` depends on (the rows' image
    fields, each stack's identity, the common box and pixel size), the
    store's seed (its row order) and image dtype; not the rest of the table.
    """
    h = hashlib.sha256()
    stacks = [stack_identity(s) for s in pset.stacks]
    head = (FORMAT_VERSION, int(pset.box), float(pset.psize_A), int(seed), image_dtype, stacks)
    h.update(repr(head).encode())
    h.update(np.ascontiguousarray(pset.stack_of_row, dtype=np.int64).tobytes())
    for name in _IMAGE_FIELDS:
        if name in pset.table.dtype.names:
            h.update(name.encode())
            h.update(np.ascontiguousarray(pset.table[name]).tobytes())
    return h.hexdigest()


def _identity_set(pset):
    """``pset`` cut to the fields that define its images, plus the stack of each row."""
    names = [f for f in _IMAGE_FIELDS if f in pset.table.dtype.names]
    dtype = [(_STACK_FIELD, "<u4")] + [(f, pset.table.dtype.fields[f][0]) for f in names]
    table = np.empty(len(pset.table), dtype=dtype)
    table[_STACK_FIELD] = pset.stack_of_row
    for f in names:
        table[f] = pset.table[f]
    return dataclasses.replace(pset, table=table)


class _Lease:
    """A ``flock`` on an entry's lock file, released when closed or garbage-collected."""

    def __init__(self, path: Path, exclusive: bool, wait: bool = True):
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        flags = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | (0 if wait else fcntl.LOCK_NB)
        try:
            fcntl.flock(self.fd, flags)
        except BaseException:
            os.close(self.fd)
            raise
        self._closer = weakref.finalize(self, os.close, self.fd)

    def close(self) -> None:
        self._closer()

    def __enter__(self) -> _Lease:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class _Entry:
    path: Path
    key: str
    complete: bool
    attrs: dict


class ParticleCache:
    """The cache folder ``root`` with a size cap (see the module docstring)."""

    def __init__(self, root, max_bytes: int | None = None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        if max_bytes is None:
            max_bytes = shutil.disk_usage(self.root).total // 2
        self.max_bytes = int(max_bytes)

    @classmethod
    def from_settings(cls, cache_dir=None, max_gb: float | None = None) -> ParticleCache | None:
        """The cache the settings name (argument, then environment, then default); None if off."""
        where = cache_dir if cache_dir is not None else os.environ.get(ENV_DIR)
        if where is not None and not names_folder(where):
            return None
        if max_gb is None and os.environ.get(ENV_MAX_GB):
            try:
                max_gb = float(os.environ[ENV_MAX_GB])
            except ValueError:
                raise ValueError(
                    f"${ENV_MAX_GB}={os.environ[ENV_MAX_GB]!r}: expected a size in GB"
                ) from None
        if max_gb is not None and not max_gb > 0:
            raise ValueError(f"particle cache size cap must be > 0 GB, got {max_gb}")
        root = Path(where).expanduser() if where else default_cache_dir()
        return cls(root, None if max_gb is None else int(max_gb * 1e9))

    # -- entries ----------------------------------------------------------
    def _lock_path(self, key: str) -> Path:
        return self.root / f"{key}.lock"

    def entry_path(self, key: str) -> Path:
        return self.root / f"{key}.zarr"

    def entries(self) -> list[_Entry]:
        """Entries and partial imports in the folder (unreadable ones skipped)."""
        out = []
        for p in sorted(self.root.glob("*.zarr*")):
            key, _, rest = p.name.partition(".zarr")
            if rest not in ("", ".partial") or not is_store(p):
                continue
            try:
                attrs = dict(zarr.open_group(str(p), mode="r").attrs[ATTR])
            except Exception:
                continue
            out.append(_Entry(p, key, rest == "" and bool(attrs.get("complete")), attrs))
        return out

    def _lease_entry(self, key: str) -> tuple[ParticleStore, _Lease] | None:
        """The complete entry ``key`` with a shared lease, or None (absent or incomplete)."""
        if not (self.entry_path(key) / "zarr.json").is_file():
            return None
        lease = _Lease(self._lock_path(key), exclusive=False)
        try:  # it may have been evicted while we waited for the lease
            store = ParticleStore.open(self.entry_path(key))
        except (FileNotFoundError, ValueError):
            lease.close()
            return None
        if store.attrs.get("image_key") != key:
            lease.close()
            return None
        return store, lease

    def _find_superset(self, pset, image_dtype: str):
        """An entry holding every image of ``pset`` (possibly more, in another order):
        ``(entry, entry row of each input row, lease)``, or None."""
        ours = [stack_identity(s) for s in pset.stacks]
        for e in self.entries():
            a = e.attrs
            if not (
                e.complete
                and a.get("box") == pset.box
                and a.get("psize_A") == float(pset.psize_A)
                and a.get("image_dtype", "float32") == image_dtype
            ):
                continue
            theirs = {tuple(s): i for i, s in enumerate(a.get("stacks", []))}
            if not all(s in theirs for s in ours):
                continue
            found = self._lease_entry(e.key)
            if found is None:
                continue
            store, lease = found
            rows = _row_map(store, pset, np.array([theirs[s] for s in ours], dtype=np.int64))
            if rows is not None:
                _touch(store.path)
                return store, rows, lease
            lease.close()
        return None

    # -- eviction -----------------------------------------------------------
    def evict(self, need_bytes: int, keep: str) -> None:
        """Remove entries not in use until the cache plus ``need_bytes`` fit under the cap:
        stale ones first, then abandoned partial imports, then least recently used."""
        for leftover in self.root.glob("*.evicting-*"):  # an eviction that was interrupted
            shutil.rmtree(leftover, ignore_errors=True)
        entries = [e for e in self.entries() if e.key != keep]
        sizes = {e.path: _du(e.path) for e in entries}
        used = sum(sizes.values())

        def rank(e: _Entry):
            return (not _is_stale(e), e.complete, _last_used(e.path))

        for e in sorted(entries, key=rank):
            if used + need_bytes <= self.max_bytes and not _is_stale(e):
                break
            try:
                lease = _Lease(self._lock_path(e.key), exclusive=True, wait=False)
            except BlockingIOError:
                continue  # in use, or being imported
            try:
                doomed = e.path.with_name(f"{e.path.name}.evicting-{os.getpid()}")
                e.path.rename(doomed)  # out of sight at once, then removed
                shutil.rmtree(doomed, ignore_errors=True)
                used -= sizes[e.path]
            finally:
                lease.close()

    # -- the job's store ------------------------------------------------------
    def images_for(self, pset, seed: int, client=None, progress: bool = True,
                   image_dtype: str = "float32"):
        """``(entry, entry row of each input row, lease)`` for ``pset``, importing it if no
        entry holds its images; None when it would not fit under the cap."""
        key = image_key(pset, seed, image_dtype)
        found = self._lease_entry(key)
        if found is not None:
            _touch(found[0].path)
            return found[0], _entry_rows(found[0], pset.n), found[1]
        superset = self._find_superset(pset, image_dtype)
        if superset is not None:
            return superset
        need = _estimate_bytes(pset, image_dtype)
        if need > self.max_bytes:
            return None
        # One import of a key at a time: a second job waits here, then finds the entry.
        with _Lease(self.root / f"{key}.import.lock", exclusive=True):
            found = self._lease_entry(key)
            if found is None:
                # shared from the start: eviction leaves the partial import alone
                lease = _Lease(self._lock_path(key), exclusive=False)
                try:
                    self.evict(need, keep=key)
                    stacks = [list(stack_identity(s)) for s in pset.stacks]
                    store = import_particles(
                        _identity_set(pset), self.entry_path(key), client=client, seed=seed,
                        progress=progress, image_key=key, extra_attrs={"stacks": stacks},
                        image_dtype=image_dtype,
                    )
                except BaseException:
                    lease.close()
                    raise
                found = store, lease
        store, lease = found
        _touch(store.path)
        return store, _entry_rows(store, pset.n), lease


def _entry_rows(entry: ParticleStore, n: int) -> np.ndarray:
    """Entry row of each input row when the entry was imported from these very rows."""
    rows = np.empty(n, dtype=np.int64)
    rows[entry.original_index] = np.arange(n)
    return rows


def _row_map(entry: ParticleStore, pset, stack_map: np.ndarray) -> np.ndarray | None:
    """Entry row of each row of ``pset`` (same stack, index, sign and pixel size), or None
    if any is missing. ``stack_map[s]``: the entry's number of ``pset``'s stack ``s``."""
    table = entry.table()
    idx = np.asarray(table["blob/idx"], dtype=np.int64)
    entry_key = np.asarray(table[_STACK_FIELD], dtype=np.int64) << 32 | idx
    ours = stack_map[pset.stack_of_row] << 32 | np.asarray(pset.table["blob/idx"], dtype=np.int64)
    order = np.argsort(entry_key, kind="stable")
    pos = np.searchsorted(entry_key[order], ours)
    pos = np.minimum(pos, len(order) - 1)
    rows = order[pos]
    if not np.array_equal(entry_key[rows], ours):
        return None
    for name in ("blob/sign", "blob/psize_A"):
        have = name in table.dtype.names
        if have != (name in pset.table.dtype.names):
            return None
        if have and not np.array_equal(table[name][rows], pset.table[name]):
            return None
    return rows


def _estimate_bytes(pset, image_dtype: str) -> int:
    return int(pset.n) * np.dtype(image_dtype).itemsize * int(pset.box) ** 2


def _du(path: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.stat(os.path.join(dirpath, f)).st_size
    return total


def _touch(path: Path) -> None:
    (path / _LAST_USED).touch()


def _last_used(path: Path) -> float:
    try:
        return (path / _LAST_USED).stat().st_mtime
    except OSError:
        return 0.0


def _is_stale(e: _Entry) -> bool:
    """A complete entry one of whose stacks changed (or vanished) since its import."""
    if not e.complete:
        return False
    for path, size, mtime_ns in e.attrs.get("stacks", []):
        try:
            if stack_identity(path)[1:] != (size, mtime_ns):
                return True
        except OSError:
            return True
    return False


def job_store(pset, out_dir, client=None, seed: int = 0, progress: bool = True,
              cache_dir=None, image_dtype: str = "float32") -> ParticleStore:
    """A job's particle store for ``pset`` in ``out_dir/particles.zarr``.

    Reuses a complete store already there made from the same table, images
    and seed (a re-run of the job); else, with the cache on, writes a view of
    a cache entry (importing the images into the cache if no entry holds
    them); with the cache off, or an entry too large for it, imports there.
    The returned store holds a shared lease on its cache entry while it lives.
    """
    target = Path(out_dir) / "particles.zarr"
    image_dtype = check_image_dtype(image_dtype)
    key = image_key(pset, seed, image_dtype)
    fp = fingerprint(pset.table, pset.box, pset.psize_A)
    try:
        cache = ParticleCache.from_settings(cache_dir)
    except OSError as err:  # e.g. a cache folder that cannot be created
        warnings.warn(f"particle cache unavailable ({err}): importing into {target}", stacklevel=2)
        cache = None
    existing = _reusable(target, fp, key, seed)
    if existing is not None:
        link = existing.attrs.get("images_from")
        if not link:
            return existing
        entry = Path(link["path"])
        if cache is not None and entry.parent == cache.root.resolve():
            leased = cache._lease_entry(link["image_key"])
            if leased is not None and leased[0].path.resolve() == entry:
                _touch(entry)
                return _held(ParticleStore.open(target), leased[1])
    found = None if cache is None else cache.images_for(pset, seed, client, progress, image_dtype)
    if found is None:
        if cache is not None:
            warnings.warn(
                f"particles ({_estimate_bytes(pset, image_dtype) / 1e9:.1f} GB) exceed the particle cache's cap "
                f"({cache.max_bytes / 1e9:.1f} GB, ${ENV_MAX_GB}): importing into {target}",
                stacklevel=2,
            )
        return import_particles(pset, target, client=client, seed=seed, progress=progress,
                                image_key=key, image_dtype=image_dtype)
    entry, rows, lease = found
    if progress:
        print(f"particle images: {entry.path}", file=sys.stderr)
    try:
        view = write_view(pset.table, target, entry, rows, seed, key, [str(pset.source)])
    except BaseException:
        lease.close()
        raise
    return _held(view, lease)


def _held(store: ParticleStore, lease: _Lease) -> ParticleStore:
    weakref.finalize(store, lease.close)
    return store


def _reusable(target: Path, fp: str, key: str, seed: int) -> ParticleStore | None:
    if not is_store(target):
        return None
    try:
        existing = ParticleStore.open(target)
    except (FileNotFoundError, ValueError):  # incomplete, or its images are gone
        return None
    a = existing.attrs
    if a.get("fingerprint") == fp and a.get("seed") == int(seed) and a.get("image_key") == key:
        return existing
    return None

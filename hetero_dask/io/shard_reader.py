"""Rows of an uncompressed, sharded Zarr v3 array, read straight from its shard files.

The particle store keeps its images uncompressed, in shards of whole inner
chunks along the particle axis (see :mod:`hetero_dask.io.store`). Reading a
row range through zarr costs a copy of every inner chunk into a bytes
object, a second into the result and the event-loop round trips of its
async store: up to twenty times what reading the same bytes into the result
directly costs, and of the order of everything else a reconstruction task does
per particle (``benchmarks/results/design_measurements.md``). So :class:`ShardRowReader`
reads the byte ranges the Zarr v3 sharding format records (the shard index:
per inner chunk an ``(offset, nbytes)`` pair of little-endian uint64 at the
end of the shard file, checked by its CRC32C) straight into the output
array, one ``readinto`` per run of inner chunks that lie next to each other
in the file.

It writes shard files in the same format too, for an import that streams
its input in file order: :meth:`ShardRowReader.create_shard` makes a shard's
file at its final size with its index (the inner chunks back to back), and
:meth:`ShardRowReader.write_rows` puts rows at their places in any order, so
every stack is read sequentially whatever the store's (random) row order,
and writes go through the page cache (no read-modify-write of shards
through zarr's codec pipeline).

It accepts only the layout it understands, read from the array's
``zarr.json``: a local directory, chunks and shards whole along every axis
but the first, one ``sharding_indexed`` codec with the ``bytes`` codec
inside (little-endian) and a ``bytes`` + ``crc32c`` index at the end, no
storage transformers. :meth:`ShardRowReader.for_array` returns None for
anything else, and the caller reads through zarr.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import numpy as np

_MISSING = np.uint64(2**64 - 1)  # offset and nbytes of an inner chunk that was never written
_IOV_MAX = 1024  # buffers per pwritev (Linux's limit)


def _pwrite_all(fd: int, buffers: list, offset: int) -> None:
    """``pwritev`` until every byte of ``buffers`` is written (a call may write fewer)."""
    while buffers:
        done = os.pwritev(fd, buffers, offset)
        offset += done
        while buffers and done >= len(buffers[0]):
            done -= len(buffers[0])
            buffers = buffers[1:]
        if buffers and done:
            buffers = [buffers[0][done:], *buffers[1:]]


def _little_bytes_codec(codec) -> bool:
    return (
        isinstance(codec, dict)
        and codec.get("name") == "bytes"
        and (codec.get("configuration") or {}).get("endian", "little") == "little"
    )


class ShardRowReader:
    """Read rows ``[start, stop)`` of one sharded, uncompressed Zarr v3 array (see module doc)."""

    def __init__(self, path: Path, meta: dict):
        self.path = Path(path)
        self.shape = tuple(int(s) for s in meta["shape"])
        self.dtype = np.dtype(meta["data_type"]).newbyteorder("<")
        self.fill_value = meta.get("fill_value", 0)
        sharding = meta["codecs"][0]["configuration"]
        self.shard_rows = int(meta["chunk_grid"]["configuration"]["chunk_shape"][0])
        self.chunk_rows = int(sharding["chunk_shape"][0])
        self.n_chunks = self.shard_rows // self.chunk_rows
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        encoding = meta.get("chunk_key_encoding", {})
        self.separator = (encoding.get("configuration") or {}).get("separator", "/")
        self.n_trailing = len(self.shape) - 1
        self._index: dict[int, tuple[tuple[int, int], np.ndarray]] = {}
        self._lock = threading.Lock()

    @classmethod
    def for_array(cls, path) -> ShardRowReader | None:
        """A reader for the array stored in directory ``path``, or None if its layout is not
        the one this reader understands (the caller then reads through zarr)."""
        try:
            meta = json.loads((Path(path) / "zarr.json").read_text())
        except (OSError, ValueError):
            return None
        try:
            if meta.get("zarr_format") != 3 or meta.get("node_type") != "array":
                return None
            if meta.get("storage_transformers") or len(meta.get("codecs", [])) != 1:
                return None
            shape = [int(s) for s in meta["shape"]]
            grid = meta["chunk_grid"]
            sharding = meta["codecs"][0]
            if grid.get("name") != "regular" or sharding.get("name") != "sharding_indexed":
                return None
            cfg = sharding["configuration"]
            outer = [int(s) for s in grid["configuration"]["chunk_shape"]]
            inner = [int(s) for s in cfg["chunk_shape"]]
            encoding = meta.get("chunk_key_encoding", {"name": "default"})
            index_codecs = cfg.get("index_codecs", [])
            np.dtype(meta["data_type"])  # raises for a data type numpy does not know
            if not (
                len(shape) >= 1
                and outer[1:] == shape[1:]
                and inner[1:] == shape[1:]
                and outer[0] % inner[0] == 0
                and len(cfg.get("codecs", [])) == 1
                and _little_bytes_codec(cfg["codecs"][0])
                and cfg.get("index_location", "end") == "end"
                and len(index_codecs) == 2
                and _little_bytes_codec(index_codecs[0])
                and index_codecs[1].get("name") == "crc32c"
                and encoding.get("name") == "default"
                and isinstance(meta.get("fill_value", 0), int | float)
            ):
                return None
        except (KeyError, TypeError, ValueError, AttributeError):
            return None
        return cls(Path(path), meta)

    def create_shard(self, shard: int) -> None:
        """Create shard ``shard``'s file at its final size with its index, rows still zero
        (sparse): :meth:`write_rows` then fills the rows in any order, from any process.

        Once every row is written the file is what zarr writes: the inner
        chunks back to back, those past the array's end recorded as missing,
        the last one padded with the fill value (zero), then the index.
        """
        import google_crc32c  # noqa: PLC0415 - zarr's own dependency for the crc32c codec

        if self.fill_value != 0:
            raise ValueError(f"{self.path}: shard files are created for a fill value of 0")
        n_rows = min(self.shard_rows, self.shape[0] - shard * self.shard_rows)
        n_written = -(-n_rows // self.chunk_rows)
        chunk_bytes = self.chunk_rows * self.row_bytes
        index = np.full((self.n_chunks, 2), _MISSING, dtype="<u8")
        index[:n_written, 0] = np.arange(n_written, dtype=np.uint64) * np.uint64(chunk_bytes)
        index[:n_written, 1] = chunk_bytes
        raw = index.tobytes()
        file = self._shard_file(shard)
        file.parent.mkdir(parents=True, exist_ok=True)
        with open(file, "wb") as f:
            f.truncate(n_written * chunk_bytes)
            f.seek(n_written * chunk_bytes)
            f.write(raw + google_crc32c.value(raw).to_bytes(4, "little"))

    def write_rows(self, rows, data) -> None:
        """Write ``data[i]`` as row ``rows[i]`` into shard files made by :meth:`create_shard`:
        one ``pwritev`` per run of consecutive rows (from non-adjacent buffers)."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        data = np.ascontiguousarray(data, dtype=self.dtype)
        if data.shape != (rows.size,) + self.shape[1:]:
            raise ValueError(f"{rows.size} rows of {self.shape[1:]} expected, got {data.shape}")
        order = np.argsort(rows, kind="stable")
        dest = rows[order]
        shards = dest // self.shard_rows
        breaks = np.flatnonzero((np.diff(dest) != 1) | (np.diff(shards) != 0)) + 1
        bounds = np.concatenate([[0], breaks, [dest.size]]).astype(np.int64).tolist()
        views = [memoryview(row.reshape(-1).view(np.uint8)) for row in data]
        fd, open_shard = None, None
        try:
            for a, b in zip(bounds[:-1], bounds[1:], strict=True):
                shard = int(shards[a])
                if shard != open_shard:
                    if fd is not None:
                        os.close(fd)
                    fd, open_shard = os.open(self._shard_file(shard), os.O_WRONLY), shard
                offset = (int(dest[a]) - shard * self.shard_rows) * self.row_bytes
                for c in range(a, b, _IOV_MAX):
                    batch = [views[k] for k in order[c : min(b, c + _IOV_MAX)].tolist()]
                    _pwrite_all(fd, batch, offset + (c - a) * self.row_bytes)
        finally:
            if fd is not None:
                os.close(fd)

    def _check_exists(self) -> None:
        """A missing shard is the fill value only while the array itself is still there."""
        if not (self.path / "zarr.json").is_file():
            raise FileNotFoundError(f"array {self.path} was removed while being read")

    def _shard_file(self, shard: int) -> Path:
        key = self.separator.join(["c", str(shard)] + ["0"] * self.n_trailing)
        return self.path / key

    def _read_index(self, f, file: Path, stat) -> np.ndarray:
        import google_crc32c  # noqa: PLC0415 - zarr's own dependency for the crc32c codec

        size = self.n_chunks * 16
        if stat.st_size < size + 4:
            raise ValueError(f"shard file {file} is {stat.st_size} bytes, too short for its index")
        f.seek(stat.st_size - size - 4)
        raw = f.read(size + 4)
        if google_crc32c.value(raw[:size]) != int.from_bytes(raw[size:], "little"):
            raise ValueError(f"shard file {file}: the index checksum (crc32c) does not match")
        index = np.frombuffer(raw[:size], dtype="<u8").reshape(self.n_chunks, 2)
        chunk_bytes = self.chunk_rows * self.row_bytes
        present = index[:, 0] != _MISSING
        bad = present & (
            (index[:, 1] != chunk_bytes) | (index[:, 0] + index[:, 1] > stat.st_size - size - 4)
        )
        if bad.any():
            c = int(np.flatnonzero(bad)[0])
            raise ValueError(
                f"shard file {file}: inner chunk {c} is recorded as {int(index[c, 1])} bytes at "
                f"offset {int(index[c, 0])}; expected {chunk_bytes} uncompressed bytes in the file"
            )
        return index

    def _index_of(self, shard: int, f, file: Path) -> np.ndarray:
        stat = os.fstat(f.fileno())
        stamp = (stat.st_mtime_ns, stat.st_size)
        with self._lock:
            cached = self._index.get(shard)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        index = self._read_index(f, file, stat)
        with self._lock:
            self._index[shard] = (stamp, index)
        return index

    def read(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows ``[start, stop)`` (clipped to the array, like slicing) as a new array."""
        start, stop, _ = slice(start, stop).indices(self.shape[0])
        out = np.empty((max(stop - start, 0),) + self.shape[1:], self.dtype)
        flat = out.reshape(-1).view(np.uint8)
        row = start
        while row < stop:
            shard = row // self.shard_rows
            end = min(stop, (shard + 1) * self.shard_rows)
            file = self._shard_file(shard)
            try:
                f = open(file, "rb", buffering=0)  # noqa: SIM115 - closed below
            except FileNotFoundError:  # a shard never written holds the fill value
                self._check_exists()
                out[row - start : end - start] = self.fill_value
                row = end
                continue
            with f:
                index = self._index_of(shard, f, file)
                row = self._read_runs(f, index, shard, row, end, start, flat, out)
        return out

    def take(self, rows) -> np.ndarray:
        """Rows ``rows`` (any order, repeats allowed) as a new array ``(len(rows), ...)``.

        Each shard file is opened once and every run of consecutive rows is
        read with one call: a random selection costs one read per run, not
        one pass over the shards it touches.
        """
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if rows.size and (rows.min() < 0 or rows.max() >= self.shape[0]):
            raise IndexError(f"rows must be in [0, {self.shape[0]}), got {rows.min()}..{rows.max()}")
        wanted, inverse = np.unique(rows, return_inverse=True)
        buf = np.empty((wanted.size,) + self.shape[1:], self.dtype)
        flat = buf.reshape(-1).view(np.uint8)
        shards = wanted // self.shard_rows
        breaks = np.flatnonzero((np.diff(wanted) != 1) | (np.diff(shards) != 0)) + 1
        run_starts = np.concatenate([[0], breaks]).astype(np.int64)
        run_stops = np.concatenate([breaks, [wanted.size]]).astype(np.int64)
        for shard in np.unique(shards):
            in_shard = np.flatnonzero(shards[run_starts] == shard)
            file = self._shard_file(int(shard))
            try:
                f = open(file, "rb", buffering=0)  # noqa: SIM115 - closed below
            except FileNotFoundError:  # a shard never written holds the fill value
                self._check_exists()
                for r in in_shard:
                    buf[run_starts[r] : run_stops[r]] = self.fill_value
                continue
            with f:
                index = self._index_of(int(shard), f, file)
                for r in in_shard:
                    pos0, pos1 = int(run_starts[r]), int(run_stops[r])
                    first = int(wanted[pos0])
                    # rows [first, first + n) land at buf[pos0:pos1]: offset the output origin
                    self._read_runs(f, index, int(shard), first, first + pos1 - pos0,
                                    first - pos0, flat, buf)
        if wanted.size == rows.size and np.array_equal(wanted, rows):
            return buf  # already sorted and unique
        return buf[inverse.reshape(-1)]

    def _read_runs(self, f, index, shard, row, end, start, flat, out) -> int:
        """Read rows ``[row, end)`` of one shard; consecutive inner chunks stored back to back
        in the file are read with one call."""
        base = shard * self.shard_rows
        while row < end:
            c = (row - base) // self.chunk_rows
            lo = row - base - c * self.chunk_rows  # first row wanted within chunk c
            if index[c, 0] == _MISSING:
                hi = min(end, base + (c + 1) * self.chunk_rows)
                out[row - start : hi - start] = self.fill_value
                row = hi
                continue
            offset = int(index[c, 0]) + lo * self.row_bytes
            last = c  # extend over chunks that follow in the file
            while (
                base + (last + 1) * self.chunk_rows < end
                and index[last + 1, 0] != _MISSING
                and index[last + 1, 0] == index[last, 0] + index[last, 1]
            ):
                last += 1
            hi = min(end, base + (last + 1) * self.chunk_rows)
            want = (hi - row) * self.row_bytes
            view = memoryview(flat[(row - start) * self.row_bytes :][:want])
            f.seek(offset)
            got = 0
            while got < want:
                n = f.readinto(view[got:])
                if not n:
                    raise ValueError(f"shard file {self._shard_file(shard)} ended early")
                got += n
            row = hi
        return row

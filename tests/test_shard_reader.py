"""The direct shard-file reader gives exactly what zarr reads, or refuses the layout."""

import numpy as np
import pytest
import zarr

from hetero_dask.io.shard_reader import ShardRowReader


def _array(tmp_path, n=203, box=6, chunk=4, shard=16, **kw):
    g = zarr.open_group(str(tmp_path / "s.zarr"), mode="w")
    a = g.create_array(
        "images", shape=(n, box, box), dtype="float32", chunks=(chunk, box, box),
        shards=(shard, box, box), compressors=kw.pop("compressors", None), **kw,
    )
    return a, tmp_path / "s.zarr" / "images"


def test_rows_equal_zarr_with_empty_chunks_and_missing_shards(tmp_path):
    a, path = _array(tmp_path)
    data = np.random.default_rng(0).normal(size=a.shape).astype(np.float32)
    data[20:28] = 0  # two whole inner chunks of fill value: zarr does not store them
    a[:48] = data[:48]
    a[64:] = data[64:]  # rows 48-63 (shard 3) never written: no shard file
    data[48:64] = 0
    reader = ShardRowReader.for_array(path)
    assert reader is not None
    for start, stop in [(0, 203), (0, 1), (3, 5), (15, 17), (18, 30), (40, 70), (190, None), (5, 5)]:
        got = reader.read(start, stop)
        np.testing.assert_array_equal(got, a[start:stop])
        np.testing.assert_array_equal(got, data[start:stop])
    assert reader.read(200, 400).shape == (3, 6, 6)  # clipped like slicing


def test_take_equals_zarr_for_any_rows(tmp_path):
    a, path = _array(tmp_path)
    data = np.random.default_rng(1).normal(size=a.shape).astype(np.float32)
    data[20:28] = 0  # inner chunks of fill value (not stored)
    a[:48] = data[:48]
    a[64:] = data[64:]  # shard 3 never written
    data[48:64] = 0
    reader = ShardRowReader.for_array(path)
    rng = np.random.default_rng(2)
    for rows in [rng.permutation(203), rng.integers(0, 203, 57), np.arange(10, 40), [202, 0, 0, 50],
                 []]:
        np.testing.assert_array_equal(reader.take(rows), data[np.asarray(rows, dtype=int)])
    with pytest.raises(IndexError):
        reader.take([203])


def test_array_removed_while_reading_is_an_error(tmp_path):
    """A missing shard file reads as the fill value only while the array is still there."""
    import shutil

    a, path = _array(tmp_path, n=32)
    a[:] = 1.0
    reader = ShardRowReader.for_array(path)
    shutil.rmtree(path)
    for read in (lambda: reader.read(0, 32), lambda: reader.take([3, 1])):
        with pytest.raises(FileNotFoundError, match="removed"):
            read()


@pytest.mark.parametrize("n", [203, 192, 5])
def test_written_shards_are_the_files_zarr_writes(tmp_path, n):
    """create_shard then write_rows in any order give zarr's bytes: full shards, a last
    partial inner chunk (padded) and inner chunks past the end (recorded as missing)."""
    import filecmp

    data = np.random.default_rng(4).normal(size=(n, 6, 6)).astype(np.float32)
    by_zarr, _ = _array(tmp_path / "z", n=n)
    by_zarr[:] = data
    _, path = _array(tmp_path / "w", n=n)
    writer = ShardRowReader.for_array(path)
    for shard in range(-(-n // 16)):
        writer.create_shard(shard)
    rows = np.random.default_rng(5).permutation(n)
    for part in np.array_split(rows, 3):  # three writers, random rows each
        writer.write_rows(part, data[part])
    for shard in range(-(-n // 16)):
        key = f"c/{shard}/0/0"
        assert filecmp.cmp(tmp_path / "z" / "s.zarr" / "images" / key, path / key, shallow=False)
    np.testing.assert_array_equal(zarr.open_array(str(path), mode="r")[:], data)
    with pytest.raises(ValueError, match="expected"):
        writer.write_rows([0, 1], data[:3])


def test_rewritten_shard_is_read_again(tmp_path):
    a, path = _array(tmp_path, n=32)
    a[:] = 1.0
    reader = ShardRowReader.for_array(path)
    assert float(reader.read(0, 32).sum()) == 32 * 36
    a[:16] = 2.0  # rewrites shard 0: a new index, found by the file's size/mtime
    np.testing.assert_array_equal(reader.read(0, 32), a[:32])


def test_other_layouts_are_left_to_zarr(tmp_path):
    _, path = _array(tmp_path, compressors=zarr.codecs.ZstdCodec())
    assert ShardRowReader.for_array(path) is None
    g = zarr.open_group(str(tmp_path / "plain.zarr"), mode="w")
    g.create_array("x", shape=(10, 4), dtype="float32", chunks=(5, 4), compressors=None)
    assert ShardRowReader.for_array(tmp_path / "plain.zarr" / "x") is None  # not sharded
    assert ShardRowReader.for_array(tmp_path / "nothing") is None


def test_corrupt_index_is_a_clear_error(tmp_path):
    a, path = _array(tmp_path, n=32)
    a[:] = 1.0
    file = path / "c" / "0" / "0" / "0"
    raw = bytearray(file.read_bytes())
    raw[-10] ^= 0xFF  # inside the index, before its checksum
    file.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"c/0/0/0.*checksum"):
        ShardRowReader.for_array(path).read(0, 4)

"""MRC maps/stacks and volume groups: real headers, refusals, round trips, atomic writes."""

from __future__ import annotations

import zipfile

import mrcfile
import numpy as np
import pytest

from hetero_dask.io.errors import InputError
from hetero_dask.io.mrc import read_map, read_stack, stack_info, write_map, write_stack
from hetero_dask.io.volumes import read_volume_group, write_volume_series_zip


@pytest.mark.parametrize(
    "name, box, psize",
    [("3j9g_potential_ps4_4.mrc", 64, 4.4), ("hand-vol.mrc", 64, 1.0), ("EMD-3197.map", 20, 11.4)],
)
def test_read_real_maps(shared_data, name, box, psize):
    path = shared_data / "maps" / name
    vol, p = read_map(path)
    assert vol.shape == (box, box, box) and vol.dtype == np.float32
    assert p == psize
    with mrcfile.open(path, permissive=True) as m:
        np.testing.assert_array_equal(vol, m.data)


def test_voxel_size_zero_needs_explicit_psize(shared_data):
    path = shared_data / "maps" / "clean70SRibosome_vol_65p.mrc"
    with pytest.raises(
        InputError, match=r"clean70SRibosome_vol_65p\.mrc.*voxel size is 0.*psize_A"
    ):
        read_map(path)
    vol, p = read_map(path, psize_A=5.0)
    assert vol.shape == (65, 65, 65) and p == 5.0  # odd box is fine


@pytest.mark.parametrize("name", ["EMD-3001.map", "50S-vol.mrc"])
def test_non_cubic_refused(shared_data, name):
    with pytest.raises(InputError, match=rf"{name}.*non-cubic map"):
        read_map(shared_data / "maps" / name)


def test_emd3001_reports_all_problems(shared_data):
    with pytest.raises(InputError) as err:
        read_map(shared_data / "maps" / "EMD-3001.map")
    assert "non-cubic voxels" in str(err.value) and "space group 4" in str(err.value)


def test_write_read_map_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    vol = rng.standard_normal((33, 33, 33)).astype(np.float32)
    path = tmp_path / "v.mrc"
    write_map(path, vol, 1.7, origin=(10.0, 20.0, 30.0))
    back, p = read_map(path)
    np.testing.assert_array_equal(back, vol)
    assert p == 1.7
    with mrcfile.open(path) as m:
        assert tuple(float(x) for x in m.header.origin.item()) == (10.0, 20.0, 30.0)


def test_axis_order_from_header(tmp_path):
    """A map stored with columns along z, rows along x, sections along y reads back as [z, y, x]."""
    rng = np.random.default_rng(1)
    vol = rng.standard_normal((8, 8, 8)).astype(np.float32)
    path = tmp_path / "perm.mrc"
    with mrcfile.new(path) as m:
        m.set_data(np.ascontiguousarray(np.transpose(vol, (1, 2, 0))))  # stored[s=y, r=x, c=z]
        m.header.mapc, m.header.mapr, m.header.maps = 3, 1, 2
        m.voxel_size = 2.0
    back, _ = read_map(path)
    np.testing.assert_array_equal(back, vol)


def test_stack_round_trip_and_indices(tmp_path):
    rng = np.random.default_rng(2)
    imgs = rng.standard_normal((6, 16, 16)).astype(np.float32)
    path = tmp_path / "s.mrcs"
    write_stack(path, imgs, 1.5)
    assert stack_info(path) == (6, 16, 16, 1.5)
    np.testing.assert_array_equal(read_stack(path), imgs)
    np.testing.assert_array_equal(read_stack(path, [4, 0, 4, 2]), imgs[[4, 0, 4, 2]])
    np.testing.assert_array_equal(read_stack(path, [1, 2, 3]), imgs[1:4])
    with pytest.raises(InputError, match=r"s\.mrcs.*index 6.*past the end"):
        read_stack(path, [0, 6])


@pytest.mark.parametrize("dtype", ["<f4", ">f4", "<i2", "<f2"])
def test_stack_modes_and_extended_header(tmp_path, dtype):
    """Direct reads (native float32) and memory-mapped ones (other modes) agree with mrcfile,
    with an extended header before the data."""
    rng = np.random.default_rng(3)
    imgs = (rng.standard_normal((9, 8, 8)) * 100).astype(dtype)
    path = tmp_path / "s.mrcs"
    with mrcfile.new(path) as mrc:
        mrc.set_data(imgs)
        mrc.set_image_stack()
        mrc.set_extended_header(np.arange(37, dtype=np.uint8).view("V1"))
    with mrcfile.open(path, permissive=True) as mrc:
        assert int(mrc.header.nsymbt) == 37
        truth = np.asarray(mrc.data, dtype=np.float32)
    for idx in ([8, 0, 3, 3, 4, 5, 1], [2, 3, 4], list(range(9)), []):
        np.testing.assert_array_equal(read_stack(path, idx), truth[np.asarray(idx, dtype=int)])


def test_stack_header_quirks(shared_data):
    # relion31.mrcs lacks the MAP id; empiar_10076_7.mrc has voxel size 0: both read.
    assert stack_info(shared_data / "relion" / "relion31.mrcs")[:3] == (5, 256, 256)
    assert stack_info(shared_data / "relion" / "empiar_10076_7.mrc") == (7, 320, 320, 0.0)
    assert read_stack(shared_data / "relion" / "empiar_10076_7.mrc", [6]).shape == (1, 320, 320)


def test_truncated_stack_detected(tmp_path):
    path = tmp_path / "t.mrcs"
    write_stack(path, np.zeros((4, 8, 8), np.float32), 1.0)
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    with pytest.raises(InputError, match=r"t\.mrcs.*truncated"):
        stack_info(path)


def test_interrupted_write_keeps_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "v.mrc"
    old = np.ones((8, 8, 8), np.float32)
    write_map(path, old, 1.0)

    def fail(self):
        raise RuntimeError("disk full")

    # The data are already written to the temporary file when the header update fails.
    monkeypatch.setattr(mrcfile.mrcobject.MrcObject, "update_header_stats", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        write_map(path, np.zeros((8, 8, 8), np.float32), 1.0)
    monkeypatch.undo()
    np.testing.assert_array_equal(read_map(path)[0], old)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.mrc"]


def test_volume_groups(tmp_path):
    rng = np.random.default_rng(3)
    vols = rng.standard_normal((3, 10, 10, 10)).astype(np.float32)
    z = tmp_path / "series.zip"
    write_volume_series_zip(z, vols, 2.5, ["a", "b", "c"])
    assert zipfile.ZipFile(z).namelist() == ["a.mrc", "b.mrc", "c.mrc"]
    back, p, names = read_volume_group(z)
    np.testing.assert_array_equal(back, vols)
    assert p == 2.5 and names == ["a", "b", "c"]
    d = tmp_path / "dir"
    for k, v in enumerate(vols):
        write_map(d / f"class_{k}.mrc", v, 2.5)
    back, _, names = read_volume_group(d)
    np.testing.assert_array_equal(back, vols)
    back, _, _ = read_volume_group([d / "class_2.mrc", d / "class_0.mrc"])
    np.testing.assert_array_equal(back, vols[[2, 0]])
    write_map(d / "z_other.mrc", np.zeros((12, 12, 12), np.float32), 2.5)
    with pytest.raises(InputError, match=r"z_other\.mrc.*box 12"):
        read_volume_group(d)

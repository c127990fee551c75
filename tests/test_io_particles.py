"""ParticleSet: images equal the stacks (sign, header quirks), optics-group resampling, bad input."""

from __future__ import annotations

import shutil

import mrcfile
import numpy as np
import pytest

from hetero_dask.core.fourier import fourier_resize
from hetero_dask.io.convert import cs_to_star
from hetero_dask.io.cs import read_cs, with_fields, write_cs
from hetero_dask.io.errors import InputError
from hetero_dask.io.mrc import write_stack
from hetero_dask.io.particles import load_particles
from hetero_dask.io.star import read_star, write_star


def stack_data(path):
    with mrcfile.open(path, permissive=True) as m:
        return np.array(m.data, dtype=np.float32)


@pytest.mark.parametrize(
    "name, stack, box, psize",
    [
        ("relion31.star", "relion31.mrcs", 256, 2.806),  # no MAP id; header voxel 1.0 ignored
        ("empiar_10076_7.star", "empiar_10076_7.mrc", 320, 1.3099979),  # header voxel 0
        ("sample_particles_relion31.star", "sample.mrcs", 200, 1.4),  # two optics groups
    ],
)
def test_images_equal_stack(shared_data, name, stack, box, psize):
    ps = load_particles(shared_data / "relion" / name)
    assert (ps.n, ps.box) == (len(stack_data(shared_data / "relion" / stack)), box)
    assert ps.psize_A == pytest.approx(psize, rel=1e-6)
    rows = np.arange(ps.n)[::-1]
    data = stack_data(shared_data / "relion" / stack)
    np.testing.assert_array_equal(ps.read_images(rows), data[ps.table["blob/idx"][rows]])


def test_cs_sign_applied_and_stack_dir(shared_data):
    ps = load_particles(
        shared_data / "cryosparc" / "empiar_10076_7.cs", stack_dir=shared_data / "relion"
    )
    data = stack_data(shared_data / "relion" / "empiar_10076_7.mrc")
    assert (ps.table["blob/sign"] == -1).all()
    np.testing.assert_array_equal(ps.read_images([3, 0]), -data[[3, 0]])
    ctf = ps.ctf([0, 1])
    np.testing.assert_allclose(ctf.df1_A, [15301.1, 15303.0], rtol=1e-6)


def test_project_relative_paths(shared_data, tmp_path):
    project = tmp_path / "P1"
    (project / "J1" / "imported").mkdir(parents=True)
    shutil.copy(
        shared_data / "relion" / "empiar_10076_7.mrc", project / "J1" / "imported" / "e.mrc"
    )
    arr = read_cs(shared_data / "cryosparc" / "empiar_10076_7.cs")
    arr = with_fields(arr, {"blob/path": np.full(len(arr), b">J1/imported/e.mrc")})
    write_cs(tmp_path / "p.cs", arr)
    with pytest.raises(InputError, match=r"p\.cs: row 0: field 'blob/path.*CryoSPARC project folder"):
        load_particles(tmp_path / "p.cs")
    ps = load_particles(tmp_path / "p.cs", stack_dir=project)
    assert ps.read_images([6]).shape == (1, 320, 320)


def _copy_star(shared_data, tmp_path, edit=None, stack=True):
    blocks = read_star(shared_data / "relion" / "relion31.star")
    if edit:
        edit(blocks)
    write_star(tmp_path / "p.star", blocks)
    if stack:
        shutil.copy(shared_data / "relion" / "relion31.mrcs", tmp_path / "relion31.mrcs")
    return tmp_path / "p.star"


def test_missing_stack(shared_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = _copy_star(shared_data, tmp_path, stack=False)
    with pytest.raises(
        InputError, match=r"p\.star: row 0: field 'blob/path.*'relion31.mrcs' not found"
    ):
        load_particles(path)


def test_index_past_end(shared_data, tmp_path):
    def edit(b):
        b["particles"].loc[3, "rlnImageName"] = "000009@relion31.mrcs"

    with pytest.raises(InputError, match=r"p\.star: row 3: .*image 9 .*holds 5 images"):
        load_particles(_copy_star(shared_data, tmp_path, edit))


def test_box_mismatch(shared_data, tmp_path):
    def edit(b):
        b["optics"]["rlnImageSize"] = 128

    with pytest.raises(InputError, match=r"p\.star: row 0: .*box 128 .*256x256"):
        load_particles(_copy_star(shared_data, tmp_path, edit))


def test_nan_pixels(shared_data, tmp_path):
    path = _copy_star(shared_data, tmp_path)
    data = stack_data(tmp_path / "relion31.mrcs")
    data[2, 10, 10] = np.nan
    write_stack(tmp_path / "relion31.mrcs", data, 2.806)
    ps = load_particles(path)
    ps.read_images([0, 1])
    with pytest.raises(InputError, match=r"relion31\.mrcs: row 2: NaN/inf pixels in image 3"):
        ps.read_images([0, 2])


def test_unknown_aberrations_refused(shared_data, tmp_path):
    def edit(b):
        b["optics"]["rlnBeamTiltX"] = 0.3

    with pytest.raises(
        InputError, match=r"p\.star: field 'rlnBeamTiltX'.*allow_ignore_aberrations"
    ):
        load_particles(_copy_star(shared_data, tmp_path, edit))


def test_psize_zero_cs_needs_psize(shared_data, tmp_path):
    arr = read_cs(shared_data / "cryosparc" / "empiar_10076_7.cs")
    write_cs(tmp_path / "z.cs", with_fields(arr, {"blob/psize_A": np.float32(0)}))
    with pytest.raises(InputError, match=r"z\.cs: row 0: field 'blob/psize_A': pixel size is 0"):
        load_particles(tmp_path / "z.cs", stack_dir=shared_data / "relion")
    ps = load_particles(tmp_path / "z.cs", stack_dir=shared_data / "relion", psize_A=1.31)
    assert ps.psize_A == 1.31


def test_optics_groups_resampled_to_first_grid(tmp_path):
    """Group 2 holds the same band-limited images at box 32 / 2 A; read back at box 64 / 1 A they match."""
    rng = np.random.default_rng(0)
    imgs = fourier_resize(
        rng.standard_normal((4, 24, 24)).astype(np.float32), 64, ndim=2
    )  # band-limited
    write_stack(tmp_path / "a.mrcs", imgs, 1.0)
    write_stack(tmp_path / "b.mrcs", fourier_resize(imgs, 32, ndim=2), 2.0)
    n = 8
    table = np.zeros(n, dtype=[("uid", "<u8")])
    table = with_fields(
        table,
        {
            "blob/path": np.array([b"a.mrcs"] * 4 + [b"b.mrcs"] * 4),
            "blob/idx": np.tile(np.arange(4, dtype=np.uint32), 2),
            "blob/shape": np.repeat(np.array([[64, 64], [32, 32]], np.uint32), 4, axis=0),
            "blob/psize_A": np.repeat(np.array([1.0, 2.0], np.float32), 4),
            "blob/sign": np.float32(1),
            "ctf/exp_group_id": np.repeat(np.array([0, 1], np.uint32), 4),
            **{
                f: np.float32(v)
                for f, v in [("ctf/df1_A", 1e4), ("ctf/df2_A", 1e4), ("ctf/df_angle_rad", 0)]
            },
            **{
                f: np.float32(v)
                for f, v in [("ctf/accel_kv", 300), ("ctf/cs_mm", 2.7), ("ctf/amp_contrast", 0.1)]
            },
        },
    )
    write_star(tmp_path / "two.star", cs_to_star(table))
    ps = load_particles(tmp_path / "two.star")
    assert (ps.box, ps.psize_A) == (64, 1.0)
    got = ps.read_images(np.arange(n))
    np.testing.assert_allclose(got[4:], imgs, atol=1e-4 * np.abs(imgs).max())
    np.testing.assert_array_equal(got[:4], imgs)

"""CryoSPARC .cs and RELION .star: every shared file read or refused, lossless round trips."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest

from hetero_dask.core.rotations import euler_to_matrix, pose_to_matrix
from hetero_dask.io.convert import cs_to_star, parse_image_names, star_to_cs
from hetero_dask.io.cs import (
    SLOT_FIELDS,
    class_posteriors,
    detect_class_layouts,
    drop_fields,
    get_class_alignments,
    multi_class_fields,
    read_cs,
    resolve_blob_path,
    slot_fields,
    with_fields,
    write_cs,
)
from hetero_dask.io.errors import InputError
from hetero_dask.io.star import read_star, write_star

CS_FILES = [
    "cryosparc_J2_particles_exported.cs",
    "cryosparc_P12_J24_001_particles.cs",
    "empiar_10076_7.cs",
]
# STAR particle files and the options they need (documented refusals tested below).
STAR_FILES = {
    "relion31.star": {},
    "empiar_10076_7.star": {},
    "sample_particles_relion31.star": {},
    "sample_particles_relion30.star": {},
    "relion31.6opticsgroups.star": {"allow_ignore_aberrations": True},
    "relion5.star": {"allow_ignore_aberrations": True},
    "FinalRefinement-OriginalParticles-PfCRT.star": {"ctf_defaults": {"rlnAmplitudeContrast": 0.1}},
}


def assert_tables_equal(a, b):
    """Every field of ``a`` is in ``b`` with the same dtype and values (poses as rotations)."""
    for f in a.dtype.names:
        assert f in b.dtype.names, f
        assert a.dtype[f] == b.dtype[f], (f, a.dtype[f], b.dtype[f])
        x, y = a[f], b[f]
        if f.endswith("/pose") and x.shape[1:] == (3,):
            np.testing.assert_allclose(
                pose_to_matrix(x.astype(float)), pose_to_matrix(y.astype(float)), atol=2e-6
            )
        elif x.dtype.kind == "f":
            np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-5, err_msg=f)
        else:
            np.testing.assert_array_equal(x, y, err_msg=f)


# ---------------------------------------------------------------- .cs files


@pytest.mark.parametrize("name", CS_FILES + ["cryosparc_tools_4k_dataset_schema.cs"])
def test_read_every_cs(shared_data, name):
    arr = read_cs(shared_data / "cryosparc" / name)
    ref = np.load(shared_data / "cryosparc" / name)
    assert arr.dtype == ref.dtype and len(arr) == len(ref)


def test_schema_layouts(shared_data):
    arr = read_cs(shared_data / "cryosparc" / "cryosparc_tools_4k_dataset_schema.cs")
    assert detect_class_layouts(arr) == {"alignments_class": 3}
    slot = get_class_alignments(arr, "alignments_class", 2)
    assert set(slot) == set(SLOT_FIELDS)
    assert class_posteriors(arr).shape == (0, 3)


def test_per_class_layouts_written_and_read_back(tmp_path):
    rng = np.random.default_rng(0)
    n, K = 5, 3
    post = rng.dirichlet(np.ones(K), n).astype(np.float32)
    pose = rng.standard_normal((n, K, 3)).astype(np.float32)
    shift = rng.standard_normal((n, K, 2)).astype(np.float32)
    t = with_fields(np.zeros(n, dtype=[("uid", "<u8")]), {"uid": np.arange(n, dtype=np.uint64) + 7})
    for k in range(K):
        t = with_fields(
            t,
            slot_fields(
                f"alignments_class_{k}",
                n,
                pose=pose[:, k],
                shift=shift[:, k],
                class_posterior=post[:, k],
                class_=k,
            ),
        )
    t = with_fields(t, multi_class_fields(pose, shift, post, split=np.arange(n) % 2))
    path = tmp_path / "classes.cs"
    write_cs(path, t)
    back = read_cs(path)
    assert detect_class_layouts(back) == {"alignments_class": K, "alignments3D_multi": K}
    np.testing.assert_array_equal(class_posteriors(back, "alignments_class"), post)
    np.testing.assert_array_equal(class_posteriors(back, "alignments3D_multi"), post)
    a = get_class_alignments(back, "alignments_class", 1)
    m = get_class_alignments(back, "alignments3D_multi", 1)
    np.testing.assert_array_equal(a["pose"], pose[:, 1])
    np.testing.assert_array_equal(m["pose"], pose[:, 1])
    np.testing.assert_array_equal(m["shift"], shift[:, 1])
    assert back.dtype["alignments_class_1/class"] == np.uint32 and (a["class"] == 1).all()
    np.testing.assert_array_equal(m["split"], np.arange(n) % 2)
    assert drop_fields(back, ["alignments_class_0/"]).dtype.names[-1] == "alignments3D_multi/split"
    assert not any(
        f.startswith("alignments_class_0/")
        for f in drop_fields(back, ["alignments_class_0/"]).dtype.names
    )


def test_written_cs_loads_in_cryosparc_tools(shared_data, tmp_path):
    from cryosparc.dataset import Dataset

    arr = read_cs(shared_data / "cryosparc" / "cryosparc_P12_J24_001_particles.cs")
    n = len(arr)
    post = np.full((n, 2), 0.5, np.float32)
    arr = with_fields(arr, multi_class_fields(np.zeros((n, 2, 3)), np.zeros((n, 2, 2)), post))
    arr = with_fields(arr, slot_fields("alignments_class_0", n, class_posterior=0.5))
    path = tmp_path / "out.cs"
    write_cs(path, arr)
    ds = Dataset.load(path)
    assert len(ds) == n
    np.testing.assert_array_equal(ds["uid"], arr["uid"])
    np.testing.assert_array_equal(ds["alignments3D/pose"], arr["alignments3D/pose"])
    np.testing.assert_array_equal(ds["alignments3D_multi/class_posterior"], post)
    assert ds["blob/path"][0] == arr["blob/path"][0].decode()


def test_truncated_and_pickled_cs_refused(shared_data, tmp_path):
    data = (shared_data / "cryosparc" / "cryosparc_P12_J24_001_particles.cs").read_bytes()
    bad = tmp_path / "truncated.cs"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=r"truncated\.cs.*truncated or corrupt"):
        read_cs(bad)
    obj = tmp_path / "pickled.cs"
    np.save(
        open(obj, "wb"), np.array([(1, "x")], dtype=[("uid", "<u8"), ("s", "O")]), allow_pickle=True
    )
    with pytest.raises(InputError, match=r"pickled\.cs.*Python objects"):
        read_cs(obj)
    with pytest.raises(InputError, match="not found"):
        read_cs(tmp_path / "missing.cs")


def test_interrupted_cs_write_keeps_previous_file(shared_data, tmp_path, monkeypatch):
    arr = read_cs(shared_data / "cryosparc" / "empiar_10076_7.cs")
    path = tmp_path / "p.cs"
    write_cs(path, arr)

    def fail(f, a, allow_pickle=False):
        f.write(b"\x93NUMPY partial")
        raise OSError("disk full")

    monkeypatch.setattr(np, "save", fail)
    with pytest.raises(OSError, match="disk full"):
        write_cs(path, arr[:3])
    monkeypatch.undo()
    assert_tables_equal(arr, read_cs(path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.cs"]


# ---------------------------------------------------------------- blob paths


def test_blob_path_resolution(tmp_path, monkeypatch):
    """RELION: absolute as written, relative to the working directory then the file's folder;
    CryoSPARC: '>' and project paths against --stack-dir; last, the name in --stack-dir."""
    project = tmp_path / "proj"
    (project / "J1" / "imported").mkdir(parents=True)
    stack = project / "J1" / "imported" / "s.mrcs"
    stack.write_bytes(b"x")
    (tmp_path / "secret.mrcs").write_bytes(b"x")
    monkeypatch.chdir(tmp_path / "proj")
    assert resolve_blob_path(b">J1/imported/s.mrcs", stack_dir=project) == stack
    with pytest.raises(InputError, match="relative to the CryoSPARC project folder.*--stack-dir"):
        resolve_blob_path(b">J1/imported/s.mrcs")
    assert resolve_blob_path("J1/imported/s.mrcs") == stack  # the working directory first
    assert resolve_blob_path("imported/s.mrcs", stack_dir=project / "J1") == stack
    assert resolve_blob_path("s.mrcs", source=stack.parent / "p.star") == stack
    assert resolve_blob_path(b">../secret.mrcs", stack_dir=project) == tmp_path / "secret.mrcs"
    assert resolve_blob_path(str(tmp_path / "secret.mrcs")) == tmp_path / "secret.mrcs"
    assert resolve_blob_path("/moved/away/s.mrcs", stack_dir=project / "J1" / "imported") == stack
    with pytest.raises(InputError, match="'J1/nothing.mrcs' not found; tried"):
        resolve_blob_path("J1/nothing.mrcs", stack_dir=project)


def test_image_names_any_digits():
    paths, idx = parse_image_names(
        ["1@a.mrcs", "0000012@b/c.mrcs", "000003@x@y.mrcs", "single.mrc"]
    )
    assert list(paths) == ["a.mrcs", "b/c.mrcs", "x@y.mrcs", "single.mrc"]
    assert list(idx) == [0, 11, 2, 0]
    with pytest.raises(InputError, match="row 1.*rlnImageName.*'0@b.mrcs'"):
        parse_image_names(["1@a.mrcs", "0@b.mrcs"], "f.star")


# ---------------------------------------------------------------- .star files


def test_read_star_every_file(shared_data):
    for path in sorted((shared_data / "relion").glob("*.star")):
        blocks = read_star(path)
        assert blocks, path
    fsc = read_star(shared_data / "relion" / "postprocess.star")["fsc"]
    assert len(fsc) == 49


@pytest.mark.parametrize(
    "name, pattern",
    [
        ("postprocess.star", "no particle table"),
        ("run_it025_optimiser_3D.star", "no particle table"),
        ("relion31.6opticsgroups.star", "rlnBeamTiltX.*allow_ignore_aberrations=True"),
        ("relion5.star", "higher-order optics.*allow_ignore_aberrations=True"),
        (
            "FinalRefinement-OriginalParticles-PfCRT.star",
            "rlnAmplitudeContrast.*missing CTF column",
        ),
    ],
)
def test_documented_star_refusals(shared_data, name, pattern):
    path = shared_data / "relion" / name
    with pytest.raises(InputError, match=rf"{name}.*{pattern}"):
        star_to_cs(read_star(path), path)


def test_premultiplied_refused(shared_data):
    blocks = read_star(shared_data / "relion" / "relion31.star")
    blocks["optics"]["rlnCtfDataAreCtfPremultiplied"] = 1
    with pytest.raises(InputError, match="rlnCtfDataAreCtfPremultiplied.*CTF-premultiplied"):
        star_to_cs(blocks, "x.star")


def test_cs_aberrations_refused(shared_data):
    from hetero_dask.io.convert import check_cs_optics

    arr = read_cs(shared_data / "cryosparc" / "empiar_10076_7.cs")
    check_cs_optics(arr, "ok.cs")
    arr["ctf/tetra_A"][2, 1] = 0.5
    with pytest.raises(InputError, match=r"bad\.cs: field 'ctf/tetra_A'.*allow_ignore_aberrations"):
        check_cs_optics(arr, "bad.cs")


def test_relion30_and_cs_of_same_particles_agree(shared_data):
    """empiar_10076_7.star (RELION 3.0) and empiar_10076_7.cs (CryoSPARC import) describe the same particles."""
    t = star_to_cs(read_star(shared_data / "relion" / "empiar_10076_7.star"), "star")
    c = read_cs(shared_data / "cryosparc" / "empiar_10076_7.cs")
    for f in (
        "blob/path",
        "blob/idx",
        "ctf/df1_A",
        "ctf/df2_A",
        "ctf/df_angle_rad",
        "ctf/accel_kv",
        "ctf/cs_mm",
    ):
        if t[f].dtype.kind == "S":
            np.testing.assert_array_equal(t[f], c[f])
        else:
            np.testing.assert_allclose(t[f], c[f], rtol=1e-6, err_msg=f)
    np.testing.assert_allclose(t["blob/psize_A"], c["blob/psize_A"], rtol=1e-6)  # 5 um / 38168
    np.testing.assert_allclose(t["ctf/amp_contrast"], c["ctf/amp_contrast"])
    # The sign: a STAR file records none and reads +1 (RELION extractions hold protein
    # bright); this stack holds it dark, as the .cs's -1 says and the data confirm
    # (tests/test_contrast.py): such a .star needs --flip-contrast.
    assert (t["blob/sign"] == 1).all() and (c["blob/sign"] == -1).all()


def test_star_conventions(shared_data):
    """Euler -> pose, Angstrom origins -> pixels, 1-based -> 0-based, per-group optics."""
    blocks = read_star(shared_data / "relion" / "sample_particles_relion31.star")
    p = blocks["particles"]
    t = star_to_cs(blocks, "s.star")
    A = euler_to_matrix(
        p["rlnAngleRot"].to_numpy(), p["rlnAngleTilt"].to_numpy(), p["rlnAnglePsi"].to_numpy()
    )
    np.testing.assert_allclose(
        pose_to_matrix(t["alignments3D/pose"].astype(float)), A.swapaxes(-1, -2), atol=1e-6
    )
    np.testing.assert_allclose(t["alignments3D/shift"][:, 0], p["rlnOriginXAngst"] / 1.4, rtol=1e-6)
    np.testing.assert_array_equal(t["alignments3D/split"], p["rlnRandomSubset"] - 1)
    np.testing.assert_array_equal(t["alignments3D/class"], p["rlnClassNumber"] - 1)
    np.testing.assert_array_equal(t["ctf/exp_group_id"], p["rlnOpticsGroup"] - 1)
    kv = np.where(p["rlnOpticsGroup"] == 1, 300.0, 200.0)
    np.testing.assert_array_equal(t["ctf/accel_kv"], kv)
    np.testing.assert_allclose(t["ctf/df_angle_rad"], np.deg2rad(p["rlnDefocusAngle"]), rtol=1e-6)
    assert (t["blob/sign"] == 1).all()
    assert t["rlnOptics/rlnMtfFileName"][0] == b"mtf_k2_200kV.star"
    # RELION 3.0 origins are in pixels already.
    t30 = star_to_cs(
        read_star(shared_data / "relion" / "sample_particles_relion30.star"), "s30.star"
    )
    p30 = read_star(shared_data / "relion" / "sample_particles_relion30.star")["model_class_1"]
    np.testing.assert_allclose(t30["alignments3D/shift"][:, 1], p30["rlnOriginY"], rtol=1e-6)


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("name", CS_FILES)
def test_cs_star_cs_round_trip(shared_data, tmp_path, name):
    arr = read_cs(shared_data / "cryosparc" / name)
    star = tmp_path / "p.star"
    write_star(star, cs_to_star(arr, name))
    back = star_to_cs(read_star(star), star)
    assert_tables_equal(arr, back)
    assert back.dtype.names[: len(arr.dtype.names)] == arr.dtype.names


def test_schema_cs_to_star_refused(shared_data):
    arr = read_cs(shared_data / "cryosparc" / "cryosparc_tools_4k_dataset_schema.cs")
    with pytest.raises(InputError, match="no blob/path field.*rlnImageName"):
        cs_to_star(arr, "schema.cs")


def _psize(table: pd.DataFrame) -> np.ndarray:
    if "rlnImagePixelSize" in table:
        return table["rlnImagePixelSize"].to_numpy(float)
    return (
        table["rlnDetectorPixelSize"].to_numpy(float)
        * 1e4
        / table["rlnMagnification"].to_numpy(float)
    )


@pytest.mark.parametrize("name", sorted(STAR_FILES))
def test_star_cs_star_round_trip(shared_data, tmp_path, name):
    """.star -> .cs -> .star keeps every column's value (same label, or its RELION 3.1 equivalent)."""
    opts = STAR_FILES[name]
    src = shared_data / "relion" / name
    blocks = read_star(src)
    table = star_to_cs(blocks, src, **opts)
    write_cs(tmp_path / "p.cs", table)
    write_star(tmp_path / "p.star", cs_to_star(read_cs(tmp_path / "p.cs")))
    out_blocks = read_star(tmp_path / "p.star")
    assert_tables_equal(table, star_to_cs(out_blocks, "p.star", **opts))

    # Compare with the original file column by column (optics merged onto particles).
    def merged(b):
        opt, part = (
            b.get("optics"),
            next(v for k, v in b.items() if isinstance(v, pd.DataFrame) and "rlnImageName" in v),
        )
        if opt is None:
            return part.reset_index(drop=True)
        return part.reset_index(drop=True).join(
            opt.set_index("rlnOpticsGroup"), on="rlnOpticsGroup"
        )

    a, b = merged(blocks), merged(out_blocks)
    pa, ia = parse_image_names(a["rlnImageName"])
    pb, ib = parse_image_names(b["rlnImageName"])
    np.testing.assert_array_equal(pa, pb)
    np.testing.assert_array_equal(ia, ib)
    np.testing.assert_allclose(_psize(a), b["rlnImagePixelSize"], rtol=1e-6)
    if "rlnAngleRot" in a:
        Ra = euler_to_matrix(
            *(a[c].to_numpy(float) for c in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"))
        )
        Rb = euler_to_matrix(
            *(b[c].to_numpy(float) for c in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"))
        )
        np.testing.assert_allclose(Ra, Rb, atol=2e-6)
    for xy in "XY":
        if f"rlnOrigin{xy}" in a:  # RELION 3.0 pixels -> 3.1 Angstrom
            np.testing.assert_allclose(
                a[f"rlnOrigin{xy}"] * _psize(a), b[f"rlnOrigin{xy}Angst"], atol=1e-4
            )
    skip = {
        "rlnImageName",
        "rlnAngleRot",
        "rlnAngleTilt",
        "rlnAnglePsi",
        "rlnOriginX",
        "rlnOriginY",
    }
    skip |= {"rlnMagnification", "rlnDetectorPixelSize", "rlnImagePixelSize"}
    for col in a.columns:
        if col in skip:
            continue
        assert col in b.columns, col
        if a[col].dtype.kind in "if":
            np.testing.assert_allclose(
                a[col].to_numpy(float), b[col].to_numpy(float), rtol=1e-6, atol=1e-5, err_msg=col
            )
        else:
            np.testing.assert_array_equal(a[col].astype(str), b[col].astype(str), err_msg=col)


def test_optics_groups_kept(shared_data, tmp_path):
    src = shared_data / "relion" / "relion31.6opticsgroups.star"
    blocks = read_star(src)
    table = star_to_cs(blocks, src, allow_ignore_aberrations=True)
    out = cs_to_star(table)
    o = out["optics"].set_index("rlnOpticsGroup").sort_index()
    i = blocks["optics"].set_index("rlnOpticsGroup").sort_index()
    assert list(o["rlnOpticsGroupName"]) == list(i["rlnOpticsGroupName"])
    np.testing.assert_allclose(o["rlnImagePixelSize"], i["rlnImagePixelSize"])
    assert list(o["rlnOddZernike"]) == list(i["rlnOddZernike"])


@pytest.mark.relion
def test_relion_reads_written_star(shared_data, tmp_path):
    """RELION 3.1 parses our STAR (keeping the cs/ pass-through labels) with the same particles."""
    arr = read_cs(shared_data / "cryosparc" / "cryosparc_P12_J24_001_particles.cs")
    write_star(tmp_path / "p.star", cs_to_star(arr))
    subprocess.run(
        [shutil.which("relion_star_handler"), "--i", "p.star", "--o", "r.star"],
        cwd=tmp_path,
        check=True,
        capture_output=True,
    )
    blocks = read_star(tmp_path / "r.star")
    assert "cs/uid" in blocks["particles"]  # unknown labels maintained
    back = star_to_cs(blocks, "r.star")  # RELION drops our schema block: mapped fields only
    for f in (
        "blob/idx",
        "blob/shape",
        "ctf/df1_A",
        "ctf/df_angle_rad",
        "ctf/accel_kv",
        "alignments3D/shift",
    ):
        np.testing.assert_allclose(arr[f], back[f], rtol=1e-6, atol=1e-5, err_msg=f)
    np.testing.assert_array_equal(arr["blob/path"], back["blob/path"])
    np.testing.assert_array_equal(arr["alignments3D/split"], back["alignments3D/split"])
    R = pose_to_matrix(arr["alignments3D/pose"].astype(float))
    np.testing.assert_allclose(
        R, pose_to_matrix(back["alignments3D/pose"].astype(float)), atol=2e-6
    )


def test_empty_table_round_trips(shared_data, tmp_path):
    """An empty class's subset (0 rows) is written as .star and read back with the same fields."""
    arr = read_cs(shared_data / "cryosparc" / "cryosparc_P12_J24_001_particles.cs")[:0]
    star = tmp_path / "empty.star"
    write_star(star, cs_to_star(arr, "empty"))
    back = star_to_cs(read_star(star), star)
    assert len(back) == 0
    assert back.dtype.names[: len(arr.dtype.names)] == arr.dtype.names


def test_star_writer_round_trips_through_starfile(tmp_path):
    """Our STAR writer and starfile's agree: what starfile reads back from ours equals what it
    reads back from its own file (floats to 10 digits, NaN, ints, quoted strings, pair blocks)."""
    import starfile

    rng = np.random.default_rng(3)
    df = pd.DataFrame(
        {
            "rlnImageName": [f"{i:06d}@stack one.mrcs" if i % 3 == 0 else f"{i:06d}@s.mrcs" for i in range(50)],
            "rlnDefocusU": rng.uniform(5000, 30000, 50),
            "rlnAngleRot": np.where(np.arange(50) % 7 == 0, np.nan, rng.uniform(-180, 180, 50)),
            "rlnClassNumber": rng.integers(1, 4, 50),
            "rlnGroupName": ["" if i == 4 else "g1" for i in range(50)],
        }
    )
    blocks = {"general": {"rlnFinalResolution": 3.25, "rlnJobName": "a b"}, "particles": df}
    write_star(tmp_path / "ours.star", blocks)
    starfile.write(blocks, tmp_path / "theirs.star", float_format="%.10g")
    ours, theirs = read_star(tmp_path / "ours.star"), read_star(tmp_path / "theirs.star")
    assert ours["general"] == theirs["general"]
    pd.testing.assert_frame_equal(ours["particles"], theirs["particles"])
    back = ours["particles"]
    assert back["rlnImageName"].tolist() == df["rlnImageName"].tolist()
    np.testing.assert_allclose(back["rlnDefocusU"], df["rlnDefocusU"], rtol=1e-9)
    assert back["rlnAngleRot"].isna().tolist() == df["rlnAngleRot"].isna().tolist()
    assert back["rlnClassNumber"].tolist() == df["rlnClassNumber"].tolist()
    # Loops are written a block of rows at a time (bounded memory): any block size gives the
    # same file, including blocks that do not divide the row count.
    for rows in (1, 7, 50):
        write_star(tmp_path / f"b{rows}.star", blocks, rows_per_block=rows)
        assert (tmp_path / f"b{rows}.star").read_bytes() == (tmp_path / "ours.star").read_bytes()


def test_star_writer_prints_float32_as_its_shortest_decimal(tmp_path):
    """A float32 column (cs passthrough fields) is written as the shortest decimal that reads
    back to the same float32 (2.806, not 2.80599999), NaN as <NA>."""
    import pandas as pd

    vals = np.array([2.806, 1e-5, 12345.678, np.nan, 2.806], np.float32)
    write_star(tmp_path / "f.star", {"particles": pd.DataFrame({"rlnImageName": ["1@a.mrcs"] * 5, "x": vals})})
    text = (tmp_path / "f.star").read_text()
    assert "\t2.806\n" in text and "2.80599" not in text
    back = read_star(tmp_path / "f.star")["particles"]["x"].to_numpy()
    assert np.isnan(back[3])
    np.testing.assert_array_equal(back[[0, 1, 2, 4]].astype(np.float32), vals[[0, 1, 2, 4]])
    assert back[0] == 2.806

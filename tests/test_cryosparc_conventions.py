"""CryoSPARC conventions checked against programs other than ours.

Oracles: ``cryosparc-tools`` (``cryosparc.dataset.Dataset``, ``cryosparc.star``)
reading what we write and writing what we read; the per-class slot schema of a
heterogeneous-refinement output written by CryoSPARC itself
(``cryosparc_tools_4k_dataset_schema.cs``); and the same 7 EMPIAR-10076
particles as CryoSPARC's import (``.cs``) and as a RELION 3.0 STAR file wrote
them (CTF, image names, pixel size, contrast sign; the pair holds no poses or
shifts, whose conventions are checked against ``relion_project`` in
tests/test_projection.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from hetero_dask.io.convert import cs_to_star
from hetero_dask.io.cs import (
    class_posteriors,
    detect_class_layouts,
    get_class_alignments,
    read_cs,
    write_cs,
)
from hetero_dask.io.particles import load_particles
from hetero_dask.io.star import write_star
from hetero_dask.jobs.outputs import particle_table

cst = pytest.importorskip("cryosparc.dataset", reason="cryosparc-tools is in the test extras")
DATA = Path(__file__).parent / "data"
K = 3


def _job_table():
    """The particle table a job writes for the 7 EMPIAR particles and K = 3 classes."""
    table = read_cs(DATA / "cryosparc" / "empiar_10076_7.cs")
    rng = np.random.default_rng(0)
    n = len(table)
    post = rng.dirichlet(np.ones(K), n)
    return particle_table(table, post, rng.normal(size=(n, K, 3)), rng.normal(size=(n, K, 2)), 1.31)


def _descr(fields) -> dict:
    return {f[0]: (np.dtype(f[1]).str, tuple(f[2]) if len(f) > 2 else ()) for f in fields}


def test_job_output_loads_in_cryosparc_tools_with_cryosparcs_slot_schema(tmp_path):
    table = _job_table()
    write_cs(tmp_path / "particles.cs", table)
    ds = cst.Dataset.load(tmp_path / "particles.cs")
    ours = _descr(table.dtype.descr)
    theirs = _descr(ds.descr())
    assert set(ours) == set(theirs)
    for name, (dtype, shape) in ours.items():
        if np.dtype(dtype).kind == "S":  # cryosparc-tools holds strings as Python objects
            assert [v.decode() for v in table[name]] == list(ds[name])
            continue
        assert theirs[name] == (dtype, shape), name
        np.testing.assert_array_equal(np.asarray(ds[name]), table[name], err_msg=name)
    # Every per-class and best-class field has the name, dtype and shape CryoSPARC gives it.
    cryosparc = _descr(cst.Dataset.load(DATA / "cryosparc" / "cryosparc_tools_4k_dataset_schema.cs").descr())
    slots = [f for f in cryosparc if f.startswith(("alignments3D/", "alignments_class_"))]
    assert len(slots) == 4 * 18
    for name in slots:
        assert ours[name] == cryosparc[name], name


def test_dataset_written_by_cryosparc_tools_reads_back(tmp_path):
    schema = cst.Dataset.load(DATA / "cryosparc" / "cryosparc_tools_4k_dataset_schema.cs").descr()
    n = 11
    ds = cst.Dataset.allocate(n, [f for f in schema if f[0] != "uid"])
    rng = np.random.default_rng(1)
    post = rng.dirichlet(np.ones(K), n).astype(np.float32)
    for k in range(K):
        ds[f"alignments_class_{k}/class_posterior"] = post[:, k]
        ds[f"alignments_class_{k}/pose"] = rng.normal(size=(n, 3)).astype(np.float32)
        ds[f"alignments_class_{k}/class"] = k
    ds["location/micrograph_path"] = [f"mic_{i}.mrc" for i in range(n)]
    ds.save(tmp_path / "theirs.cs")
    ours = read_cs(tmp_path / "theirs.cs")
    assert _descr(ours.dtype.descr).keys() == _descr(ds.descr()).keys()
    np.testing.assert_array_equal(ours["uid"], ds["uid"])
    assert detect_class_layouts(ours) == {"alignments_class": K}
    np.testing.assert_array_equal(class_posteriors(ours, "alignments_class"), post)
    slot = get_class_alignments(ours, "alignments_class", 2)
    np.testing.assert_array_equal(slot["pose"], ds["alignments_class_2/pose"])
    assert ours["location/micrograph_path"][3] == b"mic_3.mrc"


def test_cs_and_star_of_the_same_particles_agree_with_the_sign():
    """CryoSPARC's .cs and RELION's .star of the 7 particles give one table, contrast sign
    included once the .star (which records no sign) is read with flip_contrast
    (tests/test_contrast.py shows the data asks for it)."""
    star = load_particles(DATA / "relion" / "empiar_10076_7.star", flip_contrast=True).table
    cs = load_particles(DATA / "cryosparc" / "empiar_10076_7.cs", stack_dir=DATA / "relion").table
    # Not conventions: CryoSPARC's own uids and exposure-group numbering.
    skip = {"uid", "ctf/exp_group_id"}
    common = sorted(set(star.dtype.names) & set(cs.dtype.names) - skip)
    assert {"blob/sign", "blob/psize_A", "ctf/df1_A", "ctf/df_angle_rad", "blob/idx"} <= set(common)
    for f in common:
        if star[f].dtype.kind == "S":
            np.testing.assert_array_equal(star[f], cs[f], err_msg=f)
        else:
            np.testing.assert_allclose(star[f], cs[f], rtol=1e-6, atol=1e-6, err_msg=f)


def test_star_written_from_the_cs_matches_relions_file(tmp_path):
    """Our .cs -> .star has RELION's values (both files read by cryosparc-tools' STAR reader)."""
    import cryosparc.star

    path = tmp_path / "from_cs.star"
    write_star(path, cs_to_star(read_cs(DATA / "cryosparc" / "empiar_10076_7.cs")))
    ours = cryosparc.star.read(path)
    relion = cryosparc.star.read(DATA / "relion" / "empiar_10076_7.star")[""]  # RELION 3.0: data_
    part, optics = ours["particles"], ours["optics"]

    def image(name):
        idx, stack = str(name).split("@")
        return int(idx), stack

    assert [image(v) for v in part["rlnImageName"]] == [image(v) for v in relion["rlnImageName"]]
    for label in ("rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle"):
        np.testing.assert_allclose(part[label], relion[label], rtol=1e-6, err_msg=label)
    for label in ("rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast"):
        np.testing.assert_allclose(optics[label][0], relion[label][0], rtol=1e-6, err_msg=label)
    # RELION 3.0: detector pixel (um) * 1e4 / magnification.
    psize = relion["rlnDetectorPixelSize"][0] * 1e4 / relion["rlnMagnification"][0]
    np.testing.assert_allclose(optics["rlnImagePixelSize"][0], psize, rtol=1e-5)

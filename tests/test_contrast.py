"""Inverted contrast is found in the data and refused, naming the flag that flips it.

Oracles: the same 7 EMPIAR-10076 particles as CryoSPARC's import wrote them
(``.cs``, ``blob/sign`` -1) and as a RELION 3.0 STAR file (no sign: read as
+1), whose stack holds protein dark; simulated particles of a known phantom
written protein-dark through a ``.cs`` (``blob/sign`` -1 on a protein-bright
stack) and a ``.star`` (a negated stack).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from hetero_dask.core.contrast import centre_contrast, contrast_z_score
from hetero_dask.io.cs import read_cs, write_cs
from hetero_dask.io.errors import InputError
from hetero_dask.io.mrc import read_map, read_stack, write_stack
from hetero_dask.io.particles import load_particles
from hetero_dask.jobs.contrast import check_contrast
from hetero_dask.jobs.reconstruct import reconstruct
from hetero_dask.jobs.refine import refine
from hetero_dask.phantoms import moving_domain_phantoms
from hetero_dask.simulate import simulate, write_simulation

DATA = Path(__file__).parent / "data"
BOX, PSIZE = 32, 4.0


def test_empiar_pair_same_images_once_the_star_is_flipped():
    """The .cs (CryoSPARC import) says sign -1; the .star cannot say, and reads +1. The
    data side with the .cs: its protein is dark, so the .star is refused until flipped."""
    cs = load_particles(DATA / "cryosparc" / "empiar_10076_7.cs", stack_dir=DATA / "relion")
    star = load_particles(DATA / "relion" / "empiar_10076_7.star")
    assert (cs.table["blob/sign"] == -1).all() and (star.table["blob/sign"] == 1).all()
    assert check_contrast(cs, "cs") > 3
    with pytest.raises(InputError, match=r"empiar_10076_7\.star: the particles look inverted.*--flip-contrast"):
        check_contrast(star, DATA / "relion" / "empiar_10076_7.star")
    flipped = load_particles(DATA / "relion" / "empiar_10076_7.star", flip_contrast=True)
    np.testing.assert_array_equal(flipped.table["blob/sign"], cs.table["blob/sign"])
    rows = np.arange(7)
    np.testing.assert_array_equal(flipped.read_images(rows), cs.read_images(rows))
    np.testing.assert_array_equal(-star.read_images(rows), cs.read_images(rows))


def test_centre_contrast_sign_follows_the_image_sign():
    vol = moving_domain_phantoms(BOX, PSIZE, 1)
    sim = simulate(vol, PSIZE, 60, snr=0.5, seed=2, shift_range_px=1.0)
    scores = centre_contrast(sim.images, sim.ctf, PSIZE)
    # Large defocus flips the CTF sign at low resolution: the CTF weighting undoes it.
    assert (scores > 0).mean() > 0.9 and contrast_z_score(scores) > 10
    np.testing.assert_allclose(centre_contrast(-sim.images, sim.ctf, PSIZE), -scores, rtol=1e-5)


@pytest.fixture(scope="module")
def dark(tmp_path_factory):
    """300 particles of one phantom, written protein-dark as a .cs and as a .star."""
    d = tmp_path_factory.mktemp("dark")
    vol = moving_domain_phantoms(BOX, PSIZE, 1)
    sim = simulate(vol, PSIZE, 300, snr=1.0, seed=4, shift_range_px=1.0)
    paths = write_simulation(d, sim, vol)
    table = read_cs(paths["cs"])
    table["blob/sign"] = -1.0  # the stack holds protein bright: this .cs inverts it
    write_cs(d / "dark.cs", table)
    (d / "star").mkdir()
    write_stack(d / "star" / "particles.mrcs", -read_stack(paths["stack"]), PSIZE)
    (d / "star" / "dark.star").write_text(paths["star"].read_text())
    return {"cs": d / "dark.cs", "star": d / "star" / "dark.star", "truth": vol[0], "dir": d}


def _corr(a, b):
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


@pytest.mark.parametrize("kind", ["cs", "star"])
def test_reconstruct_refuses_inverted_particles_until_flipped(dark, tmp_path, kind):
    with pytest.raises(InputError, match="look inverted.*--flip-contrast.*--no-contrast-check"):
        reconstruct(dark[kind], tmp_path / "refused", progress=False)
    assert not (tmp_path / "refused" / "particles.zarr").exists()  # refused before the import
    res = reconstruct(dark[kind], tmp_path / "flipped", progress=False, flip_contrast=True)
    assert _corr(read_map(tmp_path / "flipped" / "class_0" / "map.mrc")[0], dark["truth"]) > 0.9
    # The flip is recorded where CryoSPARC and the next job read it.
    sign = read_cs(res.outputs["particles_cs"])["blob/sign"]
    assert (sign == (1 if kind == "cs" else -1)).all()
    # Without the check the job runs, and the map comes out inverted.
    reconstruct(dark[kind], tmp_path / "unchecked", progress=False, contrast_check=False)
    assert _corr(read_map(tmp_path / "unchecked" / "class_0" / "map.mrc")[0], dark["truth"]) < -0.9


@pytest.mark.parametrize("kind", ["cs", "star"])
def test_refine_refuses_inverted_particles_until_flipped(dark, tmp_path, kind):
    params = dict(refine_box=BOX, batch_size_per_class=300, max_iterations=1, final_full_passes=0,
                  num_random_iterations=0, max_order=2, initial_lowpass_A=20.0)  # fmt: skip
    ref = dark["dir"] / "volume_00.mrc"
    with pytest.raises(InputError, match="fit the negated starting maps.*--flip-contrast"):
        refine(dark[kind], [ref], tmp_path / "refused", progress=False, **params)
    report = refine(dark[kind], [ref], tmp_path / "flipped", progress=False, flip_contrast=True, **params)
    assert _corr(read_map(tmp_path / "flipped" / "class_0" / "map.mrc")[0], dark["truth"]) > 0.8
    assert report["parameters"]["flip_contrast"] is True

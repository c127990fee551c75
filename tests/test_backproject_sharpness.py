"""``RefineParams.backproject_sharpness`` s: a particle is backprojected into class k with
weight ``p_k^s`` (normalised over the classes) while the written posteriors, the class
fractions and the noise estimate keep ``p``."""

import numpy as np
import pytest

from hetero_dask.core.backend import to_host
from hetero_dask.core.calibration import tempered
from hetero_dask.io.cs import read_cs
from hetero_dask.io.mrc import read_map
from hetero_dask.jobs.refine import RefineParams, refine, tasks
from hetero_dask.phantoms import moving_domain_phantoms
from hetero_dask.simulate import simulate, write_references, write_simulation

BOX, PSIZE = 32, 4.0
RUN = dict(refine_box=BOX, batch_size_per_class=1000, num_random_iterations=0, final_full_passes=0,
           max_iterations=1, max_order=2, progress=False)  # fmt: skip
POSTERIOR = "alignments3D_multi/class_posterior"


def test_sharpness_weighs_the_backprojection_and_nothing_else(tmp_path, monkeypatch):
    vols = moving_domain_phantoms(BOX, PSIZE, n_classes=2)
    sim = simulate(vols, PSIZE, 60, snr=0.05, seed=5, shift_range_px=1.0)
    cs = write_simulation(tmp_path / "sim", sim, vols)["cs"]
    refs = write_references(tmp_path, vols, PSIZE)
    seen: dict[float, list] = {}
    backproject = tasks._backproject

    def recording(out, ctx, res, p, *args):
        seen.setdefault(ctx.backproject_sharpness, []).append((to_host(res.class_posterior).copy(), np.array(p)))
        return backproject(out, ctx, res, p, *args)

    monkeypatch.setattr(tasks, "_backproject", recording)
    refine(cs, refs, tmp_path / "s1", **RUN)
    refine(cs, refs, tmp_path / "s3", backproject_sharpness=3.0, **RUN)

    plain = read_cs(tmp_path / "s1" / "particles.cs")[POSTERIOR]
    assert ((plain > 0.05) & (plain < 0.95)).any(axis=1).mean() > 0.1, "too few ambiguous particles to show anything"
    np.testing.assert_array_equal(read_cs(tmp_path / "s3" / "particles.cs")[POSTERIOR], plain)
    for raw, used in seen[1.0]:
        np.testing.assert_array_equal(used, raw)
    for raw, used in seen[3.0]:
        np.testing.assert_allclose(used, tempered(raw, 1 / 3), atol=1e-6)
        assert np.abs(used - raw).max() > 0.05
    for k in (0, 1):
        a, b = (read_map(tmp_path / s / f"class_{k}" / "map.mrc")[0] for s in ("s1", "s3"))
        assert np.linalg.norm(a - b) > 1e-3 * np.linalg.norm(a)


def test_a_sharpness_below_one_is_refused():
    with pytest.raises(ValueError, match=r"backproject_sharpness.*0.5.*expected a value >= 1"):
        RefineParams(backproject_sharpness=0.5).validate()

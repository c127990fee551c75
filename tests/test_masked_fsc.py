"""Masked FSC curves of Heterogeneous Reconstruction Only on a noisy ~20 A map.

Oracles: the phantom the particles were simulated from (a map's FSC against
the truth crosses 0.5 where the half-map FSC crosses 0.143), and
``relion_postprocess`` on the same half-maps and masks (unmasked and masked
curves shell by shell; the phase-randomised and corrected curves averaged over
24 draws of random phases on each side, since a tight mask at this size
leaves few independent voxels per shell and one draw moves a shell by ~0.1).
"""

from __future__ import annotations

import numpy as np
import pytest

from hetero_dask.core.fsc import (
    corrected_fsc,
    fsc,
    randomisation_shell,
    randomised_fsc,
    resolution_radius,
)
from hetero_dask.core.masks import loose_and_tight_masks
from hetero_dask.io.mrc import read_map, write_map
from hetero_dask.jobs.reconstruct import reconstruct
from hetero_dask.phantoms import moving_domain_phantoms
from hetero_dask.simulate import simulate, write_simulation

BOX, PSIZE = 48, 4.0
DRAWS = 24


@pytest.fixture(scope="module")
def noisy(tmp_path_factory):
    """One class, 1000 particles at SNR 0.1 with their true poses: a ~22 A reconstruction."""
    d = tmp_path_factory.mktemp("noisy20")
    truth = moving_domain_phantoms(BOX, PSIZE, 1)
    sim = simulate(truth, PSIZE, 1000, snr=0.1, seed=1, shift_range_px=1.0)
    paths = write_simulation(d, sim, truth)
    res = reconstruct(paths["cs"], d / "out", progress=False)
    c = res.classes[0]
    half_a, half_b = (read_map(d / "out" / "class_0" / f"map_half_{h}.mrc")[0] for h in "AB")
    loose, tight = loose_and_tight_masks(
        0.5 * (half_a + half_b), PSIZE, c["resolutions_A"]["no_mask"]
    )
    return {
        "dir": d,
        "truth": truth[0],
        "map": read_map(d / "out" / "class_0" / "map.mrc")[0],
        "halves": (half_a, half_b),
        "fsc": c["fsc"],
        "res": c["resolutions_A"],
        "masks": {"loose": loose, "tight": tight},
    }


def _radius(curve, threshold=0.143):
    return resolution_radius(curve, threshold)


def test_masked_curves_of_a_noisy_map_are_true(noisy):
    curves, truth = noisy["fsc"], noisy["truth"]
    assert 18 < noisy["res"]["no_mask"] < 26  # a noisy ~20 A map
    # The half-map FSC crosses 0.143 where the full map's FSC against the truth crosses 0.5.
    assert abs(_radius(curves["no_mask"]) - _radius(fsc(noisy["map"], truth), 0.5)) < 1.0
    # The reported curves are those of the written (unregularised) half-maps.
    np.testing.assert_allclose(curves["no_mask"], fsc(*noisy["halves"]), atol=1e-6)
    # Loose mask: the masked map against the truth says the same (its wide edge adds
    # little correlation of its own).
    loose = noisy["masks"]["loose"]
    np.testing.assert_allclose(curves["loose"], fsc(*noisy["halves"], loose), atol=1e-6)
    oracle = _radius(fsc(noisy["map"] * loose, truth), 0.5)
    assert abs(_radius(curves["loose"]) - oracle) < 1.5
    # Tight mask: inflated by the mask's own correlation, but not up to Nyquist.
    n_shells = BOX // 2 + 1
    assert np.mean(curves["tight"][2 * n_shells // 3 :]) < 0.2
    assert noisy["res"]["tight"] > 2.5 * PSIZE
    # Corrected: never climbs back above 0.143 beyond its crossing (3-shell means), and
    # lands within 2 shells of the loose curve.
    s = randomisation_shell(curves["no_mask"])
    corrected = np.asarray(curves["corrected"])
    running = np.convolve(corrected[s + 3 :], np.ones(3) / 3, mode="valid")
    assert running.max() < 0.143, np.round(corrected, 2)
    assert abs(_radius(corrected) - _radius(curves["loose"])) < 2.0


def _relion_postprocess(folder, half_a, half_b, mask, seed: int):
    """relion_postprocess --randomize_at_fsc 0.143 on the maps; its FSC table (pandas)."""
    import starfile

    from hetero_dask.testing.relion import run

    for name, vol in (("half1.mrc", half_a), ("half2.mrc", half_b), ("mask.mrc", mask)):
        if not (folder / name).exists():
            write_map(folder / name, vol, PSIZE)
    (folder / "pp").mkdir(exist_ok=True)
    run(
        [
            "relion_postprocess", "--i", "half1.mrc", "--i2", "half2.mrc", "--mask", "mask.mrc",
            "--angpix", str(PSIZE), "--randomize_at_fsc", "0.143", "--random_seed", str(seed),
            "--o", "pp/postprocess",
        ],
        cwd=folder,
    )  # fmt: skip
    return starfile.read(folder / "pp" / "postprocess.star")["fsc"]


@pytest.mark.relion
@pytest.mark.parametrize("mask_name", ["loose", "tight"])
def test_masked_fsc_agrees_with_relion_postprocess(noisy, tmp_path, mask_name):
    a, b = noisy["halves"]
    mask = noisy["masks"][mask_name]
    tables = [_relion_postprocess(tmp_path, a, b, mask, seed) for seed in range(1, DRAWS + 1)]
    rel = tables[0]
    s = randomisation_shell(noisy["fsc"]["no_mask"])
    # Deterministic curves, shell by shell: the job's own unmasked and masked curves.
    np.testing.assert_allclose(
        noisy["fsc"]["no_mask"], rel["rlnFourierShellCorrelationUnmaskedMaps"], atol=0.03
    )
    np.testing.assert_allclose(
        noisy["fsc"][mask_name], rel["rlnFourierShellCorrelationMaskedMaps"], atol=0.03
    )

    def mean_of(column):
        return np.mean([t[column].to_numpy() for t in tables], axis=0)

    rngs = [np.random.default_rng(100 + i) for i in range(DRAWS)]
    ours_n = np.mean([randomised_fsc(a, b, mask, s, rng) for rng in rngs], axis=0)
    relion_n = mean_of("rlnCorrectedFourierShellCorrelationPhaseRandomizedMaskedMaps")
    np.testing.assert_allclose(ours_n, relion_n, atol=0.05)
    if mask_name == "loose":
        rngs = [np.random.default_rng(100 + i) for i in range(DRAWS)]
        ours_c = np.mean([corrected_fsc(a, b, mask, rng=rng) for rng in rngs], axis=0)
        relion_c = mean_of("rlnFourierShellCorrelationCorrected")
        # RELION keeps the masked FSC at shells s and s + 1 (see core.fsc); the rest agrees.
        keep = np.r_[0:s, s + 2 : len(ours_c)]
        np.testing.assert_allclose(ours_c[keep], relion_c[keep], atol=0.05)
    # The corrected resolution (for the tight mask the job's reported curve) lands within
    # one shell of RELION's (the last shell at or above 0.143; the median over its draws,
    # which move it by a shell or two with this few voxels in a tight mask).
    if mask_name == "tight":
        ours = _radius(noisy["fsc"]["corrected"])
    else:
        ours = _radius(corrected_fsc(a, b, mask))
    last = [int(np.argmax(t["rlnFourierShellCorrelationCorrected"].to_numpy() < 0.143)) - 1 for t in tables]
    assert abs(ours - np.median(last)) <= 1.0, (ours, last)

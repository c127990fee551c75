"""Projection: the projection-slice theorem, handedness, and RELION's relion_project as oracle."""

from __future__ import annotations

import mrcfile
import numpy as np
import pytest
from scipy.ndimage import map_coordinates
from scipy.spatial.transform import Rotation

from hetero_dask.core.ctf import CTFParams, ctf_values
from hetero_dask.core.fourier import fft2c, freq_grid_2d, lowpass, radius_2d
from hetero_dask.core.masks import spherical_window
from hetero_dask.core.projector import prepare_fourier_map, project, project_images
from hetero_dask.core.rotations import euler_to_matrix, matrix_to_euler


def line_projections(vol, rotations):
    """Real-space images ``(R, n, n)``: sum over z of ``V(R r)`` (r centred at n//2), cubic interpolation."""
    n = vol.shape[-1]
    c = np.arange(n) - n // 2
    z, y, x = np.meshgrid(c, c, c, indexing="ij")
    r = np.stack([x.ravel(), y.ravel(), z.ravel()])
    out = []
    for R in rotations:
        px, py, pz = (R @ r) + n // 2
        vals = map_coordinates(vol, [pz, py, px], order=3, mode="constant")
        out.append(vals.reshape(n, n, n).sum(axis=0))
    return np.stack(out)


def band_correlation(a, b, n, frac=2 / 3):
    """Correlation of two stacks of centred spectra within ``frac`` of Nyquist (excluding DC)."""
    r = radius_2d(n, np)
    band = (r > 0) & (r <= frac * n / 2)
    a, b = a[:, band], b[:, band]
    return float((a * b.conj()).real.sum() / np.sqrt((abs(a) ** 2).sum() * (abs(b) ** 2).sum()))


def read_hand(shared_data):
    with mrcfile.open(shared_data / "maps" / "hand-vol.mrc", permissive=True) as m:
        return np.asarray(m.data, dtype=np.float32)


def test_projection_slice_theorem_random_volume():
    n = 32
    rng = np.random.default_rng(0)
    vol = lowpass(rng.standard_normal((n, n, n)).astype(np.float32), 3.0, 1.0, 3)
    vol *= spherical_window(n, 0.6, 0.8)
    rots = Rotation.random(6, random_state=3).as_matrix()
    ours = project_images(prepare_fourier_map(vol), rots)
    ref = fft2c(line_projections(vol, rots))
    assert band_correlation(ours, ref, n) > 0.99


def test_handedness_hand_volume(shared_data):
    vol = read_hand(shared_data)
    n = vol.shape[-1]
    rots = Rotation.random(4, random_state=5).as_matrix()
    ours = project_images(prepare_fourier_map(vol), rots)
    ref = fft2c(line_projections(vol, rots))
    mirrored = fft2c(line_projections(vol[::-1].copy(), rots))
    assert band_correlation(ours, ref, n) > 0.99
    # The mirror image of the asymmetric hand must not match: the test sees handedness.
    assert band_correlation(ours, mirrored, n) < 0.5


@pytest.mark.relion
def test_relion_project_convention(shared_data, tmp_path):
    """relion_project --ctf images equal CTF * project(R = A.T) * exp(+2 pi i k.s / N)."""
    from hetero_dask.testing.relion import relion_project, write_relion_star

    vol = read_hand(shared_data)
    n, psize, P = vol.shape[-1], 2.0, 60
    rng = np.random.default_rng(1)
    A = Rotation.random(P, random_state=2).as_matrix().transpose(0, 2, 1)
    euler = np.stack(matrix_to_euler(A), axis=1)
    origins_A = rng.uniform(-5, 5, (P, 2))
    dfu = rng.uniform(8000, 25000, P)
    defocus = np.stack([dfu, dfu - rng.uniform(0, 2000, P), rng.uniform(0, 180, P)], axis=1)
    star = write_relion_star(
        tmp_path / "in.star", euler, origins_A, psize, n, defocus, 300.0, 2.7, 0.1
    )
    images, _ = relion_project(tmp_path, vol, psize, star, ctf=True)

    R = euler_to_matrix(euler[:, 0], euler[:, 1], euler[:, 2]).transpose(0, 2, 1)
    kx, ky = (k.ravel().astype(np.float32) for k in freq_grid_2d(n, np))
    params = CTFParams(defocus[:, 0], defocus[:, 1], np.deg2rad(defocus[:, 2]), 300.0, 2.7, 0.1)
    ctf = ctf_values(params, kx / (n * psize), ky / (n * psize))
    s = origins_A / psize
    phase = np.exp(2j * np.pi * (kx * s[:, :1] + ky * s[:, 1:]) / n)
    model = (ctf * project(prepare_fourier_map(vol), R, kx, ky) * phase).reshape(P, n, n)
    F = fft2c(images)
    assert band_correlation(model, F, n) > 0.99
    # Same scale too (unnormalised DFT on both sides).
    r = radius_2d(n, np)
    band = (r > 0) & (r <= n / 3)
    assert abs(np.linalg.norm(F[:, band]) / np.linalg.norm(model[:, band]) - 1) < 0.01


@pytest.mark.parametrize("r_max", [6.0, None])  # a cropped cube (fast path) and the whole box
def test_stacked_maps_project_as_each_alone(r_max, monkeypatch):
    """C maps stacked in one FourierMap give, map by map, exactly the slices of separate calls,
    on both code paths of the projector and through project_band's blocks of rotations."""
    from hetero_dask.core import scoring
    from hetero_dask.core.projector import stacked
    from hetero_dask.core.scoring import alignment_band, project_band

    monkeypatch.setattr(scoring, "PROJECT_BLOCK_POINTS", 2**12)  # blocks of ~100 of the 700 rotations
    rng = np.random.default_rng(4)
    vols = [rng.standard_normal((16, 16, 16)).astype(np.float32) for _ in range(3)]
    fmaps = [prepare_fourier_map(v, r_max=r_max) for v in vols]
    rots = Rotation.random(700, random_state=5).as_matrix()
    band = alignment_band(16, 5.0)
    together = project_band(stacked(fmaps), rots, band.kx, band.ky)
    assert together.shape == (3, 700, band.kx.size)
    for k, fm in enumerate(fmaps):
        np.testing.assert_array_equal(together[k], project_band(fm, rots, band.kx, band.ky))
    k = np.arange(-8, 8, dtype=np.float32)
    kx, ky = (a.ravel() for a in np.meshgrid(k, k))
    np.testing.assert_array_equal(project(stacked(fmaps), rots[:5], kx, ky)[1], project(fmaps[1], rots[:5], kx, ky))
    with pytest.raises(ValueError, match="one shape"):
        stacked([fmaps[0], prepare_fourier_map(vols[1], r_max=3.0)])


@pytest.mark.parametrize("n, pad, r_max", [(32, 2, None), (33, 2, 7.0), (24, 3, 5.0), (40, 2, 30.0)])
def test_the_fourier_map_is_the_padded_volumes_centred_dft_on_its_band(n, pad, r_max):
    """The band-only transform equals the whole padded volume's centred DFT (double precision,
    numpy) on the kept cube, for even and odd boxes and any padding."""
    from hetero_dask.core.projector import gridding_correction

    v = np.random.default_rng(n).standard_normal((n, n, n)).astype(np.float32)
    fm = prepare_fourier_map(v, pad=pad, r_max=r_max)
    D, h = pad * n, fm.data.shape[0] // 2
    padded = np.zeros((D, D, D))
    o = D // 2 - n // 2
    padded[o:o + n, o:o + n, o:o + n] = v / gridding_correction(n, pad, np)
    F = np.fft.fftshift(np.fft.fftn(np.fft.ifftshift(padded)))
    c = D // 2
    want = F[c - h:c + h + 1, c - h:c + h + 1, c - h:c + h + 1]
    assert fm.data.dtype == np.complex64 and fm.data.shape == want.shape
    assert np.max(np.abs(fm.data - want)) < 1e-5 * np.max(np.abs(want))

"""CTF: analytic zeros, astigmatism geometry, envelope, shapes, and RELION's relion_project --ctf."""

from __future__ import annotations

import subprocess

import mrcfile
import numpy as np
import pytest

from hetero_dask.core.ctf import CTFParams, ctf_image, ctf_values, electron_wavelength_A
from hetero_dask.core.fourier import fft2c, radius_2d


def test_wavelength_known_values():
    # standard relativistic wavelengths (A)
    np.testing.assert_allclose(electron_wavelength_A(300.0), 0.019687, rtol=1e-4)
    np.testing.assert_allclose(electron_wavelength_A(200.0), 0.025079, rtol=1e-4)
    np.testing.assert_allclose(electron_wavelength_A(100.0), 0.037014, rtol=1e-4)


def _directions(m, seed=0):
    a = np.random.default_rng(seed).uniform(0, 2 * np.pi, m)
    return np.cos(a), np.sin(a)


@pytest.mark.parametrize("df_A", [8000.0, 15000.0, 30000.0])
def test_zeros_pure_defocus(df_A):
    """Cs=0, w=0, no astigmatism: CTF = sin(pi lambda df s^2), zero at s^2 = n / (lambda df)."""
    p = CTFParams(
        df1_A=df_A, df2_A=df_A, df_angle_rad=0.3, accel_kv=300.0, cs_mm=0.0, amp_contrast=0.0
    )
    lam = electron_wavelength_A(300.0)
    n = np.arange(1, 8)
    s_zero = np.sqrt(n / (lam * df_A))
    s_peak = np.sqrt((n - 0.5) / (lam * df_A))
    cx, cy = _directions(len(n))
    np.testing.assert_allclose(ctf_values(p, s_zero * cx, s_zero * cy), 0.0, atol=2e-5)
    np.testing.assert_allclose(
        ctf_values(p, s_peak * cx, s_peak * cy), (-1.0) ** (n - 1), atol=2e-5
    )


def test_zeros_with_cs_amplitude_contrast_and_phase_shift():
    """chi + atan(w / sqrt(1 - w^2)) = n pi solved as a quadratic in s^2."""
    df, cs_mm, w, ps, kv = 12000.0, 2.7, 0.1, 0.4, 300.0
    p = CTFParams(df, df, 0.0, accel_kv=kv, cs_mm=cs_mm, amp_contrast=w, phase_shift_rad=ps)
    lam = electron_wavelength_A(kv)
    a = -0.5 * np.pi * cs_mm * 1e7 * lam**3
    b = np.pi * lam * df
    c0 = ps + np.arctan(w / np.sqrt(1 - w**2))
    n = np.arange(1, 10)
    s2 = (-b + np.sqrt(b**2 - 4 * a * (c0 - n * np.pi))) / (2 * a)  # root on the rising branch
    s = np.sqrt(s2)
    cx, cy = _directions(len(n), seed=1)
    np.testing.assert_allclose(ctf_values(p, s * cx, s * cy), 0.0, atol=5e-5)
    # at s = 0 the CTF is sqrt(1-w^2) sin(ps) + w cos(ps)
    zero = np.zeros(1)
    np.testing.assert_allclose(
        ctf_values(p, zero, zero), np.sqrt(1 - w**2) * np.sin(ps) + w * np.cos(ps), rtol=1e-6
    )


def test_astigmatism_axes():
    """Along the angle theta the defocus is df1, perpendicular to it df2."""
    theta = np.deg2rad(37.0)
    p = CTFParams(df1_A=11000.0, df2_A=17000.0, df_angle_rad=theta, cs_mm=2.7, amp_contrast=0.1)
    s = np.linspace(0.01, 0.3, 50)
    along = ctf_values(p, s * np.cos(theta), s * np.sin(theta))
    perp = ctf_values(p, -s * np.sin(theta), s * np.cos(theta))
    iso1 = ctf_values(CTFParams(11000.0, 11000.0, 0.0, cs_mm=2.7, amp_contrast=0.1), s, 0 * s)
    iso2 = ctf_values(CTFParams(17000.0, 17000.0, 0.0, cs_mm=2.7, amp_contrast=0.1), s, 0 * s)
    np.testing.assert_allclose(along, iso1, atol=1e-5)
    np.testing.assert_allclose(perp, iso2, atol=1e-5)
    assert np.abs(along - perp).max() > 0.5


def test_astigmatism_angle_rotates_pattern():
    rng = np.random.default_rng(3)
    kx, ky = rng.uniform(-0.3, 0.3, (2, 500))
    base = dict(df1_A=10000.0, df2_A=16000.0, cs_mm=2.7, amp_contrast=0.07)
    for theta in (0.4, 1.3, -2.2):
        rotated = ctf_values(CTFParams(df_angle_rad=theta, **base), kx, ky)
        # value at k with angle theta = value at Rot(-theta) k with angle 0
        c, s = np.cos(theta), np.sin(theta)
        ref = ctf_values(CTFParams(df_angle_rad=0.0, **base), c * kx + s * ky, -s * kx + c * ky)
        np.testing.assert_allclose(rotated, ref, atol=1e-5)
    # on the pixel grid: a 90-degree angle transposes the image (swaps kx and ky)
    img0 = ctf_image(CTFParams(df_angle_rad=0.0, **base), 64, 1.2)
    img90 = ctf_image(CTFParams(df_angle_rad=np.pi / 2, **base), 64, 1.2)
    np.testing.assert_allclose(img90, img0.T, atol=1e-5)
    assert np.abs(img90 - img0).max() > 0.5


def test_bfactor_and_scale_envelope():
    s = np.linspace(0.0, 0.4, 30)
    base = dict(df1_A=14000.0, df2_A=14000.0, df_angle_rad=0.0)
    plain = ctf_values(CTFParams(**base), s, 0 * s)
    damped = ctf_values(CTFParams(bfactor=80.0, scale=0.6, **base), s, 0 * s)
    np.testing.assert_allclose(damped, plain * 0.6 * np.exp(-80.0 * s**2 / 4), atol=1e-6)


def test_vectorised_shapes_and_subset():
    B = 5
    p = CTFParams(
        df1_A=np.linspace(8000, 20000, B),
        df2_A=np.linspace(9000, 21000, B),
        df_angle_rad=np.linspace(0, 1, B),
        accel_kv=300.0,
    )
    kx, ky = np.random.default_rng(0).uniform(-0.2, 0.2, (2, 40))
    out = ctf_values(p, kx, ky)
    assert out.shape == (B, 40) and out.dtype == np.float32
    assert ctf_image(p, 32, 1.5).shape == (B, 32, 32)
    one = ctf_values(p.subset(np.array([2])), kx, ky)
    np.testing.assert_allclose(one[0], out[2], atol=1e-6)
    scalar = CTFParams(float(p.df1_A[2]), float(p.df2_A[2]), float(p.df_angle_rad[2]))
    np.testing.assert_allclose(ctf_values(scalar, kx, ky), out[2], atol=1e-6)
    assert ctf_values(scalar, kx, ky).shape == (40,)


# ---- RELION oracle ------------------------------------------------------------------------

_OPTICS = [  # name, group, kV, Cs mm, Q0
    ("opticsGroup1", 1, 300.0, 2.7, 0.10),
    ("opticsGroup2", 2, 200.0, 2.0, 0.07),
]
_PARTICLES = [  # dU, dV, angle deg, phase shift deg, B, scale, optics group
    (15000.0, 15000.0, 0.0, 0.0, 0.0, 1.0, 1),
    (12000.0, 18000.0, 30.0, 0.0, 0.0, 1.0, 1),
    (20000.0, 14000.0, -70.0, 45.0, 50.0, 1.0, 2),
    (9000.0, 9500.0, 120.0, 90.0, 0.0, 0.8, 2),
]


def _write_star(path, box, psize_A):
    lines = ["", "data_optics", "", "loop_"]
    cols = ["OpticsGroupName", "OpticsGroup", "Voltage", "SphericalAberration"]
    cols += ["AmplitudeContrast", "ImagePixelSize", "ImageSize", "ImageDimensionality"]
    lines += [f"_rln{c} #{i + 1}" for i, c in enumerate(cols)]
    lines += [f"{n} {g} {kv} {cs} {q0} {psize_A} {box} 2" for n, g, kv, cs, q0 in _OPTICS]
    lines += ["", "", "data_particles", "", "loop_"]
    cols = ["ImageName", "AngleRot", "AngleTilt", "AnglePsi", "OriginXAngst", "OriginYAngst"]
    cols += ["DefocusU", "DefocusV", "DefocusAngle", "PhaseShift", "CtfBfactor"]
    cols += ["CtfScalefactor", "OpticsGroup"]
    lines += [f"_rln{c} #{i + 1}" for i, c in enumerate(cols)]
    for i, (du, dv, ang, ps, b, sc, g) in enumerate(_PARTICLES):
        lines.append(f"{i + 1:06d}@none.mrcs 0 0 0 0 0 {du} {dv} {ang} {ps} {b} {sc} {g}")
    path.write_text("\n".join(lines) + "\n")


def _our_params():
    opt = {g: (kv, cs, q0) for _, g, kv, cs, q0 in _OPTICS}
    P = np.array(_PARTICLES)
    g = P[:, 6].astype(int)
    return CTFParams(
        df1_A=P[:, 0],
        df2_A=P[:, 1],
        df_angle_rad=np.deg2rad(P[:, 2]),
        accel_kv=np.array([opt[i][0] for i in g]),
        cs_mm=np.array([opt[i][1] for i in g]),
        amp_contrast=np.array([opt[i][2] for i in g]),
        phase_shift_rad=np.deg2rad(P[:, 3]),
        bfactor=P[:, 4],
        scale=P[:, 5],
    )


@pytest.mark.relion
def test_ctf_matches_relion_project(tmp_path):
    """A central delta projects to a delta: its image spectrum is RELION's CTF itself."""
    box, psize = 64, 1.5
    vol = np.zeros((box, box, box), np.float32)
    vol[box // 2, box // 2, box // 2] = 1.0
    with mrcfile.new(tmp_path / "delta.mrc") as m:
        m.set_data(vol)
        m.voxel_size = psize
    _write_star(tmp_path / "particles.star", box, psize)
    subprocess.run(
        ["relion_project", "--i", "delta.mrc", "--o", "proj", "--ang", "particles.star"]
        + ["--ctf", "--angpix", str(psize)],
        cwd=tmp_path,
        check=True,
        capture_output=True,
        timeout=120,
    )
    imgs = mrcfile.read(tmp_path / "proj.mrcs").astype(np.float64)
    assert imgs.shape == (len(_PARTICLES), box, box)
    spectra = fft2c(imgs)
    ours = ctf_image(_our_params(), box, psize).astype(np.float64)
    band = radius_2d(box, np) < 0.9 * box / 2
    for i in range(len(_PARTICLES)):
        a, c = spectra[i][band], ours[i][band]
        assert np.abs(a.imag).max() < 1e-6 * np.abs(a.real).max()  # real, centred: no phase
        corr = np.corrcoef(a.real, c)[0, 1]
        gain = (a.real @ c) / (c @ c)
        assert corr > 0.999, f"particle {i}: correlation {corr:.5f}"
        # same sign, and the same scale (rlnCtfScalefactor 0.8 included): unit delta -> CTF
        np.testing.assert_allclose(gain, 1.0, rtol=1e-3, err_msg=f"particle {i}")


def test_ctf_band_is_ctf_values():
    """The backprojection's CTF (one sin per sample, amplitude contrast as a phase offset,
    chi as a matrix product) is the CTF of ctf_values, astigmatism, phase plate, B and scale included."""
    from hetero_dask.core.backprojector import half_plane_freqs
    from hetero_dask.core.ctf import CTFParams, ctf_band, ctf_values

    rng = np.random.default_rng(0)
    B, n, psize = 5, 48, 1.7
    params = CTFParams(df1_A=rng.uniform(8000, 25000, B), df2_A=rng.uniform(8000, 25000, B),
                       df_angle_rad=rng.uniform(0, np.pi, B), accel_kv=np.array([300, 200, 300, 120, 300.0]),
                       cs_mm=2.7, amp_contrast=rng.uniform(0.05, 0.2, B), phase_shift_rad=rng.uniform(0, 1.5, B),
                       bfactor=rng.uniform(0, 80, B), scale=rng.uniform(0.5, 1.5, B))
    kx, ky, _ = half_plane_freqs(n)
    fast = ctf_band(params, kx, ky, n, psize)
    ref = ctf_values(params, kx / (n * psize), ky / (n * psize))
    np.testing.assert_allclose(fast, ref, atol=2e-5)
    assert np.abs(ref).max() > 0.5  # a real CTF, not zeros

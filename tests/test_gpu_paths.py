"""The CuPy branches of ``core``: the numpy-backed stand-in everywhere, real CuPy where a GPU is.

Each test runs a core function on device arrays and on numpy arrays and
checks (a) the result stays on the device (a ``cupy.ndarray``) and (b) it equals
the numpy result. ``dev`` is the stand-in (tests/fake_cupy.py) on every run and
real CuPy for the ``gpu``-marked parameter (skipped without a GPU by conftest).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import fake_cupy
import numpy as np
import pytest
from scipy.spatial.transform import Rotation
from test_backprojection import simulate, smooth_volume
from test_scoring import PSIZE_A, _recovery_case

from hetero_dask.core import backend
from hetero_dask.core import pose_grids as grids
from hetero_dask.core.align3d import align_pairs
from hetero_dask.core.backprojector import (
    backproject,
    crop_grids,
    merge_grids,
    new_grids,
    symmetrise_grids,
)
from hetero_dask.core.ctf import CTFParams, ctf_image, ctf_values
from hetero_dask.core.fourier import (
    fft2c,
    fft3c,
    fourier_resize,
    ifft3c,
    lowpass,
    radius_3d,
    shell_average,
    translate_ft,
)
from hetero_dask.core.fsc import fsc, fsc_set
from hetero_dask.core.masks import mask_from_map, spherical_window
from hetero_dask.core.noise import sigma2_from_residuals
from hetero_dask.core.projector import prepare_fourier_map, project, project_images
from hetero_dask.core.reconstruction import band_spectrum, half_map_fsc, reconstruct
from hetero_dask.core.rotations import (
    angle_between,
    euler_to_matrix,
    matrix_to_euler,
    matrix_to_pose,
    pose_to_matrix,
)
from hetero_dask.core.scoring import (
    PRECISIONS,
    alignment_band,
    prepare_particles,
    round_to_tf32,
    scoring_matmul,
)
from hetero_dask.core.search import SearchParams, estep
from hetero_dask.core.symmetry import pose_error_modulo_symmetry, symmetry_group

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(params=["fake", pytest.param("cupy", marks=pytest.mark.gpu)])
def dev(request, monkeypatch):
    """The device namespace: the CuPy stand-in, or real CuPy on a GPU machine."""
    monkeypatch.delenv("HETERO_DASK_CPU", raising=False)
    if request.param == "fake":
        return fake_cupy.install(monkeypatch)
    import cupy

    return cupy


def on_device(a) -> np.ndarray:
    """Assert ``a`` is a device array and return its host copy."""
    assert type(a).__module__.split(".")[0] == "cupy", f"result left the device: {type(a)}"
    return a.get()


def close(a_dev, a_host, rtol=1e-5, atol_frac=1e-5):
    """Device result equals the numpy one, atol relative to the result's scale."""
    h = np.asarray(a_host)
    np.testing.assert_allclose(
        on_device(a_dev), h, rtol=rtol, atol=atol_frac * float(np.abs(h).max() or 1.0)
    )


# ---------------------------------------------------------------- the stand-in itself


def test_stand_in_follows_cupy_rules(monkeypatch):
    """Host/device mixing is refused as CuPy refuses it; names CuPy lacks are absent;
    xp_of/to_host/to_device and the cupyx calls behave like the real ones."""
    cp = fake_cupy.install(monkeypatch)
    a = cp.asarray(np.arange(6.0, dtype=np.float32))
    assert backend.xp_of(a) is cp and backend.xp_of(np.ones(2)) is np
    with pytest.raises(TypeError, match="mix"):
        backend.xp_of(a, np.ones(2))
    for bad in (
        lambda: a + np.ones(6),
        lambda: np.ones(6) * a,
        lambda: cp.where(a > 2, a, np.ones(6)),
    ):
        with pytest.raises(TypeError, match="host"):
            bad()
    with pytest.raises(AttributeError):
        cp.nditer  # noqa: B018 (an attribute access is the test)
    host = np.ones(3)
    d = cp.asarray(host)
    host[0] = 5.0
    assert float(d[0]) == 1.0  # asarray copied to the "device"
    assert type(a.sum()).__module__ == "cupy" and a.sum().ndim == 0
    h = backend.to_host(a)
    assert type(h) is np.ndarray and np.array_equal(h, np.arange(6.0))
    assert backend.to_device(h, cp).__class__ is cp.ndarray
    assert backend.to_device(a, np).__class__ is np.ndarray
    t = cp.zeros(4, dtype=cp.float32)
    sys.modules["cupyx"].scatter_add(
        t, cp.asarray([1, 1, 3]), cp.asarray([1.0, 2.0, 4.0], dtype=cp.float32)
    )
    assert np.array_equal(t.get(), [0, 3, 0, 4])
    with pytest.raises(TypeError, match="atomicAdd"):
        sys.modules["cupyx"].scatter_add(
            cp.zeros(4, dtype=cp.complex64), cp.asarray([0]), cp.ones(1)
        )


def test_worker_xp_and_gpu_available(monkeypatch):
    """worker_xp picks CuPy when a GPU is visible, numpy when forced or preferred off."""
    monkeypatch.delenv("HETERO_DASK_CPU", raising=False)
    cp = fake_cupy.install(monkeypatch)
    assert backend.gpu_available() and backend.worker_xp() is cp
    assert backend.worker_xp(prefer_gpu=False) is np
    monkeypatch.setenv("HETERO_DASK_CPU", "1")
    assert backend.worker_xp() is np


def test_array_module_chosen_on_the_worker(tmp_path):
    """A worker process that sees a GPU computes with CuPy although its client sees none,
    and what it returns to the client is numpy (partials travel as host arrays)."""
    # The worker's preload puts the stand-in into its sys.modules; the client never imports it.
    preload = tmp_path / "fake_gpu_worker.py"
    preload.write_text(
        textwrap.dedent(
            f"""
            import sys
            sys.path.insert(0, {str(ROOT / "tests")!r})
            import fake_cupy

            class _SetItem:
                def setitem(self, d, k, v):
                    d[k] = v

            fake_cupy.install(_SetItem())
            """
        )
    )
    script = textwrap.dedent(
        f"""
        import os, sys
        import numpy as np
        from distributed import Client, LocalCluster
        from hetero_dask.core.backend import worker_xp
        from hetero_dask.core.backprojector import backproject, new_grids

        def task():
            xp = worker_xp()
            g = new_grids(8, xp=xp)
            kx = xp.asarray([1.0, 2.0], dtype=xp.float32)
            R = xp.asarray(np.eye(3, dtype=np.float32)[None])
            backproject(g, R, xp.ones((1, 2), dtype=xp.complex64), xp.ones((1, 2), dtype=xp.float32), kx, kx)
            return xp.__name__, type(g.data).__module__, g.to(np)

        if __name__ == "__main__":
            assert worker_xp().__name__ == "numpy" and "cupy" not in sys.modules
            with LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                              dashboard_address=":0", preload=[{str(preload)!r}]) as cl, Client(cl) as c:
                name, where, grids = c.submit(task, pure=False).result()
            assert "cupy" not in sys.modules
            print(name, where, type(grids.data).__module__, float(np.abs(grids.weight).sum()))
        """
    )
    (tmp_path / "run.py").write_text(script)
    out = subprocess.run(
        [sys.executable, str(tmp_path / "run.py")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    name, where, returned, total = out.stdout.split()[-4:]
    assert (name, where, returned) == ("cupy", "cupy", "numpy")
    assert abs(float(total) - 2.0) < 1e-5  # two unit weights deposited


# ---------------------------------------------------------------- core functions, device vs numpy


def test_fourier_ctf_rotations(dev):
    rng = np.random.default_rng(0)
    img = rng.standard_normal((3, 24, 24)).astype(np.float32)
    vol = rng.standard_normal((16, 16, 16)).astype(np.float32)
    close(fft2c(dev.asarray(img)), fft2c(img), atol_frac=1e-5)
    F = fft3c(vol)
    close(fft3c(dev.asarray(vol)), F)
    close(ifft3c(dev.asarray(F)), ifft3c(F))
    close(fourier_resize(dev.asarray(vol), 12, 3), fourier_resize(vol, 12, 3))
    s = rng.uniform(-3, 3, (3, 2)).astype(np.float32)
    Fi = fft2c(img)
    close(translate_ft(dev.asarray(Fi), dev.asarray(s)), translate_ft(Fi, s), atol_frac=1e-4)
    close(lowpass(dev.asarray(vol), 8.0, 2.0, 3), lowpass(vol, 8.0, 2.0, 3), atol_frac=1e-4)
    r = radius_3d(16, np)
    close(
        shell_average(dev.asarray(np.abs(F)), radius_3d(16, dev), 9), shell_average(np.abs(F), r, 9)
    )
    ctf = CTFParams(
        rng.uniform(1e4, 2e4, 3), rng.uniform(1e4, 2e4, 3), rng.uniform(0, 3, 3), bfactor=50.0
    )
    kx = rng.uniform(-0.2, 0.2, 50).astype(np.float32)
    ky = rng.uniform(-0.2, 0.2, 50).astype(np.float32)
    close(
        ctf_values(ctf.to(dev), dev.asarray(kx), dev.asarray(ky)),
        ctf_values(ctf, kx, ky),
        atol_frac=1e-4,
    )
    close(ctf_image(ctf.to(dev), 24, 2.0, dev), ctf_image(ctf, 24, 2.0), atol_frac=1e-4)
    pose = rng.uniform(-2, 2, (20, 3))
    R = pose_to_matrix(pose)
    close(pose_to_matrix(dev.asarray(pose)), R, atol_frac=1e-9)
    close(matrix_to_pose(dev.asarray(R)), matrix_to_pose(R), atol_frac=1e-7)
    eu = matrix_to_euler(R)  # (rot, tilt, psi) degrees
    for a, b in zip(matrix_to_euler(dev.asarray(R)), eu, strict=True):
        close(a, b, atol_frac=1e-7)
    close(euler_to_matrix(*(dev.asarray(e) for e in eu)), euler_to_matrix(*eu), atol_frac=1e-9)
    R2 = pose_to_matrix(rng.uniform(-2, 2, (20, 3)))
    close(angle_between(dev.asarray(R), dev.asarray(R2)), angle_between(R, R2), atol_frac=1e-7)
    ops = symmetry_group("D3")
    close(
        pose_error_modulo_symmetry(dev.asarray(R), dev.asarray(R2), dev.asarray(ops)),
        pose_error_modulo_symmetry(R, R2, ops),
        atol_frac=1e-7,
    )


def test_projection(dev):
    vol = smooth_volume(24, 3.0, seed=1)
    R = Rotation.random(40, random_state=1).as_matrix().astype(np.float32)
    band = alignment_band(24, 10)
    host = prepare_fourier_map(vol, r_max=11)
    fm = prepare_fourier_map(dev.asarray(vol), r_max=11)
    close(fm.data, host.data, atol_frac=1e-5)
    close(
        project(fm, dev.asarray(R), dev.asarray(band.kx), dev.asarray(band.ky)),
        project(host, R, band.kx, band.ky),
        atol_frac=1e-5,
    )
    full = prepare_fourier_map(vol)
    close(
        project_images(prepare_fourier_map(dev.asarray(vol)), dev.asarray(R[:4])),
        project_images(full, R[:4]),
        atol_frac=1e-5,
    )


def test_backprojection_reconstruction_fsc_masks(dev):
    """Scatter (cupyx.scatter_add on the device), symmetrise/crop/merge, reconstruct, FSC, masks."""
    n = 16
    vol = smooth_volume(n, 3.0, seed=5)
    R, kx, ky, C, Y = simulate(vol, 60, seed=5)
    fake_cupy.scatter_add_calls.clear()
    host = backproject(new_grids(n), R, C * Y, C**2, kx, ky)
    g = backproject(
        new_grids(n, xp=dev), dev.asarray(R), dev.asarray(C * Y), dev.asarray(C**2), kx, ky
    )
    if fake_cupy.is_fake(dev):  # the device scatter ran (3 per batch: real, imaginary, weight)
        assert len(fake_cupy.scatter_add_calls) >= 3
        assert {d for d, _ in fake_cupy.scatter_add_calls} == {np.dtype(np.float32)}
    close(g.data, host.data, atol_frac=1e-5)
    close(g.weight, host.weight, atol_frac=1e-5)
    ops = symmetry_group("C2")
    hs, gs = symmetrise_grids(host, ops), symmetrise_grids(g, ops)
    close(gs.data, hs.data, atol_frac=1e-5)
    hc, gc = crop_grids(host, 5), crop_grids(g, 5)
    close(merge_grids(gc, gc).weight, merge_grids(hc, hc).weight, atol_frac=1e-6)
    curve = np.linspace(0.99, 0.2, n // 2 + 1)
    vh = reconstruct(host, curve)
    vd = reconstruct(g, dev.asarray(curve))
    close(vd, vh, atol_frac=1e-4)
    close(fsc(vd, dev.asarray(vol)), fsc(vh, vol), atol_frac=1e-4)
    r = 3.2  # a band well inside the box: the half-map FSC from the band operators
    hb, gb = crop_grids(host, r), crop_grids(g, r)
    close(half_map_fsc(gb, gb), half_map_fsc(hb, hb), atol_frac=1e-5)
    close(band_spectrum(gb, 5, dev.asarray(curve)), band_spectrum(hb, 5, curve), atol_frac=1e-5)
    noisy = vh + 0.1 * np.random.default_rng(0).standard_normal(vh.shape).astype(np.float32)
    host_set = fsc_set(vh, noisy, 2.0, rng=np.random.default_rng(1))
    dev_set = fsc_set(vd, dev.asarray(noisy), 2.0, rng=np.random.default_rng(1))
    assert set(dev_set) == set(host_set)
    for key, curve_h in host_set.items():
        np.testing.assert_allclose(backend.to_host(dev_set[key]), curve_h, atol=2e-3, err_msg=key)
    m_host = mask_from_map(vol, 0.5 * float(vol.max()), dilate_px=2.0, soft_px=2.0)
    close(
        mask_from_map(dev.asarray(vol), 0.5 * float(vol.max()), dilate_px=2.0, soft_px=2.0),
        m_host,
        atol_frac=1e-5,
    )
    close(spherical_window(n, xp=dev), spherical_window(n))


def test_estep_and_noise(dev):
    """Coarse-to-fine E-step on device arrays: same classes, poses, shifts, posteriors."""
    vols, R_true, s_true, ctf, cls, imgs, noise = _recovery_case(0.5, B=24, n=32, K=2)
    r = 10
    params = SearchParams(
        radius_final=r,
        radius_coarse=7,
        order_coarse=1,
        order_final=2,
        shift_range_px=4,
        shift_step_px=2,
        climb_steps=1,
    )

    def run(xp):
        band = alignment_band(32, r, xp)
        c = ctf.to(xp)
        prep = prepare_particles(xp.asarray(imgs), c, PSIZE_A, band, normalize=False)
        noise_prep = prepare_particles(xp.asarray(noise), c, PSIZE_A, band, normalize=False)
        sigma2 = sigma2_from_residuals(noise_prep.y, band.shell, r + 2)
        fmaps = [prepare_fourier_map(xp.asarray(v), r_max=r + 1) for v in vols]
        return sigma2, estep(prep, fmaps, sigma2, params, class_prior=xp.asarray([0.4, 0.6]))

    s_h, host = run(np)
    s_d, res = run(dev)
    close(s_d, s_h, atol_frac=1e-5)
    assert np.array_equal(on_device(res.best_class), host.best_class)
    assert np.mean(on_device(res.rot_id) == host.rot_id) >= 0.95
    np.testing.assert_allclose(on_device(res.class_posterior), host.class_posterior, atol=1e-3)
    np.testing.assert_allclose(on_device(res.shift_px), host.shift_px, atol=1e-4)
    close(res.ll_best, host.ll_best, rtol=1e-4, atol_frac=1e-4)
    assert np.array_equal(on_device(res.pose_ids)[:, :, 0], host.pose_ids[:, :, 0])


def test_align3d(dev):
    vol = smooth_volume(16, 3.0, seed=2)
    moved = np.roll(vol, (2, -1, 1), axis=(0, 1, 2))
    vols = np.stack([vol, moved])
    pairs = np.array([[0, 1]])
    h = align_pairs(vols, pairs, 4.0)
    d = align_pairs(dev.asarray(vols), pairs, 4.0)
    np.testing.assert_allclose(h.shift_px[0], [-1, 1, -2], atol=1e-3)  # undoes the roll (x, y, z)
    for f in ("correlation", "shift_px", "flipped"):
        np.testing.assert_allclose(backend.to_host(getattr(d, f)), getattr(h, f), atol=1e-4)


# ---------------------------------------------------------------- deterministic backprojection


@pytest.mark.parametrize(
    "backend_name", ["numpy", "fake", pytest.param("cupy", marks=pytest.mark.gpu)]
)
def test_deterministic_backprojection_is_order_independent(backend_name, monkeypatch):
    """deterministic=True: bitwise the same grids for any particle order and batching, no
    atomic scatter on the device, and equal to the default scatter within float rounding."""
    if backend_name == "fake":
        xp = fake_cupy.install(monkeypatch)
    else:
        xp = np if backend_name == "numpy" else pytest.importorskip("cupy")
    n = 16
    vol = smooth_volume(n, 3.0, seed=7)
    R, kx, ky, C, Y = simulate(vol, 80, seed=7, noise_sd=0.05)
    vals, wts = C * Y, (C**2).astype(np.float32)

    def run(perm, deterministic, chunk_points=1 << 18):
        g = new_grids(n, xp=xp)
        # a non-zero start: the call's sums are added to what the grids held
        g.weight += xp.asarray(np.float32(0.1))
        backproject(
            g,
            xp.asarray(R[perm]),
            xp.asarray(vals[perm]),
            xp.asarray(wts[perm]),
            kx,
            ky,
            chunk_points=chunk_points,
            deterministic=deterministic,
        )
        return backend.to_host(g.data), backend.to_host(g.weight)

    ident = np.arange(80)
    ref = run(ident, True)
    fake_cupy.scatter_add_calls.clear()
    for seed in range(3):
        perm = np.random.default_rng(seed).permutation(80)
        for chunk in (1 << 18, 3000):  # one batch, and ~8 particles per batch
            got = run(perm, True, chunk)
            assert got[0].tobytes() == ref[0].tobytes() and got[1].tobytes() == ref[1].tobytes()
    assert fake_cupy.scatter_add_calls == []  # no atomics in deterministic mode
    default = run(ident, False)
    for a, b in zip(ref, default, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * np.abs(b).max())
    # float64 sums rounded once: no less accurate than float32 accumulation (oracle: float64 grids)
    g64 = new_grids(n, double=True)
    g64.weight += 0.1
    backproject(g64, R, vals, wts, kx, ky)
    err = [np.abs(w - g64.weight).max() for w in (ref[1], default[1])]
    assert err[0] <= err[1]


# ---------------------------------------------------------------- scoring precision


def test_round_to_tf32_and_products():
    """TF32 keeps 10 mantissa bits (ties away from zero); 3xTF32 is about float32-accurate."""
    x = np.array([1 + 2**-10, 1 + 2**-11, 1 + 2**-12, -(1 + 2**-11), 3.0, 0.0], np.float32)
    want = np.array([1 + 2**-10, 1 + 2**-10, 1, -(1 + 2**-10), 3.0, 0.0], np.float32)
    assert np.array_equal(round_to_tf32(x), want)
    v = np.random.default_rng(0).standard_normal(10000).astype(np.float32)
    rel = np.abs(round_to_tf32(v) / v - 1)
    assert rel.max() <= 2.0**-11 and rel.max() > 2.0**-12
    rng = np.random.default_rng(1)
    a = rng.standard_normal((64, 300)).astype(np.float32)
    b = rng.standard_normal((300, 50)).astype(np.float32)
    exact = a.astype(np.float64) @ b
    err = {p: np.abs(scoring_matmul(a, b, p) - exact).max() for p in PRECISIONS}
    assert err["tf32"] > 30 * err["float32"]  # the emulation is in effect
    assert err["3xtf32"] < 3 * err["float32"]
    with pytest.raises(ValueError, match="precision"):
        SearchParams(radius_final=8, precision="fp16")


@pytest.mark.parametrize(
    "backend_name", ["numpy", "fake", pytest.param("cupy", marks=pytest.mark.gpu)]
)
def test_tf32_scoring_agrees_with_float32(backend_name, monkeypatch):
    """K=2, box 32, SNR 0.05 (60 particles): with TF32 (emulated on CPU, tensor cores on a GPU)
    and 3xTF32 the best class is the same, the best pose lies within one angular step of
    float32's, and class posteriors differ by at most 0.02 (TF32) / 1e-3 (3xTF32)
    (measured: 2.3e-3 / 1.4e-5, poses identical)."""
    if backend_name == "fake":
        xp = fake_cupy.install(monkeypatch)
    else:
        xp = np if backend_name == "numpy" else pytest.importorskip("cupy")
    vols, _, _, ctf, _, imgs, noise = _recovery_case(0.05, B=60, n=32, K=2)
    r = 12
    band = alignment_band(32, r, xp)
    prep = prepare_particles(xp.asarray(imgs), ctf.to(xp), PSIZE_A, band, normalize=False)
    noise_y = prepare_particles(xp.asarray(noise), ctf.to(xp), PSIZE_A, band, normalize=False).y
    sigma2 = sigma2_from_residuals(noise_y, band.shell, r + 2)
    fmaps = [prepare_fourier_map(xp.asarray(v), r_max=r + 1) for v in vols]
    res = {}
    for p in PRECISIONS:
        params = SearchParams(
            radius_final=r,
            radius_coarse=8,
            order_coarse=1,
            order_final=2,
            shift_range_px=4,
            shift_step_px=2,
            precision=p,
        )
        res[p] = estep(prep, fmaps, sigma2, params)
    ref = res["float32"]
    cls = backend.to_host(ref.best_class)
    rows = np.arange(cls.size)
    R_ref = backend.to_host(ref.rotation)[rows, cls].astype(np.float64)
    for p, tol in (("tf32", 0.02), ("3xtf32", 1e-3)):
        got = res[p]
        assert np.array_equal(backend.to_host(got.best_class), cls), p
        R = backend.to_host(got.rotation)[rows, cls].astype(np.float64)
        assert np.rad2deg(angle_between(R, R_ref)).max() <= grids.angular_step_deg(2), p
        post = backend.to_host(got.class_posterior)
        assert np.abs(post - backend.to_host(ref.class_posterior)).max() <= tol, p


def test_mstep_backproject_particles(dev):
    """jobs.mstep.backproject_particles (image spectra, CTF, shifts, halves) on the device."""
    from hetero_dask.jobs.mstep import backproject_particles, empty_partial

    vols, R_true, s_true, ctf, _, imgs, _ = _recovery_case(None, B=12, n=24, K=1)
    rot, sh = R_true[:, None], s_true[:, None]
    w, halves = np.full((12, 1), 0.5, np.float32), np.arange(12) % 2
    host = empty_partial(1, 24)
    backproject_particles(host, imgs, ctf, PSIZE_A, rot, sh, w, 0, halves)
    part = empty_partial(1, 24, xp=dev)
    backproject_particles(part, dev.asarray(imgs), ctf, PSIZE_A, rot, sh, w, 0, halves)
    for key, g in host.grids.items():
        close(part.grids[key].data, g.data, atol_frac=1e-5)
        close(part.grids[key].weight, g.weight, atol_frac=1e-5)

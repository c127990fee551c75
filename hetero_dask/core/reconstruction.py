"""Volumes from backprojected grids: Wiener-regularised division, inverse FFT, gridding correction.

DESIGN.md, as RELION's ``BackProjector::reconstruct``:
``V = B / max(W + 1/tau2(shell), floor(shell))`` with
``1/tau2 = mean_shell(W) / (T * SSNR)``, ``SSNR = FSC / (1 - FSC)`` and the
FSC clipped to [0.001, 0.999] (shells the curve does not reach count as
0.001); ``floor = 1e-3 * mean_shell(W)``. Without an FSC the map is the
unregularised ``B / max(W, floor)``. Shells are ``round(r_padded / pad)`` in
cycles per original box, the FSC's shells; only voxels with
``r_padded < pad * r_max`` are kept.

Scale: projections are the unnormalised DFT of the volume (the padded grid
at ``pad * k`` equals the box-``n`` DFT at ``k``), so ``B / W`` estimates the
padded volume's DFT and the inverse FFT (which divides by ``(pad n)^3``)
returns the map in the input's units. Trilinear backprojection convolves the
spectrum with a triangle kernel, i.e. multiplies the padded real-space map by
``sinc^2`` per axis: it is divided out after cropping to ``n``.
"""

from __future__ import annotations

from .backend import xp_of
from .backprojector import BackprojGrids, hermitian_x0
from .projector import gridding_correction


def _shell_geometry(grids: BackprojGrids):
    """Per-voxel shell index, inside-``r_max`` mask and Friedel multiplicity of the half-grid."""
    xp = xp_of(grids.data)
    h = grids.half_width
    c = xp.arange(-h, h + 1, dtype=xp.float32)
    x = xp.arange(h + 1, dtype=xp.float32)
    r = xp.sqrt(c[:, None, None] ** 2 + c[None, :, None] ** 2 + x[None, None, :] ** 2)
    inside = r < grids.pad * grids.r_max
    shell = xp.rint(r / grids.pad).astype(xp.int64)
    # Voxels with x > 0 stand for themselves and their Friedel mates.
    mult = xp.where(x > 0, 2.0, 1.0)[None, None, :] * xp.ones_like(r)
    return shell, inside, mult


def shell_mean_weight(grids: BackprojGrids, weight_full=None):
    """Mean of the (completed) weight grid over each shell ``0 .. ceil(r_max)``, float64."""
    xp = xp_of(grids.data)
    W = hermitian_x0(grids.weight) if weight_full is None else weight_full
    shell, inside, mult = _shell_geometry(grids)
    idx = shell[inside]
    m = int(xp.max(idx)) + 1 if idx.size else 1
    s = xp.bincount(idx, weights=(W * mult)[inside].astype(xp.float64), minlength=m)
    cnt = xp.bincount(idx, weights=mult[inside].astype(xp.float64), minlength=m)
    return s / xp.maximum(cnt, 1.0)


def ssnr_from_fsc(fsc, n_shells: int, xp):
    """``FSC / (1 - FSC)`` per shell ``(n_shells,)``, FSC clipped to [0.001, 0.999], missing shells 0.001."""
    f = xp.full(n_shells, 0.001, dtype=xp.float64)
    c = xp.asarray(fsc, dtype=xp.float64)[:n_shells]
    f[: c.shape[0]] = xp.clip(c, 0.001, 0.999)
    return f / (1.0 - f)


def reconstruct(
    grids: BackprojGrids, fsc=None, tau2_fudge: float = 1.0, weight_floor: float = 1e-3
):
    """Real-space volume ``(n, n, n)`` float32 from accumulated grids.

    ``fsc``: per-shell FSC ``(n // 2 + 1,)`` (shell = radius in cycles per
    box) for the Wiener prior; pass the half-map FSC for a half-map, and
    :func:`hetero_dask.core.fsc.full_map_fsc` of it for the full map.
    ``tau2_fudge``: the regularisation parameter T (RELION's tau2_fudge).
    ``fsc=None`` gives the unregularised ``B / max(W, floor)``.
    """
    xp = xp_of(grids.data)
    n, pad = grids.n, grids.pad
    B = hermitian_x0(grids.data)
    W = hermitian_x0(grids.weight).astype(xp.float64)
    shell, inside, _ = _shell_geometry(grids)
    mean_w = shell_mean_weight(grids, W)
    shell = xp.minimum(shell, mean_w.shape[0] - 1)
    mean_at = mean_w[shell]
    denom = W
    if fsc is not None:
        ssnr = ssnr_from_fsc(fsc, mean_w.shape[0], xp)
        denom = denom + mean_at / (tau2_fudge * ssnr[shell])
    denom = xp.maximum(denom, weight_floor * mean_at)
    ok = inside & (denom > 0)
    V = xp.where(ok, B / xp.where(ok, denom, 1.0), 0).astype(xp.complex128)
    return _to_real_space(V, n, pad)


def _to_real_space(V_half, n: int, pad: int):
    """Inverse FFT of a completed half-grid spectrum, crop to ``n``, divide by the gridding factor."""
    xp = xp_of(V_half)
    D = pad * n
    h = V_half.shape[-1] - 1
    he = min(h, (D - 1) // 2)
    c = D // 2
    spec = xp.zeros((D, D, D // 2 + 1), dtype=V_half.dtype)
    spec[c - he : c + he + 1, c - he : c + he + 1, : he + 1] = V_half[
        h - he : h + he + 1, h - he : h + he + 1, : he + 1
    ]
    spec = xp.fft.ifftshift(spec, axes=(0, 1))
    vol = xp.fft.fftshift(xp.fft.irfftn(spec, s=(D, D, D), axes=(0, 1, 2)))
    o = c - n // 2
    vol = vol[o : o + n, o : o + n, o : o + n]
    return (vol / gridding_correction(n, pad, xp)).astype(xp.float32)

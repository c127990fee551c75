"""Centred Fourier transforms and helpers for images ``(..., N, N)`` and volumes ``(N, N, N)``.

Conventions:

* Real-space origin at index ``N // 2`` along each axis (RELION's centre).
* Centred transforms put frequency 0 at index ``N // 2``; the forward
  transform is unnormalised (numpy's ``fft``), the inverse divides by N^d.
* Array axes are (z, y, x) for volumes and (y, x) for images; a frequency
  vector is written (kx, ky[, kz]) in cycles per box (integers on the grid).
* A frequency in 1/A is ``k / (N * psize_A)``.
* ``translate_ft(F, s)`` moves image content by ``+s`` pixels:
  ``F * exp(-2 pi i k.s / N)``. The particle image model uses
  ``exp(+2 pi i k.s / N)`` with ``s`` the CryoSPARC shift / RELION origin, so
  centring a particle is ``translate_ft(F, s)``.
"""

from __future__ import annotations

import numpy as np

from .backend import xp_of


def fftnc(x, axes=None):
    """Centred forward FFT over ``axes`` (default: all)."""
    xp = xp_of(x)
    axes = tuple(range(x.ndim)) if axes is None else axes
    return xp.fft.fftshift(xp.fft.fftn(xp.fft.ifftshift(x, axes=axes), axes=axes), axes=axes)


def ifftnc(X, axes=None):
    """Centred inverse FFT over ``axes`` (default: all)."""
    xp = xp_of(X)
    axes = tuple(range(X.ndim)) if axes is None else axes
    return xp.fft.fftshift(xp.fft.ifftn(xp.fft.ifftshift(X, axes=axes), axes=axes), axes=axes)


def fft_functions(xp, *names: str, overwrite_x: bool = False) -> tuple:
    """The 1D transforms ``names`` (e.g. ``"fft"``, ``"irfft"``) of namespace ``xp``, called as
    ``f(a, n=..., axis=...)``: on numpy scipy's, in the input's precision (numpy's compute in
    double) and with the task's cores (:func:`hetero_dask.core.scoring.cpu_threads`);
    ``overwrite_x`` lets them overwrite an input that is a temporary."""
    if xp is not np:
        return tuple(getattr(xp.fft, name) for name in names)
    import functools  # noqa: PLC0415

    import scipy.fft  # noqa: PLC0415

    from .scoring import cpu_threads  # noqa: PLC0415

    workers = cpu_threads()
    return tuple(functools.partial(getattr(scipy.fft, name), overwrite_x=overwrite_x, workers=workers)
                 for name in names)


def fft2c(images):
    """Centred 2D FFT of images ``(..., N, N)``."""
    return fftnc(images, axes=(-2, -1))


def ifft2c(F):
    """Centred inverse 2D FFT of ``(..., N, N)``."""
    return ifftnc(F, axes=(-2, -1))


def fft3c(vol):
    """Centred 3D FFT of a volume ``(N, N, N)`` (or a stack ``(..., N, N, N)``)."""
    return fftnc(vol, axes=(-3, -2, -1))


def ifft3c(F):
    """Centred inverse 3D FFT."""
    return ifftnc(F, axes=(-3, -2, -1))


def freq_1d(n: int, xp):
    """Integer frequencies of a centred axis of length ``n``: ``-n//2 .. n - n//2 - 1``."""
    return xp.arange(n) - n // 2


def freq_grid_2d(n: int, xp):
    """Centred integer frequency grids ``(kx, ky)``, each ``(n, n)`` indexed [y, x]."""
    k = freq_1d(n, xp)
    ky, kx = xp.meshgrid(k, k, indexing="ij")
    return kx, ky


def radius_2d(n: int, xp):
    """Frequency radius (in cycles per box) of a centred ``(n, n)`` grid."""
    kx, ky = freq_grid_2d(n, xp)
    return xp.sqrt(kx**2 + ky**2)


def radius_3d(n: int, xp):
    """Frequency radius of a centred ``(n, n, n)`` grid."""
    k = freq_1d(n, xp)
    kz, ky, kx = xp.meshgrid(k, k, k, indexing="ij")
    return xp.sqrt(kx**2 + ky**2 + kz**2)


def shell_index(radius, n_shells: int | None = None):
    """Integer shell index (rounded radius); values >= ``n_shells`` are clipped to ``n_shells``."""
    xp = xp_of(radius)
    idx = xp.rint(radius).astype(xp.int64)
    if n_shells is not None:
        idx = xp.minimum(idx, n_shells)
    return idx


def shell_average(values, radius, n_shells: int):
    """Mean of ``values`` over integer shells 0..n_shells-1 of ``radius`` (real input)."""
    xp = xp_of(values)
    idx = shell_index(radius, n_shells).ravel()
    w = xp.bincount(idx, minlength=n_shells + 1)[:n_shells]
    s = xp.bincount(idx, weights=values.ravel(), minlength=n_shells + 1)[:n_shells]
    return s / xp.maximum(w, 1)


def _resize_axes(F, new_n: int, axes):
    """Crop or zero-pad a centred spectrum to ``new_n`` along ``axes``."""
    xp = xp_of(F)
    old_n = F.shape[axes[0]]
    if new_n == old_n:
        return F
    shape = list(F.shape)
    for a in axes:
        shape[a] = new_n
    out = xp.zeros(shape, dtype=F.dtype)
    m = min(old_n, new_n)
    src = [slice(None)] * F.ndim
    dst = [slice(None)] * F.ndim
    for a in axes:
        src[a] = slice(old_n // 2 - m // 2, old_n // 2 - m // 2 + m)
        dst[a] = slice(new_n // 2 - m // 2, new_n // 2 - m // 2 + m)
    out[tuple(dst)] = F[tuple(src)]
    return out


def fourier_resize(x, new_n: int, ndim: int):
    """Change the box of real-space images (ndim=2) or volumes (ndim=3) by Fourier crop/pad.

    Pixel values keep their scale (a constant image stays the same constant);
    the pixel size changes as ``psize_new = psize_old * old_n / new_n``.
    """
    xp = xp_of(x)
    axes = tuple(range(-ndim, 0))
    old_n = x.shape[-1]
    if new_n == old_n:
        return x
    F = fftnc(x, axes=axes)
    G = _resize_axes(F, new_n, axes)
    if new_n < old_n and new_n % 2 == 0:
        # The Nyquist row of an even crop holds only half of a conjugate pair: drop it.
        idx = [slice(None)] * G.ndim
        for a in axes:
            idx_a = list(idx)
            idx_a[a] = 0
            G[tuple(idx_a)] = 0
    out = ifftnc(G, axes=axes).real * (new_n / old_n) ** ndim
    return out.astype(xp.float32 if x.dtype == xp.float32 else x.dtype, copy=False)


def translate_ft(F, shifts_px, n: int | None = None):
    """Move the content of centred 2D spectra ``(..., N, N)`` by ``shifts_px`` ``(..., 2)`` (x, y) pixels."""
    xp = xp_of(F)
    n = F.shape[-1] if n is None else n
    kx, ky = freq_grid_2d(F.shape[-1], xp)
    s = xp.asarray(shifts_px)
    phase = -2.0 * xp.pi * (kx * s[..., 0, None, None] + ky * s[..., 1, None, None]) / n
    return F * xp.exp(1j * phase).astype(F.dtype if xp.iscomplexobj(F) else xp.complex64)


def soft_edge(radius, r_inner, width):
    """Raised-cosine edge: 1 for radius <= r_inner, 0 beyond r_inner + width."""
    xp = xp_of(radius)
    if width <= 0:
        return (radius <= r_inner).astype(xp.float32)
    t = xp.clip((radius - r_inner) / width, 0.0, 1.0)
    return (0.5 * (1.0 + xp.cos(xp.pi * t))).astype(xp.float32)


def lowpass(x, resolution_A: float, psize_A: float, ndim: int, width_shells: float = 3.0):
    """Low-pass images (ndim=2) or a volume (ndim=3) to ``resolution_A`` with a cosine edge."""
    xp = xp_of(x)
    n = x.shape[-1]
    axes = tuple(range(-ndim, 0))
    r = radius_2d(n, xp) if ndim == 2 else radius_3d(n, xp)
    r_cut = n * psize_A / resolution_A
    filt = soft_edge(r, r_cut - width_shells / 2, width_shells)
    return ifftnc(fftnc(x, axes=axes) * filt, axes=axes).real.astype(x.dtype, copy=False)


def resolution_to_radius(resolution_A: float, n: int, psize_A: float) -> float:
    """Fourier radius (cycles per box) of a resolution in A."""
    return n * psize_A / resolution_A


def radius_to_resolution(radius: float, n: int, psize_A: float) -> float:
    """Resolution in A of a Fourier radius (cycles per box)."""
    return n * psize_A / radius if radius > 0 else float("inf")

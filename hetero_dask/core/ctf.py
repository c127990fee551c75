"""Contrast transfer function, as RELION's ``ctf.cpp`` computes it (README, Conventions).

lambda = 12.2643247 / sqrt(V (1 + 0.978466e-6 V)) A;
defocus(alpha) = 0.5 [(dU + dV) + (dU - dV) cos 2(alpha - theta)];
chi = pi lambda df s^2 - pi/2 Cs lambda^3 s^4 + phase_shift;
CTF = (sqrt(1 - w^2) sin chi + w cos chi) exp(-B s^2 / 4) * scale.

Parameters use CryoSPARC's names and units (``df1_A``, ``df2_A``,
``df_angle_rad``, ``accel_kv``, ``cs_mm``, ``amp_contrast``,
``phase_shift_rad``, ``bfactor``, ``scale``); each may be a scalar or an
array ``(B,)`` over particles.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from .backend import to_host, xp_of


def electron_wavelength_A(accel_kv):
    """Relativistic electron wavelength in A for an acceleration voltage in kV."""
    v = accel_kv * 1e3
    return 12.2643247 / (v * (1.0 + 0.978466e-6 * v)) ** 0.5


@dataclass
class CTFParams:
    """Per-particle CTF parameters (arrays ``(B,)`` or scalars), CryoSPARC names and units."""

    df1_A: object
    df2_A: object
    df_angle_rad: object
    accel_kv: object = 300.0
    cs_mm: object = 2.7
    amp_contrast: object = 0.1
    phase_shift_rad: object = 0.0
    bfactor: object = 0.0
    scale: object = 1.0

    def subset(self, idx) -> CTFParams:
        """Parameters of the particles ``idx`` (scalars are kept as they are)."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = v[idx] if getattr(v, "ndim", 0) > 0 else v
        return CTFParams(**out)

    def to(self, xp) -> CTFParams:
        """The same parameters as arrays of namespace ``xp``."""
        return CTFParams(**{f.name: xp.asarray(getattr(self, f.name)) for f in fields(self)})


def ctf_values(params: CTFParams, kx_invA, ky_invA):
    """CTF at frequencies ``(kx, ky)`` in 1/A.

    ``kx_invA``/``ky_invA`` have any shape ``S`` (e.g. ``(M,)`` band
    coefficients or an ``(N, N)`` grid); per-particle parameters of shape
    ``(B,)`` give a result ``(B, *S)``, scalars give ``S``. float32.
    """
    xp = xp_of(kx_invA, ky_invA)
    nd = kx_invA.ndim

    def col(v):
        a = xp.asarray(v, dtype=xp.float64)
        return a.reshape(a.shape + (1,) * nd)

    s2 = kx_invA.astype(xp.float64) ** 2 + ky_invA.astype(xp.float64) ** 2
    alpha = xp.arctan2(ky_invA.astype(xp.float64), kx_invA.astype(xp.float64))
    df1, df2, ang = col(params.df1_A), col(params.df2_A), col(params.df_angle_rad)
    df = 0.5 * ((df1 + df2) + (df1 - df2) * xp.cos(2.0 * (alpha - ang)))
    lam = electron_wavelength_A(col(params.accel_kv))
    cs_A = col(params.cs_mm) * 1e7
    chi = np.pi * lam * df * s2 - 0.5 * np.pi * cs_A * lam**3 * s2**2 + col(params.phase_shift_rad)
    w = col(params.amp_contrast)
    c = xp.sqrt(1.0 - w**2) * xp.sin(chi) + w * xp.cos(chi)
    c = c * xp.exp(-col(params.bfactor) * s2 / 4.0) * col(params.scale)
    return c.astype(xp.float32)


def ctf_image(params: CTFParams, n: int, psize_A: float, xp=np):
    """CTF on a centred ``(n, n)`` grid (per particle: ``(B, n, n)``)."""
    k = (xp.arange(n) - n // 2) / (n * psize_A)
    ky, kx = xp.meshgrid(k, k, indexing="ij")
    return ctf_values(params, kx, ky)


def ctf_band(params: CTFParams, kx, ky, n: int, psize_A: float):
    """CTF ``(B, M)`` float32 at frequencies ``kx``, ``ky`` ``(M,)`` (cycles per box), as
    :func:`ctf_values` computes it, with one ``sin`` per sample.

    The phase ``chi`` is a (B, 5) @ (5, M) product over the frequency terms
    (s^2, s^2 cos 2a, s^2 sin 2a, s^4, 1), float64; amplitude contrast folds
    into a per-particle phase offset ``atan2(w, sqrt(1 - w^2))``.
    """
    xp = xp_of(kx)
    B = int(np.asarray(to_host(xp.asarray(params.df1_A))).reshape(-1).shape[0])

    def col(v):
        return xp.broadcast_to(xp.asarray(v, dtype=xp.float64).reshape(-1), (B,))

    fx = xp.asarray(kx, dtype=xp.float64) / (n * psize_A)
    fy = xp.asarray(ky, dtype=xp.float64) / (n * psize_A)
    s2 = fx**2 + fy**2
    r2 = xp.where(s2 > 0, s2, 1.0)
    cos2a, sin2a = (fx**2 - fy**2) / r2, 2 * fx * fy / r2  # cos/sin of 2 * atan2(fy, fx)
    basis = xp.stack([s2, s2 * cos2a, s2 * sin2a, s2**2, xp.ones_like(s2)])  # (5, M)
    df1, df2, ang = col(params.df1_A), col(params.df2_A), col(params.df_angle_rad)
    lam = electron_wavelength_A(col(params.accel_kv))
    w = col(params.amp_contrast)
    hd = 0.5 * (df1 - df2)
    coef = xp.stack(
        [
            np.pi * lam * 0.5 * (df1 + df2),
            np.pi * lam * hd * xp.cos(2 * ang),
            np.pi * lam * hd * xp.sin(2 * ang),
            -0.5 * np.pi * col(params.cs_mm) * 1e7 * lam**3,
            col(params.phase_shift_rad) + xp.arctan2(w, xp.sqrt(1.0 - w**2)),
        ],
        axis=1,
    )  # (B, 5)
    c = xp.sin((coef @ basis).astype(xp.float32))
    bf = col(params.bfactor)
    if bool(xp.any(bf != 0)):
        c *= xp.exp(-bf[:, None] * s2[None, :] / 4.0).astype(xp.float32)
    scale = col(params.scale)
    if bool(xp.any(scale != 1)):
        c *= scale.astype(xp.float32)[:, None]
    return c

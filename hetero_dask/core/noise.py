"""Per-shell noise power sigma^2 for the E-step's likelihood.

``sigma2[s]`` is the mean of ``|n(k)|^2`` over the complex band coefficients of
shell ``s`` (rounded radius), with ``n`` the residual ``Y - C P`` of a particle
at its pose (weighted by pose/class posteriors where given), in the units of
:func:`hetero_dask.core.scoring.prepare_particles` spectra. Before any model
exists, the particle spectra themselves (signal + noise) give an upper bound
(RELION starts from the images' power spectrum the same way).
"""

from __future__ import annotations

import numpy as np

from .backend import to_host, xp_of


def sigma2_from_residuals(residuals, shell, n_shells: int, weights=None, floor: float = 1e-12):
    """Per-shell mean power ``(n_shells,)`` float32 of residual spectra ``(B, M)`` complex.

    ``shell`` (M,) int shell index of each coefficient; ``weights`` (B,)
    optional per-particle weights (e.g. the posterior of the pose the
    residual was taken at). Shells without coefficients get the nearest
    lower filled shell's value (shell 0 the first filled one).
    """
    xp = xp_of(residuals)
    p = residuals.real.astype(xp.float64) ** 2 + residuals.imag.astype(xp.float64) ** 2
    w = (
        xp.ones(p.shape[0], dtype=xp.float64)
        if weights is None
        else xp.asarray(weights, dtype=xp.float64)
    )
    per_coef = (w[:, None] * p).sum(axis=0) / max(float(w.sum()), 1e-300)
    shell = xp.asarray(shell)
    total = xp.bincount(shell, weights=per_coef, minlength=n_shells)[:n_shells]
    count = xp.bincount(shell, minlength=n_shells)[:n_shells]
    filled = count > 0
    if not bool(filled.any()):
        raise ValueError("no band coefficient falls in the requested shells")
    mean = xp.where(filled, total / xp.maximum(count, 1), 0.0)
    # Forward-fill empty shells from the last filled one (shell 0 from the first).
    filled_h = to_host(filled)
    idx = np.maximum.accumulate(np.where(filled_h, np.arange(n_shells), 0))
    idx[: int(np.argmax(filled_h))] = int(np.argmax(filled_h))
    mean = mean[xp.asarray(idx)]
    return xp.maximum(mean, floor).astype(xp.float32)

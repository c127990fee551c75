"""The noise model: per-shell noise power sigma2, its first estimate, its updates, its extension to more shells."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from hetero_dask.core import pose_grids
from hetero_dask.core.backend import to_host
from hetero_dask.core.noise import sigma2_from_residuals
from hetero_dask.core.scoring import alignment_band, phase_ramp, prepare_particles, project_band

from .images import normalised_images


def extend_shells(sigma2: np.ndarray, n: int) -> np.ndarray:
    """Per-shell sigma2 extended to ``n`` shells by repeating the last known value."""
    s = np.asarray(sigma2, dtype=np.float64)
    if s.shape[0] >= n:
        return s[:n]
    return np.concatenate([s, np.full(n - s.shape[0], s[-1])])


def initial_sigma2(store, box, psize, r_band, mask_radius_px, start, stop):
    """Per-shell power of the particle spectra (signal + noise; noise-dominated at low SNR)."""
    imgs = normalised_images(store, box, start, stop, mask_radius_px, np)
    band = alignment_band(box, r_band, np)
    prep = prepare_particles(imgs, None, psize, band, normalize=False, mask_radius_px=mask_radius_px)
    n_shells = int(math.ceil(r_band)) + 2
    s = sigma2_from_residuals(prep.y, band.shell, n_shells)
    s = np.asarray(s, dtype=np.float64)
    good = s > 0
    s[~good] = s[good][-1] if np.any(good) else 1.0
    s[0] = s[1]
    return s


@dataclass
class ResidualPower:
    """The E-step's noise estimate: per-shell residual power summed over particles (``num``)
    and their number (``den``)."""

    num: np.ndarray
    den: np.ndarray

    @classmethod
    def empty(cls, r_band: float) -> ResidualPower:
        num = np.zeros(int(math.ceil(r_band)) + 2)
        return cls(num, np.zeros_like(num))

    def add(self, prep, res, posterior: np.ndarray, refs, box: int, xp) -> None:
        """Add the residual power of particles ``prep`` in their best class, averaged over that
        class's significant poses by their posterior weights (``res``: the E-step's result,
        ``refs``: the Fourier maps it scored against), at unit scale, the scale the likelihood
        scores them at.

        The residual at the single best pose and least-squares scale is too small in the low
        shells that decide the alignment: the pose, shift and scale that fit an image best also
        fit part of its noise there, and a noise model that underrates those shells makes the
        posteriors overconfident. The posterior average is EM's update of the noise (as
        RELION's): the spread of the poses adds back part of what the best fit took.
        """
        band = prep.band
        best = posterior.argmax(axis=1)
        ids, weights, shifts = to_host(res.pose_ids), to_host(res.pose_weight), to_host(res.pose_shift_px)
        for k in range(len(refs)):
            idx = np.flatnonzero(best == k)
            for j in range(ids.shape[2]):
                rows = idx[ids[idx, k, j] >= 0]
                if rows.size == 0:
                    continue
                ix = xp.asarray(rows)
                R = xp.asarray(pose_grids.matrices_for(int(res.order), ids[rows, k, j]))
                P = project_band(refs[k], R, band.kx, band.ky)
                y = prep.y[ix] * phase_ramp(band.kx, band.ky, xp.asarray(shifts[rows, k, j])[:, None, :], box)[:, 0]
                w = weights[rows, k, j].astype(np.float64)
                num = to_host(sigma2_from_residuals(y - prep.ctf[ix] * P, band.shell, self.num.shape[0],
                                                    weights=xp.asarray(w)))
                self.num += num * w.sum()
            self.den += idx.size


def updated_sigma2(sigma2: np.ndarray, stats: dict, lr: float) -> np.ndarray:
    """``sigma2`` moved by ``lr`` towards the E-step's residual power (``stats``: per-shell
    ``sigma2_num`` and ``sigma2_den``); unchanged when no shell was measured."""
    good = stats["sigma2_den"] > 0
    if not np.any(good):
        return sigma2
    new = np.where(good, stats["sigma2_num"] / np.maximum(stats["sigma2_den"], 1), np.nan)
    new = _fill_nan(new)
    old = extend_shells(sigma2, new.shape[0])
    return (1 - lr) * old + lr * new if lr < 1 else new


def _fill_nan(a):
    """``a`` with each NaN (or inf) replaced by the last finite value before it (the first
    finite one at the start); all ones when none is finite."""
    a = a.copy()
    ok = np.isfinite(a)
    if not np.any(ok):
        return np.ones_like(a)
    idx = np.flatnonzero(ok)
    a[: idx[0]] = a[idx[0]]
    for i in range(len(a)):
        if not ok[i] and i > idx[0]:
            a[i] = a[i - 1]
    return a

"""The class references: starting maps brought to the refinement grid and grey scale, and
each iteration's per-(class, half) Fourier maps, read once per worker."""

from __future__ import annotations

import math

import numpy as np

from hetero_dask.core.backend import to_host
from hetero_dask.core.fourier import fourier_resize, lowpass
from hetero_dask.core.masks import spherical_window
from hetero_dask.core.projector import prepare_fourier_map
from hetero_dask.core.scoring import alignment_band, prepare_particles
from hetero_dask.core.search import SearchParams, estep
from hetero_dask.runtime.engine import worker_cached

from .images import normalised_images
from .noise import extend_shells
from .params import RefineParams


def prepare_references(volumes, psize_vol: float, box: int, psize_A: float, params: RefineParams, mask):
    """Resample references to the refinement grid, low-pass to the initial resolution, mask."""
    out = []
    for v in volumes:
        n_v = v.shape[-1]
        n_t = int(round(n_v * psize_vol / psize_A))
        if n_t % 2 != n_v % 2 and n_t > 1:
            n_t += 1 if n_t < box else -1
        w = fourier_resize(v.astype(np.float32), n_t, ndim=3) if n_t != n_v else v.astype(np.float32)
        w = _center_crop_pad(w, box)
        w = lowpass(w, params.initial_lowpass_A, psize_A, ndim=3)
        out.append(w * mask)
    return np.stack(out).astype(np.float32)


def similar_groups(refs, min_correlation: float) -> np.ndarray:
    """Groups of references ``(K, n, n, n)`` (prepared: low-passed and masked) that agree at
    least ``min_correlation`` (Pearson correlation of the maps), linked in chains (single
    linkage); returns each reference's group, numbered from 0 in order of first appearance."""
    flat = np.asarray(refs, np.float64).reshape(len(refs), -1)
    flat = flat - flat.mean(axis=1, keepdims=True)
    norm = np.linalg.norm(flat, axis=1)
    corr = (flat @ flat.T) / np.maximum(np.outer(norm, norm), np.finfo(np.float64).tiny)
    group = np.arange(len(refs))
    for k in range(len(refs)):  # each pair that agrees merges its two groups under the lower label
        for j in range(k + 1, len(refs)):
            if corr[k, j] >= min_correlation and group[j] != group[k]:
                low, high = sorted((group[k], group[j]))
                group[group == high] = low
    # every label is its group's first member, so ranking them numbers groups by first appearance
    return np.unique(group, return_inverse=True)[1].reshape(-1)


def _center_crop_pad(v, box: int):
    n = v.shape[-1]
    if n == box:
        return v
    out = np.zeros((box,) * 3, np.float32)
    m = min(n, box)
    a, b = n // 2 - m // 2, box // 2 - m // 2
    out[b:b + m, b:b + m, b:b + m] = v[a:a + m, a:a + m, a:a + m]
    return out


def mask_for(params: RefineParams, box: int, psize_A: float):
    """The soft spherical mask ``(box, box, box)`` of the maps (``mask_diameter_A``, or 85% of the box)."""
    if params.mask_diameter_A is None:
        return spherical_window(box, 0.85, 0.99)
    inner = params.mask_diameter_A / (box * psize_A)
    outer = (params.mask_diameter_outer_A or 1.2 * params.mask_diameter_A) / (box * psize_A)
    return spherical_window(box, min(inner, 1.0), min(outer, 1.0))


def estimate_scales(store, refs, box, psize, mask_radius_px, sigma2, r_align, shift_range, source="particles",
                    n=256, rounds=3):
    """Per-class grey scale of the references against the particles (median least-squares alpha).

    References from other programs come on arbitrary grey scales; the log-likelihood
    needs them in the units of the normalised particle images. A coarse search on
    ``n`` particles finds each class's best pose; alpha is the least-squares scale of
    that projection to the image. Repeated: poses found with a badly scaled reference
    are poor, with a rescaled one good. First, the particles are scored against the maps
    and the negated maps: most preferring the negated ones means inverted contrast,
    refused naming the flag that flips it (``source``: the particles, for the message).
    A class with a grey scale <= 0 keeps the scale given, with a warning.
    """
    import warnings

    from hetero_dask.jobs.contrast import refuse_inverted_fit

    stop = min(store.n, n)
    imgs = normalised_images(store, box, 0, stop, mask_radius_px, np)
    band = alignment_band(box, r_align, np)
    prep = prepare_particles(imgs, store.ctf(0, stop), psize, band, normalize=False,
                             mask_radius_px=mask_radius_px)
    search = SearchParams(radius_final=r_align, order_coarse=1, order_final=2, shift_range_px=shift_range,
                          shift_step_px=max(1.0, shift_range / 2.5))
    K = refs.shape[0]
    sigma2 = extend_shells(sigma2, int(math.ceil(r_align)) + 2)
    signed = [prepare_fourier_map(sign * refs[k], r_max=r_align + 1) for sign in (1, -1) for k in range(K)]
    best = to_host(estep(prep, signed, sigma2, search).best_class)
    refuse_inverted_fit(float(np.mean(best >= K)), stop, source)
    scales = np.ones(K)
    for _ in range(rounds):
        maps = [prepare_fourier_map(refs[k] * scales[k], r_max=r_align + 1) for k in range(K)]
        alpha = np.median(to_host(estep(prep, maps, sigma2, search).alpha), axis=0)
        scales *= np.where(alpha > 0, alpha, 1.0)
    if np.any(alpha <= 0):
        warnings.warn(f"the starting map(s) of class(es) {np.flatnonzero(alpha <= 0).tolist()} fit the particles "
                      f"with a grey scale <= 0 ({np.round(alpha, 4).tolist()}): inverted or unrelated maps, "
                      "kept at the scale given", stacklevel=2)
    return scales


def class_maps(references, references_id: str, r_band: float, xp):
    """Per (class, half) Fourier maps of this iteration's ``references`` (``(K, 2, n, n, n)``, or K
    arrays ``(2, n, n, n)``), prepared once per worker: ``references_id`` names them (new each
    iteration and run)."""

    def load():
        return [[prepare_fourier_map(xp.asarray(maps[h]), r_max=r_band + 1) for h in range(2)] for maps in references]

    return worker_cached(("maps", references_id, r_band, xp.__name__), load)

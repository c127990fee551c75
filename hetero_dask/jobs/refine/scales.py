"""Per-particle grey scales (``RefineParams.per_particle_scale``): each class's median scale,
from histograms the E-step tasks sum, and each particle's scale relative to it."""

from __future__ import annotations

import numpy as np

# Bins of the particles' grey scales (least-squares alpha at the best pose) from which the
# driver takes each class's median: fixed, so that the sums of any partitioning agree.
SCALE_BINS = np.linspace(-1.0, 3.0, 201)
MAX_RELATIVE_SCALE = 3.0


def scale_histogram(alpha: np.ndarray, posterior: np.ndarray) -> np.ndarray:
    """``(K, len(SCALE_BINS) - 1)`` float64: per class, the posterior-weighted count of the
    particles' grey scales ``alpha`` ``(B, K)`` in each bin (outside ones clipped to the ends)."""
    K = alpha.shape[1]
    edges = SCALE_BINS
    idx = np.clip(np.searchsorted(edges, np.asarray(alpha, np.float64), side="right") - 1, 0, len(edges) - 2)
    hist = np.zeros((K, len(edges) - 1))
    for k in range(K):
        np.add.at(hist[k], idx[:, k], np.asarray(posterior[:, k], np.float64))
    return hist


def median_scales(histogram: np.ndarray, previous: np.ndarray) -> np.ndarray:
    """``(K,)`` each class's median grey scale from :func:`scale_histogram` sums (the bin's
    centre); ``previous`` where a class has too little weight or a median <= 0."""
    centres = 0.5 * (SCALE_BINS[1:] + SCALE_BINS[:-1])
    out = np.array(previous, dtype=np.float64)
    for k, h in enumerate(histogram):
        total = h.sum()
        if total < 1.0:
            continue
        m = centres[min(int(np.searchsorted(np.cumsum(h), 0.5 * total)), len(centres) - 1)]
        if m > 0:
            out[k] = m
    return out


def relative_scales(alpha: np.ndarray, class_scale: np.ndarray) -> np.ndarray:
    """``(B, K)`` each particle's grey scale relative to its class's median, in
    ``[0, MAX_RELATIVE_SCALE]`` (a negative scale: no signal of the class)."""
    return np.clip(np.asarray(alpha, np.float64) / class_scale[None, :], 0.0, MAX_RELATIVE_SCALE)

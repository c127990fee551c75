"""How alike the class volumes are: prepared for comparison, then correlated pair by pair.

The volumes are Fourier-cropped to ``crop_box``, low-passed to a common
resolution, masked (the user's mask, a soft sphere of ``mask_radius`` x half the
box, or nothing) and normalised inside the mask. Correlations are taken at zero
shift (one matrix product), or with ``align_pairs`` as the best over
translations within ``max_shift_A`` and over the hand-flipped map: the K^2/2
pairs, in batches fixed by K alone, run as tasks of the engine
(:func:`hetero_dask.runtime.engine.map_items`), so the answer does not depend
on the cluster.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hetero_dask.core.align3d import align_pairs as align_volume_pairs
from hetero_dask.core.align3d import invert_alignment
from hetero_dask.core.fourier import fourier_resize, lowpass, radius_3d, soft_edge
from hetero_dask.runtime.engine import map_items

from .params import RegroupParams

# Pairs are batched by K alone, so every pair is computed the same way on 1 or 100 workers
# (the round-off of a pair's shift depends on its batch). A batch transforms the volumes of
# its two blocks (and their hand flips; see pair_blocks): about 2 (b + 1) K forward FFTs for b
# blocks, besides the K^2 inverse ones. 10 batches (b = 4) keep that near 20% at K = 50 and
# 10 task threads busy (at K = 40, 48^3 on 2 busy CPU workers 36 batches took ~1.5 x as long). A
# batch holds at least ~16 pairs, one batched FFT of align_pairs.
PAIR_BATCHES = 10
MIN_PAIRS_PER_BATCH = 16


@dataclass
class Comparison:
    """The included classes compared. Entry [i, j] of the matrices is about included classes i, j.

    correlation: (n, n); shift_px (n, n, 3) and flipped (n, n): the alignment of
    volume j onto volume i (``apply_alignment(v_j, shift, flip) ~ v_i``), in
    pixels of the comparison box, None without ``align_pairs``; box, psize_A:
    the comparison box and its voxel size; lowpass_res_A, max_shift_A (None
    without ``align_pairs``): what was used.
    """

    correlation: np.ndarray
    shift_px: np.ndarray | None
    flipped: np.ndarray | None
    box: int
    psize_A: float
    lowpass_res_A: float
    max_shift_A: float | None


def compare(prepared, psize_A: float, box_A: float, params: RegroupParams, cluster=None):
    """Correlate every pair of ``prepared`` volumes (n, b, b, b) of voxel size ``psize_A``.

    box_A: the original box in A (the default ``max_shift_A`` is 10% of it).
    cluster: where the pair alignments run (a ``Client``, a
    :class:`~hetero_dask.runtime.cluster.ClusterSpec`, started only here, or
    None for this process); unused without ``align_pairs``. Returns a
    :class:`Comparison`.
    """
    common = dict(
        box=int(prepared.shape[-1]),
        psize_A=psize_A,
        lowpass_res_A=lowpass_resolution(params, psize_A),
    )
    if not params.align_pairs:
        corr = zero_shift_correlations(prepared)
        return Comparison(corr, None, None, max_shift_A=None, **common)
    from hetero_dask.runtime.cluster import job_client

    max_shift_A = 0.1 * box_A if params.max_shift_A is None else params.max_shift_A
    with job_client(cluster) as client:
        corr, shift, flipped = aligned_correlations(prepared, max_shift_A / psize_A, client)
    return Comparison(corr, shift, flipped, max_shift_A=max_shift_A, **common)


def crop_size(n: int, params: RegroupParams) -> int:
    """Box the volumes are compared at: ``min(crop_box, n)``, rounded down to even."""
    c = min(params.crop_box, n)
    return c - (c % 2) if c < n else c


def lowpass_resolution(params: RegroupParams, psize_crop_A: float) -> float:
    """Resolution in A the cropped volumes are filtered to: the user's, else half of Nyquist."""
    return params.lowpass_res_A or 4.0 * psize_crop_A


def comparison_mask(n_crop: int, params: RegroupParams, mask=None) -> np.ndarray:
    """Mask (n_crop,)*3 float32 in [0, 1]: the user's mask cropped, a soft sphere, or ones."""
    if mask is not None:
        return np.clip(fourier_resize(np.asarray(mask, np.float32), n_crop, 3), 0.0, 1.0)
    if params.mask_radius is None:
        return np.ones((n_crop,) * 3, dtype=np.float32)
    r_px = params.mask_radius * n_crop / 2
    width = max(2.0, 0.1 * n_crop / 2)
    return soft_edge(radius_3d(n_crop, np), r_px - width, width)


def prepare_volumes(vols, psize_A: float, params: RegroupParams, mask=None):
    """Crop, low-pass, mask and normalise volumes for comparison.

    vols: (K, N, N, N) float32. Returns (prepared (K, n, n, n) float32 with zero
    mean and unit RMS inside the mask and the mask applied, psize_A of the
    cropped box, the mask used (n, n, n)).
    """
    n = vols.shape[-1]
    n_crop = crop_size(n, params)
    psize_crop = psize_A * n / n_crop
    res_A = lowpass_resolution(params, psize_crop)
    w = comparison_mask(n_crop, params, mask)
    w_sum = float(w.sum())
    out = np.empty((len(vols), n_crop, n_crop, n_crop), dtype=np.float32)
    for i, v in enumerate(vols):  # one volume at a time bounds memory at K = 50, box 256
        c = lowpass(fourier_resize(np.asarray(v, np.float32), n_crop, 3), res_A, psize_crop, 3)
        c = c - float((w * c).sum()) / w_sum
        rms = np.sqrt(float((w * c * c).sum()) / w_sum)
        out[i] = w * c / (rms if rms > 0 else 1.0)
    return out, psize_crop, w


def zero_shift_correlations(prepared) -> np.ndarray:
    """(K, K) normalised correlations at zero shift (one matrix product)."""
    flat = prepared.reshape(len(prepared), -1).astype(np.float64)
    norms = np.linalg.norm(flat, axis=1)
    norms = np.where(norms > 0, norms, 1.0)
    c = (flat @ flat.T) / np.outer(norms, norms)
    np.fill_diagonal(c, 1.0)
    return c


def pair_blocks(k: int, n_tasks: int) -> list[np.ndarray]:
    """All pairs (i < j) of k items as about ``n_tasks`` batches of (P, 2) pairs, tiled in blocks.

    The items are cut into b blocks and a batch holds the pairs between two blocks
    (or within one), so a task transforms only ~2k/b volumes instead of all k.
    """
    b = 1
    while b * (b + 1) // 2 < n_tasks and b < k:
        b += 1
    blocks = np.array_split(np.arange(k), b)
    batches = []
    for bi in range(b):
        for bj in range(bi, b):
            i, j = np.meshgrid(blocks[bi], blocks[bj], indexing="ij")
            sel = i < j
            if sel.any():
                batches.append(np.stack([i[sel], j[sel]], axis=1))
    return batches


def pair_batches(k: int) -> list[np.ndarray]:
    """The batches of pairs of ``k`` volumes, cut by ``k`` alone (see ``PAIR_BATCHES``)."""
    n_pairs = k * (k - 1) // 2
    if n_pairs == 0:
        return []
    return pair_blocks(k, min(PAIR_BATCHES, -(-n_pairs // MIN_PAIRS_PER_BATCH)))


def align_batch(prepared, pairs, max_shift_px: float):
    """Task: align a batch of pairs on this worker's device; results on the host."""
    from hetero_dask.core.backend import to_device, worker_xp

    return align_volume_pairs(to_device(prepared, worker_xp()), pairs, max_shift_px, try_flip=True)


def aligned_correlations(prepared, max_shift_px: float, client=None):
    """Best correlation of every pair over shifts (and the hand flip), as engine tasks.

    prepared: (K, n, n, n). client: a ``distributed.Client`` or None (this
    process). Returns (correlation (K, K), shift_px (K, K, 3), flipped (K, K));
    entry [i, j] is the alignment of volume j onto volume i
    (``apply_alignment(v_j, shift, flip) ~ v_i``).
    """
    from functools import partial

    k = len(prepared)
    corr = np.eye(k)
    shift = np.zeros((k, k, 3))
    flipped = np.zeros((k, k), dtype=bool)
    batches = pair_batches(k)
    task = partial(align_batch, max_shift_px=max_shift_px)
    results = map_items(client, task, batches, shared=prepared, key_prefix="regroup-align")
    for b, res in zip(batches, results, strict=True):
        for (i, j), c, s, f in zip(b, res.correlation, res.shift_px, res.flipped, strict=True):
            corr[i, j] = corr[j, i] = c
            shift[i, j], flipped[i, j] = s, f
            shift[j, i], flipped[j, i] = invert_alignment(s, f)
    return corr, shift, flipped

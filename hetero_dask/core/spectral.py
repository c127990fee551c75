"""Spectral clustering of a few items (class volumes) from their pairwise distances.

distances (K, K) -> self-tuning Gaussian affinity (Zelnik-Manor & Perona 2004;
local scale = distance to the 3rd nearest item by default: their 7 suits large
data sets, while a superclass here often has only 3-5 member classes)
-> symmetric normalised Laplacian ``L = I - D^-1/2 A D^-1/2`` -> the M
eigenvectors of the smallest eigenvalues, rows scaled to unit length (Ng, Jordan
& Weiss 2001) -> k-means with k-means++ starts from a fixed seed, best of many.

With item sizes (particles per class), the clustering is that of the particles:
the normalised cut of the particle graph, in which two particles are joined with
the affinity of their classes (1 within a class). Its leading eigenvectors are
constant on each class, so the problem reduces exactly to K x K (see
:func:`size_weighted_embedding`), and k-means weighs each class by its size. A
class of 5 particles then moves 5 particles' worth of the cut, not a whole
class's: near-empty, noisy classes cannot pull large ones apart or together.

K is at most a few hundred, so everything here is small host (numpy) arithmetic.
The number of eigenvalues near 0 counts the well-separated groups; the largest gap
in the spectrum suggests M.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SpectralResult:
    """labels (K,) int in 0..M-1; eigenvalues (K,) ascending; affinity (K, K); embedding (K, M)."""

    labels: np.ndarray
    eigenvalues: np.ndarray
    affinity: np.ndarray
    embedding: np.ndarray


def correlation_distance(correlation) -> np.ndarray:
    """Euclidean distance between unit-norm vectors from their correlation: sqrt(2 - 2 c)."""
    c = np.asarray(correlation, dtype=np.float64)
    return np.sqrt(np.clip(2.0 - 2.0 * c, 0.0, None))


def self_tuning_affinity(distances, n_neighbors: int = 3) -> np.ndarray:
    """Affinity ``A_ij = exp(-d_ij^2 / (s_i s_j))``, ``s_i`` = distance to the n-th nearest other item.

    distances: (K, K) symmetric, zero diagonal. n_neighbors is clipped to K - 1.
    The diagonal of A is 0. A local scale of 0 (duplicates) is floored at a small
    fraction of the largest distance so that identical items get affinity 1.
    """
    d = np.asarray(distances, dtype=np.float64)
    k = d.shape[0]
    if d.shape != (k, k):
        raise ValueError(f"distances must be square (K, K), got shape {d.shape}")
    if k < 2:
        return np.zeros((k, k))
    nn = int(np.clip(n_neighbors, 1, k - 1))
    others = np.sort(d + np.diag(np.full(k, np.inf)), axis=1)
    scale = others[:, nn - 1]
    floor = 1e-6 * max(float(d.max()), 1e-12)
    scale = np.maximum(scale, floor)
    a = np.exp(-(d**2) / np.outer(scale, scale))
    np.fill_diagonal(a, 0.0)
    return a


def normalized_laplacian(affinity) -> np.ndarray:
    """``I - D^-1/2 A D^-1/2`` for a symmetric non-negative (K, K) affinity (isolated items: row of I)."""
    a = np.asarray(affinity, dtype=np.float64)
    deg = a.sum(axis=1)
    inv_sqrt = np.where(deg > 0, 1.0 / np.sqrt(np.where(deg > 0, deg, 1.0)), 0.0)
    return np.eye(a.shape[0]) - inv_sqrt[:, None] * a * inv_sqrt[None, :]


def spectral_embedding(laplacian, n_components: int) -> tuple[np.ndarray, np.ndarray]:
    """All eigenvalues (K,) ascending and the first ``n_components`` eigenvectors (K, M), rows unit length."""
    evals, evecs = np.linalg.eigh(np.asarray(laplacian, dtype=np.float64))
    u = evecs[:, :n_components]
    norms = np.linalg.norm(u, axis=1, keepdims=True)
    return evals, u / np.where(norms > 0, norms, 1.0)


def size_weighted_embedding(affinity, sizes, n_components: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`spectral_embedding` of the particle graph, reduced to one row per class.

    Particles of classes i and j are joined with weight ``A_ij`` (1 when i = j);
    a particle of class i has degree ``d_i = sum_j s_j A_ij``. The particle
    graph's normalised adjacency maps class-constant vectors ``x`` to class-
    constant vectors, and with ``y_i = sqrt(s_i) x_i`` it acts as the symmetric
    ``K x K`` matrix ``sqrt(s_i s_j) A_ij / sqrt(d_i d_j)``; vectors that sum to 0
    within a class have Laplacian eigenvalue 1 and are never among the first
    ones of a connected graph. Returns the reduced eigenvalues (K,) ascending and
    rows ``x_i`` scaled to unit length (K, n_components). Classes of size 0
    get zero rows.
    """
    a = np.array(affinity, dtype=np.float64)
    s = np.asarray(sizes, dtype=np.float64)
    if s.shape != (a.shape[0],) or np.any(s < 0):
        raise ValueError(f"sizes must be {a.shape[0]} non-negative counts, got {s.tolist()}")
    np.fill_diagonal(a, 1.0)
    deg = a @ s
    root = np.sqrt(s)
    inv = np.where(deg > 0, 1.0 / np.sqrt(np.where(deg > 0, deg, 1.0)), 0.0)
    m = (root * inv)[:, None] * a * (root * inv)[None, :]
    evals, evecs = np.linalg.eigh(np.eye(len(s)) - m)
    x = evecs[:, :n_components] * np.where(s > 0, 1.0 / np.where(s > 0, root, 1.0), 0.0)[:, None]
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return evals, x / np.where(norms > 0, norms, 1.0)


def _kmeans_pp_init(points, n_clusters: int, rng, weights) -> np.ndarray:
    """k-means++ seeding: centres drawn with probability proportional to weight x squared distance."""
    p0 = weights / weights.sum()
    centers = [points[rng.choice(len(points), p=p0)]]
    for _ in range(1, n_clusters):
        d2 = np.min(((points[:, None, :] - np.asarray(centers)[None]) ** 2).sum(-1), axis=1)
        d2 = d2 * weights
        total = d2.sum()
        idx = rng.choice(len(points), p=d2 / total) if total > 0 else rng.choice(len(points), p=p0)
        centers.append(points[idx])
    return np.asarray(centers)


def _lloyd(points, centers, max_iter: int, weights) -> tuple[np.ndarray, np.ndarray, float]:
    """Weighted Lloyd iterations from ``centers``; an emptied cluster keeps its previous centre."""
    labels = None
    for _ in range(max_iter):
        d2 = ((points[:, None, :] - centers[None]) ** 2).sum(-1)
        new = np.argmin(d2, axis=1)
        if labels is not None and np.array_equal(new, labels):
            break
        labels = new
        for c in range(len(centers)):
            member = labels == c
            if weights[member].sum() > 0:
                centers[c] = np.average(points[member], axis=0, weights=weights[member])
    d2 = ((points[:, None, :] - centers[None]) ** 2).sum(-1)
    labels = np.argmin(d2, axis=1)
    return labels, centers, float((weights * d2[np.arange(len(points)), labels]).sum())


def kmeans(
    points, n_clusters: int, n_init: int = 100, seed: int = 0, max_iter: int = 300, weights=None
):
    """Best-of-``n_init`` k-means (k-means++ starts from ``seed``) of points (K, D).

    ``weights`` (K,): each point counts this many times (None: 1 each).
    Returns (labels (K,), centers (M, D), inertia). Deterministic for a given seed.
    """
    pts = np.asarray(points, dtype=np.float64)
    if not 1 <= n_clusters <= len(pts):
        raise ValueError(f"n_clusters must be in 1..{len(pts)}, got {n_clusters}")
    w = np.ones(len(pts)) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (len(pts),) or np.any(w < 0) or np.count_nonzero(w) < n_clusters:
        raise ValueError(f"weights must be {len(pts)} non-negative values, >= {n_clusters} of them > 0")
    rng = np.random.default_rng(seed)
    best = None
    for _ in range(max(1, n_init)):
        start = _kmeans_pp_init(pts, n_clusters, rng, w)
        labels, centers, inertia = _lloyd(pts, start, max_iter, w)
        if best is None or inertia < best[2] - 1e-12:
            best = (labels, centers, inertia)
    return best


def spectral_cluster(
    distances,
    n_clusters: int,
    n_neighbors: int = 3,
    n_init: int = 100,
    seed: int = 0,
    sizes=None,
) -> SpectralResult:
    """Cluster K items with pairwise ``distances`` (K, K) into ``n_clusters`` groups.

    ``sizes`` (K,): particles per item; given, the particles are clustered
    (:func:`size_weighted_embedding`, size-weighted k-means); None: every item
    counts once. Labels are renumbered by first appearance (item 0 is in
    cluster 0), so the result does not depend on k-means' arbitrary cluster order.
    """
    a = self_tuning_affinity(distances, n_neighbors)
    if sizes is None:
        evals, u = spectral_embedding(normalized_laplacian(a), n_clusters)
    else:
        evals, u = size_weighted_embedding(a, sizes, n_clusters)
    labels, _, _ = kmeans(u, n_clusters, n_init=n_init, seed=seed, weights=sizes)
    _, first = np.unique(labels, return_index=True)
    order = np.asarray(labels)[np.sort(first)]
    relabel = np.zeros(n_clusters, dtype=np.int64)
    relabel[order] = np.arange(len(order))
    return SpectralResult(labels=relabel[labels], eigenvalues=evals, affinity=a, embedding=u)

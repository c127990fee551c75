"""Identical starting references (a consensus map given K times) split by the particles' 3D variability."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from hetero_dask.core import pose_grids as so3
from hetero_dask.core.fourier import lowpass, resolution_to_radius
from hetero_dask.core.projector import prepare_fourier_map, stacked
from hetero_dask.core.scoring import (
    Band,
    alignment_band,
    phase_ramp,
    prepare_particles,
    project_band,
)
from hetero_dask.core.search import SearchParams, estep
from hetero_dask.runtime.engine import task_rng

from .images import normalised_images
from .noise import extend_shells
from .params import RefineParams

# Poses kept per particle; the most subspace iterations, and the settling test that ends them
# sooner (the smallest cosine of the principal angles between the components used, from one
# iteration to the next); rounds of classification in the linear model.
_SPLIT_POSES, _SPLIT_PCA_ITERATIONS, _SPLIT_PCA_SETTLED, _SPLIT_ROUNDS = 32, 8, 0.999, 3


def identical_references(refs, tol: float = 1e-3) -> bool:
    """True when all references are the same map up to ``tol`` relative difference."""
    ref0 = refs[0]
    scale = float(np.linalg.norm(ref0)) or 1.0
    return all(float(np.linalg.norm(r - ref0)) <= tol * scale for r in refs[1:])


@dataclass
class Split:
    """The split of identical references: starting maps, groups, and how it was chosen."""

    refs: np.ndarray  # (K, box, box, box)
    groups: np.ndarray  # (n,) int16
    resolution_A: float  # the split's resolution, the best separated of the candidates
    separation: dict  # candidate resolution (A) -> between / within group scatter


def split_resolutions(initial_lowpass_A: float, box: int, psize_A: float, fixed_A: float | None = None) -> list:
    """Candidate resolutions of the split, coarse to fine: ``fixed_A`` alone, else from
    ``initial_lowpass_A`` to half of it in four geometric steps, those the box reaches
    at distinct Fourier radii. Which of them shows a particle's state depends on how the
    states differ (a domain swung far apart at 30 A, a shifted domain or a missing loop
    at 10-15 A), so the data choose (:func:`split_by_variability`)."""
    wanted = [fixed_A] if fixed_A is not None else [initial_lowpass_A * 2.0 ** (-i / 3) for i in range(4)]
    out, radii = [], set()
    for res in wanted:
        r = round(_split_radius(res, box, psize_A), 3)
        if r not in radii:
            radii.add(r)
            out.append(float(res))
    return out


def _split_radius(resolution_A: float, box: int, psize_A: float) -> float:
    return min(resolution_to_radius(resolution_A, box, psize_A), box / 2 - 1)


def split_by_variability(store, consensus, K, box, psize, mask_radius_px, resolutions_A, shift_range, sigma2,
                         p: RefineParams, mask, n: int) -> Split:
    """K starting maps and particle groups from one consensus map, at the candidate resolution
    (``resolutions_A``) whose groups are best separated.

    At each resolution the first ``n`` particles are split (:func:`_split_at`); the groups'
    separation is the ratio of between-group to within-group scatter of the particles'
    coordinates. Groups cut out of one unimodal cloud by k-means score about 1.75 (two
    halves of a Gaussian); states the residuals tell apart score higher, and the
    classification error of two Gaussians falls as their separation grows, so the best
    separated split is the one kept.
    """
    images = normalised_images(store, box, 0, n, mask_radius_px, np)  # read once for every candidate
    ctf = store.ctf(0, n)
    best, separation, V = None, {}, None
    for res_A in resolutions_A:  # each candidate's components start from the previous one's
        refs, z, groups, V = _split_at(images, ctf, consensus, K, box, psize, mask_radius_px, res_A, shift_range,
                                       sigma2, p, mask, V)
        separation[res_A] = _separation(z, groups, K)
        if best is None or separation[res_A] > separation[best[2]]:
            best = (refs, groups, res_A)
    return Split(best[0], best[1], best[2], separation)


def _separation(z, groups, K: int) -> float:
    """Between-group over within-group sum of squares of coordinates ``z`` (n, m)."""
    mu = z.mean(axis=0)
    members = [groups == k for k in range(K)]
    within = sum(float(((z[m] - z[m].mean(axis=0)) ** 2).sum()) for m in members if m.any())
    between = sum(int(m.sum()) * float(((z[m].mean(axis=0) - mu) ** 2).sum()) for m in members if m.any())
    return between / max(within, 1e-30)


def _split_at(images, ctf, consensus, K, box, psize, mask_radius_px, resolution_A, shift_range, sigma2,
              p: RefineParams, mask, start=None):
    """The split at one resolution: ``(refs (K, box, box, box), coordinates (n, K - 1), groups (n,),
    principal components (K + 1, box, box, box))``; ``start``: components to begin the
    subspace iteration from (another resolution's), else random maps.

    The ``n`` particles (``images``, normalised, and their ``ctf``) are aligned to the consensus with soft poses (their
    ``_SPLIT_POSES`` most probable poses, weighted, at sigma scale ``final_sigma_scale``):
    a particle of one state often fits the consensus best in a wrong pose, and a single
    hard pose puts that error into its residual. The residuals ``r`` (image minus the
    scaled, CTF-modulated projection, per pose) are whitened by the noise power. Then:

    1. the top ``K - 1`` principal components of the pose-weighted residual covariance
       (subspace iteration with Rayleigh-Ritz), each particle's least-squares coordinates
       on them, k-means into K groups;
    2. up to ``_SPLIT_ROUNDS`` rounds of: the groups' mean residual maps (pose-weighted
       backprojection) span a new basis, coordinates on it, k-means.

    The principal components maximise variance, which noise and pose errors share with
    the heterogeneity; the group means aim at the difference between the states (how much
    better, measured: ``benchmarks/results/refine.md``). The starting map of group k is the
    consensus plus the basis at the group's mean coordinates.
    """
    r_align = _split_radius(resolution_A, box, psize)
    res = _residuals(images, ctf, consensus, box, psize, mask_radius_px, r_align, shift_range, sigma2, p, mask,
                     resolution_A)
    V = _principal_components(res, K + 1, p.seed, K - 1, start)
    basis, z, groups = _classify(res, V[: K - 1], K, p.seed)
    centre = [z[m > 0].mean(axis=0) if m.any() else np.zeros(K - 1) for m in _members(groups, K)]
    refs = np.stack([consensus + np.tensordot(c, basis, axes=1) for c in centre]).astype(np.float32)
    return refs, z, groups.astype(np.int16), V


@dataclass
class _Residuals:
    """Whitened residuals of ``n`` particles against the consensus at their ``P`` soft poses each."""

    n: int
    P: int
    box: int
    r_align: float
    band: Band
    R: np.ndarray  # (n P, 3, 3) the poses
    w: np.ndarray  # (n, P) pose weights, zero for padding
    U: np.ndarray  # (n, P, M) C r / sigma2
    CC: np.ndarray  # (n, 1, M) C^2 / sigma2
    lowpass_A: float  # of the maps made from them, which are also masked by
    mask: np.ndarray  # (box, box, box)
    psize_A: float

    def project(self, maps):
        """``(C, n, P, M)`` projections of maps ``(C, box, box, box)`` at every particle's poses
        (the slice coordinates computed once for all C)."""
        fm = stacked([prepare_fourier_map(D, r_max=self.r_align + 1) for D in maps])
        return project_band(fm, self.R, self.band.kx, self.band.ky).reshape(len(maps), self.n, self.P, -1)

    def correlation(self, q):
        """``(n,)`` pose-weighted <C r, q> (whitened) of projections ``q`` ``(n, P, M)``."""
        return np.sum(self.w * np.sum((self.U * np.conj(q)).real, axis=2), axis=1)

    def coordinates(self, basis):
        """(n, m) least-squares coordinates of each particle's residual on ``basis`` (m maps):
        the pose-weighted normal equations sum_j w_ij <C P_j b_a, C P_j b_b> z = <C r_ij, C P_j b_a>
        (whitened), solved per particle."""
        Q = list(self.project(basis))
        rhs = np.stack([self.correlation(q) for q in Q], axis=1)
        gram = np.stack([np.stack([np.sum(self.w * np.sum(self.CC * (qa * np.conj(qb)).real, axis=2), axis=1)
                                   for qb in Q], axis=1) for qa in Q], axis=1)
        return np.linalg.solve(gram + 1e-12 * np.eye(len(Q)), (rhs - rhs.mean(axis=0))[..., None])[..., 0]

    def backproject(self, coef, member):
        """Map of sum_i coef_i A_i^T C r_i / sigma2 over sum_i member_i A_i^T C^2 / sigma2 (pose-weighted)."""
        from hetero_dask.core.backprojector import backproject as bp
        from hetero_dask.core.backprojector import new_grids
        from hetero_dask.core.reconstruction import reconstruct

        n, P, w, U = self.n, self.P, self.w, self.U
        g = new_grids(self.box, r_max=self.r_align + 1)
        bp(g, self.R, (coef[:, None, None] * w[..., None] * U).reshape(n * P, -1),
           np.broadcast_to(member[:, None, None] * w[..., None] * self.CC, U.shape).reshape(n * P, -1).astype(np.float32),
           self.band.kx, self.band.ky)
        return lowpass(reconstruct(g), self.lowpass_A, self.psize_A, 3) * self.mask


def _residuals(images, ctf, consensus, box, psize, mask_radius_px, r_align, shift_range, sigma2,
               p: RefineParams, mask, lowpass_A: float) -> _Residuals:
    """The particles aligned to the consensus with ``_SPLIT_POSES`` soft poses, and their
    residuals at each (image minus the consensus's scaled, CTF-modulated projection)."""
    n = images.shape[0]
    band = alignment_band(box, r_align, np)
    prep = prepare_particles(images, ctf, psize, band, normalize=False, mask_radius_px=mask_radius_px)
    fm = prepare_fourier_map(consensus, r_max=r_align + 1)
    s2 = extend_shells(sigma2, int(math.ceil(r_align)) + 2)
    search = SearchParams(radius_final=r_align, order_coarse=max(1, min(2, p.max_order - 1)),
                          order_final=min(3, p.max_order), shift_range_px=shift_range,
                          shift_step_px=max(1.0, shift_range / 2.5), sigma2_scale=p.final_sigma_scale ** 2,
                          n_out_poses=_SPLIT_POSES)
    res = estep(prep, [fm], s2, search)
    w = res.pose_weight[:, 0].astype(np.float32)  # (n, P), zero for padding
    P = w.shape[1]
    R = so3.matrices_for(res.order, np.maximum(res.pose_ids[:, 0], 0).ravel())  # (n P, 3, 3)
    shift = res.pose_shift_px[:, 0] - prep.center_px[:, None, :]
    y = prep.y[:, None, :] * phase_ramp(band.kx, band.ky, shift, box)
    CP = prep.ctf[:, None, :] * project_band(fm, R, band.kx, band.ky).reshape(n, P, -1)
    alpha = np.sum((y * np.conj(CP)).real, axis=2) / np.maximum(np.sum(np.abs(CP) ** 2, axis=2), 1e-30)
    inv_s2 = (1.0 / s2[band.shell]).astype(np.float32)
    U = (prep.ctf[:, None, :] * inv_s2 * (y - alpha[..., None] * CP)).astype(np.complex64)  # C r / sigma2
    CC = (prep.ctf ** 2 * inv_s2)[:, None, :]  # C^2 / sigma2
    return _Residuals(n, P, box, r_align, band, R, w, U, CC, lowpass_A, mask, psize)


def _orthonormal(maps):
    return np.linalg.qr(maps.reshape(len(maps), -1).T)[0].T.reshape(maps.shape).astype(np.float32)


def _principal_components(res: _Residuals, n_vec: int, seed: int, n_used: int, start=None):
    """``(n_vec, box, box, box)`` top principal components of the residual covariance, by subspace
    iteration with Rayleigh-Ritz: V <- Cov V, Cov V = sum_i (c_i - mean c) A_i^T C r_i / sigma2.

    From ``start`` (low-passed and masked like the components) or random maps; it stops when the
    span of the top ``n_used`` components has settled (:data:`_SPLIT_PCA_SETTLED`), or after
    :data:`_SPLIT_PCA_ITERATIONS` iterations."""
    everyone = np.ones(res.n, np.float32)
    if start is None:
        rng = task_rng(seed, 0, (0,))
        start = [rng.standard_normal((res.box,) * 3).astype(np.float32) for _ in range(n_vec)]
    V = _orthonormal(np.stack([lowpass(v, res.lowpass_A, res.psize_A, 3) * res.mask for v in start]))
    for _ in range(_SPLIT_PCA_ITERATIONS):
        W = []
        for q in res.project(V):
            c = res.correlation(q)
            W.append(res.backproject((c - c.mean()).astype(np.float32), everyone))
        W = np.stack(W)
        ev, E = np.linalg.eig((V.reshape(n_vec, -1) @ W.reshape(n_vec, -1).T).T)
        V, old = _orthonormal(np.tensordot(E[:, np.argsort(-ev.real)].real.T, W, axes=1)), V
        if _span_cosine(V[:n_used], old[:n_used]) >= _SPLIT_PCA_SETTLED:
            break
    return V


def _span_cosine(A, B) -> float:
    """Smallest cosine of the principal angles between the spans of orthonormal maps ``A`` and ``B``."""
    return float(np.linalg.svd(A.reshape(len(A), -1) @ B.reshape(len(B), -1).T, compute_uv=False).min())


def _classify(res: _Residuals, basis, K: int, seed: int):
    """``(basis, coordinates (n, K - 1), groups (n,))``: k-means of the coordinates on ``basis``,
    then rounds of: the groups' mean residual maps (over the weights of all particles, so
    that a group's sparse views do not make noisy voxels) span the new basis, k-means of the
    coordinates on it."""
    from hetero_dask.core.spectral import kmeans

    everyone = np.ones(res.n, np.float32)
    z = res.coordinates(basis)
    groups = kmeans(z, K, n_init=10, seed=seed)[0]
    for _ in range(_SPLIT_ROUNDS):
        D = np.stack([res.backproject(m * (res.n / max(m.sum(), 1.0)), everyone) for m in _members(groups, K)])
        basis = _orthonormal(D[1:] - D[0])
        z = res.coordinates(basis)
        new = kmeans(z, K, n_init=10, seed=seed)[0]
        if np.array_equal(new, groups):
            break
        groups = new
    return basis, z, groups


def _members(groups, K: int):
    """Membership ``(n,)`` float32 of each of the ``K`` groups."""
    return [(groups == k).astype(np.float32) for k in range(K)]

"""Coarse-to-fine pose and class search built on the products of :mod:`.scoring`.

Stage 0 scores every particle against the whole HEALPix grid of
``order_coarse`` x the shift grid at a low radius (one shared set of class
projections, dense products). Each later stage keeps, per particle, the
``max_poses`` best poses of EVERY class and evaluates their 8 children at the
next order, each child with a 3 x 3 shift grid at half the previous step
centred on its PARENT's own best shift, at a higher radius. Then, for the
classes holding ``keep_mass`` of the class posterior, a hill climb: the
``climb_neighbours`` grid rotations nearest to each class's best pose (same
order, shifts 3 x 3 around its shift), repeated while the best pose moves (at
most ``climb_steps`` times).
The climb matters: a fine rotation is the child of one coarse cell only,
and when the likelihood peak sits near a cell's edge that cell often ranks
far down the coarse list (order 2 -> 3, box 32, SNR 1: children alone agree
with the exhaustive search on 88-95% of particles, with the climb 99-100%
for ~1% more poses). Candidate rotations are projected once per class and
stage (the distinct set over all particles) and scored with batched
products; no Python loop runs per particle.

Pose priors are uniform within a stage, so posteriors compare scores of the
same stage. Class posteriors and pose weights come from the final stage, so
each class's evidence there must sum over a comparable set of poses: a coarse
grid ranks classes poorly when their likelihood peaks fall between its points,
and a class refined from its best coarse pose alone would lose the rest of its
mass, and with it particles that an exhaustive search gives it. Children of
``max_poses`` parents for every class cost 8 x ``max_poses`` x 9 poses per
class (576 at the defaults; an order-2 dense stage scores 4608 rotations x
the shift grid per class).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from functools import lru_cache

import numpy as np
from scipy.spatial import cKDTree
from scipy.spatial.transform import Rotation

from . import pose_grids
from .backend import to_host, xp_of
from .projector import FourierMap
from .scoring import (
    PRECISIONS,
    PreparedParticles,
    TopPoses,
    class_projections,
    cpu_threads,
    phase_ramp,
    project_band,
    score_dense,
    score_local,
    weighted_terms,
)
from .symmetry import asymmetric_unit, symmetry_group


@dataclass
class SearchParams:
    """Sampling of the E-step. Radii in cycles per box (``radius_coarse`` None: = final).

    ``max_poses``: parents kept per class between stages (children: 8 each);
    ``climb_steps`` / ``climb_neighbours``: hill-climb iterations at each fine
    stage and the grid neighbours scored around the best pose per iteration
    (0 steps: children only), for the classes that together hold ``keep_mass``
    of the class posterior. ``n_out_poses`` / ``out_mass``: the poses returned per class
    (``pose_ids``, ...), the most probable first, at most ``n_out_poses`` and no more than
    hold ``out_mass`` of the class's pose posterior. ``precision``: of the scoring products,
    ``"float32"`` (default), ``"tf32"`` or ``"3xtf32"`` (:func:`.scoring.scoring_matmul`;
    TF32 tensor cores on CuPy, emulated on numpy). ``threads``: on a CPU, particle
    blocks scored concurrently, each with single-threaded BLAS (None:
    :func:`.scoring.cpu_threads`); numpy's element-wise passes (the log-sum-exps,
    a third of the dense stage) are single-threaded, so this beats threaded BLAS alone.
    ``symmetry`` / ``symmetry_convention``: the maps' point group
    (:func:`.symmetry.symmetry_group`); where the group maps the grid onto itself the dense
    stage scores one asymmetric unit of it (:func:`coarse_rotation_ids`), so the ``max_poses``
    it keeps are distinct poses, not exact mates of each other (the finer stages may step out
    of the unit: any mate is the same pose).
    """

    radius_final: float
    radius_coarse: float | None = None
    order_coarse: int = 2
    order_final: int = 3
    shift_range_px: float = 5.0
    shift_step_px: float = 2.0
    shift_shape: str = "disc"
    max_poses: int = 8
    keep_mass: float = 0.999
    n_out_poses: int = 8
    out_mass: float = 1.0
    sigma2_scale: float = 1.0
    hard: bool = False
    max_tile_bytes: int = 16 * 2**20
    particle_chunk: int = 256
    climb_steps: int = 4
    climb_neighbours: int = 64
    precision: str = "float32"
    threads: int | None = None
    symmetry: str = "C1"
    symmetry_convention: str = "cryosparc"

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")

    def radius_at(self, stage: int) -> float:
        n_stages = self.order_final - self.order_coarse
        r0 = self.radius_final if self.radius_coarse is None else self.radius_coarse
        return r0 if n_stages == 0 else r0 + (self.radius_final - r0) * stage / n_stages


@dataclass
class EStepResult:
    """Per-particle E-step outputs (arrays of the input namespace), B particles, K classes, P poses.

    ``class_posterior`` (B, K); ``best_class`` (B,); ``ll_best`` (B, K) log-likelihood
    at the class's best pose (band at the final radius, ``sigma2_scale`` applied);
    ``error`` (B,) = -ll_best of the best class; ``log_evidence`` (B,) log sum over
    classes and evaluated poses of prior x likelihood (up to a constant);
    ``rot_id`` (B, K) grid id at ``order``; ``rotation`` (B, K, 3, 3); ``shift_px``
    (B, K, 2) absolute shifts (center + trial); ``alpha`` (B, K) least-squares scale
    of the best projection to the image; ``pose_ids``/``pose_shift_px``/``pose_weight``
    (B, K, P) the class's most probable poses with weights summing to 1 per class
    (-1 ids and weight 0 pad); ``pose_ess`` (B, K) = 1 / sum w^2 over the class's
    rotations; ``class_ess`` (B,) = 1 / sum p^2; ``n_poses_evaluated`` (B,)
    (class, rotation, shift) triples scored.
    """

    class_posterior: object
    best_class: object
    ll_best: object
    error: object
    log_evidence: object
    rot_id: object
    rotation: object
    shift_px: object
    alpha: object
    pose_ids: object
    pose_shift_px: object
    pose_weight: object
    pose_ess: object
    class_ess: object
    n_poses_evaluated: object
    order: int


@dataclass
class _Stage:
    ids: object  # (B, K, Q) grid ids at order, -1 none
    logw: object  # (B, K, Q) float32
    shift: object  # (B, K, Q, 2) trial shifts (relative to prep.center_px)
    class_lse: object  # (B, K)
    class_lse2: object  # (B, K)
    order: int


def _class_keep(class_lse, log_prior, keep_mass: float, xp):
    """Mask (B, K) of the most probable classes that together hold ``keep_mass`` of the posterior."""
    a = class_lse + log_prior[None, :]
    p = xp.exp(a - _logsumexp(a, xp, axis=1)[:, None])  # (B, K)
    srt = -xp.sort(-p, axis=1)
    n_keep = xp.sum(xp.cumsum(srt, axis=1) < keep_mass, axis=1) + 1
    thresh = xp.take_along_axis(srt, xp.minimum(n_keep, p.shape[1])[:, None] - 1, axis=1)
    return p >= thresh


def _logsumexp(a, xp, axis):
    m = a.max(axis=axis, keepdims=True)
    m = xp.where(xp.isfinite(m), m, 0.0)
    return (m + xp.log(xp.exp(a - m).sum(axis=axis, keepdims=True))).squeeze(axis)


@lru_cache(maxsize=8)
def coarse_rotation_ids(order: int, symmetry: str, convention: str):
    """The grid ids the dense stage scores: one asymmetric unit of the grid at ``order`` under
    ``symmetry`` (:func:`.symmetry.asymmetric_unit`) where the group maps the grid onto itself
    (C2, C4, D2, D4: every mate of a grid pose is a grid pose that scores the same, so the whole
    grid holds each pose |G| times), else None: the whole grid. Under the other groups (C3, D3,
    T, O, I, ...) a pose's mates fall between grid poses and sample its neighbourhood more finely;
    one unit would lose that (a test map with O symmetry aligned to 12.5 degrees instead of 8.8)."""
    ops = symmetry_group(symmetry, convention)
    if len(ops) == 1:
        return None
    grid = pose_grids.so3_grid(order).matrices.astype(np.float64)
    mates = Rotation.from_matrix(np.einsum("gij,njk->gnik", ops[1:], grid).reshape(-1, 3, 3)).as_quat()
    if _quaternion_tree(order).query(mates)[0].max() > 1e-6:
        return None
    return np.flatnonzero(asymmetric_unit(grid, ops))


def _dense_projections(band, fmaps, params: SearchParams, xp):
    """Every class's projections for the coarse grid (one asymmetric unit of it where
    :func:`coarse_rotation_ids` gives one), shared by all particles of a task."""
    m = band.size_at(params.radius_at(0))
    rots = pose_grids.so3_grid(params.order_coarse).matrices
    ids = coarse_rotation_ids(params.order_coarse, params.symmetry, params.symmetry_convention)
    rots = xp.asarray(rots if ids is None else rots[ids])
    return [class_projections(f, rots, band, m) for f in fmaps]


def _dense_stage(prep, sigma2, params: SearchParams, xp, projs) -> tuple[_Stage, int]:
    """Stage 0 against the shared coarse-grid projections ``projs`` (:func:`_dense_projections`)."""
    band = prep.band
    m = band.size_at(params.radius_at(0))
    xc, cc, _ = weighted_terms(prep, sigma2, m, params.sigma2_scale)
    n_rotations = projs[0].p_ri.shape[0]
    shifts = xp.asarray(
        pose_grids.shift_grid(params.shift_range_px, params.shift_step_px, params.shift_shape)
    )
    top: TopPoses = score_dense(
        xc, cc, band, projs, shifts, params.max_poses, params.max_tile_bytes, params.precision
    )
    ids = coarse_rotation_ids(params.order_coarse, params.symmetry, params.symmetry_convention)
    rot = top.rot
    if ids is not None:  # rows of the asymmetric unit -> grid ids
        rot = xp.where(rot >= 0, xp.asarray(ids)[xp.maximum(rot, 0)], -1)
    stage = _Stage(
        ids=rot,
        logw=top.logw,
        shift=shifts[top.shift_idx],
        class_lse=top.class_lse,
        class_lse2=top.class_lse2,
        order=params.order_coarse,
    )
    return stage, len(projs) * n_rotations * shifts.shape[0]


class _ProjectionCache:
    """Projections of grid rotations (one order, one band prefix) per class, grown on demand.

    Children and the climb's neighbour sets overlap heavily; each rotation is
    projected once per class and stage. New projections are written straight into
    tables in the layout the products read (real parts, imaginary parts): rebuilding
    the tables on every lookup copied them once per call, and stacking each new block
    went through two temporaries. A stage's first lookup (the children of every
    particle's poses) brings nearly all its rotations and the climb's later ones a few
    percent more, so a table is made a quarter larger than it must hold: doubling it
    for those few would copy it and have the kernel zero twice its size. The power
    ``|P|^2`` is not kept: the scoring squares the rows it gathers, and a table of it
    would make the cache, a late E-step's largest allocation, half as large again.
    """

    def __init__(self, fmaps, order: int, band, m: int, xp):
        self.fmaps, self.order, self.band, self.m, self.xp = fmaps, order, band, m, xp
        self.ids = [np.empty(0, dtype=np.int64) for _ in fmaps]
        self.ri = [xp.empty((0, 2 * m), dtype=xp.float32) for _ in fmaps]

    def lookup(self, k: int, ids):
        """Class ``k``'s table ``(U, 2M)`` of projections stacked real/imag, and the row (ids'
        shape) of each id (-1: any row)."""
        xp = self.xp
        ids_h = to_host(ids)
        ids_h = np.where(ids_h >= 0, ids_h, ids_h.max(initial=0))
        new = np.setdiff1d(np.unique(ids_h), self.ids[k], assume_unique=True)
        n0 = self.ids[k].size
        if new.size:
            n1 = n0 + new.size
            if n1 > self.ri[k].shape[0]:
                self._grow(k, max(n1 + n1 // 4, (3 * self.ri[k].shape[0]) // 2))
            rots = xp.asarray(pose_grids.matrices_for(self.order, new))
            P = project_band(self.fmaps[k], rots, self.band.kx[: self.m], self.band.ky[: self.m])
            self.ri[k][n0:n1, : self.m] = P.real
            self.ri[k][n0:n1, self.m :] = P.imag
            self.ids[k] = np.concatenate([self.ids[k], new])
        n = self.ids[k].size
        srt = np.argsort(self.ids[k], kind="stable")
        pos = srt[np.searchsorted(self.ids[k], ids_h, sorter=srt)]
        # Views of the filled rows: later lookups only write rows past them, or into new tables.
        return self.ri[k][:n], xp.asarray(pos)

    def _grow(self, k: int, capacity: int) -> None:
        n = self.ids[k].size
        bigger = self.xp.empty((capacity, self.ri[k].shape[1]), dtype=self.xp.float32)
        bigger[:n] = self.ri[k][:n]
        self.ri[k] = bigger


@lru_cache(maxsize=4)
def _quaternion_tree(order: int):
    """KD-tree over the unit quaternions (both signs) of the grid rotations at ``order``."""
    q = Rotation.from_matrix(pose_grids.so3_grid(order).matrices.astype(np.float64)).as_quat()
    return cKDTree(np.concatenate([q, -q]))


def neighbours(order: int, ids, k: int = 27) -> np.ndarray:
    """The ``k`` grid rotations nearest to each of ``ids`` at ``order`` (itself first): ``(..., k)``.

    Distances are chordal in quaternion space (monotonic in the rotation angle);
    ``k = 27`` holds the 3 x 3 x 3 block of directions and in-plane angles around a rotation.
    """
    ids = np.asarray(ids, dtype=np.int64)
    q = Rotation.from_matrix(
        pose_grids.matrices_for(order, ids.reshape(-1)).astype(np.float64)
    ).as_quat()
    _, nb = _quaternion_tree(order).query(q, k=k)
    return (nb % pose_grids.n_rotations(order)).reshape(ids.shape + (k,))


def _shift_offsets(step: float, xp):
    """The 3 x 3 trial-shift offsets ``(9, 2)`` (x, y) at ``step`` pixels."""
    o = xp.asarray([-1.0, 0.0, 1.0], dtype=xp.float32) * step
    oy, ox = xp.meshgrid(o, o, indexing="ij")
    return xp.stack([ox.ravel(), oy.ravel()], axis=-1)


def _score_groups(cache: _ProjectionCache, band, xc, cc, ids, centers, offsets, params, xp):
    """Score candidate groups: ``ids`` (B, K, G, J) (-1: none), group g with the shifts
    ``centers`` (B, K, G, 2) + ``offsets`` (T, 2). Returns log-weights (B, K, G, J) (-inf
    for none) and the best trial shift of each candidate (B, K, G, J, 2)."""
    B, K, G, J = ids.shape
    logw = xp.full((B, K, G, J), -np.inf, dtype=xp.float32)
    best = xp.zeros((B, K, G, J, 2), dtype=xp.float32)
    for k in range(K):
        rows = xp.flatnonzero((ids[:, k] >= 0).any(axis=(1, 2)))  # particles with candidates
        if rows.size == 0:
            continue
        p_ri, index = cache.lookup(k, ids[rows, k])
        chunk = _local_chunk(params.particle_chunk, G, max(J, offsets.shape[0]), p_ri.shape[1], xp)
        for c0 in range(0, rows.size, chunk):
            r = rows[c0 : c0 + chunk]
            i = index[c0 : c0 + chunk]
            L, t = score_local(
                xc[r],
                cc[r],
                band,
                p_ri[i],
                ids[r, k] >= 0,
                centers[r, k],
                offsets,
                params.precision,
            )
            logw[r, k] = L
            best[r, k] = centers[r, k][:, :, None, :] + offsets[t]
    return logw, best


# Bytes of one particle chunk's largest local-stage temporary on a CPU (the shifted
# images or the gathered candidate projections, ``G x max(T, J) x 2M`` float32 per
# particle): small enough to stay in cache and below glibc's mmap threshold (32 MiB), above
# which every temporary is a fresh mapping whose pages fault in again on each call.
LOCAL_BLOCK_BYTES = 2**21


def _local_chunk(particle_chunk: int, G: int, width: int, m2: int, xp) -> int:
    """Particles per :func:`score_local` call: ``particle_chunk``, and on a CPU no more than
    hold :data:`LOCAL_BLOCK_BYTES` in one temporary (a GPU wants the large blocks)."""
    if xp is not np:
        return particle_chunk
    return int(max(1, min(particle_chunk, LOCAL_BLOCK_BYTES // (4 * G * width * m2))))


def _dedupe_max(ids, logw, shift, xp):
    """Keep, per (particle, class), one entry per rotation id: the highest log-weight."""
    by_w = xp.argsort(-logw, axis=-1, kind="stable")
    order = xp.take_along_axis(
        by_w, xp.argsort(xp.take_along_axis(ids, by_w, axis=-1), axis=-1, kind="stable"), axis=-1
    )
    srt = xp.take_along_axis(ids, order, axis=-1)
    first = xp.ones(srt.shape, dtype=bool)
    first[..., 1:] = srt[..., 1:] != srt[..., :-1]
    keep = xp.empty_like(first)
    xp.put_along_axis(keep, order, first, axis=-1)
    keep &= ids >= 0
    return xp.where(keep, ids, -1), xp.where(keep, logw, -np.inf), shift


def _local_stage(
    prep, fmaps, sigma2, prev: _Stage, log_prior, stage_no: int, params: SearchParams, xp
):
    """Children of the kept poses, each with shifts around its parent's own best shift,
    then a hill climb over grid neighbours of each class's best pose (``params.climb_steps``)."""
    band = prep.band
    B, K, _ = prev.ids.shape
    par_ids, par_shift = _parents(prev, params.max_poses, xp)
    ch = _children(prev.order, par_ids, xp)  # (B, K, C, 8)
    offsets = _shift_offsets(params.shift_step_px / 2**stage_no, xp)
    m = band.size_at(params.radius_at(stage_no))
    xc, cc, _ = weighted_terms(prep, sigma2, m, params.sigma2_scale)
    cache = _ProjectionCache(fmaps, prev.order + 1, band, m, xp)
    logw, shift = _score_groups(cache, band, xc, cc, ch, par_shift, offsets, params, xp)
    n_eval = (ch >= 0).sum(axis=(1, 2, 3)) * offsets.shape[0]
    found = _dedupe_max(
        ch.reshape(B, K, -1), logw.reshape(B, K, -1), shift.reshape(B, K, -1, 2), xp
    )
    ids, logw, shift, n_eval = _climb(cache, xc, cc, found, offsets, log_prior, n_eval, params, xp)
    return _stage_of(ids, logw, shift, cache.order, xp), n_eval


def _parents(prev: _Stage, max_poses: int, xp):
    """Per class, the ``max_poses`` scored poses of ``prev`` of largest weight: grid ids
    ``(B, K, C)`` (-1: none) and their trial shifts ``(B, K, C, 2)``."""
    valid = (prev.ids >= 0) & xp.isfinite(prev.logw)
    lw = xp.where(valid, prev.logw, -np.inf)
    C = min(max_poses, lw.shape[2])
    sel = xp.argsort(-lw, axis=2)[..., :C]
    par_ids = xp.where(
        xp.take_along_axis(valid, sel, axis=2), xp.take_along_axis(prev.ids, sel, axis=2), -1
    )
    return par_ids, xp.take_along_axis(prev.shift, sel[..., None], axis=2)


def _children(order: int, par_ids, xp):
    """The 8 children ``(..., 8)`` at ``order + 1`` of grid ids ``par_ids`` at ``order``
    (-1 stays none)."""
    ch = xp.asarray(pose_grids.children(order, np.maximum(to_host(par_ids), 0)))
    return xp.where(par_ids[..., None] >= 0, ch, -1)


def _climb(cache: _ProjectionCache, xc, cc, found, offsets, log_prior, n_eval, params, xp):
    """Hill climb for the classes holding ``params.keep_mass`` of the posterior: the grid
    neighbours of each class's best pose, shifts around its shift, while the best pose moves
    (at most ``params.climb_steps`` times). ``found``: (ids, logw, shift) ``(B, K, Q)`` so far;
    returns them with the neighbours added, and ``n_eval`` ``(B,)`` grown by the poses scored."""
    ids, logw, shift = found
    active = _class_keep(
        _logsumexp(logw.astype(xp.float64), xp, axis=2), log_prior, params.keep_mass, xp
    )  # (B, K)
    for _ in range(params.climb_steps):
        rows = xp.flatnonzero(active.any(axis=1))
        if rows.size == 0:
            break
        q = xp.argmax(logw, axis=2)
        best_id = xp.take_along_axis(ids, q[..., None], axis=2)[..., 0]  # (B, K)
        best_shift = xp.take_along_axis(shift, q[..., None, None], axis=2)[:, :, 0]  # (B, K, 2)
        nb = xp.asarray(
            neighbours(cache.order, to_host(best_id[rows]), params.climb_neighbours)
        )  # (b, K, J)
        nb = xp.where(active[rows][..., None], nb, -1)
        lw_nb, sh_nb = _score_groups(
            cache,
            cache.band,
            xc[rows],
            cc[rows],
            nb[:, :, None, :],
            best_shift[rows][:, :, None, :],
            offsets,
            params,
            xp,
        )
        n_eval[rows] += (nb >= 0).sum(axis=(1, 2)) * offsets.shape[0]
        ids, logw, shift = _add_rows(
            (ids, logw, shift), rows, nb, lw_nb[:, :, 0], sh_nb[:, :, 0], xp
        )
        q_new = xp.argmax(logw, axis=2)
        active &= xp.take_along_axis(ids, q_new[..., None], axis=2)[..., 0] != best_id
    return ids, logw, shift, n_eval


def _add_rows(found, rows, ids_r, logw_r, shift_r, xp):
    """``found`` (ids, logw, shift) ``(B, K, Q)`` with candidates ``(b, K, J)`` of particles
    ``rows`` appended (the others get none), one entry per rotation id kept."""
    ids, logw, shift = found
    B, K, _ = ids.shape
    J = ids_r.shape[-1]
    new_ids = xp.full((B, K, J), -1, dtype=ids.dtype)
    new_lw = xp.full((B, K, J), -np.inf, dtype=xp.float32)
    new_sh = xp.zeros((B, K, J, 2), dtype=xp.float32)
    new_ids[rows], new_lw[rows], new_sh[rows] = ids_r, logw_r, shift_r
    return _dedupe_max(
        xp.concatenate([ids, new_ids], axis=2),
        xp.concatenate([logw, new_lw], axis=2),
        xp.concatenate([shift, new_sh], axis=2),
        xp,
    )


def _stage_of(ids, logw, shift, order: int, xp) -> _Stage:
    """A stage from its candidates ``(B, K, Q)``, with each class's log-sum-exps of the
    weights and of their squares."""
    lw = logw.astype(xp.float64)
    return _Stage(
        ids=ids,
        logw=logw,
        shift=shift,
        class_lse=_logsumexp(lw, xp, axis=2),
        class_lse2=_logsumexp(2.0 * lw, xp, axis=2),
        order=order,
    )


def estep(
    prep: PreparedParticles,
    fmaps: list[FourierMap],
    sigma2,
    params: SearchParams,
    class_prior=None,
) -> EStepResult:
    """Score particles against K classes coarse to fine and return posteriors and poses.

    ``fmaps``: one :class:`FourierMap` per class with ``r_max >= params.radius_final``;
    ``sigma2`` (n_shells,) per-shell noise power of a complex coefficient (shells cover
    the band); ``class_prior`` (K,) pi_k (default uniform).
    """
    xp = xp_of(prep.y)
    K = len(fmaps)
    B = prep.n_particles
    if params.order_final < params.order_coarse:
        raise ValueError(f"order_final {params.order_final} < order_coarse {params.order_coarse}")
    prior = (
        xp.full(K, 1.0 / K) if class_prior is None else xp.asarray(class_prior, dtype=xp.float64)
    )
    if prior.shape != (K,):
        raise ValueError(f"class_prior must have shape ({K},), got {prior.shape}")
    log_prior = xp.log(xp.maximum(prior, 1e-30))
    threads = cpu_threads() if params.threads is None else max(1, int(params.threads))
    projs = _dense_projections(prep.band, fmaps, params, xp)
    parts = in_particle_blocks(
        lambda a, b: _estep_block(prep.rows(a, b), fmaps, sigma2, params, log_prior, projs),
        B,
        threads if xp is np else 1,  # a GPU runs the whole task as one block
    )
    return parts[0] if len(parts) == 1 else _concatenate(parts)


_MIN_BLOCK = 8  # particles per thread, at least


def in_particle_blocks(fn, n: int, threads: int) -> list:
    """``[fn(a, b) for contiguous blocks a:b of range(n)]``, the blocks run in ``threads``
    threads with BLAS limited to one thread each (CPU only: numpy releases the GIL in
    BLAS and ufuncs, and per-particle work needs no communication). Blocks hold at
    least ``_MIN_BLOCK`` particles."""
    threads = max(1, min(threads, n // _MIN_BLOCK))
    if threads == 1:
        return [fn(0, n)]
    from threadpoolctl import threadpool_limits  # noqa: PLC0415

    edges = np.linspace(0, n, threads + 1).astype(int)
    blocks = list(zip(edges[:-1].tolist(), edges[1:].tolist(), strict=True))
    with threadpool_limits(limits=1, user_api="blas"), ThreadPoolExecutor(threads) as pool:
        return list(pool.map(lambda ab: fn(*ab), blocks))


def _concatenate(parts: list[EStepResult]) -> EStepResult:
    out = {}
    for f in fields(EStepResult):
        values = [getattr(p, f.name) for p in parts]
        out[f.name] = values[0] if f.name == "order" else np.concatenate(values, axis=0)
    return EStepResult(**out)


def _estep_block(prep, fmaps, sigma2, params, log_prior, projs) -> EStepResult:
    xp = xp_of(prep.y)
    B = prep.n_particles
    stage, n_eval = _dense_stage(prep, sigma2, params, xp, projs)
    n_eval = xp.full(B, n_eval, dtype=xp.int64)
    for s in range(1, params.order_final - params.order_coarse + 1):
        stage, n = _local_stage(prep, fmaps, sigma2, stage, log_prior, s, params, xp)
        n_eval = n_eval + n
    return _finish(prep, fmaps, sigma2, stage, log_prior, n_eval, params, xp)


def _finish(
    prep, fmaps, sigma2, stage: _Stage, log_prior, n_eval, params: SearchParams, xp
) -> EStepResult:
    B, K, Q = stage.ids.shape
    band = prep.band
    m = band.size_at(params.radius_at(params.order_final - params.order_coarse))
    xc, cc, yy = weighted_terms(prep, sigma2, m, params.sigma2_scale)
    a = stage.class_lse + log_prior[None, :]
    log_evidence = _logsumexp(a, xp, axis=1)
    post = xp.exp(a - log_evidence[:, None])
    best_class = xp.argmax(post, axis=1)
    if params.hard:
        post = (xp.arange(K)[None, :] == best_class[:, None]).astype(xp.float64)
    # Best pose per class: its exact log-likelihood and least-squares scale alpha.
    q = xp.argmax(stage.logw, axis=2)
    rot_id = xp.take_along_axis(stage.ids, q[..., None], axis=2)[..., 0]
    shift = xp.take_along_axis(stage.shift, q[..., None, None], axis=2)[:, :, 0]
    rotation = xp.asarray(pose_grids.matrices_for(stage.order, to_host(rot_id).ravel())).reshape(
        B, K, 3, 3
    )
    cross = xp.zeros((B, K), dtype=xp.float64)
    norm = xp.zeros((B, K), dtype=xp.float64)
    for k, fmap in enumerate(fmaps):
        P = project_band(fmap, rotation[:, k], band.kx[:m], band.ky[:m])  # (B, M)
        ys = xc * phase_ramp(band.kx[:m], band.ky[:m], shift[:, k][:, None, :], band.n)[:, 0]
        cross[:, k] = (ys.real * P.real + ys.imag * P.imag).sum(axis=1)
        norm[:, k] = (cc * (P.real**2 + P.imag**2)).sum(axis=1)
    ll_best = -yy[:, None] + cross - norm
    alpha = cross / xp.maximum(2.0 * norm, 1e-30)
    # Significant poses per class, weights normalised within the class.
    P_out = min(params.n_out_poses, Q)
    sel = xp.argsort(-stage.logw, axis=2)[..., :P_out]
    lw = xp.take_along_axis(stage.logw, sel, axis=2).astype(xp.float64)
    w = xp.exp(lw - stage.class_lse[..., None])
    if params.out_mass < 1:
        # The most probable poses that together hold out_mass of the class's pose posterior:
        # all of a broad posterior's P_out, few of a sharp one's (zero weights are not backprojected).
        w = xp.where(xp.cumsum(w, axis=2) - w < params.out_mass, w, 0.0)
    if params.hard:
        w = (xp.arange(P_out)[None, None, :] == 0).astype(xp.float64) * xp.ones_like(w)
    w = w / xp.maximum(w.sum(axis=2, keepdims=True), 1e-300)
    pose_ids = xp.where(w > 0, xp.take_along_axis(stage.ids, sel, axis=2), -1)
    pose_shift = (
        xp.take_along_axis(stage.shift, sel[..., None], axis=2) + prep.center_px[:, None, None, :]
    )
    return EStepResult(
        class_posterior=post.astype(xp.float32),
        best_class=best_class,
        ll_best=ll_best,
        error=-xp.take_along_axis(ll_best, best_class[:, None], axis=1)[:, 0],
        log_evidence=log_evidence - yy,
        rot_id=rot_id,
        rotation=rotation,
        shift_px=shift + prep.center_px[:, None, :],
        alpha=alpha.astype(xp.float32),
        pose_ids=pose_ids,
        pose_shift_px=pose_shift.astype(xp.float32),
        pose_weight=w.astype(xp.float32),
        pose_ess=xp.exp(2 * stage.class_lse - stage.class_lse2).astype(xp.float32),
        class_ess=(1.0 / (post**2).sum(axis=1)).astype(xp.float32),
        n_poses_evaluated=n_eval,
        order=stage.order,
    )

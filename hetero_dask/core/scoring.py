"""The E-step: particle images scored against class projections as real matrix products.

Model (README, Conventions): ``Y(k) = CTF(k) V^(R k) exp(+2 pi i k.s / n) + noise``, noise of
``E|n(k)|^2 = sigma2(shell)`` per complex coefficient. Over the independent
half-plane band ``1 <= |k| <= r`` (Friedel symmetry) the log-likelihood is

    LL = -sum_k |Y - C P e^{..}|^2 / sigma2
       = -sum |Y|^2/sigma2 + 2 sum Re(Y_s conj(P)) C/sigma2 - sum C^2 |P|^2/sigma2,

with ``Y_s = Y exp(-2 pi i k.s / n)`` (the image centred by the trial shift).
The cross term is ONE real product ``(B*T, 2M) @ (2M, R)`` on stacked real and
imaginary parts (shift ramps, CTF and 1/sigma2 on the image side), the norm
term ``(B, M) @ (M, R)``. Scores are reduced tile by tile (max and
log-sum-exp over shifts, then over rotations and classes) so that the full
score tensor never exists. All LL values are divided by ``sigma2_scale``
(annealing temperature; CryoSPARC's "sigma scale" s is ``sigma2_scale = s**2``).

Band coefficients are ordered by radius, so the band at any radius is a prefix:
images are prepared once at the largest radius and every stage of the
coarse-to-fine search (:mod:`hetero_dask.core.search`) takes a prefix.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from .backend import xp_of
from .ctf import CTFParams, ctf_values
from .fourier import radius_2d, soft_edge
from .projector import FourierMap, project


@dataclass
class Band:
    """Half-plane Fourier coefficients ``1 <= |k| <= r_max`` of an ``n`` box, sorted by radius.

    ``kx``, ``ky`` (M,) float32 in cycles per box; ``radius`` (M,) float32;
    ``shell`` (M,) int64 (rounded radius); ``flat`` (M,) int64 index into a
    centred ``(n, n)`` spectrum raveled [y, x].
    """

    n: int
    r_max: float
    kx: object
    ky: object
    radius: object
    shell: object
    flat: object

    def size_at(self, radius: float) -> int:
        """Number of band coefficients with ``|k| <= radius`` (a prefix length)."""
        return int(np.searchsorted(np.asarray(_host(self.radius)), radius + 1e-6, side="right"))


def _host(a):
    return a.get() if hasattr(a, "get") else a


def alignment_band(n: int, r_max: float, xp=np) -> Band:
    """The half-plane band (ky > 0, or ky = 0 and kx > 0) with ``1 <= |k| <= r_max`` (cycles per box)."""
    k = np.arange(n) - n // 2
    ky, kx = np.meshgrid(k, k, indexing="ij")
    r = np.sqrt(kx**2 + ky**2)
    keep = (r >= 1) & (r <= r_max + 1e-6) & ((ky > 0) | ((ky == 0) & (kx > 0)))
    flat = np.flatnonzero(keep.ravel())
    order = np.argsort(r.ravel()[flat], kind="stable")
    flat = flat[order]
    rr = r.ravel()[flat]
    return Band(
        n=n,
        r_max=float(r_max),
        kx=xp.asarray(kx.ravel()[flat], dtype=xp.float32),
        ky=xp.asarray(ky.ravel()[flat], dtype=xp.float32),
        radius=xp.asarray(rr, dtype=xp.float32),
        shell=xp.asarray(np.rint(rr).astype(np.int64)),
        flat=xp.asarray(flat),
    )


@dataclass
class PreparedParticles:
    """Particle spectra on a band: ``y`` (B, M) complex64, ``ctf`` (B, M) float32.

    ``center_px`` (B, 2) float32: shifts already removed from ``y`` (trial
    shifts are relative to it; the absolute CryoSPARC shift is center + trial).
    """

    band: Band
    y: object
    ctf: object
    center_px: object

    @property
    def n_particles(self) -> int:
        return self.y.shape[0]

    def rows(self, start: int, stop: int) -> PreparedParticles:
        """Particles ``start:stop`` (views)."""
        sl = slice(start, stop)
        return PreparedParticles(self.band, self.y[sl], self.ctf[sl], self.center_px[sl])


def band_spectra(images, band: Band):
    """The centred 2D FFT of real ``images`` ``(B, n, n)`` on ``band``: complex64 ``(B, M)``.

    The band is a half-plane (``ky >= 0``), so a real FFT along y gives it whole, in single
    precision, without the full complex spectrum: ``fft2c(x)[ky, kx]`` is the uncentred
    ``X[ky, kx mod n]`` times ``exp(2 pi i (kx + ky) (n // 2) / n)`` (the origin at pixel
    ``n // 2``).
    """
    xp = xp_of(images)
    B, n = images.shape[0], band.n
    X = xp.fft.rfftn(images.astype(xp.float32), axes=(-1, -2))  # (B, n // 2 + 1, n): ky >= 0
    kx = band.kx.astype(xp.int64)
    ky = band.ky.astype(xp.int64)
    phase = xp.exp((2j * np.pi * (n // 2) / n) * (kx + ky)).astype(xp.complex64)
    return (X.reshape(B, -1)[:, ky * n + kx % n] * phase).astype(xp.complex64)


def cpu_threads() -> int:
    """Threads for CPU work inside one task: ``HETERO_DASK_ESTEP_THREADS``, else the BLAS
    thread count (``OMP_NUM_THREADS``, set per Dask worker by :mod:`hetero_dask.runtime.cluster`),
    else the cores this process may use."""
    for var in ("HETERO_DASK_ESTEP_THREADS", "OMP_NUM_THREADS"):
        value = os.environ.get(var, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def circular_mask(n: int, radius_px: float, width_px: float, xp=np):
    """Soft circular real-space mask ``(n, n)``: 1 inside ``radius_px``, cosine edge of ``width_px``."""
    return soft_edge(radius_2d(n, xp), radius_px, width_px)


def mask_temperature(mask) -> float:
    """Temperature ``1 / mean(mask^2)`` of the log-likelihood of images zero-masked by ``mask``.

    Masking white noise of variance ``s0^2`` by ``m`` leaves ``mean(m^2) s0^2`` of power per
    Fourier coefficient, which is what a per-shell noise estimate measures; but the masked
    coefficients are correlated, and a likelihood that counts them as independent is the
    pixel likelihood of the masked image divided by ``mean(m^2)``: posteriors that much too
    confident. Multiplying ``sigma2`` by this temperature undoes it.
    """
    xp = xp_of(mask)
    return float(1.0 / xp.mean(xp.asarray(mask, dtype=xp.float64) ** 2))


def normalise_background(images, radius_px: float):
    """Images ``(B, n, n)`` with the pixels outside ``radius_px`` brought to mean 0, std 1 (float32)."""
    xp = xp_of(images)
    B, n = images.shape[0], images.shape[-1]
    x = images.astype(xp.float32)
    bg = x.reshape(B, -1)[:, (radius_2d(n, xp) > radius_px).ravel()]
    return (x - bg.mean(axis=1)[:, None, None]) / xp.maximum(bg.std(axis=1), 1e-12)[:, None, None]


def prepare_particles(
    images,
    ctf_params: CTFParams | None,
    psize_A: float,
    band: Band,
    mask_radius_px: float | None = None,
    mask_width_px: float = 4.0,
    normalize: bool = True,
    center_px=None,
) -> PreparedParticles:
    """Images ``(B, n, n)`` real -> band spectra (done once per task).

    Background normalisation (``normalize``): subtract the mean and divide by the
    standard deviation of the pixels outside ``mask_radius_px`` (default
    ``0.85 * n / 2``); then a soft circular mask, centred FFT, band gather, and
    removal of ``center_px`` (B, 2) (the image model's shift, e.g. the previous
    iteration's). ``ctf_params=None`` means no CTF (all ones).
    """
    xp = xp_of(images)
    B, n = images.shape[0], images.shape[-1]
    if images.shape[1:] != (n, n) or n != band.n:
        raise ValueError(f"images must be (B, {band.n}, {band.n}), got {images.shape}")
    radius_px = 0.85 * n / 2 if mask_radius_px is None else float(mask_radius_px)
    x = normalise_background(images, radius_px) if normalize else images.astype(xp.float32)
    x = x * circular_mask(n, radius_px, mask_width_px, xp)
    y = band_spectra(x, band)
    center = (
        xp.zeros((B, 2), dtype=xp.float32)
        if center_px is None
        else xp.asarray(center_px, dtype=xp.float32)
    )
    y = y * phase_ramp(band.kx, band.ky, center[:, None, :], n)[:, 0]
    if ctf_params is None:
        c = xp.ones((B, band.kx.shape[0]), dtype=xp.float32)
    else:
        inv_box_A = 1.0 / (n * psize_A)
        c = ctf_values(ctf_params.to(xp), band.kx * inv_box_A, band.ky * inv_box_A)
        c = xp.broadcast_to(c, (B, band.kx.shape[0])).astype(xp.float32)
    return PreparedParticles(band=band, y=y, ctf=c, center_px=center)


def phase_ramp(kx, ky, shifts_px, n: int):
    """``exp(-2 pi i k.s / n)`` for shifts ``(..., T, 2)`` and band ``(M,)``: ``(..., T, M)`` complex64.

    Multiplying an image spectrum by it centres content shifted by ``s``
    (the model's ``exp(+2 pi i k.s/n)`` undone).
    """
    xp = xp_of(kx)
    s = xp.asarray(shifts_px, dtype=xp.float32)
    ph = (-2.0 * np.pi / n) * (s[..., 0:1] * kx + s[..., 1:2] * ky)
    return (xp.cos(ph) + 1j * xp.sin(ph)).astype(xp.complex64)


def separable_phase_ramp(shifts_px, kx, ky, n: int):
    """``exp(-2 pi i (sx kx + sy ky) / n)`` ``(B, M)`` complex64 for integer ``kx``, ``ky`` ``(M,)``:
    :func:`phase_ramp` of one shift per image, from per-axis 1D ramps (2n exponentials
    per image instead of M)."""
    xp = xp_of(kx)
    k = xp.arange(-(n // 2), n - n // 2, dtype=xp.float32)  # every integer frequency
    s = xp.asarray(shifts_px, dtype=xp.float32)
    ex = xp.exp((-2j * np.pi / n) * (s[:, :1] * k[None, :])).astype(xp.complex64)
    ey = xp.exp((-2j * np.pi / n) * (s[:, 1:] * k[None, :])).astype(xp.complex64)
    o = n // 2
    return ex[:, kx.astype(xp.int64) + o] * ey[:, ky.astype(xp.int64) + o]


# Rotations x frequencies per projection block on a CPU: project()'s dozen float32
# temporaries then stay in cache (half the time of one pass over 6000 rotations at
# box 64 and at box 128; blocks of 2^15 to 2^18 points all do).
PROJECT_BLOCK_POINTS = 2**17


def project_band(fmap: FourierMap, rotations, kx, ky):
    """Central slices ``(R, M)`` complex64 at band frequencies: :func:`.projector.project`
    (``(C, R, M)`` for C stacked maps, :func:`.projector.stacked`).

    Refuses frequencies beyond the map's ``r_max`` (they would read as zero and
    silently bias the scores): prepare the map at the alignment radius or more.
    On a CPU the rotations go in blocks of :data:`PROJECT_BLOCK_POINTS` points.
    """
    xp = xp_of(fmap.data)
    kx = xp.asarray(kx, dtype=xp.float32)
    ky = xp.asarray(ky, dtype=xp.float32)
    if kx.size and float(xp.max(kx**2 + ky**2)) > fmap.r_max**2 + 1e-3:
        raise ValueError(
            f"band radius exceeds the Fourier map's r_max={fmap.r_max}; prepare it larger"
        )
    R = rotations.shape[0]
    step = R if xp is not np else max(1, PROJECT_BLOCK_POINTS // max(kx.size, 1))
    if step >= R:
        return project(fmap, rotations, kx, ky)
    out = xp.empty((*fmap.data.shape[:-3], R, kx.size), dtype=xp.complex64)
    for r0 in range(0, R, step):
        out[..., r0 : r0 + step, :] = project(fmap, rotations[r0 : r0 + step], kx, ky)
    return out


PRECISIONS = ("float32", "tf32", "3xtf32")


def round_to_tf32(x):
    """``x`` as float32 with the mantissa rounded to TF32's 10 bits (nearest, ties away from 0).

    These are the inputs a TF32 tensor core multiplies (products accumulate in float32).
    """
    xp = xp_of(x)
    bits = xp.ascontiguousarray(x, dtype=xp.float32).view(xp.uint32)
    return ((bits + xp.uint32(0x1000)) & xp.uint32(0xFFFFE000)).view(xp.float32)


def _tf32_matmul(a, b):
    """``a @ b`` with TF32 inputs: cuBLAS TF32 tensor cores on CuPy, rounded inputs elsewhere."""
    xp = xp_of(a, b)
    linalg = getattr(getattr(xp, "_core", None), "_routines_linalg", None)
    if linalg is None or not hasattr(linalg, "COMPUTE_TYPE_TF32"):
        return xp.matmul(round_to_tf32(a), round_to_tf32(b))
    old = linalg.get_compute_type(np.float32)
    linalg.set_compute_type(np.float32, linalg.COMPUTE_TYPE_TF32)
    try:
        return xp.matmul(a, b)
    finally:
        linalg.set_compute_type(np.float32, old)


def scoring_matmul(a, b, precision: str = "float32"):
    """float32 ``a @ b`` (batched like ``matmul``) at a scoring precision (:data:`PRECISIONS`).

    ``"tf32"``: inputs rounded to 10-bit mantissas (~3 decimal digits, relative error
    ~2^-11 per input); ``"3xtf32"``: ``a_hi b_hi + a_hi b_lo + a_lo b_hi`` with
    ``x = x_hi + x_lo`` split into TF32 parts, about float32 accuracy at three TF32 products.
    """
    if precision == "float32":
        return a @ b
    if precision == "tf32":
        return _tf32_matmul(a, b)
    if precision == "3xtf32":
        a_hi, b_hi = round_to_tf32(a), round_to_tf32(b)
        small = _tf32_matmul(a_hi, b - b_hi) + _tf32_matmul(a - a_hi, b_hi)
        return _tf32_matmul(a_hi, b_hi) + small
    raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")


def stack_ri(z):
    """Complex ``(..., M)`` -> real ``(..., 2M)`` float32: [real parts, imaginary parts]."""
    xp = xp_of(z)
    return xp.concatenate([z.real, z.imag], axis=-1).astype(xp.float32)


@dataclass
class ClassProjections:
    """Projections of one class for a rotation set, in the layout the products need.

    ``p_ri`` (R, 2M) float32 stacked real/imag, ``p_pow`` (R, M) float32 ``|P|^2``.
    """

    p_ri: object
    p_pow: object


def class_projections(fmap: FourierMap, rotations, band: Band, m: int) -> ClassProjections:
    """Project a class at ``rotations`` (R, 3, 3) on the first ``m`` band coefficients."""
    P = project_band(fmap, rotations, band.kx[:m], band.ky[:m])
    return ClassProjections(p_ri=stack_ri(P), p_pow=(P.real**2 + P.imag**2).astype(P.real.dtype))


def weighted_terms(prep: PreparedParticles, sigma2, m: int, sigma2_scale: float = 1.0):
    """Image-side factors on the first ``m`` coefficients, temperature folded in.

    Returns ``(xc, cc, yy)``: ``xc`` (B, M) complex64 = 2 Y C / (s sigma2),
    ``cc`` (B, M) float32 = C^2 / (s sigma2), ``yy`` (B,) float64 = sum |Y|^2 / (s sigma2)
    with ``s = sigma2_scale``, so that LL = -yy + Re(xc_s . conj P) - cc . |P|^2.
    """
    xp = xp_of(prep.y)
    sigma2 = xp.asarray(sigma2, dtype=xp.float32)
    shell = prep.band.shell[:m]
    if int(shell.max()) >= sigma2.shape[0]:
        raise ValueError(
            f"sigma2 has {sigma2.shape[0]} shells; the band needs {int(shell.max()) + 1}"
        )
    inv = (1.0 / (sigma2[shell] * sigma2_scale)).astype(xp.float32)
    y, c = prep.y[:, :m], prep.ctf[:, :m]
    xc = (y * (2.0 * c * inv)).astype(xp.complex64)
    cc = (c * c * inv).astype(xp.float32)
    yy = ((y.real.astype(xp.float64) ** 2 + y.imag.astype(xp.float64) ** 2) * inv).sum(axis=1)
    return xc, cc, yy


@dataclass
class TopPoses:
    """Per particle and class, the best rotations of a stage (shift-marginalised).

    ``rot`` (B, K, C) int64 index into the stage's rotation list (-1: none),
    ``logw`` (B, K, C) float32 log-sum-exp over shifts of the score,
    ``shift_idx`` (B, K, C) int64 best shift of that rotation,
    ``class_lse`` (B, K) float64 log-sum-exp over all scored poses of the class,
    ``class_lse2`` (B, K) float64 log-sum-exp of twice the rotation log-weights
    (for the pose ESS).
    """

    rot: object
    logw: object
    shift_idx: object
    class_lse: object
    class_lse2: object


def _lse_merge(a, b, xp):
    m = xp.maximum(a, b)
    m_safe = xp.where(xp.isfinite(m), m, 0.0)
    return m_safe + xp.log(xp.exp(a - m_safe) + xp.exp(b - m_safe))


def _lse_shifts(S, xp):
    """Scores ``(B, T, R)`` -> log-sum-exp over T ``(B, R)``; S is overwritten by ``exp(S - max_T)``.

    The max over T is a fast slab reduction; the argmax of the overwritten S over T
    equals that of the scores (exp is monotonic), so callers take best shifts from it
    for the few rotations they keep.
    """
    mx = S.max(axis=1)
    S -= mx[:, None, :]
    xp.exp(S, out=S)
    return mx + xp.log(S.sum(axis=1))


def _reduce_shifts(S, xp):
    """Scores ``(B, T, R)`` -> (log-sum-exp over T (B, R), argmax over T (B, R)); S is overwritten."""
    L = _lse_shifts(S, xp)
    return L, xp.argmax(S, axis=1)


def _merge_top(rot, logw, sidx, new_rot, new_logw, new_sidx, keep: int, xp):
    """Keep the ``keep`` largest log-weights of the concatenation, per row (B, ...)."""
    r = xp.concatenate([rot, new_rot], axis=-1)
    w = xp.concatenate([logw, new_logw], axis=-1)
    s = xp.concatenate([sidx, new_sidx], axis=-1)
    if w.shape[-1] > keep:
        sel = xp.argpartition(-w, keep - 1, axis=-1)[..., :keep]
        r, w, s = (xp.take_along_axis(a, sel, axis=-1) for a in (r, w, s))
    return r, w, s


def score_dense(xc, cc, band: Band, projections: list[ClassProjections], shifts_px, keep: int = 8,
                max_tile_bytes: int = 16 * 2**20, precision: str = "float32") -> TopPoses:
    """Exhaustive scoring of every particle against shared rotations x shifts, per class.

    ``xc``, ``cc`` from :func:`weighted_terms` (B, M); ``projections`` one per
    class for the same R rotations on the same M coefficients; ``shifts_px``
    (T, 2) trial shifts. The score ``Re(xc_s conj P) - cc |P|^2`` (LL + yy)
    is reduced tile by tile: log-sum-exp and argmax over shifts, a running top
    ``keep`` over rotations, and a running log-sum-exp per class. Tiles of
    particles x rotations are sized to ``max_tile_bytes`` of scores. ``precision``
    (:func:`scoring_matmul`) applies to the cross-term product; the norm term, T times
    cheaper and a sum of positive terms, stays float32.
    """
    xp = xp_of(xc)
    B, m = xc.shape
    T = shifts_px.shape[0]
    K = len(projections)
    R = projections[0].p_ri.shape[0]
    keep = min(keep, R)
    ramps = phase_ramp(band.kx[:m], band.ky[:m], xp.asarray(shifts_px), band.n)  # (T, M)
    r_chunk = int(min(R, max(64, max_tile_bytes // (4 * T * min(B, 64)))))
    b_chunk = int(max(1, min(B, max_tile_bytes // (4 * T * r_chunk))))
    out_rot = xp.full((B, K, keep), -1, dtype=xp.int64)
    out_w = xp.full((B, K, keep), -np.inf, dtype=xp.float32)
    out_s = xp.zeros((B, K, keep), dtype=xp.int64)
    lse = xp.full((B, K), -np.inf, dtype=xp.float64)
    lse2 = xp.full((B, K), -np.inf, dtype=xp.float64)
    for b0 in range(0, B, b_chunk):
        b1 = min(B, b0 + b_chunk)
        nb = b1 - b0
        x_ri = stack_ri(xc[b0:b1, None, :] * ramps[None]).reshape(nb * T, 2 * m)
        for k, proj in enumerate(projections):
            top = (out_rot[b0:b1, k], out_w[b0:b1, k], out_s[b0:b1, k])
            sums = (lse[b0:b1, k], lse2[b0:b1, k])
            for r0 in range(0, R, r_chunk):
                r1 = min(R, r0 + r_chunk)
                S = scoring_matmul(x_ri, proj.p_ri[r0:r1].T, precision).reshape(nb, T, r1 - r0)
                L = _lse_shifts(S, xp)  # S now holds exp(S - max over shifts)
                L -= cc[b0:b1] @ proj.p_pow[r0:r1].T  # the norm term does not depend on t
                sums, top = _reduce_tile(S, L, r0, sums, top, keep, xp)
            out_rot[b0:b1, k], out_w[b0:b1, k], out_s[b0:b1, k] = top
            lse[b0:b1, k], lse2[b0:b1, k] = sums
    return TopPoses(rot=out_rot, logw=out_w, shift_idx=out_s, class_lse=lse, class_lse2=lse2)


def _reduce_tile(S, L, r0: int, sums, top, keep: int, xp):
    """Fold one tile of rotations ``[r0, r0 + L.shape[1])`` into the running sums (log-sum-exp
    of the scores and of their doubles over rotations) and the running top ``keep`` rotations,
    each with its best shift. ``L`` (b, r) scores summed over shifts; ``S`` (b, T, r) their
    per-shift weights."""
    mx = L.max(axis=1)
    lse = _lse_merge(sums[0], mx + xp.log(xp.exp(L - mx[:, None]).sum(axis=1)), xp)
    lse2 = _lse_merge(sums[1], 2 * mx + xp.log(xp.exp(2 * (L - mx[:, None])).sum(axis=1)), xp)
    # The tile's own top rotations, then their best shifts only.
    kk = min(keep, L.shape[1])
    sel = xp.argpartition(-L, kk - 1, axis=1)[:, :kk]
    best_t = xp.argmax(xp.take_along_axis(S, sel[:, None, :], axis=2), axis=1)
    sel_L = xp.take_along_axis(L, sel, axis=1)
    return (lse, lse2), _merge_top(*top, sel + r0, sel_L, best_t, keep, xp)


def score_local(
    xc, cc, band: Band, cand_proj_ri, valid, centers_px, offsets_px, precision="float32"
) -> tuple:
    """Scores of per-particle candidate groups, each group with its own trial shifts.

    ``cand_proj_ri`` (B, G, J, 2M): projections (stacked real/imag) of each particle's G
    groups of J candidate rotations (one class); ``valid`` (B, G, J) bool;
    group g tries the shifts ``centers_px[b, g] + offsets_px`` (centres (B, G, 2),
    offsets (T, 2)): the phase ramp factorises, ``ramp(c + o) = ramp(c) ramp(o)``, so
    only (B, G) + (T) ramps are evaluated. One batched product ``(T, 2M) @ (2M, J)`` per
    particle and group. Returns (log-sum-exp over the group's shifts (B, G, J) float32,
    -inf for invalid candidates; best offset index (B, G, J)). ``precision``: of the
    cross-term product, as in :func:`score_dense`.
    """
    xp = xp_of(xc)
    B, G, J, m2 = cand_proj_ri.shape
    m = m2 // 2
    T = offsets_px.shape[0]
    kx, ky = band.kx[:m], band.ky[:m]
    y = xc[:, None, :] * phase_ramp(kx, ky, centers_px[:, :, None, :], band.n)[:, :, 0]
    x = y[:, :, None, :] * phase_ramp(kx, ky, offsets_px, band.n)  # (B, G, T, M)
    x_ri = xp.empty((B, G, T, m2), dtype=xp.float32)
    x_ri[..., :m] = x.real
    x_ri[..., m:] = x.imag
    S = scoring_matmul(x_ri, cand_proj_ri.swapaxes(-1, -2), precision)  # (B, G, T, J)
    power = cand_proj_ri[..., :m] ** 2 + cand_proj_ri[..., m:] ** 2  # |P|^2 (B, G, J, M)
    S -= xp.einsum("bm,bgjm->bgj", cc, power)[:, :, None, :]
    L, best_t = _reduce_shifts(S.reshape(B * G, T, J), xp)
    L = xp.where(valid, L.reshape(B, G, J), -np.inf).astype(xp.float32)
    return L, best_t.reshape(B, G, J)

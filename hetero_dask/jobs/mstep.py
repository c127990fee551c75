"""The M-step shared by heterogeneous refinement and reconstruction: per-class backprojection and maps.

Partials: a :class:`ClassGridsPartial` holds one pair of Fourier half-grids
(:class:`~hetero_dask.core.backprojector.BackprojGrids`) per class ``k`` and
half-set ``h``, keyed ``(k, h)``, plus per-class weight sums and any summed
statistics a job adds (``extra``). Every field is a plain sum over
particles, so partials of disjoint particle ranges merge by addition
(:func:`merge_partials`) in any order.

Backprojection (:func:`backproject_particles`), per particle ``i``, pose
``p`` of class ``k``, weight ``w = posterior x pose weight``:
``B += w * CTF * Y_centred / sigma2`` and ``W += w * CTF^2 / sigma2`` at
``R k`` (README, Conventions), with ``Y_centred = Y * exp(-2 pi i k.s / n)``. A task's
batch loop runs inside :func:`accumulating`: on a CPU worker the products are
then formed per sample in one compiled pass
(:func:`hetero_dask.core.cpu_kernels.backproject_images`) into interleaved
accumulators, added into the grids when the block ends.

Maps (:func:`mstep_class`): half-maps are reconstructed first without
regularisation to measure their FSC (unless a prior FSC is given; the FSC
needs the real-space crop of the padded maps: one measured on the padded
Fourier grids, without it, is much lower), then with the Wiener prior from
that FSC (``tau2 = T * SSNR / mean W``, RELION);
the full map from the summed grids uses ``sqrt(2 FSC / (1 + FSC))``, made only when asked for
(``full_map``: refinement reads it only for its outputs and for full-map references).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import numpy as np
from dask.sizeof import sizeof

from hetero_dask.core import cpu_kernels
from hetero_dask.core.backend import to_device, to_host, xp_of
from hetero_dask.core.backprojector import (
    BackprojGrids,
    backproject,
    half_plane_freqs,
    half_plane_spectra,
    merge_grids,
    new_grids,
    symmetrise_grids,
)
from hetero_dask.core.ctf import CTFParams, ctf_band
from hetero_dask.core.fourier import shell_index
from hetero_dask.core.fsc import fsc as fsc_curve
from hetero_dask.core.fsc import full_map_fsc, resolution_A
from hetero_dask.core.reconstruction import half_map_fsc, reconstruct
from hetero_dask.core.scoring import separable_phase_ramp

HALVES = (0, 1)


@dataclass
class ClassGridsPartial:
    """Summed backprojection statistics of some particles, for K classes and two half-sets.

    ``grids``: ``(k, h) -> BackprojGrids`` (numpy arrays when travelling);
    ``weight_sum`` ``(K,)`` float64: sum of the particles' class weights;
    ``n_particles``: particles accumulated; ``extra``: name -> summed array
    (e.g. per-shell noise statistics a job adds).
    """

    grids: dict[tuple[int, int], BackprojGrids]
    weight_sum: np.ndarray
    n_particles: int = 0
    extra: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def n_classes(self) -> int:
        return int(self.weight_sum.shape[0])

    def to(self, xp) -> ClassGridsPartial:
        """The same partial with grids in namespace ``xp`` (numpy before it travels)."""
        return ClassGridsPartial(
            {key: g.to(xp) for key, g in self.grids.items()},
            np.asarray(self.weight_sum, dtype=np.float64),
            int(self.n_particles),
            {name: to_device(v, xp) for name, v in self.extra.items()},
        )


@sizeof.register(ClassGridsPartial)
def _sizeof_partial(part: ClassGridsPartial) -> int:
    """Bytes of a partial, for Dask's scheduler: without it a partial counts as ~100 bytes and
    tasks are placed as if moving hundreds of MB of grids were free."""
    grids = sum(int(g.data.nbytes) + int(g.weight.nbytes) for g in part.grids.values())
    return grids + int(part.weight_sum.nbytes) + sum(int(v.nbytes) for v in part.extra.values())


def empty_partial(K: int, n: int, pad: int = 2, r_max=None, xp=np) -> ClassGridsPartial:
    """Zeroed partial: half-grids for every class and half-set, box ``n`` up to ``r_max``."""
    grids = {(k, h): new_grids(n, pad, r_max, xp) for k in range(K) for h in HALVES}
    return ClassGridsPartial(grids, np.zeros(K, dtype=np.float64))


def merge_partials(a: ClassGridsPartial, b: ClassGridsPartial) -> ClassGridsPartial:
    """``a + b`` accumulated into ``a`` (returned); grids only in ``b`` are taken over."""
    if a.weight_sum.shape != b.weight_sum.shape:
        raise ValueError(f"cannot merge partials of {a.n_classes} and {b.n_classes} classes")
    for key, g in b.grids.items():
        if key in a.grids:
            mine = a.grids[key]
            if (mine.pad, mine.n, mine.data.shape) != (g.pad, g.n, g.data.shape):
                raise ValueError(
                    f"cannot merge grids {key} of pad/n/shape {(mine.pad, mine.n, mine.data.shape)} "
                    f"and {(g.pad, g.n, g.data.shape)}: crop both to one r_max first"
                )
            mine.data += g.data
            mine.weight += g.weight
        else:
            a.grids[key] = g.to(xp_of(g.data))
    a.weight_sum = a.weight_sum + b.weight_sum
    a.n_particles += b.n_particles
    for name, v in b.extra.items():
        a.extra[name] = a.extra[name] + v if name in a.extra else v.copy()
    return a


def select_class(merged: ClassGridsPartial, k: int) -> ClassGridsPartial:
    """The part of ``merged`` one class's M-step needs: class ``k``'s two half-grids.

    ``weight_sum`` (small) is kept whole; ``extra`` stays behind (a job that needs its sums
    selects them for a finishing task of their own, as refine's ``select_part`` does).
    """
    missing = [h for h in HALVES if (k, h) not in merged.grids]
    if missing:
        raise KeyError(f"partial has no grids for class {k}, half-set(s) {missing}")
    return ClassGridsPartial(
        {(k, h): merged.grids[(k, h)] for h in HALVES},
        merged.weight_sum.copy(),
        merged.n_particles,
    )


def _fused_cpu_path(partial: ClassGridsPartial, k: int) -> bool:
    """True when class ``k``'s grids take the compiled CPU kernel: inside :func:`accumulating`,
    numpy float32 grids."""
    if getattr(partial, "_accumulators", None) is None or not cpu_kernels.enabled():
        return False
    for h in HALVES:
        g = partial.grids[(k, h)]
        if not (
            isinstance(g.data, np.ndarray)
            and g.data.dtype == np.complex64
            and g.weight.dtype == np.float32
        ):
            return False
    return True


@contextmanager
def accumulating(partial: ClassGridsPartial):
    """Within the block, CPU backprojection into ``partial`` goes through the fused kernel
    (:func:`hetero_dask.core.cpu_kernels.backproject_images`) into interleaved (re, im,
    weight) accumulators, added into the grids on leaving (also on error: the partial is
    then discarded anyway). Use it around a task's batch loop; on a GPU, or without
    numba, it changes nothing.
    """
    partial._accumulators = {}
    try:
        yield partial
    finally:
        acc = partial._accumulators
        partial._accumulators = None
        for key in list(acc):
            buf = acc.pop(key)
            g = partial.grids[key]
            if not (g.weight.any() or g.data.any()):
                # Still empty (a task's fresh partial): the accumulator becomes the grids,
                # split in place, instead of being added into another ~100 MB of fresh memory.
                data, weight = cpu_kernels.deinterleave(buf)
                partial.grids[key] = replace(g, data=data, weight=weight)
            else:
                g.data.real += buf[..., 0]
                g.data.imag += buf[..., 1]
                g.weight += buf[..., 2]
            del buf


def _accumulator(partial: ClassGridsPartial, key):
    acc = partial._accumulators
    if key not in acc:
        acc[key] = np.zeros(partial.grids[key].data.shape + (3,), np.float32)
    return acc[key]


def backproject_particles(
    partial: ClassGridsPartial,
    images,
    ctf_params: CTFParams,
    psize_A: float,
    rotations,
    shifts_px,
    weights,
    k: int,
    halves,
    inv_sigma2=None,
    r_max=None,
) -> ClassGridsPartial:
    """Backproject a batch of particles into class ``k``'s half-grids of ``partial`` (in place).

    ``images`` ``(B, n, n)`` real, blob/sign applied; ``ctf_params`` ``(B,)``;
    ``psize_A`` of the images; per particle ``P`` poses: ``rotations``
    ``(B, P, 3, 3)``, ``shifts_px`` ``(B, P, 2)`` (CryoSPARC shifts, pixels at
    this box), ``weights`` ``(B, P)`` (posterior x pose weight; zeros are
    skipped); ``halves`` ``(B,)`` 0/1; ``inv_sigma2`` per shell
    ``(n_shells,)`` or None (1); ``r_max`` in cycles per box (default: the
    grids' own). ``partial.weight_sum[k]`` grows by the weights' sum.
    """
    grids0 = partial.grids[(k, 0)]
    xp = xp_of(grids0.data)
    images, rotations, shifts_px, weights, halves = _batch_arrays(
        xp, grids0.n, images, rotations, shifts_px, weights, halves
    )
    r_max = grids0.r_max if r_max is None else min(float(r_max), grids0.r_max)
    if _fused_cpu_path(partial, k):
        # One compiled pass per (pose slot, half): products formed per sample, rows by index.
        F, kx, ky, ctf, ctf_isig = _fused_inputs(images, ctf_params, psize_A, r_max, inv_sigma2)
        _fused_deposit(partial, k, F, kx, ky, ctf_isig, ctf, np.arange(images.shape[0]), rotations,
                       shifts_px, weights, halves)
    else:
        _array_deposit(partial, k, images, ctf_params, psize_A, r_max, inv_sigma2, rotations,
                       shifts_px, weights, halves)
    return partial


def _batch_arrays(xp, n_grids: int, images, rotations, shifts_px, weights, halves):
    """The batch of :func:`backproject_particles` as ``xp`` arrays ``(B, n, n)``, float32
    ``(B, P, 3, 3)``, ``(B, P, 2)``, ``(B, P)`` and ``(B,)``; refuses images of another box than
    the grids' ``n_grids``."""
    images = xp.asarray(images)
    B, n = images.shape[0], images.shape[-1]
    if n != n_grids:
        raise ValueError(f"images of box {n} for grids of box {n_grids}")
    weights = xp.asarray(weights, dtype=xp.float32).reshape(B, -1)
    rotations = xp.asarray(rotations, dtype=xp.float32).reshape(B, -1, 3, 3)
    shifts_px = xp.asarray(shifts_px, dtype=xp.float32).reshape(B, -1, 2)
    halves = xp.asarray(halves).reshape(B)
    return images, rotations, shifts_px, weights, halves


def _pose_slots(weights, halves, xp):
    """``(p, h, rows)`` for each pose slot ``p`` of ``weights`` ``(B, P)`` and half-set ``h``:
    the rows of that half with a positive weight in that slot (slots with none are skipped)."""
    for p in range(weights.shape[1]):
        w = weights[:, p]
        for h in HALVES:
            sel = xp.nonzero((halves == h) & (w > 0))[0]
            if sel.size:
                yield p, h, sel


def _array_deposit(partial, k, images, ctf_params, psize_A, r_max, inv_sigma2, rotations,
                   shifts_px, weights, halves):
    """The array path of :func:`backproject_particles` (any namespace): spectra, CTF and noise
    weights of the batch once, then one :func:`backproject` per (pose slot, half-set)."""
    xp = xp_of(images)
    n = images.shape[-1]
    kx, ky, Y = half_plane_spectra(images, r_max)
    ctf = ctf_band(ctf_params.to(xp), kx, ky, n, psize_A)
    ctf_isig = _over_sigma2(ctf, kx, ky, inv_sigma2)
    cy = ctf_isig * Y  # CTF * Y / sigma2, before centring
    c2 = ctf_isig * ctf  # CTF^2 / sigma2
    for p, h, sel in _pose_slots(weights, halves, xp):
        phase = separable_phase_ramp(shifts_px[sel, p], kx, ky, n)
        ws = weights[sel, p][:, None]
        phase *= cy[sel]
        if bool(xp.any(ws != 1)):
            phase *= ws
            wc2 = ws * c2[sel]
        else:
            wc2 = c2[sel]
        backproject(partial.grids[(k, h)], rotations[sel, p], phase, wc2, kx, ky)
    partial.weight_sum[k] += float(xp.sum(weights))


def _fused_inputs(images, ctf_params: CTFParams, psize_A: float, r_max, inv_sigma2):
    """What the compiled kernel reads for a batch: real FFTs, half-plane frequencies, CTF and
    CTF / sigma2 ``(B, M)`` (the same array when there is no noise model)."""
    import scipy.fft  # noqa: PLC0415

    images = np.asarray(images, dtype=np.float32)
    n = images.shape[-1]
    kx, ky, _ = half_plane_freqs(n, r_max)
    F = scipy.fft.rfft2(images)
    ctf = ctf_band(ctf_params.to(np), kx, ky, n, psize_A)
    return F, kx, ky, ctf, _over_sigma2(ctf, kx, ky, inv_sigma2)


def _over_sigma2(ctf, kx, ky, inv_sigma2):
    """``CTF / sigma2`` ``(B, M)`` with per-shell ``inv_sigma2`` (None: the CTF itself)."""
    if inv_sigma2 is None:
        return ctf
    xp = xp_of(ctf)
    isig = xp.asarray(inv_sigma2, dtype=xp.float32)
    shell = shell_index(xp.sqrt(kx**2 + ky**2), isig.shape[0] - 1)
    return ctf * isig[shell][None, :]


def _fused_deposit(partial, k, F, kx, ky, a, c, rows, rotations, shifts_px, weights, halves):
    """Kernel calls for class ``k``: images ``rows`` of ``F`` with per-row ``rotations``
    ``(R, P, 3, 3)``, ``shifts_px`` ``(R, P, 2)``, ``weights`` ``(R, P)`` and ``halves``
    ``(R,)``, one call per (pose slot, half-set)."""
    n = F.shape[-2]
    for p, h, sel in _pose_slots(weights, halves, np):
        cpu_kernels.backproject_images(
            _accumulator(partial, (k, h)), rotations[sel, p], kx, ky, F, a, c, rows[sel],
            shifts_px[sel, p], weights[sel, p], n, partial.grids[(k, h)].pad,
        )
    partial.weight_sum[k] += float(weights.sum())


def backproject_classes(
    partial: ClassGridsPartial,
    images,
    ctf_params: CTFParams,
    psize_A: float,
    rotations,
    shifts_px,
    weights,
    halves,
) -> ClassGridsPartial:
    """Backproject a batch into every class it has weight in: :func:`backproject_particles`
    per class with ``rotations`` ``(B, K, 3, 3)``, ``shifts_px`` ``(B, K, 2)`` and
    ``weights`` ``(B, K)`` (one pose per class; zeros skipped). On the compiled CPU path the
    batch is Fourier transformed and its CTF computed once for all classes."""
    K = weights.shape[1]
    if images.shape[-1] != partial.grids[(0, 0)].n:
        raise ValueError(f"images of box {images.shape[-1]} for grids of box {partial.grids[(0, 0)].n}")
    if all(_fused_cpu_path(partial, k) for k in range(K)):
        F, kx, ky, ctf, _ = _fused_inputs(images, ctf_params, psize_A, partial.grids[(0, 0)].r_max, None)
        halves = np.asarray(halves)
        for k in range(K):
            rows = np.flatnonzero(weights[:, k] > 0)
            if rows.size:
                _fused_deposit(partial, k, F, kx, ky, ctf, ctf, rows, rotations[rows, k][:, None],
                               shifts_px[rows, k][:, None], weights[rows, k][:, None], halves[rows])
        return partial
    xp = xp_of(partial.grids[(0, 0)].data)
    for k in range(K):
        rows = np.flatnonzero(weights[:, k] > 0)
        if rows.size:
            backproject_particles(
                partial, xp.asarray(images[rows]), ctf_params.subset(rows), psize_A,
                rotations[rows, k][:, None], shifts_px[rows, k][:, None], weights[rows, k][:, None],
                k, np.asarray(halves)[rows],
            )
    return partial


@dataclass
class ClassResult:
    """One class's maps and FSC from :func:`mstep_class`.

    ``vol_full``, ``vol_A``, ``vol_B`` ``(n, n, n)`` float32; ``fsc``
    ``(n // 2 + 1,)`` between the final half-maps (no mask); ``resolution_A``
    at FSC 0.143 (inf when empty); ``weight_sum`` of the class; ``empty``:
    the class got (almost) no weight and its maps are zeros;
    ``fsc_prior``: the FSC the Wiener prior used (None: unregularised).

    A result made without the full map (``mstep_class(full_map=False)``) holds None in
    ``_vol_full`` and refuses to be read for it (``has_full_map`` is False): a map
    skipped by mistake fails where it is read, not later as a None in an array.
    """

    _vol_full: np.ndarray | None
    vol_A: np.ndarray
    vol_B: np.ndarray
    fsc: np.ndarray
    resolution_A: float
    weight_sum: float
    empty: bool = False
    fsc_prior: np.ndarray | None = None

    @property
    def has_full_map(self) -> bool:
        """Whether the full map was made (see the class docstring)."""
        return self._vol_full is not None

    @property
    def vol_full(self) -> np.ndarray:
        """The full map; ValueError for a result made without it."""
        if self._vol_full is None:
            raise ValueError("this M-step result was made without its full map "
                             "(mstep_class(..., full_map=False)), yet its full map is read")
        return self._vol_full


def mstep_class(
    part_k: ClassGridsPartial,
    k: int,
    symmetry_ops=None,
    tau2_fudge: float = 1.0,
    psize_A: float | None = None,
    fsc_prior=None,
    min_weight: float = 1e-6,
    regularise: bool = True,
    regularise_halves: bool = True,
    full_map: bool = True,
) -> ClassResult:
    """Half-maps and full map of class ``k`` from its grids (see the module docstring).

    ``symmetry_ops`` ``(G, 3, 3)``: symmetrise the grids first; ``tau2_fudge``:
    RELION's T; ``psize_A``: pixel size of the maps (for ``resolution_A``);
    ``fsc_prior`` ``(n // 2 + 1,)``: half-map FSC for the Wiener prior (default:
    measured from unregularised half-maps); ``regularise=False`` returns the
    plain ``B / W`` maps; ``regularise_halves=False`` (without ``fsc_prior``)
    regularises the full map only and returns the unregularised half-maps and
    their FSC, the curves :func:`hetero_dask.core.fsc.fsc_set` is meant for.
    ``full_map=False`` skips the full map (one inverse FFT of the padded grid
    of five): the result then has none (``has_full_map`` False).
    A class whose weight is below ``min_weight`` gives zero maps, resolution
    inf and ``empty=True``. Returns numpy arrays.
    """
    if psize_A is None or not psize_A > 0:
        raise ValueError(f"mstep_class needs the maps' pixel size psize_A > 0, got {psize_A}")
    halves = [part_k.grids[(k, h)] for h in HALVES]
    n = halves[0].n
    weight = float(part_k.weight_sum[k])
    xp = xp_of(halves[0].data)
    if weight < min_weight:
        return _empty_result(n, weight, full_map)
    if symmetry_ops is not None and len(symmetry_ops) > 1:
        halves = [symmetrise_grids(g, symmetry_ops) for g in halves]
    full = merge_grids(*halves) if full_map else None
    half_empty = any(float(xp.sum(g.weight)) <= 0 for g in halves)
    prior, raw_pair = None, None
    if regularise and not half_empty:
        prior, raw_pair = _wiener_prior(halves, fsc_prior, keep_maps=not regularise_halves)
    vA, vB, vF = _class_maps(halves, full, prior, tau2_fudge, raw_pair, xp)
    if half_empty:
        curve, res_A = np.zeros(n // 2 + 1), float("inf")
    else:
        curve = _reported_fsc(vA, vB, halves, prior, fsc_prior)
        res_A = resolution_A(curve, n, psize_A)
    return ClassResult(vF, vA, vB, curve, res_A, weight, False, prior)


def _empty_result(n: int, weight: float, full_map: bool) -> ClassResult:
    """Zero maps ``(n, n, n)`` (no full map unless ``full_map``), zero FSC and resolution inf
    for a class without weight."""
    zero = np.zeros((n, n, n), np.float32)
    return ClassResult(
        zero if full_map else None, zero.copy(), zero.copy(), np.zeros(n // 2 + 1), float("inf"),
        weight, True,
    )


def _wiener_prior(halves, fsc_prior, keep_maps: bool):
    """The half-map FSC ``(n // 2 + 1,)`` float64 for the Wiener prior: ``fsc_prior`` when
    given, else measured on the unregularised half-maps, which come back too when
    ``keep_maps`` (else None) to be returned as they are."""
    if fsc_prior is not None:
        return np.asarray(fsc_prior, dtype=np.float64), None
    if not keep_maps:
        return np.asarray(to_host(half_map_fsc(*halves)), dtype=np.float64), None
    vA, vB = (reconstruct(g) for g in halves)
    return np.asarray(to_host(fsc_curve(vA, vB, r_max=halves[0].r_max)), dtype=np.float64), (vA, vB)


def _class_maps(halves, full, prior, tau2_fudge: float, raw_pair, xp):
    """Half-maps and full map ``(n, n, n)`` numpy float32 (the full map None when ``full`` is):
    plain ``B / W`` without ``prior``, else Wiener-filtered, the half-maps taken as
    ``raw_pair`` when it is given."""
    if prior is None:
        vA, vB = (reconstruct(g) for g in halves)
        vF = None if full is None else reconstruct(full)
    else:
        vA, vB = raw_pair or (reconstruct(g, prior, tau2_fudge) for g in halves)
        vF = None if full is None else reconstruct(full, xp.asarray(to_host(full_map_fsc(prior))), tau2_fudge)
    return tuple(None if v is None else np.asarray(to_host(v), dtype=np.float32) for v in (vA, vB, vF))


def _reported_fsc(vA, vB, halves, prior, fsc_prior):
    """The class's half-map FSC, always of unregularised maps, for two non-empty halves; measured
    up to the grids' ``r_max`` (beyond it the maps hold only the gridding correction's leakage)."""
    if prior is None:
        return fsc_curve(vA, vB, r_max=halves[0].r_max)  # the maps are unregularised
    if fsc_prior is None:
        return prior  # measured on the unregularised maps
    # The FSC of Wiener-filtered half-maps overstates the data's: the filter damps the
    # voxels with little weight (mostly noise) more than the others. Fed back as the next
    # prior it would regularise less and less. Measure it on the unregularised maps.
    return np.asarray(to_host(half_map_fsc(*halves)), dtype=np.float64)

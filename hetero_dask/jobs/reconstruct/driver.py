"""Heterogeneous Reconstruction Only: K class maps from particles with per-class poses and posteriors.

Steps:

1. particles (``.cs``, ``.star`` or a particle store) -> Zarr store
   (:func:`hetero_dask.jobs.common.open_particle_store`);
2. the class layout: ``alignments_class_{k}/*`` (heterogeneous refinement),
   ``alignments_class3D_{k}/*`` (3D classification), ``alignments3D_multi/*``,
   or ``alignments3D/class`` alone (hard classes, e.g. ``rlnClassNumber`` of a
   STAR file, all classes at ``alignments3D/pose``); autodetected in that
   order unless ``class_prefix`` is given; the choice is reported;
3. weights ``w_ik`` = class posteriors (or one-hot argmax with
   ``force_hard_classification``); class ``k``'s pose and shift from its slot
   (``alignments3D`` when the slot has none);
4. on Dask (:func:`hetero_dask.runtime.engine.map_reduce`): one task per
   particle range backprojects every class into half-grids at the
   reconstruction box (Fourier crop/pad of the images; the pixel size
   scales, shifts in A are kept); each partial is cut into its classes where
   it was computed and every class merges in its own tree next to its
   M-step task (``select_first``), which symmetrises, reconstructs (Wiener,
   FSC prior) and writes its maps; a second task per class computes
   CryoSPARC's FSC curves; the driver gets only these summaries;
5. outputs (see :func:`reconstruct`).
"""

from __future__ import annotations

import functools
import math
import re
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from hetero_dask.core.rotations import pose_to_matrix
from hetero_dask.io.cs import LAYOUT_CLASS, LAYOUT_CLASS3D, LAYOUT_MULTI, detect_class_layouts
from hetero_dask.io.errors import InputError

LAYOUT_HARD = (
    "alignments3D"  # classes from alignments3D/class (rlnClassNumber), one pose per particle
)
_PREFIXES = {
    "alignments_class_": LAYOUT_CLASS,
    "alignments_class": LAYOUT_CLASS,
    "alignments_class3D_": LAYOUT_CLASS3D,
    "alignments_class3D": LAYOUT_CLASS3D,
    "alignments3D_multi": LAYOUT_MULTI,
    "alignments3D_multi/": LAYOUT_MULTI,
    "alignments3D": LAYOUT_HARD,
    "alignments3D/": LAYOUT_HARD,
    "rlnClassNumber": LAYOUT_HARD,
}
_AUTODETECT_ORDER = (LAYOUT_CLASS, LAYOUT_CLASS3D, LAYOUT_MULTI)


@dataclass
class ReconstructParams:
    """Parameters of Heterogeneous Reconstruction Only (CryoSPARC's names, lower-case).

    class_prefix: per-class alignment layout: ``alignments_class_``,
        ``alignments_class3D_``, ``alignments3D_multi``, or ``alignments3D``
        (hard classes from ``alignments3D/class`` / ``rlnClassNumber``);
        None = autodetect (in that order).
    force_hard_classification: one-hot argmax weights instead of posteriors.
    symmetry, symmetry_convention: point group (``C1``, ``C4``, ``D2``, ``T``,
        ``O``, ``I``) and axis convention (``cryosparc``: D_n 2-fold along y;
        ``relion``: along x).
    box_size: reconstruction box in pixels (None = the particles' box);
        images are Fourier-cropped or padded, the pixel size scales.
    mask: mask ``.mrc`` for an extra FSC curve (box ``box_size``, same pixel size).
    random_split: draw random half-sets (reproducible from ``random_seed``)
        even when the input has ``alignments3D/split``.
    random_seed: seed of the random split and of the on-the-fly import's order.
    tau2_fudge: Wiener regularisation T (1 = RELION's default for refinement).
    posterior_tolerance: largest |sum_k p_ik - 1| accepted.
    partition_rows: particles per task (rounded to whole store chunks). The partitions,
        and so the order of the float32 sums, depend on the data only: the same maps on
        any number of workers. Each partial is a whole set of padded grids (~630 MB at
        box 128 and K=3), so partitions are large.
    partitions: exact number of particle ranges (overrides the above).
    fan_in: partial grids merged per combine task (4-8).
    batch_size: images per backprojection batch (None = by box and K).
    workers, scheduler: cluster for the Python API when no client is passed
        (None and None: run in this process, synchronously).
    stack_dir: where the particle stacks are, if not next to the file.
    flip_contrast: multiply the images by -1 (``blob/sign`` negated in every
        particle file written), for protein-dark stacks.
    contrast_check: refuse, before any work, particles whose contrast looks
        inverted (:func:`hetero_dask.jobs.contrast.check_contrast`).
    cache_dir: the particle cache's folder, or "off" (None: ``$HETERO_DASK_CACHE``
        or the default; see :mod:`hetero_dask.io.cache`).
    image_dtype: how imported images are stored, "float32" or "float16".
    """

    class_prefix: str | None = None
    force_hard_classification: bool = False
    symmetry: str = "C1"
    symmetry_convention: str = "cryosparc"
    box_size: int | None = None
    mask: str | None = None
    random_split: bool = False
    random_seed: int = 0
    tau2_fudge: float = 1.0
    posterior_tolerance: float = 0.01
    partition_rows: int = 25_000
    partitions: int | None = None
    fan_in: int = 4
    batch_size: int | None = None
    workers: int | None = None
    scheduler: str | None = None
    stack_dir: str | None = None
    flip_contrast: bool = False
    contrast_check: bool = True
    cache_dir: str | None = None
    image_dtype: str = "float32"

    def __post_init__(self):
        from hetero_dask.io.store import IMAGE_DTYPES
        from hetero_dask.jobs.preflight import bad_value, check_even_box, check_symmetry

        if self.class_prefix is not None and self.class_prefix not in _PREFIXES:
            raise bad_value(
                "class_prefix",
                self.class_prefix,
                "alignments_class_, alignments_class3D_, alignments3D_multi or alignments3D",
            )
        if self.box_size is not None:
            check_even_box("box_size", int(self.box_size))
        for name, least in (("fan_in", 2), ("partition_rows", 1)):
            if getattr(self, name) < least:
                raise bad_value(name, getattr(self, name), f"a whole number >= {least}")
        if self.fan_in > 64:
            raise bad_value("fan_in", self.fan_in, "2..64")
        for name in ("partitions", "batch_size", "workers"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise bad_value(name, getattr(self, name), "a whole number >= 1")
        for name in ("tau2_fudge", "posterior_tolerance"):
            if not getattr(self, name) > 0:
                raise bad_value(name, getattr(self, name), "a value > 0")
        if self.image_dtype not in IMAGE_DTYPES:
            raise bad_value("image_dtype", self.image_dtype, " or ".join(IMAGE_DTYPES))
        check_symmetry(self.symmetry, self.symmetry_convention)  # refuse bad names early
        if self.mask is not None:
            self.mask = str(self.mask)


# --------------------------------------------------------------------------- class layout


@dataclass(frozen=True)
class ClassLayout:
    """Where each class's weight, pose and shift are in the particle table.

    ``layout``: one of ``alignments_class``, ``alignments_class3D``,
    ``alignments3D_multi``, ``alignments3D``; ``n_classes``: K;
    ``pose_fields``/``shift_fields``/``psize_fields``: per class, the field
    to read (multi fields have a K axis); ``posterior_fields`` per class
    (None for the hard layout).
    """

    layout: str
    n_classes: int
    posterior_fields: tuple
    pose_fields: tuple
    shift_fields: tuple
    psize_fields: tuple

    def columns(self) -> list[str]:
        names = {f for f in self.posterior_fields + self.pose_fields if f}
        names |= {f for f in self.shift_fields + self.psize_fields if f}
        if self.layout == LAYOUT_HARD:
            names.add("alignments3D/class")
        return sorted(names)


def class_layout(
    table_fields, prefix: str | None = None, source="particles", classes=None
) -> ClassLayout:
    """The :class:`ClassLayout` of a table with fields ``table_fields`` (names, or a structured array).

    ``prefix``: a :class:`ReconstructParams` ``class_prefix`` or None to
    autodetect; ``classes``: ``alignments3D/class`` values (for K of the hard
    layout). Errors name the file and what is missing.
    """
    if hasattr(table_fields, "dtype"):
        if classes is None and "alignments3D/class" in table_fields.dtype.names:
            classes = table_fields["alignments3D/class"]
        arr = table_fields
        names = set(table_fields.dtype.names)
    else:
        names = set(table_fields)
        arr = None
    found = _layouts_of(names, arr)
    if prefix is None:
        layout = next((lay for lay in _AUTODETECT_ORDER if lay in found), None)
        if layout is None:
            if "alignments3D/class" not in names:
                raise InputError(
                    source,
                    "no per-class alignments",
                    expected="alignments_class_k/*, alignments_class3D_k/*, alignments3D_multi/* "
                    "or alignments3D/class (rlnClassNumber in a STAR file)",
                )
            layout = LAYOUT_HARD
    else:
        layout = _PREFIXES[prefix]
        if layout == LAYOUT_HARD:
            if "alignments3D/class" not in names:
                raise InputError(
                    source,
                    f"class prefix {prefix!r} asked for, but there is no alignments3D/class "
                    "(rlnClassNumber) field",
                    expected=f"one of the layouts present: {sorted(found) or 'none'}",
                )
        elif layout not in found:
            raise InputError(
                source,
                f"class prefix {prefix!r} is absent",
                expected=f"one of the layouts present: {sorted(found) or 'none'}"
                + (" or alignments3D (rlnClassNumber)" if "alignments3D/class" in names else ""),
            )
    if layout == LAYOUT_HARD:
        if classes is None:
            raise InputError(source, "no class numbers", field="alignments3D/class")
        K = int(np.max(classes)) + 1 if len(classes) else 0
        if "alignments3D/pose" not in names:
            raise InputError(
                source,
                "no poses for the classes",
                field="alignments3D/pose",
                expected="alignments3D/pose (rlnAngleRot/Tilt/Psi)",
            )
        a3d = _fields_or_none(names, "alignments3D/", ("pose", "shift", "psize_A"))
        return ClassLayout(LAYOUT_HARD, K, (None,) * K, (a3d[0],) * K, (a3d[1],) * K, (a3d[2],) * K)
    K = found[layout]
    if layout == LAYOUT_MULTI:
        p = f"{LAYOUT_MULTI}/"
        if p + "pose" not in names:
            raise InputError(source, "no poses for the classes", field=p + "pose")
        shift = p + "shift" if p + "shift" in names else None
        psize = "alignments3D/psize_A" if "alignments3D/psize_A" in names else None
        return ClassLayout(
            layout, K, (p + "class_posterior",) * K, (p + "pose",) * K, (shift,) * K, (psize,) * K
        )
    post, pose, shift, psize = [], [], [], []
    fallback = _fields_or_none(names, "alignments3D/", ("pose", "shift", "psize_A"))
    for k in range(K):
        pre = f"{layout}_{k}/"
        if pre + "class_posterior" not in names:
            raise InputError(source, f"class {k} has no posteriors", field=pre + "class_posterior")
        own = _fields_or_none(names, pre, ("pose", "shift", "psize_A"))
        if own[0] is None and fallback[0] is None:
            raise InputError(
                source,
                f"no poses for class {k}",
                field=pre + "pose",
                expected=f"{pre}pose or alignments3D/pose",
            )
        src = own if own[0] is not None else fallback
        post.append(pre + "class_posterior")
        pose.append(src[0])
        shift.append(src[1])
        psize.append(src[2])
    return ClassLayout(layout, K, tuple(post), tuple(pose), tuple(shift), tuple(psize))


def _fields_or_none(names, prefix: str, keys) -> list:
    return [prefix + k if prefix + k in names else None for k in keys]


def _layouts_of(names: set, arr) -> dict:
    if arr is not None:
        return detect_class_layouts(arr)
    found = {}
    for layout in (LAYOUT_CLASS, LAYOUT_CLASS3D):
        pat = re.compile(rf"^{layout}_(\d+)/")
        ks = {int(m.group(1)) for f in names if (m := pat.match(f))}
        if ks:
            found[layout] = max(ks) + 1
    return found


def class_inputs(cols, layout: ClassLayout, default_psize_A: float, psize_out_A: float):
    """Per-particle class inputs of some rows: ``cols`` maps field name -> values.

    Returns ``(posteriors (B, K) float32, rotations (B, K, 3, 3) float32,
    shifts_px (B, K, 2) float32)``; shifts are converted from pixels at each
    slot's ``psize_A`` (``default_psize_A`` when absent or 0) to pixels at
    ``psize_out_A`` (the reconstruction box): shifts in A are kept.
    """
    K = layout.n_classes
    first = next(iter(cols.values()))
    B = len(first)
    if layout.layout == LAYOUT_HARD:
        cls = np.asarray(cols["alignments3D/class"], dtype=np.int64)
        post = np.zeros((B, K), np.float32)
        post[np.arange(B), cls] = 1.0
    elif layout.layout == LAYOUT_MULTI:
        post = np.asarray(cols[layout.posterior_fields[0]], np.float32).reshape(B, K)
    else:
        post = np.stack([np.asarray(cols[f], np.float32) for f in layout.posterior_fields], axis=1)
    poses = class_poses(cols, layout)
    shifts = np.zeros((B, K, 2), np.float64)
    for k in range(K):
        if layout.shift_fields[k] is not None:
            s = np.asarray(cols[layout.shift_fields[k]], np.float64)
            s = s[:, k] if s.ndim == 3 else s
            psize = np.full(B, default_psize_A)
            if layout.psize_fields[k] is not None:
                p = np.asarray(cols[layout.psize_fields[k]], np.float64).reshape(B)
                psize = np.where(p > 0, p, default_psize_A)
            shifts[:, k] = s * (psize / psize_out_A)[:, None]
    rot = pose_to_matrix(poses.reshape(-1, 3)).reshape(B, K, 3, 3).astype(np.float32)
    return post, rot, shifts.astype(np.float32)


def class_poses(cols, layout: ClassLayout) -> np.ndarray:
    """Axis-angle pose of every class ``(B, K, 3)`` float64 from ``cols`` (field -> values)."""
    per_class = []
    for k, name in enumerate(layout.pose_fields):
        pose = np.asarray(cols[name], np.float64)
        per_class.append(pose[:, k] if pose.ndim == 3 else pose)
    return np.stack(per_class, axis=1)


def check_posteriors(post, tolerance: float, source="particles", order=None) -> None:
    """Refuse NaN/inf or negative posteriors, and rows whose sum is not 1 within ``tolerance``.

    ``order`` ``(N,)``: input row of each row of ``post`` (for the message).
    """
    post = np.asarray(post)
    where = (lambda i: int(i)) if order is None else (lambda i: int(order[i]))
    bad = ~np.isfinite(post).all(axis=1)
    if bad.any():
        i = int(np.argmax(bad))
        raise InputError(
            source,
            f"class posteriors {post[i].tolist()} are not finite "
            f"({int(bad.sum())} particle(s) with NaN/inf posteriors)",
            row=where(i),
            expected="finite class_posterior values",
        )
    if (post < 0).any():
        i = int(np.argmax((post < 0).any(axis=1)))
        raise InputError(source, f"negative class posteriors {post[i].tolist()}", row=where(i))
    err = np.abs(post.sum(axis=1, dtype=np.float64) - 1.0)
    if (err > tolerance).any():
        i = int(np.argmax(err))
        raise InputError(
            source,
            f"class posteriors sum to {post[i].sum():.4g} ({int((err > tolerance).sum())} "
            f"particle(s) off by more than {tolerance})",
            row=where(i),
            expected="posteriors summing to 1 over the classes (use force_hard_classification "
            "or --hard to reconstruct from the best class only)",
        )


# --------------------------------------------------------------------------- tasks


def _open_store(path: str):
    from hetero_dask.io.store import ParticleStore, store_version
    from hetero_dask.runtime.engine import worker_cached

    return worker_cached(("store", path, store_version(path)), lambda: ParticleStore.open(path))


def _split_of(path: str, random_split: bool, seed: int):
    from hetero_dask.io.store import store_version
    from hetero_dask.jobs.common import particle_split
    from hetero_dask.runtime.engine import worker_cached

    def load():
        store = _open_store(path)
        if random_split:
            by_input = np.random.default_rng([int(seed), 2]).permutation(store.n) % 2
            return by_input[store.original_index].astype(np.int64)
        return particle_split(store, seed)

    return worker_cached(("split", path, store_version(path), bool(random_split), int(seed)), load)


def backproject_range(
    partition,
    store_path: str,
    layout: ClassLayout,
    box: int,
    hard: bool,
    random_split: bool,
    seed: int,
    batch_size: int,
):
    """Process task: class half-grids ``ClassGridsPartial`` of the particles in ``partition``."""
    from hetero_dask.core.backend import worker_xp
    from hetero_dask.jobs.mstep import accumulating, backproject_classes, empty_partial

    store = _open_store(store_path)
    split = _split_of(store_path, random_split, seed)
    start, stop = partition.start, partition.stop
    psize_out = store.psize_at_box(box)
    xp = worker_xp()
    partial = empty_partial(layout.n_classes, box, xp=xp)
    with accumulating(partial):
        # Everything per batch, metadata too: a task's memory does not grow with its range.
        for lo in range(start, stop, batch_size):
            hi = min(lo + batch_size, stop)
            cols = {name: store.column(name, lo, hi) for name in layout.columns()}
            post, rot, shifts = class_inputs(cols, layout, store.psize_A, psize_out)
            if hard:
                post = np.eye(layout.n_classes, dtype=np.float32)[np.argmax(post, axis=1)]
            backproject_classes(
                partial,
                store.images_at_box(box, lo, hi),
                store.ctf(lo, hi),
                psize_out,
                rot,
                shifts,
                post,
                split[lo:hi],
            )
    partial.n_particles = stop - start
    return partial.to(np)


def finish_class(part_k, k: int, out_dir: str, symmetry_ops, tau2_fudge: float, psize_A: float):
    """M-step task of class ``k``: the Wiener-filtered map and the unregularised half-maps
    written to ``OUT/class_{k}``; returns its summary and the half-maps for
    :func:`class_fsc_set` (the next task of the class's chain)."""
    from hetero_dask.jobs.mstep import mstep_class
    from hetero_dask.jobs.outputs import write_class_maps

    # Unregularised half-maps, as CryoSPARC writes them: the FSC set is measured on them (a
    # Wiener-filtered pair keeps masked FSCs near 1 beyond the resolution, see core.fsc).
    res = mstep_class(part_k, k, symmetry_ops, tau2_fudge, psize_A, regularise_halves=False)
    write_class_maps(out_dir, k, res, psize_A)
    return {
        "class": k,
        "weight_sum": float(res.weight_sum),
        "empty": bool(res.empty),
        "resolution_A": float(res.resolution_A),
        "fsc_no_mask": res.fsc,
        "half_maps": None if res.empty else (res.vol_A, res.vol_B),
    }


def class_fsc_set(summary: dict, psize_A: float, mask_path):
    """FSC curves of a class's half-maps (no mask, spherical, loose, tight, corrected, user
    mask) and their resolutions: the summary :func:`finish_class` started, without the maps."""
    from hetero_dask.core.fsc import fsc_set, resolution_A
    from hetero_dask.io.mrc import read_map

    out = dict(summary)
    maps = out.pop("half_maps")
    no_mask = out.pop("fsc_no_mask")
    curves = {}
    if maps is not None:
        user = None if mask_path is None else read_map(mask_path)[0]
        try:
            curves = fsc_set(*maps, psize_A, user_mask=user, no_mask=no_mask)
        except ValueError:  # a map with nothing above its mask threshold (e.g. one empty half)
            curves = {"no_mask": no_mask}
        n = maps[0].shape[-1]
        out["resolutions_A"] = {name: resolution_A(c, n, psize_A) for name, c in curves.items()}
    else:
        out["resolutions_A"] = {}
    out["fsc"] = {name: np.asarray(c, dtype=np.float64) for name, c in curves.items()}
    return out


# --------------------------------------------------------------------------- driver


@dataclass
class ReconstructResult:
    """What :func:`reconstruct` returns: output paths, the layout used and per-class summaries."""

    out_dir: Path
    layout: str
    n_classes: int
    box: int
    psize_A: float
    classes: list
    outputs: dict
    report: dict


def _auto_batch(box: int, K: int) -> int:
    # Enough rows that each (class, half) scatter is ~2M samples (amortises the grid-sized
    # bincount), capped so a batch's temporaries stay ~1 GB.
    m = 0.5 * np.pi * (box / 2) ** 2
    return int(np.clip(2 * K * (1 << 21) / m, 64, max(64, (1 << 30) // (64 * box * box))))


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    import hetero_dask

    out = {"hetero_dask": hetero_dask.__version__}
    for pkg in ("numpy", "scipy", "dask", "distributed", "zarr"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def _load_mask(path, box: int, psize_A: float):
    from hetero_dask.io.mrc import read_map

    vol, psize = read_map(path)
    if vol.shape != (box,) * 3:
        raise InputError(
            path, f"mask of box {vol.shape[0]}", expected=f"a {box}^3 mask (the reconstruction box)"
        )
    if not np.isclose(psize, psize_A, rtol=2e-3):
        raise InputError(
            path,
            f"mask pixel size {psize:.5g} A",
            expected=f"{psize_A:.5g} A (the reconstruction's)",
        )
    if vol.min() < -1e-3 or vol.max() > 1 + 1e-3 or vol.max() <= 0:
        raise InputError(
            path, f"mask values in [{vol.min():.3g}, {vol.max():.3g}]", expected="values in [0, 1]"
        )
    return np.clip(vol, 0, 1)


def reconstruct(
    particles, out, client=None, progress: bool | None = None, **params
) -> ReconstructResult:
    """Heterogeneous Reconstruction Only (see the module doc); ``params``: :class:`ReconstructParams`.

    ``particles``: ``.cs``, ``.star`` or particle store; ``out``: output
    folder; ``client``: a ``distributed.Client`` (else ``workers`` /
    ``scheduler`` params open one, else the work runs in this process).

    Writes ``OUT/particles.cs|.star|.csg`` (input order, every input field
    kept, class fields of :mod:`hetero_dask.jobs.outputs`),
    ``OUT/class_{k}/map.mrc``, ``map_half_A.mrc``, ``map_half_B.mrc``,
    ``OUT/volumes.zip``, ``OUT/mask.mrc`` (when a mask is given),
    ``OUT/fsc.png`` and ``OUT/report.json``. An empty class gives a warning
    and zero maps marked ``"empty": true`` in the report.
    """
    from hetero_dask.jobs.preflight import check_reconstruct
    from hetero_dask.runtime.checkpoint import run_status
    from hetero_dask.runtime.cluster import ClusterSpec, job_client

    p = params.pop("params", None) or ReconstructParams(**params)
    plan = check_reconstruct(particles, out, p)  # everything, before a cluster starts or a byte is written
    if client is None and (p.workers is not None or p.scheduler is not None):
        client = ClusterSpec(scheduler=p.scheduler, workers=p.workers)
    with job_client(client) as c, run_status(plan.output.run_dir, "reconstruct"):
        return _run(particles, out, c, p, progress, plan)


def _run(particles, out, client, p: ReconstructParams, progress, plan) -> ReconstructResult:
    from hetero_dask.core.symmetry import symmetry_group
    from hetero_dask.io.mrc import read_map, write_map
    from hetero_dask.jobs.common import open_particle_store, output_table
    from hetero_dask.jobs.mstep import merge_partials, select_class
    from hetero_dask.jobs.outputs import (
        fsc_figure,
        map_figures,
        write_job_html,
        write_particles,
        write_report_json,
        write_volume_series,
    )
    from hetero_dask.runtime.checkpoint import write_status
    from hetero_dask.runtime.engine import map_reduce, partition_ranges

    t0 = time.perf_counter()
    timings = {}
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    source = str(particles)
    store = open_particle_store(
        particles,
        out_dir,
        client,
        stack_dir=p.stack_dir,
        seed=p.random_seed,
        progress=progress,
        flip_contrast=p.flip_contrast,
        contrast_check=p.contrast_check,
        particle_set=plan.particles.particle_set,
        cache_dir=p.cache_dir,
        image_dtype=p.image_dtype,
    )
    timings["import_s"] = time.perf_counter() - t0

    t = time.perf_counter()
    # Only the class fields now; the whole table is read by the particle writer, off the
    # critical path (after_map below).
    light = store.table(fields=[f for f in store.fields if f.startswith("alignments")])
    layout = class_layout(light, p.class_prefix, source)
    if layout.n_classes < 1:
        raise InputError(source, "no particles with a class")
    cols = {name: light[name] for name in layout.columns()}
    box = plan.box
    psize_out = store.psize_at_box(box)
    post, rot, shifts = class_inputs(cols, layout, store.psize_A, psize_out)
    del rot
    check_posteriors(post, p.posterior_tolerance, source, store.original_index)
    hard = p.force_hard_classification or layout.layout == LAYOUT_HARD
    mask_out = None
    if p.mask is not None:
        mask = _load_mask(p.mask, box, psize_out)
        mask_out = out_dir / "mask.mrc"
        write_map(mask_out, mask, psize_out)
    ops = symmetry_group(p.symmetry, p.symmetry_convention)
    timings["prepare_s"] = time.perf_counter() - t

    t = time.perf_counter()
    align = int(store.attrs.get("chunk_rows", 1))
    n_parts = p.partitions if p.partitions is not None else max(1, math.ceil(store.n / p.partition_rows))
    parts = partition_ranges(store.n, n_parts, align)
    batch = p.batch_size or _auto_batch(box, layout.n_classes)
    process = functools.partial(
        backproject_range,
        store_path=str(store.path),
        layout=layout,
        box=box,
        hard=hard,
        random_split=p.random_split,
        seed=p.random_seed,
        batch_size=batch,
    )
    # Per class: the M-step (maps written), then its FSC set as a second, light task that
    # runs wherever a core is free (3 classes on 2 workers: the FSCs fill the idle core).
    fsc_task = functools.partial(
        class_fsc_set, psize_A=psize_out, mask_path=None if mask_out is None else str(mask_out)
    )
    finish = {
        k: (
            functools.partial(
                finish_class,
                k=k,
                out_dir=str(out_dir),
                symmetry_ops=ops,
                tau2_fudge=p.tau2_fudge,
                psize_A=psize_out,
            ),
            fsc_task,
        )
        for k in range(layout.n_classes)
    }
    best = np.argmax(post, axis=1)
    written = {}

    def write_particle_files():
        # Needs no map: runs in a driver thread while the merges and M-steps run.
        t_write = time.perf_counter()
        to_input = store.to_input_order
        written.update(
            write_particles(
                out_dir,
                output_table(store, p.stack_dir),
                to_input(post),
                to_input(class_poses(cols, layout)),
                to_input(class_inputs(cols, layout, store.psize_A, store.psize_A)[2]),
                store.psize_A,
                best_class=to_input(best),
                split=to_input(_split_of(str(store.path), p.random_split, p.random_seed)),
                job="hetero_dask reconstruct",
            )
        )
        timings["write_particles_s"] = time.perf_counter() - t_write

    summaries = map_reduce(
        client,
        process,
        parts,
        merge_partials,
        fan_in=p.fan_in,
        finish=finish,
        select=select_class,
        key_prefix="reconstruct",
        progress=progress,
        after_map=write_particle_files,
        select_first=True,
    )
    timings["reconstruct_s"] = time.perf_counter() - t

    t = time.perf_counter()
    classes = [summaries[k] for k in range(layout.n_classes)]
    for c in classes:
        if c["empty"]:
            warnings.warn(
                f"class {c['class']} received no particles (weight {c['weight_sum']:.3g}): "
                "its maps are zeros and it is marked empty in report.json",
                stacklevel=2,
            )
    vols = np.stack(
        [read_map(out_dir / f"class_{k}" / "map.mrc")[0] for k in range(layout.n_classes)]
    )
    outputs = {"volumes": write_volume_series(out_dir, vols, psize_out)}
    maps_png = map_figures(out_dir, {f"class {k}": v for k, v in enumerate(vols)})
    outputs.update(maps_png)
    del vols
    curves = {
        f"class {c['class']}" + (" (empty)" if c["empty"] else ""): c["fsc"]
        for c in classes
        if c["fsc"]
    }
    if curves:
        outputs["fsc_png"] = fsc_figure(out_dir, curves, psize_out, box)
    outputs.update({f"particles_{k}": v for k, v in written.items() if k != "table"})
    for k in range(layout.n_classes):
        outputs[f"class_{k}_map"] = out_dir / f"class_{k}" / "map.mrc"
    if mask_out is not None:
        outputs["mask"] = mask_out
    timings["write_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t0

    n_hard = np.bincount(best, minlength=layout.n_classes)
    report = {
        "job": "heterogeneous_reconstruction_only",
        "particles": source,
        "store": str(store.path),
        "n_particles": store.n,
        "class_layout": layout.layout,
        "class_layout_autodetected": p.class_prefix is None,
        "n_classes": layout.n_classes,
        "hard_classification": bool(hard),
        "box": box,
        "input_box": store.box,
        "psize_A": psize_out,
        "symmetry": p.symmetry,
        "symmetry_order": int(len(ops)),
        "n_partitions": len(parts),
        "batch_size": batch,
        "workers": None if client is None else len(client.scheduler_info()["workers"]),
        "parameters": asdict(p),
        "classes": [
            {
                "class": c["class"],
                "weight_sum": c["weight_sum"],
                "n_particles_best": int(n_hard[c["class"]]),
                "empty": c["empty"],
                "resolution_A": c["resolution_A"],
                "resolution_corrected_A": c["resolutions_A"].get("corrected", float("inf")),
                "resolutions_A": c["resolutions_A"],
                "fsc": c["fsc"],
                "map": f"class_{c['class']}/map.mrc",
            }
            for c in classes
        ],
        "fsc_shells": list(range(box // 2 + 1)),
        "timings": {key: round(v, 3) for key, v in timings.items()},
        "versions": _versions(),
        "outputs": {key: str(Path(v).relative_to(out_dir)) for key, v in outputs.items()},
    }
    outputs["report"] = write_report_json(out_dir, report)
    outputs["report_html"] = write_job_html(
        out_dir, "Heterogeneous Reconstruction Only", report, [outputs.get("fsc_png"), *maps_png.values()]
    )
    write_status(
        out_dir / "run",
        state="done",
        message="finished",
        results={"report": str(outputs["report"]), "report_html": str(outputs["report_html"])},
    )
    return ReconstructResult(
        out_dir, layout.layout, layout.n_classes, box, psize_out, classes, outputs, report
    )

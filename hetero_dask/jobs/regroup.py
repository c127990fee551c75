"""Regroup 3D Classes: cluster K class volumes into M superclasses and regroup their particles.

Steps:

1. class of each particle = argmax of its upstream class posteriors
   (``alignments_class_{k}``, ``alignments_class3D_{k}``, ``alignments3D_multi``;
   ``alignments3D/class`` when only the best class is known; ``rlnClassNumber``
   for STAR); excluded classes and classes under ``min_class_size`` particles
   are set aside and their particles become the "remaining particles";
2. the included volumes are Fourier-cropped to ``crop_box``, low-passed to a
   common resolution, masked (the user's mask, a soft sphere of
   ``mask_radius`` x half the box, or nothing) and normalised inside the mask;
3. pairwise correlations: at zero shift (one matrix product), or with
   ``align_pairs`` the best over translations within ``max_shift_A`` and over
   the hand-flipped map, K^2/2 pairs batched into Dask tasks;
4. distance sqrt(2 - 2c) -> self-tuning affinity -> normalised Laplacian ->
   M eigenvectors -> k-means (:mod:`hetero_dask.core.spectral`);
5. outputs: regrouped particles with one-hot superclass posteriors in the
   input's per-class layout (so Heterogeneous Reconstruction Only reads them),
   per-superclass particles and size-weighted average maps (members aligned to
   the largest one when ``align_pairs``; then the particle poses of moved or
   hand-flipped classes are transformed to match), remaining particles, plots
   and ``report.json``.

Superclasses are numbered by size: superclass 0 holds the most particles.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from hetero_dask.core.align3d import (
    align_pairs as align_volume_pairs,
)
from hetero_dask.core.align3d import (
    apply_alignment,
    invert_alignment,
    poses_after_alignment,
)
from hetero_dask.core.fourier import fourier_resize, lowpass, radius_3d, soft_edge
from hetero_dask.core.spectral import correlation_distance, spectral_cluster

# --------------------------------------------------------------------------- parameters


@dataclass
class RegroupParams:
    """Parameters of Regroup 3D Classes (CryoSPARC's names, lower-case).

    num_superclasses: M, 1 <= M <= (number of included classes) - 1.
    exclude_classes: zero-based class indices set aside (their particles go to
        the remaining particles).
    min_class_size: classes with fewer particles (argmax of the posteriors) are
        set aside too; the default 1 sets aside only empty classes.
    align_pairs: align every pair of volumes by translation (and hand flip)
        before comparing them.
    max_shift_A: largest shift searched by the pair alignment, in Angstrom
        (None: 10% of the box).
    mask_radius: soft spherical mask radius as a fraction of half the box
        (1.0 = sphere of the box's diameter); None = no mask. Ignored when a
        mask file is given.
    crop_box: volumes are Fourier-cropped to this box (at most) for comparison.
    lowpass_res_A: common resolution the cropped volumes are filtered to (None:
        4 x the cropped pixel size, half the cropped Nyquist frequency).
    affinity_neighbors: self-tuning affinity: local scale = distance to this
        nearest neighbour.
    kmeans_starts: k-means restarts (best inertia kept).
    weight_by_size: cluster the particles rather than the classes: each class
        weighs as many particles as it holds in the graph cut and in k-means
        (:func:`hetero_dask.core.spectral.size_weighted_embedding`), so a few
        near-empty, noisy classes cannot decide the grouping of the large ones.
        False: every class counts once.
    random_seed: seed of the k-means starts (the result is deterministic).
    prefix: prepended to the output particle file names (``{prefix}particles.cs``).
    """

    num_superclasses: int
    exclude_classes: tuple[int, ...] = ()
    min_class_size: int = 1
    align_pairs: bool = False
    max_shift_A: float | None = None
    mask_radius: float | None = None
    crop_box: int = 64
    lowpass_res_A: float | None = None
    affinity_neighbors: int = 3
    kmeans_starts: int = 100
    weight_by_size: bool = True
    random_seed: int = 0
    prefix: str = ""

    def __post_init__(self):
        from hetero_dask.jobs.preflight import bad_value, check_even_box

        self.exclude_classes = tuple(int(k) for k in self.exclude_classes)
        if self.num_superclasses < 1:
            raise bad_value("num_superclasses", self.num_superclasses, "a number >= 1")
        if self.min_class_size < 0:
            raise bad_value("min_class_size", self.min_class_size, "a number >= 0")
        if self.max_shift_A is not None and self.max_shift_A < 0:
            raise bad_value("max_shift_A", self.max_shift_A, "a shift in A >= 0")
        if self.mask_radius is not None and not 0 < self.mask_radius <= 1.5:
            raise bad_value("mask_radius", self.mask_radius, "a fraction of half the box, 0 < r <= 1.5")
        check_even_box("crop_box", self.crop_box)
        if self.lowpass_res_A is not None and self.lowpass_res_A <= 0:
            raise bad_value("lowpass_res_A", self.lowpass_res_A, "a resolution in A > 0")
        for name in ("affinity_neighbors", "kmeans_starts"):
            if getattr(self, name) < 1:
                raise bad_value(name, getattr(self, name), "a number >= 1")
        if any(k < 0 for k in self.exclude_classes):
            raise bad_value("exclude_classes", list(self.exclude_classes), "zero-based class indices >= 0")


@dataclass
class RegroupResult:
    """What the job decided. Arrays indexed by the upstream class k = 0..K-1.

    superclass: (K,) superclass of each class, -1 for classes set aside;
    class_sizes: (K,) particles per class (argmax of the posteriors);
    included: indices of the clustered classes, in order (rows of the matrices);
    correlation, affinity: (n_included, n_included); eigenvalues: (n_included,);
    flipped_pairs: class pairs (i, j) of one superclass whose best match was hand-flipped;
    out_dir: the output folder; outputs: name -> path of every file written.
    """

    superclass: np.ndarray
    class_sizes: np.ndarray
    included: np.ndarray
    correlation: np.ndarray
    affinity: np.ndarray
    eigenvalues: np.ndarray
    flipped_pairs: list
    out_dir: Path
    outputs: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- class sizes


def class_assignments(table: np.ndarray, n_volumes: int, source="particles"):
    """Class of each particle (argmax of the posteriors) and the layout it came from.

    Returns (labels (N,) int64, layout or None). With a per-class layout the number
    of classes must equal ``n_volumes``; with only ``alignments3D/class`` every
    label must be < ``n_volumes``.
    """
    from hetero_dask.io.cs import class_posteriors, detect_class_layouts
    from hetero_dask.io.errors import InputError

    layouts = detect_class_layouts(table)
    if layouts:
        layout = next(iter(layouts))
        k = layouts[layout]
        if k != n_volumes:
            raise InputError(
                source,
                f"the particles have {k} classes ({layout}) but {n_volumes} volumes were given",
                expected="one volume per class, in class order",
            )
        return np.argmax(class_posteriors(table, layout), axis=1).astype(np.int64), layout
    if "alignments3D/class" not in (table.dtype.names or ()):
        raise InputError(
            source,
            "no class assignments",
            expected="alignments_class_k/*, alignments_class3D_k/*, alignments3D_multi/* "
            "or alignments3D/class (rlnClassNumber in STAR)",
        )
    labels = np.asarray(table["alignments3D/class"], dtype=np.int64)
    if len(labels) and labels.max() >= n_volumes:
        raise InputError(
            source,
            f"particles are in class {int(labels.max())} but only {n_volumes} volumes were given",
            field="alignments3D/class",
            expected=f"class indices 0..{n_volumes - 1}",
        )
    return labels, None


def select_classes(sizes: np.ndarray, params: RegroupParams) -> np.ndarray:
    """Indices of the classes to cluster; checks exclusions and M against them."""
    from hetero_dask.jobs.preflight import bad_value, option

    k = len(sizes)
    bad = [c for c in params.exclude_classes if c >= k]
    if bad:
        raise bad_value(
            "exclude_classes", bad, f"existing classes: there are {k}, indices 0..{k - 1}"
        )
    keep = np.ones(k, dtype=bool)
    keep[list(params.exclude_classes)] = False
    keep &= sizes >= params.min_class_size
    included = np.flatnonzero(keep)
    if len(included) == 0:
        raise ValueError(
            f"regroup: every class is set aside (excluded {sorted(params.exclude_classes)}, "
            f"{option('min_class_size')} {params.min_class_size}, sizes {sizes.tolist()}): "
            "nothing to regroup"
        )
    m = params.num_superclasses
    if not 1 <= m <= len(included) - 1:
        raise bad_value(
            "num_superclasses", m, f"1..{len(included) - 1} (with {len(included)} included classes)"
        )
    holding = int(np.count_nonzero(sizes[included]))
    if params.weight_by_size and holding < m:
        raise bad_value(
            "num_superclasses",
            m,
            f"at most {holding}: only {holding} included classes hold particles "
            f"({option('min_class_size')} {params.min_class_size}); weighing classes by their "
            "particles needs at least one per superclass (raise --min-class-size or use "
            "--count-classes-once)",
        )
    return included


# --------------------------------------------------------------------------- volumes


def crop_size(n: int, params: RegroupParams) -> int:
    """Box the volumes are compared at: ``min(crop_box, n)``, rounded down to even."""
    c = min(params.crop_box, n)
    return c - (c % 2) if c < n else c


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
    res_A = params.lowpass_res_A or 4.0 * psize_crop
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


def _align_task(prepared, pairs, max_shift_px: float):
    """Dask task: align a batch of pairs on this worker's device; results on the host."""
    from hetero_dask.core.backend import to_device, worker_xp

    return align_volume_pairs(to_device(prepared, worker_xp()), pairs, max_shift_px, try_flip=True)


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


def aligned_correlations(prepared, max_shift_px: float, client, tasks_per_worker: int = 4):
    """Best correlation of every pair over shifts (and the hand flip), computed as Dask tasks.

    Returns (correlation (K, K), shift_px (K, K, 3), flipped (K, K)); entry [i, j]
    is the alignment of volume j onto volume i (``apply_alignment(v_j, shift, flip) ~ v_i``).
    """
    k = len(prepared)
    corr = np.eye(k)
    shift = np.zeros((k, k, 3))
    flipped = np.zeros((k, k), dtype=bool)
    if k < 2:
        return corr, shift, flipped
    n_workers = max(1, len(client.scheduler_info().get("workers", {})))
    batches = pair_blocks(k, tasks_per_worker * n_workers)
    vols = client.scatter(prepared, broadcast=True)
    futures = [
        client.submit(_align_task, vols, b, max_shift_px, key=f"regroup-align-{i}")
        for i, b in enumerate(batches)
    ]
    for b, res in zip(batches, client.gather(futures), strict=True):
        for (i, j), c, s, f in zip(b, res.correlation, res.shift_px, res.flipped, strict=True):
            corr[i, j] = corr[j, i] = c
            shift[i, j], flipped[i, j] = s, f
            shift[j, i], flipped[j, i] = invert_alignment(s, f)
    return corr, shift, flipped


# --------------------------------------------------------------------------- superclasses


def order_superclasses(labels, sizes) -> np.ndarray:
    """Renumber clusters so superclass 0 has the most particles (ties: lowest first class)."""
    m = int(labels.max()) + 1
    totals = np.array([sizes[labels == s].sum() for s in range(m)])
    first = np.array([np.flatnonzero(labels == s)[0] for s in range(m)])
    order = np.lexsort((first, -totals))
    new = np.empty(m, dtype=np.int64)
    new[order] = np.arange(m)
    return new[labels]


def superclass_references(superclass, sizes) -> dict:
    """Largest member class of each superclass (ties: lowest index): {m: class index}."""
    refs = {}
    for m in sorted(set(superclass[superclass >= 0].tolist())):
        members = np.flatnonzero(superclass == m)
        refs[m] = int(members[np.argmax(sizes[members])])
    return refs


def average_map(vols, members, sizes, moves_px=None, flips=None) -> np.ndarray:
    """Size-weighted average of ``vols[members]``, each first aligned by (move, flip) when given."""
    acc = np.zeros(vols.shape[1:], dtype=np.float64)
    total = float(sizes[members].sum()) or 1.0
    for c in members:
        v = np.asarray(vols[c], np.float32)
        if moves_px is not None:
            v = apply_alignment(v, moves_px[c], bool(flips[c]))
        acc += (sizes[c] / total) * v
    return acc.astype(np.float32)


# --------------------------------------------------------------------------- particle tables


def _slot_values(table, layout, k_of_row):
    """Fields of each row's own class slot: {slot field: (N, ...)} (alignments3D/* without a layout)."""
    from hetero_dask.io.cs import LAYOUT_MULTI, class_prefix

    names = table.dtype.names
    n = len(table)
    if layout is None:
        return {
            f.split("/", 1)[1]: np.array(table[f]) for f in names if f.startswith("alignments3D/")
        }
    if layout == LAYOUT_MULTI:
        out = {}
        for f in names:
            if f.startswith(f"{LAYOUT_MULTI}/"):
                v = np.asarray(table[f])
                key = f.split("/", 1)[1]
                out[key] = v.copy() if key == "split" or v.ndim == 1 else v[np.arange(n), k_of_row]
        return out
    slot = [
        f[len(class_prefix(layout, 0)) :] for f in names if f.startswith(class_prefix(layout, 0))
    ]
    out = {}
    for key in slot:
        first = np.asarray(table[class_prefix(layout, 0) + key])
        vals = np.empty_like(first)
        for k in np.unique(k_of_row):
            sel = k_of_row == k
            vals[sel] = table[class_prefix(layout, int(k)) + key][sel]
        out[key] = vals
    return out


def _pixel_sizes(table, slot, default_psize_A: float) -> np.ndarray:
    """Per-row pixel size of the alignment shifts (slot, then alignments3D, then the maps')."""
    if "psize_A" in slot and np.all(slot["psize_A"] > 0):
        return np.asarray(slot["psize_A"], np.float64)
    if "alignments3D/psize_A" in table.dtype.names and np.all(table["alignments3D/psize_A"] > 0):
        return np.asarray(table["alignments3D/psize_A"], np.float64)
    return np.full(len(table), default_psize_A)


def _move_poses(slot, psize_rows, k_of_row, moves_A, flips):
    """Transform pose/shift of rows whose class was moved or flipped onto its superclass reference."""
    from hetero_dask.core.rotations import matrix_to_pose, pose_to_matrix

    if "pose" not in slot or "shift" not in slot:
        return slot
    pose, shift = slot["pose"].copy(), slot["shift"].copy()
    for k in np.unique(k_of_row):
        if not np.any(moves_A[k]) and not flips[k]:
            continue
        sel = np.flatnonzero(k_of_row == k)
        R = pose_to_matrix(pose[sel].astype(np.float64))
        # the move is in A; each row's shift is in pixels of its own psize
        out_R = np.empty_like(R)
        out_s = np.empty((len(sel), 2))
        for ps in np.unique(psize_rows[sel]):
            rows = psize_rows[sel] == ps
            out_R[rows], out_s[rows] = poses_after_alignment(
                R[rows], shift[sel][rows].astype(np.float64), moves_A[k] / ps, bool(flips[k])
            )
        pose[sel] = matrix_to_pose(out_R)
        shift[sel] = out_s
    return {**slot, "pose": pose, "shift": shift}


def superclass_table(table, layout, k_of_row, superclass_of_row, n_superclasses, slot):
    """The regrouped particle table: one-hot superclass posteriors in ``layout``.

    Every superclass slot carries the row's own class alignment (``slot``);
    ``class_posterior`` is 1 in the row's superclass and 0 elsewhere. Without a
    per-class layout only ``alignments3D/class`` (and pose/shift) are rewritten.
    """
    from hetero_dask.io.cs import (
        LAYOUT_MULTI,
        class_prefix,
        detect_class_layouts,
        drop_fields,
        with_fields,
    )

    n, m = len(table), n_superclasses
    onehot = (superclass_of_row[:, None] == np.arange(m)[None]).astype(np.float32)
    fields = {}
    if layout == LAYOUT_MULTI:
        table = drop_fields(table, [f"{LAYOUT_MULTI}/"])
        for key, v in slot.items():
            if key == "split":
                fields[f"{LAYOUT_MULTI}/split"] = v
            elif key not in ("class_posterior", "class", "psize_A"):
                fields[f"{LAYOUT_MULTI}/{key}"] = np.repeat(v[:, None], m, axis=1)
        fields[f"{LAYOUT_MULTI}/class_posterior"] = onehot
        fields[f"{LAYOUT_MULTI}/class"] = np.broadcast_to(np.arange(m, dtype=np.uint32), (n, m))
    elif layout is not None:
        k_in = detect_class_layouts(table)[layout]
        table = drop_fields(table, [class_prefix(layout, k) for k in range(k_in)])
        for s in range(m):
            p = class_prefix(layout, s)
            for key, v in slot.items():
                fields[p + key] = v
            fields[p + "class_posterior"] = onehot[:, s]
            fields[p + "class"] = np.full(n, s, dtype=np.uint32)
    names = table.dtype.names
    fields["alignments3D/class"] = superclass_of_row.astype(np.uint32)
    if "alignments3D/class_posterior" in names:
        fields["alignments3D/class_posterior"] = np.ones(n, np.float32)
    for key in ("pose", "shift"):
        if f"alignments3D/{key}" in names and key in slot:
            fields[f"alignments3D/{key}"] = slot[key].astype(
                table.dtype[f"alignments3D/{key}"].base
            )
    return with_fields(table, fields)




def _load_inputs(particles, volumes, mask, volumes_psize_A):
    """(table, source name, star input?, vols (K,N,N,N), psize_A, mask or None).

    Volumes of different boxes or voxel sizes are refused by ``read_volume_group``.
    """
    from hetero_dask.io.errors import InputError
    from hetero_dask.io.mrc import read_map
    from hetero_dask.io.paths import check_allowed
    from hetero_dask.jobs.preflight import check_volumes, for_option

    if isinstance(particles, np.ndarray):
        table, source, is_star = particles, "particles", False
    else:
        source = str(particles)
        is_star = source.lower().endswith(".star")
        try:
            check_allowed(Path(source), "--particles")
            if is_star:
                from hetero_dask.io.convert import star_to_cs
                from hetero_dask.io.star import read_star

                table = star_to_cs(read_star(particles), source)
            else:
                from hetero_dask.io.cs import read_cs

                table = read_cs(particles)
        except (InputError, ValueError, OSError) as exc:
            raise for_option("--particles", exc) from None
    if isinstance(volumes, np.ndarray):
        if volumes_psize_A is None:
            raise ValueError("regroup: volumes given as an array need volumes_psize_A (--psize)")
        vols, psize_A = np.asarray(volumes, np.float32), float(volumes_psize_A)
    else:
        vols, psize_A, _ = check_volumes(volumes, psize_A=volumes_psize_A)
    mask_vol = None
    if mask is not None:
        try:
            check_allowed(Path(mask), "--mask")
            mask_vol, mask_psize = read_map(mask, psize_A)
        except (InputError, ValueError, OSError) as exc:
            raise for_option("--mask", exc) from None
        if mask_vol.shape != vols.shape[1:] or abs(mask_psize - psize_A) > 1e-3 * psize_A:
            raise InputError(
                "--mask",
                f"{mask} is {mask_vol.shape[0]}^3 at {mask_psize} A but the volumes "
                f"are {vols.shape[-1]}^3 at {psize_A} A",
                expected="a mask of the volumes' box and voxel size",
            )
    return table, source, is_star, vols, psize_A, mask_vol


def regroup(
    particles,
    volumes,
    out_dir,
    params: RegroupParams | None = None,
    *,
    mask=None,
    volumes_psize_A: float | None = None,
    client=None,
    scheduler=None,
    workers: int | None = None,
    **param_values,
) -> RegroupResult:
    """Regroup K classes into superclasses and write the outputs to ``out_dir``.

    particles: .cs or .star path (or a structured array) with per-class posteriors
        or class numbers; volumes: folder, volume-series .zip, list of .mrc paths,
        or an array (K, N, N, N) with ``volumes_psize_A``; mask: optional .mrc path.
    params: a :class:`RegroupParams`, or its fields as keywords
        (``regroup(p, v, out, num_superclasses=3, align_pairs=True)``).
    client / scheduler / workers: where the pair alignment runs (an existing
        ``distributed.Client``, a scheduler address, or a local cluster of
        ``workers`` processes); no cluster is started without ``align_pairs``.
    """
    if params is None:
        params = RegroupParams(**param_values)
    elif param_values:
        raise TypeError("regroup: pass either params or parameter keywords, not both")
    from hetero_dask.jobs.preflight import check_output, for_option
    from hetero_dask.runtime.checkpoint import write_status

    t0 = time.perf_counter()
    timings = {}
    # Everything is checked before a cluster starts or a byte is written.
    output = check_output(out_dir, "regroup")
    table, source, is_star, vols, psize_A, mask_vol = _load_inputs(
        particles, volumes, mask, volumes_psize_A
    )
    k = len(vols)
    try:
        labels, layout = class_assignments(table, k, source)
    except ValueError as exc:
        raise for_option("--particles", exc) from None
    sizes = np.bincount(labels, minlength=k)
    included = select_classes(sizes, params)
    timings["load_s"] = time.perf_counter() - t0
    # No cleanup on failure or Ctrl-C: the status is left at running, and a rerun sees that
    # its process is gone (preflight.check_output).
    write_status(output.run_dir, job="regroup", state="running", error=None)

    t = time.perf_counter()
    prepared, psize_crop, _ = prepare_volumes(vols[included], psize_A, params, mask_vol)
    timings["prepare_s"] = time.perf_counter() - t
    t = time.perf_counter()
    n_inc = len(included)
    shift_px = np.zeros((n_inc, n_inc, 3))
    flipped = np.zeros((n_inc, n_inc), dtype=bool)
    max_shift_A = None
    if params.align_pairs:
        from hetero_dask.runtime.cluster import ClusterSpec, job_client

        box_A = vols.shape[-1] * psize_A
        max_shift_A = 0.1 * box_A if params.max_shift_A is None else params.max_shift_A
        spec = client if client is not None else ClusterSpec(scheduler=scheduler, workers=workers)
        with job_client(spec) as c:
            corr, shift_px, flipped = aligned_correlations(prepared, max_shift_A / psize_crop, c)
    else:
        corr = zero_shift_correlations(prepared)
    timings["compare_s"] = time.perf_counter() - t

    t = time.perf_counter()
    spec = spectral_cluster(
        correlation_distance(corr),
        params.num_superclasses,
        n_neighbors=params.affinity_neighbors,
        n_init=params.kmeans_starts,
        seed=params.random_seed,
        sizes=sizes[included] if params.weight_by_size else None,
    )
    superclass = np.full(k, -1, dtype=np.int64)
    superclass[included] = order_superclasses(spec.labels, sizes[included])
    refs = superclass_references(superclass, sizes)
    timings["cluster_s"] = time.perf_counter() - t

    # alignment of every included class onto its superclass reference, in A
    moves_A = np.zeros((k, 3))
    flips = np.zeros(k, dtype=bool)
    if params.align_pairs:
        row = {int(c): i for i, c in enumerate(included)}
        for c in included:
            ref = refs[int(superclass[c])]
            moves_A[c] = shift_px[row[ref], row[int(c)]] * psize_crop
            flips[c] = flipped[row[ref], row[int(c)]]
    # a flip between unrelated maps is noise: report those inside a superclass
    flipped_pairs = [
        [int(included[i]), int(included[j])]
        for i, j in zip(*np.triu_indices(n_inc, 1), strict=True)
        if flipped[i, j] and superclass[included[i]] == superclass[included[j]]
    ]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    outputs = _write_outputs(
        out_dir,
        params,
        table,
        layout,
        labels,
        superclass,
        sizes,
        refs,
        vols,
        psize_A,
        moves_A,
        flips,
        is_star,
        mask,
    )
    result = RegroupResult(
        superclass=superclass,
        class_sizes=sizes,
        included=included,
        correlation=corr,
        affinity=spec.affinity,
        eigenvalues=spec.eigenvalues,
        flipped_pairs=flipped_pairs,
        out_dir=out_dir,
        outputs=outputs,
    )
    outputs.update(_write_plots(out_dir, result, vols))
    timings["write_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t0
    report = {
        "job": "regroup",
        "params": asdict(params),
        "inputs": {"particles": source, "volumes": _describe(volumes), "mask": _describe(mask)},
        "n_particles": len(table),
        "n_classes": k,
        "box": int(vols.shape[-1]),
        "psize_A": psize_A,
        "comparison": {
            "box": int(prepared.shape[-1]),
            "psize_A": psize_crop,
            "lowpass_res_A": params.lowpass_res_A or 4.0 * psize_crop,
            "max_shift_A": max_shift_A,
        },
        "classes": [
            {
                "class": c,
                "n_particles": int(sizes[c]),
                "superclass": int(superclass[c]) if superclass[c] >= 0 else None,
                "status": "excluded"
                if c in params.exclude_classes
                else ("too small" if superclass[c] < 0 else "included"),
                "move_to_reference_A": moves_A[c].round(3).tolist(),
                "hand_flipped_to_reference": bool(flips[c]),
            }
            for c in range(k)
        ],
        "superclasses": [
            {
                "superclass": m,
                "classes": np.flatnonzero(superclass == m).tolist(),
                "reference_class": refs[m],
                "n_particles": int(sizes[superclass == m].sum()),
            }
            for m in sorted(refs)
        ],
        "n_remaining_particles": int(sizes[superclass < 0].sum()),
        "included_classes": included.tolist(),
        "correlation": np.round(corr, 5).tolist(),
        "affinity": np.round(spec.affinity, 5).tolist(),
        "eigenvalues": np.round(spec.eigenvalues, 6).tolist(),
        "flipped_pairs": flipped_pairs,
        "timings": {key: round(v, 3) for key, v in timings.items()},
        "outputs": {key: str(Path(v).relative_to(out_dir)) for key, v in outputs.items()},
    }
    from hetero_dask.io.errors import atomic_output

    with atomic_output(out_dir / "report.json") as tmp:
        Path(tmp).write_text(json.dumps(report, indent=2))
    outputs["report"] = out_dir / "report.json"
    from hetero_dask.jobs.outputs import write_job_html

    plots = [outputs.get(k) for k in ("plot_affinity", "plot_eigenvalues", "plot_class_table")]
    plots += [v for key, v in outputs.items() if key.startswith(("plot_superclass_maps", "plot_class_maps"))]
    outputs["report_html"] = write_job_html(out_dir, "Regroup 3D Classes", report, plots)
    write_status(output.run_dir, state="done", message="finished",
                 results={"report": str(outputs["report"]), "report_html": str(outputs["report_html"])})
    return result


def _describe(spec):
    if spec is None or isinstance(spec, np.ndarray):
        return None if spec is None else f"array {spec.shape}"
    if isinstance(spec, str | Path):
        return str(spec)
    return [str(s) for s in spec]


def _write_particles(directory: Path, stem: str, table, is_star: bool) -> dict:
    """``{stem}.cs`` + ``{stem}.csg`` (CryoSPARC input) or ``{stem}.star`` (RELION input)."""
    if is_star:
        from hetero_dask.io.convert import cs_to_star
        from hetero_dask.io.star import write_star

        path = directory / f"{stem}.star"
        write_star(path, cs_to_star(table, path))
        return {"": path}
    from hetero_dask.io.cs import write_cs
    from hetero_dask.jobs.outputs import write_csg

    path = directory / f"{stem}.cs"
    write_cs(path, table)
    csg = directory / f"{stem}.csg"
    write_csg(csg, path.name, table, name=Path(stem).name, job="hetero-dask regroup")
    return {"": path, "_csg": csg}


def _write_outputs(
    out_dir,
    params,
    table,
    layout,
    labels,
    superclass,
    sizes,
    refs,
    vols,
    psize_A,
    moves_A,
    flips,
    is_star,
    mask,
) -> dict:
    """Particle files, superclass maps, volumes.zip and the mask; returns {name: path}."""
    from hetero_dask.io.mrc import write_map

    outputs = {}
    row_sc = superclass[labels]
    keep = row_sc >= 0
    m = params.num_superclasses
    sub = table[keep]
    slot = _slot_values(sub, layout, labels[keep])
    if params.align_pairs:
        psize_rows = _pixel_sizes(sub, slot, psize_A)
        slot = _move_poses(slot, psize_rows, labels[keep], moves_A, flips)
    regrouped = superclass_table(sub, layout, labels[keep], row_sc[keep], m, slot)
    p = params.prefix
    for name, tab in (("particles", regrouped), ("remaining_particles", table[~keep])):
        for suffix, path in _write_particles(out_dir, p + name, tab, is_star).items():
            outputs[name + suffix] = path
    maps = []
    for s in range(m):
        d = out_dir / f"superclass_{s}"
        d.mkdir(exist_ok=True)
        written = _write_particles(d, p + "particles", regrouped[row_sc[keep] == s], is_star)
        for suffix, path in written.items():
            outputs[f"superclass_{s}/particles{suffix}"] = path
        vol = average_map(
            vols,
            np.flatnonzero(superclass == s),
            sizes,
            moves_A / psize_A if params.align_pairs else None,
            flips,
        )
        write_map(d / "map.mrc", vol, psize_A)
        outputs[f"superclass_{s}/map"] = d / "map.mrc"
        maps.append(vol)
    outputs["volumes_zip"] = _write_zip(out_dir / "volumes.zip", maps, psize_A)
    if mask is not None and not isinstance(mask, np.ndarray):
        dst = out_dir / f"mask{Path(mask).suffix or '.mrc'}"
        shutil.copyfile(mask, dst)
        outputs["mask"] = dst
    return outputs


def _write_zip(path: Path, maps, psize_A: float) -> Path:
    from hetero_dask.io.volumes import write_volume_series_zip

    names = [f"superclass_{m:03d}" for m in range(len(maps))]
    write_volume_series_zip(path, np.stack(maps), psize_A, names=names)
    return path


def _write_plots(out_dir: Path, result: RegroupResult, vols) -> dict:
    """Affinity, eigenvalues, class sizes, and sections and projections of the class maps
    ``vols`` ``(K, n, n, n)`` and of the superclass maps."""
    from hetero_dask.io.mrc import read_map
    from hetero_dask.jobs.outputs import map_figures
    from hetero_dask.report.plots import plot_affinity, plot_class_table, plot_eigenvalues

    inc = result.included
    names = [str(c) for c in inc]
    superclass_maps = {
        f"superclass {s}": read_map(result.outputs[f"superclass_{s}/map"])[0]
        for s in range(int(result.superclass.max()) + 1)
    }
    maps = map_figures(out_dir, superclass_maps, name="superclass_maps")
    maps |= map_figures(out_dir, {f"class {k}": v for k, v in enumerate(vols)}, name="class_maps")
    return {f"plot_{stem}": path for stem, path in maps.items()} | {
        "plot_affinity": plot_affinity(
            result.affinity, result.superclass[inc], out_dir / "affinity.png", labels=names
        ),
        "plot_eigenvalues": plot_eigenvalues(
            result.eigenvalues,
            out_dir / "eigenvalues.png",
            n_superclasses=int(result.superclass.max()) + 1,
        ),
        "plot_class_table": plot_class_table(
            result.class_sizes, result.superclass, out_dir / "classes.png"
        ),
    }

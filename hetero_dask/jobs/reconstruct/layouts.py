"""Where each class's weight, pose and shift are in a particle table, and reading them.

Four layouts, autodetected in this order unless a ``class_prefix`` names one:
``alignments_class_{k}/*`` (heterogeneous refinement),
``alignments_class3D_{k}/*`` (3D classification), ``alignments3D_multi/*``
(one field per slot with a K axis), and ``alignments3D/class`` alone (hard
classes, e.g. ``rlnClassNumber`` of a STAR file, every class at
``alignments3D/pose``). A class slot without a pose or shift falls back to
``alignments3D``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from hetero_dask.core.rotations import pose_to_matrix
from hetero_dask.io.cs import LAYOUT_CLASS, LAYOUT_CLASS3D, LAYOUT_MULTI, detect_class_layouts
from hetero_dask.io.errors import InputError

LAYOUT_HARD = (
    "alignments3D"  # classes from alignments3D/class (rlnClassNumber), one pose per particle
)
# ReconstructParams.class_prefix -> layout
CLASS_PREFIXES = {
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
_SLOT_KEYS = ("pose", "shift", "psize_A")


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
        names = set(table_fields.dtype.names)
        if classes is None and "alignments3D/class" in names:
            classes = table_fields["alignments3D/class"]
        found = detect_class_layouts(table_fields)
    else:
        names = set(table_fields)
        found = _numbered_layouts(names)
    layout = _chosen_layout(names, found, prefix, source)
    if layout == LAYOUT_HARD:
        return _hard_layout(names, classes, source)
    if layout == LAYOUT_MULTI:
        return _multi_layout(names, found[layout], source)
    return _numbered_layout(names, layout, found[layout], source)


def _chosen_layout(names: set, found: dict, prefix: str | None, source) -> str:
    """The layout ``prefix`` names, or the first found in the autodetection order."""
    if prefix is None:
        layout = next((lay for lay in _AUTODETECT_ORDER if lay in found), None)
        if layout is not None:
            return layout
        if "alignments3D/class" not in names:
            raise InputError(
                source,
                "no per-class alignments",
                expected="alignments_class_k/*, alignments_class3D_k/*, alignments3D_multi/* "
                "or alignments3D/class (rlnClassNumber in a STAR file)",
            )
        return LAYOUT_HARD
    layout = CLASS_PREFIXES[prefix]
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
    return layout


def _hard_layout(names: set, classes, source) -> ClassLayout:
    """Classes from ``alignments3D/class``, K = the largest class + 1, all at ``alignments3D``."""
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
    a3d = _fields_or_none(names, "alignments3D/")
    return ClassLayout(LAYOUT_HARD, K, (None,) * K, (a3d[0],) * K, (a3d[1],) * K, (a3d[2],) * K)


def _multi_layout(names: set, K: int, source) -> ClassLayout:
    """Every class in the same ``alignments3D_multi`` fields, along their K axis."""
    p = f"{LAYOUT_MULTI}/"
    if p + "pose" not in names:
        raise InputError(source, "no poses for the classes", field=p + "pose")
    shift = p + "shift" if p + "shift" in names else None
    psize = "alignments3D/psize_A" if "alignments3D/psize_A" in names else None
    return ClassLayout(
        LAYOUT_MULTI, K, (p + "class_posterior",) * K, (p + "pose",) * K, (shift,) * K, (psize,) * K
    )


def _numbered_layout(names: set, layout: str, K: int, source) -> ClassLayout:
    """Class ``k`` in its own ``{layout}_{k}/`` slot; a slot without a pose reads ``alignments3D``."""
    post, pose, shift, psize = [], [], [], []
    fallback = _fields_or_none(names, "alignments3D/")
    for k in range(K):
        pre = f"{layout}_{k}/"
        if pre + "class_posterior" not in names:
            raise InputError(source, f"class {k} has no posteriors", field=pre + "class_posterior")
        own = _fields_or_none(names, pre)
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


def _fields_or_none(names, prefix: str) -> list:
    """The slot's pose, shift and psize_A fields, None for each absent."""
    return [prefix + k if prefix + k in names else None for k in _SLOT_KEYS]


def _numbered_layouts(names: set) -> dict:
    """The numbered layouts among field names, ``{layout: K}`` (K = the largest k + 1)."""
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

"""The regrouped particle table: each row's own class alignment, one-hot superclass posteriors.

The output keeps the input's per-class layout (``alignments_class_{k}``,
``alignments_class3D_{k}`` or ``alignments3D_multi``) with one slot per
superclass, so Heterogeneous Reconstruction Only reads it directly. With
``align_pairs``, the poses of rows whose class was moved or hand-flipped onto
its superclass reference are transformed to match the superclass map.
"""

from __future__ import annotations

import numpy as np

from hetero_dask.core.align3d import poses_after_alignment


def regrouped_table(table, layout, labels, superclass, n_superclasses, moves=None, psize_A=1.0):
    """The rows of clustered classes, regrouped: ``(keep (N,) bool, table of table[keep])``.

    labels: (N,) class of each row; superclass: (K,) of each class, -1 when set
    aside; moves: ``(move_A (K, 3), flipped (K,))`` of each class onto its
    superclass reference, or None; psize_A: the maps' voxel size, for rows
    whose alignments carry none.
    """
    row_superclass = superclass[labels]
    keep = row_superclass >= 0
    sub, k_of_row = table[keep], labels[keep]
    slot = slot_values(sub, layout, k_of_row)
    if moves is not None:
        slot = move_poses(slot, pixel_sizes(sub, slot, psize_A), k_of_row, *moves)
    return keep, superclass_table(sub, layout, k_of_row, row_superclass[keep], n_superclasses, slot)


def slot_values(table, layout, k_of_row):
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


def pixel_sizes(table, slot, default_psize_A: float) -> np.ndarray:
    """Per-row pixel size of the alignment shifts (slot, then alignments3D, then the maps')."""
    if "psize_A" in slot and np.all(slot["psize_A"] > 0):
        return np.asarray(slot["psize_A"], np.float64)
    if "alignments3D/psize_A" in table.dtype.names and np.all(table["alignments3D/psize_A"] > 0):
        return np.asarray(table["alignments3D/psize_A"], np.float64)
    return np.full(len(table), default_psize_A)


def move_poses(slot, psize_rows, k_of_row, moves_A, flips):
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

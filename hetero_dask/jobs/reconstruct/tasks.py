"""The engine's tasks: backproject a particle range into class half-grids (process), then per
class its maps (finish) and FSC curves.

Each task reads what it needs from the particle store on the worker (opened once per worker
and store version); only the partial grids and the per-class summaries travel.
"""

from __future__ import annotations

import numpy as np

from hetero_dask.core.backend import worker_xp
from hetero_dask.core.fsc import fsc_set, resolution_A
from hetero_dask.io.mrc import read_map
from hetero_dask.jobs.common import split_rows, worker_store
from hetero_dask.jobs.mstep import accumulating, backproject_classes, empty_partial, mstep_class
from hetero_dask.jobs.outputs import write_class_maps

from .layouts import ClassLayout, class_inputs


def auto_batch(box: int, K: int) -> int:
    """Images per backprojection batch when ``batch_size`` is None."""
    # Enough rows that each (class, half) scatter is ~2M samples (amortises the grid-sized
    # bincount), capped so a batch's temporaries stay ~1 GB.
    m = 0.5 * np.pi * (box / 2) ** 2
    return int(np.clip(2 * K * (1 << 21) / m, 64, max(64, (1 << 30) // (64 * box * box))))


def backproject_range(
    partition,
    store_path: str,
    layout: ClassLayout,
    box: int,
    hard: bool,
    split_field: str | None,
    seed: int,
    batch_size: int,
):
    """Process task: class half-grids ``ClassGridsPartial`` of the particles in ``partition``
    (half-sets from the input's ``split_field``, else random by ``seed``: see
    :func:`~hetero_dask.jobs.common.split_rows`)."""
    store = worker_store(store_path)
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
                split_rows(store, lo, hi, split_field, seed),
            )
    partial.n_particles = stop - start
    return partial.to(np)


def finish_class(part_k, k: int, out_dir: str, symmetry_ops, tau2_fudge: float, psize_A: float):
    """M-step task of class ``k``: the Wiener-filtered map and the unregularised half-maps
    written to ``OUT/class_{k}``; returns its summary and the half-maps for
    :func:`class_fsc_set` (the next task of the class's chain)."""
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

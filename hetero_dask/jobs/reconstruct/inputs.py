"""What the job decides before any task runs: the class inputs of every particle, checked, the
mask and the symmetry (:func:`prepare`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hetero_dask.core.symmetry import symmetry_group
from hetero_dask.io.errors import InputError
from hetero_dask.io.mrc import read_map, write_map
from hetero_dask.io.store import ParticleStore
from hetero_dask.jobs.common import split_field

from .layouts import LAYOUT_HARD, ClassLayout, check_posteriors, class_inputs, class_layout
from .params import ReconstructParams


@dataclass(frozen=True)
class Prepared:
    """The job's inputs, read and checked; per-particle arrays in store order.

    ``cols``: the layout's fields, name -> values ``(N, ...)``; ``post`` ``(N, K)``
    float32 class posteriors; ``best`` ``(N,)`` the most probable class; ``hard``:
    one-hot argmax weights instead of ``post``; ``psize_A``: the pixel size at the
    reconstruction box ``box``; ``mask_path``: ``OUT/mask.mrc`` when a mask is given;
    ``split_field``: the input field whose half-sets the job keeps, None for random halves
    (``random_split``, or no usable field).
    """

    source: str
    store: ParticleStore
    layout: ClassLayout
    cols: dict
    post: np.ndarray
    best: np.ndarray
    hard: bool
    box: int
    psize_A: float
    symmetry_ops: np.ndarray
    mask_path: Path | None
    split_field: str | None


def prepare(
    store: ParticleStore, source: str, out_dir: Path, p: ReconstructParams, box: int
) -> Prepared:
    """Read the class fields of every particle and check the posteriors; write the checked
    mask to ``OUT/mask.mrc``; the symmetry operators."""
    # Only the class fields now; the whole table is read by the particle writer, off the
    # critical path (after_map of the engine).
    light = store.table(fields=[f for f in store.fields if f.startswith("alignments")])
    layout = class_layout(light, p.class_prefix, source)
    if layout.n_classes < 1:
        raise InputError(source, "no particles with a class")
    cols = {name: light[name] for name in layout.columns()}
    psize_out = store.psize_at_box(box)
    post = class_inputs(cols, layout, store.psize_A, psize_out)[0]
    check_posteriors(post, p.posterior_tolerance, source, store.original_index)
    hard = p.force_hard_classification or layout.layout == LAYOUT_HARD
    mask_path = None
    if p.mask is not None:
        mask_path = out_dir / "mask.mrc"
        write_map(mask_path, load_mask(p.mask, box, psize_out), psize_out)
    ops = symmetry_group(p.symmetry, p.symmetry_convention)
    best = np.argmax(post, axis=1)
    halves = None if p.random_split else split_field(store)
    return Prepared(
        source, store, layout, cols, post, best, hard, box, psize_out, ops, mask_path, halves
    )


def load_mask(path, box: int, psize_A: float) -> np.ndarray:
    """The mask ``.mrc`` at ``path``, checked against the reconstruction's box and pixel size
    and clipped to [0, 1]."""
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

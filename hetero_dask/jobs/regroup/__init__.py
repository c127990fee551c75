"""Regroup 3D Classes: cluster K class volumes into M superclasses and regroup their particles.

Steps, and the module that does each:

1. ``inputs``: read the particles, volumes and mask; class of each particle =
   argmax of its upstream class posteriors (``alignments_class_{k}``,
   ``alignments_class3D_{k}``, ``alignments3D_multi``; ``alignments3D/class``
   when only the best class is known; ``rlnClassNumber`` for STAR); excluded
   classes and classes under ``min_class_size`` particles are set aside
   (``classes``) and their particles become the "remaining particles";
2. ``compare``: the included volumes are Fourier-cropped to ``crop_box``,
   low-passed to a common resolution, masked and normalised inside the mask,
   then correlated pairwise: at zero shift, or with ``align_pairs`` the best
   over translations within ``max_shift_A`` and the hand flip, K^2/2 pairs
   batched into engine tasks;
3. ``classes``: distance sqrt(2 - 2c) -> self-tuning affinity -> normalised
   Laplacian -> M eigenvectors -> k-means (:mod:`hetero_dask.core.spectral`);
   superclasses numbered by size (superclass 0 holds the most particles), each
   with its largest class as reference;
4. ``tables`` and ``outputs``: regrouped particles with one-hot superclass
   posteriors in the input's per-class layout (so Heterogeneous Reconstruction
   Only reads them), per-superclass particles and size-weighted average maps
   (members aligned to the reference when ``align_pairs``; then the particle
   poses of moved or hand-flipped classes are transformed to match), remaining
   particles, plots and ``report.json``.

``params`` holds :class:`RegroupParams` and :class:`RegroupResult`; ``driver``
the job, :func:`regroup`.
"""

from .classes import (
    class_assignments,
    order_superclasses,
    select_classes,
    superclass_references,
)
from .compare import (
    aligned_correlations,
    comparison_mask,
    crop_size,
    pair_blocks,
    prepare_volumes,
    zero_shift_correlations,
)
from .driver import regroup
from .outputs import average_map
from .params import RegroupParams, RegroupResult
from .tables import superclass_table

__all__ = [
    "RegroupParams",
    "RegroupResult",
    "aligned_correlations",
    "average_map",
    "class_assignments",
    "comparison_mask",
    "crop_size",
    "order_superclasses",
    "pair_blocks",
    "prepare_volumes",
    "regroup",
    "select_classes",
    "superclass_references",
    "superclass_table",
    "zero_shift_correlations",
]

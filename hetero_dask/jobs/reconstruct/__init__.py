"""Heterogeneous Reconstruction Only: K class maps from particles with per-class poses and posteriors.

Steps, and the module that does each:

1. ``driver``: particles (``.cs``, ``.star`` or a particle store) -> Zarr store
   (:func:`hetero_dask.jobs.common.open_particle_store`);
2. ``layouts``: the class layout: ``alignments_class_{k}/*`` (heterogeneous
   refinement), ``alignments_class3D_{k}/*`` (3D classification),
   ``alignments3D_multi/*``, or ``alignments3D/class`` alone (hard classes, e.g.
   ``rlnClassNumber`` of a STAR file, all classes at ``alignments3D/pose``);
   autodetected in that order unless ``class_prefix`` is given; the choice is reported;
3. ``inputs``: weights ``w_ik`` = class posteriors (or one-hot argmax with
   ``force_hard_classification``), checked; class ``k``'s pose and shift from its
   slot (``alignments3D`` when the slot has none); the mask;
4. ``tasks``, on Dask (:func:`hetero_dask.runtime.engine.map_reduce`): one task per
   particle range backprojects every class into half-grids at the
   reconstruction box (Fourier crop/pad of the images; the pixel size
   scales, shifts in A are kept); each partial is cut into its classes where
   it was computed and every class merges in its own tree next to its
   M-step task (``select_first``), which symmetrises, reconstructs (Wiener,
   FSC prior) and writes its maps; a second task per class computes
   CryoSPARC's FSC curves; the driver gets only these summaries;
5. ``outputs``: particles, volume series, figures and ``report.json`` (see
   :func:`reconstruct`).

``params`` holds :class:`ReconstructParams` and :class:`ReconstructResult`; ``driver``
the job, :func:`reconstruct`.
"""

from .driver import reconstruct
from .inputs import load_mask
from .layouts import LAYOUT_HARD, ClassLayout, check_posteriors, class_inputs, class_layout
from .params import ReconstructParams, ReconstructResult

__all__ = [
    "LAYOUT_HARD",
    "ClassLayout",
    "ReconstructParams",
    "ReconstructResult",
    "check_posteriors",
    "class_inputs",
    "class_layout",
    "load_mask",
    "reconstruct",
]

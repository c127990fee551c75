"""Heterogeneous Reconstruction Only (see :mod:`.driver`)."""

from .driver import _load_mask, reconstruct
from .layouts import LAYOUT_HARD, ClassLayout, check_posteriors, class_inputs, class_layout
from .params import ReconstructParams, ReconstructResult

__all__ = [
    "LAYOUT_HARD",
    "ClassLayout",
    "ReconstructParams",
    "ReconstructResult",
    "_load_mask",
    "check_posteriors",
    "class_inputs",
    "class_layout",
    "reconstruct",
]

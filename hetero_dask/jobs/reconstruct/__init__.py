"""Heterogeneous Reconstruction Only (see :mod:`.driver`)."""

from .driver import (
    LAYOUT_HARD,
    ClassLayout,
    ReconstructParams,
    ReconstructResult,
    _load_mask,
    check_posteriors,
    class_inputs,
    class_layout,
    reconstruct,
)

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

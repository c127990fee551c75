"""Heterogeneous Refinement: classify particles into K classes while refining K structures."""

from .driver import refine
from .params import REFERENCE_MODES, RefineParams

__all__ = ["REFERENCE_MODES", "RefineParams", "refine"]

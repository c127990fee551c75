"""Heterogeneous Refinement: classify particles into K classes while refining K structures."""

from .driver import REFERENCE_MODES, RefineParams, refine

__all__ = ["REFERENCE_MODES", "RefineParams", "refine"]

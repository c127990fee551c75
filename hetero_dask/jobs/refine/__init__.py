"""Heterogeneous Refinement: classify particles into K classes while refining K structures.

Each EM iteration is ONE Dask graph (:func:`hetero_dask.runtime.engine.map_reduce`):
E-step tasks over contiguous particle ranges of the permuted store (score
every class at every pose of a coarse-to-fine search, write the per-particle
results to disjoint regions of the run's Zarr results, backproject into
per-class, per-half partial grids), a tree reduction of the partials, and one
M-step task per class (running half-map statistics with decay, half-map FSC,
Wiener reconstruction). The iteration's class volumes are a value the engine holds
for the graph (:func:`hetero_dask.runtime.engine.hold`): sent once, recomputable if
the workers holding it are lost.

Schedule (:class:`RefineParams`): online EM on batches of ``batch_size_per_class * K``
particles (contiguous ranges), learning rate 0.1 halving every
``learning_rate_halflife`` iterations; a batch that covers every particle is a full
pass, damped by ``full_pass_learning_rate``; each half-set classified against the other
half's maps; the likelihood's temperature that of the image mask (sigma scale 1); class
fractions as priors; backprojection to 1.5x the best class resolution; all classes
filtered with the max FSC across classes; convergence when the class posteriors move by
less than 5% (total variation, averaged over particles), the class fractions by less
than 1 point and the resolution by at most one shell, then ``final_full_passes`` passes
over every particle. Identical starting maps are split first (``split``); that run,
once converged, starts again from its own classes as from given references
(``split_restart``), its schedule counted from the restart. Distinct starting maps of which
some are alike at the initial resolution (``similar_references_correlation``) start again
once converged, from the same maps with the classes' fractions as the priors within each
group of alike maps.

The modules, in the order a run uses them:

- ``params``: :class:`RefineParams` and their checks;
- ``driver``: :func:`refine`: check, open the run, start or resume, iterate, write;
- ``images``: the particle images as every step sees them (normalised, masked);
- ``references``: the starting maps on the refinement grid and grey scale; each
  iteration's Fourier maps, read once per worker;
- ``split``: identical starting maps split by the particles' 3D variability;
- ``noise``: the per-shell noise power: first estimate, E-step residuals, updates;
- ``schedule``: which particles an iteration takes, its learning rate, radii and
  pose search, and when EM has converged;
- ``tasks``: the engine's E-step and M-step tasks;
- ``results``: the per-particle results store and how batches and tasks are cut to it;
- ``state``: what carries from one iteration to the next, its checkpoint and files;
- ``outputs``: particles, maps, figures and the report.
"""

from .driver import refine
from .params import REFERENCE_MODES, RefineParams

__all__ = ["REFERENCE_MODES", "RefineParams", "refine"]

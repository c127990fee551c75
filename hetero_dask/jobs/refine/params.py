"""Heterogeneous Refinement's parameters: :class:`RefineParams`, checked by :meth:`RefineParams.validate`."""

from __future__ import annotations

from dataclasses import dataclass

from hetero_dask.jobs.preflight import bad_value, check_even_box

REFERENCE_MODES = ("cross", "half", "full")


@dataclass
class RefineParams:
    """Heterogeneous Refinement parameters, named after CryoSPARC's.

    Defaults are CryoSPARC's except where measured otherwise on particles this project did
    not make (``benchmarks/bench_realistic.py``; the measurements are in
    ``benchmarks/results/realistic``): no random-assignment iterations, sigma scale 1
    throughout, each half-set classified against the other half's maps, damped full passes,
    the Wiener filter at half the signal the half maps' FSC claims.
    """

    refine_box: int | None = None  # None: the particles' box, at most 128 (preflight's box rule)
    symmetry: str = "C1"
    symmetry_convention: str = "cryosparc"
    force_hard_classification: bool = False
    mask_diameter_A: float | None = None
    mask_diameter_outer_A: float | None = None
    batch_size_per_class: int = 1000
    # CryoSPARC's random assignments (5 iterations) replace the starting maps by random
    # halves of the data: distinct starting maps are lost, and identical ones are split by
    # their variability instead (initial_split "pca").
    num_random_iterations: int = 0
    learning_rate_init: float = 0.2
    learning_rate: float = 0.1
    learning_rate_halflife: int = 50
    # Weight of a pass over every particle before convergence (CryoSPARC: batch EM, 1). A
    # particle's class comes from the other half-set's maps (reference_mode "cross"), whose
    # classes came from this half's maps the iteration before: two interleaved chains that
    # need not settle on the same answer. Half of the new statistics on half of the running
    # ones merges them into one.
    full_pass_learning_rate: float = 0.5
    # Weight of a full pass's class fractions in the class priors (None: the maps' weight
    # above, so the priors stay the fractions of the running statistics). 1 takes a pass's
    # fractions whole: priors that do not trail the maps gain about two points on overlapping
    # states (a transition) but let a junk class shrink faster (benchmarks/results/realistic/
    # TUNING.md), so it is an option, not the default.
    full_pass_prior_rate: float | None = None
    # Backproject each particle at its own grey scale (its least-squares scale at the class's
    # best pose, relative to the class's median one the iteration before): images that hold
    # little or no signal of a class (pure noise, thick ice) add little to its map instead of
    # fading it.
    per_particle_scale: bool = False
    # The likelihood's overconfidence T (>= 1): the class decision weighs the prior T times
    # (argmax of T log prior + log likelihood, that of the tempered model prior x likelihood^(1/T)),
    # the backprojection keeps those sharp posteriors, and the outputs and the class fractions take
    # the tempered ones. About 2 suits overlapping states of unequal populations but starves a
    # small junk class and makes two-class posteriors underconfident (benchmarks/results/
    # realistic/TUNING.md), so the default is the plain model, 1.
    class_temperature: float = 1.0
    # The temperature of the written class posteriors (None: estimated from them without labels,
    # core.calibration.mixture_temperature, for three or more classes; two classes' are
    # written as computed). The E-step's posteriors are overconfident where the class maps
    # share errors with the particles; the estimate brings them to what they mean (of the
    # particles given p, about a fraction p right). A number fixes it (1: as computed).
    posterior_temperature: float | None = None
    # The power s of the class posteriors a particle is backprojected with (p^s, normalised per
    # particle; 1: the posteriors as they are): > 1 keeps a particle's weight out of the classes
    # it probably is not, so overlapping states' maps mix less. The outputs, the class fractions
    # and the noise estimate keep the posteriors.
    backproject_sharpness: float = 1.0
    initial_lowpass_A: float = 20.0
    backproject_factor: float = 1.5
    filter_max_fsc: bool = True
    convergence_class_change: float = 0.05
    convergence_res_shells: float = 1.0
    # Full passes over every particle once the EM has converged (at least one follows
    # convergence). Each pass rebuilds the maps from the particles classified against the
    # other half's: the halves' maps take up each other's errors and the posteriors harden
    # without getting more right (benchmarks/results/realistic/TUNING.md), so one pass, which
    # scores every particle against the converged maps, is where the posteriors mean most.
    final_full_passes: int = 1
    # CryoSPARC anneals the noise model from a sigma scale of 3 to 1. The likelihood here
    # already carries the temperature of the image mask (core.scoring.mask_temperature),
    # the one way a masked image's Fourier coefficients are not independent; on top of it
    # any scale above 1 flattens the posteriors, classes take each other's particles and
    # the largest one grows.
    initial_sigma_scale: float = 1.0
    sigma_anneal_iterations: int = 10
    final_sigma_scale: float = 1.0
    # The Wiener filter's signal prior comes from the half maps' FSC, and the half maps of
    # "cross" are each aligned against the other: they share pose and class errors that no
    # FSC between them can see, so the FSC overstates the maps' signal. Half of that signal
    # (RELION's T) keeps the filter from passing what is shared error; a small class, whose
    # FSC is noisiest, gains most.
    tau2_fudge: float = 0.5
    estimate_scale: bool = True
    # What each half-set is scored against: "cross" (the OTHER half's maps: no particle votes
    # for a map it is part of, which would lock every class in), "half" (its own half-maps:
    # the strict gold standard, whose FSC is independent of the other half) or "full" (the
    # class's full map).
    reference_mode: str = "cross"
    # Identical initial volumes (a consensus map given K times): "pca" splits the first
    # split_particles particles into K groups by their 3D variability against the
    # consensus (split.split_by_variability), starts each class from the consensus plus its
    # group's mean difference, and holds the groups for split_iterations iterations (each
    # class refines its poses and map on its own group) before the particles are
    # classified; "random" keeps CryoSPARC's random assignments.
    initial_split: str = "pca"
    split_particles: int = 4000
    split_iterations: int = 2
    # Resolution of the split (None: the best separated of initial_lowpass_A down to half
    # of it; split.split_resolutions).
    split_lowpass_A: float | None = None
    # Once the EM from the split has converged, start it again from its classes as from
    # given references (low-passed to initial_lowpass_A, noise, priors and grey scales
    # estimated afresh): the split's groups leave errors that the EM keeps, and a second
    # start from the classes it found climbs further (benchmarks/results/realistic/TUNING.md).
    split_restart: bool = True
    # References that agree at least this much at initial_lowpass_A (Pearson correlation, linked
    # in chains; None: never) cannot tell their classes apart in the first E-steps: the equal
    # priors then set the partition (four states of 60 / 25 / 10 / 5 % start as four quarters),
    # and the EM keeps it. Once the first round has converged, the EM starts again from the
    # references with the round's class fractions as the priors within each such group (each
    # group keeping its equal share; a reference unlike the others keeps 1/K, which is what lets
    # a junk class hold its particles). Measured in benchmarks/results/realistic/TUNING.md.
    similar_references_correlation: float | None = 0.95
    max_iterations: int = 100
    shift_range_px: float | None = None
    max_order: int = 4
    # The pose search's coarse stage runs at this fraction of the alignment radius, and each
    # later stage refines the search_max_poses best poses of every class. A class's evidence
    # is summed over the poses the last stage scores: at low SNR a particle's pose posterior
    # is broad, and a search that keeps few poses loses some classes' mass more than others'
    # (the choice and its cost: benchmarks/results/realistic/TUNING.md).
    coarse_radius_fraction: float = 1.0
    search_max_poses: int = 64
    # Each particle is backprojected into a class (and its noise residual averaged) at that
    # class's most probable poses, at most backproject_poses of them and no more than hold
    # backproject_mass of the class's pose posterior, their weights renormalised. Fewer make a
    # broad pose posterior look sharper than it is, and the maps then fit the references'
    # errors; the mass bound keeps a sharp posterior's cost to its few poses.
    backproject_poses: int = 64
    backproject_mass: float = 0.99
    seed: int = 0
    # Multiply the images by -1 (blob/sign negated in the outputs): for protein-dark stacks,
    # which the grey-scale fit refuses (references.estimate_scales).
    flip_contrast: bool = False

    def validate(self) -> None:
        """Refuse values no run can use; messages name the CLI option (:mod:`.preflight`)."""
        if self.refine_box is not None:
            check_even_box("refine_box", self.refine_box)
        for name in ("batch_size_per_class", "learning_rate_halflife", "max_iterations", "max_order",
                     "sigma_anneal_iterations", "split_particles", "search_max_poses",
                     "backproject_poses"):
            if getattr(self, name) < 1:
                raise bad_value(name, getattr(self, name), "a whole number >= 1")
        for name in ("num_random_iterations", "final_full_passes", "split_iterations"):
            if getattr(self, name) < 0:
                raise bad_value(name, getattr(self, name), "a whole number >= 0")
        for name in ("learning_rate_init", "learning_rate", "full_pass_learning_rate", "coarse_radius_fraction",
                     "backproject_mass"):
            if not 0 < getattr(self, name) <= 1:
                raise bad_value(name, getattr(self, name), "a value in (0, 1]")
        if self.similar_references_correlation is not None and not -1 <= self.similar_references_correlation <= 1:
            raise bad_value("similar_references_correlation", self.similar_references_correlation,
                            "None or a correlation in [-1, 1]")
        if self.full_pass_prior_rate is not None and not 0 < self.full_pass_prior_rate <= 1:
            raise bad_value("full_pass_prior_rate", self.full_pass_prior_rate, "None or a value in (0, 1]")
        if self.posterior_temperature is not None and not self.posterior_temperature > 0:
            raise bad_value("posterior_temperature", self.posterior_temperature, "None (estimated) or a value > 0")
        if not self.backproject_sharpness >= 1:
            raise bad_value("backproject_sharpness", self.backproject_sharpness, "a value >= 1")
        if not self.class_temperature >= 1:
            raise bad_value("class_temperature", self.class_temperature, "a value >= 1")
        for name in ("initial_sigma_scale", "final_sigma_scale", "initial_lowpass_A", "tau2_fudge",
                     "backproject_factor"):
            if not getattr(self, name) > 0:
                raise bad_value(name, getattr(self, name), "a value > 0")
        if self.split_lowpass_A is not None and not self.split_lowpass_A > 0:
            raise bad_value("split_lowpass_A", self.split_lowpass_A, "a resolution in A > 0")
        if self.shift_range_px is not None and self.shift_range_px < 0:
            raise bad_value("shift_range_px", self.shift_range_px, "a shift in pixels >= 0")
        if self.reference_mode not in REFERENCE_MODES:
            raise bad_value("reference_mode", self.reference_mode, " or ".join(map(repr, REFERENCE_MODES)))
        if self.initial_split not in ("pca", "random"):
            raise bad_value("initial_split", self.initial_split, "'pca' or 'random'")


"""What Regroup 3D Classes takes (:class:`RegroupParams`) and returns (:class:`RegroupResult`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class RegroupParams:
    """Parameters of Regroup 3D Classes (CryoSPARC's names, lower-case).

    num_superclasses: M, 1 <= M <= (number of included classes) - 1.
    exclude_classes: zero-based class indices set aside (their particles go to
        the remaining particles).
    min_class_size: classes with fewer particles (argmax of the posteriors) are
        set aside too; the default 1 sets aside only empty classes.
    align_pairs: align every pair of volumes by translation (and hand flip)
        before comparing them.
    max_shift_A: largest shift searched by the pair alignment, in Angstrom
        (None: 10% of the box).
    mask_radius: soft spherical mask radius as a fraction of half the box
        (1.0 = sphere of the box's diameter); None = no mask. Ignored when a
        mask file is given.
    crop_box: volumes are Fourier-cropped to this box (at most) for comparison.
    lowpass_res_A: common resolution the cropped volumes are filtered to (None:
        4 x the cropped pixel size, half the cropped Nyquist frequency).
    affinity_neighbors: self-tuning affinity: local scale = distance to this
        nearest neighbour.
    kmeans_starts: k-means restarts (best inertia kept).
    weight_by_size: cluster the particles rather than the classes: each class
        weighs as many particles as it holds in the graph cut and in k-means
        (:func:`hetero_dask.core.spectral.size_weighted_embedding`), so a few
        near-empty, noisy classes cannot decide the grouping of the large ones.
        False: every class counts once.
    random_seed: seed of the k-means starts (the result is deterministic).
    prefix: prepended to the output particle file names (``{prefix}particles.cs``).
    """

    num_superclasses: int
    exclude_classes: tuple[int, ...] = ()
    min_class_size: int = 1
    align_pairs: bool = False
    max_shift_A: float | None = None
    mask_radius: float | None = None
    crop_box: int = 64
    lowpass_res_A: float | None = None
    affinity_neighbors: int = 3
    kmeans_starts: int = 100
    weight_by_size: bool = True
    random_seed: int = 0
    prefix: str = ""

    def __post_init__(self):
        from hetero_dask.jobs.preflight import bad_value, check_even_box

        self.exclude_classes = tuple(int(k) for k in self.exclude_classes)
        if self.num_superclasses < 1:
            raise bad_value("num_superclasses", self.num_superclasses, "a number >= 1")
        if self.min_class_size < 0:
            raise bad_value("min_class_size", self.min_class_size, "a number >= 0")
        if self.max_shift_A is not None and self.max_shift_A < 0:
            raise bad_value("max_shift_A", self.max_shift_A, "a shift in A >= 0")
        if self.mask_radius is not None and not 0 < self.mask_radius <= 1.5:
            raise bad_value(
                "mask_radius", self.mask_radius, "a fraction of half the box, 0 < r <= 1.5"
            )
        check_even_box("crop_box", self.crop_box)
        if self.lowpass_res_A is not None and self.lowpass_res_A <= 0:
            raise bad_value("lowpass_res_A", self.lowpass_res_A, "a resolution in A > 0")
        for name in ("affinity_neighbors", "kmeans_starts"):
            if getattr(self, name) < 1:
                raise bad_value(name, getattr(self, name), "a number >= 1")
        if any(k < 0 for k in self.exclude_classes):
            raise bad_value(
                "exclude_classes", list(self.exclude_classes), "zero-based class indices >= 0"
            )


@dataclass
class RegroupResult:
    """What the job decided. Arrays indexed by the upstream class k = 0..K-1.

    superclass: (K,) superclass of each class, -1 for classes set aside;
    class_sizes: (K,) particles per class (argmax of the posteriors);
    included: indices of the clustered classes, in order (rows of the matrices);
    correlation, affinity: (n_included, n_included); eigenvalues: (n_included,);
    flipped_pairs: class pairs (i, j) of one superclass whose best match was hand-flipped;
    out_dir: the output folder; outputs: name -> path of every file written.
    """

    superclass: np.ndarray
    class_sizes: np.ndarray
    included: np.ndarray
    correlation: np.ndarray
    affinity: np.ndarray
    eigenvalues: np.ndarray
    flipped_pairs: list
    out_dir: Path
    outputs: dict = field(default_factory=dict)

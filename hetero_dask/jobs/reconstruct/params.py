"""What Heterogeneous Reconstruction Only takes (:class:`ReconstructParams`) and returns
(:class:`ReconstructResult`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hetero_dask.io.store import IMAGE_DTYPES
from hetero_dask.jobs.preflight import bad_value, check_even_box, check_symmetry

from .layouts import CLASS_PREFIXES


@dataclass
class ReconstructParams:
    """Parameters of Heterogeneous Reconstruction Only (CryoSPARC's names, lower-case).

    class_prefix: per-class alignment layout: ``alignments_class_``,
        ``alignments_class3D_``, ``alignments3D_multi``, or ``alignments3D``
        (hard classes from ``alignments3D/class`` / ``rlnClassNumber``);
        None = autodetect (in that order).
    force_hard_classification: one-hot argmax weights instead of posteriors.
    symmetry, symmetry_convention: point group (``C1``, ``C4``, ``D2``, ``T``,
        ``O``, ``I``) and axis convention (``cryosparc``: D_n 2-fold along y;
        ``relion``: along x).
    box_size: reconstruction box in pixels (None = the particles' box);
        images are Fourier-cropped or padded, the pixel size scales.
    mask: mask ``.mrc`` for an extra FSC curve (box ``box_size``, same pixel size).
    random_split: draw random half-sets (reproducible from ``random_seed``)
        even when the input has ``alignments3D/split``.
    random_seed: seed of the random split and of the on-the-fly import's order.
    tau2_fudge: Wiener regularisation T (1 = RELION's default for refinement).
    posterior_tolerance: largest |sum_k p_ik - 1| accepted.
    partition_rows: particles per task (rounded to whole store chunks). The partitions,
        and so the order of the float32 sums, depend on the data only: the same maps on
        any number of workers. Each partial is a whole set of padded grids (~630 MB at
        box 128 and K=3), so partitions are large.
    partitions: exact number of particle ranges (overrides the above).
    fan_in: partial grids merged per combine task. A worker holds about
        ``fan_in * in_flight / workers`` partials at once (the engine keeps
        ``1 + ceil(threads / fan_in)`` groups in flight), so 2 keeps the peak
        per worker at about two partials whatever N and the partition count.
    batch_size: images per backprojection batch (None = by box and K).
    workers, scheduler: cluster for the Python API when no client is passed
        (None and None: run in this process, synchronously).
    stack_dir: where the particle stacks are, if not next to the file.
    flip_contrast: multiply the images by -1 (``blob/sign`` negated in every
        particle file written), for protein-dark stacks.
    contrast_check: refuse, before any work, particles whose contrast looks
        inverted (:func:`hetero_dask.jobs.contrast.check_contrast`).
    cache_dir: the particle cache's folder, or "off" (None: ``$HETERO_DASK_CACHE``
        or the default; see :mod:`hetero_dask.io.cache`).
    image_dtype: how imported images are stored, "float32" or "float16".
    """

    class_prefix: str | None = None
    force_hard_classification: bool = False
    symmetry: str = "C1"
    symmetry_convention: str = "cryosparc"
    box_size: int | None = None
    mask: str | None = None
    random_split: bool = False
    random_seed: int = 0
    tau2_fudge: float = 1.0
    posterior_tolerance: float = 0.01
    partition_rows: int = 25_000
    partitions: int | None = None
    fan_in: int = 2
    batch_size: int | None = None
    workers: int | None = None
    scheduler: str | None = None
    stack_dir: str | None = None
    flip_contrast: bool = False
    contrast_check: bool = True
    cache_dir: str | None = None
    image_dtype: str = "float32"

    def __post_init__(self):
        if self.class_prefix is not None and self.class_prefix not in CLASS_PREFIXES:
            raise bad_value(
                "class_prefix",
                self.class_prefix,
                "alignments_class_, alignments_class3D_, alignments3D_multi or alignments3D",
            )
        if self.box_size is not None:
            check_even_box("box_size", int(self.box_size))
        for name, least in (("fan_in", 2), ("partition_rows", 1)):
            if getattr(self, name) < least:
                raise bad_value(name, getattr(self, name), f"a whole number >= {least}")
        if self.fan_in > 64:
            raise bad_value("fan_in", self.fan_in, "2..64")
        for name in ("partitions", "batch_size", "workers"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise bad_value(name, getattr(self, name), "a whole number >= 1")
        for name in ("tau2_fudge", "posterior_tolerance"):
            if not getattr(self, name) > 0:
                raise bad_value(name, getattr(self, name), "a value > 0")
        if self.image_dtype not in IMAGE_DTYPES:
            raise bad_value("image_dtype", self.image_dtype, " or ".join(IMAGE_DTYPES))
        check_symmetry(self.symmetry, self.symmetry_convention)  # refuse bad names early
        if self.mask is not None:
            self.mask = str(self.mask)


@dataclass
class ReconstructResult:
    """What :func:`reconstruct` returns: output paths, the layout used and per-class summaries."""

    out_dir: Path
    layout: str
    n_classes: int
    box: int
    psize_A: float
    classes: list
    outputs: dict
    report: dict

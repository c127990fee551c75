"""What a job checks before it starts a cluster or writes a byte.

Every job first calls its ``check_*`` function here. It reads the particle
metadata and the stack headers (no image), the maps and masks, checks every
parameter, and decides what may happen to the output folder. A problem raises
an error that names the option (``--box``, with the Python name for API
users), the file and what was expected; nothing has been started or written,
so a failed start leaves no output folder behind.

**The box rule** (every job): a working box (``--box`` of refine and
reconstruct, regroup's ``--crop-box``) is an even number of pixels, at least
16. Refine and reconstruct Fourier-crop the particle images to it, or
Fourier-pad them (at most to twice their box); the pixel size becomes the
particles' pixel size x their box / the working box. Without ``--box``
reconstruct works at the particles' box, refine at the particles' box but at
most 128 (CryoSPARC's default), an odd box rounded down to even. Maps a job
compares with the particles (refine's starting volumes) must show the same
field of view (box x voxel size within 1%); a mask is given at the working box
and pixel size.

**An output folder belongs to one run.** A job runs into a new or empty
folder. A folder holding a run (``OUT/run/``) is refused unless: refine with
``--resume`` continues it (same parameters and inputs, else refused; a
finished run is reported, not changed; no run there is refused too), or
reconstruct/regroup find their own unfinished run (failed, interrupted),
which they run again. A finished run is never replaced: give a new ``--out``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hetero_dask.io.errors import InputError
from hetero_dask.io.paths import check_allowed
from hetero_dask.runtime import checkpoint as ckpt

MIN_BOX = 16
REFINE_DEFAULT_MAX_BOX = 128  # CryoSPARC's "Refinement box size"
FOV_RTOL = 0.01

# Python parameter -> the CLI option that sets it, so messages name what a CLI user typed.
OPTIONS = {
    "refine_box": "--box", "box_size": "--box", "symmetry": "--symmetry",
    "symmetry_convention": "--symmetry-convention", "force_hard_classification": "--hard",
    "mask_diameter_A": "--mask-diameter", "mask_diameter_outer_A": "--mask-diameter-outer",
    "batch_size_per_class": "--batch-size", "num_random_iterations": "--random-iterations",
    "initial_lowpass_A": "--initial-lowpass", "initial_sigma_scale": "--sigma-scale",
    "final_sigma_scale": "--final-sigma-scale", "max_order": "--max-order",
    "search_max_poses": "--search-poses",
    "reference_mode": "--reference-mode", "max_iterations": "--iterations", "seed": "--seed",
    "class_prefix": "--prefix", "mask": "--mask", "random_split": "--random-split",
    "random_seed": "--seed", "stack_dir": "--stack-dir", "num_superclasses": "--superclasses",
    "exclude_classes": "--exclude", "min_class_size": "--min-class-size",
    "align_pairs": "--align-pairs", "max_shift_A": "--max-shift", "mask_radius": "--mask-radius",
    "crop_box": "--crop-box", "lowpass_res_A": "--lowpass", "volumes_psize_A": "--psize",
    "weight_by_size": "--count-classes-once", "prefix": "--prefix",
}
JOB_TITLES = {"refine": "Heterogeneous Refinement", "reconstruct": "Heterogeneous Reconstruction Only",
              "regroup": "Regroup 3D Classes"}


def option(param: str) -> str:
    """How a message names parameter ``param``: ``--box (refine_box)``, or the Python name alone."""
    flag = OPTIONS.get(param)
    return f"{flag} ({param})" if flag else param


def bad_value(param: str, value, expected: str) -> ValueError:
    """The error for parameter ``param`` set to ``value`` when ``expected`` was expected."""
    return ValueError(f"{option(param)} = {value!r}: expected {expected}")


def for_option(what: str, exc: Exception) -> InputError:
    """``exc`` (about a file) as an :class:`InputError` that names the option it came from first."""
    if isinstance(exc, OSError) and not isinstance(exc, InputError):
        return InputError(what, f"{exc.filename or ''}: {exc.strerror or exc}".lstrip(": "))
    return InputError(what, str(exc))


# --------------------------------------------------------------------------- boxes


def working_box(param: str, requested: int | None, particle_box: int, default_max: int | None = None) -> int:
    """The box a job works at, by the box rule (module doc)."""
    if requested is None:
        box = particle_box if default_max is None else min(particle_box, default_max)
        return box - box % 2
    requested = int(requested)
    check_even_box(param, requested)
    if requested > 2 * particle_box:
        raise bad_value(param, requested, f"at most twice the particles' box {particle_box} "
                                          "(Fourier padding; more adds nothing)")
    return requested


def check_even_box(param: str, box: int) -> None:
    """A working box is an even number of pixels >= ``MIN_BOX`` (the box rule)."""
    if box < MIN_BOX or box % 2:
        raise bad_value(param, box, f"an even number of pixels >= {MIN_BOX} (the box rule)")


def check_field_of_view(vols_box: int, vols_psize_A: float, box: int, psize_A: float, what="--volumes"):
    """Maps compared with the particles must cover the same field of view (box x pixel size)."""
    fov_maps, fov_particles = vols_box * vols_psize_A, box * psize_A
    if abs(fov_maps - fov_particles) > FOV_RTOL * fov_particles:
        raise InputError(
            what,
            f"the maps span {fov_maps:.4g} A ({vols_box} voxels of {vols_psize_A:.4g} A) but the "
            f"particles {fov_particles:.4g} A ({box} pixels of {psize_A:.4g} A)",
            expected="maps of the particles' field of view (resample them to it, e.g. "
            "relion_image_handler --rescale_angpix / --new_box; or fix a wrong voxel size in the "
            "map header)",
        )


# --------------------------------------------------------------------------- inputs


@dataclass
class CheckedParticles:
    """Particles whose metadata and stacks were checked (no image read).

    ``particle_set``: the table and resolved stacks of a ``.cs``/``.star``
    (None for a store); ``box``, ``psize_A``: their common grid;
    ``fingerprint``: identifies the input (table, box, pixel size).
    """

    path: str
    particle_set: object | None
    n: int
    box: int
    psize_A: float
    fingerprint: str


def check_particles(particles, stack_dir=None, what: str = "--particles",
                    flip_contrast: bool = False) -> CheckedParticles:
    """Open a particle store, or read a ``.cs``/``.star`` and resolve its stacks
    (``flip_contrast``: negate ``blob/sign``; refused for a store, whose images are stored
    with their sign applied)."""
    from hetero_dask.io.particles import load_particles
    from hetero_dask.io.store import ParticleStore, fingerprint, is_store
    from hetero_dask.jobs.contrast import FLIP_OPTION

    if particles is None or str(particles) == "":
        raise InputError(what, "no particles given", expected="a .cs, .star or .zarr particle store")
    path = Path(particles)
    if stack_dir is not None:
        if not Path(stack_dir).is_dir():
            raise InputError("--stack-dir", f"{stack_dir} is not a folder",
                             expected="the folder holding the stacks (CryoSPARC: the project folder)")
        check_allowed(Path(stack_dir), "--stack-dir")
    try:
        check_allowed(path, what)
        if is_store(path):
            if flip_contrast:
                raise InputError(path, f"{FLIP_OPTION} cannot flip a particle store (its images were "
                                 "stored with blob/sign applied)",
                                 expected="the .cs/.star file, or a store made by hetero-dask import --flip-contrast")
            store = ParticleStore.open(path)
            return CheckedParticles(str(path), None, store.n, store.box, store.psize_A,
                                    str(store.attrs.get("fingerprint")))
        if not path.exists():
            raise InputError(path, "not found", expected="a .cs, .star or .zarr particle store")
        if path.is_dir():
            raise InputError(path, "is a folder but not a particle store (no complete zarr.json)",
                             expected="a .cs, .star or a store made by hetero-dask import")
        pset = load_particles(path, stack_dir=stack_dir, flip_contrast=flip_contrast)
    except (InputError, ValueError, OSError) as exc:
        raise for_option(what, exc) from None
    return CheckedParticles(str(path), pset, pset.n, pset.box, pset.psize_A,
                            fingerprint(pset.table, pset.box, pset.psize_A))


def particle_fields(checked: CheckedParticles) -> list[str]:
    if checked.particle_set is not None:
        return list(checked.particle_set.table.dtype.names)
    from hetero_dask.io.store import ParticleStore

    return ParticleStore.open(checked.path).fields


def particle_table(checked: CheckedParticles, fields) -> np.ndarray:
    """``fields`` of the checked particles' metadata, in input order."""
    if checked.particle_set is not None:
        return checked.particle_set.table[list(fields)]
    from hetero_dask.io.store import ParticleStore

    store = ParticleStore.open(checked.path)
    return store.to_input_order(store.table(fields=fields))


def check_volumes(volumes, psize_A: float | None = None, what: str = "--volumes"):
    """Read K maps (one box and voxel size): ``(vols (K, n, n, n), psize_A, names)``."""
    from hetero_dask.io.volumes import read_volume_group

    specs = [volumes] if isinstance(volumes, str | os.PathLike) else list(volumes or [])
    if not specs:
        raise InputError(what, "no volumes given", expected="one .mrc per class, a folder or a volumes.zip")
    try:
        for spec in specs:
            check_allowed(Path(spec), what)
            if not Path(spec).exists():
                raise InputError(spec, "not found", expected="an .mrc map, a folder of them or a volumes.zip")
        return read_volume_group(volumes, psize_A=psize_A)
    except (InputError, ValueError, OSError) as exc:
        raise for_option(what, exc) from None


def check_symmetry(symmetry: str, convention: str):
    """The symmetry operators; a bad name raises naming ``--symmetry``."""
    from hetero_dask.core.symmetry import symmetry_group

    if convention not in ("cryosparc", "relion"):
        raise bad_value("symmetry_convention", convention, "'cryosparc' or 'relion'")
    try:
        return symmetry_group(symmetry, convention)
    except ValueError as exc:
        raise bad_value("symmetry", symmetry, f"C<n>, D<n>, T, O or I ({exc})") from None


def digest(*parts) -> str:
    """SHA-256 of arrays and values (the fingerprint of maps or masks)."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, np.ndarray):
            h.update(repr((part.dtype.str, part.shape)).encode())
            h.update(np.ascontiguousarray(part).tobytes())
        else:
            h.update(repr(part).encode())
    return h.hexdigest()


# --------------------------------------------------------------------------- output folder


@dataclass(frozen=True)
class OutputPlan:
    """What a job may do with its output folder, decided before anything is written.

    ``action``: ``new`` (start a run), ``resume`` (continue the run there),
    ``finished`` (the run there is complete: nothing to do) or ``rerun``
    (the job's own unfinished run there is run again).
    """

    out: Path
    run_dir: Path
    action: str
    status: dict | None


def describe_run(status: dict | None) -> str:
    """A run's state in words: ``interrupted in iteration 5 of at most 14``."""
    status = status or {}
    state = status.get("state", "unknown")
    if state == "running" and not ckpt.is_live(status):
        state = "gone"
    words = {"done": "finished", "gone": "stopped (its process is gone)"}.get(state, state)
    done, most = status.get("iteration"), status.get("n_iterations")
    if state == "done" or done is None:
        return words
    if status.get("message") == "writing outputs":
        return f"{words} while writing its outputs (after iteration {done})"
    return f"{words} in iteration {int(done) + 1}" + (f" of at most {most}" if most else "")


def check_output(out, job: str, resume: bool | None = None) -> OutputPlan:
    """Decide, writing nothing, whether ``job`` may run into ``out`` (rules: module doc).

    ``resume``: the job's ``--resume`` (None for jobs that have none).
    """
    if out is None or str(out) == "":
        raise InputError("--out", "no output folder given")
    out = Path(out)
    check_allowed(out, "--out")
    run_dir = out / "run"
    title = JOB_TITLES.get(job, job)
    if out.exists() and not out.is_dir():
        raise InputError("--out", f"{out} is a file", expected="a new or empty folder")
    status = ckpt.read_status(run_dir) if run_dir.is_dir() else None
    has_run = status is not None or (run_dir / ckpt.MARKER).is_file() or (run_dir / ckpt.RUN_RECORD).is_file()
    if not has_run:
        if resume:
            raise InputError("--out", f"--resume: {out} holds no run to resume (no {run_dir / 'status.json'})",
                             expected=f"the --out of an earlier {title}, or no --resume to start one")
        if out.is_dir() and any(out.iterdir()):
            raise InputError("--out", f"{out} is not empty and holds no hetero_dask run",
                             expected="a new or empty folder (a job writes particles, maps and reports "
                             "into it)")
        return OutputPlan(out, run_dir, "new", None)
    status = status or {}
    other = status.get("job")
    if other is not None and other != job:
        raise InputError("--out", f"{out} holds a {JOB_TITLES.get(other, other)} run, not a {title}",
                         expected="a new or empty folder")
    if ckpt.is_live(status):
        raise InputError("--out", f"{out}: a {title} is running there now (pid {status.get('pid')} on "
                         f"{status.get('host')})", expected="a folder no other run is writing to")
    finished = status.get("state") == "done" and (out / "report.json").is_file()
    state = describe_run(status)
    if resume is None:  # jobs without --resume: their own unfinished run is run again
        if finished:
            raise InputError("--out", f"{out} holds a finished {title} (report.json)",
                             expected="a new --out (or delete this one to run it again)")
        return OutputPlan(out, run_dir, "rerun", status)
    if not resume:
        raise InputError("--out", f"{out} already holds a {title} ({state})",
                         expected="--resume to continue it (resume=True), or a new --out to start another")
    return OutputPlan(out, run_dir, "finished" if finished else "resume", status)


def check_same_run(plan: OutputPlan, record: dict) -> None:
    """``--resume`` continues only the run it started: same parameters, same inputs."""
    if plan.action not in ("resume", "finished"):
        return
    old = ckpt.read_run_record(plan.run_dir)
    if old is None:
        raise InputError("--resume", f"{plan.run_dir} records no parameters ({ckpt.RUN_RECORD} missing: "
                         "a run of an older hetero_dask), so resuming it cannot be checked",
                         expected="a new --out")
    changes = []
    for name, value in record["parameters"].items():
        was = old.get("parameters", {}).get(name)
        if was != value:
            changes.append(f"{option(name)} {was!r} -> {value!r}")
    for name, value in record["inputs"].items():
        was = old.get("inputs", {}).get(name, {})
        if was.get("fingerprint") != value.get("fingerprint"):
            changes.append(f"{OPTIONS.get(name, '--' + name)} {value.get('path')}: other content than the "
                           f"run's {was.get('path')}")
    if changes:
        raise InputError("--resume", f"{plan.out} was started with other parameters or inputs: "
                         + "; ".join(changes),
                         expected="the run's own parameters and inputs to continue it, or a new --out "
                         "for a new run")


# --------------------------------------------------------------------------- jobs


@dataclass
class RefinePlan:
    """Heterogeneous Refinement's inputs, checked (see :func:`check_refine`)."""

    params: object
    particles: CheckedParticles
    volumes: np.ndarray
    volumes_psize_A: float
    volume_names: list
    box: int
    stack_dir: str | None
    output: OutputPlan
    record: dict


def min_refine_iterations(p, n_classes: int, identical: bool) -> int:
    """Fewest ``max_iterations`` that leave one free EM iteration before the final passes.

    Held iterations (random assignments, or the split of identical references)
    never count as converged, so ``--iterations`` must cover them, one free
    iteration and the final full passes.
    """
    if n_classes < 2:
        held = 0
    elif p.initial_split == "pca" and identical:
        held = p.split_iterations
    else:
        held = p.num_random_iterations
    return held + 1 + p.final_full_passes


def check_refine(particles, volumes, out, stack_dir=None, resume: bool = False, **params) -> RefinePlan:
    """Check every input and parameter of :func:`hetero_dask.refine`; write nothing."""
    from hetero_dask.jobs.refine.params import RefineParams
    from hetero_dask.jobs.refine.split import identical_references

    p = RefineParams(**params)
    p.validate()
    check_symmetry(p.symmetry, p.symmetry_convention)
    plan = check_output(out, "refine", resume=resume)
    checked = check_particles(particles, stack_dir, flip_contrast=p.flip_contrast)
    vols, psize_vol, names = check_volumes(volumes)
    check_field_of_view(vols.shape[-1], psize_vol, checked.box, checked.psize_A)
    box = working_box("refine_box", p.refine_box, checked.box, REFINE_DEFAULT_MAX_BOX)
    psize = checked.psize_A * checked.box / box
    box_A = box * psize
    for name in ("mask_diameter_A", "mask_diameter_outer_A"):
        d = getattr(p, name)
        if d is not None and not 0 < d <= box_A:
            raise bad_value(name, d, f"a diameter in A in (0, {box_A:.4g}] (the box is {box} px of "
                                     f"{psize:.4g} A)")
    if p.mask_diameter_outer_A is not None and (p.mask_diameter_A is None
                                                or p.mask_diameter_outer_A < p.mask_diameter_A):
        raise bad_value("mask_diameter_outer_A", p.mask_diameter_outer_A,
                        "a diameter >= --mask-diameter (which it needs)")
    least = min_refine_iterations(p, len(vols), identical_references(vols))
    if p.max_iterations < least:
        held = ("split-held" if p.initial_split == "pca" and identical_references(vols)
                else "random-assignment")
        raise bad_value("max_iterations", p.max_iterations,
                        f">= {least}: the {least - 1 - p.final_full_passes} {held} iteration(s) "
                        f"never converge, then one free iteration and the {p.final_full_passes} final "
                        "full passes (lower --random-iterations, or raise --iterations)")
    resolved = dataclasses.replace(p, refine_box=box)
    record = {
        "job": "refine",
        "parameters": dataclasses.asdict(resolved),
        "inputs": {
            "particles": {"path": str(Path(particles).resolve()), "fingerprint": checked.fingerprint},
            "volumes": {"path": [str(Path(v).resolve()) for v in ([volumes] if isinstance(
                volumes, str | os.PathLike) else volumes)], "fingerprint": digest(vols, psize_vol)},
        },
    }
    check_same_run(plan, record)
    return RefinePlan(resolved, checked, vols, psize_vol, names, box,
                      None if stack_dir is None else str(stack_dir), plan, record)


@dataclass
class ReconstructPlan:
    """Heterogeneous Reconstruction Only's inputs, checked (see :func:`check_reconstruct`)."""

    particles: CheckedParticles
    box: int
    psize_A: float
    output: OutputPlan


def check_reconstruct(particles, out, p) -> ReconstructPlan:
    """Check every input and parameter of :func:`hetero_dask.reconstruct` (``p``: its params); write nothing."""
    # Here, not at the top: the reconstruct package imports this module.
    from hetero_dask.jobs.reconstruct import (
        check_posteriors,
        class_inputs,
        class_layout,
        load_mask,
    )

    check_symmetry(p.symmetry, p.symmetry_convention)
    output = check_output(out, "reconstruct")
    checked = check_particles(particles, p.stack_dir, flip_contrast=p.flip_contrast)
    box = working_box("box_size", p.box_size, checked.box)
    psize = checked.psize_A * checked.box / box
    source = str(particles)
    try:
        fields = [f for f in particle_fields(checked) if f.startswith("alignments")]
        light = particle_table(checked, fields)
        layout = class_layout(light, p.class_prefix, source)
        if layout.n_classes < 1:
            raise InputError(source, "no particles with a class")
        cols = {name: light[name] for name in layout.columns()}
        check_posteriors(class_inputs(cols, layout, checked.psize_A, psize)[0], p.posterior_tolerance, source)
    except InputError as exc:
        raise for_option("--particles", exc) from None
    if p.mask is not None:
        try:
            check_allowed(Path(p.mask), "--mask")
            load_mask(p.mask, box, psize)
        except (InputError, ValueError, OSError) as exc:
            raise for_option("--mask", exc) from None
    return ReconstructPlan(checked, box, psize, output)


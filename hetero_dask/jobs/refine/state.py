"""The refinement's state between iterations: in memory (:class:`State`), in its checkpoint,
and the per-iteration files of the run directory (references, running statistics)."""

from __future__ import annotations

import contextvars
import dataclasses
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hetero_dask.jobs.mstep import ClassResult
from hetero_dask.runtime import checkpoint as ckpt
from hetero_dask.runtime.kept import KEPT

from .noise import updated_sigma2
from .scales import median_scales


@dataclass(frozen=True)
class KeptClassResult:
    """An M-step's result whose half maps stayed on its worker: ``result`` without them
    (``vol_A`` and ``vol_B`` None), the ``key`` they are kept under in ``worker``'s process (None:
    no Dask worker) and ``rebuild``, the recipe that makes them again from the run folder's
    running statistics (``tasks.rebuild_references``)."""

    result: ClassResult
    key: str
    worker: str | None
    rebuild: Callable[[], np.ndarray]


@dataclass
class State:
    iteration: int = 0
    volumes: np.ndarray | None = None  # (K, 2, n, n, n) half maps used as references (None: kept)
    sigma2: np.ndarray | None = None
    class_prior: np.ndarray | None = None
    resolution_A: np.ndarray | None = None  # (K,)
    fsc: np.ndarray | None = None  # (K, n_shells)
    batch_start: int = 0
    converged_at: int | None = None
    history: list = field(default_factory=list)
    # The iteration the current round of EM began at: 0, or where a split's run restarted
    # from its own classes (RefineParams.split_restart). The schedule counts from it.
    round_start: int = 0
    class_scale: np.ndarray | None = None  # (K,) median grey scale per class (None: 1)
    # The references as the last M-steps left them on their workers (one KeptClassResult per
    # class), in place of ``volumes``: the next iteration recalls them there (runtime.kept).
    kept: tuple[KeptClassResult, ...] | None = None

    def reference_volumes(self) -> np.ndarray:
        """The references ``(K, 2, n, n, n)``: ``volumes``, or the kept maps: this process's copies
        (without a client the M-steps ran here), rebuilt where it holds none."""
        if self.kept is None:
            return self.volumes
        return np.stack([r.rebuild() if maps is None else maps for r, maps in zip(self.kept, self.local_maps(),
                                                                                strict=True)])

    def local_maps(self) -> list[np.ndarray | None]:
        """This process's copies of the kept maps (None for each it does not hold), left kept."""
        return [KEPT.take(r.key, release=False) for r in self.kept or ()]

    @property
    def round_iteration(self) -> int:
        """The next iteration, counted from the start of its round."""
        return self.iteration - self.round_start


def update_state(state: State, results, ex: dict, lr: float, prior_lr: float, hold_prior: bool, half_maps: bool):
    """Take the M-step's maps, resolutions and FSCs (``results``, one per class); move the class
    priors by ``prior_lr`` (unless ``hold_prior``: random or held assignments) and the noise by
    ``lr`` towards the E-step's (``ex``)."""
    K = len(results)
    state.kept = None
    if all(isinstance(r, KeptClassResult) for r in results):  # the maps stayed on the workers
        state.kept, results = tuple(results), [r.result for r in results]
        state.volumes = None
    elif half_maps:
        state.volumes = np.stack([np.stack([results[k].vol_A, results[k].vol_B]) for k in range(K)])
    else:
        state.volumes = np.stack([np.stack([results[k].vol_full, results[k].vol_full]) for k in range(K)])
    state.resolution_A = np.array([results[k].resolution_A for k in range(K)], dtype=np.float64)
    n_sh = max(len(results[k].fsc) for k in range(K))
    state.fsc = np.stack([np.pad(np.asarray(results[k].fsc, np.float64), (0, n_sh - len(results[k].fsc)))
                          for k in range(K)])
    frac = ex["posterior_sum"] / max(ex["posterior_sum"].sum(), 1e-12)
    if not hold_prior:
        state.class_prior = (1 - prior_lr) * state.class_prior + prior_lr * frac if prior_lr < 1 else frac
        state.class_prior = np.maximum(state.class_prior, 1e-4)
        state.class_prior /= state.class_prior.sum()
    state.sigma2 = updated_sigma2(state.sigma2, ex, lr)
    if "scale_histogram" in ex:
        previous = np.ones(K) if state.class_scale is None else state.class_scale
        state.class_scale = median_scales(ex["scale_histogram"], previous)


def checkpoint(run_dir: Path, state: State):
    """Write ``state`` as the checkpoint of the iteration just done (``state.iteration - 1``)."""
    arrays = {"volumes": state.reference_volumes(), "sigma2": state.sigma2, "class_prior": state.class_prior,
              "resolution_A": state.resolution_A}
    if state.fsc is not None:
        arrays["fsc"] = state.fsc
    if state.class_scale is not None:
        arrays["class_scale"] = state.class_scale
    meta = {"iteration": state.iteration, "batch_start": state.batch_start,
            "converged_at": state.converged_at, "history": state.history, "round_start": state.round_start}
    ckpt.write_iteration(run_dir, state.iteration - 1, arrays, meta)


class CheckpointWriter:
    """Writes each iteration's checkpoint in a driver thread while the next iteration runs.

    The driver only waits on the cluster between iterations, and the checkpoint (the K half
    maps, compressed: a quarter of a second at box 128, K 4) would otherwise be part of every
    iteration's fixed cost. One write at a time, in iteration order: :meth:`write` first waits
    for the one before. A failed write (disk full) is raised by the next :meth:`write` or by
    :meth:`wait`, which the driver calls before the outputs and on every way out, so no write
    is left running; the checkpoint before it stays complete, as for a write in the main thread.
    """

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def write(self, state: State) -> None:
        """Checkpoint ``state`` (the iteration just done), then mark it done in the run's status;
        drop the files no resume needs any more."""
        self.wait()
        # The driver appends to the history and replaces (never mutates) the arrays: a shallow
        # copy with its own history list is a stable snapshot.
        snapshot = dataclasses.replace(state, history=list(state.history))
        local = state.local_maps()
        if local and all(m is not None for m in local):
            # Held here (no client): the next iteration takes them, the thread would rebuild them.
            snapshot.volumes, snapshot.kept = np.stack(local), None
        context = contextvars.copy_context()  # the status publisher of a submitted job
        self._thread = threading.Thread(target=context.run, args=(self._write, snapshot),
                                        name="refine-checkpoint", daemon=True)
        self._thread.start()

    def _write(self, state: State) -> None:
        try:
            checkpoint(self.run_dir, state)
            prune_iteration_files(self.run_dir, state.iteration - 2)
            ckpt.write_status(self.run_dir, iteration=state.iteration,
                              message=f"iteration {state.iteration - 1} done")
        except BaseException as e:  # raised in the driver's thread by wait()
            self._error = e

    def wait(self, raise_error: bool = True) -> None:
        """Wait for the write in progress; raise its error, if it failed (and ``raise_error``)."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        error, self._error = self._error, None
        if error is not None and raise_error:
            raise error


def restore_state(last) -> State:
    """The state of checkpoint ``last`` (:func:`hetero_dask.runtime.checkpoint.load_latest`)."""
    a = last.arrays()
    m = last.meta
    return State(iteration=m["iteration"], volumes=a["volumes"], sigma2=a["sigma2"],
                 class_prior=a["class_prior"], resolution_A=a["resolution_A"], fsc=a.get("fsc"),
                 batch_start=m["batch_start"], converged_at=m["converged_at"], history=m["history"],
                 round_start=m["round_start"], class_scale=a.get("class_scale"))


def grids_file(run_dir: str, iteration: int, k: int) -> Path:
    """Class ``k``'s running half-map statistics after ``iteration``."""
    return Path(run_dir) / "accumulators" / f"it{iteration:04d}_class{k:03d}.npz"


def prune_iteration_files(run_dir: Path, iteration: int) -> None:
    """Delete the running statistics of ``iteration`` and before.

    The M-step of iteration i reads the statistics of i - 1, the references iteration i reads
    are rebuilt from them where a worker lost its copy, and a resumed run starts from the last
    checkpoint, so everything older is no longer needed.
    """
    for path in (run_dir / "accumulators").glob("it*_class*.npz"):
        digits = path.name[2:6]
        if digits.isdigit() and int(digits) <= iteration:
            path.unlink(missing_ok=True)

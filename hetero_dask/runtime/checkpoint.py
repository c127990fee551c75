"""Run directory: per-iteration checkpoints and the run's status, crash-safe.

Layout::

    RUN_DIR/checkpoint.json                 {"last_complete_iteration": i, "path": ...}
    RUN_DIR/iterations/iter_0003.zarr/      arrays of iteration 3 (volumes, statistics,
                                            per-particle results); attrs["meta"] holds
                                            JSON metadata (parameters, RNG state, ...)
    RUN_DIR/status.json                     what `hetero-dask status RUN_DIR` shows
    RUN_DIR/run.json                        the run's parameters and input fingerprints
                                            (``--resume`` refuses changes to either)

An iteration is written to a temporary folder, renamed into place, and only
then is ``checkpoint.json`` replaced (temp file + fsync + rename) to point at
it, so a crash, a full disk or an unwritable folder at any moment leaves the
previous checkpoint complete and readable. ``--resume`` starts after
:func:`load_latest`'s iteration.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr

MARKER = "checkpoint.json"
STATUS = "status.json"
RUN_RECORD = "run.json"
ITERATIONS = "iterations"

# Set by hetero_dask.runtime.submit while a submitted job's driver runs, so that status
# updates also reach the submitting client through the scheduler.
STATUS_SINK: contextvars.ContextVar[Callable[[dict], None] | None] = contextvars.ContextVar(
    "hetero_dask_status_sink", default=None
)


class CheckpointWriteError(OSError):
    """Writing to the run directory failed; the previous checkpoint is untouched."""


@dataclass(frozen=True)
class Checkpoint:
    """A completed iteration in a run directory."""

    run_dir: Path
    iteration: int
    path: Path
    meta: dict = field(default_factory=dict)

    def names(self) -> list[str]:
        """Names of the stored arrays."""
        return sorted(zarr.open_group(self.path, mode="r").array_keys())

    def array(self, name: str, region: tuple | slice = ()) -> np.ndarray:
        """Read one array (or ``region`` of it, e.g. ``slice(start, stop)``) as numpy."""
        group = zarr.open_group(self.path, mode="r")
        if name not in group:
            raise KeyError(f"{self.path}: no array {name!r} (has {self.names()})")
        return np.asarray(group[name][region])

    def arrays(self) -> dict[str, np.ndarray]:
        """Every stored array, read fully."""
        return {name: self.array(name) for name in self.names()}


def iteration_path(run_dir: str | os.PathLike, iteration: int) -> Path:
    return Path(run_dir) / ITERATIONS / f"iter_{iteration:04d}.zarr"


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as JSON to ``path`` so that readers see the old or the new file, whole."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1, default=_json_default)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not supported on every filesystem
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def read_marker(run_dir: str | os.PathLike) -> dict | None:
    """The parsed ``checkpoint.json`` of ``run_dir``, or None when no iteration completed."""
    path = Path(run_dir) / MARKER
    if not path.is_file():
        return None
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as exc:
            raise ValueError(
                f"{path} is not valid JSON ({exc}); it is only ever replaced whole, "
                "so something else wrote it"
            ) from exc


def last_complete_iteration(run_dir: str | os.PathLike) -> int | None:
    marker = read_marker(run_dir)
    return None if marker is None else int(marker["last_complete_iteration"])


def load_latest(run_dir: str | os.PathLike) -> Checkpoint | None:
    """The last completed iteration of ``run_dir``, or None for a fresh run."""
    run_dir = Path(run_dir)
    marker = read_marker(run_dir)
    if marker is None:
        return None
    path = run_dir / marker["path"]
    if not path.is_dir():
        raise FileNotFoundError(f"{run_dir / MARKER} points at {path}, which is missing")
    meta = dict(zarr.open_group(path, mode="r").attrs.get("meta", {}))
    return Checkpoint(run_dir, int(marker["last_complete_iteration"]), path, meta)


def _check_writable(run_dir: Path, iteration: int) -> None:
    last = None
    try:
        (run_dir / ITERATIONS).mkdir(parents=True, exist_ok=True)
        last = last_complete_iteration(run_dir)
        if not os.access(run_dir, os.W_OK) or not os.access(run_dir / ITERATIONS, os.W_OK):
            raise PermissionError(f"no write permission on {run_dir}")
    except OSError as exc:
        raise _write_error(run_dir, iteration, exc, last) from exc


def _write_error(
    run_dir: Path, iteration: int, exc: OSError, last: int | None
) -> CheckpointWriteError:
    kept = (
        "no earlier checkpoint exists"
        if last is None
        else f"the checkpoint of iteration {last} is intact"
    )
    reason = exc.strerror or str(exc)
    return CheckpointWriteError(
        exc.errno,
        f"cannot write the checkpoint of iteration {iteration} to {run_dir}: {reason} "
        f"({type(exc).__name__}); {kept}. Free space or fix permissions, then rerun with --resume",
    )


def write_iteration(
    run_dir: str | os.PathLike,
    iteration: int,
    arrays: Mapping[str, np.ndarray],
    meta: Mapping[str, Any] | None = None,
    chunks: Mapping[str, tuple] | None = None,
    keep: int | None = 2,
) -> Checkpoint:
    """Write one iteration's arrays and metadata, then mark it complete (last).

    ``arrays``: name -> numpy array (volumes (K, n, n, n), statistics,
    per-particle results (N, ...)); ``meta``: JSON-serialisable (store RNG
    state with :func:`rng_state`); ``chunks``: optional Zarr chunk shape per
    array (default: automatic); ``keep``: how many completed iterations to
    keep on disk (None: all). Raises :class:`CheckpointWriteError` (an
    ``OSError``) when the folder is unwritable or the disk fills; the
    previous checkpoint then stays complete.
    """
    run_dir = Path(run_dir)
    _check_writable(run_dir, iteration)
    last = last_complete_iteration(run_dir)
    if last is not None and iteration <= last:
        raise ValueError(
            f"{run_dir} already holds iteration {last}; iterations must increase "
            f"(got {iteration}); use a new run directory to start over"
        )
    final = iteration_path(run_dir, iteration)
    tmp = final.with_name(final.name + f".tmp-{os.getpid()}")
    try:
        for stale in (tmp, final):  # left by an interrupted attempt at this iteration
            if stale.exists():
                shutil.rmtree(stale)
        group = zarr.open_group(tmp, mode="w")
        for name, value in arrays.items():
            value = np.asarray(value)
            group.create_array(name, data=value, chunks=(chunks or {}).get(name, "auto"))
        group.attrs["meta"] = json.loads(json.dumps(dict(meta or {}), default=_json_default))
        os.replace(tmp, final)
        write_json_atomic(
            run_dir / MARKER,
            {
                "last_complete_iteration": int(iteration),
                "path": str(final.relative_to(run_dir)),
                "arrays": sorted(arrays),
                "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            },
        )
    except OSError as exc:
        with contextlib.suppress(OSError):
            shutil.rmtree(tmp)
        raise _write_error(run_dir, iteration, exc, last) from exc
    if keep is not None:
        _prune(run_dir, keep)
    return Checkpoint(run_dir, int(iteration), final, dict(group.attrs["meta"]))


def _prune(run_dir: Path, keep: int) -> None:
    marked = last_complete_iteration(run_dir)
    done = sorted(
        p
        for p in (run_dir / ITERATIONS).glob("iter_*.zarr")
        if p.name[5:9].isdigit() and int(p.name[5:9]) <= marked
    )
    for old in done[: max(0, len(done) - max(keep, 1))]:
        with contextlib.suppress(OSError):
            shutil.rmtree(old)


def rng_state(rng: np.random.Generator) -> dict:
    """A JSON-serialisable snapshot of ``rng`` (restore with :func:`rng_from_state`)."""
    return rng.bit_generator.state


def rng_from_state(state: Mapping) -> np.random.Generator:
    bit_gen = getattr(np.random, state["bit_generator"])()
    bit_gen.state = dict(state)
    return np.random.Generator(bit_gen)


def write_status(run_dir: str | os.PathLike, **fields) -> dict:
    """Merge ``fields`` into ``RUN_DIR/status.json`` (atomic) and return the new status.

    Conventional fields: ``job``, ``state`` (``running``, ``done``,
    ``failed``, ``interrupted``), ``iteration`` (iterations completed),
    ``n_iterations`` (at most), ``message``, ``results`` (name -> path). ``updated``, ``host`` and ``pid`` are filled in. Inside a
    job started by :func:`hetero_dask.submit` the status is also published
    to the submitting client's handle.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    status = read_status(run_dir) or {}
    status.update(fields)
    status.update(
        updated=time.strftime("%Y-%m-%dT%H:%M:%S%z"), host=socket.gethostname(), pid=os.getpid()
    )
    status = json.loads(json.dumps(status, default=_json_default))
    write_json_atomic(run_dir / STATUS, status)
    sink = STATUS_SINK.get()
    if sink is not None:
        sink(status)
    return status


def read_status(run_dir: str | os.PathLike) -> dict | None:
    """``RUN_DIR/status.json`` as a dict, or None when the run has not written one."""
    path = Path(run_dir) / STATUS
    if not path.is_file():
        return None
    with open(path) as f:
        return json.load(f)


def write_run_record(run_dir: str | os.PathLike, record: Mapping[str, Any]) -> None:
    """Keep what defines the run (job, parameters, input fingerprints) in ``RUN_DIR/run.json``."""
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    write_json_atomic(Path(run_dir) / RUN_RECORD, dict(record))


def read_run_record(run_dir: str | os.PathLike) -> dict | None:
    path = Path(run_dir) / RUN_RECORD
    if not path.is_file():
        return None
    with open(path) as f:
        return json.load(f)


def is_live(status: Mapping | None) -> bool:
    """True when ``status`` says running and its process still runs on this host.

    A run whose process died without a word (killed, machine rebooted) still reads
    ``running``; on another host there is no telling, and it counts as not live.
    """
    if not status or status.get("state") != "running" or status.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(status["pid"]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, KeyError, TypeError, ValueError):
        return True
    return True


@contextlib.contextmanager
def run_status(run_dir: str | os.PathLike, job: str, **fields):
    """Mark the run ``running`` now, and ``interrupted`` or ``failed`` if the body raises.

    The body writes ``done`` itself when its results are complete. An interrupt
    (Ctrl-C, or SIGTERM: :class:`hetero_dask.runtime.signals.Terminated`) keeps the
    ``iteration`` reached, so ``hetero-dask status`` and ``--resume`` agree.
    """
    write_status(run_dir, job=job, state="running", error=None, stopped_by=None, **fields)
    try:
        yield
    except KeyboardInterrupt as exc:
        write_status(run_dir, state="interrupted", error=None, stopped_by=str(exc) or "Ctrl-C")
        raise
    except BaseException as exc:
        write_status(run_dir, state="failed", error=f"{type(exc).__name__}: {exc}")
        raise

"""Values a task leaves where it ran: a file in the run folder and a copy in the worker's memory.

A job's per-iteration state that the next iteration's tasks read (refine's running M-step
statistics, its class references) is written by the task that makes it, as a file in the run
folder, and kept in that worker process's memory (:data:`KEPT`). The next task that reads it
on the same worker takes the copy; any other process, or the same one after the copy was
dropped, reads the file. The file is the record a resumed run and a lost worker fall back on,
so nothing a later iteration needs lives only in one worker's memory, and the driver never
carries these arrays (see :class:`Recall`, which the engine turns into tasks without lineage).
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np


class KeptFiles:
    """Arrays written to files (a dict of arrays as ``.npz``, one array as ``.npy``, by the path's
    suffix) and kept in this process's memory while the files are unchanged.

    A kept copy is used only while its file is still the one it was written as (same inode, size
    and modification time): a file rewritten by another run in the same folder, or by another
    worker, is read from disk. The arrays are kept read-only, so nothing can change them in place,
    and the oldest are dropped beyond ``max_bytes`` per process. Safe for concurrent task threads.
    """

    def __init__(self, max_bytes: int = 2 << 30):
        self.max_bytes = max_bytes
        self._kept: OrderedDict[str, tuple[tuple, dict]] = OrderedDict()
        self._lock = threading.Lock()

    def write(self, path: Path, value: dict | np.ndarray) -> None:
        """Write ``value`` (a dict of arrays for a ``.npz`` path, an array for ``.npy``) to ``path``
        (a temporary name, then renamed) and keep it. A ``.npy`` file is written without the
        zip container's checksum: a third of the time for a map."""
        path = Path(path)
        single = _single(path)
        if single != isinstance(value, np.ndarray):
            raise TypeError(f"{path}: a .npy file holds one array, a .npz file a dict of arrays; "
                            f"got {type(value).__name__}")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.stem + ".tmp" + path.suffix)
        if single:
            np.save(tmp, value, allow_pickle=False)
        else:
            np.savez(tmp, **value)
        tmp.replace(path)
        arrays = [value] if single else list(value.values())
        size = _nbytes(arrays)
        with self._lock:
            self._kept.pop(str(path), None)
            if size > self.max_bytes:
                return  # the file only; what is kept stays
            held = sum(_size(kept) for _, kept in self._kept.values())
            while self._kept and held + size > self.max_bytes:
                held -= _size(self._kept.popitem(last=False)[1][1])  # the oldest first
            for a in arrays:
                a.flags.writeable = False
            self._kept[str(path)] = (_identity(path), value if single else dict(value))

    def read(self, path: Path, release: bool = True) -> dict | np.ndarray:
        """What ``path`` holds: the kept value while the file is unchanged, else the file's.

        ``release``: drop the kept copy (its one reader has it; the memory goes with that reader's
        use); False leaves it for a later reader.
        """
        path = Path(path)
        with self._lock:
            kept = self._kept.pop(str(path), None) if release else self._kept.get(str(path))
        if kept is not None and kept[0] == _identity(path):
            return kept[1]
        if _single(path):
            return np.load(path, allow_pickle=False)
        with np.load(path, allow_pickle=False) as f:
            return {name: f[name] for name in f.files}

    def holds(self, path: Path) -> bool:
        """Whether this process keeps a copy of ``path`` (whatever the file now holds)."""
        with self._lock:
            return str(path) in self._kept

    def clear(self) -> None:
        with self._lock:
            self._kept.clear()


def _single(path: Path) -> bool:
    if path.suffix not in (".npy", ".npz"):
        raise ValueError(f"{path}: kept files are .npy (one array) or .npz (a dict of arrays)")
    return path.suffix == ".npy"


def _nbytes(arrays) -> int:
    return sum(a.nbytes for a in arrays)


def _size(value: dict | np.ndarray) -> int:
    return value.nbytes if isinstance(value, np.ndarray) else _nbytes(value.values())


def _identity(path: Path) -> tuple:
    st = os.stat(path)
    return (st.st_ino, st.st_size, st.st_mtime_ns)


KEPT = KeptFiles()


def worker_address() -> str | None:
    """The address of the Dask worker running the calling task (None outside a worker)."""
    try:
        from distributed import get_worker

        return get_worker().address
    except (ImportError, ValueError):
        return None


@dataclass(frozen=True)
class Recall:
    """A shared value of :func:`~hetero_dask.runtime.engine.map_reduce` read from kept files:
    ``[KEPT.read(p) for p in paths]``.

    With a client, each file's array is one task with no dependencies, placed on the worker that
    wrote it (``workers[i]``, a preference), which takes its kept copy; Dask then moves it to the
    other workers in memory. The task's lineage is the file alone: a worker lost with the array
    re-reads the file elsewhere, never a past iteration's graph.
    """

    paths: tuple[str, ...]
    workers: tuple[str | None, ...]

    def __post_init__(self):
        if len(self.paths) != len(self.workers):
            raise ValueError(f"Recall needs one worker (or None) per path: {len(self.paths)} paths, "
                             f"{len(self.workers)} workers")


def recall(path: str) -> dict | np.ndarray:
    """What kept file ``path`` holds (this process's copy, or the file's)."""
    return KEPT.read(Path(path))


def recall_all(paths: Sequence[str]) -> list:
    return [recall(p) for p in paths]

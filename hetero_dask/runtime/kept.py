"""Values a task leaves where it ran, for the next iteration's tasks (:data:`KEPT`, one per process).

Two kinds, both bounded in memory (least recently used dropped first):

- **files** (:meth:`Kept.write` / :meth:`Kept.read`): arrays a task writes to the run folder
  and keeps a copy of (refine's running M-step statistics); the next reader on the same worker
  takes the copy while the file is unchanged, any other process reads the file, which is the
  record a resume and a lost worker fall back on;
- **values** (:meth:`Kept.keep` / :meth:`Kept.take`): arrays kept in memory only (refine's class
  references), each with a recipe that rebuilds it from files (:class:`Recall`): the next
  graph's tasks read them where they were made, and only a lost worker's are rebuilt.

So nothing a later iteration needs lives only in one worker's memory, and the driver never
carries these arrays between iterations.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np


class Kept:
    """Arrays kept in this process's memory: copies of ``.npz`` files, used while the files are
    unchanged, and values kept under a key.

    A kept copy of a file is used only while the file is still the one it was written as (same
    inode, size and modification time): a file rewritten by another run in the same folder, or by
    another worker, is read from disk. The arrays are kept read-only, so nothing can change them
    in place, and the oldest are dropped beyond ``max_bytes`` per process. Safe for concurrent
    task threads.
    """

    def __init__(self, max_bytes: int = 2 << 30):
        self.max_bytes = max_bytes
        # key -> (the file's identity, or None for a value; the dict of arrays, or the value)
        self._kept: OrderedDict[str, tuple[tuple | None, dict | np.ndarray]] = OrderedDict()
        self._lock = threading.Lock()

    def write(self, path: Path, arrays: dict) -> None:
        """Write ``arrays`` to ``path`` (``.npz``; a temporary name, then renamed) and keep them."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.stem + ".tmp.npz")
        np.savez(tmp, **arrays)
        tmp.replace(path)
        self._put(str(path), _identity(path), dict(arrays))

    def read(self, path: Path, release: bool = True) -> dict:
        """The arrays at ``path``: the kept ones while the file is unchanged, else the file's.

        ``release``: drop the kept copy (its one reader has it; the memory goes with that reader's
        use); False leaves it for a later reader.
        """
        path = Path(path)
        with self._lock:
            kept = self._kept.pop(str(path), None) if release else self._kept.get(str(path))
        if kept is not None and kept[0] is not None and kept[0] == _identity(path):
            return kept[1]
        with np.load(path, allow_pickle=False) as f:
            return {name: f[name] for name in f.files}

    def holds(self, key: str | Path) -> bool:
        """Whether this process keeps a value under ``key`` (or a copy of file ``key``, whatever
        the file now holds)."""
        with self._lock:
            return str(key) in self._kept

    def clear(self) -> None:
        with self._lock:
            self._kept.clear()

    def keep(self, key: str, value: np.ndarray) -> None:
        """Keep ``value`` under ``key`` (memory only: see :class:`Recall` for its rebuild)."""
        self._put(key, None, value)

    def take(self, key: str, release: bool = True) -> np.ndarray | None:
        """The value kept under ``key``, None if this process holds none; ``release`` as in
        :meth:`read`."""
        with self._lock:
            kept = self._kept.pop(key, None) if release else self._kept.get(key)
        return None if kept is None else kept[1]

    def _put(self, key: str, identity: tuple | None, value) -> None:
        size = _size(value)
        with self._lock:
            self._kept.pop(key, None)
            if size > self.max_bytes:
                return  # not kept; what is kept stays
            held = sum(_size(kept) for _, kept in self._kept.values())
            while self._kept and held + size > self.max_bytes:
                held -= _size(self._kept.popitem(last=False)[1][1])  # the oldest first
            for a in _arrays(value):
                a.flags.writeable = False
            self._kept[key] = (identity, value)


def _arrays(value: dict | np.ndarray) -> list[np.ndarray]:
    return [value] if isinstance(value, np.ndarray) else list(value.values())


def _size(value: dict | np.ndarray) -> int:
    return sum(a.nbytes for a in _arrays(value))


def _identity(path: Path) -> tuple:
    st = os.stat(path)
    return (st.st_ino, st.st_size, st.st_mtime_ns)


KEPT = Kept()


def worker_address() -> str | None:
    """The address of the Dask worker running the calling task (None outside a worker)."""
    try:
        from distributed import get_worker

        return get_worker().address
    except (ImportError, ValueError):
        return None


@dataclass(frozen=True)
class Recall:
    """A shared value of :func:`~hetero_dask.runtime.engine.map_reduce` made of values kept on the
    workers: ``[KEPT.take(key) or rebuild() for each]``.

    With a client, each value is one task with no dependencies, placed on the worker that kept it
    (``workers[i]``, a preference), which hands its copy to the graph; Dask moves it to the other
    workers in memory. Where no copy is kept (another process, a lost worker) the task calls
    ``rebuilds[i]``, a picklable recipe from files: a lost value is rebuilt, never recomputed
    from a past iteration's graph.
    """

    keys: tuple[str, ...]
    workers: tuple[str | None, ...]
    rebuilds: tuple[Callable[[], np.ndarray], ...]

    def __post_init__(self):
        if not len(self.keys) == len(self.workers) == len(self.rebuilds):
            raise ValueError(f"Recall needs one worker (or None) and one rebuild per key: {len(self.keys)} keys, "
                             f"{len(self.workers)} workers, {len(self.rebuilds)} rebuilds")


def recall(key: str, rebuild: Callable[[], np.ndarray]) -> np.ndarray:
    """The value kept under ``key`` in this process, or ``rebuild()`` where none is."""
    value = KEPT.take(key)
    return rebuild() if value is None else value


def recall_all(spec: Recall) -> list[np.ndarray]:
    return [recall(key, rebuild) for key, rebuild in zip(spec.keys, spec.rebuilds, strict=True)]

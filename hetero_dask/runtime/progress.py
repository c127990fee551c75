"""What a running job shows its user: one bar per stage, or plain lines, on stderr.

Stages a user recognises: the import of the particles (``hetero_dask.io.store``),
the job's Dask work (one bar per graph, named after the job: ``reconstruct
30/36 tasks``, not one per internal step), the iterations of a refinement
(:class:`IterationProgress`: "iteration k of at most N" with the time left),
and writing the outputs. On a terminal these are bars; when stderr is not a
terminal (a batch job's log) an iterative job prints one plain line per
iteration instead; ``enabled=False`` (``--quiet``) silences all of it.
"""

from __future__ import annotations

import importlib.util
import sys
import time

from dask.callbacks import Callback
from dask.utils import key_split
from tqdm.auto import tqdm


def print_dashboard(client, file=None) -> str | None:
    """Print the scheduler address and dashboard link of ``client``; return the link."""
    try:
        link = client.dashboard_link
    except Exception:  # no dashboard service known: say so rather than fail a job
        link = None
    address = getattr(client.scheduler, "address", None)
    note = ""
    if link and importlib.util.find_spec("bokeh") is None:
        note = " (served only where bokeh is installed: pip install 'bokeh>=3.1')"
    print(
        f"Dask scheduler {address}; dashboard: {link or 'not running'}{note}",
        file=file or sys.stdout,
        flush=True,
    )
    return link


def _graph_bar(keys, enabled: bool | None) -> tqdm:
    """One bar for every task of a graph, named after the job (the task keys' common prefix)."""
    stages = {key_split(k) for k in keys}
    name = stages.pop().rsplit("-", 1)[0] if len(stages) == 1 else _common_prefix(stages)
    return tqdm(
        total=len(keys),
        desc=name or "tasks",
        unit="task",
        leave=True,
        disable=None if enabled is None else not enabled,
        file=sys.stderr,
        dynamic_ncols=True,
    )


def _common_prefix(stages: set[str]) -> str:
    parts = [s.split("-") for s in stages]
    common = []
    for words in zip(*parts, strict=False):
        if len(set(words)) > 1:
            break
        common.append(words[0])
    return "-".join(common)


def wait_with_progress(futures: list, enabled: bool | None = None) -> None:
    """Block until every future is done, advancing one bar.

    ``futures``: a list of ``distributed.Future`` for every task of the
    graph. The list is emptied and each future released as soon as it
    completes (its dependents keep what they need), so intermediate partials
    don't stay pinned in worker memory; keep your own references to the
    futures whose results you want. An errored future raises here.
    """
    from distributed import as_completed

    bar = _graph_bar([f.key for f in futures], enabled)
    ac = as_completed(futures)
    futures.clear()
    try:
        for f in ac:
            if f.status == "error":
                f.result()  # raises the task's exception
            bar.update(1)
            del f
    finally:
        bar.close()


class StageProgress(Callback):
    """The same bar for Dask's local schedulers (no ``distributed.Client``)."""

    def __init__(self, enabled: bool | None = None):
        super().__init__()
        self.enabled = enabled
        self.bar: tqdm | None = None

    def _start_state(self, dsk, state):
        self.bar = _graph_bar(list(dsk), self.enabled)

    def _posttask(self, key, result, dsk, state, worker_id):
        self.bar.update(1)

    def _finish(self, dsk, state, errored):
        self.bar.close()


def _is_terminal(file) -> bool:
    try:
        return file.isatty()
    except (AttributeError, ValueError):
        return False


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class IterationProgress:
    """"iteration k of at most N" with the time left, and the job's notes, on stderr.

    On a terminal: a bar, with each iteration's details written above it. Not on
    a terminal: one plain line per iteration. ``enabled=False``: nothing.
    ``done``: iterations completed before (a resumed run). The time left is the
    mean time per iteration so far times the iterations left: an upper bound when
    the run converges early.
    """

    def __init__(self, label: str, max_iterations: int, done: int = 0, enabled: bool | None = None,
                 file=None):
        self.file = file or sys.stderr
        self.quiet = enabled is False
        self.max_iterations = int(max_iterations)
        self.done = int(done)
        self.seconds: list[float] = []
        self.t_start = time.monotonic()
        self.label = label
        self.bar = None
        if not self.quiet and (enabled or _is_terminal(self.file)):
            self.bar = tqdm(total=self.max_iterations, initial=self.done, desc=self._running(), file=self.file,
                            bar_format="{desc} [{elapsed}, at most {remaining} left]", dynamic_ncols=True)

    def _running(self) -> str:
        if self.done >= self.max_iterations:
            return f"{self.label}: {self.done} iterations done"
        return f"{self.label}: iteration {self.done + 1} of at most {self.max_iterations}"

    def note(self, text: str) -> None:
        """One line for the user (above the bar on a terminal)."""
        if self.quiet:
            return
        if self.bar is not None:
            self.bar.write(text, file=self.file)
        else:
            print(text, file=self.file, flush=True)

    def iteration_done(self, details: str) -> None:
        """Count one more iteration; show ``details`` (resolutions, class fractions, ...)."""
        now = time.monotonic()
        self.seconds.append(now - self.t_start)
        self.t_start = now
        self.done += 1
        head = f"iteration {self.done} of at most {self.max_iterations}"
        if self.bar is not None:
            self.note(f"{head}: {details}")
            self.bar.set_description_str(self._running(), refresh=False)
            self.bar.update(1)
            return
        left = (self.max_iterations - self.done) * sum(self.seconds) / len(self.seconds)
        self.note(f"{head} ({_duration(self.seconds[-1])}; at most {_duration(left)} left): {details}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def close_bars() -> None:
    """Close every progress bar still open (a job stopped by an error or Ctrl-C), so the
    message that follows starts on a line of its own."""
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()

"""How a job stops: Ctrl-C and SIGTERM end it cleanly in the driver, never in a worker.

A terminal's Ctrl-C sends SIGINT to every process of the foreground group, and a
batch system cancels a job (SLURM's ``scancel``, a time limit) with SIGTERM to all
its processes: local Dask worker processes would die printing their own
tracebacks, and the nanny would start new ones. Workers are therefore started
with both signals ignored (:func:`starting_workers`; a child process inherits
that) and the driver alone handles them: the job records that it was
interrupted, its cluster is closed (which stops the workers), and the command
prints one line. :func:`sigterm_raises` makes SIGTERM raise :class:`Terminated`,
a ``KeyboardInterrupt``, so that both signals take the same path.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived (e.g. the batch system ended the job)."""


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def starting_workers() -> Iterator[None]:
    """SIGINT and SIGTERM ignored while the body starts worker processes, which keep them
    ignored: the driver stops its workers (they also exit when it dies). A signal in these
    few seconds is lost; the next one stops the job."""
    if not _in_main_thread():  # signal handlers can be set from the main thread only
        yield
        return
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _raise_terminated(signum, frame):
    raise Terminated(f"terminated by signal {signal.Signals(signum).name}")


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """SIGTERM raises :class:`Terminated` in the main thread while the body runs."""
    if not _in_main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)

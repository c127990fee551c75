"""Terminal progress: one bar per stage (tasks done / total) and the dashboard link.

Stages are named by the engine's task keys (``<prefix>-process``,
``<prefix>-merge``, ``<prefix>-finish``), so a bar reads
``reconstruct-process  12/24``. Bars go to stderr and switch themselves
off when stderr is not a terminal unless asked for.
"""

from __future__ import annotations

import importlib.util
import sys

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


STAGE_ORDER = ("process", "merge", "select", "finish")


def _stage_rank(stage: str) -> int:
    last = stage.rsplit("-", 1)[-1]
    return STAGE_ORDER.index(last) if last in STAGE_ORDER else len(STAGE_ORDER)


def _stage_bars(stage_totals: dict[str, int], enabled: bool | None) -> dict[str, tqdm]:
    disable = None if enabled is None else not enabled
    stages = sorted(stage_totals, key=_stage_rank)
    return {
        stage: tqdm(
            total=stage_totals[stage],
            desc=stage,
            unit="task",
            position=i,
            leave=True,
            disable=disable,
            file=sys.stderr,
            dynamic_ncols=True,
        )
        for i, stage in enumerate(stages)
    }


def wait_with_progress(futures: list, enabled: bool | None = None) -> None:
    """Block until every future is done, advancing one bar per key stage.

    ``futures``: a list of ``distributed.Future`` for every task of the
    graph. The list is emptied and each future released as soon as it
    completes (its dependents keep what they need), so intermediate partials
    don't stay pinned in worker memory; keep your own references to the
    futures whose results you want. An errored future raises here.
    """
    from distributed import as_completed

    totals: dict[str, int] = {}
    for f in futures:
        totals[key_split(f.key)] = totals.get(key_split(f.key), 0) + 1
    bars = _stage_bars(totals, enabled)
    ac = as_completed(futures)
    futures.clear()
    try:
        for f in ac:
            if f.status == "error":
                f.result()  # raises the task's exception
            bars[key_split(f.key)].update(1)
            del f
    finally:
        for bar in bars.values():
            bar.close()


class StageProgress(Callback):
    """The same bars for Dask's local schedulers (no ``distributed.Client``)."""

    def __init__(self, enabled: bool | None = None):
        super().__init__()
        self.enabled = enabled
        self.bars: dict[str, tqdm] = {}

    def _start_state(self, dsk, state):
        totals: dict[str, int] = {}
        for key in dsk:
            totals[key_split(key)] = totals.get(key_split(key), 0) + 1
        self.bars = _stage_bars(totals, self.enabled)

    def _posttask(self, key, result, dsk, state, worker_id):
        self.bars[key_split(key)].update(1)

    def _finish(self, dsk, state, errored):
        for bar in self.bars.values():
            bar.close()

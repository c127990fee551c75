"""Submit and walk away: run a job's driver on the cluster, not in the client.

``handle = submit(job_fn, params, client, run_dir=...)`` starts
``job_fn(params, client)`` as a long-running task: it secedes from its worker
thread (``distributed.secede``), so the graphs it submits get every task slot, and
it is marked ``fire_and_forget``, so it keeps running when the submitting
client disconnects. The driver's status updates (every
:func:`~hetero_dask.runtime.checkpoint.write_status` call) are published in a
``distributed.Variable`` named after the job and written to
``RUN_DIR/status.json``; a later client reattaches with
:meth:`JobHandle.attach` or just reads the run directory
(``hetero-dask status RUN_DIR``).

Contract for ``job_fn``: a module-level function (workers import it by
name) taking ``(params, client)`` and returning a small JSON-serialisable
summary (result paths, resolutions). It should resume from the run
directory's last checkpoint: if the worker holding the driver dies, Dask
restarts the driver on another worker.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distributed import Client, Future, Variable, fire_and_forget, get_worker, secede

from hetero_dask.runtime.checkpoint import STATUS_SINK, read_status

TERMINAL_STATES = ("done", "failed", "cancelled")


def _variable_name(job_id: str) -> str:
    return f"hetero-dask-job-{job_id}"


def _drive(job_fn: Callable, params: Any, job_id: str) -> Any:
    """The driver task: secede, run the job with its own client, publish its status."""
    worker = get_worker()
    # Leave the thread pool so the job's own tasks get every slot. A dedicated client
    # (not worker_client) because an in-process worker would otherwise share, and die
    # with, the submitting client.
    secede()
    with Client(worker.scheduler.address, security=worker.security, set_as_default=False) as client:
        var = Variable(_variable_name(job_id), client=client)
        last: dict = {"job_id": job_id, "state": "running"}
        var.set(last)

        def publish(status: dict) -> None:
            last.clear()
            last.update(status, job_id=job_id)
            var.set(dict(last))

        token = STATUS_SINK.set(publish)
        try:
            result = job_fn(params, client)
        except BaseException as exc:
            var.set({**last, "state": "failed", "error": f"{type(exc).__name__}: {exc}"})
            raise
        finally:
            STATUS_SINK.reset(token)
        var.set({**last, "state": "done", "result": result})
        return result


@dataclass
class JobHandle:
    """A job running on the cluster (see :func:`submit`)."""

    job_id: str
    client: Client
    run_dir: Path | None = None
    future: Future | None = None

    @classmethod
    def attach(
        cls, job_id: str, client: Client, run_dir: str | os.PathLike | None = None
    ) -> JobHandle:
        """Reattach to a job submitted earlier (possibly by a client that is gone)."""
        return cls(job_id, client, Path(run_dir) if run_dir else None)

    def status(self) -> dict:
        """Latest status: state, iteration, n_iterations, message, results; ``{"state": "unknown"}``
        when neither the scheduler nor the run directory has heard of the job."""
        try:
            status = Variable(_variable_name(self.job_id), client=self.client).get(timeout=0)
        except (TimeoutError, asyncio.TimeoutError):  # distinct before Python 3.11
            status = None
        if status is None and self.run_dir is not None:
            status = read_status(self.run_dir)
        if status is None:
            status = {"job_id": self.job_id, "state": "unknown"}
        if self.future is not None and self.future.status in ("error", "cancelled"):
            status = {**status, "state": "failed" if self.future.status == "error" else "cancelled"}
        return status

    def progress(self) -> tuple[int | None, int | None]:
        """(iteration, n_iterations) from the latest status (None where not reported yet)."""
        s = self.status()
        return s.get("iteration"), s.get("n_iterations")

    def done(self) -> bool:
        return self.status()["state"] in TERMINAL_STATES

    def result(self, timeout: float | None = None, poll_s: float = 0.5) -> Any:
        """Wait for the job and return its summary; raise ``RuntimeError`` if it failed."""
        if self.future is not None:
            return self.future.result(timeout=timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            s = self.status()
            if s["state"] == "done":
                return s.get("result")
            if s["state"] in ("failed", "cancelled"):
                raise RuntimeError(f"job {self.job_id} {s['state']}: {s.get('error', '')}")
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {self.job_id} still {s['state']} after {timeout} s")
            time.sleep(poll_s)

    def cancel(self) -> None:
        """Stop the driver (tasks it already submitted finish or are released)."""
        if self.future is not None:
            self.future.cancel(force=True)
        else:
            self.client.cancel(
                [Future(f"hetero-dask-driver-{self.job_id}", client=self.client)], force=True
            )


def submit(
    job_fn: Callable[[Any, Client], Any],
    params: Any,
    client: Client,
    run_dir: str | os.PathLike | None = None,
    job_id: str | None = None,
) -> JobHandle:
    """Run ``job_fn(params, client)`` on the cluster as a detached driver; return its handle.

    ``run_dir``: the job's run directory, for status when the scheduler no
    longer knows the job. ``job_id`` defaults to the function name plus a
    random suffix; it names the driver task and the status variable.
    """
    job_id = job_id or f"{getattr(job_fn, '__name__', 'job')}-{uuid.uuid4().hex[:8]}"
    future = client.submit(
        _drive, job_fn, params, job_id, key=f"hetero-dask-driver-{job_id}", pure=False
    )
    fire_and_forget(future)
    return JobHandle(job_id, client, Path(run_dir) if run_dir else None, future)

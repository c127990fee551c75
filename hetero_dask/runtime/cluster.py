"""Where jobs run: an existing Dask cluster, or one started on this machine.

:func:`open_client` is the one entry point jobs use. It yields a
``distributed.Client`` connected to, in order of preference:

1. a ``Client`` the caller already holds (passed through, not closed);
2. ``scheduler="tls://host:8786"`` (an address or a scheduler file);
3. a ``dask_cuda.LocalCUDACluster`` (one worker per GPU, RMM pool, CuPy
   allocating from RMM) when GPUs were asked for, or are visible and
   dask-cuda is installed;
4. a ``distributed.LocalCluster`` of single-threaded worker processes sized
   to the machine.

Worker processes get one task thread each; the BLAS library in each worker
gets the cores left to it (``cores // (workers * threads)``), so the E-step's
matrix products use every core without oversubscription.

The project's Dask configuration (``deploy/dask.yaml``: memory thresholds,
allowed failures, timeouts, worker saturation) is loaded as defaults, so a
user's own Dask configuration still wins.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dask
import yaml
from distributed import Client, LocalCluster
from distributed.security import Security

from hetero_dask.runtime.signals import starting_workers

# Found next to the package in a source checkout; the Docker image installs the same
# file as /etc/dask/hetero_dask.yaml, which Dask reads on its own.
PROJECT_CONFIG = Path(__file__).resolve().parents[2] / "deploy" / "dask.yaml"
CONFIG_ENV = "HETERO_DASK_DASK_CONFIG"

BLAS_ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
# Dask's nanny sets MALLOC_TRIM_THRESHOLD_ (64 KiB), which also stops glibc from raising its mmap
# threshold: every array over 128 KiB is then a fresh mapping, page-faulted on each use (the
# E-step ran 2-3x slower in a worker). glibc's own dynamic ceiling, 32 MiB, restores their reuse.
# The trim threshold itself gives the free top of each heap back to the system at every free, so
# the next arrays of a task fault their pages in again: at 256 MiB the freed heap stays for reuse
# (box 128's E-steps and M-steps run faster: benchmarks/results/fixed_cost.md).
# Set in code as well as in deploy/dask.yaml, which an installed package does not find.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(256 << 20)}


def load_project_config(path: str | os.PathLike | None = None) -> dict:
    """Load the project's Dask configuration as defaults; return what was loaded.

    ``path`` defaults to ``$HETERO_DASK_DASK_CONFIG`` or the checkout's
    ``deploy/dask.yaml``; a missing default file loads nothing (an installed
    wheel relies on Dask's own config search, e.g. /etc/dask).
    """
    explicit = path is not None or CONFIG_ENV in os.environ
    path = Path(path or os.environ.get(CONFIG_ENV, PROJECT_CONFIG))
    if not path.is_file():
        if explicit:
            raise FileNotFoundError(f"Dask configuration file {path} does not exist")
        return {}
    with open(path) as f:
        cfg = yaml.safe_load(f) or {}
    if not isinstance(cfg, dict):
        raise ValueError(
            f"{path}: expected a YAML mapping of Dask settings, got {type(cfg).__name__}"
        )
    dask.config.update_defaults(cfg)
    return cfg


def available_cores() -> int:
    """CPU cores this process may use (affinity mask, cgroup-unaware fallback)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def blas_threads_per_worker(
    n_workers: int, threads_per_worker: int = 1, cores: int | None = None
) -> int:
    """BLAS threads per worker process so that workers x tasks x BLAS <= cores."""
    cores = available_cores() if cores is None else cores
    return max(1, cores // max(1, n_workers * threads_per_worker))


def make_security(
    tls_ca_file: str | os.PathLike,
    tls_cert: str | os.PathLike,
    tls_key: str | os.PathLike | None = None,
) -> Security:
    """A ``Security`` using one CA and one certificate/key for every role.

    Client, scheduler and workers present the same certificate, signed by
    ``tls_ca_file``, and accept only peers signed by it; encryption is
    required. ``tls_key`` may be omitted when the key is inside ``tls_cert``.
    """
    for what, p in (("CA file", tls_ca_file), ("certificate", tls_cert), ("key", tls_key)):
        if p is not None and not Path(p).is_file():
            raise FileNotFoundError(f"TLS {what} {p} does not exist")
    ca, cert = str(tls_ca_file), str(tls_cert)
    key = str(tls_key) if tls_key is not None else None
    return Security(
        require_encryption=True,
        tls_ca_file=ca,
        tls_client_cert=cert,
        tls_client_key=key,
        tls_scheduler_cert=cert,
        tls_scheduler_key=key,
        tls_worker_cert=cert,
        tls_worker_key=key,
    )


def _visible_gpus() -> list[int]:
    from hetero_dask.core.backend import gpu_available

    if not gpu_available():
        return []
    import cupy

    return list(range(cupy.cuda.runtime.getDeviceCount()))


def _have_dask_cuda() -> bool:
    try:
        import dask_cuda  # noqa: F401
    except ImportError:
        return False
    return True


def _gpu_ids(gpus) -> list[int]:
    """``gpus``: None (all visible when dask-cuda is installed), a count
    (0 = CPU only) or a list of device ids."""
    if gpus is None:
        return _visible_gpus() if _have_dask_cuda() else []
    if isinstance(gpus, str):
        gpus = int(gpus)
    if isinstance(gpus, int):
        visible = _visible_gpus()
        if gpus > len(visible):
            raise ValueError(f"--gpus {gpus}: {gpus} GPU(s) requested but {len(visible)} visible")
        return visible[:gpus]
    return [int(g) for g in gpus]


def make_local_cluster(
    workers: int | None = None,
    threads_per_worker: int = 1,
    gpus=None,
    security: Security | None = None,
    dashboard: bool = True,
    processes: bool = True,
    host: str | None = None,
    scheduler_port: int = 0,
    memory_limit: str | float = "auto",
):
    """Start a local cluster with the project's configuration (see module doc).

    Returns a ``LocalCluster`` or ``dask_cuda.LocalCUDACluster``; the caller
    closes it. ``processes=False`` runs workers as threads in this process
    (fast start, for tests and small jobs; BLAS threads are then whatever
    this process has).
    """
    load_project_config()
    protocol = "tls://" if security is not None and security.require_encryption else None
    common = dict(
        security=security,
        protocol=protocol,
        # A free port even without a dashboard: the scheduler's HTTP server (health,
        # metrics) binds one anyway, and defaults to 8787, which a second cluster finds taken.
        dashboard_address=":0",
        scheduler_kwargs={"dashboard": dashboard},
        host=host,
        scheduler_port=scheduler_port,
        memory_limit=memory_limit,
    )
    gpu_ids = _gpu_ids(gpus)
    if gpu_ids:
        if not _have_dask_cuda():
            raise ValueError(
                "GPUs requested but dask-cuda is not installed (pip install 'hetero_dask[gpu]')"
            )
        from dask_cuda import LocalCUDACluster

        blas = blas_threads_per_worker(len(gpu_ids), 1)
        with _worker_env(blas), starting_workers():
            return LocalCUDACluster(
                CUDA_VISIBLE_DEVICES=gpu_ids,
                threads_per_worker=1,
                rmm_pool_size=dask.config.get("hetero_dask.rmm-pool-size", 0.8),
                rmm_allocator_external_lib_list=["cupy"],
                **common,
            )
    n = workers or max(1, available_cores() // threads_per_worker)
    blas = blas_threads_per_worker(n, threads_per_worker)
    # Worker processes inherit SIGINT and SIGTERM ignored: the driver handles them (dist.signals).
    with _worker_env(blas), starting_workers():
        return LocalCluster(
            n_workers=n,
            threads_per_worker=threads_per_worker,
            processes=processes,
            **common,
        )


@contextlib.contextmanager
def _worker_env(n_threads: int) -> Iterator[None]:
    """The workers' BLAS thread count and :data:`MALLOC_ENV`, for the processes started inside."""
    # Must be in place before the worker process imports numpy, hence pre-spawn. The nanny
    # prefers this process's environment to the config and leaves its pre-spawn values in
    # it: set both, and restore the environment, or the next cluster gets this one's count.
    values = {**dict.fromkeys(BLAS_ENV_VARS, str(n_threads)), **MALLOC_ENV}
    settings = {f"distributed.nanny.pre-spawn-environ.{v}": value for v, value in values.items()}
    saved = {v: os.environ.get(v) for v in values}
    os.environ.update(values)
    try:
        with dask.config.set(settings):
            yield
    finally:
        for v, old in saved.items():
            if old is None:
                os.environ.pop(v, None)
            else:
                os.environ[v] = old


@contextlib.contextmanager
def open_client(
    scheduler: Client | str | None = None,
    workers: int | None = None,
    threads_per_worker: int = 1,
    gpus=None,
    security: Security | None = None,
    dashboard: bool = True,
    processes: bool = True,
    quiet: bool = False,
) -> Iterator[Client]:
    """Yield a ``Client`` for a job (see module doc for the order of choices).

    ``scheduler``: an existing ``Client`` (yielded as is and left open), a
    scheduler address (``tcp://`` or ``tls://``) or the path of a scheduler
    JSON file; None starts a local cluster of ``workers`` workers, closed on
    exit. The dashboard address is printed unless ``quiet`` (or no dashboard).
    """
    if isinstance(scheduler, Client):
        yield scheduler
        return
    load_project_config()
    if scheduler is not None:
        target = (
            {"scheduler_file": scheduler} if Path(scheduler).is_file() else {"address": scheduler}
        )
        with Client(security=security, **target) as client:
            _announce(client, quiet)
            with _quiet_when_interrupted():
                yield client
        return
    cluster = make_local_cluster(
        workers=workers,
        threads_per_worker=threads_per_worker,
        gpus=gpus,
        security=security,
        dashboard=dashboard,
        processes=processes,
    )
    with cluster, Client(cluster, security=security) as client:
        client.run(_quiet_cancellations)
        _announce(client, quiet or not dashboard)
        with _quiet_when_interrupted():
            yield client


@contextlib.contextmanager
def _quiet_when_interrupted() -> Iterator[None]:
    """After Ctrl-C or SIGTERM the client and cluster close under running tasks: what Dask,
    its event loop and the nanny then log is expected, not for the user (who gets one line)."""
    try:
        yield
    except KeyboardInterrupt:
        names = ["asyncio", "tornado", "distributed"]
        names += [n for n in logging.root.manager.loggerDict if n.startswith("distributed.")]
        for name in names:
            logging.getLogger(name).setLevel(logging.CRITICAL)
        raise


def _quiet_cancellations() -> None:
    """On a worker of a job's own cluster: no warning for each task cancelled when the job
    stops (Ctrl-C) and closes the cluster under it."""
    logging.getLogger("distributed.worker.state_machine").setLevel(logging.ERROR)


def _announce(client: Client, quiet: bool) -> None:
    if quiet:
        return
    from hetero_dask.runtime.progress import print_dashboard

    print_dashboard(client)


def add_cluster_arguments(parser: argparse.ArgumentParser) -> None:
    """The cluster options every job command shares."""
    g = parser.add_argument_group("cluster")
    g.add_argument(
        "--scheduler",
        metavar="ADDRESS",
        help="use an existing Dask scheduler "
        "(tcp://host:8786, tls://host:8786, or a scheduler JSON file)",
    )
    g.add_argument(
        "--workers",
        type=int,
        help="local cluster: number of worker processes (default: one per core, or one per GPU)",
    )
    g.add_argument(
        "--threads-per-worker",
        type=int,
        default=1,
        help="local cluster: task threads per worker (default 1; BLAS gets the rest)",
    )
    g.add_argument(
        "--gpus",
        type=int,
        help="local cluster: number of GPU workers, 0 for CPU only "
        "(default: every visible GPU when dask-cuda is installed; restrict with "
        "CUDA_VISIBLE_DEVICES)",
    )
    g.add_argument(
        "--tls-ca", help="TLS CA certificate (PEM); with --tls-cert makes all traffic TLS"
    )
    g.add_argument("--tls-cert", help="TLS certificate (PEM) for this client and local workers")
    g.add_argument("--tls-key", help="TLS private key (PEM), if not inside --tls-cert")
    g.add_argument("--no-dashboard", action="store_true", help="local cluster: no dashboard")


def security_from_args(args: argparse.Namespace) -> Security | None:
    """``Security`` from ``--tls-ca/--tls-cert/--tls-key``, or None (then Dask config applies)."""
    ca, cert, key = (
        getattr(args, "tls_ca", None),
        getattr(args, "tls_cert", None),
        getattr(args, "tls_key", None),
    )
    if ca is None and cert is None:
        if key is not None:
            raise ValueError("--tls-key needs --tls-ca and --tls-cert")
        return None
    if ca is None or cert is None:
        raise ValueError("TLS needs both --tls-ca and --tls-cert")
    return make_security(ca, cert, key)


@dataclass(frozen=True)
class ClusterSpec:
    """Where a job is to run, decided before it starts: :func:`open_client`'s arguments.

    Jobs take one as ``client``, check every input, and only then start the
    cluster (:func:`job_client`), so a mistake costs no cluster start.
    """

    scheduler: str | None = None
    workers: int | None = None
    threads_per_worker: int = 1
    gpus: int | None = None
    security: Security | None = None
    dashboard: bool = True
    quiet: bool = False

    def open(self):
        return open_client(
            scheduler=self.scheduler,
            workers=self.workers,
            threads_per_worker=self.threads_per_worker,
            gpus=self.gpus,
            security=self.security,
            dashboard=self.dashboard,
            quiet=self.quiet,
        )


@contextlib.contextmanager
def job_client(client) -> Iterator[Client | None]:
    """The client a job runs on: None (this process), a ``Client`` (as is), or a
    :class:`ClusterSpec` (started here, closed on exit)."""
    if isinstance(client, ClusterSpec):
        with client.open() as c:
            yield c
    else:
        yield client


def cluster_from_args(args: argparse.Namespace, quiet: bool = False) -> ClusterSpec:
    """The :class:`ClusterSpec` of :func:`add_cluster_arguments`' options, checked (nothing started)."""
    for flag, value in (("--workers", args.workers), ("--threads-per-worker", args.threads_per_worker)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} {value}: expected a number >= 1")
    if args.gpus is not None:
        if args.gpus < 0:
            raise ValueError(f"--gpus {args.gpus}: expected 0 (CPU only) or a number of GPUs")
        if args.scheduler is None and args.gpus > 0:
            _gpu_ids(args.gpus)  # refuses more GPUs than are visible
    return ClusterSpec(
        scheduler=args.scheduler,
        workers=args.workers,
        threads_per_worker=args.threads_per_worker,
        gpus=args.gpus,
        security=security_from_args(args),
        dashboard=not args.no_dashboard,
        quiet=quiet,
    )


def client_from_args(args: argparse.Namespace, quiet: bool = False):
    """``open_client`` configured from :func:`add_cluster_arguments`' options."""
    return cluster_from_args(args, quiet).open()

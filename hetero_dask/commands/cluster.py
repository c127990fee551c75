"""Start a Dask scheduler and workers on this machine with the project's configuration.

Runs until interrupted (Ctrl-C). Jobs on this or another machine use it with
``--scheduler ADDRESS`` (or ``--scheduler FILE`` with ``--scheduler-file``).
With ``--tls-ca/--tls-cert/--tls-key`` every connection is TLS and clients
must present a certificate signed by the same CA.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from hetero_dask.runtime.cluster import make_local_cluster, security_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--workers", type=int, help="worker processes (default: one per core, or per GPU)"
    )
    parser.add_argument(
        "--threads-per-worker", type=int, default=1, help="task threads per worker (default 1)"
    )
    parser.add_argument(
        "--gpus",
        type=int,
        help="GPU workers, 0 for CPU only (default: every visible GPU when dask-cuda is installed)",
    )
    parser.add_argument(
        "--host", default=None, help="interface/host to listen on (default: localhost)"
    )
    parser.add_argument(
        "--port", type=int, default=8786, help="scheduler port (default 8786; 0 = any)"
    )
    parser.add_argument(
        "--scheduler-file", type=Path, help="write the scheduler's address here (JSON)"
    )
    parser.add_argument("--tls-ca", help="TLS CA certificate (PEM)")
    parser.add_argument("--tls-cert", help="TLS certificate (PEM) for scheduler and workers")
    parser.add_argument("--tls-key", help="TLS private key (PEM), if not inside --tls-cert")
    parser.add_argument("--no-dashboard", action="store_true", help="do not start the dashboard")
    parser.add_argument("--run-for", type=float, default=None, help=argparse.SUPPRESS)  # tests


def main(args: argparse.Namespace) -> int:
    cluster = make_local_cluster(
        workers=args.workers,
        threads_per_worker=args.threads_per_worker,
        gpus=args.gpus,
        security=security_from_args(args),
        dashboard=not args.no_dashboard,
        host=args.host,
        scheduler_port=args.port,
    )
    with cluster:
        address = cluster.scheduler_address
        if args.scheduler_file:
            args.scheduler_file.write_text(json.dumps({"address": address}))
        n = len(cluster.workers)
        link = "off" if args.no_dashboard else cluster.dashboard_link
        print(f"Scheduler {address} with {n} worker(s); dashboard: {link}", flush=True)
        print(
            f"Use it with: hetero-dask <job> ... --scheduler {address}  (Ctrl-C stops it)",
            flush=True,
        )
        deadline = None if args.run_for is None else time.monotonic() + args.run_for
        try:
            while deadline is None or time.monotonic() < deadline:
                time.sleep(0.5)
        except KeyboardInterrupt:
            print("stopping", flush=True)
    return 0

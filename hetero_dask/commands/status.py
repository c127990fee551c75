"""Report on a run directory: state, iteration, last checkpoint, results."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from hetero_dask.dist.checkpoint import read_marker, read_status


def gather(run_dir: Path) -> dict:
    """Status and checkpoint marker of ``run_dir`` in one dict."""
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {run_dir} does not exist")
    status = read_status(run_dir)
    marker = read_marker(run_dir)
    if status is None and marker is None:
        raise FileNotFoundError(
            f"{run_dir} has neither status.json nor checkpoint.json: not a run directory"
        )
    return {
        "run_dir": str(run_dir),
        "status": status or {},
        "last_complete_iteration": None if marker is None else marker["last_complete_iteration"],
        "checkpoint": marker,
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path, help="the job's output/run directory")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")


def main(args: argparse.Namespace) -> int:
    info = gather(args.run_dir)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    s = info["status"]
    it, n_it = s.get("iteration"), s.get("n_iterations")
    progress = "" if it is None else f" iteration {it}" + ("" if n_it is None else f" of {n_it}")
    print(f"{info['run_dir']}: {s.get('job', 'job')} {s.get('state', 'unknown')}{progress}")
    if s.get("message"):
        print(f"  {s['message']}")
    if s.get("error"):
        print(f"  error: {s['error']}")
    last = info["last_complete_iteration"]
    print(f"  last complete iteration: {'none' if last is None else last}")
    if s.get("updated"):
        print(f"  updated {s['updated']} on {s.get('host', '?')} (pid {s.get('pid', '?')})")
    for name, path in (s.get("results") or {}).items():
        print(f"  {name}: {path}")
    return 0

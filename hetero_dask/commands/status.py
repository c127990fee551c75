"""Say where a job's run stands: hetero-dask status OUT (the job's --out folder, or OUT/run).

Running, finished (with the job's summary and its report), interrupted or failed
(and how to go on), and how many iterations are done of at most how many.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from hetero_dask.jobs.preflight import JOB_TITLES, describe_run
from hetero_dask.runtime.checkpoint import read_marker, read_status


def gather(path: Path) -> dict:
    """Status, checkpoint marker and (when finished) report of the run in ``path`` (OUT or OUT/run)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} does not exist (expected a job's --out folder)")
    run_dir = path / "run" if (path / "run").is_dir() else path
    out = run_dir.parent if run_dir.name == "run" else run_dir
    status = read_status(run_dir)
    marker = read_marker(run_dir)
    if status is None and marker is None:
        raise FileNotFoundError(
            f"{path} holds no run (no run/status.json): expected the --out folder of a "
            "refine, reconstruct or regroup job"
        )
    report = None
    if (status or {}).get("state") == "done" and (out / "report.json").is_file():
        report = json.loads((out / "report.json").read_text())
    return {
        "out": str(out),
        "run_dir": str(run_dir),
        "status": status or {},
        "last_complete_iteration": None if marker is None else marker["last_complete_iteration"],
        "checkpoint": marker,
        "report": report,
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", type=Path, help="the job's --out folder (or its run/ folder)")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")


def main(args: argparse.Namespace) -> int:
    from hetero_dask.report.summary import summary_lines

    info = gather(args.out)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    s = info["status"]
    title = JOB_TITLES.get(s.get("job"), s.get("job", "job"))
    print(f"{info['out']}: {title}, {describe_run(s)}")
    state = s.get("state")
    if info["report"] is not None:
        print("\n".join(summary_lines(info["report"], info["out"])))
    elif state in ("interrupted", "failed") or (state == "running" and "stopped" in describe_run(s)):
        if s.get("error"):
            print(f"  error: {s['error']}")
        done = s.get("iteration")
        if done is not None:
            print(f"  {done} iteration(s) completed and kept")
        how = ("run the same command with --resume to continue it" if s.get("job") == "refine"
               else "run the same command again")
        print(f"  {how}")
    elif state == "running":
        done = s.get("iteration")
        if done is not None:
            print(f"  {done} iteration(s) completed")
    if s.get("updated"):
        print(f"  last update {s['updated']} on {s.get('host', '?')} (process {s.get('pid', '?')})")
    return 0

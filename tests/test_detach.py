"""``hetero-dask refine ... --scheduler ADDR --detach``: submit and walk away.

The CLI runs in a subprocess that exits right after submitting (its client
disconnects); the refinement must still finish on the cluster, and
``hetero-dask status OUT`` must follow it from the run directory.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import pytest

from hetero_dask import cli
from hetero_dask.commands.status import gather
from hetero_dask.io.cs import read_cs
from hetero_dask.phantoms import moving_domain_phantoms
from hetero_dask.simulate import simulate, write_references, write_simulation

BOX, PSIZE = 32, 4.0


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    d = tmp_path_factory.mktemp("detach")
    vols = moving_domain_phantoms(BOX, PSIZE, n_classes=2)
    sim = simulate(vols, PSIZE, 150, snr=0.5, seed=3, shift_range_px=1.0)
    write_simulation(d / "sim", sim, vols)
    return d, str(d / "sim" / "particles.cs"), write_references(d, vols, PSIZE)


def hetero_dask(*argv, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hetero_dask.cli", *argv], capture_output=True, text=True,
                          timeout=timeout)


def test_detach_survives_client_exit_and_status_follows(dataset):
    from distributed import Client

    from hetero_dask.runtime.cluster import make_local_cluster
    from hetero_dask.runtime.submit import JobHandle

    d, particles, refs = dataset
    out = d / "out"
    with make_local_cluster(workers=2, processes=True, dashboard=False) as cluster:
        proc = hetero_dask("refine", "--particles", particles, "--volumes", *refs, "--out", str(out),
                           "--box", "32", "--batch-size", "100", "--iterations", "4", "--random-iterations", "1",
                           "--max-order", "2",  # what is tested is the detaching, not the poses
                           "--scheduler", cluster.scheduler_address, "--detach")
        assert proc.returncode == 0, proc.stderr
        # The command has exited: its client is gone, the job must go on.
        job_id = re.search(r"^job (\S+) submitted", proc.stdout, re.M).group(1)
        run_dir = out / "run"
        assert f"run dir {run_dir}" in proc.stdout
        assert not (out / "report.json").exists(), "the command waited for the job"

        deadline = time.monotonic() + 150
        seen_running, info = False, None
        while time.monotonic() < deadline:
            if (run_dir / "status.json").is_file():
                info = gather(run_dir)  # what `hetero-dask status --json` prints
                seen_running |= info["status"].get("state") == "running"
                if info["status"].get("state") in ("done", "failed"):
                    break
            time.sleep(1.0)
        assert info["status"]["state"] == "done", info
        assert seen_running, "status never showed the job running"
        assert info["last_complete_iteration"] == 3 and info["status"]["job"] == "refine"
        assert info["status"]["results"]["report"] == str(out / "report.json")

        assert json.loads(hetero_dask("status", str(run_dir), "--json").stdout)["status"]["state"] == "done"
        text = hetero_dask("status", str(out)).stdout
        assert text.startswith(f"{out}: Heterogeneous Refinement, finished\nHeterogeneous Refinement: ")
        assert f"report: {out / 'report.html'}" in text

        # A new client reattaches to the job by id and gets its summary.
        with Client(cluster) as client:
            handle = JobHandle.attach(job_id, client, run_dir=run_dir)
            assert handle.status()["state"] == "done"
            assert handle.result(timeout=10)["report"] == str(out / "report.json")

    assert len(read_cs(out / "particles.cs")) == 300
    assert (out / "class_1" / "map.mrc").is_file()


def test_detach_needs_a_scheduler(dataset, capsys):
    d, particles, refs = dataset
    rc = cli.main(["refine", "--particles", particles, "--volumes", *refs, "--out", str(d / "x"), "--detach"])
    assert rc == 2
    assert "--detach needs --scheduler" in capsys.readouterr().err
    assert not (d / "x").exists()

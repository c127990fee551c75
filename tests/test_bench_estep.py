"""The E-step benchmark's late-iteration section times each pose count it is given."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_estep.py"


@pytest.fixture(scope="module")
def bench(load_benchmark):
    return load_benchmark("bench_estep")


def test_late_section_runs_once_per_pose_count(bench, capsys):
    bench.late_stage(8, 2, 1, [2, 16])
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("(3)")]
    assert len(lines) == 2
    assert "2 poses per class" in lines[0] and "16 poses per class" in lines[1]
    scored = [int(ln.split("s), ")[-1].split()[0]) for ln in lines]
    # Each kept parent brings 8 children x 9 shifts per class: more parents, more poses scored.
    assert scored[1] > scored[0]


@pytest.mark.parametrize("value", ["0", "-3", "many"])
def test_late_poses_below_one_is_refused_before_any_work(value):
    proc = subprocess.run([sys.executable, str(BENCH), "--late-poses", value], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert "--late-poses" in proc.stderr and "expected a whole number >= 1" in proc.stderr
    assert "(1)" not in proc.stdout

"""The realistic benchmark's table and plot tell a finished RELION run from one that stopped.

A RELION run that was stopped (a machine restarted, a session over) is scored at its last
finished iteration; that accuracy is not RELION's answer and must not read as one.
"""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def bench(load_benchmark):
    return load_benchmark("bench_realistic")


def _row(scenario: str, seed: int, relion: dict) -> dict:
    maps = [{"class": 0, "state": 0, "correlation_8A": 0.8}, {"class": 1, "state": 1, "correlation_8A": 0.9}]
    cal = {"ece": 0.03, "count": [1] * 10, "mean_posterior": [0.5] * 10, "fraction_right": [0.5] * 10}
    ours = {"accuracy": 0.9, "junk_recall": None, "calibration": cal, "maps": maps, "wall_s": 60.0, "code": "abc"}
    return {"scenario": scenario, "seed": seed, "variant": "{}", "ours": ours,
            "relion": {"extrapolated": False, "maps": maps, "wall_s": None, **relion}}


def test_an_unfinished_run_is_labelled_with_the_iterations_it_reached(bench, tmp_path):
    rows = [
        _row("finished", 10, {"accuracy": 0.684, "iterations": 8, "measured_iterations": 8}),
        _row("stopped", 10, {"accuracy": 0.51, "iterations": 8, "measured_iterations": 1}),
        _row("stopped_among", 10, {"accuracy": 0.6, "iterations": 8, "measured_iterations": 8}),
        _row("stopped_among", 11, {"accuracy": 0.5, "iterations": 8, "measured_iterations": 3}),
        # The large scenario's entry is extrapolated from subsets: no iteration was run to the end.
        _row("extrapolated", 10, {"accuracy": None, "iterations": 8, "measured_iterations": 0,
                                  "extrapolated": True}),
    ]
    rows[-1]["relion"].pop("accuracy")
    bench.write_table(rows, tmp_path / "results.md")
    table = {line.split(" | ")[0][2:]: line.split(" | ")[5]
             for line in (tmp_path / "results.md").read_text().splitlines()[2:]}
    assert table["finished"] == "0.684"
    assert table["stopped"] == "0.510 after 1 of its 8 iterations"
    assert table["stopped_among"] == "0.550 (unfinished runs among them)"
    assert table["extrapolated"] == "-"
    bench.write_plots(rows, tmp_path)
    assert (tmp_path / "accuracy.png").stat().st_size > 0


def test_a_stopped_runs_settings_come_from_relions_optimiser_file(bench):
    # Written by RELION 3.1.0 (the starfile project's tutorial run, tests/data/NOTICE.md).
    cmd, planned = bench.relion_run_settings(
        Path(__file__).parent / "data" / "relion" / "run_it025_optimiser_3D.star")
    assert planned == 25
    assert cmd.startswith("relion_refine --o Class3D/job020/run --i Extract/job016/particles.star ")


def test_record_never_replaces_a_finished_run_or_one_that_got_further(bench):
    finished = _row("a", 10, {"accuracy": 0.684, "iterations": 8, "measured_iterations": 8})
    stopped = _row("b", 10, {"accuracy": 0.51, "iterations": 8, "measured_iterations": 3})
    rows = [finished, stopped]
    assert "finished" in bench._recorded_further(
        rows, _row("a", 10, {"accuracy": 0.5, "iterations": 8, "measured_iterations": 2}))
    assert "after 3" in bench._recorded_further(
        rows, _row("b", 10, {"accuracy": 0.5, "iterations": 8, "measured_iterations": 1}))
    # A run that got further, or a case with no RELION entry yet, is recorded.
    assert bench._recorded_further(
        rows, _row("b", 10, {"accuracy": 0.55, "iterations": 8, "measured_iterations": 4})) is None
    assert bench._recorded_further(
        rows, _row("b", 11, {"accuracy": 0.5, "iterations": 8, "measured_iterations": 1})) is None

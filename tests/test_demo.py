"""The demo end to end at CI size: simulated truth vs recovered classes, outputs of every job."""

from __future__ import annotations

import json

import numpy as np
import pytest

from hetero_dask.jobs.demo import permutation_accuracy, purity


def test_accuracy_measures():
    truth = np.array([0, 0, 0, 1, 1, 1])
    assert permutation_accuracy(1 - truth, truth) == 1.0
    assert permutation_accuracy(np.array([0, 0, 1, 1, 1, 1]), truth) == pytest.approx(5 / 6)
    # three predicted classes, two true: class 2 is mostly state 1
    assert purity(np.array([0, 0, 2, 1, 2, 2]), truth) == pytest.approx(5 / 6)


def test_demo_cli_recovers_classes(tmp_path):
    from hetero_dask.cli import main

    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--size", "ci", "--workers", "2", "--quiet"]) == 0
    summary = json.loads((out / "demo_summary.json").read_text())
    assert summary["classes_recovered"] is True
    assert summary["accuracy"] >= 0.85 > summary["chance_accuracy"] + 0.3
    assert summary["refine"]["class_purity"] >= 0.85
    # the two starting maps made from the two true states end in different superclasses
    assert sorted(summary["regroup"]["superclass_of_class"][:2]) == [0, 1]
    for job in ("refine", "regroup", "reconstruct"):
        assert (out / job / "report.json").is_file(), job
        page = (out / job / "report.html").read_text()
        assert "data:image/png;base64," in page, job
    for k in range(2):
        assert (out / "reconstruct" / f"class_{k}" / "map.mrc").is_file()
    for name in ("particles.cs", "particles.star", "volumes.zip"):
        assert (out / "refine" / name).is_file(), name

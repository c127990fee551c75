"""The demo end to end at CI size: simulated truth vs recovered classes, outputs of every job."""

from __future__ import annotations

import base64
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
    maps = {"refine": ["class_maps"], "reconstruct": ["class_maps"], "regroup": ["class_maps", "superclass_maps"]}
    for job in ("refine", "regroup", "reconstruct"):
        assert (out / job / "report.json").is_file(), job
        page = (out / job / "report.html").read_text()
        assert "data:image/png;base64," in page, job
        assert "<h2>Parameters</h2>" in page, job
        # every class map's sections and projections, embedded in the page
        for name in maps[job]:
            png = base64.b64encode((out / job / f"{name}.png").read_bytes()).decode()
            assert png in page, (job, name)
    refine = json.loads((out / "refine" / "report.json").read_text())
    page = (out / "refine" / "report.html").read_text()
    assert "fraction (hard: best class)" in page and "fraction (soft: mean posterior)" in page
    assert abs(sum(c["fraction_soft"] for c in refine["classes"]) - 1) < 1e-5
    # FSC shells beyond the backprojection radius were not computed: null, not 0
    assert all(c["fsc"][-1] is None and c["fsc"][1] > 0.9 for c in refine["classes"])
    for k in range(2):
        assert (out / "reconstruct" / f"class_{k}" / "map.mrc").is_file()
    for name in ("particles.cs", "particles.star", "volumes.zip"):
        assert (out / "refine" / name).is_file(), name

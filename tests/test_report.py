"""Report plots and the self-contained HTML report (rendered in headless Chromium)."""

from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest

from hetero_dask.core.rotations import pose_to_matrix
from hetero_dask.report import (
    Image,
    KeyValues,
    Paragraph,
    Section,
    Table,
    fsc_label,
    orientation_histogram,
    plot_affinity,
    plot_class_changes,
    plot_class_fractions,
    plot_class_table,
    plot_eigenvalues,
    plot_fsc,
    plot_fsc_classes,
    plot_map_views,
    plot_orientation_distribution,
    plot_resolution_history,
    render_html,
    write_html_report,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
BOX, PSIZE_A = 64, 1.5


def _linear_fsc(n_shells: int, zero_at: float) -> np.ndarray:
    """FSC falling linearly from 1 at shell 0 to 0 at ``zero_at``: crosses t at (1 - t) * zero_at."""
    return np.clip(1.0 - np.arange(n_shells) / zero_at, 0.0, 1.0)


def _ball(n: int, centre_zyx, radius: float = 5.0) -> np.ndarray:
    z, y, x = np.indices((n, n, n))
    return (((z - centre_zyx[0]) ** 2 + (y - centre_zyx[1]) ** 2 + (x - centre_zyx[2]) ** 2)
            < radius**2).astype(np.float32)  # fmt: skip


def _make_plots(out: Path) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    n_shells = BOX // 2 + 1
    curves = {"no mask": _linear_fsc(n_shells, 20.0), "tight": _linear_fsc(n_shells, 26.0)}
    superclass = np.array([0, 1, 0, 2, 1, 2, -1])
    affinity = (superclass[:, None] == superclass[None]) + 0.1 * rng.random((7, 7))
    poses = rng.normal(size=(500, 3))
    return {
        "fsc": plot_fsc(curves, PSIZE_A, BOX, out / "fsc.png"),
        "fsc_classes": plot_fsc_classes(
            {"class 0": curves, "class 1": {"no mask": _linear_fsc(n_shells, 15.0)}},
            PSIZE_A,
            BOX,
            out / "fsc_classes.png",
        ),
        "orientations": plot_orientation_distribution(
            {"class 0": pose_to_matrix(poses), "class 1": rng.normal(size=(300, 3))},
            out / "orientations.png",
            weights={"class 0": rng.random(500), "class 1": np.ones(300)},
        ),
        "maps": plot_map_views(
            {"class 0": _ball(24, (12, 12, 12)), "class 1": _ball(24, (12, 8, 16))},
            out / "maps.png",
        ),
        "fractions": plot_class_fractions(rng.dirichlet([1, 1, 1], 8), out / "fractions.png"),
        "resolution": plot_resolution_history(
            20.0 - np.arange(8)[:, None] * [1.0, 1.5], out / "resolution.png"
        ),
        "changes": plot_class_changes(np.geomspace(0.5, 0.01, 8), out / "changes.png"),
        "affinity": plot_affinity(affinity, superclass, out / "affinity.png"),
        "eigenvalues": plot_eigenvalues([0, 0.01, 0.02, 0.6, 0.8, 1.1], out / "eig.png", 3),
        "class_table": plot_class_table(
            [100, 200, 150, 50, 80, 120, 10], superclass, out / "class_table.png"
        ),
    }


@pytest.fixture(scope="module")
def plots(tmp_path_factory) -> dict[str, Path]:
    return _make_plots(tmp_path_factory.mktemp("plots"))


@pytest.mark.parametrize(
    "name",
    [
        "fsc",
        "fsc_classes",
        "orientations",
        "maps",
        "fractions",
        "resolution",
        "changes",
        "affinity",
        "eigenvalues",
        "class_table",
    ],
)
def test_plot_writes_a_nonblank_png(plots, name):
    path = plots[name]
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    pixels = matplotlib.image.imread(path)
    assert pixels.ndim == 3 and min(pixels.shape[:2]) > 200
    assert pixels[..., :3].var() > 1e-3
    # Atomic write: no temporary file left next to it.
    assert [p.name for p in path.parent.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("plot", [plot_class_fractions, plot_resolution_history, plot_class_changes])
def test_history_marks_are_drawn_where_their_iteration_is(plot, tmp_path):
    """A mark (e.g. where EM starts a new round) is a vertical line across the plot whose place
    follows the marked iteration: later iteration, further right (the legend may move aside)."""
    values = np.geomspace(0.5, 0.05, 10)
    if plot is not plot_class_changes:
        values = np.stack([values, 1 - values], axis=1)
    plain = matplotlib.image.imread(plot(values, tmp_path / "plain.png"))

    def line_columns(marks, name):
        marked = matplotlib.image.imread(plot(values, tmp_path / name, marks=marks))
        rows_changed = np.sum(np.any(np.abs(marked - plain) > 0.05, axis=2), axis=0)
        # a column changed over half the figure's height is the line (the legend is shorter)
        line = np.flatnonzero(rows_changed > plain.shape[0] / 2)
        assert 0 < line.size <= 4
        return line

    early, late = line_columns({3: "round 2 starts"}, "early.png"), line_columns({7: "round 2 starts"}, "late.png")
    assert late.min() > early.max()


def test_fsc_legend_resolution_from_known_crossing():
    # Linear FSC reaching 0 at shell 20 crosses 0.143 at radius 17.14: 64 * 1.5 / 17.14 A.
    curve = _linear_fsc(BOX // 2 + 1, 20.0)
    expected_A = BOX * PSIZE_A / ((1 - 0.143) * 20.0)
    assert fsc_label("no mask", curve, BOX, PSIZE_A) == f"no mask: {expected_A:.2f} Å"
    assert f"{expected_A:.2f}" == "5.60"
    # At FSC = 0.5 it crosses at radius 10: 9.60 A.
    assert fsc_label("x", curve, BOX, PSIZE_A, threshold=0.5) == "x: 9.60 Å"


def test_plots_reject_bad_shapes(tmp_path):
    with pytest.raises(ValueError, match="1-D"):
        plot_fsc({"a": np.ones((3, 3))}, PSIZE_A, BOX, tmp_path / "f.png")
    with pytest.raises(ValueError, match="square"):
        plot_affinity(np.ones((3, 4)), np.zeros(3, int), tmp_path / "a.png")
    with pytest.raises(ValueError, match="superclass"):
        plot_affinity(np.ones((3, 3)), np.zeros(2, int), tmp_path / "a.png")
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        plot_orientation_distribution(np.ones((5, 2)), tmp_path / "o.png")
    assert list(tmp_path.iterdir()) == []


def test_orientation_histogram_uniform_is_flat():
    d = np.random.default_rng(1).normal(size=(200_000, 3))
    density, az, el = orientation_histogram(d, n_az=12, n_el=6)
    assert density.shape == (6, 12) and az.shape == (13,) and el.shape == (7,)
    # Equal-area bins: ~2800 directions each, so within 10% of 1 everywhere.
    np.testing.assert_allclose(density, 1.0, atol=0.1)
    solid_angle = np.radians(30.0) * np.diff(np.sin(np.radians(el)))
    np.testing.assert_allclose((density * solid_angle[:, None]).sum(), 4 * np.pi)


def test_orientation_histogram_finds_a_known_direction_and_uses_weights():
    az0, el0 = np.radians(45.0), np.radians(30.0)
    v = np.array([np.cos(el0) * np.cos(az0), np.cos(el0) * np.sin(az0), np.sin(el0)])
    rng = np.random.default_rng(2)
    d = np.concatenate([np.tile(3 * v, (100, 1)), rng.normal(size=(100, 3))])
    w = np.r_[np.ones(100), np.zeros(100)]
    density, az, el = orientation_histogram(d, w, n_az=36, n_el=18)
    i, j = np.unravel_index(np.argmax(density), density.shape)
    assert az[j] <= 45.0 < az[j + 1] and el[i] <= 30.0 < el[i + 1]
    assert np.count_nonzero(density) == 1
    # Rotation matrices give the same histogram as their viewing directions R[:, :, 2].
    R = pose_to_matrix(rng.normal(size=(1000, 3)))
    np.testing.assert_array_equal(orientation_histogram(R)[0], orientation_histogram(R[:, :, 2])[0])


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.refs: list[tuple[str, str, str]] = []
        self.tags: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.refs += [(tag, k, v) for k, v in attrs if k in ("src", "href", "srcset", "data")]


def _report_sections(plots: dict[str, Path]) -> list:
    return [
        Section("Summary", [Paragraph("Two classes <recovered> & well separated."), "plain text"]),
        Section(
            "Parameters",
            [KeyValues({"n_classes": 2, "psize_A": np.float32(1.5), "<b>": "x"}, "Job parameters")],
        ),
        Section(
            "Iterations",
            [
                Table.from_records(
                    [
                        {"iteration": 0, "resolution_A": 12.3456789, "changed": 0.5},
                        {"iteration": 1, "resolution_A": 8.0},
                    ],
                    "Per iteration",
                )
            ],
        ),
        {"heading": "Plots", "blocks": [Image(p, caption=k) for k, p in plots.items()]},
    ]


def test_html_report_is_self_contained_and_escaped(plots, tmp_path):
    path = write_html_report(tmp_path / "report.html", "Job <1> & co", _report_sections(plots))
    text = path.read_text(encoding="utf-8")
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]
    parser = _Links()
    parser.feed(text)
    assert "script" not in parser.tags and "<b>" not in text
    assert "Job &lt;1&gt; &amp; co" in text and "&lt;recovered&gt; &amp;" in text
    srcs = [v for tag, k, v in parser.refs if k == "src"]
    assert len(srcs) == len(plots)
    for tag, k, v in parser.refs:
        assert v.startswith("data:" if k == "src" else "#"), (tag, k, v[:40])
    # Each image is its file's bytes, base64-encoded.
    for src, p in zip(srcs, plots.values(), strict=True):
        assert base64.b64decode(src.removeprefix("data:image/png;base64,")) == p.read_bytes()
    assert "12.35" in text and "<td>1.5</td>" in text and "<td>—</td>" in text


def test_html_report_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.png"):
        render_html("t", [Section("s", [Image(tmp_path / "missing.png")])])
    with pytest.raises(ValueError, match="row 0 has 1 values for 2 columns"):
        render_html("t", [Section("s", [Table(["a", "b"], [[1]])])])
    with pytest.raises(ValueError, match="suffix"):
        render_html("t", [Section("s", [Image(tmp_path / "x.gif")])])


# ---------------------------------------------------------------- headless Chromium

_CHECK_SCRIPT = """<script>
window.addEventListener('load', () => {
  const imgs = [...document.images];
  const bad = imgs.filter(i => !(i.complete && i.naturalWidth > 0)).length;
  const d = document.createElement('pre');
  d.id = 'img-check';
  d.textContent = `images=${imgs.length} broken=${bad} widths=${imgs.map(i => i.naturalWidth)}`;
  document.body.appendChild(d);
});
</script>"""


@pytest.fixture(scope="module")
def chromium() -> str:
    found = [shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")]
    exe = next((p for p in found if p), None)
    if exe is None:
        msg = "Chromium not installed (apt-get install -y chromium)"
        if os.environ.get("CI"):  # .ci/run installs it: missing there is a failure
            pytest.fail(msg)
        pytest.skip(msg)
    return exe


def _chromium(exe: str, page: Path, profile: Path, *args: str) -> str:
    cmd = [
        exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        f"--user-data-dir={profile}", "--virtual-time-budget=10000", *args, page.as_uri(),
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True)
    return done.stdout


def _rendered_image_check(exe: str, html: str, tmp_path: Path) -> tuple[int, int, list[int]]:
    page = tmp_path / "checked.html"
    page.write_text(html.replace("</body>", _CHECK_SCRIPT + "</body>"), encoding="utf-8")
    dom = _chromium(exe, page, tmp_path / "profile", "--dump-dom")
    m = re.search(r"images=(\d+) broken=(\d+) widths=([\d,]*)", dom)
    assert m, f"image check did not run; DOM tail: {dom[-500:]}"
    return int(m[1]), int(m[2]), [int(w) for w in m[3].split(",") if w]


def test_report_renders_in_chromium_without_broken_images(chromium, plots, tmp_path):
    report = write_html_report(tmp_path / "report.html", "Demo report", _report_sections(plots))
    html = report.read_text(encoding="utf-8")
    n, broken, widths = _rendered_image_check(chromium, html, tmp_path)
    assert (n, broken) == (len(plots), 0)
    assert widths == [matplotlib.image.imread(p).shape[1] for p in plots.values()]
    # The check can fail: corrupt one image's data and it is reported broken.
    corrupt = html.replace("base64,iVBOR", "base64,AAAAA", 1)
    assert _rendered_image_check(chromium, corrupt, tmp_path)[:2] == (len(plots), 1)
    # And the page draws: a screenshot that is not blank.
    shot = tmp_path / "page.png"
    _chromium(
        chromium, report, tmp_path / "profile", f"--screenshot={shot}", "--window-size=1200,2400"
    )
    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[:2] == (2400, 1200) and pixels[..., :3].var() > 1e-3


# ---------------------------------------------------------------- what a user reads


def test_fsc_is_drawn_over_the_computed_shells_only():
    """Shells not computed (NaN) are not drawn as FSC 0; a curve that never drops below
    0.143 where computed says "≤" its last shell."""
    from hetero_dask.jobs.refine.outputs import computed_fsc
    from hetero_dask.report.plots import _fsc_figure

    n_shells = BOX // 2 + 1
    # The refinement's M-step leaves shells beyond its backprojection radius at exactly 0.
    curve = computed_fsc(np.r_[_linear_fsc(12, 14.0), np.zeros(n_shells - 12)])
    assert np.isfinite(curve[:12]).all() and np.isnan(curve[12:]).all()
    fig = _fsc_figure({"class 0": {"half maps": curve}}, PSIZE_A, BOX, "", 0.143)
    line = fig.axes[0].lines[0]
    assert len(line.get_xdata()) == 12
    assert fig.axes[0].get_xlim()[1] == pytest.approx((n_shells - 1) / (BOX * PSIZE_A))
    high = np.r_[np.linspace(1.0, 0.5, 10), np.full(n_shells - 10, np.nan)]
    assert fsc_label("x", high, BOX, PSIZE_A) == f"x: ≤ {BOX * PSIZE_A / 9:.2f} Å"


def test_viewing_directions_one_colour_scale_per_class():
    """A class of 20 particles in one direction next to one of 4000 spread over the sphere:
    each panel has its own colour bar and scale, so the large class is not left dark."""
    from hetero_dask.report.plots import _orientation_figure

    rng = np.random.default_rng(3)
    views = {"small": np.tile([0.0, 0.0, 1.0], (20, 1)), "large": rng.normal(size=(4000, 3))}
    fig = _orientation_figure(views, None, "", None, None)
    panels = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    meshes = [ax.collections[0] for ax in panels]
    assert len(panels) == 2 and len(fig.axes) == 4  # two panels, two colour bars
    for mesh in meshes:
        assert mesh.get_clim()[1] == pytest.approx(float(np.nanmax(mesh.get_array())))
    assert meshes[0].get_clim()[1] > 5 * meshes[1].get_clim()[1]
    # ~2 directions per bin by default: the large class gets coarse enough bins to be read.
    assert np.mean(meshes[1].get_array()) == pytest.approx(1.0, rel=0.05)
    assert np.mean(np.asarray(meshes[1].get_array()) > 0) > 0.8


def test_job_report_rounds_numbers_labels_columns_and_lists_parameters(tmp_path):
    from hetero_dask.jobs.outputs import write_job_html

    report = {
        "seconds": 22.929094552993774,
        "classes": [{"class": 0, "fraction": 0.4583333333, "fraction_soft": 0.45871, "resolution_A": 19.7205867}],
        "timings": {"total_s": 2.346789},
        "params": {"num_superclasses": 2, "exclude_classes": []},
    }
    text = write_job_html(tmp_path, "Regroup 3D Classes", report, []).read_text()
    assert "22.93" in text and "22.929" not in text and "19.72" in text and "0.4583" in text
    assert "fraction (hard: best class)" in text and "fraction (soft: mean posterior)" in text
    assert "<h2>Timings</h2>" in text and "2.347" in text
    assert "<h2>Parameters</h2>" in text and "<th>num_superclasses</th><td>2</td>" in text
    assert "<th>exclude_classes</th><td>—</td>" in text


_WIDTH_SCRIPT = """<script>
window.addEventListener('load', () => {
  const d = document.createElement('pre');
  d.id = 'width-check';
  d.textContent = `page=${document.documentElement.scrollWidth} window=${window.innerWidth}`;
  document.body.appendChild(d);
});
</script>"""


def test_wide_tables_fit_the_page_in_chromium(chromium, tmp_path):
    """A 16-column iteration table scrolls inside its box; the page itself never gets wider
    than the window."""
    rows = [{f"a_long_column_name_{j}": 1234.5678 * i for j in range(16)} for i in range(5)]
    html = render_html("Wide", [Section("Iterations", [Table.from_records(rows)])])
    page = tmp_path / "wide.html"
    page.write_text(html.replace("</body>", _WIDTH_SCRIPT + "</body>"), encoding="utf-8")
    dom = _chromium(chromium, page, tmp_path / "profile", "--dump-dom", "--window-size=1000,800")
    m = re.search(r"page=(\d+) window=(\d+)", dom)
    assert m, dom[-300:]
    assert int(m[1]) <= int(m[2])


def test_map_views_refuse_maps_of_two_box_sizes(tmp_path):
    from hetero_dask.report.plots import plot_map_views

    with pytest.raises(ValueError, match="one box size"):
        plot_map_views({"a": np.zeros((8, 8, 8)), "b": np.zeros((6, 6, 6))}, tmp_path / "m.png")
    assert not (tmp_path / "m.png").exists()

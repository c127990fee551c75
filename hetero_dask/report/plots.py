"""Plots for the job reports: FSC, orientation distribution, per-iteration histories, regroup.

Every function takes plain numpy arrays and an output path, draws on its own
``matplotlib.figure.Figure`` with the Agg canvas (no pyplot, so no global figure
state survives a call), writes the PNG atomically (temporary name in the same
folder, then rename) and returns the path.

FSC curves are indexed by Fourier shell: ``curve[i]`` belongs to radius ``i``
cycles per box, i.e. spatial frequency ``i / (box * psize_A)`` in 1/A.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from hetero_dask.core.fsc import resolution_A
from hetero_dask.core.rotations import viewing_direction

__all__ = [
    "computed_shells",
    "fsc_label",
    "orientation_histogram",
    "plot_affinity",
    "plot_class_changes",
    "plot_class_fractions",
    "plot_class_table",
    "plot_eigenvalues",
    "plot_fsc",
    "plot_fsc_classes",
    "plot_map_views",
    "plot_orientation_distribution",
    "plot_resolution_history",
]

_DPI = 110
_PANEL_IN = (4.6, 3.4)
_PAD_IN = (0.7, 0.2, 0.55, 0.35)  # a panel's room for labels: left, right, bottom, top (inches)
_TITLE_IN = 0.4  # the figure title's room above the panels (inches)
# Candidate resolutions (A) for the FSC plot's top axis; those inside the plotted band are shown.
_RESOLUTION_TICKS_A = (50, 30, 20, 15, 10, 8, 6, 5, 4, 3.5, 3, 2.5, 2, 1.7, 1.5, 1.2, 1)


# ---------------------------------------------------------------- figure helpers


def _new_figure(n_panels: int, ncols: int | None = None, panel_in=_PANEL_IN, pad_in=_PAD_IN,
                title_in: float = _TITLE_IN):
    """A Figure with an Agg canvas and ``n_panels`` axes (row-major list).

    ``pad_in`` (left, right, bottom, top) is the room, in inches, each panel keeps around its
    axes for tick labels, axis labels and its title; ``title_in`` the room above all panels for
    the figure title; None: matplotlib's constrained layout instead (for labels whose size is
    not known in advance). Fixed margins: constrained layout measures every text of every axes
    and took a third of a report's drawing time.
    """
    ncols = ncols or min(n_panels, 3)
    nrows = math.ceil(n_panels / ncols)
    width, height = panel_in[0] * ncols, panel_in[1] * nrows + (title_in or 0.0)
    fig = Figure(figsize=(width, height), layout="constrained" if pad_in is None else None)
    FigureCanvasAgg(fig)
    if pad_in is not None:
        left, right, bottom, top = pad_in
        ax_w, ax_h = panel_in[0] - left - right, panel_in[1] - bottom - top
        fig.subplots_adjust(left=left / width, right=1 - right / width, bottom=bottom / height,
                            top=1 - (top + title_in) / height,
                            wspace=(left + right) / ax_w, hspace=(bottom + top) / ax_h)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, list(axes[:n_panels])


def _save(fig: Figure, out) -> Path:
    """Write ``fig`` as PNG to ``out`` atomically and return the path."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        fig.savefig(tmp, format="png", dpi=_DPI)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def _class_labels(labels: Sequence[str] | None, k: int) -> list[str]:
    if labels is None:
        return [f"class {i}" for i in range(k)]
    if len(labels) != k:
        raise ValueError(f"got {len(labels)} labels for {k} classes")
    return [str(s) for s in labels]


def _history(values, name: str) -> np.ndarray:
    """A per-iteration history as float64 ``(iters, K)``; a 1-D input is one class."""
    a = np.asarray(values, dtype=np.float64)
    if a.ndim == 1:
        a = a[:, None]
    if a.ndim != 2 or a.shape[0] == 0:
        raise ValueError(f"{name} must be (iterations, classes), got shape {a.shape}")
    return a


def _iterations(iterations, n: int) -> np.ndarray:
    if iterations is None:
        return np.arange(n)
    it = np.asarray(iterations)
    if it.shape != (n,):
        raise ValueError(f"iterations must have shape ({n},), got {it.shape}")
    return it


# ---------------------------------------------------------------- FSC


def computed_shells(curve) -> int:
    """How many leading shells of an FSC curve were computed: NaN marks the rest."""
    c = np.asarray(curve, dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(c))
    return int(bad[0]) if bad.size else int(c.size)


def fsc_label(label: str, curve, box: int, psize_A: float, threshold: float = 0.143) -> str:
    """Legend text of an FSC curve: its label and its resolution (A) at ``threshold``
    (``core.fsc.resolution_A``: interpolated crossing, shell i = i cycles per box) over the
    computed shells; a curve that stays above it there reads "≤ (its last shell)"."""
    c = np.asarray(curve, dtype=np.float64)[: computed_shells(curve)]
    res = resolution_A(c, box, psize_A, threshold)
    crossed = c.size > 1 and bool(np.any(c[1:] < threshold))
    return f"{label}: {res:.2f} Å" if crossed else f"{label}: ≤ {res:.2f} Å"


def _draw_fsc(ax, curves: Mapping[str, np.ndarray], psize_A: float, box: int, threshold: float):
    if not curves:
        raise ValueError("no FSC curves to plot")
    f_max = 0.0
    for label, curve in curves.items():
        c = np.asarray(curve, dtype=np.float64)
        if c.ndim != 1 or c.size < 2:
            raise ValueError(f"FSC curve {label!r} must be 1-D with >= 2 shells, got {c.shape}")
        freq = np.arange(c.size) / (box * psize_A)
        f_max = max(f_max, freq[-1])
        n = computed_shells(c)  # shells beyond were not computed: not drawn (not 0)
        ax.plot(freq[:n], c[:n], lw=1.4, label=fsc_label(label, c, box, psize_A, threshold))
    ax.axhline(threshold, color="0.35", ls="--", lw=0.9, label=f"FSC = {threshold:g}")
    ax.axhline(0.0, color="0.7", lw=0.6)
    ax.set_xlim(0.0, f_max)
    ax.set_ylim(min(-0.05, ax.get_ylim()[0]), 1.05)
    ax.set_xlabel("spatial frequency (1/Å)")
    ax.set_ylabel("FSC")
    ticks = []  # from high resolution down, keep ticks at least f_max / 10 apart
    for r in sorted(_RESOLUTION_TICKS_A):
        if 1.0 / r <= f_max and (not ticks or 1.0 / ticks[-1] - 1.0 / r >= f_max / 10):
            ticks.append(r)
    top = ax.secondary_xaxis("top")
    top.set_xticks([1.0 / r for r in ticks], labels=[f"{r:g}" for r in ticks])
    top.set_xlabel("resolution (Å)")
    ax.legend(fontsize=8, loc="upper right")


def plot_fsc_classes(
    curves_by_class: Mapping[str, Mapping[str, np.ndarray]],
    psize_A: float,
    box: int,
    out,
    title: str = "Fourier shell correlation",
    threshold: float = 0.143,
) -> Path:
    """One FSC panel per class. ``curves_by_class``: class label -> {curve label -> (n_shells,)}.

    Each legend entry carries the curve's resolution at ``threshold`` (see ``fsc_label``);
    ``box`` and ``psize_A`` are those of the maps the curves were computed from. NaN marks
    shells that were not computed: a curve is drawn up to its first NaN.
    """
    return _save(_fsc_figure(curves_by_class, psize_A, box, title, threshold), out)


def _fsc_figure(curves_by_class, psize_A: float, box: int, title: str, threshold: float) -> Figure:
    if not curves_by_class:
        raise ValueError("no classes to plot")
    fig, axes = _new_figure(len(curves_by_class), panel_in=(4.6, 3.9), pad_in=(0.7, 0.2, 0.55, 0.85))
    for ax, (name, curves) in zip(axes, curves_by_class.items(), strict=True):
        _draw_fsc(ax, curves, psize_A, box, threshold)
        ax.set_title(str(name), fontsize=10)
    fig.suptitle(title)
    return fig


def plot_fsc(
    curves: Mapping[str, np.ndarray],
    psize_A: float,
    box: int,
    out,
    title: str = "Fourier shell correlation",
    threshold: float = 0.143,
) -> Path:
    """FSC curves ``label -> (n_shells,)`` on one panel, resolution per curve in the legend."""
    return plot_fsc_classes({title: curves}, psize_A, box, out, title="", threshold=threshold)


# ---------------------------------------------------------------- maps


def plot_map_views(volumes: Mapping[str, np.ndarray], out, title: str = "Class maps") -> Path:
    """Each map ``label -> (n, n, n)`` (axes z, y, x) as one row: its central sections (xy,
    xz and yz planes through the box centre ``n // 2``) and its projections along z, y and x.
    Sections and projections of a row have their own grey scales (1st to 99.9th percentile),
    so a weak map is as visible as a strong one; protein is white."""
    if not volumes:
        raise ValueError("no maps to plot")
    heads = ("section xy", "section xz", "section yz", "projection z", "projection y", "projection x")
    tiles = []
    for name, vol in volumes.items():
        v = np.asarray(vol, dtype=np.float32)
        if v.ndim != 3 or len(set(v.shape)) != 1:
            raise ValueError(f"map {name!r} must be a cube (n, n, n), got shape {v.shape}")
        c = v.shape[0] // 2
        row = []
        for group in ((v[c], v[:, c], v[:, :, c]), tuple(v.sum(axis=a) for a in range(3))):
            lo, hi = np.percentile(np.concatenate([g.ravel() for g in group]), [1, 99.9])
            row += [np.clip((g - lo) / (hi - lo if hi > lo else 1.0), 0.0, 1.0) for g in group]
        tiles.append((str(name), row))
    # One image of all tiles (one axes instead of 6 per map: a figure of many axes is slow
    # to draw); NaN gaps between tiles show as the figure's background.
    n = tiles[0][1][0].shape[0]
    if any(t[1][0].shape[0] != n for t in tiles):
        raise ValueError("maps of one figure must have one box size")
    gap = max(1, n // 8)
    montage = np.full((len(tiles) * (n + gap) - gap, 6 * (n + gap) - gap), np.nan, np.float32)
    for r, (_, row) in enumerate(tiles):
        for col, img in enumerate(row):
            y, x = r * (n + gap), col * (n + gap)
            montage[y : y + n, x : x + n] = img[::-1]  # origin at the bottom of each tile
    fig = Figure(figsize=(8.4, 1.45 * len(tiles) + 0.5))
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0.04, 0.02, 0.95, 1 - 0.6 / fig.get_figheight()))
    ax.imshow(montage, cmap=matplotlib.colormaps["gray"].with_extremes(bad="white"),
              vmin=0.0, vmax=1.0, interpolation="nearest", aspect="equal")
    ax.set_axis_off()
    for col, head in enumerate(heads):
        ax.text(col * (n + gap) + n / 2, -gap / 2, head, ha="center", va="bottom", fontsize=8)
    for r, (name, _) in enumerate(tiles):
        ax.text(-gap / 2, r * (n + gap) + n / 2, name, ha="right", va="center", rotation=90, fontsize=9)
    fig.suptitle(title)
    return _save(fig, out)


# ---------------------------------------------------------------- orientations


def orientation_histogram(directions, weights=None, n_az: int = 72, n_el: int = 36):
    """Density of viewing directions on an azimuth x elevation grid.

    directions: ``(N, 3)`` vectors (x, y, z) or ``(N, 3, 3)`` rotation matrices (their
    viewing direction ``R[:, :, 2]``). weights: ``(N,)`` or None. Azimuth = atan2(y, x),
    elevation = asin(z); azimuth bins of equal angle, elevation bins of equal solid angle
    (equal steps in sin(elevation), so polar bins are not starved). Returns ``(density (n_el, n_az), az_edges_deg,
    el_edges_deg)`` with density = weight per solid angle relative to a uniform
    distribution (uniform = 1 everywhere; all zeros when the total weight is 0).
    """
    d = np.asarray(directions, dtype=np.float64)
    if d.ndim == 3 and d.shape[1:] == (3, 3):
        d = viewing_direction(d)
    if d.ndim != 2 or d.shape[1] != 3:
        raise ValueError(f"directions must be (N, 3) or (N, 3, 3), got shape {d.shape}")
    w = np.ones(len(d)) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (len(d),):
        raise ValueError(f"weights must have shape ({len(d)},), got {w.shape}")
    norm = np.linalg.norm(d, axis=1)
    if np.any(norm == 0):
        raise ValueError("zero-length viewing direction")
    d = d / norm[:, None]
    az = np.degrees(np.arctan2(d[:, 1], d[:, 0]))
    el = np.degrees(np.arcsin(np.clip(d[:, 2], -1.0, 1.0)))
    az_edges = np.linspace(-180.0, 180.0, n_az + 1)
    el_edges = np.degrees(np.arcsin(np.linspace(-1.0, 1.0, n_el + 1)))
    counts, _, _ = np.histogram2d(el, az, bins=(el_edges, az_edges), weights=w)
    total = w.sum()
    if total <= 0:
        return np.zeros_like(counts), az_edges, el_edges
    d_az = np.radians(az_edges[1] - az_edges[0])
    solid_angle = d_az * np.diff(np.sin(np.radians(el_edges)))  # (n_el,) steradians per bin
    density = counts / (total * solid_angle[:, None] / (4 * np.pi))
    return density, az_edges, el_edges


def plot_orientation_distribution(
    views,
    out,
    weights=None,
    title: str = "Viewing direction distribution",
    n_az: int | None = None,
    n_el: int | None = None,
) -> Path:
    """Azimuth x elevation heat map of viewing directions, one panel per class.

    views: ``(N, 3)`` directions or ``(N, 3, 3)`` rotation matrices, or a mapping
    class label -> such an array. weights: None, ``(N,)``, or a mapping with the same
    labels (e.g. each class's posterior). Colour = density relative to uniform
    (see ``orientation_histogram``), each panel on its own colour scale (a class of a few
    particles has a high peak density that would leave the large classes dark). Bins:
    ``n_az`` x ``n_el``, by default per panel about two directions per bin on average
    (72 x 36 from 5184 directions on), so a small class is not a scatter of single hits.
    """
    return _save(_orientation_figure(views, weights, title, n_az, n_el), out)


def _orientation_figure(views, weights, title: str, n_az, n_el) -> Figure:
    if not isinstance(views, Mapping):
        views = {"": views}
        weights = None if weights is None else {"": weights}
    if not views:
        raise ValueError("no viewing directions to plot")
    if weights is not None and set(weights) != set(views):
        raise ValueError(f"weights labels {sorted(weights)} differ from views {sorted(views)}")
    def bins(v):
        if n_az is not None and n_el is not None:
            return n_az, n_el
        az = int(np.clip(np.sqrt(len(v)), 8, 72)) // 2 * 2
        return az, az // 2

    hists = {
        name: orientation_histogram(v, None if weights is None else weights[name], *bins(v))
        for name, v in views.items()
    }
    fig, axes = _new_figure(len(hists), panel_in=(5.2, 2.9), pad_in=(0.7, 0.75, 0.55, 0.35))
    for ax, (name, (density, az_edges, el_edges)) in zip(axes, hists.items(), strict=True):
        mesh = ax.pcolormesh(az_edges, el_edges, density, cmap="viridis", vmin=0,
                             vmax=float(density.max()) or 1.0)  # fmt: skip
        fig.colorbar(mesh, ax=ax, label="density (uniform = 1)", shrink=0.9)
        ax.set_xlim(-180, 180)
        ax.set_ylim(-90, 90)
        ax.set_xticks(np.arange(-180, 181, 90))
        ax.set_yticks(np.arange(-90, 91, 45))
        ax.set_xlabel("azimuth (°)")
        ax.set_ylabel("elevation (°)")
        if name:
            ax.set_title(str(name), fontsize=10)
    fig.suptitle(title)
    return fig


# ---------------------------------------------------------------- per-iteration histories


def _plot_history(values, out, labels, iterations, ylabel: str, title: str, ax_setup=None, marks=None):
    a = _history(values, ylabel)
    it = _iterations(iterations, a.shape[0])
    names = _class_labels(labels, a.shape[1])
    fig, (ax,) = _new_figure(1, panel_in=(6.4, 3.8), title_in=0.0)
    for k, name in enumerate(names):
        ax.plot(it, a[:, k], marker="o", ms=3, lw=1.3, label=name)
    ax.set_xlabel("iteration")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax_setup is not None:
        ax_setup(ax)
    _draw_marks(ax, marks)
    if a.shape[1] <= 20:
        ax.legend(fontsize=8, ncols=1 + a.shape[1] // 8)
    return _save(fig, out)


def _draw_marks(ax, marks: Mapping[float, str] | None) -> None:
    """A thin grey vertical line just before each iteration of ``marks``, labelled with its text
    along the line (where a history changes course, e.g. where EM starts a new round)."""
    for iteration, text in (marks or {}).items():
        x = float(iteration) - 0.5
        ax.axvline(x, color="0.45", lw=1.0)
        ax.annotate(text, xy=(x, 1.0), xycoords=ax.get_xaxis_transform(), xytext=(-3, -4),
                    textcoords="offset points", rotation=90, ha="right", va="top", fontsize=7, color="0.3")


def plot_class_fractions(
    history,
    out,
    labels: Sequence[str] | None = None,
    iterations=None,
    title: str = "Class fractions",
    marks: Mapping[float, str] | None = None,
) -> Path:
    """Fraction of particles in each class per iteration; history ``(iters, K)`` in [0, 1].
    ``marks`` (iteration: text) draws a labelled line just before each of those iterations."""
    return _plot_history(
        history,
        out,
        labels,
        iterations,
        "fraction of particles",
        title,
        lambda ax: ax.set_ylim(0, max(1e-3, ax.get_ylim()[1])),
        marks,
    )


def plot_resolution_history(
    resolution_A,
    out,
    labels: Sequence[str] | None = None,
    iterations=None,
    title: str = "Resolution per iteration (FSC = 0.143)",
    marks: Mapping[float, str] | None = None,
) -> Path:
    """Resolution (A) of each class per iteration; ``(iters, K)``, NaN where unknown;
    ``marks`` as in :func:`plot_class_fractions`."""
    return _plot_history(resolution_A, out, labels, iterations, "resolution (Å)", title, marks=marks)


def plot_class_changes(
    fraction_changed,
    out,
    iterations=None,
    threshold: float | None = 0.05,
    title: str = "Particles changing class",
    marks: Mapping[float, str] | None = None,
) -> Path:
    """Fraction of particles whose best class changed, per iteration ``(iters,)``.

    ``threshold`` (a fraction, e.g. CryoSPARC's 5% convergence criterion) is drawn
    as a dashed line unless None; ``marks`` as in :func:`plot_class_fractions`.
    """
    a = np.asarray(fraction_changed, dtype=np.float64)
    if a.ndim != 1:
        raise ValueError(f"fraction_changed must be (iterations,), got shape {a.shape}")

    def setup(ax):
        if threshold is not None:
            ax.axhline(
                100 * threshold,
                color="0.35",
                ls="--",
                lw=0.9,
                label=f"convergence threshold ({100 * threshold:g}%)",
            )
        ax.set_ylim(0, max(1.0, ax.get_ylim()[1]))

    return _plot_history(
        100 * a, out, ["changed class"], iterations, "particles changing class (%)", title, setup, marks
    )


# ---------------------------------------------------------------- regroup


def _superclass_order(superclass, k: int) -> np.ndarray:
    s = np.asarray(superclass)
    if s.shape != (k,) or not np.issubdtype(s.dtype, np.integer):
        raise ValueError(f"superclass must be ({k},) integers, got {s.dtype} {s.shape}")
    return np.argsort(s, kind="stable")


def plot_affinity(
    affinity,
    superclass,
    out,
    labels: Sequence[str] | None = None,
    title: str = "Class affinity (ordered by superclass)",
) -> Path:
    """Heat map of a ``(K, K)`` affinity matrix, rows/columns grouped by ``superclass`` ``(K,)``.

    Lines separate superclass blocks; tick labels are the class labels (default class index).
    """
    a = np.asarray(affinity, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise ValueError(f"affinity must be square (K, K), got shape {a.shape}")
    k = a.shape[0]
    order = _superclass_order(superclass, k)
    names = [str(i) for i in range(k)] if labels is None else _class_labels(labels, k)
    s = np.asarray(superclass)[order]
    fig, (ax,) = _new_figure(1, panel_in=(5.6, 4.8), pad_in=None, title_in=0.0)
    shown = a[np.ix_(order, order)].copy()
    np.fill_diagonal(shown, np.nan)  # a class's affinity to itself is not used: drawn grey
    cmap = matplotlib.colormaps["magma"].with_extremes(bad="0.8")
    top = float(np.nanmax(shown)) if np.isfinite(shown).any() else 1.0
    im = ax.imshow(shown, cmap=cmap, interpolation="nearest", vmin=0.0, vmax=top or 1.0)
    for b in np.flatnonzero(np.diff(s)) + 0.5:
        ax.axhline(b, color="cyan", lw=1.2)
        ax.axvline(b, color="cyan", lw=1.2)
    if k <= 60:
        ax.set_xticks(range(k), labels=[names[i] for i in order], fontsize=7, rotation=90)
        ax.set_yticks(range(k), labels=[names[i] for i in order], fontsize=7)
    ax.set_xlabel("class")
    ax.set_ylabel("class")
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, label="affinity")
    return _save(fig, out)


def plot_eigenvalues(
    eigenvalues,
    out,
    n_superclasses: int | None = None,
    title: str = "Normalised Laplacian spectrum",
) -> Path:
    """Eigenvalues in ascending order against their index (1-based); the gap after the
    ``n_superclasses``-th eigenvalue is marked when given (the eigengap suggests M)."""
    v = np.sort(np.asarray(eigenvalues, dtype=np.float64).ravel())
    if v.size == 0:
        raise ValueError("no eigenvalues to plot")
    idx = np.arange(1, v.size + 1)
    fig, (ax,) = _new_figure(1, panel_in=(6.0, 3.8), title_in=0.0)
    ax.plot(idx, v, marker="o", lw=1.2)
    if n_superclasses is not None:
        ax.axvline(n_superclasses + 0.5, color="C3", ls="--", lw=1.0, label=f"M = {n_superclasses}")
        ax.legend(fontsize=8)
    ax.set_xlabel("eigenvalue index")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("eigenvalue")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return _save(fig, out)


def plot_class_table(
    sizes,
    superclass,
    out,
    labels: Sequence[str] | None = None,
    title: str = "Classes and their superclasses",
) -> Path:
    """Bar chart of class sizes ``(K,)`` (particles), grouped and coloured by ``superclass``
    ``(K,)``; a negative superclass means the class went to the remaining particles."""
    n = np.asarray(sizes, dtype=np.float64)
    if n.ndim != 1:
        raise ValueError(f"sizes must be (K,), got shape {n.shape}")
    k = n.size
    order = _superclass_order(superclass, k)
    s = np.asarray(superclass)
    names = [str(i) for i in range(k)] if labels is None else _class_labels(labels, k)
    fig, (ax,) = _new_figure(1, panel_in=(max(5.0, 0.35 * k + 2.0), 3.8), pad_in=None, title_in=0.0)
    x = np.arange(k)
    for m in np.unique(s):
        sel = s[order] == m
        total = int(n[s == m].sum())
        name = "remaining" if m < 0 else f"superclass {m}"
        ax.bar(
            x[sel],
            n[order][sel],
            color="0.6" if m < 0 else f"C{m % 10}",
            label=f"{name} ({total} particles)",
        )
    ax.set_xticks(x, labels=[names[i] for i in order], fontsize=8, rotation=90 if k > 20 else 0)
    ax.set_xlabel("class")
    ax.set_ylabel("particles")
    ax.set_ylim(0, 1.3 * max(float(n.max()), 1.0))  # headroom: the legend above the bars
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper center", ncols=min(3, len(np.unique(s))))
    return _save(fig, out)

"""Job outputs shared by heterogeneous refinement and reconstruction (and regroup's particle files).

Layout written into ``OUT`` (classes ``k`` from 0)::

    class_{k}/map.mrc, map_half_A.mrc, map_half_B.mrc     write_class_maps
    volumes.zip                                           write_volume_series
    {name}.cs, {name}.star, {name}.csg                    write_particles
    class_{k}/particles.cs|.csg|.star                     write_subsets
    report.json                                           write_report_json
    fsc.png                                               fsc_figure

Particle files (user's input order, every input field kept):

* ``.cs``: ``alignments3D/*`` = the best class (pose, shift, ``class``,
  ``class_posterior`` = its posterior), ``alignments_class_{k}/*`` = all 18
  CryoSPARC slot fields per class (pose, shift, posterior of class ``k``;
  fields we do not compute keep the input's values, else zero), and
  ``alignments3D_multi/*`` (class_posterior (N,K), pose, shift, class, split).
* ``.star`` (RELION 3.1, :func:`hetero_dask.io.convert.cs_to_star`):
  ``rlnClassNumber`` = best class + 1, angles and origins of the best class,
  ``rlnMaxValueProbDistribution`` = its posterior, and one column
  ``rlnClassPosterior<j>`` per class ``j = k + 1`` (1-based like
  ``rlnClassNumber``); CryoSPARC fields ride along as ``cs/...`` columns.
* ``.csg``: CryoSPARC result group (YAML) listing one result per field group
  (``blob``, ``ctf``, ``alignments3D``, ``alignments_class_0``, ...) with its
  ``type`` (``particle.<group>``; per-class slots are ``particle.alignments3D``),
  ``metafile`` (``'>name.cs'``: the ``.cs`` next to the ``.csg``) and
  ``num_items``, so CryoSPARC's "Import Result Group" job can load it.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np

from hetero_dask.io.cs import (
    SLOT_FIELDS,
    multi_class_fields,
    with_fields,
    write_cs,
)
from hetero_dask.io.errors import atomic_output
from hetero_dask.io.mrc import write_map

POSTERIOR_STAR_LABEL = "rlnClassPosterior"  # + class number (1-based)
_CSG_TYPES = {
    "alignments_class": "particle.alignments3D",
    "alignments_class3D": "particle.alignments3D",
}


def class_dir(out_dir, k: int) -> Path:
    """``OUT/class_{k}``."""
    return Path(out_dir) / f"class_{k}"


def write_class_maps(out_dir, k: int, result, psize_A: float) -> dict[str, Path]:
    """``class_{k}/map.mrc``, ``map_half_A.mrc``, ``map_half_B.mrc`` from a ``ClassResult``."""
    d = class_dir(out_dir, k)
    paths = {
        "map": d / "map.mrc",
        "map_half_A": d / "map_half_A.mrc",
        "map_half_B": d / "map_half_B.mrc",
    }
    for vol, path in zip(
        (result.vol_full, result.vol_A, result.vol_B), paths.values(), strict=True
    ):
        write_map(path, vol, psize_A)
    return paths


def write_volume_series(
    out_dir, vols, psize_A: float, name: str = "volumes.zip", members: str = "class"
) -> Path:
    """All maps ``(K, n, n, n)`` as ``OUT/volumes.zip`` (members ``class_000.mrc``, ...;
    ``members`` names them)."""
    from hetero_dask.io.volumes import write_volume_series_zip

    path = Path(out_dir) / name
    names = [f"{members}_{k:03d}" for k in range(len(vols))]
    write_volume_series_zip(path, vols, psize_A, names=names)
    return path


def _slot(table, prefix: str, n: int, values: dict) -> dict:
    """All 18 slot fields ``prefix/*``: ``values`` first, then the table's own, else zeros."""
    out = {}
    for name, (dtype, shape) in SLOT_FIELDS.items():
        full = f"{prefix}/{name}"
        if name in values:
            v = values[name]
        elif full in table.dtype.names and table.dtype[full].shape == shape:
            v = table[full]
        else:
            v = 0
        out[full] = np.broadcast_to(np.asarray(v, dtype=dtype), (n, *shape))
    return out


def particle_table(
    table,
    posteriors,
    poses,
    shifts_px,
    psize_A,
    best_class=None,
    split=None,
    extra_fields=None,
    class_layout: str = "alignments_class",
    class_values=None,
) -> np.ndarray:
    """The output particle table: ``table`` plus the class fields described in the module doc.

    ``posteriors`` ``(N, K)``, ``poses`` ``(N, K, 3)`` axis-angle, ``shifts_px``
    ``(N, K, 2)`` pixels at ``psize_A`` (scalar or ``(N,)``); ``best_class``
    ``(N,)`` defaults to the argmax of the posteriors; ``split`` ``(N,)`` 0/1
    (default: the table's ``alignments3D/split``, else zeros);
    ``extra_fields``: more ``name -> (N, ...)`` fields; ``class_values``: slot fields
    ``name -> (N, K)`` per class (e.g. ``alpha``, ``pose_ess``), each class's in its slot and
    the best class's in ``alignments3D``, where CryoSPARC's readers look for them.
    """
    post = np.asarray(posteriors, dtype=np.float32)
    n, K = post.shape
    poses = np.asarray(poses, dtype=np.float32).reshape(n, K, 3)
    shifts = np.asarray(shifts_px, dtype=np.float32).reshape(n, K, 2)
    best = np.argmax(post, axis=1) if best_class is None else np.asarray(best_class)
    if split is None:
        split = table["alignments3D/split"] if "alignments3D/split" in table.dtype.names else 0
    split = np.broadcast_to(np.asarray(split, dtype=np.uint32), (n,))
    rows = np.arange(n)
    psize = np.broadcast_to(np.asarray(psize_A, dtype=np.float32), (n,))
    per_class = {name: np.asarray(v).reshape(n, K) for name, v in (class_values or {}).items()}
    fields = _slot(
        table,
        "alignments3D",
        n,
        dict(
            **{name: v[rows, best] for name, v in per_class.items()},
            pose=poses[rows, best],
            shift=shifts[rows, best],
            psize_A=psize,
            class_posterior=post[rows, best],
            **{"class": best, "split": split},
        ),
    )
    for k in range(K):
        fields.update(
            _slot(
                table,
                f"{class_layout}_{k}",
                n,
                dict(
                    **{name: v[:, k] for name, v in per_class.items()},
                    pose=poses[:, k],
                    shift=shifts[:, k],
                    psize_A=psize,
                    class_posterior=post[:, k],
                    **{"class": k, "split": split},
                ),
            )
        )
    fields.update(multi_class_fields(poses, shifts, post, split))
    fields.update(extra_fields or {})
    return with_fields(table, fields)


def write_csg(path, cs_name: str, table, name: str = "particles", job: str = "hetero_dask") -> Path:
    """CryoSPARC result group (``.csg``, YAML) for ``cs_name`` (a ``.cs`` in the same folder)."""
    import yaml

    from hetero_dask import __version__

    groups = sorted({f.split("/", 1)[0] for f in table.dtype.names if "/" in f})
    results = {}
    for g in groups:
        base = g.rsplit("_", 1)[0] if g[-1].isdigit() else g
        kind = _CSG_TYPES.get(base, f"particle.{g}")
        results[g] = {"metafile": f">{cs_name}", "num_items": len(table), "type": kind}
    doc = {
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "group": {
            "name": name,
            "title": name.replace("_", " ").capitalize(),
            "type": "particle",
            "description": f"particles written by {job}",
        },
        "results": results,
        "version": f"hetero_dask {__version__}",
    }
    with atomic_output(path) as tmp:
        Path(tmp).write_text(yaml.safe_dump(doc, sort_keys=False))
    return Path(path)


def write_star_with_posteriors(path, table, posteriors=None) -> Path:
    """RELION 3.1 STAR of ``table`` with ``rlnMaxValueProbDistribution`` and per-class posteriors."""
    from hetero_dask.io.convert import cs_to_star
    from hetero_dask.io.star import write_star

    blocks = cs_to_star(table, path)
    if posteriors is not None:
        post = np.asarray(posteriors, dtype=np.float64)
        part = blocks["particles"]
        part["rlnMaxValueProbDistribution"] = post.max(axis=1)
        for k in range(post.shape[1]):
            part[f"{POSTERIOR_STAR_LABEL}{k + 1}"] = post[:, k]
    write_star(path, blocks)
    return Path(path)


def write_table_files(
    directory, stem: str, table, posteriors=None, job: str = "hetero_dask", formats=("cs", "star")
) -> dict:
    """``{stem}.cs`` with its ``{stem}.csg``, and ``{stem}.star`` of ``table`` in ``directory``.

    ``formats``: which of ``"cs"`` and ``"star"`` to write. Returns
    ``{"cs", "csg", "star": Path}`` of those written.
    """
    d = Path(directory)
    paths = {}
    if "cs" in formats:
        paths["cs"], paths["csg"] = d / f"{stem}.cs", d / f"{stem}.csg"
        write_cs(paths["cs"], table)
        write_csg(paths["csg"], paths["cs"].name, table, name=stem, job=job)
    if "star" in formats:
        paths["star"] = write_star_with_posteriors(d / f"{stem}.star", table, posteriors)
    return paths


def write_particles(
    out_dir,
    table,
    posteriors,
    poses,
    shifts_px,
    psize_A,
    best_class=None,
    name: str = "particles",
    extra_fields=None,
    split=None,
    job: str = "hetero_dask",
    class_values=None,
) -> dict:
    """Write ``OUT/{name}.cs|.star|.csg`` (see the module doc); returns paths and the table.

    ``table``: the input table in the USER'S ORIGINAL ORDER; the per-particle
    arrays are in that order too (see :func:`particle_table`).
    Returns ``{"cs", "csg", "star": Path, "table": the written table}``.
    """
    out = particle_table(
        table, posteriors, poses, shifts_px, psize_A, best_class, split, extra_fields, class_values=class_values
    )
    paths = write_table_files(out_dir, name, out, posteriors, job)
    paths["table"] = out
    return paths


def write_subsets(
    out_dir, table, classes, n_classes: int | None = None, posteriors=None, job: str = "hetero_dask"
) -> dict:
    """Hard subsets ``class_{k}/particles.cs|.csg|.star`` of ``table`` by ``classes`` ``(N,)``.

    Every class ``0 .. n_classes - 1`` gets files, empty ones included.
    Returns ``{k: paths}``.
    """
    classes = np.asarray(classes)
    K = int(classes.max()) + 1 if n_classes is None else int(n_classes)
    out = {}
    for k in range(K):
        sel = classes == k
        post = None if posteriors is None else np.asarray(posteriors)[sel]
        out[k] = write_table_files(class_dir(out_dir, k), "particles", table[sel], post, job)
    return out


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, np.generic):
        return _jsonable(x.item())
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if isinstance(x, Path):
        return str(x)
    return x


def write_report_json(out_dir, report: dict, name: str = "report.json") -> Path:
    """``OUT/report.json`` written atomically; numpy values become lists, inf becomes "inf"."""
    path = Path(out_dir) / name
    with atomic_output(path) as tmp:
        Path(tmp).write_text(json.dumps(_jsonable(report), indent=2))
    return path


def fsc_figure(out_dir, curves, psize_A: float, box: int, name: str = "fsc.png") -> Path:
    """``OUT/fsc.png``: one panel per class; ``curves``: class label -> {curve label -> (n_shells,)}."""
    from hetero_dask.report.plots import plot_fsc_classes

    return plot_fsc_classes(curves, psize_A, box, Path(out_dir) / name)


# Column titles of the report tables (report.json keeps the short keys).
_COLUMN_TITLES = {
    "fraction": "fraction (hard: best class)",
    "fraction_soft": "fraction (soft: mean posterior)",
    "n_particles": "particles (best class)",
    "n_particles_best": "particles (best class)",
    "weight_sum": "particles (soft: sum of posteriors)",
    "resolution_A": "resolution (Å, no mask)",
    "resolution_corrected_A": "resolution (Å, corrected)",
    "full_pass": "full pass",
    "random_assignment": "random",
    "split_assignment": "split",
    "learning_rate": "learning rate",
    "class_change_fraction": "changed class",
    "r_align": "align radius (shells)",
    "healpix_order": "HEALPix order",
    "seconds": "s",
    "particle_iterations_per_s": "particles / s",
    "hand_flipped_to_reference": "hand flipped",
    "reference_class": "reference class",
}
_PARAMETER_KEYS = ("parameters", "params")


def map_figures(out_dir, volumes: dict, name: str = "class_maps", per_figure: int = 16) -> dict[str, Path]:
    """Central sections and projections of every map ``label -> (n, n, n)``
    (:func:`hetero_dask.report.plots.plot_map_views`), ``per_figure`` maps per PNG:
    ``OUT/{name}.png``, ``OUT/{name}_2.png``, ...; returns ``{file stem: path}``."""
    from hetero_dask.report.plots import plot_map_views

    items = list(volumes.items())
    paths = {}
    for i in range(0, len(items), per_figure):
        stem = name if i == 0 else f"{name}_{i // per_figure + 1}"
        title = name.replace("_", " ").capitalize()
        paths[stem] = plot_map_views(dict(items[i : i + per_figure]), Path(out_dir) / f"{stem}.png", title)
    return paths


def write_job_html(out_dir, title: str, report: dict, images, name: str = "report.html") -> Path:
    """``OUT/report.html``: a self-contained page of a job's plots and report.json tables.

    ``images``: PNG paths shown first. Scalars of ``report`` form a summary; its
    ``classes``/``superclasses``/``iterations`` lists become tables (list-valued
    cells, such as FSC curves, are left to report.json) with the column titles of
    ``_COLUMN_TITLES``; other mappings (timings, inputs) key-value tables; the
    job's parameters (``parameters`` or ``params``) a last key-value table.
    """
    from hetero_dask.report.html import Image, KeyValues, Section, Table, write_html_report

    def flat(record: dict) -> dict:
        return {
            _COLUMN_TITLES.get(k, k): v
            for k, v in _jsonable(record).items()
            if not isinstance(v, (list, dict))
        }

    sections = [Section("Plots", [Image(Path(p)) for p in images if p is not None and Path(p).is_file()])]
    summary = {k: v for k, v in _jsonable(report).items() if not isinstance(v, (list, dict))}
    if summary:
        sections.append(Section("Summary", [KeyValues(summary)]))
    for key in ("classes", "superclasses", "iterations"):
        rows = report.get(key)
        if isinstance(rows, list) and rows and all(isinstance(r, dict) for r in rows):
            sections.append(Section(key.capitalize(), [Table.from_records([flat(r) for r in rows])]))
    for key, value in _jsonable(report).items():
        if isinstance(value, dict) and key not in _PARAMETER_KEYS and key != "outputs" and flat(value):
            sections.append(Section(key.replace("_", " ").capitalize(), [KeyValues(flat(value))]))
    params = next((report[k] for k in _PARAMETER_KEYS if isinstance(report.get(k), dict)), None)
    if params is not None:
        sections.append(Section("Parameters", [KeyValues(_jsonable(params))]))
    return write_html_report(Path(out_dir) / name, title, sections)

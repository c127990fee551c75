"""Heterogeneous Refinement on realistic scenarios, against the oracle ceiling and RELION.

Every scenario (:data:`hetero_dask.testing.scenarios.SCENARIOS`) is built from atomic
models (gemmi densities) projected by ``relion_project --ctf``, with noise added at a
stated SNR: data no part of this project generated. Per scenario and seed:

* **oracle**: one E-step against maps from the TRUE states and poses (half-set cross-
  validated, ``relion_reconstruct``), :func:`~hetero_dask.testing.scenarios.oracle_accuracy`;
* **ours**: ``hetero_dask.refine`` with its DEFAULT parameters (only the refinement box
  and symmetry of the scenario given) from the scenario's references: wall time to the
  final classes, accuracy, junk recall, calibration (ECE), class maps against the truth;
* **RELION**: ``relion_refine --K`` (3D classification) from the same references, searching
  the scenario's shift range as ours does (``--relion``): accuracy after ``--relion-iter``
  iterations, its measured time; on the
  large scenario (RELION's first iteration on 20,000 particles takes hours per core) its
  set-up and first iteration are timed on random subsets (``--relion-subsets``), fitted
  linearly in the particle count and extrapolated: set-up + ``--relion-iter`` x the first
  iteration, marked as extrapolated.

Results go to ``--out`` (default ``benchmarks/results/realistic``): ``results.json``
(everything, appended per run), ``results.md`` (the table) and ``calibration.png``.

    python benchmarks/bench_realistic.py --seeds 10 11 12 13 14            # report seeds
    python benchmarks/bench_realistic.py --scenarios two_conformations --seeds 0 1 2 --relion
    python benchmarks/bench_realistic.py --params '{"initial_sigma_scale": 1}'   # a variant
    python benchmarks/bench_realistic.py --relion-progress --scenarios two_conformations --seeds 10
        # each finished iteration of RELION runs (also of runs still going, or stopped);
        # with --record, the last one goes into the results, marked unfinished where it is

Seeds 0-2 are for choosing defaults, 10-14 for reporting (never used for tuning).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np

from hetero_dask.testing import scenarios as S

ROOT = Path(__file__).resolve().parents[1]
LARGE = {"two_conformations_large"}


def run_ours(data: S.Dataset, work: Path, params: dict, workers: int) -> dict:
    """``hetero_dask.refine`` with default parameters (plus ``params``); scores against the truth."""
    from hetero_dask import refine

    sc = data.scenario
    out = work / "ours"
    shutil.rmtree(out, ignore_errors=True)
    kw = dict(refine_box=sc.refine_box or sc.box, symmetry=sc.symmetry, seed=data.seed, progress=False, **params)
    client = cluster = None
    if workers > 0:
        from distributed import Client, LocalCluster

        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, dashboard_address=":0")
        client = Client(cluster)
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        report = refine(str(data.particles_star), [str(p) for p in data.references], out, client=client, **kw)
    finally:
        if client is not None:
            client.close()
            cluster.close()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    first = report["iterations"][0]
    return dict(wall_s=wall, cpu_s=cpu, code=_commit(), **S.score_refine_run(out, data), iterations=len(report["iterations"]),
                first_iteration=first, converged_at=report.get("converged_at_iteration"),
                resolution_A=[c["resolution_A"] for c in report["classes"]], params=kw)


def _commit() -> str | None:
    """The checkout's commit (``+`` when it has changes), or None outside a git checkout."""
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+" if dirty else "")


def run_relion(data: S.Dataset, work: Path, iterations: int, executable: str = "relion_refine",
               extra_args: tuple[str, ...] = ()) -> dict:
    """RELION Class3D from the same references, ``iterations`` of it, timed and scored.
    ``executable``/``extra_args``: e.g. a build with RELION's vectorised CPU code and ``--cpu``."""

    from hetero_dask.testing.relion import relion_class3d

    sc = data.scenario
    build = subprocess.run([executable, "--version"], capture_output=True, text=True).stdout.split()
    rel = relion_class3d(work, data.particles_star, data.references_star, sc.n_classes, iterations,
                         sc.particle_diameter_A, seed=data.seed, offset_range_px=math.ceil(sc.shift_range_px),
                         extra_args=_relion_args(sc, extra_args), executable=executable)
    return dict(cmd=rel["cmd"], build=" ".join(build), measured_iterations=iterations, iterations=iterations,
                setup_s=rel["setup"], per_iteration_s=rel["per_iteration"],
                per_iteration_cpu_s=rel["per_iteration_cpu"], wall_s=rel["wall"], cpu_s=rel["cpu"],
                extrapolated=False, **score_relion_iteration(data, Path(rel["data_star"])))


def _relion_args(sc: S.Scenario, extra_args: tuple[str, ...]) -> list[str]:
    return ([] if sc.symmetry == "C1" else ["--sym", sc.symmetry]) + list(extra_args)


def run_relion_subsets(data: S.Dataset, work: Path, iterations: int, sizes: tuple[int, ...],
                       executable: str = "relion_refine", extra_args: tuple[str, ...] = ()) -> dict:
    """RELION's time on a data set too large to run here: its first iteration on random
    subsets of ``sizes`` particles (same references and settings), fitted as ``a + b n``
    (set-up and iteration alike: RELION's expectation step costs the same per particle, its
    reconstruction is fixed) and extrapolated to every particle; the total is the set-up
    plus ``iterations`` first iterations, marked as extrapolated."""
    import starfile

    from hetero_dask.testing.relion import relion_class3d

    sc = data.scenario
    tables = starfile.read(data.particles_star, always_dict=True)
    particles = tables["particles"]
    n_total = len(particles)
    # RELION reads image and reference names relative to its working directory: give it
    # absolute ones, so the subsets live in the run folder and the data folder stays as built.
    folder = data.particles_star.resolve().parent
    names = particles["rlnImageName"].str.split("@", n=1, expand=True)
    particles = particles.assign(rlnImageName=names[0] + "@" + names[1].map(lambda f: str(folder / f)))
    refs = starfile.read(data.references_star, always_dict=True)
    (block, ref_table), = refs.items()
    ref_table = ref_table.assign(rlnReferenceImage=ref_table["rlnReferenceImage"].map(lambda f: str(folder / f)))
    rng = np.random.default_rng(data.seed)
    runs = []
    for n in sizes:
        run_dir = (work / f"relion_subset{n}").resolve()
        run_dir.mkdir(parents=True, exist_ok=True)
        take = np.sort(rng.choice(n_total, size=min(n, n_total), replace=False))
        starfile.write({"optics": tables["optics"], "particles": particles.iloc[take]}, run_dir / "particles.star",
                       overwrite=True)
        starfile.write({block: ref_table}, run_dir / "references.star", overwrite=True)
        rel = relion_class3d(run_dir, run_dir / "particles.star", run_dir / "references.star", sc.n_classes, 1,
                             sc.particle_diameter_A, seed=data.seed, offset_range_px=math.ceil(sc.shift_range_px),
                             extra_args=_relion_args(sc, extra_args), executable=executable)
        runs.append(dict(particles=len(take), cmd=rel["cmd"], setup_s=rel["setup"],
                         first_iteration_s=rel["per_iteration"][0], first_iteration_cpu_s=rel["per_iteration_cpu"][0]))
        print(f"  RELION subset of {len(take)}: set-up {rel['setup']:.0f} s, first iteration "
              f"{rel['per_iteration'][0]:.0f} s", flush=True)
    n = np.array([r["particles"] for r in runs], float)

    def at_total(key: str) -> float:
        y = np.array([r[key] for r in runs])
        if len(n) == 1:  # no fixed part to fit: proportional
            return float(y[0] * n_total / n[0])
        slope, intercept = np.polyfit(n, y, 1)
        return float(intercept + slope * n_total)

    setup, first, first_cpu = at_total("setup_s"), at_total("first_iteration_s"), at_total("first_iteration_cpu_s")
    build = subprocess.run([executable, "--version"], capture_output=True, text=True).stdout.split()
    return dict(build=" ".join(build), subsets=runs, iterations=iterations, measured_iterations=0,
                setup_s=setup, first_iteration_s=first, per_iteration_s=[first], wall_s=setup + iterations * first,
                cpu_s=iterations * first_cpu, extrapolated=True,
                method=f"set-up and first iteration on random subsets of {', '.join(str(int(x)) for x in n)} "
                       f"particles, fitted linearly in the particle count and extrapolated to {n_total}; "
                       f"total = set-up + {iterations} x first iteration")


def score_relion_iteration(data: S.Dataset, data_star: Path) -> dict:
    """Accuracy, junk recall and class maps against the truth of one RELION iteration
    (its ``run_itNNN_data.star`` and the class maps beside it)."""
    import starfile

    from hetero_dask.testing.relion import read_mrc

    sc = data.scenario
    table = starfile.read(data_star, always_dict=True)["particles"]
    index = {name: i for i, name in enumerate(starfile.read(data.particles_star, always_dict=True)
                                               ["particles"]["rlnImageName"])}
    pred = np.full(len(data.labels), -1)
    pred[[index[n] for n in table["rlnImageName"]]] = table["rlnClassNumber"].to_numpy(int) - 1
    mapping = S.match_classes(pred, data.labels, sc.n_classes)
    maps = [read_mrc(Path(str(data_star).replace("_data.star", f"_class{k + 1:03d}.mrc")))
            for k in range(sc.n_classes)]
    return dict(accuracy=S.accuracy(pred, data, mapping), junk_recall=S.junk_recall(pred, data, mapping),
                maps=S.map_scores(maps, sc.psize_A, data, mapping),
                class_sizes=np.bincount(pred[pred >= 0], minlength=sc.n_classes).tolist())


def relion_progress(args) -> list[dict]:
    """Print every finished iteration of the RELION runs under ``--work`` (finished or not):
    accuracy, class sizes, class maps against the truth, and when its files were written.
    Returns a row per run with its last finished iteration as RELION's entry: ``iterations``
    the run was given, ``measured_iterations`` it finished, and no total time (a run stopped,
    resumed or sharing the machine has none that means anything)."""
    rows = []
    for name in args.scenarios:
        for seed in args.seeds:
            run = args.work / name / f"seed{seed}" / "relion"
            stars = sorted(run.glob("run_it[0-9][0-9][0-9]_data.star"))
            if len(stars) < 2:
                continue
            data = S.load(args.data / name / f"seed{seed}")
            start = stars[0].stat().st_mtime
            for star in stars[1:]:
                r = score_relion_iteration(data, star)
                print(f"{name} seed {seed} {star.name[4:9]}: accuracy {r['accuracy']:.3f}, class sizes "
                      f"{r['class_sizes']}, maps' correlation at 8 A "
                      f"{[round(m['correlation_8A'], 3) for m in r['maps']]}, "
                      f"written {star.stat().st_mtime - start:.0f} s after iteration 0", flush=True)
            done = int(stars[-1].name[6:9])
            cmd, planned = relion_run_settings(run / "run_it000_optimiser.star")
            rows.append(dict(scenario=name, seed=seed, variant=args.params, relion=dict(
                run=str(run.resolve()), cmd=cmd, iterations=planned, measured_iterations=done,
                written_s=[s.stat().st_mtime - start for s in stars[1:]], wall_s=None, cpu_s=None,
                extrapolated=False, **r)))
    return rows


def relion_run_settings(optimiser: Path) -> tuple[str, int]:
    """The command line and the iterations a RELION run was given, from its optimiser file
    (RELION writes its arguments in the file's second line, a comment)."""
    import starfile

    with open(optimiser) as f:
        f.readline()
        args = f.readline().lstrip("#").strip()
    (table,) = starfile.read(optimiser, always_dict=True).values()
    return f"relion_refine {args}", int(table["rlnNumberOfIterations"])


def _relion_label(r: dict) -> str:
    """RELION's entry in the table: its accuracy, and how far it got where it did not finish."""
    acc = r.get("accuracy")
    if acc is None:
        return "-"
    if _unfinished(r):
        return f"{acc:.3f} after {r['measured_iterations']} of its {r['iterations']} iterations"
    return f"{acc:.3f}"


def _unfinished(r: dict) -> bool:
    """A RELION entry from a run that stopped before the iterations it was given."""
    planned, done = r.get("iterations"), r.get("measured_iterations")
    return not r.get("extrapolated") and planned is not None and done is not None and done < planned


def run_case(name: str, seed: int, args) -> dict:
    sc = S.SCENARIOS[name]
    folder = args.data / name / f"seed{seed}"
    t0 = time.perf_counter()
    data = S.build(sc, seed, folder)
    row = dict(scenario=name, seed=seed, description=sc.description, n_particles=sc.n_particles,
               build_s=time.perf_counter() - t0, variant=args.params)
    if not args.skip_oracle:
        t0 = time.perf_counter()
        row["oracle"] = S.oracle_accuracy(data, folder / "oracle",
                                          max_particles=4000 if name in LARGE else None)
        row["oracle"]["seconds"] = time.perf_counter() - t0
        print(f"  oracle {row['oracle']['accuracy']:.3f} ({row['oracle']['seconds']:.0f} s)", flush=True)
    if not args.skip_ours:
        row["ours"] = run_ours(data, args.work / name / f"seed{seed}", json.loads(args.params), args.workers)
        o = row["ours"]
        print(f"  ours {o['accuracy']:.3f} junk {o['junk_recall']} ECE {o['calibration']['ece']:.3f} "
              f"{o['iterations']} it {o['wall_s']:.0f} s", flush=True)
    if args.relion and name in LARGE:
        row["relion"] = run_relion_subsets(data, args.work / name / f"seed{seed}", args.relion_iter,
                                           tuple(args.relion_subsets), args.relion_refine,
                                           tuple(args.relion_args.split()))
    elif args.relion:
        row["relion"] = run_relion(data, args.work / name / f"seed{seed}", args.relion_iter, args.relion_refine,
                                   tuple(args.relion_args.split()))
    if args.relion:
        r = row["relion"]
        print(f"  RELION {r.get('accuracy', float('nan')):.3f} {r['wall_s']:.0f} s"
              f"{' (extrapolated)' if r['extrapolated'] else ''}", flush=True)
    return row


def write_table(rows: list[dict], path: Path) -> None:
    """Markdown: one line per scenario and variant, means over seeds (and each seed's figures)."""
    from collections import defaultdict

    groups = defaultdict(list)
    for r in rows:
        groups[(r["scenario"], r.get("variant", "{}"))].append(r)

    def fmt(values, digits=3):
        v = [x for x in values if x is not None]
        return "-" if not v else f"{np.mean(v):.{digits}f}"

    lines = ["| scenario | variant | seeds | oracle | ours | RELION | ours - oracle | junk recall ours / oracle "
             "| ECE ours / oracle | map corr. 8 A ours / RELION | time ours / RELION (s) | ours' code |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (name, variant), rs in sorted(groups.items()):
        o = [r.get("oracle", {}).get("accuracy") for r in rs]
        u = [r.get("ours", {}).get("accuracy") for r in rs]
        rel = [r["relion"] for r in rs if "accuracy" in r.get("relion", {})]
        diff = [a - b for a, b in zip(u, o, strict=True) if a is not None and b is not None]
        jo = [r.get("oracle", {}).get("junk_recall") for r in rs]
        ju = [r.get("ours", {}).get("junk_recall") for r in rs]
        ece = [r.get("ours", {}).get("calibration", {}).get("ece") for r in rs]
        ece_o = [r.get("oracle", {}).get("calibration", {}).get("ece") for r in rs]
        mc = [np.mean([m["correlation_8A"] for m in r["ours"]["maps"]]) for r in rs if "ours" in r]
        mr = [np.mean([m["correlation_8A"] for m in r["relion"]["maps"]]) for r in rs
              if "maps" in r.get("relion", {})]
        tu = [r.get("ours", {}).get("wall_s") for r in rs]
        tr = [r.get("relion", {}).get("wall_s") for r in rs]
        seeds = ",".join(str(r["seed"]) for r in rs)
        code = ",".join(sorted({str(r["ours"].get("code")) for r in rs if "ours" in r} - {"None"})) or "-"
        rel_label = (_relion_label(rel[0]) if len(rel) == 1 else fmt([r["accuracy"] for r in rel])
                     + (" (unfinished runs among them)" if any(_unfinished(r) for r in rel) else ""))
        lines.append(f"| {name} | {variant} | {seeds} | {fmt(o)} | {fmt(u)} | {rel_label} | "
                     f"{fmt([100 * d for d in diff], 1)} | {fmt(ju)} / {fmt(jo)} | {fmt(ece)} / {fmt(ece_o)} | {fmt(mc)} / {fmt(mr)} "
                     f"| {fmt(tu, 0)} / {fmt(tr, 0)} | {code} |")
    path.write_text("\n".join(lines) + "\n")


def write_plots(rows: list[dict], folder: Path) -> None:
    """``accuracy.png`` (oracle, ours, RELION per scenario, mean and seeds) and
    ``calibration.png`` (our reliability curve per scenario, all seeds pooled)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r.get("variant", "{}") == "{}"]
    names = sorted({r["scenario"] for r in rows})
    if not names:
        return
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(names)), 4))
    for j, (who, colour) in enumerate((("oracle", "0.6"), ("ours", "C0"), ("relion", "C3"))):
        for i, name in enumerate(names):
            entries = [r[who] for r in rows if r["scenario"] == name and "accuracy" in r.get(who, {})]
            if entries:
                acc = [e["accuracy"] for e in entries]
                x = i + (j - 1) * 0.25
                # A run that stopped short is drawn open: its accuracy is not RELION's answer.
                unfinished = any(_unfinished(e) for e in entries)
                ax.bar(x, np.mean(acc), 0.25, color="none" if unfinished else colour, edgecolor=colour,
                       hatch="//" if unfinished else None)
                ax.plot([x] * len(acc), acc, "k.", ms=3)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in ("0.6", "C0", "C3")]
    handles.append(plt.Rectangle((0, 0), 1, 1, facecolor="none", edgecolor="C3", hatch="//"))
    ax.legend(handles, ["oracle ceiling", "hetero_dask (defaults)", "RELION Class3D",
                        "RELION, unfinished run (its last iteration)"], loc="lower center", bbox_to_anchor=(0.5, 1.0),
              ncol=4, fontsize=8, frameon=False)
    ax.set_xticks(range(len(names)), [n.replace("_", "\n") for n in names], fontsize=7)
    ax.set_ylim(0, 1)
    ax.set_ylabel("class accuracy")
    fig.tight_layout()
    fig.savefig(folder / "accuracy.png", dpi=120, bbox_inches="tight")
    plt.close(fig)

    fig, axes = plt.subplots(1, len(names), figsize=(2.4 * len(names), 2.6), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        cal = [r["ours"]["calibration"] for r in rows if r["scenario"] == name and "ours" in r]
        count = np.sum([c["count"] for c in cal], axis=0)
        mean = np.sum([np.multiply(c["mean_posterior"], c["count"]) for c in cal], axis=0) / np.maximum(count, 1)
        right = np.sum([np.multiply(c["fraction_right"], c["count"]) for c in cal], axis=0) / np.maximum(count, 1)
        ok = count > 0
        ax.plot([0, 1], [0, 1], color="0.7", lw=1)
        ax.plot(mean[ok], right[ok], "o-", ms=3)
        ece = np.mean([c["ece"] for c in cal])
        ax.set_title(f"{name}\nECE {ece:.3f}", fontsize=7)
        ax.set_xlim(0.3, 1)
        ax.set_ylim(0, 1)
        ax.tick_params(labelsize=6)
    axes[0][0].set_xlabel("class posterior", fontsize=7)
    axes[0][0].set_ylabel("fraction right", fontsize=7)
    fig.tight_layout()
    fig.savefig(folder / "calibration.png", dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenarios", nargs="+", default=[n for n in S.SCENARIOS if n not in LARGE],
                    choices=list(S.SCENARIOS), help="default: all but the large one")
    ap.add_argument("--seeds", nargs="+", type=int, default=[10, 11, 12, 13, 14])
    ap.add_argument("--params", default="{}", help="JSON of RefineParams fields to change (a variant)")
    ap.add_argument("--workers", type=int, default=0, help="0: the in-process scheduler")
    ap.add_argument("--relion", action="store_true", help="run RELION Class3D too")
    ap.add_argument("--relion-iter", type=int, default=25)
    ap.add_argument("--relion-refine", default="relion_refine",
                    help="the relion_refine to run (e.g. one built with -DALTCPU=ON for its vectorised CPU code)")
    ap.add_argument("--relion-args", default="", help="more relion_refine arguments, e.g. '--cpu'")
    ap.add_argument("--relion-subsets", nargs="+", type=int, default=[400, 800], metavar="N",
                    help="the large scenario: RELION's first iteration on random subsets of these sizes, "
                         "extrapolated to every particle")
    ap.add_argument("--skip-oracle", action="store_true")
    ap.add_argument("--skip-ours", action="store_true")
    ap.add_argument("--data", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "hetero_dask_realistic",
                    help="built data sets (kept and reused)")
    ap.add_argument("--work", type=Path, default=None, help="run folders (default: DATA/runs)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "realistic")
    ap.add_argument("--relion-progress", action="store_true",
                    help="run nothing: score every finished iteration of the RELION runs in --work")
    ap.add_argument("--record", action="store_true",
                    help="with --relion-progress: put each run's last finished iteration into --out's "
                         "results as RELION's entry (marked unfinished where it stopped short); never "
                         "in place of a finished run's entry or of a stopped run's that got further")
    ap.add_argument("--merge", type=Path, nargs="+", default=None, metavar="DIR",
                    help="run nothing: merge DIR/results.json (runs written elsewhere with --out, e.g. "
                         "side by side) into --out's, each run replacing what it measured")
    args = ap.parse_args()
    if args.record and not args.relion_progress:
        ap.error("--record goes with --relion-progress (it records the runs that option scores)")
    args.work = args.work or args.data / "runs"
    if args.relion_progress and not args.record:
        relion_progress(args)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "results.json"
    rows = json.loads(log.read_text()) if log.exists() else []
    if args.relion_progress:
        for row in relion_progress(args):
            reason = _recorded_further(rows, row)
            if reason:
                print(f"--record: {row['scenario']} seed {row['seed']} not recorded: {reason}", flush=True)
            else:
                _put(rows, row)
        _write(rows, args.out)
        return
    if args.merge:
        for folder in args.merge:
            for row in json.loads((folder / "results.json").read_text()):
                _put(rows, row)
        _write(rows, args.out)
        print((args.out / "results.md").read_text())
        return
    for name in args.scenarios:
        for seed in args.seeds:
            print(f"{name} seed {seed} {args.params}", flush=True)
            _put(rows, run_case(name, seed, args))
            _write(rows, args.out)
    print((args.out / "results.md").read_text())


def _put(rows: list[dict], row: dict) -> None:
    """Add ``row``; a rerun of the same scenario, seed and variant replaces what it measured
    again and keeps the rest (e.g. RELION's figures, or the oracle's under --skip-oracle)."""
    same = _same_case(rows, row)
    if same:
        same[0].update(row)
    else:
        rows.append(row)


def _same_case(rows: list[dict], row: dict) -> list[dict]:
    """The rows of ``row``'s scenario, seed and variant."""
    key = (row["scenario"], row["seed"], row.get("variant", "{}"))
    return [r for r in rows if (r["scenario"], r["seed"], r.get("variant", "{}")) == key]


def _recorded_further(rows: list[dict], row: dict) -> str | None:
    """Why ``row``'s RELION entry (a run scored by --relion-progress) must not replace the one
    ``rows`` already hold for its scenario, seed and variant: that one is a finished run, or a
    stopped run that got further (e.g. an earlier run of the same case, its folder reused).
    None when it may."""
    for r in _same_case(rows, row):
        old = r.get("relion", {})
        if old.get("accuracy") is None or old.get("extrapolated"):
            continue
        if not _unfinished(old):
            return "the results hold a finished run of it"
        if old["measured_iterations"] > row["relion"]["measured_iterations"]:
            return (f"the results hold a run stopped after {old['measured_iterations']} iterations, "
                    f"this one after {row['relion']['measured_iterations']}")
    return None


def _write(rows: list[dict], out: Path) -> None:
    """``results.json``, ``results.md`` and the plots in ``out``."""
    (out / "results.json").write_text(json.dumps(rows, indent=1, default=str))
    write_table(rows, out / "results.md")
    write_plots(rows, out)


if __name__ == "__main__":
    main()

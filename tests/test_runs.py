"""Runs a user can trust: checks before work, one run per folder, resume, interrupts, progress.

Each test drives the ``hetero-dask`` command (in a subprocess where the terminal,
signals or stderr matter) on a small simulated two-state set, and asserts what a
user sees and what is left on disk.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from hetero_dask.cli import main
from hetero_dask.io.mrc import write_map
from hetero_dask.phantoms import moving_domain_phantoms
from hetero_dask.simulate import simulate, write_references, write_simulation

ROOT = Path(__file__).resolve().parents[1]
BOX, PSIZE = 32, 4.0
# Small and quick: 4 iterations at most (1 random, 1 free, 2 final passes), coarse poses.
FAST = ["--box", "32", "--batch-size", "100", "--iterations", "4", "--random-iterations", "1",
        "--max-order", "2", "--workers", "1", "--no-dashboard"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("runs")
    vols = moving_domain_phantoms(BOX, PSIZE, n_classes=2)
    sim = simulate(vols, PSIZE, 150, snr=0.5, seed=2, shift_range_px=1.0)
    paths = write_simulation(d / "sim", sim, vols)
    refs = write_references(d / "refs", vols, PSIZE)
    return d, str(paths["cs"]), refs


def hetero_dask(*args, cwd=None, timeout=300, **kw):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "hetero_dask.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env=env, **kw)


def snapshot(folder: Path) -> dict:
    """Every file under ``folder`` with its content hash and modification time."""
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def refine_args(data, out, *extra):
    d, cs, refs = data
    return ["refine", "--particles", cs, "--volumes", *refs, "--out", str(out), *FAST, *extra]


@pytest.fixture(scope="module")
def finished(data):
    """A refinement run to its end by the CLI, stderr not a terminal."""
    out = data[0] / "finished"
    res = hetero_dask(*refine_args(data, out))
    assert res.returncode == 0, res.stderr
    return out, res


# ---------------------------------------------------------------------------- checks first


def with_options(args: list, **options) -> list:
    """``args`` with ``--name value`` set (replaced when present); ``volumes`` replaces all maps."""
    args = list(args)
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        i = args.index(flag) if flag in args else None
        if name == "volumes":
            end = next((j for j in range(i + 1, len(args)) if args[j].startswith("--")), len(args))
            args[i + 1:end] = [value]
        elif i is None:
            args += [flag, value]
        else:
            args[i + 1] = value
    return args


def test_bad_inputs_are_refused_before_any_cluster_or_write(data, tmp_path, capsys):
    out = tmp_path / "out"
    cases = [
        ({"volumes": str(tmp_path / "missing.mrc")}, r"--volumes: .*missing\.mrc: not found"),
        ({"box": "63"}, r"--box \(refine_box\) = 63: expected an even number"),
        ({"box": "128"}, r"--box \(refine_box\) = 128: expected at most twice the particles' box 32"),
        ({"symmetry": "X9"}, r"--symmetry \(symmetry\) = 'X9'"),
        ({"search_poses": "0"}, r"--search-poses \(search_max_poses\) = 0: expected a whole number >= 1"),
        ({"mask_diameter": "500"}, r"--mask-diameter \(mask_diameter_A\) = 500.0: expected a diameter"),
        ({"iterations": "3", "random_iterations": "5"},
         r"--iterations \(max_iterations\) = 3: expected >= 7: the 5 random-assignment"),
        ({"particles": str(tmp_path / "none.star")}, r"--particles: .*none\.star: not found"),
    ]
    for change, message in cases:
        assert main(with_options(refine_args(data, out), **change)) == 2
        captured = capsys.readouterr()
        assert re.search(message, captured.err), (message, captured.err)
        assert "Dask scheduler" not in captured.out, "a cluster was started before the checks"
        assert not out.exists(), f"{change}: a failed start left {out}"


def test_volumes_of_another_field_of_view_are_refused(data, tmp_path, capsys):
    d, cs, refs = data
    small = tmp_path / "small.mrc"
    write_map(small, np.zeros((24, 24, 24), np.float32), PSIZE)  # 96 A, the particles span 128 A
    assert main(["refine", "--particles", cs, "--volumes", str(small), str(small), "--out",
                 str(tmp_path / "o"), *FAST]) == 2
    err = capsys.readouterr().err
    assert "--volumes" in err and "the maps span 96 A" in err and "particles 128 A" in err
    assert not (tmp_path / "o").exists()


def test_one_box_rule_for_every_job(finished, tmp_path, capsys):
    out, _ = finished
    assert main(["reconstruct", "--particles", str(out / "particles.cs"), "--out", str(tmp_path / "r"),
                 "--box", "63", "--no-dashboard"]) == 2
    assert "--box (box_size) = 63: expected an even number of pixels >= 16" in capsys.readouterr().err
    assert main(["regroup", "--particles", str(out / "particles.cs"), "--volumes", str(out / "volumes.zip"),
                 "--superclasses", "1", "--crop-box", "15", "--out", str(tmp_path / "g")]) == 2
    assert "--crop-box (crop_box) = 15: expected an even number of pixels >= 16" in capsys.readouterr().err
    assert main(["regroup", "--particles", str(out / "particles.cs"), "--volumes", str(out / "volumes.zip"),
                 "--superclasses", "4", "--out", str(tmp_path / "g")]) == 2
    assert "--superclasses (num_superclasses) = 4: expected 1..1" in capsys.readouterr().err
    assert not (tmp_path / "r").exists() and not (tmp_path / "g").exists()


# ---------------------------------------------------------------------------- one run per folder


def test_finished_run_reports_plainly(finished):
    out, res = finished
    lines = [line for line in res.stderr.splitlines() if line.startswith("iteration ")]
    assert lines and all(" of at most 4 " in line and " left)" in line for line in lines), res.stderr
    report = json.loads((out / "report.json").read_text())
    assert len(report["iterations"]) == len(lines) <= 4  # --iterations is the total, passes included
    assert report["refine_box"] == BOX
    summary = res.stdout.strip().splitlines()
    assert summary[0].startswith("Heterogeneous Refinement: 300 particles into 2 classes")
    assert ("converged after iteration" in summary[0]) or ("stopped by the cap of 4 iterations" in summary[0])
    assert [s.split(":")[0] for s in summary[1:3]] == ["  class 0", "  class 1"]
    assert summary[-1] == f"report: {(out / 'report.html').resolve()}"
    status = hetero_dask("status", str(out))
    assert status.returncode == 0, status.stderr
    assert status.stdout.splitlines()[0] == f"{out}: Heterogeneous Refinement, finished"
    assert summary[0] in status.stdout


def test_a_run_folder_is_never_changed_by_another_run(data, finished, capsys):
    out, _ = finished
    before = snapshot(out)
    assert main(refine_args(data, out)) == 2  # no --resume
    assert "already holds a Heterogeneous Refinement (finished)" in capsys.readouterr().err
    assert main(refine_args(data, out, "--resume", "--seed", "5")) == 2
    assert "--seed (seed) 0 -> 5" in capsys.readouterr().err
    assert main(refine_args(data, out, "--resume")) == 0  # finished: said so, nothing changed
    captured = capsys.readouterr()
    assert "finished already; nothing to resume" in captured.err
    assert "Heterogeneous Refinement: 300 particles" in captured.out
    assert main(["reconstruct", "--particles", data[1], "--out", str(out)]) == 2
    assert "holds a Heterogeneous Refinement run, not a Heterogeneous Reconstruction Only" in capsys.readouterr().err
    assert snapshot(out) == before


def test_resume_needs_a_run_and_the_same_inputs(data, finished, tmp_path, capsys):
    out, _ = finished
    assert main(refine_args(data, tmp_path / "nothing", "--resume")) == 2
    assert "holds no run to resume" in capsys.readouterr().err
    assert not (tmp_path / "nothing").exists()
    other = tmp_path / "other.mrc"
    from hetero_dask.io.mrc import read_map

    v, p = read_map(data[2][0])
    write_map(other, 2 * v, p)
    args = refine_args(data, out, "--resume")
    args[args.index("--volumes") + 1] = str(other)
    before = snapshot(out)
    assert main(args) == 2
    assert "--volumes" in capsys.readouterr().err
    assert snapshot(out) == before
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    assert main(refine_args(data, busy)) == 2
    assert "is not empty and holds no hetero_dask run" in capsys.readouterr().err


# ---------------------------------------------------------------------------- paths


def test_output_particles_are_the_next_jobs_input(finished, tmp_path, monkeypatch):
    """refine's particles.cs (stacks elsewhere, relative in the input) read by reconstruct
    from another folder, with no --stack-dir."""
    out, _ = finished
    monkeypatch.chdir(tmp_path)
    assert main(["reconstruct", "--particles", str(out / "particles.cs"), "--out", "rec", "--hard",
                 "--workers", "1", "--no-dashboard"]) == 0
    assert (tmp_path / "rec" / "class_1" / "map.mrc").is_file()


def _star_with_image_paths(data, folder: Path, rewrite) -> Path:
    from hetero_dask.io.star import read_star, write_star

    d = data[0]
    blocks = read_star(d / "sim" / "particles.star")
    names = blocks["particles"]["rlnImageName"].str.split("@")
    blocks["particles"]["rlnImageName"] = [f"{i}@{rewrite(s)}" for i, s in names]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "particles.star"
    write_star(path, blocks)
    return path


def test_stack_paths_resolve_as_relion_and_cryosparc_do(data, tmp_path, monkeypatch):
    from hetero_dask.io.cs import read_cs, with_fields, write_cs
    from hetero_dask.io.particles import load_particles

    d = data[0]
    stack = d / "sim" / "particles.mrcs"
    # absolute, and ../ out of the STAR's folder: RELION reads both
    assert load_particles(_star_with_image_paths(data, tmp_path / "a", lambda s: str(stack))).n == 300
    rel = os.path.relpath(stack, tmp_path / "b")
    assert load_particles(_star_with_image_paths(data, tmp_path / "b", lambda s: rel)).n == 300
    # relative to the working directory (the RELION project folder) first
    monkeypatch.chdir(d)
    assert load_particles(_star_with_image_paths(data, tmp_path / "c", lambda s: "sim/particles.mrcs")).n == 300
    # CryoSPARC: '>' and plain project-relative paths against --stack-dir, the project folder
    t = read_cs(d / "sim" / "particles.cs")
    for name in (b">sim/particles.mrcs", b"sim/particles.mrcs"):
        write_cs(tmp_path / "p.cs", with_fields(t, {"blob/path": np.full(len(t), name)}))
        monkeypatch.chdir(tmp_path)
        assert load_particles(tmp_path / "p.cs", stack_dir=d).n == 300
    res = hetero_dask("import", "--particles", str(tmp_path / "p.cs"), "--stack-dir", str(d), "--out",
                      str(tmp_path / "s.zarr"), "--serial", "--quiet", cwd=tmp_path)
    assert res.returncode == 0, res.stderr


def test_allow_list_applies_only_where_an_operator_sets_one(data, tmp_path, monkeypatch, capsys):
    from hetero_dask.io.errors import InputError
    from hetero_dask.io.particles import load_particles

    d = data[0]
    star = _star_with_image_paths(data, tmp_path / "meta", lambda s: str(d / "sim" / "particles.mrcs"))
    assert load_particles(star).n == 300  # no allow-list: read where the file says
    monkeypatch.setenv("HETERO_DASK_ALLOWED_PATHS", str(tmp_path))
    with pytest.raises(InputError, match=r"stack .*particles\.mrcs is outside the folders this installation "
                                         r"allows.*HETERO_DASK_ALLOWED_PATHS"):
        load_particles(star)
    link = tmp_path / "meta" / "link.mrcs"
    link.symlink_to(d / "sim" / "particles.mrcs")
    with pytest.raises(InputError, match="a link to"):  # links are followed before the check
        load_particles(_star_with_image_paths(data, tmp_path / "meta2", lambda s: str(link)))
    assert main(refine_args(data, tmp_path / "out")) == 2
    assert "--particles" in capsys.readouterr().err and not (tmp_path / "out").exists()
    monkeypatch.setenv("HETERO_DASK_ALLOWED_PATHS", f"{tmp_path}{os.pathsep}{d}")
    assert load_particles(star).n == 300


# ---------------------------------------------------------------------------- interrupts


def _start(args, **kw):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    # SIGINT back to its default in the child, as in a terminal: a suite started in the
    # background by a non-interactive shell inherits SIGINT ignored, and Python keeps it so.
    return subprocess.Popen([sys.executable, "-m", "hetero_dask.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL), **kw)


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's exit is reaped by whatever init the machine runs)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _interrupt_after_first_checkpoint(proc, out: Path, sig) -> tuple[list[int], str, str]:
    deadline = time.monotonic() + 240
    while not (out / "run" / "checkpoint.json").is_file():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no checkpoint"
        time.sleep(0.05)
    workers = _children(proc.pid)
    os.killpg(proc.pid, sig)  # as a terminal's Ctrl-C or a batch system does: the whole group
    stdout, stderr = proc.communicate(timeout=120)
    return workers, stdout, stderr


@pytest.mark.parametrize("sig, rc, word", [(signal.SIGINT, 130, "interrupted"),
                                           (signal.SIGTERM, 143, "terminated (SIGTERM)")])
def test_interrupt_says_one_line_stops_workers_and_resumes(data, tmp_path, sig, rc, word):
    out = tmp_path / "run"
    args = refine_args(data, out)
    args[args.index("--iterations") + 1] = "5"
    proc = _start(args)
    workers, stdout, stderr = _interrupt_after_first_checkpoint(proc, out, sig)
    assert proc.returncode == rc, stderr
    assert workers, "the local cluster had no worker process"
    assert "Traceback" not in stderr and "Error" not in stderr, stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith(f"hetero-dask refine: {word} in iteration ") and " of at most 5; " in last, stderr
    assert last.endswith("--resume") and "continue with: hetero-dask refine --particles" in last
    assert all(line.startswith(("iteration ", "reference grey scales", "hetero-dask refine:"))
               for line in stderr.strip().splitlines()), stderr
    deadline = time.monotonic() + 10
    while [w for w in workers if _running(w)] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [w for w in workers if _running(w)], "worker processes outlived the job"
    status = json.loads((out / "run" / "status.json").read_text())
    assert status["state"] == "interrupted"
    said = hetero_dask("status", str(out)).stdout
    assert f"Heterogeneous Refinement, interrupted in iteration {status['iteration'] + 1} of at most 5" in said
    assert "--resume" in said
    if sig == signal.SIGTERM:
        return
    # --resume continues it; --quiet: no progress at all, only the summary
    res = hetero_dask(*args, "--resume", "--quiet")
    assert res.returncode == 0, res.stderr
    assert res.stderr == ""
    assert res.stdout.startswith("Heterogeneous Refinement: 300 particles")
    report = json.loads((out / "report.json").read_text())
    assert [h["iteration"] for h in report["iterations"]] == list(range(len(report["iterations"])))


# ---------------------------------------------------------------------------- the demo


def test_demo_runs_again_into_its_folder(tmp_path, monkeypatch, capsys):
    from hetero_dask.jobs import demo

    monkeypatch.setitem(demo.SIZES, "ci", demo.DemoSize(
        box=32, psize_A=4.0, n_per_class=100, snr=1.0, refine_box=32, batch_size_per_class=100,
        max_iterations=4, max_order=2))
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--size", "ci", "--workers", "1", "--quiet"]
    assert main(args) == 0
    first = json.loads((out / "demo_summary.json").read_text())
    (out / "refine" / "stale.txt").write_text("from the first run")
    assert main(args) == 0
    assert "replacing the earlier demo" in capsys.readouterr().out
    second = json.loads((out / "demo_summary.json").read_text())
    assert second["accuracy"] == first["accuracy"] and not (out / "refine" / "stale.txt").exists()
    assert main([*args, "--seed", "3", "--resume"]) == 2
    assert "ran with --size ci --seed 0" in capsys.readouterr().err
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "data.txt").write_text("x")
    assert main(["demo", "--out", str(tmp_path / "mine"), "--size", "ci"]) == 2
    assert "is not empty and holds no demo" in capsys.readouterr().err


def test_stopped_while_writing_outputs_resumes_to_the_same_result(data, finished, tmp_path, monkeypatch):
    """Stopped after its last iteration, while writing the outputs: --resume repeats that
    iteration from the checkpoint before it and ends where the uninterrupted run did."""
    from hetero_dask.io.cs import read_cs
    from hetero_dask.jobs.refine import driver as refine_module

    d, cs, refs = data
    out = tmp_path / "out"
    params = dict(refine_box=32, batch_size_per_class=100, max_iterations=4, num_random_iterations=1,
                  max_order=2, progress=False)
    real = refine_module.write_outputs

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(refine_module, "write_outputs", stopped)
    with pytest.raises(KeyboardInterrupt):
        refine_module.refine(cs, refs, out, **params)
    status = json.loads((out / "run" / "status.json").read_text())
    assert status["state"] == "interrupted" and status["message"] == "writing outputs"
    monkeypatch.setattr(refine_module, "write_outputs", real)
    report = refine_module.refine(cs, refs, out, resume=True, **params)
    reference = json.loads((finished[0] / "report.json").read_text())
    assert len(report["iterations"]) == len(reference["iterations"])
    ours = read_cs(out / "particles.cs")["alignments3D/class"]
    theirs = read_cs(finished[0] / "particles.cs")["alignments3D/class"]
    assert np.mean(ours == theirs) >= 0.99

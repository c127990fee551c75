"""The ``hetero-dask`` command: help, the info command, and the per-command module contract."""

from __future__ import annotations

import importlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hetero_dask import __version__
from hetero_dask.cli import COMMANDS, build_parser, main

ROOT = Path(__file__).resolve().parents[1]


def _run(*args, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "hetero_dask.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def test_help_runs_and_lists_commands():
    out = _run("--help")
    assert out.returncode == 0, out.stderr
    assert "usage: hetero-dask" in out.stdout
    for name in COMMANDS:
        assert name in out.stdout


def test_version():
    out = _run("--version")
    assert out.returncode == 0
    assert out.stdout.strip() == f"hetero-dask {__version__}"


def test_info_json_parses():
    out = _run("info", "--json")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["versions"]["hetero_dask"] == __version__
    assert info["versions"]["numpy"]
    assert isinstance(info["gpus"], int) and info["gpus"] >= 0
    assert isinstance(info["cpu_cores"], int) and info["cpu_cores"] >= 1
    assert "Cluster" in info["default_cluster"]


def test_bad_arguments_exit_with_usage_error():
    out = _run("no-such-command")
    assert out.returncode == 2
    assert "invalid choice" in out.stderr
    with pytest.raises(SystemExit) as exc:
        main(["info", "--no-such-flag"])
    assert exc.value.code == 2


def test_no_command_prints_help(capsys):
    assert main([]) == 0
    assert "usage: hetero-dask" in capsys.readouterr().out


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_command_module_contract(name):
    """Each command module has a one-line help docstring, add_arguments and main."""
    mod = importlib.import_module(COMMANDS[name])
    assert mod.__doc__ and mod.__doc__.strip().splitlines()[0].strip()
    assert callable(mod.add_arguments) and callable(mod.main)
    sub = build_parser()._subparsers._group_actions[0].choices[name]
    assert sub.description.startswith(mod.__doc__.strip().splitlines()[0])


def test_console_script_if_installed():
    """The installed entry point (CI installs the package) is the same program."""
    exe = shutil.which("hetero-dask")
    if exe is None:
        pytest.skip("package not installed as a console script here (pip install .)")
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "usage: hetero-dask" in out.stdout


def test_package_import_leaves_the_jobs_until_used():
    """``import hetero_dask`` loads no job (and no Dask); ``hetero_dask.refine`` loads it."""
    import subprocess
    import sys

    code = ("import sys, hetero_dask; assert 'hetero_dask.jobs.refine' not in sys.modules; "
            "assert 'distributed' not in sys.modules; hetero_dask.refine; "
            "assert 'hetero_dask.jobs.refine' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)

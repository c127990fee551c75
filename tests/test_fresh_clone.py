"""The test suite runs from a fresh clone with nothing beside it, and CI proves it.

- The real files the tests read ship in ``tests/data`` with a notice of each file's
  source and license; no test looks outside the repository for data.
- ``.ci/run`` runs the README's test command in a clean clone of HEAD made in a new
  temporary folder (no ``../shared`` there), not in the working tree.
- Local clusters take free ports, so two of them (two test sessions, or a job beside
  a user's own cluster) never fight over 8787.
"""

from __future__ import annotations

import os
import re
import socket
import stat
import subprocess
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"


def test_tests_read_only_their_own_data():
    outside = re.compile(r"\.\./shared|shared/data|HETERO_DASK_SHARED_DATA|parents\[2\]")
    hits = [f"{p.name}:{i}" for p in (ROOT / "tests").glob("*.py") if p.name != Path(__file__).name
            for i, line in enumerate(p.read_text().splitlines(), 1) if outside.search(line)]
    assert not hits, f"tests reading data from outside the repository: {hits}"


def test_every_data_file_has_its_source_and_license():
    notice = (DATA / "NOTICE.md").read_text()
    files = {p.relative_to(DATA).as_posix() for p in DATA.rglob("*") if p.is_file() and p.name != "NOTICE.md"}
    assert len(files) >= 20
    listed = {}
    for row in notice.splitlines():
        for name in re.findall(r"`((?:cryosparc|relion|maps)/[^`]+)`", row):
            listed[name] = row
    assert set(listed) == files, f"unlisted: {sorted(files - set(listed))}, missing: {sorted(set(listed) - files)}"
    for name, row in listed.items():
        assert re.search(r"\| [^|]*(GPL|BSD|CC0)[^|]*\|$", row), f"{name}: no license in its row"


def test_data_stays_out_of_the_package():
    text = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'include\s*=\s*\["hetero_dask\*"\]', text), "packages must be hetero_dask* only"
    assert not (ROOT / "hetero_dask" / "tests").exists()


def _fake(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


@pytest.mark.skipif(not (ROOT / ".git").exists(), reason="not a git checkout")
def test_ci_runs_the_readme_command_in_a_clean_clone(tmp_path):
    """.ci/run with stand-ins for pip and python: where and on what do they run?"""
    readme = (ROOT / "README.md").read_text()
    assert 'pip install ".[test]" && python -m pytest' in readme
    bin_dir, log = tmp_path / "bin", tmp_path / "log"
    bin_dir.mkdir()
    for tool in ("relion_refine", "chromium"):  # present: no apt-get
        _fake(bin_dir, tool, "exit 0\n")
    _fake(bin_dir, "pip", f'echo "pip $* in $PWD" >> {log}\n')
    _fake(bin_dir, "python", f'echo "python $* in $PWD head $(git rev-parse HEAD) '
                             f'shared $([ -e ../shared ] && echo yes || echo no)" >> {log}\n')
    (tmp_path / "tmp").mkdir()
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", TMPDIR=str(tmp_path / "tmp"))
    out = subprocess.run(["bash", str(ROOT / ".ci" / "run")], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    pip, python = log.read_text().splitlines()
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    clone = python.split(" in ")[1].split(" head ")[0]
    assert pip == f"pip install -q .[test] in {clone}"
    assert python == f"python -m pytest in {clone} head {head} shared no"
    assert Path(clone).resolve() != ROOT and str(Path(clone).resolve()).startswith(str((tmp_path / "tmp").resolve()))
    assert not list((tmp_path / "tmp").iterdir()), "the temporary clone was not removed"


def test_local_cluster_takes_free_ports():
    from distributed import Client

    from hetero_dask.runtime.cluster import make_local_cluster

    with socket.socket() as taken:
        try:  # hold 8787 (Dask's default HTTP port); if someone else holds it, the same test
            taken.bind(("", 8787))
            taken.listen()
        except OSError:
            pass
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for dashboard in (False, True):
                with make_local_cluster(workers=1, processes=False, dashboard=dashboard) as cluster, \
                        Client(cluster) as client:
                    assert client.run_on_scheduler(lambda dask_scheduler: 1) == 1
    in_use = [str(w.message) for w in caught if "already in use" in str(w.message)]
    assert not in_use, in_use

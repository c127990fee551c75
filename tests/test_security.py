"""Security of user inputs at job level: no unpickling; stack paths inside an operator's allow-list.

- Without an allow-list, stacks are read wherever the particle file says (as RELION
  and CryoSPARC do). Where an operator sets one (``HETERO_DASK_ALLOWED_PATHS``, a
  shared cluster service), ``blob/path`` entries leaving it (``../``, absolute
  paths elsewhere) are refused by ``load_particles``, by ``hetero-dask import``
  and by a job (``refine``), before any image is read or anything written.
- A ``.cs`` holding pickled Python objects is refused without being unpickled:
  the pickle's payload (it would create a folder) never runs.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest

from hetero_dask import cli
from hetero_dask.io.cs import read_cs, write_cs
from hetero_dask.io.errors import InputError
from hetero_dask.io.mrc import write_map
from hetero_dask.io.particles import load_particles
from hetero_dask.io.paths import ENV
from hetero_dask.jobs.refine import refine
from hetero_dask.phantoms import moving_domain_phantoms
from hetero_dask.simulate import simulate, write_simulation

BOX, PSIZE = 32, 4.0
PACKAGE = Path(__file__).resolve().parents[1] / "hetero_dask"


@pytest.fixture
def layout(tmp_path, monkeypatch):
    """tmp/meta/particles.cs (+ its stack), tmp/outside/particles.mrcs, tmp/work (the cwd)."""
    vols = moving_domain_phantoms(BOX, PSIZE, n_classes=1)
    sim = simulate(vols, PSIZE, 20, snr=1.0, seed=1)
    write_simulation(tmp_path / "meta", sim, vols)
    write_map(tmp_path / "ref.mrc", vols[0], PSIZE)
    (tmp_path / "outside").mkdir()
    os.link(tmp_path / "meta" / "particles.mrcs", tmp_path / "outside" / "particles.mrcs")
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    return tmp_path


def with_blob_path(layout: Path, blob_path: str) -> Path:
    table = read_cs(layout / "meta" / "particles.cs")
    dtype = [(n, table.dtype[n]) if n != "blob/path" else (n, "S256") for n in table.dtype.names]
    table = table.astype(dtype)
    table["blob/path"] = blob_path.encode()
    path = layout / "meta" / f"evil_{abs(hash(blob_path))}.cs"
    write_cs(path, table)
    return path


def escaping_paths(layout: Path) -> list[str]:
    return ["../outside/particles.mrcs", str(layout / "outside" / "particles.mrcs"),
            "sub/../../outside/particles.mrcs"]


def test_stack_paths_outside_the_allow_list_are_refused(layout, monkeypatch):
    assert len(load_particles(layout / "meta" / "particles.cs").table) == 20  # the honest file loads
    for bad in escaping_paths(layout):
        cs = with_blob_path(layout, bad)
        # No allow-list (a user's own machine): read where the file says, as RELION does.
        assert load_particles(cs, stack_dir=layout / "meta").n == 20
        monkeypatch.setenv(ENV, str(layout / "meta"))
        with pytest.raises(InputError, match="outside the folders this installation allows") as info:
            load_particles(cs, stack_dir=layout / "meta")
        assert "blob/path" in str(info.value) and ENV in str(info.value)
        monkeypatch.delenv(ENV)


def test_import_and_jobs_refuse_stack_paths_outside_the_allow_list(layout, capsys, monkeypatch):
    monkeypatch.setenv(ENV, f"{layout / 'meta'}{os.pathsep}{layout / 'work'}")
    for bad in escaping_paths(layout):
        cs = with_blob_path(layout, bad)
        out = layout / "work" / f"import_{abs(hash(bad))}"
        rc = cli.main(["import", "--particles", str(cs), "--out", str(out / "particles.zarr"), "--serial",
                       "--stack-dir", str(layout / "meta")])
        assert rc == 2 and "outside the folders this installation allows" in capsys.readouterr().err
        assert not out.exists(), "a store was written from refused stacks"
        with pytest.raises(InputError, match="outside the folders this installation allows"):
            refine(str(cs), [str(layout / "ref.mrc")] * 2, layout / "work" / "refine_out",
                   stack_dir=layout / "meta", refine_box=BOX, max_iterations=4, progress=False)
        assert not (layout / "work" / "refine_out").exists()


def test_absolute_path_refused_when_cwd_is_root(layout, monkeypatch):
    monkeypatch.chdir("/")
    monkeypatch.setenv(ENV, str(layout / "meta"))
    cs = with_blob_path(layout, str(layout / "outside" / "particles.mrcs"))
    with pytest.raises(InputError, match="outside the folders this installation allows"):
        load_particles(cs, stack_dir=layout / "meta")


class Payload:
    """Unpickling this creates ``marker`` (stands in for arbitrary code execution)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def pickled_cs(layout: Path, marker: Path) -> Path:
    """A .cs (np.save format) whose ``blob/path`` field holds pickled Python objects."""
    table = read_cs(layout / "meta" / "particles.cs")
    fields = [(n, table.dtype[n]) if n != "blob/path" else (n, object) for n in table.dtype.names]
    evil = np.empty(len(table), dtype=fields)
    for n in table.dtype.names:
        evil[n] = table[n] if n != "blob/path" else [Payload(marker)] * len(table)
    path = layout / "meta" / "pickled.cs"
    with open(path, "wb") as f:
        np.save(f, evil, allow_pickle=True)
    return path


def test_cs_with_pickled_objects_is_refused_unexecuted(layout, capsys):
    marker = layout / "payload_ran"
    cs = pickled_cs(layout, marker)
    with pytest.raises(InputError, match="pickle"):
        read_cs(cs)
    with pytest.raises(InputError, match="pickle"):
        load_particles(cs)
    rc = cli.main(["import", "--particles", str(cs), "--out", str(layout / "imp.zarr"), "--serial"])
    assert rc == 2 and "pickle" in capsys.readouterr().err
    with pytest.raises(InputError, match="pickle"):
        refine(str(cs), [str(layout / "ref.mrc")] * 2, layout / "refine_out", refine_box=BOX,
               max_iterations=4, progress=False)
    assert not marker.exists(), "the pickle payload ran"
    # Sanity of the oracle: unpickling the same file does run the payload.
    np.load(cs, allow_pickle=True)
    assert marker.is_dir()


def test_package_never_unpickles():
    """No ``allow_pickle=True``, ``pickle.load`` or ``torch.load``-style loaders in the package."""
    pattern = re.compile(r"allow_pickle\s*=\s*True|pickle\.loads?\(|cloudpickle\.loads?\(|joblib\.load\(")
    hits = [f"{p.relative_to(PACKAGE)}:{i}" for p in PACKAGE.rglob("*.py")
            for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert not hits, f"unpickling in the package: {hits}"

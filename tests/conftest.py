"""Shared fixtures: the real data files in tests/data and the RELION oracle."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parent / "data"
RELION_TOOLS = ("relion_project", "relion_reconstruct", "relion_refine")


@pytest.fixture(scope="session")
def load_benchmark():
    """``load_benchmark("bench_x")``: the script ``benchmarks/bench_x.py`` as a module (the
    benchmarks are scripts, not a package)."""
    import importlib.util  # noqa: PLC0415

    def load(name: str):
        path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Folder of real .cs/.star/.mrcs/maps written by other programs (sources: data/NOTICE.md)."""
    return DATA


def pytest_collection_modifyitems(config, items):
    """RELION-marked tests skip where RELION is absent, except in CI where that is a failure."""
    have_relion = all(shutil.which(t) for t in RELION_TOOLS)
    try:
        import cupy

        have_gpu = cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        have_gpu = False
    for item in items:
        # In CI (.ci/run installs RELION) a missing RELION must fail the run, not skip.
        if "relion" in item.keywords and not have_relion and not os.environ.get("CI"):
            item.add_marker(pytest.mark.skip(reason="RELION not installed (apt-get install -y relion)"))
        if "gpu" in item.keywords and not have_gpu:
            item.add_marker(pytest.mark.skip(reason="no CUDA GPU visible"))


@pytest.fixture(autouse=True, scope="session")
def _particle_cache(tmp_path_factory):
    """Jobs in the tests cache particle images in a temporary folder, not the user's cache
    (subprocesses inherit it); tests of the cache itself pass their own folders."""
    saved = os.environ.get("HETERO_DASK_CACHE")
    os.environ["HETERO_DASK_CACHE"] = str(tmp_path_factory.mktemp("particle-cache"))
    yield
    if saved is None:
        os.environ.pop("HETERO_DASK_CACHE", None)
    else:
        os.environ["HETERO_DASK_CACHE"] = saved


@pytest.fixture(scope="module")
def client2():
    """A client of two single-threaded workers in this process (they start in a second and
    share its module state)."""
    from distributed import Client, LocalCluster

    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=False, dashboard_address=":0"
    ) as cluster, Client(cluster) as client:
        yield client

"""Local clusters: each one's workers get its own BLAS thread count, and this process's
environment is left as it was (a later cluster of another size must not inherit it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from hetero_dask.runtime.cluster import BLAS_ENV_VARS, blas_threads_per_worker, make_local_cluster


def _blas_env() -> dict:
    return {v: os.environ.get(v) for v in BLAS_ENV_VARS}


def test_each_local_cluster_gets_its_own_blas_threads():
    from distributed import Client

    before = _blas_env()
    for workers in (1, 2):  # on 2 cores: 2 BLAS threads each, then 1
        with make_local_cluster(workers=workers, dashboard=False) as lc, Client(lc) as client:
            seen = client.run(_blas_env)
        want = str(blas_threads_per_worker(workers))
        assert all(env == dict.fromkeys(BLAS_ENV_VARS, want) for env in seen.values()), seen
        assert _blas_env() == before


def _malloc_env() -> dict:
    return {v: os.environ.get(v) for v in ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_")}


WANT_MALLOC = {"MALLOC_TRIM_THRESHOLD_": str(256 << 20), "MALLOC_MMAP_THRESHOLD_": str(32 << 20)}

WITHOUT_PROJECT_CONFIG = """
import json, os
from distributed import Client
from hetero_dask.runtime.cluster import make_local_cluster

def env():
    return {v: os.environ.get(v) for v in ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_")}

if __name__ == "__main__":
    with make_local_cluster(workers=1, dashboard=False) as lc, Client(lc) as client:
        print(json.dumps(list(client.run(env).values())))
    print(json.dumps(env()))
"""


def test_workers_keep_glibc_reusing_freed_memory(tmp_path):
    """Dask's trim threshold (64 KiB) gives every freed heap top back to the system and fixes
    glibc's mmap threshold at 128 KiB (every larger array a fresh, page-faulted mapping: the
    E-step ran 2-3x slower in a worker); local clusters keep 256 MiB of freed heap and set the
    mmap threshold to glibc's dynamic ceiling, with the project's Dask configuration and without
    it (an installed package does not find deploy/dask.yaml), and leave this process's alone."""
    from distributed import Client

    before = _malloc_env()
    with make_local_cluster(workers=1, dashboard=False) as lc, Client(lc) as client:
        seen = client.run(_malloc_env)
    assert all(env == WANT_MALLOC for env in seen.values()), seen
    assert _malloc_env() == before

    script, empty = tmp_path / "cluster.py", tmp_path / "empty.yaml"
    script.write_text(WITHOUT_PROJECT_CONFIG)
    empty.write_text("{}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, check=True,
                         env={**env, "HETERO_DASK_DASK_CONFIG": str(empty)}).stdout.splitlines()
    workers, driver = json.loads(out[-2]), json.loads(out[-1])
    assert workers == [WANT_MALLOC], workers
    assert driver["MALLOC_MMAP_THRESHOLD_"] is None  # (Dask's nanny leaves its own trim setting)

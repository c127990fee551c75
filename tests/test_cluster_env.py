"""Local clusters: each one's workers get its own BLAS thread count, and this process's
environment is left as it was (a later cluster of another size must not inherit it)."""

from __future__ import annotations

import os

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


def test_workers_keep_glibc_reusing_arrays_below_32_mib():
    """Dask's trim threshold alone fixes glibc's mmap threshold at 128 KiB (every larger array
    a fresh, page-faulted mapping: the E-step ran 2-3x slower in a worker); the project's
    configuration sets the mmap threshold back to glibc's dynamic ceiling."""
    from distributed import Client

    with make_local_cluster(workers=1, dashboard=False) as lc, Client(lc) as client:
        seen = client.run(_malloc_env)
    assert all(env == {"MALLOC_TRIM_THRESHOLD_": "65536", "MALLOC_MMAP_THRESHOLD_": str(32 << 20)}
               for env in seen.values()), seen

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

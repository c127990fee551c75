"""Print versions, whether GPUs and dask-cuda are usable, and the cluster a job would start."""

from __future__ import annotations

import argparse
import importlib
import json
import os
from importlib import metadata


def gather() -> dict:
    """Versions of the stack and what the local machine offers."""
    from hetero_dask import __version__
    from hetero_dask.core.backend import gpu_available

    versions = {"hetero_dask": __version__}
    for name in ("numpy", "scipy", "dask", "distributed", "zarr", "mrcfile", "starfile", "cupy", "dask_cuda"):
        try:
            importlib.import_module(name)
            versions[name] = metadata.version(name.replace("_", "-"))
        except Exception:
            versions[name] = None
    gpu = gpu_available()
    n_gpu = 0
    if gpu:
        import cupy

        n_gpu = cupy.cuda.runtime.getDeviceCount()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if gpu and versions["dask_cuda"]:
        cluster = f"dask_cuda.LocalCUDACluster with {n_gpu} worker(s), one per GPU"
    else:
        cluster = f"distributed.LocalCluster with {cores} single-threaded worker process(es) (numpy)"
    return {"versions": versions, "gpus": n_gpu, "cpu_cores": cores, "default_cluster": cluster}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")


def main(args: argparse.Namespace) -> int:
    info = gather()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for k, v in info["versions"].items():
        print(f"{k:14s} {v if v else 'not installed'}")
    print(f"{'GPUs':14s} {info['gpus']}")
    print(f"{'CPU cores':14s} {info['cpu_cores']}")
    print(f"{'cluster':14s} {info['default_cluster']}")
    return 0

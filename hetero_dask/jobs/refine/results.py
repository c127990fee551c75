"""The run's per-particle results (``run/results.zarr``) and how the particles are cut to write them.

The arrays are chunked by ``ALIGN`` rows, and batches and E-step tasks start on
multiples of it: no two tasks write one chunk.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr

from hetero_dask.core.backend import to_host
from hetero_dask.core.rotations import matrix_to_pose
from hetero_dask.runtime.engine import Partition, partition_ranges

ALIGN = 128  # rows per chunk of the per-particle result arrays: partitions start on multiples
# Particles per E-step task. Fixed by the data, never by the cluster: the partitions and the
# tree that sums their grids are then the same on any number of workers, and so are the
# float32 sums, which an EM run would otherwise amplify into different classes.
PARTITION_ROWS = 4 * ALIGN


def batch_rows(n_particles: int, n_classes: int, batch_size_per_class: int) -> int:
    """Particles per online-EM batch: ``batch_size_per_class`` per class, in whole chunks."""
    return min(n_particles, max(ALIGN, _round_up(batch_size_per_class * n_classes, ALIGN)))


def partitions(start: int, stop: int) -> list[Partition]:
    """The E-step tasks of particles ``[start, stop)``: ``PARTITION_ROWS`` each, on chunk boundaries."""
    n_parts = max(1, math.ceil((stop - start) / PARTITION_ROWS))
    return [Partition(i, start + a, start + b) for i, (_, a, b) in
            enumerate(partition_ranges(stop - start, n_parts, align=ALIGN))]


def _round_up(x: int, a: int) -> int:
    return -(-x // a) * a


def init_results(path: Path, N: int, K: int, resume: bool) -> Path:
    """The results of ``N`` particles and ``K`` classes: new, or kept when resuming."""
    if resume and path.exists():
        return path
    g = zarr.open_group(path, mode="w")
    c = (ALIGN,)
    g.create_array("best_class", shape=(N,), chunks=c, dtype="i4", fill_value=-1)
    g.create_array("previous_class", shape=(N,), chunks=c, dtype="i4", fill_value=-1)
    g.create_array("class_iteration", shape=(N,), chunks=c, dtype="i4", fill_value=-1)
    g.create_array("class_posterior", shape=(N, K), chunks=c + (K,), dtype="f4", fill_value=0)
    g.create_array("previous_posterior", shape=(N, K), chunks=c + (K,), dtype="f4", fill_value=0)
    g.create_array("pose", shape=(N, K, 3), chunks=c + (K, 3), dtype="f4", fill_value=0)
    g.create_array("shift", shape=(N, K, 2), chunks=c + (K, 2), dtype="f4", fill_value=0)
    g.create_array("ll", shape=(N, K), chunks=c + (K,), dtype="f4", fill_value=0)
    g.create_array("alpha", shape=(N, K), chunks=c + (K,), dtype="f4", fill_value=0)
    g.create_array("pose_ess", shape=(N, K), chunks=c + (K,), dtype="f4", fill_value=0)
    return path


@dataclass
class TaskResults:
    """One task's per-particle results: ``B`` particles, ``K`` classes, float32 on the host."""

    posterior: np.ndarray  # (B, K) class posteriors
    rotation: np.ndarray  # (B, K, 3, 3) best pose per class
    shift_px: np.ndarray  # (B, K, 2)
    ll: np.ndarray  # (B, K) log-likelihood at the best pose
    alpha: np.ndarray  # (B, K) grey scale at the best pose
    pose_ess: np.ndarray  # (B, K) effective number of poses

    @classmethod
    def empty(cls, B: int, K: int) -> TaskResults:
        return cls(np.zeros((B, K), np.float32), np.zeros((B, K, 3, 3), np.float32), np.zeros((B, K, 2), np.float32),
                   np.zeros((B, K), np.float32), np.zeros((B, K), np.float32), np.zeros((B, K), np.float32))

    def put(self, rows: np.ndarray, posterior: np.ndarray, res) -> None:
        """Results of particles ``rows`` (of this task): their class ``posterior`` and the
        E-step's result ``res`` (:func:`hetero_dask.core.search.estep`)."""
        self.posterior[rows] = posterior
        self.rotation[rows] = to_host(res.rotation)
        self.shift_px[rows] = to_host(res.shift_px)
        self.ll[rows] = to_host(res.ll_best)
        self.alpha[rows] = to_host(res.alpha)
        self.pose_ess[rows] = to_host(res.pose_ess)


def previous_classes(group, start: int, stop: int, iteration: int) -> tuple[np.ndarray, np.ndarray]:
    """Best classes ``(B,)`` (-1: never seen) and posteriors ``(B, K)`` of particles
    ``[start, stop)`` before ``iteration``.

    A task re-run (worker loss, resume) finds its own iteration's classes already
    written: it then compares against the classes those replaced, so the change
    fraction (and the convergence decision) does not depend on re-runs.
    """
    rerun = group["class_iteration"][start:stop] == iteration
    prev = np.where(rerun, group["previous_class"][start:stop], group["best_class"][start:stop])
    prev_post = np.where(rerun[:, None], group["previous_posterior"][start:stop],
                         group["class_posterior"][start:stop])
    return prev, prev_post


def write_results(group, start: int, iteration: int, prev: np.ndarray, prev_post: np.ndarray,
                  found: TaskResults) -> None:
    """Write a task's results from row ``start``, with the classes they replace (:func:`previous_classes`)."""
    B, K = found.posterior.shape
    stop = start + B
    group["previous_class"][start:stop] = prev
    group["previous_posterior"][start:stop] = prev_post
    group["class_iteration"][start:stop] = np.full(B, iteration, np.int32)
    group["best_class"][start:stop] = found.posterior.argmax(axis=1).astype(np.int32)
    group["class_posterior"][start:stop] = found.posterior
    group["pose"][start:stop] = matrix_to_pose(found.rotation.reshape(-1, 3, 3)).reshape(B, K, 3).astype(np.float32)
    group["shift"][start:stop] = found.shift_px
    group["ll"][start:stop] = found.ll
    group["alpha"][start:stop] = found.alpha
    group["pose_ess"][start:stop] = found.pose_ess

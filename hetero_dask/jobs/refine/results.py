"""The run's per-particle results (``run/results.zarr``) and how the particles are cut to write them.

The arrays are chunked by ``ALIGN`` rows, and batches and E-step tasks start on
multiples of it: no two tasks write one chunk.
"""

from __future__ import annotations

import math
from pathlib import Path

import zarr

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

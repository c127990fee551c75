"""Which class goes where: class sizes, the classes clustered, superclasses and their references.

Superclasses are numbered by size: superclass 0 holds the most particles. Each
superclass's reference is its largest class; with ``align_pairs`` every member
is moved (and hand-flipped) onto it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hetero_dask.core.spectral import SpectralResult, correlation_distance, spectral_cluster

from .params import RegroupParams


def class_assignments(table: np.ndarray, n_volumes: int, source="particles"):
    """Class of each particle (argmax of the posteriors) and the layout it came from.

    Returns (labels (N,) int64, layout or None). With a per-class layout the number
    of classes must equal ``n_volumes``; with only ``alignments3D/class`` every
    label must be < ``n_volumes``.
    """
    from hetero_dask.io.cs import class_posteriors, detect_class_layouts
    from hetero_dask.io.errors import InputError

    layouts = detect_class_layouts(table)
    if layouts:
        layout = next(iter(layouts))
        k = layouts[layout]
        if k != n_volumes:
            raise InputError(
                source,
                f"the particles have {k} classes ({layout}) but {n_volumes} volumes were given",
                expected="one volume per class, in class order",
            )
        return np.argmax(class_posteriors(table, layout), axis=1).astype(np.int64), layout
    if "alignments3D/class" not in (table.dtype.names or ()):
        raise InputError(
            source,
            "no class assignments",
            expected="alignments_class_k/*, alignments_class3D_k/*, alignments3D_multi/* "
            "or alignments3D/class (rlnClassNumber in STAR)",
        )
    labels = np.asarray(table["alignments3D/class"], dtype=np.int64)
    if len(labels) and labels.max() >= n_volumes:
        raise InputError(
            source,
            f"particles are in class {int(labels.max())} but only {n_volumes} volumes were given",
            field="alignments3D/class",
            expected=f"class indices 0..{n_volumes - 1}",
        )
    return labels, None


def select_classes(sizes: np.ndarray, params: RegroupParams) -> np.ndarray:
    """Indices of the classes to cluster; checks exclusions and M against them."""
    from hetero_dask.jobs.preflight import bad_value, option

    k = len(sizes)
    bad = [c for c in params.exclude_classes if c >= k]
    if bad:
        raise bad_value(
            "exclude_classes", bad, f"existing classes: there are {k}, indices 0..{k - 1}"
        )
    keep = np.ones(k, dtype=bool)
    keep[list(params.exclude_classes)] = False
    keep &= sizes >= params.min_class_size
    included = np.flatnonzero(keep)
    if len(included) == 0:
        raise ValueError(
            f"regroup: every class is set aside (excluded {sorted(params.exclude_classes)}, "
            f"{option('min_class_size')} {params.min_class_size}, sizes {sizes.tolist()}): "
            "nothing to regroup"
        )
    m = params.num_superclasses
    if not 1 <= m <= len(included) - 1:
        raise bad_value(
            "num_superclasses", m, f"1..{len(included) - 1} (with {len(included)} included classes)"
        )
    holding = int(np.count_nonzero(sizes[included]))
    if params.weight_by_size and holding < m:
        raise bad_value(
            "num_superclasses",
            m,
            f"at most {holding}: only {holding} included classes hold particles "
            f"({option('min_class_size')} {params.min_class_size}); weighing classes by their "
            "particles needs at least one per superclass (raise --min-class-size or use "
            "--count-classes-once)",
        )
    return included


def order_superclasses(labels, sizes) -> np.ndarray:
    """Renumber clusters so superclass 0 has the most particles (ties: lowest first class)."""
    m = int(labels.max()) + 1
    totals = np.array([sizes[labels == s].sum() for s in range(m)])
    first = np.array([np.flatnonzero(labels == s)[0] for s in range(m)])
    order = np.lexsort((first, -totals))
    new = np.empty(m, dtype=np.int64)
    new[order] = np.arange(m)
    return new[labels]


def superclass_references(superclass, sizes) -> dict:
    """Largest member class of each superclass (ties: lowest index): {m: class index}."""
    refs = {}
    for m in sorted(set(superclass[superclass >= 0].tolist())):
        members = np.flatnonzero(superclass == m)
        refs[m] = int(members[np.argmax(sizes[members])])
    return refs


def cluster_classes(
    correlation, sizes, included, params: RegroupParams
) -> tuple[np.ndarray, SpectralResult]:
    """Spectral clustering of the included classes.

    correlation: (n_included, n_included); sizes: (K,) particles per class.
    Returns (superclass (K,), -1 for classes set aside, numbered by size; the
    spectral result with its affinity and eigenvalues).
    """
    spec = spectral_cluster(
        correlation_distance(correlation),
        params.num_superclasses,
        n_neighbors=params.affinity_neighbors,
        n_init=params.kmeans_starts,
        seed=params.random_seed,
        sizes=sizes[included] if params.weight_by_size else None,
    )
    superclass = np.full(len(sizes), -1, dtype=np.int64)
    superclass[included] = order_superclasses(spec.labels, sizes[included])
    return superclass, spec


@dataclass
class References:
    """Each superclass's reference class and how every class moves onto it.

    reference: {superclass: class index}; move_A: (K, 3) shift in A and
    flipped: (K,) hand flip that bring class k onto its reference (zero and
    False without pair alignment, and for classes set aside).
    """

    reference: dict
    move_A: np.ndarray
    flipped: np.ndarray


def references(superclass, sizes, included, shift_px=None, flipped=None, psize_A: float = 1.0):
    """The :class:`References` of a grouping.

    shift_px (n_included, n_included, 3), flipped (n_included, n_included): the
    pair alignments (entry [i, j] moves included class j onto i) in pixels of
    ``psize_A``; None without pair alignment.
    """
    refs = superclass_references(superclass, sizes)
    move_A = np.zeros((len(sizes), 3))
    flips = np.zeros(len(sizes), dtype=bool)
    if shift_px is not None:
        row = {int(c): i for i, c in enumerate(included)}
        for c in included:
            ref = row[refs[int(superclass[c])]]
            move_A[c] = shift_px[ref, row[int(c)]] * psize_A
            flips[c] = flipped[ref, row[int(c)]]
    return References(refs, move_A, flips)


def flipped_pairs(superclass, included, flipped) -> list:
    """Class pairs [i, j] (i < j) of one superclass whose best match was hand-flipped.

    flipped: (n_included, n_included), or None without pair alignment. A flip
    between unrelated maps is noise, so pairs across superclasses are left out.
    """
    if flipped is None:
        return []
    n = len(included)
    return [
        [int(included[i]), int(included[j])]
        for i, j in zip(*np.triu_indices(n, 1), strict=True)
        if flipped[i, j] and superclass[included[i]] == superclass[included[j]]
    ]

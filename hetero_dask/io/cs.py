"""CryoSPARC ``.cs`` files: numpy structured arrays, read and written without pickle.

The structured array returned by :func:`read_cs` is the project's canonical
particle table (STAR files are converted to it, see :mod:`.convert`). Field
conventions (CryoSPARC): strings are fixed-width bytes, ``uid`` is ``<u8``,
``blob/idx`` is 0-based, ``alignments*/pose`` is an axis-angle vector in
radians, ``alignments*/shift`` is in pixels at ``alignments*/psize_A``.

Per-class layouts (heterogeneous refinement and 3D classification):

* ``alignments_class_{k}/<slot field>`` for k = 0..K-1 (hetero refinement),
* ``alignments_class3D_{k}/<slot field>`` (3D classification),
* ``alignments3D_multi/{class_posterior (N,K), pose (N,K,3), shift (N,K,2),
  class (N,K), split (N,)}`` (newer CryoSPARC).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from .errors import InputError, atomic_output

# One alignment slot as CryoSPARC writes it: field -> (dtype, element shape).
SLOT_FIELDS = {
    "split": ("<u4", ()),
    "shift": ("<f4", (2,)),
    "pose": ("<f4", (3,)),
    "psize_A": ("<f4", ()),
    "error": ("<f4", ()),
    "error_min": ("<f4", ()),
    "resid_pow": ("<f4", ()),
    "slice_pow": ("<f4", ()),
    "image_pow": ("<f4", ()),
    "cross_cor": ("<f4", ()),
    "alpha": ("<f4", ()),
    "alpha_min": ("<f4", ()),
    "weight": ("<f4", ()),
    "pose_ess": ("<f4", ()),
    "shift_ess": ("<f4", ()),
    "class_posterior": ("<f4", ()),
    "class": ("<u4", ()),
    "class_ess": ("<f4", ()),
}

LAYOUT_CLASS = "alignments_class"  # alignments_class_{k}/*
LAYOUT_CLASS3D = "alignments_class3D"  # alignments_class3D_{k}/*
LAYOUT_MULTI = "alignments3D_multi"  # alignments3D_multi/* with a K axis

_NUMPY_MAGIC = b"\x93NUMPY"


# ---------------------------------------------------------------- files


def read_cs(path, mmap: bool = False) -> np.ndarray:
    """Read a ``.cs`` file as a numpy structured array ``(N,)`` (no pickle).

    ``mmap=True`` memory-maps the rows (large files). Truncated files, pickled
    object fields and non-tabular arrays raise :class:`InputError`.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            magic = f.read(len(_NUMPY_MAGIC))
    except FileNotFoundError:
        raise InputError(path, "file not found") from None
    if magic != _NUMPY_MAGIC:
        raise InputError(
            path,
            "not a numpy .cs file (no NUMPY header)",
            expected="a CryoSPARC .cs file; re-save compressed cryosparc-tools datasets "
            "with Dataset.save(path, format=NUMPY_FORMAT)",
        )
    try:
        arr = np.load(path, allow_pickle=False, mmap_mode="r" if mmap else None)
    except ValueError as err:
        if "pickle" in str(err).lower() or "object" in str(err).lower():
            raise InputError(path, "contains Python objects (pickled fields); refused") from None
        raise InputError(path, f"truncated or corrupt .cs file ({err})") from None
    except (EOFError, OSError) as err:
        raise InputError(path, f"truncated or corrupt .cs file ({err})") from None
    if arr.dtype.names is None or arr.ndim != 1:
        raise InputError(
            path,
            f"array of dtype {arr.dtype} and shape {arr.shape}",
            expected="a 1D structured array",
        )
    return arr


def write_cs(path, arr: np.ndarray) -> None:
    """Write a structured array as a ``.cs`` file atomically (``np.save`` format, no pickle)."""
    arr = np.asarray(arr)
    if arr.dtype.names is None:
        raise ValueError(f"write_cs: expected a structured array, got dtype {arr.dtype}")
    if arr.dtype.hasobject:
        raise ValueError(
            "write_cs: object fields cannot be written without pickle; use fixed-width bytes"
        )
    with atomic_output(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, np.ascontiguousarray(arr), allow_pickle=False)


# ---------------------------------------------------------------- fields


def with_fields(arr: np.ndarray, fields: dict) -> np.ndarray:
    """New structured array: every field of ``arr`` plus ``fields`` (name -> array (N, ...)).

    A name already in ``arr`` is replaced (its dtype may change); new names are
    appended in the given order. Scalars are broadcast to every row; ``str``
    arrays become fixed-width UTF-8 bytes.
    """
    n = len(arr)
    new = {}
    for name, values in fields.items():
        v = np.asarray(values)
        if v.dtype.kind == "U":
            v = np.char.encode(v, "utf-8")
        if v.dtype.hasobject:
            raise ValueError(f"with_fields: field {name!r} has object dtype")
        if v.ndim == 0:
            v = np.broadcast_to(v, (n,))
        elif v.shape[0] != n:
            raise ValueError(f"with_fields: field {name!r} has {v.shape[0]} rows, table has {n}")
        new[name] = v
    descr = []
    for name in arr.dtype.names:
        if name in new:
            v = new[name]
            descr.append((name, v.dtype.str, v.shape[1:]))
        else:
            descr.append((name, arr.dtype[name]))
    for name, v in new.items():
        if name not in arr.dtype.names:
            descr.append((name, v.dtype.str, v.shape[1:]))
    out = np.empty(n, dtype=np.dtype(descr))
    for name in arr.dtype.names:
        if name not in new:
            out[name] = arr[name]
    for name, v in new.items():
        out[name] = v
    return out


def drop_fields(arr: np.ndarray, names) -> np.ndarray:
    """New structured array without the given field names (prefixes ending in '/' drop groups)."""
    names = list(names)

    def dropped(f):
        return any(f == d or (d.endswith("/") and f.startswith(d)) for d in names)

    keep = [f for f in arr.dtype.names if not dropped(f)]
    out = np.empty(len(arr), dtype=np.dtype([(f, arr.dtype[f]) for f in keep]))
    for f in keep:
        out[f] = arr[f]
    return out


def empty_table(n: int) -> np.ndarray:
    """A table of ``n`` rows holding only ``uid`` (1..n), to build on with :func:`with_fields`."""
    out = np.empty(n, dtype=[("uid", "<u8")])
    out["uid"] = np.arange(1, n + 1, dtype=np.uint64)
    return out


# ---------------------------------------------------------------- per-class layouts


def detect_class_layouts(arr: np.ndarray) -> dict:
    """Which per-class layouts ``arr`` holds: ``{layout: K}``.

    Layout names are :data:`LAYOUT_CLASS` (``alignments_class_{k}``),
    :data:`LAYOUT_CLASS3D` (``alignments_class3D_{k}``) and :data:`LAYOUT_MULTI`
    (``alignments3D_multi``). For the numbered layouts K counts k = 0, 1, ...
    without gaps (a gap raises ``ValueError``).
    """
    found = {}
    for layout in (LAYOUT_CLASS, LAYOUT_CLASS3D):
        pat = re.compile(rf"^{layout}_(\d+)/")
        ks = sorted({int(m.group(1)) for f in arr.dtype.names if (m := pat.match(f))})
        if ks:
            if ks != list(range(len(ks))):
                raise ValueError(f"{layout}_k classes are not numbered 0..K-1: found {ks}")
            found[layout] = len(ks)
    cp = f"{LAYOUT_MULTI}/class_posterior"
    if cp in arr.dtype.names:
        shape = arr.dtype[cp].shape
        found[LAYOUT_MULTI] = int(shape[0]) if shape else 1
    return found


def class_prefix(layout: str, k: int) -> str:
    """Field prefix of class ``k`` in a numbered layout, e.g. ``alignments_class_3/``."""
    return f"{layout}_{k}/"


def get_class_alignments(arr: np.ndarray, layout: str, k: int) -> dict:
    """Fields of class ``k`` in ``layout`` as ``{slot field: array (N, ...)}``.

    For the numbered layouts every ``{layout}_{k}/*`` field is returned. For
    ``alignments3D_multi`` the K axis is sliced (pose (N,3), shift (N,2),
    class_posterior (N,), class (N,)), ``split`` is shared, and ``psize_A`` comes
    from ``alignments3D/psize_A`` when present.
    """
    names = arr.dtype.names
    if layout == LAYOUT_MULTI:
        out = {}
        for f in names:
            if not f.startswith(f"{LAYOUT_MULTI}/"):
                continue
            key = f.split("/", 1)[1]
            v = arr[f]
            out[key] = v if key == "split" or v.ndim == 1 else v[:, k]
        if "psize_A" not in out and "alignments3D/psize_A" in names:
            out["psize_A"] = arr["alignments3D/psize_A"]
        if not out:
            raise KeyError(f"no {LAYOUT_MULTI}/* fields")
        return out
    prefix = class_prefix(layout, k)
    out = {f[len(prefix) :]: arr[f] for f in names if f.startswith(prefix)}
    if not out:
        raise KeyError(f"no {prefix}* fields")
    return out


def class_posteriors(arr: np.ndarray, layout: str | None = None) -> np.ndarray:
    """Class posteriors ``(N, K)`` float32 from a per-class layout (the first found when None)."""
    layouts = detect_class_layouts(arr)
    if layout is None:
        if not layouts:
            raise KeyError(
                "no per-class layout (alignments_class_k, alignments_class3D_k, alignments3D_multi)"
            )
        layout = next(iter(layouts))
    K = layouts[layout]
    if layout == LAYOUT_MULTI:
        return np.asarray(arr[f"{LAYOUT_MULTI}/class_posterior"], dtype=np.float32).reshape(
            len(arr), K
        )
    return np.stack(
        [arr[class_prefix(layout, k) + "class_posterior"] for k in range(K)], axis=1
    ).astype(np.float32)


def slot_fields(prefix: str, n: int, **values) -> dict:
    """Full CryoSPARC alignment slot ``{prefix}{field}`` for ``n`` rows.

    ``values`` (e.g. ``pose=(N,3)``, ``shift=(N,2)``, ``psize_A``, ``class_posterior``,
    ``class_=``) fill named fields; the others are zeros of CryoSPARC's dtype.
    Pass the result to :func:`with_fields`.
    """
    if not prefix.endswith("/"):
        prefix += "/"
    values = {k.rstrip("_"): v for k, v in values.items()}
    unknown = set(values) - set(SLOT_FIELDS)
    if unknown:
        raise ValueError(f"slot_fields: unknown slot fields {sorted(unknown)}")
    out = {}
    for name, (dtype, shape) in SLOT_FIELDS.items():
        v = values.get(name, 0)
        out[prefix + name] = np.broadcast_to(np.asarray(v, dtype=dtype), (n, *shape))
    return out


def multi_class_fields(pose, shift, class_posterior, split=None) -> dict:
    """``alignments3D_multi/*`` fields: pose (N,K,3), shift (N,K,2) px, class_posterior (N,K).

    ``class`` (N,K) holds the class id of each slot (0..K-1); ``split`` (N,) is the
    half-set (zeros when None). Pass the result to :func:`with_fields`.
    """
    cp = np.asarray(class_posterior, dtype=np.float32)
    n, K = cp.shape
    p = f"{LAYOUT_MULTI}/"
    return {
        p + "class_posterior": cp,
        p + "pose": np.asarray(pose, dtype=np.float32).reshape(n, K, 3),
        p + "shift": np.asarray(shift, dtype=np.float32).reshape(n, K, 2),
        p + "class": np.broadcast_to(np.arange(K, dtype=np.uint32), (n, K)),
        p + "split": np.zeros(n, np.uint32)
        if split is None
        else np.asarray(split, dtype=np.uint32),
    }


# ---------------------------------------------------------------- blob paths


def resolve_blob_path(blob_path, *, source=None, stack_dir=None) -> Path:
    """Resolve one ``blob/path`` (or RELION stack path) to an existing file.

    Tried in order, as RELION and CryoSPARC resolve them:

    * an absolute path: as written;
    * a relative path: against the working directory (RELION's project folder),
      the folder of ``source`` (the .cs/.star file), then ``stack_dir`` (for
      CryoSPARC, the project folder: ``J19/extract/x.mrc``);
    * ``>J1/imported/x.mrcs`` (CryoSPARC export): against ``stack_dir``, the project folder;
    * last, the file's name in ``stack_dir`` (stacks moved to one folder).

    The file found must be inside the operator's allow-list when one is set
    (:mod:`hetero_dask.io.paths`). A missing file raises :class:`InputError`
    listing every place tried.
    """
    from .paths import check_allowed

    p = blob_path.decode() if isinstance(blob_path, bytes) else str(blob_path)
    where = source if source is not None else "blob/path"
    if p.startswith(">"):
        if stack_dir is None:
            raise InputError(
                where,
                f"path {p!r} is relative to the CryoSPARC project folder ('>' prefix)",
                field="blob/path",
                expected="the project folder as --stack-dir",
            )
        tried = [os.path.join(stack_dir, p[1:])]
    elif os.path.isabs(p):
        tried = [p]
    else:
        bases = [Path.cwd()] + ([Path(source).parent] if source is not None else [])
        tried = [os.path.join(b, p) for b in bases + ([Path(stack_dir)] if stack_dir is not None else [])]
    if stack_dir is not None:
        tried.append(os.path.join(stack_dir, os.path.basename(p.lstrip(">"))))
    tried = list(dict.fromkeys(os.path.normpath(os.path.abspath(t)) for t in tried))
    for cand in tried:
        if os.path.isfile(cand):
            return check_allowed(Path(cand), "stack", source=where, field="blob/path")
    hint = "" if stack_dir is not None else " (give the folder that holds the stacks as --stack-dir)"
    raise InputError(
        where, f"stack file {p!r} not found; tried: {', '.join(tried)}{hint}", field="blob/path"
    )

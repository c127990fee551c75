"""RELION STAR <-> CryoSPARC-style particle table (the canonical structured array).

Mapping (RELION -> table):

=============================================  =====================================
``rlnImageName`` ``N@stack`` (1-based, any     ``blob/path`` (bytes), ``blob/idx`` = N-1
number of digits)
``rlnImageSize`` (optics)                      ``blob/shape`` (0 when unknown)
``rlnImagePixelSize``, or 3.0                  ``blob/psize_A``, ``alignments3D/psize_A``
``rlnDetectorPixelSize*1e4/rlnMagnification``
``rlnDefocusU``, ``V``, ``Angle`` (deg)        ``ctf/df1_A``, ``df2_A``, ``df_angle_rad``
``rlnVoltage``, ``rlnSphericalAberration``,    ``ctf/accel_kv``, ``cs_mm``, ``amp_contrast``
``rlnAmplitudeContrast``
``rlnPhaseShift`` (deg), ``rlnCtfBfactor``,    ``ctf/phase_shift_rad``, ``bfactor``, ``scale``
``rlnCtfScalefactor``
``rlnAngleRot/Tilt/Psi`` (deg)                 ``alignments3D/pose`` (``euler_to_pose``)
``rlnOriginX/YAngst`` (or 3.0 ``rlnOriginX/Y``  ``alignments3D/shift`` in pixels (same sign)
in pixels)
``rlnRandomSubset`` 1/2                        ``alignments3D/split`` 0/1
``rlnClassNumber`` (1-based)                   ``alignments3D/class`` (0-based)
``rlnOpticsGroup`` (1-based)                   ``ctf/exp_group_id`` (0-based)
=============================================  =====================================

``blob/sign``: RELION particle stacks hold protein as positive density
(extraction inverts contrast), which is what the image model
``Y = CTF * projection`` (checked against ``relion_project``) expects, so STAR
particles get ``blob/sign = +1`` unless ``sign`` says otherwise. CryoSPARC
extractions are usually ``-1``. ``cs_to_star`` cannot flip stacks; it keeps
``blob/sign`` in a pass-through column.

Nothing is dropped: RELION columns without a CryoSPARC meaning are kept as
``rln/<label>`` (particle columns) and ``rlnOptics/<label>`` (optics columns,
copied to each particle) fields; CryoSPARC fields without a RELION meaning are
written to STAR as ``cs/<field>[/<flat element>]`` columns described by a
``data_hetero_dask_cs_fields`` block (RELION 3.1+ keeps unknown labels, and
ignores unknown blocks), so ``.cs -> .star -> .cs`` and ``.star -> .cs -> .star``
keep every value (floats within float32 rounding).

Refused clearly, never ignored: ``rlnCtfDataAreCtfPremultiplied = 1`` and
non-zero higher-order optics (beam tilt, odd/even Zernike, magnification
matrix; CryoSPARC ``ctf/tilt_A``, ``trefoil_A``, ``tetra_A``, ``anisomag``,
``shift_A``) unless ``allow_ignore_aberrations=True``.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd

from ..core.rotations import euler_to_pose, pose_to_euler
from .cs import with_fields
from .errors import InputError
from .star import particle_blocks

CS_SCHEMA_BLOCK = "hetero_dask_cs_fields"
ABERRATION_OPTION = "allow_ignore_aberrations=True (--allow-ignore-aberrations)"

# RELION label -> (table field, default when missing or None when required).
_CTF_REQUIRED = {
    "rlnDefocusU": "ctf/df1_A",
    "rlnDefocusV": "ctf/df2_A",
    "rlnDefocusAngle": "ctf/df_angle_rad",
    "rlnVoltage": "ctf/accel_kv",
    "rlnSphericalAberration": "ctf/cs_mm",
    "rlnAmplitudeContrast": "ctf/amp_contrast",
}
_CTF_OPTIONAL = {
    "rlnPhaseShift": ("ctf/phase_shift_rad", 0.0),
    "rlnCtfBfactor": ("ctf/bfactor", 0.0),
    "rlnCtfScalefactor": ("ctf/scale", 1.0),
}
_ANGLE_LABELS = {"rlnDefocusAngle", "rlnPhaseShift"}  # degrees in STAR, radians in the table
_EULER_LABELS = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")  # degrees
_OPTICS_LABELS = ("rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast")
_CS_ABERRATIONS = ("ctf/tilt_A", "ctf/trefoil_A", "ctf/tetra_A", "ctf/anisomag", "ctf/shift_A")
_MAGMAT_IDENTITY = {"rlnMagMat00": 1.0, "rlnMagMat01": 0.0, "rlnMagMat10": 0.0, "rlnMagMat11": 1.0}


# ---------------------------------------------------------------- checks


def _zernike_nonzero(values) -> np.ndarray:
    def nonzero(s):
        text = str(s).strip().strip("[]")
        return any(abs(float(t)) > 0 for t in text.split(",") if t.strip())

    return np.array([nonzero(s) for s in values], dtype=bool)


def check_star_optics(table: pd.DataFrame, source, allow_ignore_aberrations: bool = False) -> None:
    """Refuse CTF-premultiplied data and non-zero higher-order optics in a (merged) STAR table."""
    if "rlnCtfDataAreCtfPremultiplied" in table.columns:
        pre = np.asarray(table["rlnCtfDataAreCtfPremultiplied"], dtype=float) != 0
        if pre.any():
            raise InputError(
                source,
                f"{int(pre.sum())} particles are CTF-premultiplied (first row {int(np.argmax(pre))}); "
                "not supported",
                field="rlnCtfDataAreCtfPremultiplied",
                expected="0 (images not multiplied by their CTF)",
            )
    found = []
    for label in ("rlnBeamTiltX", "rlnBeamTiltY"):
        if label in table.columns and (np.abs(np.asarray(table[label], float)) > 1e-9).any():
            found.append(label)
    for label in ("rlnOddZernike", "rlnEvenZernike"):
        if label in table.columns and _zernike_nonzero(table[label].unique()).any():
            found.append(label)
    for label, ident in _MAGMAT_IDENTITY.items():
        if (
            label in table.columns
            and (np.abs(np.asarray(table[label], float) - ident) > 1e-9).any()
        ):
            found.append(label)
    if found and not allow_ignore_aberrations:
        raise InputError(
            source,
            f"higher-order optics terms are set ({', '.join(found)}: beam tilt / Zernike / "
            "anisotropic magnification) and are not modelled by hetero_dask",
            field=found[0],
            expected=f"zero aberrations, or {ABERRATION_OPTION} to ignore them knowingly",
        )
    if found:
        warnings.warn(f"{source}: ignoring higher-order optics {found} as requested", stacklevel=3)


def check_cs_optics(arr: np.ndarray, source, allow_ignore_aberrations: bool = False) -> None:
    """Refuse non-zero CryoSPARC higher-order optics fields (``ctf/tilt_A`` ...)."""
    found = [
        f for f in _CS_ABERRATIONS if f in arr.dtype.names and len(arr) and np.any(arr[f] != 0)
    ]
    if found and not allow_ignore_aberrations:
        raise InputError(
            source,
            f"higher-order optics fields are non-zero ({', '.join(found)}) and are not modelled "
            "by hetero_dask",
            field=found[0],
            expected=f"zeros, or {ABERRATION_OPTION} to ignore them knowingly",
        )
    if found:
        warnings.warn(f"{source}: ignoring higher-order optics {found} as requested", stacklevel=3)


# ---------------------------------------------------------------- STAR -> table


def parse_image_names(names, source=None):
    """``N@stack`` strings (1-based N, any digits; bare ``stack`` = image 1) -> (paths, idx 0-based)."""
    s = pd.Series(np.asarray(names, dtype=str))
    if s.empty:  # an empty class's subset
        return np.zeros(0, dtype=str), np.zeros(0, dtype=np.int64)
    has_at = s.str.contains("@", regex=False)
    parts = s.str.split("@", n=1, expand=True)
    if parts.shape[1] == 1:
        parts[1] = None
    paths = np.where(has_at, parts[1], parts[0]).astype(str)
    num = pd.to_numeric(parts[0].where(has_at, "1"), errors="coerce")
    bad = num.isna().to_numpy() | (num.to_numpy(dtype=float, na_value=0) < 1)
    if bad.any():
        row = int(np.argmax(bad))
        raise InputError(
            source or "STAR",
            f"bad image name {s.iloc[row]!r}",
            row=row,
            field="rlnImageName",
            expected="N@stack.mrcs with N >= 1",
        )
    return paths, num.to_numpy(dtype=np.int64) - 1


def _merged_table(optics, particles, source) -> pd.DataFrame:
    """Particles with their optics group's columns (particle columns win), in particle order."""
    if optics is None:
        return particles.reset_index(drop=True)
    if "rlnOpticsGroup" not in optics.columns:
        raise InputError(source, "optics block without rlnOpticsGroup", field="rlnOpticsGroup")
    if "rlnOpticsGroup" not in particles.columns:
        if len(optics) != 1:
            raise InputError(
                source,
                f"{len(optics)} optics groups but particles have no rlnOpticsGroup",
                field="rlnOpticsGroup",
            )
        particles = particles.assign(rlnOpticsGroup=int(optics["rlnOpticsGroup"].iloc[0]))
    groups = set(optics["rlnOpticsGroup"].astype(int))
    missing = ~particles["rlnOpticsGroup"].astype(int).isin(groups).to_numpy()
    if missing.any():
        row = int(np.argmax(missing))
        raise InputError(
            source,
            f"optics group {int(particles['rlnOpticsGroup'].iloc[row])} is not in data_optics",
            row=row,
            field="rlnOpticsGroup",
            expected=f"one of {sorted(groups)}",
        )
    extra = [c for c in optics.columns if c not in particles.columns or c == "rlnOpticsGroup"]
    opt = optics[extra].set_index("rlnOpticsGroup")
    return particles.reset_index(drop=True).join(opt, on="rlnOpticsGroup")


def _pixel_size_A(table, source, psize_A):
    if "rlnImagePixelSize" in table.columns:
        file_psize = np.asarray(table["rlnImagePixelSize"], dtype=np.float64)
        used = {"rlnImagePixelSize"}
    elif {"rlnDetectorPixelSize", "rlnMagnification"} <= set(table.columns):
        file_psize = (
            np.asarray(table["rlnDetectorPixelSize"], np.float64)
            * 1e4
            / np.asarray(table["rlnMagnification"], np.float64)
        )
        used = {"rlnDetectorPixelSize", "rlnMagnification"}
    else:
        file_psize, used = None, set()
    if psize_A is not None:
        if file_psize is not None and np.any(np.abs(file_psize - psize_A) > 1e-3 * psize_A):
            # stacklevel 4: the caller of star_to_cs (via _star_image_fields)
            warnings.warn(
                f"{source}: pixel size in the file overridden by psize_A={psize_A}", stacklevel=4
            )
        return np.full(len(table), float(psize_A)), used
    if file_psize is None:
        raise InputError(
            source,
            "no pixel size",
            field="rlnImagePixelSize",
            expected="rlnImagePixelSize (3.1+), rlnDetectorPixelSize and rlnMagnification (3.0), "
            "or psize_A (--psize-A)",
        )
    bad = ~(file_psize > 0)
    if bad.any():
        row = int(np.argmax(bad))
        raise InputError(
            source, f"pixel size {file_psize[row]}", row=row, field=sorted(used)[0], expected="> 0"
        )
    return file_psize, used


def _column_field(values: pd.Series):
    """A pass-through column as a fixed-width numpy array (ints i8, floats f8, strings bytes)."""
    v = values.to_numpy()
    if v.dtype.kind in "iub":
        return v.astype(np.int64)
    if v.dtype.kind == "f":
        return v.astype(np.float64)
    s = np.char.encode(np.asarray(v, dtype=str), "utf-8")
    return s if s.dtype.itemsize > 0 else s.astype("S1")


def _parse_shape(text) -> tuple:
    text = str(text)
    return () if text in ("-", "") else tuple(int(x) for x in text.split("x"))


def _cs_passthrough(blocks, particles) -> tuple[dict, dict]:
    """Decode ``cs/<field>[/<i>]`` columns with the schema block.

    Returns ``(fields, schema)``: the decoded fields, and ``{field: (dtype, shape)}``
    for every field of the table the STAR was written from (to restore dtypes and order).
    """
    schema_df = blocks.get(CS_SCHEMA_BLOCK)
    if not isinstance(schema_df, pd.DataFrame):
        return {}, {}
    schema = {
        str(f): (np.dtype(str(d)), _parse_shape(s))
        for f, d, s in zip(
            schema_df["hdField"], schema_df["hdDtype"], schema_df["hdShape"], strict=True
        )
    }
    out = {}
    for field, (dt, shape) in schema.items():
        size = int(np.prod(shape)) if shape else 1
        cols = [f"cs/{field}"] if not shape else [f"cs/{field}/{i}" for i in range(size)]
        if not all(c in particles.columns for c in cols):
            continue
        if dt.kind == "S":
            vals = np.char.encode(np.asarray(particles[cols[0]], dtype=str), "utf-8").astype(dt)
        else:
            vals = np.stack([particles[c].to_numpy() for c in cols], axis=-1).astype(dt)
            vals = vals.reshape(len(particles), *shape)
        out[field] = vals
    return out, schema


def _restore_schema(fields: dict, schema: dict) -> dict:
    """Cast fields to the dtypes recorded in the schema block and put them in its order."""
    out = {}
    for name, (dt, shape) in schema.items():
        if name in fields and fields[name].shape[1:] == shape:
            out[name] = fields[name].astype(dt)
    out.update({k: v for k, v in fields.items() if k not in out})
    return out


def _zero_based(column, source, label: str, what: str, valid, expected: str):
    """A 1-based RELION index column as 0-based uint32, refusing values ``valid`` rejects."""
    values = np.asarray(column, dtype=np.int64)
    bad = ~valid(values)
    if bad.any():
        row = int(np.argmax(bad))
        raise InputError(source, f"{what} {values[row]}", row=row, field=label, expected=expected)
    return (values - 1).astype(np.uint32)


def _star_image_fields(table, source, *, psize_A, sign, box) -> tuple[dict, set]:
    """``uid``, ``blob/*`` and ``ctf/exp_group_id`` fields, and the RELION labels they use."""
    n = len(table)
    used = {"rlnImageName", "rlnOpticsGroup"}
    paths, idx = parse_image_names(table["rlnImageName"], source)
    psize, psize_used = _pixel_size_A(table, source, psize_A)
    used |= psize_used
    if "rlnImageSize" in table.columns:
        box_px = np.asarray(table["rlnImageSize"], dtype=np.uint32)
        used.add("rlnImageSize")
    else:
        box_px = np.full(n, 0 if box is None else box, dtype=np.uint32)
    group = (
        np.asarray(table["rlnOpticsGroup"], dtype=np.int64)
        if "rlnOpticsGroup" in table.columns
        else np.ones(n, np.int64)
    )
    fields = {
        "uid": np.arange(1, n + 1, dtype=np.uint64),
        "blob/path": np.char.encode(paths, "utf-8"),
        "blob/idx": idx.astype(np.uint32),
        "blob/shape": np.stack([box_px, box_px], axis=1),
        "blob/psize_A": psize.astype(np.float32),
        "blob/sign": np.full(n, sign, dtype=np.float32),
        "ctf/exp_group_id": (group - 1).astype(np.uint32),
    }
    return fields, used


def _star_ctf_fields(table, source, ctf_defaults: dict | None) -> tuple[dict, set]:
    """``ctf/*`` fields (angles degrees -> radians) and the RELION labels they use.

    A missing column takes its value from ``ctf_defaults``; a missing
    required one without a default is refused.
    """
    n = len(table)
    defaults = dict(ctf_defaults or {})
    fields, used = {}, set()
    for label, field in _CTF_REQUIRED.items():
        if label in table.columns:
            v = np.asarray(table[label], dtype=np.float64)
            used.add(label)
        elif label in defaults:
            v = np.full(n, float(defaults[label]))
        else:
            raise InputError(
                source,
                "missing CTF column",
                field=label,
                expected=f"{label} in the particle or optics table, or ctf_defaults={{'{label}': value}}",
            )
        fields[field] = (np.deg2rad(v) if label in _ANGLE_LABELS else v).astype(np.float32)
    for label, (field, default) in _CTF_OPTIONAL.items():
        if label in table.columns:
            v = np.asarray(table[label], dtype=np.float64)
            used.add(label)
        else:
            v = np.full(n, float(defaults.get(label, default)))
        fields[field] = (np.deg2rad(v) if label in _ANGLE_LABELS else v).astype(np.float32)
    return fields, used


def _star_shift_px(table, a3d_psize: np.ndarray) -> tuple[np.ndarray, set]:
    """``(n, 2)`` float64 shifts in pixels and the RELION labels they use.

    ``rlnOriginX/YAngst`` (3.1+) are divided by the alignment pixel size;
    ``rlnOriginX/Y`` (3.0) are pixels already; no origin is a zero shift.
    """
    if {"rlnOriginXAngst", "rlnOriginYAngst"} <= set(table.columns):
        shift = (
            np.stack([table["rlnOriginXAngst"], table["rlnOriginYAngst"]], 1)
            / a3d_psize[:, None]
        )
        return shift, {"rlnOriginXAngst", "rlnOriginYAngst"}
    if {"rlnOriginX", "rlnOriginY"} <= set(table.columns):
        shift = np.stack([table["rlnOriginX"], table["rlnOriginY"]], 1).astype(np.float64)
        return shift, {"rlnOriginX", "rlnOriginY"}
    return np.zeros((len(table), 2)), set()


def _star_pose_fields(table, a3d_psize: np.ndarray) -> tuple[dict, set]:
    """``alignments3D/pose``, ``shift`` and ``psize_A`` from the Euler angles (degrees) and
    origins, and the RELION labels they use; nothing when an angle column is missing."""
    if not set(_EULER_LABELS) <= set(table.columns):
        return {}, set()
    rot, tilt, psi = (np.asarray(table[c], dtype=np.float64) for c in _EULER_LABELS)
    shift, used = _star_shift_px(table, a3d_psize)
    fields = {
        "alignments3D/pose": euler_to_pose(rot, tilt, psi).astype(np.float32),
        "alignments3D/shift": shift.astype(np.float32),
        "alignments3D/psize_A": a3d_psize.astype(np.float32),
    }
    return fields, used | set(_EULER_LABELS)


def _star_class_fields(table, source) -> tuple[dict, set]:
    """``alignments3D/split`` and ``class`` (0-based) from ``rlnRandomSubset`` and
    ``rlnClassNumber`` (1-based), and the labels they use; out-of-range values are refused."""
    fields, used = {}, set()
    for label, target, what, valid, expected in (
        ("rlnRandomSubset", "alignments3D/split", "half-set", lambda v: np.isin(v, (1, 2)), "1 or 2"),
        ("rlnClassNumber", "alignments3D/class", "class", lambda v: v >= 1, ">= 1 (1-based)"),
    ):
        if label in table.columns:
            fields[target] = _zero_based(table[label], source, label, what, valid, expected)
            used.add(label)
    return fields, used


def _star_passthrough_fields(table, optics, particles, used: set) -> dict:
    """The columns no field maps, kept as ``rlnOptics/<label>`` (from the optics block) or
    ``rln/<label>`` fields; ``cs/`` columns are left to :func:`_cs_passthrough`."""
    optics_cols = set() if optics is None else set(optics.columns) - set(particles.columns)
    fields = {}
    for col in table.columns:
        if col in used or col.startswith("cs/"):
            continue
        prefix = "rlnOptics/" if col in optics_cols else "rln/"
        fields[prefix + col] = _column_field(table[col])
    return fields


def star_to_cs(
    blocks: dict,
    source=None,
    *,
    psize_A: float | None = None,
    sign: float = 1.0,
    box: int | None = None,
    ctf_defaults: dict | None = None,
    allow_ignore_aberrations: bool = False,
) -> np.ndarray:
    """Particle STAR blocks (from :func:`~.star.read_star`) -> table (structured array ``(N,)``).

    ``psize_A`` overrides or supplies the pixel size; ``box`` supplies
    ``blob/shape`` when the file has no ``rlnImageSize`` (else 0 = unknown);
    ``ctf_defaults`` supplies missing CTF columns by RELION label, e.g.
    ``{"rlnAmplitudeContrast": 0.1}`` (missing ones are refused otherwise).
    ``source`` (the file name) is used in error messages.
    """
    source = source or "STAR"
    optics, particles, _ = particle_blocks(blocks, source)
    table = _merged_table(optics, particles, source)
    check_star_optics(table, source, allow_ignore_aberrations)
    fields, used = _star_image_fields(table, source, psize_A=psize_A, sign=sign, box=box)
    ctf, ctf_used = _star_ctf_fields(table, source, ctf_defaults)
    cs_fields, schema = _cs_passthrough(blocks, table)
    # shifts are in pixels of the alignment, whose size a .cs may record apart from the blob's
    a3d_psize = cs_fields.get("alignments3D/psize_A", fields["blob/psize_A"]).astype(np.float64)
    pose, pose_used = _star_pose_fields(table, a3d_psize)
    classes, class_used = _star_class_fields(table, source)
    fields = {**fields, **ctf, **pose, **classes}
    used |= ctf_used | pose_used | class_used
    fields.update(_star_passthrough_fields(table, optics, particles, used))
    fields.update(cs_fields)
    fields = _restore_schema(fields, schema)
    return with_fields(np.empty(len(table), dtype=[("uid", "<u8")]), fields)


# ---------------------------------------------------------------- table -> STAR

_MAPPED_CS = {
    "blob/path",
    "blob/idx",
    "blob/shape",
    "blob/psize_A",
    "ctf/exp_group_id",
    "ctf/accel_kv",
    "ctf/cs_mm",
    "ctf/amp_contrast",
    "ctf/df1_A",
    "ctf/df2_A",
    "ctf/df_angle_rad",
    "ctf/phase_shift_rad",
    "ctf/bfactor",
    "ctf/scale",
    "alignments3D/pose",
    "alignments3D/shift",
    "alignments3D/split",
    "alignments3D/class",
}


def _f32_decimal(x) -> np.ndarray:
    """float32 values as the float64 of their shortest decimal (2.806, not 2.80599999).

    Converted once per distinct value (particle columns repeat many values).
    """
    values, inverse = np.unique(np.asarray(x, dtype=np.float32).reshape(-1), return_inverse=True)
    return values.astype(str).astype(np.float64)[inverse.reshape(-1)].reshape(np.shape(x))


def _schema_rows(arr) -> list:
    rows = []
    for f in arr.dtype.names:
        shape = arr.dtype[f].shape
        rows.append((f, arr.dtype[f].base.str, "x".join(map(str, shape)) if shape else "-"))
    return rows


def _passthrough_columns(arr, names) -> dict:
    cols = {}
    for f in names:
        v = arr[f]
        shape = arr.dtype[f].shape
        base = arr.dtype[f].base
        if base.kind == "S":
            cols[f"cs/{f}"] = np.char.decode(v, "utf-8")
        elif not shape:
            cols[f"cs/{f}"] = v  # float32 stays float32: the STAR writer prints its shortest decimal
        else:
            flat = v.reshape(len(arr), int(np.prod(shape)))  # -1 fails on 0 rows
            for i in range(flat.shape[1]):
                cols[f"cs/{f}/{i}"] = flat[:, i]
    return cols


def _field_or(arr, name: str, default) -> np.ndarray:
    """Field ``name`` of ``arr``, or ``default`` for every row when the table lacks it."""
    return arr[name] if name in arr.dtype.names else np.full(len(arr), default)


def _require_star_fields(arr, source) -> None:
    """Refuse a table without the fields every RELION particle STAR needs (images, CTF)."""
    names = arr.dtype.names
    if "blob/path" not in names:
        raise InputError(
            source,
            "no particle images (no blob/path field); a RELION particle STAR needs rlnImageName",
            field="blob/path",
        )
    missing = [
        f
        for f in (
            "ctf/df1_A",
            "ctf/df2_A",
            "ctf/df_angle_rad",
            "ctf/accel_kv",
            "ctf/cs_mm",
            "ctf/amp_contrast",
        )
        if f not in names
    ]
    if missing:
        raise InputError(
            source, "missing CTF fields", field=missing[0], expected=", ".join(missing)
        )


def _relion_columns(arr, prefix: str) -> dict:
    """``{label: values}`` of the pass-through fields ``<prefix><label>`` (bytes as str)."""
    cols = {}
    for f in arr.dtype.names:
        if f.startswith(prefix):
            v = arr[f]
            cols[f.split("/", 1)[1]] = np.char.decode(v, "utf-8") if v.dtype.kind == "S" else v
    return cols


def _optics_keys(arr) -> pd.DataFrame:
    """Per particle, the values that tell optics groups apart (exp group, voltage, Cs,
    amplitude contrast, pixel size, box, ``rlnOptics/*``)."""
    n = len(arr)
    opt = pd.DataFrame(
        {
            "exp_group": np.asarray(_field_or(arr, "ctf/exp_group_id", 0), dtype=np.int64),
            "rlnVoltage": _f32_decimal(arr["ctf/accel_kv"]),
            "rlnSphericalAberration": _f32_decimal(arr["ctf/cs_mm"]),
            "rlnAmplitudeContrast": _f32_decimal(arr["ctf/amp_contrast"]),
            "rlnImagePixelSize": _f32_decimal(_field_or(arr, "blob/psize_A", 0.0)),
            "rlnImageSize": np.asarray(
                arr["blob/shape"][:, -1] if "blob/shape" in arr.dtype.names else np.zeros(n),
                dtype=np.int64,
            ),
        }
    )
    for label, v in _relion_columns(arr, "rlnOptics/").items():
        opt[label] = v
    return opt


def _optics_groups(opt: pd.DataFrame) -> tuple[pd.DataFrame, np.ndarray, bool]:
    """``(optics block, rlnOpticsGroup of each particle, by_group)`` from :func:`_optics_keys`.

    ``by_group``: each exp group is one optics group, numbered
    ``exp_group_id + 1``; otherwise the distinct combinations are numbered
    from 1 in order of first appearance.
    """
    combos = opt.drop_duplicates().reset_index(drop=True)
    by_group = combos["exp_group"].is_unique
    keys = list(opt.columns)
    if by_group:
        combos["rlnOpticsGroup"] = combos["exp_group"] + 1
    else:
        combos["rlnOpticsGroup"] = np.arange(1, len(combos) + 1)
    group_of_row = opt.merge(combos, on=keys, how="left")["rlnOpticsGroup"].to_numpy()
    optics = combos.drop(columns=["exp_group"]).sort_values("rlnOpticsGroup").reset_index(drop=True)
    if "rlnOpticsGroupName" not in optics.columns:
        optics.insert(
            0, "rlnOpticsGroupName", [f"opticsGroup{g}" for g in optics["rlnOpticsGroup"]]
        )
    if (optics["rlnImageSize"] == 0).all():
        optics = optics.drop(columns=["rlnImageSize"])
    else:
        optics["rlnImageDimensionality"] = optics.get("rlnImageDimensionality", 2)
    front = ["rlnOpticsGroup", "rlnOpticsGroupName"]
    return optics[front + [c for c in optics.columns if c not in front]], group_of_row, by_group


def _image_ctf_columns(arr, group_of_row: np.ndarray) -> dict:
    """``rlnImageName`` (1-based ``NNNNNN@stack``), ``rlnOpticsGroup`` and the per-particle
    CTF columns (angles radians -> degrees)."""
    idx = np.asarray(arr["blob/idx"], dtype=np.int64) + 1
    paths = np.char.decode(arr["blob/path"], "utf-8")
    return {
        "rlnImageName": pd.Series(idx.astype(str)).str.zfill(6).to_numpy(dtype=object)
        + "@"
        + paths.astype(object),
        "rlnOpticsGroup": group_of_row,
        "rlnDefocusU": _f32_decimal(arr["ctf/df1_A"]),
        "rlnDefocusV": _f32_decimal(arr["ctf/df2_A"]),
        "rlnDefocusAngle": np.rad2deg(np.asarray(arr["ctf/df_angle_rad"], np.float64)),
        "rlnPhaseShift": np.rad2deg(
            np.asarray(_field_or(arr, "ctf/phase_shift_rad", 0.0), np.float64)
        ),
        "rlnCtfBfactor": _f32_decimal(_field_or(arr, "ctf/bfactor", 0.0)),
        "rlnCtfScalefactor": _f32_decimal(_field_or(arr, "ctf/scale", 1.0)),
    }


def _alignment_columns(arr) -> dict:
    """Euler angles (degrees) and origins (A) from ``alignments3D/pose`` and ``shift``,
    ``rlnRandomSubset`` and ``rlnClassNumber`` (1-based) from ``split`` and ``class``."""
    names = arr.dtype.names
    cols = {}
    if "alignments3D/pose" in names:
        rot, tilt, psi = pose_to_euler(np.asarray(arr["alignments3D/pose"], np.float64))
        cols.update(rlnAngleRot=rot, rlnAngleTilt=tilt, rlnAnglePsi=psi)
        if "alignments3D/shift" in names:
            a3d_psize = np.asarray(_field_or(arr, "alignments3D/psize_A", 0.0), np.float64)
            shift = np.asarray(arr["alignments3D/shift"], np.float64)
            cols["rlnOriginXAngst"] = shift[:, 0] * a3d_psize
            cols["rlnOriginYAngst"] = shift[:, 1] * a3d_psize
    if "alignments3D/split" in names:
        cols["rlnRandomSubset"] = np.asarray(arr["alignments3D/split"], np.int64) + 1
    if "alignments3D/class" in names:
        cols["rlnClassNumber"] = np.asarray(arr["alignments3D/class"], np.int64) + 1
    return cols


def _unlabelled_fields(arr, by_group: bool) -> list:
    """The fields no RELION label carries in full, in table order: written as ``cs/`` columns."""
    names = arr.dtype.names
    skip = set(_MAPPED_CS)
    if "alignments3D/pose" not in names:
        skip.discard("alignments3D/shift")  # origins are written only with angles
    else:
        a3d_psize = np.asarray(_field_or(arr, "alignments3D/psize_A", 0.0), np.float64)
        if "blob/psize_A" in names and np.array_equal(a3d_psize, arr["blob/psize_A"]):
            skip.add("alignments3D/psize_A")  # rlnImagePixelSize carries it
    if not by_group:
        skip.discard("ctf/exp_group_id")  # rlnOpticsGroup does not number the exp groups
    return [f for f in names if f not in skip and not f.startswith(("rln/", "rlnOptics/"))]


def cs_to_star(arr: np.ndarray, source=None, *, keep_cs_fields: bool = True) -> dict:
    """Table -> RELION 3.1 STAR blocks ``{"optics", "particles"[, "hetero_dask_cs_fields"]}``.

    Optics groups are the distinct (exp group, voltage, Cs, amplitude contrast,
    pixel size, box, ``rlnOptics/*``) combinations; ``rlnOpticsGroup`` is
    ``ctf/exp_group_id + 1`` whenever that is unambiguous. Fields RELION has no
    label for go to ``cs/...`` columns when ``keep_cs_fields`` (lossless).
    """
    _require_star_fields(arr, source or "table")
    optics, group_of_row, by_group = _optics_groups(_optics_keys(arr))
    part = {
        **_image_ctf_columns(arr, group_of_row),
        **_alignment_columns(arr),
        **_relion_columns(arr, "rln/"),
    }
    if keep_cs_fields:
        part.update(_passthrough_columns(arr, _unlabelled_fields(arr, by_group)))
    blocks = {"optics": optics, "particles": pd.DataFrame(part)}
    if keep_cs_fields:
        blocks[CS_SCHEMA_BLOCK] = pd.DataFrame(
            _schema_rows(arr), columns=["hdField", "hdDtype", "hdShape"]
        )
    return blocks

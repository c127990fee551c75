"""RELION STAR files via ``starfile``: blocks in, blocks out.

:func:`read_star` returns ``{block name: DataFrame or dict}`` (``data_optics``
-> ``"optics"``, a bare ``data_`` -> ``""``). :func:`particle_blocks` finds the
optics and particle tables of RELION 3.0 files (no optics block; the particle
table may be called ``data_``, ``data_images``, ``data_particles`` ...) and
3.1+/5 files. Conversion to the canonical table lives in :mod:`.convert`.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import starfile

from .errors import InputError, atomic_output

# Enough digits to carry float64 values written by RELION (%12.6f / %12.6e) unchanged.
_FLOAT_FORMAT = "%.10g"


def read_star(path) -> dict:
    """Read every data block of a STAR file: ``{name: DataFrame (loops) or dict (pairs)}``."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "file not found")
    try:
        blocks = starfile.read(path, always_dict=True)
    except Exception as err:  # starfile raises assorted parser errors
        raise InputError(path, f"not a readable STAR file ({type(err).__name__}: {err})") from None
    if not blocks:
        raise InputError(path, "no data blocks", expected="at least one data_ block")
    return dict(blocks)


def write_star(path, blocks: dict) -> None:
    """Write ``{name: DataFrame or dict}`` as a STAR file atomically (loop blocks as loops)."""
    with atomic_output(path) as tmp:
        starfile.write(dict(blocks), tmp, float_format=_FLOAT_FORMAT)


def particle_blocks(blocks: dict, source=None):
    """``(optics DataFrame or None, particles DataFrame, particle block name)`` of a particle STAR.

    The particle table is ``particles`` when present, else the one table with an
    ``rlnImageName`` column. Files without one (job metadata such as
    ``postprocess.star``) raise :class:`InputError`.
    """
    tables = {k: v for k, v in blocks.items() if isinstance(v, pd.DataFrame)}
    optics = tables.get("optics")
    if "particles" in tables:
        name = "particles"
    else:
        named = [k for k, v in tables.items() if "rlnImageName" in v.columns and k != "optics"]
        if len(named) != 1:
            found = ", ".join(f"data_{k}" for k in blocks) or "none"
            raise InputError(
                source or "STAR",
                f"no particle table (blocks: {found})",
                field="rlnImageName",
                expected="one loop with rlnImageName (data_particles in RELION 3.1+)",
            )
        name = named[0]
    particles = tables[name]
    if "rlnImageName" not in particles.columns:
        raise InputError(
            source or "STAR", f"data_{name} has no rlnImageName column", field="rlnImageName"
        )
    return optics, particles, name

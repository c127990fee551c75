"""Density maps of atomic models, computed by gemmi (an independent program).

The models in ``models/`` (written by ``benchmarks/make_models.py``, which says where
each comes from) are already placed: coordinates in A relative to the particle's
centre, the states of one protein superposed. A map puts that centre at voxel
``box // 2`` on each axis, the centre our projector and RELION's rotate about.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

MODELS = Path(__file__).resolve().parent / "models"


def model_path(name: str) -> Path:
    path = MODELS / f"{name}.pdb.gz"
    if not path.exists():
        known = sorted(p.name.removesuffix(".pdb.gz") for p in MODELS.glob("*.pdb.gz"))
        raise ValueError(f"no atomic model {name!r}; known: {', '.join(known)}")
    return path


def density_map(name: str, box: int, psize_A: float, blur_B: float = 0.0,
                drop_residues: tuple[int, int] | None = None) -> np.ndarray:
    """``(box, box, box)`` float32 map ``[z, y, x]`` of model ``name`` (electron scattering factors).

    The density is computed by gemmi on a grid twice as fine, then Fourier-cropped to
    ``psize_A``, so that it is band-limited at the map's Nyquist frequency (no aliasing of
    the atoms' sharp peaks). ``blur_B`` (A^2) adds a B-factor to every atom, as the
    signal of real particles decays; ``drop_residues`` ``(first, last)`` removes those
    residues (inclusive) from every chain: a domain or subunit absent.
    """
    import gemmi  # noqa: PLC0415 (test/bench extra)

    from hetero_dask.core.fourier import fourier_resize  # noqa: PLC0415

    st = gemmi.read_structure(str(model_path(name)))
    if drop_residues is not None:
        first, last = drop_residues
        for ch in st[0]:
            for i in reversed(range(len(ch))):
                if first <= ch[i].seqid.num <= last:
                    del ch[i]
    length_A = box * psize_A
    half = gemmi.Position(length_A / 2, length_A / 2, length_A / 2)
    for ch in st[0]:
        for r in ch:
            for a in r:
                a.pos = a.pos + half
    st.cell = gemmi.UnitCell(length_A, length_A, length_A, 90, 90, 90)
    st.spacegroup_hm = "P 1"
    dc = gemmi.DensityCalculatorE()
    dc.d_min = 2 * psize_A
    dc.rate = 2.0  # grid spacing d_min / (2 rate) = psize_A / 2
    dc.blur = float(blur_B)
    dc.set_grid_cell_and_spacegroup(st)
    dc.put_model_density_on_grid(st[0])
    fine = np.array(dc.grid, copy=True).transpose(2, 1, 0)  # gemmi [x, y, z] -> [z, y, x]
    if fine.shape != (2 * box,) * 3:
        raise RuntimeError(f"gemmi made a {fine.shape} grid, expected {(2 * box,) * 3}")
    return np.asarray(fourier_resize(fine.astype(np.float32), box, ndim=3), dtype=np.float32)

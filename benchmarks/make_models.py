"""Write the atomic models of the realistic benchmark scenarios (``hetero_dask/testing/models``).

The models come from the ``MDAnalysisTests`` package (``pip install MDAnalysisTests``),
which ships coordinates of public PDB entries and an adenylate kinase (AdK) trajectory:

* ``adk_open`` / ``adk_closed``: E. coli AdK open (PDB 4AKE) and closed (PDB 1AKE),
  ``adk_open.pdb`` / ``adk_closed.pdb`` (CHARMM hydrogens added by MDAnalysis);
* ``adk_dims_<i>``: frames of ``adk_dims.dcd`` (``adk.psf``), a closed-to-open transition
  (dynamic importance sampling, 98 frames), at evenly spaced points;
* ``pr_1a28``: progesterone receptor ligand-binding domain, chain A of PDB 1A28
  (``1a28.pdb.gz``), an unrelated protein of about AdK's size (junk particles);
* ``hiv_pr``: HIV-1 protease homodimer, PDB 1HVR (``1hvr.pdb``), a C2-symmetric particle,
  turned so that its 2-fold axis is z;
* ``hiv_pr_c3``: an ARTIFICIAL C3 trimer for a symmetry whose mates fall between the pose
  grid's points: three copies of 1HVR's chain A, 120 degrees apart about z, each moved out
  along x until the copies are 3.5 A apart (no such trimer exists in nature; the models the
  package ships hold no real 3-fold).

Only protein heavy atoms are kept. The AdK models are superposed on the CORE domain's
C-alpha atoms (residues 1-29, 60-121, 160-214) and share one centre, as a consensus
refinement would align them; each other model is centred on its own atoms. Run once;
the output is committed (PDB coordinates are public domain):

    python benchmarks/make_models.py
"""

from __future__ import annotations

import argparse
import gzip
from pathlib import Path

import gemmi
import numpy as np

OUT = Path(__file__).resolve().parents[1] / "hetero_dask" / "testing" / "models"
ADK_CORE = np.r_[1:30, 60:122, 160:215]


def _protein_heavy(st: gemmi.Structure, chains=None) -> gemmi.Structure:
    # CHARMM files (the AdK ones) have no element column, and names such as HG1 or CD read
    # as mercury or cadmium: a protein atom's element is the first letter of its name.
    for ch in st[0]:
        for r in ch:
            for a in r:
                if a.name[0] in "CNOSH":
                    a.element = gemmi.Element(a.name[0])
    st.setup_entities()
    st.remove_hydrogens()
    st.remove_ligands_and_waters()
    if chains is not None:
        for ch in list(st[0]):
            if ch.name not in chains:
                st[0].remove_chain(ch.name)
    st.remove_empty_chains()
    return st


def _xyz(st: gemmi.Structure) -> np.ndarray:
    return np.array([a.pos.tolist() for ch in st[0] for r in ch for a in r])


def _set_xyz(st: gemmi.Structure, xyz: np.ndarray) -> None:
    i = 0
    for ch in st[0]:
        for r in ch:
            for a in r:
                a.pos = gemmi.Position(*xyz[i])
                i += 1


def _ca(st: gemmi.Structure, residues=None) -> np.ndarray:
    return np.array([r["CA"][0].pos.tolist() for ch in st[0] for r in ch
                     if r.find_atom("CA", "*") and (residues is None or r.seqid.num in residues)])


def kabsch(moving: np.ndarray, fixed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rotation ``U`` and translation ``t`` with ``moving @ U.T + t`` closest to ``fixed``."""
    cm, cf = moving.mean(axis=0), fixed.mean(axis=0)
    u, _, vt = np.linalg.svd((moving - cm).T @ (fixed - cf))
    d = np.sign(np.linalg.det(vt.T @ u.T))
    U = vt.T @ np.diag([1.0, 1.0, d]) @ u.T
    return U, cf - cm @ U.T


def _write(st: gemmi.Structure, name: str, remark: str) -> None:
    st.setup_entities()
    text = st.make_pdb_string(gemmi.PdbWriteOptions(minimal=True))
    with gzip.open(OUT / f"{name}.pdb.gz", "wt") as f:
        f.write(f"REMARK   1 {remark}\n" + text)
    print(f"{name}: {len(_xyz(st))} atoms, extent {np.ptp(_xyz(st), axis=0).round(0)} A")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--transition-states", type=int, default=4)
    args = ap.parse_args()
    import MDAnalysis as mda
    from MDAnalysisTests import datafiles as df

    OUT.mkdir(parents=True, exist_ok=True)
    core = set(ADK_CORE.tolist())
    open_ = _protein_heavy(gemmi.read_structure(df.PDB_open if hasattr(df, "PDB_open") else
                                                str(Path(df.PSF).with_name("adk_open.pdb"))))
    centre = _xyz(open_).mean(axis=0)
    ref_core = _ca(open_, core) - centre
    _set_xyz(open_, _xyz(open_) - centre)
    _write(open_, "adk_open", "AdK open (PDB 4AKE), from MDAnalysisTests adk_open.pdb")

    def align_adk(st):
        U, t = kabsch(_ca(st, core), ref_core)
        _set_xyz(st, _xyz(st) @ U.T + t)
        return st

    closed = align_adk(_protein_heavy(gemmi.read_structure(df.PDB_closed)))
    _write(closed, "adk_closed", "AdK closed (PDB 1AKE), from MDAnalysisTests adk_closed.pdb")

    u = mda.Universe(df.PSF, df.DCD)
    template = gemmi.read_structure(df.PDB_closed)  # same atoms, same order as adk.psf
    names = [a.name for ch in template[0] for r in ch for a in r]
    if names != list(u.atoms.names):
        raise SystemExit("adk_closed.pdb and adk.psf list different atoms")
    frames = np.linspace(0, len(u.trajectory) - 1, args.transition_states).round().astype(int)
    for i, f in enumerate(frames):
        u.trajectory[f]
        st = gemmi.read_structure(df.PDB_closed)
        _set_xyz(st, u.atoms.positions.astype(np.float64))
        st = align_adk(_protein_heavy(st))
        _write(st, f"adk_dims_{i}", f"AdK closed-to-open transition, frame {f} of MDAnalysisTests adk_dims.dcd")

    junk = _protein_heavy(gemmi.read_structure(str(Path(df.PSF).with_name("1a28.pdb.gz"))), chains={"A"})
    _set_xyz(junk, _xyz(junk) - _xyz(junk).mean(axis=0))
    _write(junk, "pr_1a28", "progesterone receptor LBD, chain A of PDB 1A28, from MDAnalysisTests 1a28.pdb.gz")

    pr = _protein_heavy(gemmi.read_structure(str(Path(df.PSF).with_name("1hvr.pdb"))))
    a = np.array([r["CA"][0].pos.tolist() for r in pr[0]["A"] if r.find_atom("CA", "*")])
    b = np.array([r["CA"][0].pos.tolist() for r in pr[0]["B"] if r.find_atom("CA", "*")])
    n = min(len(a), len(b))
    U, _ = kabsch(np.concatenate([a[:n], b[:n]]), np.concatenate([b[:n], a[:n]]))  # swaps the chains
    w, v = np.linalg.eig(U)
    axis = np.real(v[:, np.argmin(np.abs(w - 1))])  # the 2-fold axis: eigenvector of eigenvalue 1
    z = np.array([0.0, 0.0, 1.0])
    c = float(axis @ z)
    k = np.cross(axis, z)
    s = np.linalg.norm(k)  # rotation taking the axis to z (Rodrigues)
    K = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    R = np.eye(3) if s < 1e-9 else np.eye(3) + K + K @ K * ((1 - c) / s**2)
    xyz = _xyz(pr)
    _set_xyz(pr, (xyz - xyz.mean(axis=0)) @ R.T)
    _write(pr, "hiv_pr", "HIV-1 protease dimer (PDB 1HVR), 2-fold axis along z, from MDAnalysisTests 1hvr.pdb")

    _write(c3_trimer(_protein_heavy(gemmi.read_structure(str(Path(df.PSF).with_name("1hvr.pdb"))), chains={"A"})),
           "hiv_pr_c3", "ARTIFICIAL C3 trimer of chain A of PDB 1HVR (HIV-1 protease), 3-fold axis along z, "
           "from MDAnalysisTests 1hvr.pdb")


def c3_trimer(monomer: gemmi.Structure, min_distance_A: float = 3.5) -> gemmi.Structure:
    """Three copies of the one-chain ``monomer`` (chains A, B, C), 120 degrees apart about z, each
    centred on x = r with the smallest r (0.5 A steps) that keeps copies ``min_distance_A`` apart."""
    xyz = _xyz(monomer)
    xyz = xyz - xyz.mean(axis=0)

    def about_z(k: int) -> np.ndarray:
        t = 2 * np.pi * k / 3
        return np.array([[np.cos(t), -np.sin(t), 0.0], [np.sin(t), np.cos(t), 0.0], [0.0, 0.0, 1.0]])

    for r in np.arange(0.0, 60.0, 0.5):
        a = xyz + [r, 0.0, 0.0]
        b = a @ about_z(1).T
        if np.sqrt(((a[:, None] - b[None]) ** 2).sum(-1)).min() >= min_distance_A:
            break
    out = gemmi.Structure()
    out.add_model(gemmi.Model("1"))
    for name in "ABC":
        chain = monomer[0][0].clone()
        chain.name = name
        out[0].add_chain(chain)
    _set_xyz(out, np.concatenate([a @ about_z(k).T for k in range(3)]))
    return out


if __name__ == "__main__":
    main()

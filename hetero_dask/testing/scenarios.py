"""Realistic heterogeneity scenarios: particles of atomic-model densities projected by RELION.

Nothing of our own image formation is used to make the data: the maps come from
atomic models through gemmi (:mod:`.atomic`), the projections with CTF from
``relion_project --ctf``. We add only the noise (Gaussian, white or coloured, at a
stated SNR) and normalise the images as ``relion_preprocess`` does (noise standard
deviation 1). Each set has its ground truth (state, pose, shift, CTF) and starting
references, and the functions below score a result against that truth: accuracy up
to a relabelling of the classes, junk recall, calibration of the posteriors, and the
class maps against the true maps.

SNR: the mean over particles of the variance of the noise-free image (CTF applied)
within the particle's disc (diameter ``particle_diameter_A``), over the noise variance:
the same particle at the same SNR is as noisy in a large box as in a small one.

Coloured noise has the power spectrum ``PSD(f) = 0.25 + 1 / (1 + (f / 0.08)^2)``
(``f`` in cycles per pixel, normalised to mean 1 over the image spectrum): four times
the power at low frequency as near Nyquist, as ice and the detector's MTF give.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mrcfile
import numpy as np

from hetero_dask.testing.atomic import density_map
from hetero_dask.testing.relion import read_mrc, run, write_map, write_relion_star


@dataclass(frozen=True)
class State:
    """One kind of particle: atomic model ``model`` (optionally without ``drop_residues``),
    ``fraction`` of the particles; ``junk``: an unrelated protein, counted as junk."""

    model: str
    fraction: float
    drop_residues: tuple[int, int] | None = None
    junk: bool = False

    @property
    def label(self) -> str:
        if self.drop_residues is None:
            return self.model
        return f"{self.model} without {self.drop_residues[0]}-{self.drop_residues[1]}"


@dataclass(frozen=True)
class Scenario:
    """A particle set and how a refinement starts on it.

    ``states``: the kinds of particles (fractions of the non-noise particles);
    ``noise_images``: fraction of all images that are pure noise (junk, like empty ice
    picked as particles); ``start``: ``"truth"`` = one reference per state, its true
    map low-passed to ``ref_lowpass_A``; ``"consensus"`` = K copies of the population-
    weighted mean of the non-junk maps, low-passed. ``refine_box``: the refinement box
    (None: the particle box); ``symmetry``: of every state and of the refinement.
    """

    name: str
    description: str
    states: tuple[State, ...]
    n_particles: int
    box: int = 64
    psize_A: float = 1.5
    snr: float = 0.04
    noise: str = "white"
    noise_images: float = 0.0
    refine_box: int | None = None
    symmetry: str = "C1"
    start: str = "truth"
    ref_lowpass_A: float = 30.0
    blur_B: float = 80.0
    shift_range_px: float = 3.0
    defocus_range_um: tuple[float, float] = (1.0, 2.5)
    astigmatism_A: float = 500.0
    voltage_kv: float = 300.0
    cs_mm: float = 2.7
    amp_contrast: float = 0.1
    particle_diameter_A: float = 80.0
    extra: dict = field(default_factory=dict, hash=False, compare=False)

    @property
    def n_classes(self) -> int:
        return len(self.states)

    @property
    def junk_label(self) -> int | None:
        """Truth label of junk particles (the junk state's; noise images share it)."""
        junk = [i for i, s in enumerate(self.states) if s.junk]
        return junk[0] if junk else None


ADK = "AdK (adenylate kinase, 214 residues)"
SCENARIOS: dict[str, Scenario] = {s.name: s for s in [
    Scenario("two_conformations", f"{ADK} open vs closed, 400 + 400 particles",
             (State("adk_open", 0.5), State("adk_closed", 0.5)), 800),
    Scenario("two_conformations_large", f"{ADK} open vs closed, 10,000 + 10,000 particles",
             (State("adk_open", 0.5), State("adk_closed", 0.5)), 20000),
    Scenario("transition", f"{ADK}: 4 states along the closed-to-open transition, 60/25/10/5 %",
             tuple(State(f"adk_dims_{i}", f) for i, f in enumerate((0.6, 0.25, 0.1, 0.05))), 2000),
    Scenario("compositional", f"{ADK} open with and without its LID domain (residues 122-159)",
             (State("adk_open", 0.5), State("adk_open", 0.5, drop_residues=(122, 159))), 800),
    Scenario("junk", f"{ADK} open vs closed + 15 % particles of another protein (PR LBD, 1A28) "
             "+ 5 % pure-noise images; a junk reference (the other protein)",
             (State("adk_open", 0.5), State("adk_closed", 0.5), State("pr_1a28", 0.15 / 0.95, junk=True)),
             1000, noise_images=0.05),
    Scenario("coloured_noise", f"{ADK} open vs closed, coloured noise (4x more power at low frequency)",
             (State("adk_open", 0.5), State("adk_closed", 0.5)), 800, noise="coloured"),
    Scenario("box128_refined_at_64", f"{ADK} open vs closed, particles at box 128 (1.0 A/px) refined at box 64",
             (State("adk_open", 0.5), State("adk_closed", 0.5)), 800, box=128, psize_A=1.0, refine_box=64,
             shift_range_px=4.0),
    Scenario("consensus_start", f"{ADK} open vs closed, K = 2 identical references (the consensus)",
             (State("adk_open", 0.5), State("adk_closed", 0.5)), 800, start="consensus"),
    Scenario("symmetric", "HIV-1 protease dimer (C2) with and without its flaps (residues 43-58), "
             "refined with C2 symmetry",
             (State("hiv_pr", 0.5), State("hiv_pr", 0.5, drop_residues=(43, 58))), 800, symmetry="C2"),
    Scenario("symmetric_c3", "an ARTIFICIAL C3 trimer of the HIV-1 protease monomer with and without its "
             "flaps (residues 43-58), refined with C3 symmetry (its mates fall between the pose grid's points)",
             (State("hiv_pr_c3", 0.5), State("hiv_pr_c3", 0.5, drop_residues=(43, 58))), 800, symmetry="C3"),
]}


@dataclass
class Dataset:
    """A built scenario: files and ground truth (arrays in the particle order of the STAR)."""

    scenario: Scenario
    seed: int
    folder: Path
    particles_star: Path  # RELION 3.1 STAR, no poses (the input of every refinement)
    truth_star: Path  # the same particles with their true poses and states
    references: list[Path]
    references_star: Path
    truth_maps: list[Path]  # one per state, at the particle box
    labels: np.ndarray  # (N,) state index; pure-noise images get junk_label (or -1 without junk)
    noise_image: np.ndarray  # (N,) bool
    euler_deg: np.ndarray  # (N, 3) RELION rot, tilt, psi
    shifts_px: np.ndarray  # (N, 2) RELION origin in pixels
    noise_psd: np.ndarray  # (box,) noise power per Fourier shell, per pixel-normalised coefficient

    @property
    def is_junk(self) -> np.ndarray:
        jl = self.scenario.junk_label
        return self.noise_image | (self.labels == jl) if jl is not None else self.noise_image


def noise_psd_2d(n: int, colour: str) -> np.ndarray:
    """Noise power ``(n, n)`` over the centred 2D spectrum, mean 1 (white: all ones)."""
    if colour == "white":
        return np.ones((n, n))
    if colour != "coloured":
        raise ValueError(f"noise must be 'white' or 'coloured', got {colour!r}")
    k = (np.arange(n) - n // 2) / n
    f = np.hypot(*np.meshgrid(k, k, indexing="ij"))
    psd = 0.25 + 1.0 / (1.0 + (f / 0.08) ** 2)
    return psd / psd.mean()


def _shell_mean(a2d: np.ndarray) -> np.ndarray:
    n = a2d.shape[0]
    k = np.arange(n) - n // 2
    r = np.rint(np.hypot(*np.meshgrid(k, k, indexing="ij"))).astype(int).ravel()
    return np.bincount(r, a2d.ravel(), minlength=n)[:n] / np.maximum(np.bincount(r, minlength=n)[:n], 1)


def _add_noise(clean: np.ndarray, sigma: float, psd: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``clean`` plus Gaussian noise of pixel variance ``sigma^2`` and spectrum ``psd``, / sigma."""
    out = np.empty_like(clean)
    amp = np.fft.ifftshift(np.sqrt(psd))
    for b0 in range(0, len(clean), 512):
        blk = clean[b0:b0 + 512]
        w = rng.standard_normal(blk.shape)
        noise = np.fft.ifft2(np.fft.fft2(w) * amp).real
        out[b0:b0 + 512] = (blk / sigma + noise).astype(np.float32)
    return out


def _lowpass(vol: np.ndarray, resolution_A: float, psize_A: float) -> np.ndarray:
    from hetero_dask.core.fourier import lowpass  # noqa: PLC0415

    return np.asarray(lowpass(vol, resolution_A, psize_A, 3), dtype=np.float32)


def build(scenario: Scenario, seed: int, folder: Path | str, reuse: bool = True) -> Dataset:
    """Make the particle set of ``scenario`` for ``seed`` in ``folder`` (kept; reused if complete)."""
    folder = Path(folder)
    done = folder / "dataset.json"
    if reuse and done.exists():
        return load(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sc = scenario
    rng = np.random.default_rng(seed)
    maps = [density_map(s.model, sc.box, sc.psize_A, sc.blur_B, s.drop_residues) for s in sc.states]
    truth_maps = [write_map(folder / f"truth_{i}.mrc", m, sc.psize_A) for i, m in enumerate(maps)]
    draws = _draw_particles(sc, rng)
    # The noise-free stack is not kept in a name here, so that it is freed once the noisy one exists.
    images, psd = _noisy_images(sc, _project_states(folder / "projection", sc, truth_maps, draws),
                                draws.noise_image, rng)
    _write_particles(folder, sc, images, draws)
    _write_references(folder, sc, maps)
    np.savez(folder / "truth.npz", labels=draws.labels, noise_image=draws.noise_image,
             euler_deg=draws.euler_deg, shifts_px=draws.shifts_px, noise_psd=_shell_mean(psd))
    done.write_text(json.dumps({"scenario": _scenario_dict(sc), "seed": seed}, indent=1))
    return load(folder)


@dataclass(frozen=True)
class _Draws:
    """The random part of a set, in particle order: ``labels`` ``(N,)`` (as in :class:`Dataset`),
    ``noise_image`` ``(N,)`` bool, ``euler_deg`` ``(N, 3)`` RELION rot, tilt, psi, ``shifts_px``
    ``(N, 2)`` and ``defocus`` ``(N, 3)`` (defocus U, V in A, angle in degrees)."""

    labels: np.ndarray
    noise_image: np.ndarray
    euler_deg: np.ndarray
    shifts_px: np.ndarray
    defocus: np.ndarray


def _draw_particles(sc: Scenario, rng: np.random.Generator) -> _Draws:
    """States in a random order, then poses, shifts and defocus: the order of the draws is part
    of what a seed means, and the noise is drawn from ``rng`` after them."""
    from hetero_dask.simulate import random_shifts_px  # noqa: PLC0415

    N = sc.n_particles
    labels, noise_image = _shuffled_labels(sc, rng)
    # Uniform poses: RELION ZYZ Euler angles with cos(tilt) uniform.
    euler = np.stack([rng.uniform(0, 360, N), np.degrees(np.arccos(rng.uniform(-1, 1, N))),
                      rng.uniform(0, 360, N)], axis=1)
    shifts = random_shifts_px(N, sc.shift_range_px, rng)
    dfu = rng.uniform(*sc.defocus_range_um, N) * 1e4
    defocus = np.stack([dfu, dfu - rng.uniform(0, sc.astigmatism_A, N), rng.uniform(0, 180, N)], axis=1)
    return _Draws(labels, noise_image, euler, shifts, defocus)


def _shuffled_labels(sc: Scenario, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Each particle's label (as in :class:`Dataset`) and whether it is a pure-noise image, in a
    random order; the states' counts follow their fractions, the largest state takes the rounding."""
    N = sc.n_particles
    n_noise = int(round(sc.noise_images * N))
    fractions = np.array([s.fraction for s in sc.states], dtype=np.float64)
    counts = np.floor(fractions / fractions.sum() * (N - n_noise)).astype(int)
    counts[np.argmax(fractions)] += N - n_noise - counts.sum()
    junk = sc.junk_label
    labels = np.concatenate([np.repeat(np.arange(len(counts)), counts),
                             np.full(n_noise, -1 if junk is None else junk)])
    noise_image = np.r_[np.zeros(N - n_noise, bool), np.ones(n_noise, bool)]
    order = rng.permutation(N)
    return labels[order], noise_image[order]


def _optics(sc: Scenario) -> dict:
    """The scenario's optics as keyword arguments of :func:`write_relion_star`."""
    return dict(voltage_kv=sc.voltage_kv, cs_mm=sc.cs_mm, amp_contrast=sc.amp_contrast)


def _project_states(proj: Path, sc: Scenario, truth_maps: list[Path], draws: _Draws) -> np.ndarray:
    """Noise-free images ``(N, box, box)`` with CTF: each state's particles projected from its
    true map by ``relion_project --ctf`` in ``proj``; pure-noise images stay zero."""
    n = sc.box
    clean = np.zeros((sc.n_particles, n, n), np.float32)
    proj.mkdir(exist_ok=True)
    for i in range(len(sc.states)):
        idx = np.flatnonzero((draws.labels == i) & ~draws.noise_image)
        if idx.size == 0:
            continue
        star = write_relion_star(proj / f"state_{i}.star", draws.euler_deg[idx], draws.shifts_px[idx] * sc.psize_A,
                                 sc.psize_A, n, draws.defocus[idx], **_optics(sc))
        run(["relion_project", "--i", str(truth_maps[i]), "--o", str(proj / f"state_{i}"), "--ang", str(star),
             "--angpix", str(sc.psize_A), "--ctf"], cwd=proj)
        clean[idx] = read_mrc(proj / f"state_{i}.mrcs")
    return clean


def _noisy_images(sc: Scenario, clean: np.ndarray, noise_image: np.ndarray,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``clean`` plus noise at the scenario's SNR (module docstring), normalised to noise standard
    deviation 1; returns the images and the 2D noise spectrum ``(box, box)``."""
    from hetero_dask.simulate import disc_variance  # noqa: PLC0415

    n = sc.box
    signal = disc_variance(clean[~noise_image], min(n / 2, sc.particle_diameter_A / (2 * sc.psize_A))).mean()
    sigma = float(np.sqrt(signal / sc.snr))
    psd = noise_psd_2d(n, sc.noise)
    return _add_noise(clean, sigma, psd, rng), psd


def _write_particles(folder: Path, sc: Scenario, images: np.ndarray, draws: _Draws) -> None:
    """The stack, its STAR file without poses (what a refinement gets) and the truth STAR file."""
    N, n = len(images), sc.box
    with mrcfile.new(folder / "particles.mrcs", images, overwrite=True) as m:
        m.voxel_size = sc.psize_A
        m.set_image_stack()
    names = [f"{i + 1:06d}@particles.mrcs" for i in range(N)]
    write_relion_star(folder / "particles.star", np.zeros((N, 3)), np.zeros((N, 2)), sc.psize_A, n,
                      draws.defocus, image_names=names, **_optics(sc))
    _drop_pose_columns(folder / "particles.star")
    write_relion_star(folder / "truth.star", draws.euler_deg, draws.shifts_px * sc.psize_A, sc.psize_A, n,
                      draws.defocus, image_names=names, extra_columns={"rlnClassNumber": draws.labels + 1},
                      **_optics(sc))


def _write_references(folder: Path, sc: Scenario, maps: list[np.ndarray]) -> None:
    """The starting references ``reference_{k}.mrc`` and ``references.star`` that lists them."""
    import pandas as pd  # noqa: PLC0415
    import starfile  # noqa: PLC0415

    refs = _references(sc, maps)
    ref_paths = [write_map(folder / f"reference_{k}.mrc", v, sc.psize_A) for k, v in enumerate(refs)]
    starfile.write({"": pd.DataFrame({"rlnReferenceImage": [p.name for p in ref_paths]})},
                   folder / "references.star", overwrite=True)


def _scenario_dict(sc: Scenario) -> dict:
    d = asdict(sc)
    d["states"] = [asdict(s) for s in sc.states]
    return d


def _drop_pose_columns(star: Path) -> None:
    import starfile  # noqa: PLC0415

    blocks = starfile.read(star, always_dict=True)
    p = blocks["particles"]
    blocks["particles"] = p.drop(columns=[c for c in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi",
                                                      "rlnOriginXAngst", "rlnOriginYAngst") if c in p])
    starfile.write(blocks, star, overwrite=True)


def _references(sc: Scenario, maps: list[np.ndarray]) -> list[np.ndarray]:
    if sc.start == "truth":
        return [_lowpass(m, sc.ref_lowpass_A, sc.psize_A) for m in maps]
    if sc.start != "consensus":
        raise ValueError(f"start must be 'truth' or 'consensus', got {sc.start!r}")
    good = [i for i, s in enumerate(sc.states) if not s.junk]
    w = np.array([sc.states[i].fraction for i in good])
    mean = np.tensordot(w / w.sum(), np.stack([maps[i] for i in good]), axes=1)
    return [_lowpass(mean, sc.ref_lowpass_A, sc.psize_A)] * len(sc.states)


def load(folder: Path | str) -> Dataset:
    folder = Path(folder)
    meta = json.loads((folder / "dataset.json").read_text())
    d = dict(meta["scenario"])
    d["states"] = tuple(State(**{**s, "drop_residues": tuple(s["drop_residues"]) if s["drop_residues"] else None})
                        for s in d["states"])
    for key in ("defocus_range_um",):
        d[key] = tuple(d[key])
    sc = Scenario(**d)
    t = np.load(folder / "truth.npz", allow_pickle=False)
    return Dataset(scenario=sc, seed=meta["seed"], folder=folder, particles_star=folder / "particles.star",
                   truth_star=folder / "truth.star",
                   references=[folder / f"reference_{k}.mrc" for k in range(sc.n_classes)],
                   references_star=folder / "references.star",
                   truth_maps=[folder / f"truth_{i}.mrc" for i in range(len(sc.states))],
                   labels=t["labels"], noise_image=t["noise_image"], euler_deg=t["euler_deg"],
                   shifts_px=t["shifts_px"], noise_psd=t["noise_psd"])


# ---------------------------------------------------------------------------
# Scores against the truth
# ---------------------------------------------------------------------------


def match_classes(pred: np.ndarray, truth: np.ndarray, n_classes: int) -> np.ndarray:
    """The relabelling ``mapping[pred class] = truth label`` that maximises agreement (Hungarian)."""
    from scipy.optimize import linear_sum_assignment  # noqa: PLC0415

    conf = np.zeros((n_classes, n_classes))
    ok = (pred >= 0) & (truth >= 0)
    np.add.at(conf, (pred[ok], truth[ok]), 1)
    rows, cols = linear_sum_assignment(-conf)
    mapping = np.full(n_classes, -1)
    mapping[rows] = cols
    return mapping


def accuracy(pred: np.ndarray, data: Dataset, mapping: np.ndarray | None = None) -> float:
    """Fraction of particles whose class, relabelled, is their true one (noise images: the junk class)."""
    mapping = match_classes(pred, data.labels, data.scenario.n_classes) if mapping is None else mapping
    return float(np.mean(mapping[pred] == data.labels))


def junk_recall(pred: np.ndarray, data: Dataset, mapping: np.ndarray) -> float | None:
    """Fraction of the junk particles (other protein and noise images) put in the junk class."""
    jl = data.scenario.junk_label
    if jl is None:
        return None
    return float(np.mean(mapping[pred[data.is_junk]] == jl))


def calibration(posterior: np.ndarray, data: Dataset, mapping: np.ndarray, bins: int = 10) -> dict:
    """Reliability of the class posteriors ``(N, K)``: per bin of the highest posterior, the
    mean posterior and the fraction right; ECE = sum_b n_b / N |right_b - mean_b|."""
    conf = posterior.max(axis=1)
    right = mapping[posterior.argmax(axis=1)] == data.labels
    edges = np.linspace(1.0 / posterior.shape[1], 1.0, bins + 1)
    which = np.clip(np.searchsorted(edges, conf, side="right") - 1, 0, bins - 1)
    n_b = np.bincount(which, minlength=bins)
    mean_b = np.bincount(which, conf, minlength=bins) / np.maximum(n_b, 1)
    right_b = np.bincount(which, right, minlength=bins) / np.maximum(n_b, 1)
    ece = float(np.sum(n_b / len(conf) * np.abs(right_b - mean_b)))
    return {"ece": ece, "edges": edges.tolist(), "count": n_b.tolist(), "mean_posterior": mean_b.tolist(),
            "fraction_right": right_b.tolist()}


def map_scores(class_maps: list[np.ndarray], psize_A: float, data: Dataset, mapping: np.ndarray) -> list[dict]:
    """Each class map against the true map of its matched state (resampled to the class map's box):
    the resolution where their FSC falls below 0.5 and the real-space correlation inside a
    sphere of the particle's diameter after both are low-passed to 8 A."""
    from hetero_dask.core.fourier import fourier_resize  # noqa: PLC0415
    from hetero_dask.core.fsc import fsc, resolution_A  # noqa: PLC0415

    out = []
    for k, vol in enumerate(class_maps):
        state = int(mapping[k])
        truth = read_mrc(data.truth_maps[state])
        if truth.shape != vol.shape:
            truth = np.asarray(fourier_resize(truth, vol.shape[0], ndim=3), np.float32)
        curve = np.asarray(fsc(vol, truth))
        n = vol.shape[0]
        r = np.linalg.norm(np.indices(vol.shape) - n // 2, axis=0) * psize_A
        inside = r <= data.scenario.particle_diameter_A / 2 + 10
        a, b = _lowpass(vol, 8.0, psize_A)[inside], _lowpass(truth, 8.0, psize_A)[inside]
        out.append({"class": k, "state": state, "fsc05_A": float(resolution_A(curve, n, psize_A, 0.5)),
                    "correlation_8A": float(np.corrcoef(a, b)[0, 1])})
    return out


# ---------------------------------------------------------------------------
# The oracle ceiling
# ---------------------------------------------------------------------------


def half_sets(data: Dataset) -> np.ndarray:
    """(N,) 0/1 random half of each particle (seeded by the set's seed)."""
    return np.random.default_rng([data.seed, 7]).integers(0, 2, len(data.labels))


# Poses the oracle's E-step keeps per class between its search stages: 16 times the refine job's
# default (64). A ceiling must not be held down by its search: at low SNR a particle's pose
# posterior is broad, and a class whose evidence is summed over too few poses loses some of it.
# With SearchParams' default of 8 the oracle classified 0.4-2 points worse than with 64 and went on
# rising to 1024 on coloured noise (benchmarks/results/realistic/TUNING.md, "The oracle's search").
ORACLE_MAX_POSES = 1024


def oracle_maps(data: Dataset, workdir: Path | str) -> tuple[np.ndarray, np.ndarray]:
    """Half maps of every state from the TRUE states and poses, by ``relion_reconstruct --ctf``
    with the scenario's symmetry (RELION's axes; the same as ours for C_n, D_n's 2-fold on x):
    ``(maps (S, 2, n, n, n), fsc (S, n // 2 + 1))`` (pure-noise images left out)."""
    import starfile  # noqa: PLC0415

    from hetero_dask.core.fsc import fsc  # noqa: PLC0415

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    blocks = starfile.read(data.truth_star, always_dict=True)
    halves = half_sets(data)
    maps, curves = [], []
    for s in range(data.scenario.n_classes):
        pair = []
        for h in (0, 1):
            rows = (data.labels == s) & ~data.noise_image & (halves == h)
            star = workdir / f"state{s}_half{h}.star"
            starfile.write({"optics": blocks["optics"], "particles": blocks["particles"][rows]}, star,
                           overwrite=True)
            out = workdir / f"state{s}_half{h}.mrc"
            run(["relion_reconstruct", "--i", str(star), "--o", str(out), "--angpix",
                 str(data.scenario.psize_A), "--ctf", "--sym", data.scenario.symmetry], cwd=data.folder)
            pair.append(read_mrc(out))
        maps.append(pair)
        curves.append(np.asarray(fsc(pair[0], pair[1])))
    return np.asarray(maps, np.float32), np.asarray(curves)


def score_refine_run(out: Path | str, data: Dataset) -> dict:
    """A finished ``hetero_dask.refine`` run in ``out`` against the truth: accuracy after matching
    classes to states, junk recall, calibration of the posteriors, class maps against the true maps."""
    from hetero_dask.io.cs import read_cs  # noqa: PLC0415

    out = Path(out)
    sc = data.scenario
    post = np.asarray(read_cs(out / "particles.cs")["alignments3D_multi/class_posterior"], np.float64)
    pred = post.argmax(axis=1)
    mapping = match_classes(pred, data.labels, sc.n_classes)
    maps = [read_mrc(out / f"class_{k}" / "map.mrc") for k in range(sc.n_classes)]
    psize = json.loads((out / "report.json").read_text())["psize_A"]
    return dict(accuracy=accuracy(pred, data, mapping), junk_recall=junk_recall(pred, data, mapping),
                calibration=calibration(post, data, mapping), maps=map_scores(maps, psize, data, mapping))


def oracle_accuracy(data: Dataset, workdir: Path | str, order_final: int = 3, max_particles: int | None = None,
                    max_poses: int = ORACLE_MAX_POSES) -> dict:
    """The oracle ceiling: accuracy of one E-step (our coarse-to-fine search over poses
    and shifts, keeping ``max_poses`` per class between its stages) of every particle against
    the maps of the OTHER half set, reconstructed from the true states and poses
    (:func:`oracle_maps`), each Wiener-filtered by its FSC and scored to where the FSC falls
    below 0.143, with the exact noise power and the true state fractions as priors. Not a
    bound: a refinement could in principle beat it (its maps hold only half the particles),
    but a refinement that learns its maps from unknown poses rarely does. ``max_particles``:
    score a random subset."""
    from hetero_dask.core.fsc import resolution_radius  # noqa: PLC0415

    sc, n = data.scenario, data.scenario.box
    maps, curves = oracle_maps(data, workdir)
    # One band for all states, to where the best-resolved one has signal; each map is Wiener-
    # filtered by its own FSC, so a poorly resolved state contributes nothing beyond its resolution.
    r = min(n / 2 - 1, max(resolution_radius(c) for c in curves))
    filtered = _wiener_filtered(maps, curves, n)
    parts, images = _truth_particles(data)
    idx = np.arange(len(images))
    if max_particles is not None and max_particles < len(idx):
        idx = np.sort(np.random.default_rng([data.seed, 11]).choice(idx, max_particles, replace=False))
    pred, post = _estep_against_other_half(data, parts, images, idx, filtered, r, order_final, max_poses)
    truth = data.labels[idx]
    mapping = np.arange(sc.n_classes)
    sub = Dataset(**{**data.__dict__, "labels": truth, "noise_image": data.noise_image[idx]})
    return {"accuracy": float(np.mean(pred[idx] == truth)), "junk_recall": junk_recall(pred[idx], sub, mapping),
            "calibration": calibration(post[idx], sub, mapping), "resolution_radius": float(r),
            "n_scored": int(len(idx)), "fsc": curves.tolist()}


def _wiener_filtered(maps: np.ndarray, curves: np.ndarray, n: int) -> list[list[np.ndarray]]:
    """Each state's half maps ``maps`` ``(S, 2, n, n, n)`` weighted shell by shell by the state's
    FSC ``curves`` ``(S, shells)``, clipped to [0, 1] and zero beyond the curve."""
    from hetero_dask.core.fourier import fftnc  # noqa: PLC0415

    shell = np.rint(np.linalg.norm(np.indices((n,) * 3) - n // 2, axis=0)).astype(int)
    filtered = []
    for s in range(len(maps)):
        w = np.clip(curves[s], 0, 1)
        w = np.r_[w, np.zeros(max(0, shell.max() + 1 - len(w)))][shell]
        filtered.append([np.fft.fftshift(np.fft.ifftn(np.fft.ifftshift(fftnc(m) * w))).real.astype(np.float32)
                         for m in maps[s]])
    return filtered


def _truth_particles(data: Dataset):
    """The truth STAR file's particle table and the images ``(N, box, box)`` float32."""
    import starfile  # noqa: PLC0415

    parts = starfile.read(data.truth_star, always_dict=True)["particles"]
    with mrcfile.mmap(data.folder / "particles.mrcs", permissive=True) as m:
        images = np.asarray(m.data, np.float32)
    return parts, images


def _estep_against_other_half(data: Dataset, parts, images: np.ndarray, idx: np.ndarray,
                              filtered: list[list[np.ndarray]], r: float,
                              order_final: int, max_poses: int) -> tuple[np.ndarray, np.ndarray]:
    """Best class ``(N,)`` (-1 where not scored) and class posteriors ``(N, K)`` of the particles
    ``idx``, each half set's from one E-step against the other half's ``filtered`` maps."""
    from hetero_dask.core.projector import prepare_fourier_map  # noqa: PLC0415
    from hetero_dask.core.scoring import alignment_band, prepare_particles  # noqa: PLC0415
    from hetero_dask.core.search import SearchParams, estep  # noqa: PLC0415

    sc, n = data.scenario, data.scenario.box
    halves = half_sets(data)
    band = alignment_band(n, r)
    psd = np.r_[data.noise_psd, np.full(n, data.noise_psd[-1])][: n + 2]
    sigma2 = psd * n * n  # pixel-normalised noise: E|F|^2 = n^2 PSD for an unnormalised FFT
    frac = np.array([s.fraction for s in sc.states])
    prior = frac / frac.sum()
    search = SearchParams(radius_final=r, radius_coarse=min(r, 12.0), order_coarse=2, order_final=order_final,
                          shift_range_px=sc.shift_range_px + 1, shift_step_px=1.0, max_poses=max_poses,
                          symmetry=sc.symmetry,
                          symmetry_convention="relion")  # the maps' axes: relion_reconstruct --sym
    pred = np.full(len(images), -1)
    post = np.zeros((len(images), sc.n_classes), np.float32)
    for h in (0, 1):
        sel = idx[halves[idx] == h]
        prep = prepare_particles(images[sel], _truth_ctf(parts, sel, sc), sc.psize_A, band, normalize=False,
                                 mask_radius_px=n)
        fmaps = [prepare_fourier_map(filtered[s][1 - h], r_max=r + 1) for s in range(sc.n_classes)]
        res = estep(prep, fmaps, sigma2, search, class_prior=prior)
        pred[sel] = np.asarray(res.best_class)
        post[sel] = np.asarray(res.class_posterior)
    return pred, post


def _truth_ctf(parts, sel: np.ndarray, sc: Scenario):
    """CTF parameters of the rows ``sel`` of the truth STAR file's particle table."""
    from hetero_dask.core.ctf import CTFParams  # noqa: PLC0415

    return CTFParams(df1_A=parts["rlnDefocusU"].to_numpy()[sel], df2_A=parts["rlnDefocusV"].to_numpy()[sel],
                     df_angle_rad=np.radians(parts["rlnDefocusAngle"].to_numpy()[sel]),
                     accel_kv=sc.voltage_kv, cs_mm=sc.cs_mm, amp_contrast=sc.amp_contrast)

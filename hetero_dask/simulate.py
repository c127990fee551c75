"""Simulated particle images with ground truth (class, pose, shift, CTF).

Image model (README, Conventions), per particle of class ``k`` with pose ``R``, shift
``s`` (pixels, CryoSPARC ``alignments3D/shift`` / RELION origin) and CTF ``C``:

    Y(k) = C(k) * V_k^(R k) * exp(+2 pi i k.s / n)

(the central slice of the 2x-padded, sinc^2-pre-corrected volume transform,
:func:`hetero_dask.core.projector.project_images`), then white Gaussian noise.

SNR definition: ``snr = mean_i var_disc(clean_i) / sigma_noise^2`` where
``var_disc(clean_i)`` is the variance of particle ``i``'s clean (CTF-modulated,
shifted) image over the pixels inside the disc of radius ``disc_radius_px``
(default ``n / 2``, the inscribed circle) and the noise is one white Gaussian
of variance ``sigma_noise^2`` for all particles (as on a real detector).

Poses are uniform on SO(3); shifts uniform in the disc ``|s| <= shift_range_px``;
defocus ``df1`` uniform in ``defocus_range_A``, ``df2 = df1 - a`` with ``a``
uniform in ``[0, astigmatism_A]``, astigmatism angle uniform in ``[0, pi)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.spatial.transform import Rotation

from .core.ctf import CTFParams, ctf_image
from .core.fourier import ifft2c, radius_2d, translate_ft
from .core.projector import prepare_fourier_map, project_images
from .core.rotations import pose_to_matrix

# Bytes of temporaries per projected pixel (8 trilinear corners of int64 index,
# float32 weight, complex64 value, plus the float64 CTF): bounds the batch.
_BYTES_PER_PIXEL = 8 * 24 + 64
_BATCH_BYTES = 256 * 2**20


@dataclass
class SimulatedParticles:
    """Simulated particles (``N`` of them, box ``n``) and their ground truth.

    ``images`` ``(N, n, n)`` float32 (noisy); ``classes`` ``(N,)`` int64, 0-based;
    ``poses`` ``(N, 3)`` float64 CryoSPARC axis-angle (radians);
    ``shifts_px`` ``(N, 2)`` float32 (x, y); ``ctf`` :class:`CTFParams` of
    ``(N,)`` arrays; ``noise_sigma`` the noise standard deviation;
    ``clean`` the noise-free images when requested, else ``None``.
    """

    images: np.ndarray
    classes: np.ndarray
    poses: np.ndarray
    shifts_px: np.ndarray
    ctf: CTFParams
    psize_A: float
    snr: float
    noise_sigma: float
    clean: np.ndarray | None = None

    @property
    def n(self) -> int:
        return self.images.shape[0]

    @property
    def box(self) -> int:
        return self.images.shape[-1]


def random_rotations(n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` axis-angle poses ``(n, 3)`` float64, uniform (Haar) on SO(3)."""
    return Rotation.random(n, random_state=rng).as_rotvec()


def random_shifts_px(n: int, range_px: float, rng: np.random.Generator) -> np.ndarray:
    """``n`` shifts ``(n, 2)`` float64 (x, y) in pixels, uniform in the disc ``|s| <= range_px``."""
    r = range_px * np.sqrt(rng.uniform(0, 1, n))
    phi = rng.uniform(0, 2 * np.pi, n)
    return np.stack([r * np.cos(phi), r * np.sin(phi)], axis=1)


def disc_variance(images: np.ndarray, radius_px: float) -> np.ndarray:
    """Variance ``(N,)`` of each image ``(N, n, n)`` over the pixels within ``radius_px`` of the centre."""
    n = images.shape[-1]
    inside = radius_2d(n, np) <= radius_px
    return images[:, inside].astype(np.float64).var(axis=1)


def render_clean(volumes, psize_A: float, classes, poses, shifts_px, ctf: CTFParams) -> np.ndarray:
    """Noise-free particle images ``(N, n, n)`` float32 of the image model above.

    ``volumes`` ``(K, n, n, n)``; per particle ``classes`` ``(N,)``, ``poses``
    ``(N, 3)``, ``shifts_px`` ``(N, 2)``, ``ctf`` with ``(N,)`` arrays.
    Batched per class (one prepared Fourier map per class).
    """
    volumes = np.asarray(volumes, dtype=np.float32)
    n = volumes.shape[-1]
    out = np.empty((len(classes), n, n), dtype=np.float32)
    batch = max(1, _BATCH_BYTES // (n * n * _BYTES_PER_PIXEL))
    for k in range(volumes.shape[0]):
        members = np.flatnonzero(classes == k)
        if members.size == 0:
            continue
        fmap = prepare_fourier_map(volumes[k])
        for b0 in range(0, members.size, batch):
            idx = members[b0 : b0 + batch]
            F = project_images(fmap, pose_to_matrix(poses[idx]).astype(np.float32))
            F = F * ctf_image(ctf.subset(idx), n, psize_A)
            # exp(+2 pi i k.s / n) = translate_ft by -s.
            F = translate_ft(F, -shifts_px[idx])
            out[idx] = ifft2c(F).real
    return out


def simulate(
    volumes,
    psize_A: float,
    n_per_class,
    snr: float,
    seed: int = 0,
    defocus_range_A: tuple[float, float] = (10000.0, 25000.0),
    astigmatism_A: float = 500.0,
    shift_range_px: float = 0.0,
    accel_kv: float = 300.0,
    cs_mm: float = 2.7,
    amp_contrast: float = 0.1,
    bfactor: float = 0.0,
    disc_radius_px: float | None = None,
    keep_clean: bool = False,
) -> SimulatedParticles:
    """Simulate particles of ``volumes`` ``(K, n, n, n)`` (see the module docstring).

    ``n_per_class`` is an int or one count per class; particles come in a
    random order (classes mixed). ``snr = inf`` gives noise-free images.
    Deterministic for a given ``seed``.
    """
    volumes, counts = _checked_inputs(volumes, n_per_class, snr)
    # One generator, drawn in a fixed order (classes, poses, shifts, CTF, noise): the order
    # is part of what a seed means.
    rng = np.random.default_rng(seed)
    classes = rng.permutation(np.repeat(np.arange(volumes.shape[0]), counts))
    N = classes.size
    poses = random_rotations(N, rng)
    shifts_px = random_shifts_px(N, shift_range_px, rng).astype(np.float32)
    ctf = _random_ctf(N, rng, defocus_range_A, astigmatism_A, accel_kv, cs_mm, amp_contrast, bfactor)
    clean = render_clean(volumes, psize_A, classes, poses, shifts_px, ctf)
    n = volumes.shape[-1]
    radius = n / 2 if disc_radius_px is None else float(disc_radius_px)
    sigma = _noise_sigma(clean, snr, radius)
    images = clean.copy() if keep_clean else clean
    _add_white_noise(images, sigma, rng)
    return SimulatedParticles(
        images=images,
        classes=classes,
        poses=poses,
        shifts_px=shifts_px,
        ctf=ctf,
        psize_A=float(psize_A),
        snr=float(snr),
        noise_sigma=sigma,
        clean=clean if keep_clean else None,
    )


def _checked_inputs(volumes, n_per_class, snr: float) -> tuple[np.ndarray, np.ndarray]:
    """``volumes`` as float32 ``(K, n, n, n)`` and the particle count ``(K,)`` of each class."""
    volumes = np.asarray(volumes, dtype=np.float32)
    if volumes.ndim != 4 or volumes.shape[1:] != (volumes.shape[-1],) * 3:
        raise ValueError(f"volumes must be (K, n, n, n), got shape {volumes.shape}")
    counts = np.broadcast_to(np.asarray(n_per_class, dtype=np.int64), (volumes.shape[0],))
    if (counts < 0).any():
        raise ValueError(f"n_per_class must be >= 0, got {n_per_class}")
    if not snr > 0:
        raise ValueError(f"snr must be > 0 (inf for no noise), got {snr}")
    return volumes, counts


def _random_ctf(
    N: int,
    rng: np.random.Generator,
    defocus_range_A: tuple[float, float],
    astigmatism_A: float,
    accel_kv: float,
    cs_mm: float,
    amp_contrast: float,
    bfactor: float,
) -> CTFParams:
    """``N`` CTFs: ``df1`` uniform in ``defocus_range_A``, ``df2 = df1 - a`` with ``a`` uniform
    in ``[0, astigmatism_A]``, angle uniform in ``[0, pi)``; the optics the same for all."""
    df1 = rng.uniform(*defocus_range_A, N).astype(np.float32)
    return CTFParams(
        df1_A=df1,
        df2_A=(df1 - rng.uniform(0, astigmatism_A, N)).astype(np.float32),
        df_angle_rad=rng.uniform(0, np.pi, N).astype(np.float32),
        accel_kv=np.full(N, accel_kv, np.float32),
        cs_mm=np.full(N, cs_mm, np.float32),
        amp_contrast=np.full(N, amp_contrast, np.float32),
        phase_shift_rad=np.zeros(N, np.float32),
        bfactor=np.full(N, bfactor, np.float32),
        scale=np.ones(N, np.float32),
    )


def _noise_sigma(clean: np.ndarray, snr: float, radius_px: float) -> float:
    """Noise standard deviation that gives ``clean`` ``(N, n, n)`` the ``snr`` of the module docstring."""
    if np.isinf(snr) or len(clean) == 0:
        return 0.0
    return float(np.sqrt(disc_variance(clean, radius_px).mean() / snr))


def _add_white_noise(images: np.ndarray, sigma: float, rng: np.random.Generator) -> None:
    """Add white Gaussian noise of standard deviation ``sigma`` to ``images`` in place."""
    for b0 in range(0, len(images), 1024):  # bounded float64 temporaries
        blk = images[b0 : b0 + 1024]
        blk += rng.normal(0.0, sigma, blk.shape).astype(np.float32) if sigma > 0 else 0


def simulation_table(
    sim: SimulatedParticles,
    stack_name: str = "particles.mrcs",
    seed: int = 0,
    class_slots: bool = True,
) -> np.ndarray:
    """CryoSPARC-style table of the simulated particles (``blob/sign`` = +1: files hold ``Y``).

    ``alignments3D/*`` carries the true pose, shift, class and a random
    balanced half-set split; with ``class_slots`` (and K > 1) every
    ``alignments_class_{k}/*`` slot carries the true pose and shift and a
    one-hot ``class_posterior`` (input for reconstruction-only jobs).
    """
    from .io.cs import empty_table, with_fields

    N = sim.n
    rng = np.random.default_rng([seed, 1])
    split = (rng.permutation(N) % 2).astype(np.uint32)
    cols = _blob_and_ctf_columns(sim, stack_name)
    cols.update(_true_slot(sim, "alignments3D/", sim.classes, 1.0, split))
    K = int(sim.classes.max()) + 1 if N else 0
    if class_slots and K > 1:
        for k in range(K):
            cols.update(_true_slot(sim, f"alignments_class_{k}/", k, sim.classes == k, split))
    table = with_fields(empty_table(N), cols)
    table["uid"] = rng.integers(1, np.iinfo(np.int64).max, N, dtype=np.int64).astype(np.uint64)
    return table


def _blob_and_ctf_columns(sim: SimulatedParticles, stack_name: str) -> dict:
    """The ``blob/*`` and ``ctf/*`` columns of :func:`simulation_table`."""
    N, n = sim.n, sim.box
    c = sim.ctf
    return {
        "blob/path": np.full(N, stack_name.encode()),
        "blob/idx": np.arange(N, dtype=np.uint32),
        "blob/shape": np.broadcast_to(np.array([n, n], np.uint32), (N, 2)),
        "blob/psize_A": np.float32(sim.psize_A),
        "blob/sign": np.float32(1.0),
        "ctf/type": np.bytes_(b"simulated"),
        "ctf/exp_group_id": np.uint32(0),
        "ctf/accel_kv": c.accel_kv.astype(np.float32),
        "ctf/cs_mm": c.cs_mm.astype(np.float32),
        "ctf/amp_contrast": c.amp_contrast.astype(np.float32),
        "ctf/df1_A": c.df1_A.astype(np.float32),
        "ctf/df2_A": c.df2_A.astype(np.float32),
        "ctf/df_angle_rad": c.df_angle_rad.astype(np.float32),
        "ctf/phase_shift_rad": c.phase_shift_rad.astype(np.float32),
        "ctf/scale": c.scale.astype(np.float32),
        "ctf/bfactor": c.bfactor.astype(np.float32),
    }


def _true_slot(sim: SimulatedParticles, prefix: str, class_, class_posterior, split) -> dict:
    """Columns of one alignment slot ``prefix`` holding the true pose and shift of every particle."""
    from .io.cs import slot_fields

    return slot_fields(
        prefix,
        sim.n,
        pose=sim.poses,
        shift=sim.shifts_px,
        psize_A=sim.psize_A,
        class_=class_,
        split=split,
        class_posterior=class_posterior,
    )


def write_simulation(
    out_dir,
    sim: SimulatedParticles,
    volumes=None,
    seed: int = 0,
    stack_name: str = "particles.mrcs",
) -> dict[str, Path]:
    """Write ``particles.mrcs``, ``particles.cs``, ``particles.star`` (RELION 3.1), ``truth.npz``
    and the true volumes ``volume_XX.mrc`` into ``out_dir``; return the paths by name.

    ``truth.npz`` (no pickle) holds ``class`` (N,), ``pose`` (N, 3) axis-angle,
    ``shift_px`` (N, 2), the CTF fields, ``psize_A``, ``snr`` and ``noise_sigma``.
    """
    from .io.convert import cs_to_star
    from .io.cs import write_cs
    from .io.mrc import write_map, write_stack
    from .io.star import write_star

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "stack": out / stack_name,
        "cs": out / "particles.cs",
        "star": out / "particles.star",
        "truth": out / "truth.npz",
    }
    write_stack(paths["stack"], sim.images, sim.psize_A)
    table = simulation_table(sim, stack_name, seed)
    write_cs(paths["cs"], table)
    write_star(paths["star"], cs_to_star(table, keep_cs_fields=False))  # a plain RELION file
    truth = {
        "class": sim.classes,
        "pose": sim.poses,
        "shift_px": sim.shifts_px,
        "psize_A": np.float64(sim.psize_A),
        "snr": np.float64(sim.snr),
        "noise_sigma": np.float64(sim.noise_sigma),
    }
    truth.update({f"ctf_{k}": np.asarray(v) for k, v in vars(sim.ctf).items()})
    np.savez(paths["truth"], **truth)
    if volumes is not None:
        for k, vol in enumerate(np.asarray(volumes, dtype=np.float32)):
            paths[f"volume_{k:02d}"] = out / f"volume_{k:02d}.mrc"
            write_map(paths[f"volume_{k:02d}"], vol, sim.psize_A)
    return paths


def oracle_accuracy(volumes, sim: SimulatedParticles, shift_range_px: float = 1.0) -> float:
    """Accuracy on a simulated set of our own E-step given the truth: the true maps and the
    true noise power, marginalising pose and shift on a grid (HEALPix order 2 -> 3, 1-pixel
    shift steps).

    A yardstick, not a bound: it shares the E-step's approximations (a finite pose grid,
    a likelihood that treats the coefficients as independent), so a refinement can come
    out above it. Benchmarks and tests report the distance to it.
    """
    from .core.scoring import alignment_band, prepare_particles  # noqa: PLC0415
    from .core.search import SearchParams, estep  # noqa: PLC0415

    n = sim.box
    r = n / 2 - 1
    band = alignment_band(n, r)
    prep = prepare_particles(sim.images, sim.ctf, sim.psize_A, band, normalize=False)
    maps = [prepare_fourier_map(v, r_max=r + 1) for v in volumes]
    # White noise of variance s^2 per pixel has power n^2 s^2 per (unnormalised) Fourier coefficient.
    sigma2 = np.full(n, sim.noise_sigma**2 * n * n)
    search = SearchParams(
        radius_final=r,
        order_coarse=2,
        order_final=3,
        shift_range_px=max(shift_range_px, 1.0),
        shift_step_px=1.0,
    )
    res = estep(prep, maps, sigma2, search)
    return float(np.mean(np.asarray(res.best_class) == sim.classes))


def agreement(a, b) -> float:
    """Agreement of two 2-class labelings up to a swap of the labels."""
    a, b = np.asarray(a), np.asarray(b)
    return max(float(np.mean(a == b)), float(np.mean(a != b)))


def write_references(folder, volumes, psize_A: float, resolution_A: float = 30.0, scale: float = 1.0):
    """Initial references from the truth: each volume low-passed to ``resolution_A`` and
    multiplied by ``scale``, written as ``folder/ref_{k:02d}.mrc``; returns the paths (str)."""
    from .core.fourier import lowpass  # noqa: PLC0415
    from .io.mrc import write_map  # noqa: PLC0415

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, v in enumerate(volumes):
        path = folder / f"ref_{k:02d}.mrc"
        write_map(path, scale * lowpass(v, resolution_A, psize_A, 3), psize_A)
        paths.append(str(path))
    return paths

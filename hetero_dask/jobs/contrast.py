"""Refuse particles with inverted contrast, before any work, naming the flag that flips them.

A CryoSPARC ``.cs`` says which way round its images are (``blob/sign``); a
RELION ``.star`` does not, and is read as protein-positive (+1, RELION's
extraction with "invert contrast"). A stack extracted without inverting
(protein dark) then reconstructs as a negative map and scores against
references with a negative grey scale. Two checks catch it:

* :func:`check_contrast` (Heterogeneous Reconstruction Only): the
  CTF-aware centre-versus-edge contrast of a sample of particles
  (:mod:`hetero_dask.core.contrast`) is significantly negative;
* :func:`refuse_inverted_fit` (Heterogeneous Refinement): most particles fit
  the negated starting maps better than the maps as given (the grey scale
  fitted at each particle's best pose is no test: the pose search picks, among
  many, poses where even an inverted image correlates positively).

Both refuse with :data:`FLIP_OPTION` in the message; nothing is flipped behind
the user's back, because the flip is recorded in every particle file written
(``blob/sign``) and a wrong guess would invert the maps.
"""

from __future__ import annotations

import numpy as np

from hetero_dask.core.contrast import centre_contrast, contrast_z_score
from hetero_dask.io.errors import InputError

FLIP_OPTION = "--flip-contrast (flip_contrast=True)"
CHECK_OPTION = "--no-contrast-check (contrast_check=False)"
SAMPLE, BATCH = 400, 64
# z below which the sample's contrast is called inverted: a false alarm on
# protein-positive particles needs a 3-sigma deviation of the sample mean.
Z_INVERTED = -3.0
# Share of particles preferring the negated maps above which refinement refuses: at any
# useful SNR the right sign wins nearly every particle; noise alone splits them evenly.
INVERTED_SHARE = 0.75


def check_contrast(particles, source, seed: int = 0) -> float:
    """Refuse (:class:`InputError`) particles whose sampled contrast is inverted; returns the z score.

    ``particles``: a :class:`~hetero_dask.io.particles.ParticleSet` (``SAMPLE``
    rows drawn with ``seed``) or a :class:`~hetero_dask.io.store.ParticleStore`
    (its first ``SAMPLE`` rows: the store's order is already random). Fewer
    than 5 particles are too few to tell and pass.
    """
    n = particles.n
    if hasattr(particles, "read_images"):
        rows = np.sort(np.random.default_rng(seed).permutation(n)[:SAMPLE])
        batches = [rows[b : b + BATCH] for b in range(0, len(rows), BATCH)]
        pairs = ((particles.read_images(r), particles.ctf(r)) for r in batches)
    else:
        stops = range(0, min(n, SAMPLE), BATCH)
        pairs = (
            (particles.images(b, min(b + BATCH, n, SAMPLE)), particles.ctf(b, min(b + BATCH, n, SAMPLE)))
            for b in stops
        )
    scores = np.concatenate(
        [centre_contrast(images, ctf, particles.psize_A) for images, ctf in pairs] or [np.zeros(0)]
    )
    z = contrast_z_score(scores)
    if len(scores) >= 5 and z < Z_INVERTED:
        raise InputError(
            source,
            f"the particles look inverted: after blob/sign their protein is darker than the "
            f"solvent in {int((scores < 0).sum())} of {len(scores)} sampled images (CTF-weighted "
            f"centre-minus-edge contrast {scores.mean():+.3f}, z = {z:.1f}); a RELION stack "
            f"extracted without 'invert contrast', or a .cs whose blob/sign is wrong",
            expected=f"protein-positive particles: pass {FLIP_OPTION} to multiply the images by "
            f"-1, or {CHECK_OPTION} if they are not centred particles",
        )
    return z


def refuse_inverted_fit(share_negated: float, n: int, source) -> None:
    """Refuse when most sampled particles fit the negated starting maps better than the maps
    as given (``share_negated`` of ``n`` particles, best class among the negated maps)."""
    if n >= 5 and share_negated > INVERTED_SHARE:
        raise InputError(
            source,
            f"{100 * share_negated:.0f}% of {n} sampled particles fit the negated starting maps "
            "better than the maps as given: the particles' contrast is inverted relative to the "
            "maps (protein dark after blob/sign, e.g. a RELION stack extracted without "
            "'invert contrast')",
            expected=f"particles and maps of one contrast: pass {FLIP_OPTION} to multiply the "
            "images by -1 (or negate the maps if they are the inverted ones)",
        )

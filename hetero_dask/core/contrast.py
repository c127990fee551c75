"""Which way round the particles' contrast is: protein brighter or darker than the solvent.

The image model (``Y = CTF * projection``, RELION's CTF sign) needs protein as
positive density. Each image is multiplied by its own CTF (phase flipping
that also weights by the CTF's amplitude, so defocus sign changes cancel),
low-pass filtered, and its mean over a central disc (radius 0.15 of the box)
is compared with its mean over the box's edge ring (0.42 to 0.5 of the box):
protein-positive particles give a positive difference. One image says little;
the mean over a few hundred does (see :func:`contrast_z_score`).
"""

from __future__ import annotations

import numpy as np

from .backend import xp_of
from .ctf import CTFParams, ctf_image
from .fourier import fft2c, ifft2c, radius_2d

CENTRE_FRAC, RING_FRACS = 0.15, (0.42, 0.5)


def centre_contrast(images, ctf: CTFParams, psize_A: float, lowpass_A: float = 30.0):
    """Per-image contrast ``(B,)`` float64 of centred particles ``(B, n, n)``: mean of the
    CTF-multiplied, low-passed image in the central disc minus its mean in the edge ring,
    over the image's standard deviation. Positive: protein brighter than the solvent."""
    xp = xp_of(images)
    n = images.shape[-1]
    r = radius_2d(n, xp)
    passband = (r / (n * psize_A) <= 1.0 / lowpass_A).astype(xp.float32)
    flipped = ifft2c(fft2c(xp.asarray(images, dtype=xp.float32)) * ctf_image(ctf, n, psize_A, xp) * passband).real
    centre = r < CENTRE_FRAC * n
    ring = (r >= RING_FRACS[0] * n) & (r < RING_FRACS[1] * n)
    diff = flipped[:, centre].mean(axis=1) - flipped[:, ring].mean(axis=1)
    sd = flipped.reshape(flipped.shape[0], -1).std(axis=1)
    return (diff / xp.where(sd > 0, sd, 1.0)).astype(xp.float64)


def contrast_z_score(scores) -> float:
    """``mean / standard error`` of per-image :func:`centre_contrast` scores: below about -3
    the particles are darker than the solvent (inverted contrast); NaN for fewer than 2."""
    s = np.asarray(scores, dtype=np.float64)
    if s.size < 2:
        return float("nan")
    sem = s.std(ddof=1) / np.sqrt(s.size)
    return float(s.mean() / sem) if sem > 0 else float(np.sign(s.mean()) * np.inf)

"""Class maps filtered as what the classes share plus what sets each apart.

Each class map is split into the population-weighted mean of all classes (the part
they share) and the class's deviation from that mean (the part that tells the
classes apart); each part is Wiener-filtered by its OWN half-set FSC and the two are
added back. Why: a class map's FSC (or the best class's, CryoSPARC's choice) is
dominated by the shared part, which rests on every particle. Filtered by it, the
deviation keeps the reconstruction noise of the few particles that define it, and in
the class likelihood that noise scores particles at random. The deviation's own FSC
measures the signal in what differs between the classes, which for conformations and
missing domains is a low-resolution signal.

The filter is the Wiener weight of a half map, ``T SNR / (1 + T SNR)`` with
``SNR = FSC / (1 - FSC)`` and RELION's ``T`` (``tau2_fudge``); at ``T = 1`` it is the
FSC itself. Maps are real ``(n, n, n)`` arrays, numpy or CuPy.
"""

from __future__ import annotations

from .backend import xp_of
from .fsc import _irfftn, _rfft_shells, _rfftn, fsc


def wiener_weight(curve, tau2_fudge: float = 1.0):
    """Per-shell Wiener weight of a half map with half-set FSC ``curve`` and signal scale ``tau2_fudge``."""
    xp = xp_of(curve)
    f = xp.clip(xp.asarray(curve, dtype=xp.float64), 0.0, 0.999)
    return tau2_fudge * f / (1.0 - f + tau2_fudge * f)


def shell_filtered(vol, weights):
    """``vol`` ``(n, n, n)`` with Fourier shell ``s`` multiplied by ``weights[s]``; 0 beyond the curve
    and in the corners beyond Nyquist (which no FSC measures)."""
    xp = xp_of(vol)
    n = vol.shape[-1]
    idx, _, n_shells = _rfft_shells(n, xp)
    w = xp.zeros(n_shells + 1, dtype=xp.float32)
    m = min(len(weights), n_shells)
    w[:m] = xp.asarray(weights[:m], dtype=xp.float32)
    F = _rfftn(vol, xp)
    return _irfftn(F * w[idx].reshape(F.shape), n, xp).astype(xp.float32)


def contrast_filtered(halves, fractions, tau2_fudge: float = 1.0, max_shell: int | None = None):
    """Half maps ``(K, 2, n, n, n)`` (unregularised) filtered as the weighted mean over the
    classes (``fractions`` ``(K,)``) plus each class's deviation from it, each part by the
    Wiener weight of its own FSC between the two halves; the curves are 0 from shell
    ``max_shell`` on (where the maps hold no data). Returns ``(K, 2, n, n, n)`` float32."""
    xp = xp_of(halves)
    K = halves.shape[0]
    frac = xp.asarray(fractions, dtype=xp.float64)
    frac = frac / frac.sum()
    mean = xp.tensordot(frac.astype(xp.float32), halves, axes=1)  # (2, n, n, n)

    def weights(a, b):
        curve = fsc(a, b)
        if max_shell is not None:
            curve[int(max_shell):] = 0.0
        return wiener_weight(curve, tau2_fudge)

    w_mean = weights(mean[0], mean[1])
    common = [shell_filtered(mean[h], w_mean) for h in (0, 1)]
    out = xp.empty_like(halves, dtype=xp.float32)
    for k in range(K):
        dev = halves[k] - mean
        w_dev = weights(dev[0], dev[1])
        for h in (0, 1):
            out[k, h] = common[h] + shell_filtered(dev[h], w_dev)
    return out

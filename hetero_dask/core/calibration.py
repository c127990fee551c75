"""Class posteriors that mean what they say: a temperature found without labels.

A likelihood that treats every Fourier coefficient as independent evidence is overconfident
when the class maps carry errors the particles share (poses, a blurred map): the log-posterior
ratios are T times too large. :func:`mixture_temperature` estimates T from the posteriors
alone. The log-ratios of each particle's posteriors to its first class's,
``d_k = log p_k - log p_0``, form one cloud per class in K - 1 dimensions; a Gaussian mixture
fitted to them (one full-covariance component per class, started from the posteriors
themselves) gives each particle the chance it belongs to each cloud judged by the clouds'
shapes, not by the likelihood's scale. T is the temperature whose tempered posteriors
``p^(1/T)`` (normalised) come closest to the mixture's responsibilities (mean
Kullback-Leibler divergence).

The mixture takes a few EM steps from the posteriors, not EM to convergence: it is to describe
the clouds the posteriors form. Where states overlap (a transition's neighbours), the converged
mixture sorts many particles into other clouds than their posteriors' and its temperature then
overshoots; stopped after 20 steps it stays on the posteriors' clouds. On clouds apart (a junk
class) 20 steps reach the converged answer.

That needs three or more classes: two classes' log-ratios are one number per particle whose
two clouds are skewed and of unequal spread, which one Gaussian each reads as overlap (the
measurements behind these statements: ``benchmarks/results/realistic/TUNING.md``). With fewer
than three populated classes the function gives no estimate.

Plain numpy (the fit runs once, on the driver, on a subsample).
"""

from __future__ import annotations

import numpy as np

_TEMPERATURES = np.geomspace(0.5, 8.0, 97)  # the range searched, 1/24 of an octave apart


def tempered(posterior: np.ndarray, temperature: float) -> np.ndarray:
    """Class posteriors ``(N, K)`` at ``temperature``: ``posterior ** (1 / temperature)``,
    normalised per particle, in ``posterior``'s float type (``posterior`` itself at 1). Rows that
    are all zero (particles never classified) stay zero. From posteriors computed with the prior
    weighed T times, those of the tempered model ``prior x likelihood^(1/T)``."""
    if temperature == 1:
        return posterior
    p = np.asarray(posterior)
    seen = p.sum(axis=1) > 0
    log_p = np.log(np.maximum(p[seen].astype(np.float64), np.finfo(np.float64).tiny)) / temperature
    log_p -= log_p.max(axis=1, keepdims=True)
    q = np.exp(log_p)
    out = np.zeros(p.shape, dtype=p.dtype if p.dtype.kind == "f" else np.float64)
    out[seen] = q / q.sum(axis=1, keepdims=True)
    return out


def mixture_temperature(posterior: np.ndarray, max_particles: int = 20_000, min_class_particles: float = 20.0,
                        iterations: int = 20) -> float | None:
    """The temperature of ``posterior`` ``(N, K)`` (see the module docstring); None when fewer
    than three classes hold ``min_class_particles`` each (summed posterior), or when a class's
    cloud is too flat to fit.

    At most ``max_particles`` rows are used, evenly spaced (the same rows whatever the
    cluster); rows that sum to zero are skipped.
    """
    p = np.asarray(posterior, dtype=np.float64)
    p = p[p.sum(axis=1) > 0]
    if len(p) > max_particles:
        p = p[np.linspace(0, len(p) - 1, max_particles).round().astype(np.int64)]
    p = p[:, p.sum(axis=0) >= min_class_particles]
    if p.shape[1] < 3:
        return None
    p = p / p.sum(axis=1, keepdims=True)
    log_p = np.log(np.maximum(p, np.finfo(np.float64).tiny))
    try:
        resp = _mixture_responsibilities(log_p[:, 1:] - log_p[:, :1], p, iterations)
    except np.linalg.LinAlgError:  # a class's cloud flat in some direction: nothing to fit
        return None
    log_r = np.log(np.maximum(resp, np.finfo(np.float64).tiny))
    kl = [np.mean(np.sum(resp * (log_r - _log_normalised(log_p / t)), axis=1)) for t in _TEMPERATURES]
    return float(_TEMPERATURES[int(np.argmin(kl))])


def _log_normalised(log_q: np.ndarray) -> np.ndarray:
    """Each row of ``log_q`` minus its log-sum-exp: the log of the normalised row."""
    top = log_q.max(axis=1, keepdims=True)
    return log_q - top - np.log(np.sum(np.exp(log_q - top), axis=1, keepdims=True))


def _mixture_responsibilities(d: np.ndarray, start: np.ndarray, iterations: int, tol: float = 1e-6) -> np.ndarray:
    """EM for a Gaussian mixture over the rows of ``d`` ``(N, D)``, one full-covariance
    component per column of ``start`` (the initial responsibilities ``(N, K)``); returns the
    final responsibilities."""
    resp = start
    for _ in range(iterations):
        log_like = np.stack([_component_log_density(d, resp[:, k]) for k in range(resp.shape[1])], axis=1)
        log_like += np.log(np.maximum(resp.mean(axis=0), np.finfo(np.float64).tiny))
        log_like -= log_like.max(axis=1, keepdims=True)
        new = np.exp(log_like)
        new /= new.sum(axis=1, keepdims=True)
        done = np.max(np.abs(new - resp)) < tol
        resp = new
        if done:
            break
    return resp


def _component_log_density(d: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Log density of each row of ``d`` under the Gaussian of the rows weighted by ``weight``
    (its weighted mean and covariance; a ridge of 1e-6 of the mean variance keeps it definite)."""
    w = weight / max(weight.sum(), np.finfo(np.float64).tiny)
    mean = w @ d
    x = d - mean
    cov = (x * w[:, None]).T @ x
    dim = d.shape[1]
    cov += (1e-6 * np.trace(cov) / dim + 1e-12) * np.eye(dim)
    chol = np.linalg.cholesky(cov)
    z = np.linalg.solve(chol, x.T)
    return -0.5 * np.sum(z * z, axis=0) - np.sum(np.log(np.diag(chol))) - 0.5 * dim * np.log(2 * np.pi)

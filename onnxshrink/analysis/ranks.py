"""How many ranks to keep: ratio, energy, empirical VBMF, or a MAC budget.

* ``energy(s, f)``: the smallest r whose first r squared singular values hold a share f of the
  total;
* ``evbmf_rank(M)``: the rank empirical variational Bayesian matrix factorisation estimates
  (Nakajima et al., 2013, "Global analytic solution of fully-observed variational Bayesian
  matrix factorization"): the noise variance σ² is the minimiser of the EVB free energy, and
  singular values above σ·sqrt(M·(1 + τ̄)(1 + α/τ̄)) are signal (α = L/M, τ̄ = 2.5129·sqrt(α));
* ``round_rank``: ranks rounded to a multiple of ``round`` (onnxruntime's convolutions keep
  their blocked layout for channel counts that are multiples of 8).

The callers guard VBMF: it can collapse to rank 0 or 1 on some layers, which is never what a
user wants from a compression pass, so its result is raised to a floor.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["energy_rank", "evbmf_rank", "round_rank"]


def energy_rank(s: np.ndarray, fraction: float) -> int:
    """Smallest r with Σ_{i<r} s_i² ≥ fraction · Σ s_i²."""
    e = np.cumsum(np.asarray(s, np.float64) ** 2)
    if e[-1] <= 0:
        return 1
    return int(np.searchsorted(e / e[-1], fraction - 1e-12) + 1)


def _tau(x: np.ndarray, alpha: float) -> np.ndarray:
    return 0.5 * (x - (1 + alpha) + np.sqrt(np.maximum((x - (1 + alpha)) ** 2 - 4 * alpha, 0.0)))


def _free_energy(
    sigma2: float, L: int, M: int, s: np.ndarray, residual: float, xubar: float
) -> float:
    H = len(s)
    alpha = L / M
    x = s**2 / (M * sigma2)
    z1, z2 = x[x > xubar], x[x <= xubar]
    tau_z1 = _tau(z1, alpha)
    return float(
        np.sum(z2 - np.log(z2))
        + np.sum(z1 - tau_z1)
        + np.sum(np.log((tau_z1 + 1) / z1))
        + alpha * np.sum(np.log(tau_z1 / alpha + 1))
        + residual / (M * sigma2)
        + (L - H) * np.log(sigma2)
    )


def evbmf_rank(matrix: np.ndarray) -> int:
    """The rank empirical VBMF keeps for ``matrix`` (the noise level estimated, not given)."""
    from scipy.optimize import minimize_scalar

    Y = np.asarray(matrix, np.float64)
    if Y.shape[0] > Y.shape[1]:
        Y = Y.T
    L, M = Y.shape
    s = np.linalg.svd(Y, compute_uv=False)
    alpha = L / M
    tauubar = 2.5129 * math.sqrt(alpha)
    xubar = (1 + tauubar) * (1 + alpha / tauubar)
    eH_ub = int(min(math.ceil(L / (1 + alpha)) - 1, L)) - 1
    upper = (np.sum(s**2)) / (L * M)
    if eH_ub + 1 >= len(s):
        return len(s)
    lower = max(s[eH_ub + 1] ** 2 / (M * xubar), float(np.mean(s[eH_ub + 1 :] ** 2)) / M)
    if not upper > lower > 0:
        return len(s)
    opt = minimize_scalar(
        _free_energy, args=(L, M, s, 0.0, xubar), bounds=(lower, upper), method="bounded"
    )
    threshold = math.sqrt(M * opt.x * (1 + tauubar) * (1 + alpha / tauubar))
    return int(np.sum(s > threshold))


def round_rank(r: float, size: int, multiple: int) -> int:
    """``r`` rounded to the nearest multiple of ``multiple`` within [multiple, size]
    (no rounding when ``multiple`` <= 1 or the size is below 16)."""
    r = max(1, int(round(r)))
    if multiple > 1 and size >= 16:
        r = max(multiple, int(round(r / multiple)) * multiple)
    return min(r, size)

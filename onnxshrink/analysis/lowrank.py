"""Rank-r factorisation of a weight matrix, plain or activation-aware.

A layer computes Y = X·W (+ b) with W of shape (n_in, n_out). Replacing W by A·B with A
(n_in × r) and B (r × n_out) costs r·(n_in + n_out) multiply-adds per row instead of
n_in·n_out.

* **Plain SVD**: W = U S Vᵀ truncated to r (Eckart-Young: the best rank-r W̃ in ‖W − W̃‖_F);
  A = U_r S_r^½, B = S_r^½ V_rᵀ.
* **Activation-aware SVD**: what matters is the error on the outputs the layer really
  produces, ‖X(W − W̃)‖_F on calibration inputs X. With the inputs' second moment
  G = XᵀX/N + λI = L·Lᵀ (Cholesky; λ = ridge · trace(G)/n_in keeps rank-deficient activations
  solvable), ‖X(W − W̃)‖² ∝ ‖Lᵀ(W − W̃)‖², so the best rank-r W̃ is L⁻ᵀ·SVD_r(LᵀW):
  A = L⁻ᵀ U_r S_r^½, B = S_r^½ V_rᵀ with U S Vᵀ = LᵀW (the whitening of SVD-LLM, Wang et al.
  2024; ASVD, Yuan et al. 2023). The dropped squared singular values of LᵀW are exactly the
  output energy lost on the calibration data, so ``energy`` ranks by the whitened spectrum.
  When the layer has a bias, the covariance (centred G) is used instead and the bias absorbs
  the mean: b̃ = b + μ·(W − W̃), the output mean kept exact.
* **Sequential** (after earlier layers were factorised, the layer's inputs x_s differ from the
  original's x_t): the full-rank W_ls = argmin ‖x_t·W − x_s·W_ls‖² (ridge, intercept when the
  layer has a bias) is truncated with the compressed model's own G, and b̃ = b + μ_t·W − μ_s·W̃,
  so each layer also corrects the error of the layers before it.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "Factors",
    "InputMoments",
    "factorize",
    "shrinks",
    "spectrum",
    "speedup_rank",
]


class InputMoments:
    """Running Σx and ΣxᵀX of a layer's input rows (n_in features), in float64."""

    def __init__(self, n: int) -> None:
        self.sum = np.zeros(n)
        self.gram = np.zeros((n, n))
        self.count = 0

    def update(self, rows: np.ndarray) -> None:
        rows = np.asarray(rows, np.float64)
        self.sum += rows.sum(0)
        self.gram += rows.T @ rows
        self.count += rows.shape[0]

    @property
    def mean(self) -> np.ndarray:
        return self.sum / max(self.count, 1)

    def second_moment(self, centred: bool) -> np.ndarray:
        g = self.gram / max(self.count, 1)
        if centred:
            mu = self.mean
            g = g - np.outer(mu, mu)
        return g


class Factors:
    """A ≈ (n_in × r), B (r × n_out) and the spectrum the rank was read from."""

    def __init__(self, A: np.ndarray, B: np.ndarray, s: np.ndarray) -> None:
        self.A, self.B, self.s = A, B, s

    @property
    def rank(self) -> int:
        return self.A.shape[1]


def _whitener(G: np.ndarray, ridge: float) -> np.ndarray:
    """Lower-triangular L with L·Lᵀ = G + λI (λ raised until the factorisation succeeds)."""
    n = G.shape[0]
    lam = max(ridge * float(np.trace(G)) / n, 1e-12)
    for _ in range(12):
        try:
            return np.linalg.cholesky(G + lam * np.eye(n))
        except np.linalg.LinAlgError:
            lam *= 10
    raise np.linalg.LinAlgError("input second moment is not positive definite")


def spectrum(W: np.ndarray, G: np.ndarray | None = None, ridge: float = 1e-4):
    """(U, s, Vt, L) of W, or of LᵀW when the input moment G is given (L None for plain)."""
    W = np.asarray(W, np.float64)
    L = None if G is None else _whitener(np.asarray(G, np.float64), ridge)
    M = W if L is None else L.T @ W
    U, s, Vt = np.linalg.svd(M, full_matrices=False)
    return U, s, Vt, L


def factorize(
    W: np.ndarray, r: int, svd=None, G: np.ndarray | None = None, ridge: float = 1e-4
) -> Factors:
    """Rank-``r`` factors of W (plain, or whitened by G); ``svd`` reuses :func:`spectrum`'s
    result."""
    U, s, Vt, L = svd if svd is not None else spectrum(W, G, ridge)
    r = min(r, len(s))
    root = np.sqrt(s[:r])
    A = U[:, :r] * root
    if L is not None:  # A = L⁻ᵀ U_r S_r^½
        import scipy.linalg

        A = scipy.linalg.solve_triangular(L.T, A, lower=False)
    B = root[:, None] * Vt[:r]
    return Factors(A, B, s)


def shrinks(r: int, n_in: int, n_out: int) -> bool:
    return r * (n_in + n_out) < n_in * n_out


def speedup_rank(n_in: int, n_out: int, x: float, multiple: int) -> int:
    """The largest r (a multiple of ``multiple`` where the layer is big enough) with
    r·(n_in + n_out) ≤ n_in·n_out / x."""
    r = math.floor(n_in * n_out / (x * (n_in + n_out)))
    if multiple > 1 and min(n_in, n_out) >= 16 and r >= multiple:
        r = (r // multiple) * multiple
    return max(1, r)

"""SmoothQuant (Xiao et al., ICML 2023): per-channel factors that move activation outliers into
the weights.

For Y = X·W and any s > 0, Y = (X·diag(s)⁻¹)·(diag(s)·W) exactly in float. A per-tensor
activation grid is coarse where a few channels of X are far larger than the rest (transformers'
LayerNorm outputs); s_j = max|X_j|^α / max|W_j,:|^(1−α) (the weight maximum over every reader of
X) evens the channels out, and each weight column's own grid absorbs the factor. α is chosen per
tensor from :data:`ALPHAS` -- or no smoothing -- by the readers' output error with activations
quantized per tensor as ``DynamicQuantizeLinear`` does and weights by ``quantize_w``, summed
over sampled calibration rows: ‖Q(X/s)·Q(diag(s)·W) − X·W‖².
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

__all__ = [
    "ALPHAS",
    "InputStats",
    "choose_alpha",
    "collect",
    "dynamic_fake_quant",
    "factors",
    "readers_error",
]

ALPHAS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)


class InputStats:
    """Per tensor: max |x| per channel (last axis) and up to ``rows`` sampled rows."""

    def __init__(self, rows: int = 2048, seed: int = 0) -> None:
        self.rows, self.rng = rows, np.random.default_rng(seed)
        self.absmax: dict[str, np.ndarray] = {}
        self.sample: dict[str, list[np.ndarray]] = {}

    def add(self, name: str, x: np.ndarray) -> None:
        flat = np.asarray(x, np.float32).reshape(-1, x.shape[-1])
        m = np.abs(flat).max(0)
        self.absmax[name] = m if name not in self.absmax else np.maximum(self.absmax[name], m)
        take = self.rng.choice(len(flat), min(len(flat), 256), replace=False)
        self.sample.setdefault(name, []).append(flat[take])

    def rows_of(self, name: str) -> np.ndarray:
        x = np.concatenate(self.sample[name])
        if len(x) > self.rows:
            x = x[self.rng.choice(len(x), self.rows, replace=False)]
        return x


def collect(model, names: list[str], data, workdir: Path, samples: int, progress=None):
    """:class:`InputStats` of the tensors ``names`` on the first ``samples`` samples."""
    from onnxshrink.calibrate import Probe, batch_samples

    stats = InputStats()
    with Probe(model, names, workdir) as probe:
        for batch in probe.run(data, samples):
            for name, x in batch.items():
                stats.add(name, x)
            if progress is not None:
                progress(batch_samples(batch))
    return stats


def dynamic_fake_quant(x: np.ndarray) -> np.ndarray:
    """``x`` through DynamicQuantizeLinear and back: uint8 over [min(x, 0), max(x, 0)]."""
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    s = (hi - lo) / 255.0 if hi > lo else 1.0
    zp = np.clip(np.round(-lo / s), 0, 255)
    return (np.clip(np.round(x / s) + zp, 0, 255) - zp) * s


def factors(absmax: np.ndarray, weights: list[np.ndarray], alpha: float) -> np.ndarray:
    """s_j = max|X_j|^α / max|W_j,:|^(1−α), the weights [K, N] of every reader; 1 where a
    channel or its weights are all zero."""
    wmax = np.max([np.abs(w).max(1) for w in weights], axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        s = np.power(absmax, alpha) / np.power(wmax, 1.0 - alpha)
    return np.where(np.isfinite(s) & (s > 0), s, 1.0)


def readers_error(
    x: np.ndarray,
    weights: list[np.ndarray],
    quantize_w: Callable[[np.ndarray, int], np.ndarray],
) -> Callable[[np.ndarray | None], float]:
    """error(s) = Σ_i ‖Q(X/s)·Q_i(diag(s)·W_i) − X·W_i‖² / Σ_i ‖X·W_i‖² for the rows ``x`` [R, K]
    read by ``weights`` (each [K, N]); Q is one uint8 grid (:func:`dynamic_fake_quant`),
    ``quantize_w(w, i)`` reader i's dequantized weight; s = None: no factors."""
    x = np.asarray(x, np.float32)  # float32 products: ~1e-7 relative, the errors ~1e-4
    refs = [x @ w.astype(np.float32) for w in weights]
    norm = sum(float(np.sum(r * r)) for r in refs) or 1.0

    def error(s: np.ndarray | None) -> float:
        xs = dynamic_fake_quant(x if s is None else x / s.astype(np.float32))
        total = 0.0
        for i, (w, r) in enumerate(zip(weights, refs)):
            ws = w if s is None else w * s[:, None]
            d = xs @ quantize_w(ws, i).astype(np.float32) - r
            total += float(np.einsum("ij,ij->", d, d, dtype=np.float64))
        return total / norm

    return error


def choose_alpha(
    x: np.ndarray,
    absmax: np.ndarray,
    weights: list[np.ndarray],
    quantize_w: Callable[[np.ndarray, int], np.ndarray],
) -> tuple[float | None, np.ndarray | None, dict[str, float]]:
    """(α or None, factors s or None, relative error per candidate) for the rows ``x`` [R, K]
    read by ``weights`` (each [K, N]); ``quantize_w(w, i)`` gives reader i's dequantized
    weight. None: no smoothing is best."""
    error = readers_error(x, weights, quantize_w)
    errors = {"none": error(None)}
    best, best_s = None, None
    for alpha in ALPHAS:
        s = factors(absmax, weights, alpha)
        errors[f"{alpha:g}"] = e = error(s)
        if e < errors["none" if best is None else f"{best:g}"]:
            best, best_s = alpha, s
    return best, best_s, errors

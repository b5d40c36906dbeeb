"""Activation ranges from calibration data, and the int8 / uint8 parameters they give.

One pass keeps each tensor's min and max; methods that need a distribution make a second
pass filling a 2048-bin histogram per tensor. Methods (``calibration``):

* ``minmax`` -- the observed range;
* ``percentile=<p>`` -- the p-th and (100 − p)-th percentiles (lower end 0 for non-negative
  tensors), clipping rare outliers;
* ``entropy`` -- TensorRT's KL-divergence threshold T on the histogram of |x|: the clipping
  whose quantized distribution (128 levels a side, or 256 for non-negative tensors, whose
  exact zeros are left out) diverges least from the observed one; range [−T, T] (or [0, T])
  intersected with the observed range;
* ``mse`` -- the clipping of the observed range (a fraction of it, searched on a grid) that
  minimises the expected squared error of quantizing the histogram: rounding error Δ²/12 inside,
  squared distance to the edge outside.

Cascade (:mod:`onnxshrink.analysis.cascade`) measures them where the upstream grids saturate;
:func:`clipped_copy` is that saturated float model, as a model (the empirical bias's reference).

Quantization parameters: uint8 asymmetric, scale = (hi − lo) / 255, zero point = round(−lo /
scale), with the range widened to include 0 so that 0 is exact (zero padding, ReLU).
int8 activations are asymmetric over [−128, 127] the same way.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import numpy as np

__all__ = [
    "METHODS",
    "percentile_range",
    "percentile_tails",
    "SETTLED",
    "Tails",
    "RangeStats",
    "choose_range",
    "clipped_copy",
    "grid_bounds",
    "qparams",
]

logger = logging.getLogger(__name__)

METHODS = ("minmax", "percentile", "entropy", "mse")
_BINS = 2048
SETTLED = 0.01  # cascade rounds stop once no range end moves by more than this of its width


def _levels(dtype: str) -> tuple[int, int]:
    """(qmin, qmax) of a uint8 / int8 activation grid."""
    return (0, 255) if dtype == "uint8" else (-128, 127)


@dataclasses.dataclass
class RangeStats:
    """Running min/max and, after ``start_histogram``, a histogram over [min, max]."""

    lo: float = math.inf
    hi: float = -math.inf
    hist: np.ndarray | None = None
    edges: tuple[float, float] | None = None

    def update_range(self, x: np.ndarray) -> None:
        if x.size:
            self.lo = min(self.lo, float(x.min()))
            self.hi = max(self.hi, float(x.max()))

    def start_histogram(self) -> None:
        lo, hi = self.lo, self.hi
        # a (nearly) constant tensor: widen the range so the bins stay distinct in float64
        span = 1e-5 * max(abs(lo), abs(hi), 1.0)
        if not hi - lo >= span:
            hi = lo + span
        self.edges = (lo, hi)
        self.hist = np.zeros(_BINS, np.float64)

    def update_histogram(self, x: np.ndarray) -> None:
        """Counts ``x`` into the bins; values beyond the edges go to the end bins."""
        lo, hi = self.edges
        x = np.asarray(x)
        # bin index by arithmetic, then bincount (np.histogram is ~10x slower here); float64
        # where float32 could not tell the bins of a narrow range far from 0 apart
        if x.dtype != np.float32 or (hi - lo) < 1e-3 * max(abs(lo), abs(hi)):
            x = x.astype(np.float64)
        idx = ((x - x.dtype.type(lo)) * x.dtype.type(_BINS / (hi - lo))).ravel()
        idx = np.clip(idx, 0, _BINS - 1, out=idx).astype(np.intp)
        self.hist += np.bincount(idx, minlength=_BINS)

    @property
    def centers(self) -> np.ndarray:
        lo, hi = self.edges
        w = (hi - lo) / _BINS
        return lo + w * (np.arange(_BINS) + 0.5)


def _percentile(st: RangeStats, p: float) -> tuple[float, float]:
    cdf = np.cumsum(st.hist) / max(st.hist.sum(), 1)
    c = st.centers
    hi = float(c[min(np.searchsorted(cdf, p / 100.0), _BINS - 1)])
    lo = 0.0 if st.lo >= 0 else float(c[min(np.searchsorted(cdf, 1 - p / 100.0), _BINS - 1)])
    return min(lo, st.hi), max(hi, lo)


def _abs_histogram(st: RangeStats) -> tuple[np.ndarray, float]:
    """Histogram of |x| on [0, max|x|] with _BINS bins (re-binned from the signed one)."""
    c, h = np.abs(st.centers), st.hist
    top = max(abs(st.lo), abs(st.hi), 1e-12)
    idx = np.minimum((c / top * _BINS).astype(int), _BINS - 1)
    out = np.zeros(_BINS)
    np.add.at(out, idx, h)
    return out, top


def _smooth(p: np.ndarray, eps: float = 1e-4) -> np.ndarray | None:
    """Gives empty bins a small mass ``eps`` taken evenly from the others (as onnxruntime's
    calibrator does), so a bin holding only clipped outliers does not make the KL infinite."""
    zero = p == 0
    n_zero, n_nonzero = int(zero.sum()), int((~zero).sum())
    if n_nonzero == 0:
        return None
    if n_zero:  # small enough that no non-empty bin goes negative
        eps = min(eps, 0.5 * float(p[~zero].min()) * n_nonzero / n_zero)
    return p + eps * zero - (eps * n_zero / n_nonzero) * ~zero


def _kl_threshold(hist: np.ndarray, top: float, levels: int = 128) -> float:
    """TensorRT's entropy calibration on a |x| histogram: the best clipping threshold."""
    best_t, best_kl = top, math.inf
    total = hist.sum()
    if total == 0:
        return top
    for i in range(levels, _BINS + 1, 16):
        ref = hist[:i].copy()
        ref[i - 1] += hist[i:].sum()  # clipped mass goes to the last bin
        # quantize the first i bins into `levels` levels, then expand back
        chunks = np.array_split(np.arange(i), levels)
        q = np.zeros(i)
        for ch in chunks:
            part = hist[ch]
            nz = part > 0
            if nz.any():
                q[ch[nz]] = part.sum() / nz.sum()
        p_ = _smooth(ref / ref.sum())
        q_ = _smooth(q / max(q.sum(), 1e-30))
        if p_ is None or q_ is None:
            continue
        mask = p_ > 0
        kl = float(np.sum(p_[mask] * np.log(p_[mask] / q_[mask])))
        if kl < best_kl:
            best_kl, best_t = kl, (i / _BINS) * top
    return best_t


def _mse_range(st: RangeStats, levels: int) -> tuple[float, float]:
    c, h = st.centers, st.hist
    best, best_err = (st.lo, st.hi), math.inf
    lo0, hi0 = min(st.lo, 0.0), max(st.hi, 0.0)
    for frac in np.linspace(0.3, 1.0, 71):
        lo, hi = lo0 * frac, hi0 * frac
        delta = (hi - lo) / (levels - 1)
        if delta <= 0:
            continue
        inside = (c >= lo) & (c <= hi)
        err = (
            h[inside].sum() * delta * delta / 12.0
            + float((h[c > hi] * (c[c > hi] - hi) ** 2).sum())
            + float((h[c < lo] * (lo - c[c < lo]) ** 2).sum())
        )
        if err < best_err:
            best, best_err = (lo, hi), err
    return best


@dataclasses.dataclass
class Tails:
    """What :func:`percentile_tails` saw: the range, the smallest value, and every value at or
    beyond each threshold it partitioned (``below`` is None for a non-negative tensor)."""

    lo: float
    hi: float
    smallest: float
    t_hi: float
    above: np.ndarray
    t_lo: float = -math.inf
    below: np.ndarray | None = None

    def beyond(self, arrays: list[np.ndarray], lo: float, hi: float) -> int:
        """How many values of ``arrays`` (the ones seen) lie outside [lo, hi]: counted in the
        tails where they hold them all, else in the arrays."""
        n = int(np.count_nonzero(self.above > hi)) if hi >= self.t_hi else _count(arrays, hi, 1)
        if lo <= self.smallest:
            return n
        if self.below is not None and lo <= self.t_lo:
            return n + int(np.count_nonzero(self.below < lo))
        return n + _count(arrays, lo, -1)


def _count(arrays: list[np.ndarray], t: float, side: int) -> int:
    return sum(int(np.count_nonzero(a > t if side > 0 else a < t)) for a in arrays)


def _kth(arrays: list[np.ndarray], k: int, largest: bool) -> tuple[float, float, np.ndarray]:
    """The k-th largest (or smallest) value over ``arrays``, exactly: the values beyond a
    threshold that a strided sample puts safely short of it, then one partition of those.
    Also the threshold and the values at or beyond it."""
    sign = 1.0 if largest else -1.0
    sample = np.concatenate([sign * a.ravel()[::37] for a in arrays])
    ks = min(len(sample), 2 * (k // 37) + 32)
    t = sign * np.partition(sample, len(sample) - ks)[len(sample) - ks]
    beyond = [a[a >= t] if largest else a[a <= t] for a in arrays]
    if sum(len(b) for b in beyond) < k:  # the sample misled: take everything
        beyond, t = [a.ravel() for a in arrays], -sign * math.inf
    values = np.concatenate(beyond)
    cand = sign * values
    return float(sign * np.partition(cand, len(cand) - k)[len(cand) - k]), float(t), values


def percentile_tails(arrays: list[np.ndarray], p: float) -> Tails:
    """``percentile`` calibration straight from the values (no histogram): the p-th
    percentile, and the (100 − p)-th or 0 for a non-negative tensor -- exact order statistics
    where the histogram gives its bin's centre; the tails are a 10⁻⁴ share of the values, so
    this costs a comparison per value instead of a bin index."""
    n = sum(a.size for a in arrays)
    if n == 0:
        return Tails(0.0, 1.0, math.inf, math.inf, np.zeros(0))
    smallest = min(float(a.min()) for a in arrays if a.size)
    k = max(1, n - math.ceil(p / 100.0 * n) + 1)
    hi, t_hi, above = _kth(arrays, k, largest=True)
    if smallest >= 0:
        return Tails(0.0, max(hi, 0.0), smallest, t_hi, above)
    lo, t_lo, below = _kth(arrays, max(1, math.ceil((1 - p / 100.0) * n)), False)
    return Tails(lo, max(hi, lo), smallest, t_hi, above, t_lo, below)


def percentile_range(arrays: list[np.ndarray], p: float) -> tuple[float, float]:
    """The (lo, hi) of :func:`percentile_tails`."""
    t = percentile_tails(arrays, p)
    return t.lo, t.hi


def choose_range(st: RangeStats, method: str, percentile: float = 99.99) -> tuple[float, float]:
    """The (lo, hi) range ``method`` picks from the statistics."""
    if st.lo > st.hi:  # never observed
        return 0.0, 1.0
    if method == "minmax" or st.hist is None:
        return st.lo, st.hi
    if method == "percentile":
        return _percentile(st, percentile)
    if method == "entropy":
        hist, top = _abs_histogram(st)
        if st.lo >= 0:
            # after a ReLU most values are exactly 0: that spike is exact in any range and
            # would drag the threshold down (spreading it over a level costs the most KL)
            hist[0] = 0.0
            return 0.0, min(st.hi, _kl_threshold(hist, top, levels=256))
        t = _kl_threshold(hist, top, levels=128)
        return max(st.lo, -t), min(st.hi, t)
    if method == "mse":
        return _mse_range(st, 256)
    raise ValueError(f"unknown calibration method {method!r}")


def qparams(lo: float, hi: float, dtype: str = "uint8") -> tuple[np.float32, np.ndarray]:
    """(scale, zero point) for an asymmetric range; 0 always representable exactly."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    qmin, qmax = _levels(dtype)
    scale = (hi - lo) / (qmax - qmin)
    if scale <= 0 or not math.isfinite(scale):
        scale = 1.0
    zp = int(round(qmin - lo / scale))
    zp = min(max(zp, qmin), qmax)
    np_dtype = np.uint8 if dtype == "uint8" else np.int8
    return np.float32(scale), np.array(zp, np_dtype)


def grid_bounds(lo: float, hi: float, dtype: str = "uint8") -> tuple[float, float]:
    """The real interval a quantized tensor with range (lo, hi) covers: its grid's two ends."""
    scale, zp = qparams(lo, hi, dtype)
    qmin, qmax = _levels(dtype)
    return float(scale) * (qmin - int(zp)), float(scale) * (qmax - int(zp))


def clipped_copy(model, bounds: dict[str, tuple[float, float]]):
    """A copy of ``model`` in which every reader of tensor ``t`` in ``bounds`` reads
    ``Clip(t, lo, hi)`` instead (``t`` itself, what a probe reads, is unchanged)."""
    import onnx_ir as ir

    from onnxshrink.calibrate import all_values
    from onnxshrink.irtools import insert_after_value, unique_name

    clone = model.clone()
    graph = clone.graph
    values = {v.name: v for v in all_values(graph)}
    for name, (lo, hi) in bounds.items():
        value = values[name]
        if value.dtype not in (None, ir.DataType.FLOAT):
            continue  # a Clip with float bounds on an integer tensor is not a valid model
        ends = []
        for end, x in (("lo", lo), ("hi", hi)):
            v = ir.val(
                unique_name(graph, f"{name}.saturate_{end}"),
                const_value=ir.tensor(np.array(x, np.float32)),
            )
            graph.register_initializer(v)
            ends.append(v)
        clip = ir.node("Clip", [value, *ends], name=unique_name(graph, f"{name}.saturate"))
        out = clip.outputs[0]
        out.name, out.type = unique_name(graph, f"{name}.saturated"), value.type
        out.shape = value.shape.copy() if value.shape is not None else None
        insert_after_value(graph, value, [clip], out)
    return clone

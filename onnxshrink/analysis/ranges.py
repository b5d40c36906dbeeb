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

Cascade (:func:`cascade_calibrate`): the ranges are measured again on the float model with
every quantized tensor saturated where its grid ends (:func:`clipped_copy`), round after round
until they settle, so each range is that of the tensor the quantized model actually computes.

Quantization parameters: uint8 asymmetric, scale = (hi − lo) / 255, zero point = round(−lo /
scale), with the range widened to include 0 so that 0 is exact (zero padding, ReLU).
int8 activations are asymmetric over [−128, 127] the same way.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path

import numpy as np

__all__ = [
    "METHODS",
    "SETTLED",
    "Cascade",
    "RangeStats",
    "cascade_calibrate",
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


def _collect(
    model,
    sources: list[str],
    mean_names: list[str],
    data,
    workdir: Path,
    samples: int,
    method: str,
    progress=None,
    seed: dict[str, RangeStats] | None = None,
):
    """(RangeStats of each tensor in ``sources``, per-channel mean of each in ``mean_names``).

    Without ``seed``: one pass for min/max and means, a second filling the histograms (unless
    ``method`` is minmax). With ``seed`` (the statistics of a previous round): one pass, the
    histograms laid over the seed's [min, max], values beyond it counted in the end bins."""
    from onnxshrink.calibrate import ChannelMoments, Probe, batch_samples

    stats = {s: RangeStats() for s in sources}
    histograms = method != "minmax"
    if seed is not None and histograms:
        for name, st in stats.items():
            st.lo, st.hi = seed[name].lo, seed[name].hi
            st.start_histogram()
            st.lo, st.hi = math.inf, -math.inf
    moments = {m: ChannelMoments(1) for m in mean_names}
    with Probe(model, sorted(set(sources) | set(mean_names)), workdir) as probe:
        for batch in probe.run(data, samples):
            for name in sources:
                stats[name].update_range(batch[name])
                if seed is not None and histograms:
                    stats[name].update_histogram(batch[name])
            for m in mean_names:
                moments[m].update(batch[m])
            if progress is not None:
                progress(batch_samples(batch))
        if seed is None and histograms:
            for st in stats.values():
                st.start_histogram()
            for batch in probe.run(data, samples):
                for name in sources:
                    stats[name].update_histogram(batch[name])
                if progress is not None:
                    progress(batch_samples(batch))
    return stats, {m: moments[m].mean for m in mean_names}


@dataclasses.dataclass
class Cascade:
    """What :func:`cascade_calibrate` found: ranges, input means, and how the rounds went."""

    ranges: dict[str, tuple[float, float]]
    means: dict[str, np.ndarray]  # per-channel means of ``mean_names`` on the float model
    changes: list[float]  # per re-measuring round: the largest move of a range end / its width
    shrunk: dict[str, float]  # tensor -> final width / first-round width, for those that moved


def cascade_calibrate(
    model,
    saturation,
    sources: list[str],
    mean_names: list[str],
    data,
    workdir: Path,
    samples: int,
    method: str,
    percentile: float,
    rounds: int,
    tol: float = SETTLED,
    progress=None,
) -> Cascade:
    """Ranges measured on the model *as the quantized one runs it*, up to saturation.

    Round 0 measures every range on the float model (what onnxruntime's calibrators do). Each
    further round measures them again on a copy in which every quantized tensor saturates where
    its uint8 grid ends (``saturation(ranges)`` gives tensor -> (lo, hi);
    :func:`clipped_copy`) -- the model's own clipping without its rounding. A tensor's range
    then reflects what the quantized model feeds it: large values that an upstream tensor's
    range already clips (outliers that grow along a residual stream) no longer widen the ranges
    downstream.
    Ranges at depth d settle after d rounds; the rounds stop when no range end moves by more
    than ``tol`` of its width, or after ``rounds``. One pass over the data per round (the
    histograms reuse the previous round's span); ``progress`` advances by samples seen.
    """
    stats, means = _collect(model, sources, mean_names, data, workdir, samples, method, progress)
    ranges = {s: choose_range(st, method, percentile) for s, st in stats.items()}
    first = dict(ranges)
    changes: list[float] = []
    for _ in range(rounds):
        clipped = clipped_copy(model, saturation(ranges))
        stats, _ = _collect(
            clipped, sources, [], data, workdir, samples, method, progress, seed=stats
        )
        new = {s: choose_range(st, method, percentile) for s, st in stats.items()}
        changes.append(max((_moved(ranges[s], new[s]) for s in new), default=0.0))
        ranges = new
        if changes[-1] <= tol:
            break
    shrunk = {
        s: (ranges[s][1] - ranges[s][0]) / (first[s][1] - first[s][0])
        for s in ranges
        if first[s][1] > first[s][0] and _moved(first[s], ranges[s]) > tol
    }
    return Cascade(ranges, means, changes, shrunk)


def _moved(old: tuple[float, float], new: tuple[float, float]) -> float:
    width = max(old[1] - old[0], 1e-12)
    return max(abs(new[0] - old[0]), abs(new[1] - old[1])) / width


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

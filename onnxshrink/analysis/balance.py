"""Activation range balancing in front of depthwise and pointwise convolutions.

A per-tensor uint8 activation gives every channel the step R/255 of the widest channel's range
R: a channel below m_c ≪ R keeps m_c/R of the levels. So channel c is multiplied by s_c in the
producer (weight row, bias) and divided by s_c in its readers -- the same function, more levels:

    s_c = (R / m_c)^α      (SmoothQuant's migration, Xiao et al. 2023)

A depthwise reader quantizes each channel's filter on its own grid, so the division is free:
α = ``balance-alpha``. A pointwise (1×1) reader's filters get a coarser share of their grid in
column c: α is chosen among α·{¼, ½, ¾, 1} or none by the readers' error ‖Q(X·s)·Q(W/s) − XW‖²
on sampled calibration rows. m_c is channel c's calibration maximum, so s_c ≥ 1, s_c·m_c ≤ R:
with a ReLU6 / Clip(0, u) in between (u ≥ R) the rewrite is exact on the calibration data;
above it a channel clips at u/s_c (docs/design.md). Handled: Conv → (Relu | Clip(min = 0)) →
depthwise or 1×1 Convs only, constant unshared weights.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from onnxshrink import marks
from onnxshrink.analysis.smoothing import readers_error
from onnxshrink.irtools import const_array, set_const_input, weight_users_outside

__all__ = [
    "BalancePair",
    "apply_balance",
    "balance_pairs",
    "choose_alpha",
    "sample_rows",
    "tensor_maxima",
]

FRACTIONS = (0.25, 0.5, 0.75, 1.0)  # of balance-alpha, tried with pointwise readers


@dataclasses.dataclass
class BalancePair:
    producer: ir.Node  # the Conv whose output channels are scaled
    activation: ir.Node | None  # Relu / Clip in between
    tensor: ir.Value  # the activation tensor that gets quantized
    consumers: list[ir.Node]  # depthwise or pointwise Convs reading it

    @property
    def pointwise(self) -> list[ir.Node]:
        """The readers that mix channels (1×1, group 1): the division costs weight precision."""
        return [u for u in self.consumers if u.attributes.get_int("group", 1) == 1]


def _clip_bounds(node: ir.Node) -> tuple[float | None, float | None] | None:
    """(min, max) of a Relu / Clip, None for anything else or non-constant bounds."""
    if node.op_type == "Relu":
        return 0.0, None
    if node.op_type != "Clip":
        return None
    if len(node.inputs) > 1:
        vals = []
        for i in (1, 2):
            v = node.inputs[i] if i < len(node.inputs) else None
            if v is None:
                vals.append(None)
                continue
            arr = const_array(v)
            if arr is None:
                return None
            vals.append(float(np.asarray(arr)))
        return vals[0], vals[1]
    return node.attributes.get_float("min", None), node.attributes.get_float("max", None)


def _owned(node: ir.Node, index: int) -> bool:
    v = node.inputs[index] if index < len(node.inputs) else None
    return v is not None and const_array(v) is not None and not weight_users_outside(v, node)


def _reads_channels(u: ir.Node, channels: int) -> bool:
    """A depthwise Conv over ``channels``, or a pointwise one (1×1 kernel, group 1)."""
    group = u.attributes.get_int("group", 1)
    if group == channels:
        return True
    w = const_array(u.inputs[1])
    return group == 1 and w.ndim == 4 and w.shape[1] == channels and w.shape[2:] == (1, 1)


def balance_pairs(graph: ir.Graph) -> list[BalancePair]:
    """Every Conv → (Relu | Clip(min = 0)) → depthwise/pointwise-Conv-only tensor that can be
    balanced."""
    pairs = []
    for node in graph:
        if node.op_type != "Conv" or not _owned(node, 1):
            continue
        if len(node.inputs) > 2 and node.inputs[2] is not None and not _owned(node, 2):
            continue
        out = node.outputs[0]
        act = None
        users = out.consumers()
        if out.is_graph_output():
            continue
        if len(users) == 1 and len(out.uses()) == 1 and users[0].op_type in ("Relu", "Clip"):
            bounds = _clip_bounds(users[0])
            if bounds is None or bounds[0] != 0.0:  # only a floor at 0 commutes with scaling
                continue
            act = users[0]
            out = act.outputs[0]
            users = out.consumers()
            if out.is_graph_output():
                continue
        channels = const_array(node.inputs[1]).shape[0]
        if not users or any(
            u.op_type != "Conv"
            or u.inputs[0] is not out
            or not _owned(u, 1)
            or not _reads_channels(u, channels)
            for u in users
        ):
            continue
        if any(v is out for u in users for v in u.inputs[1:]):
            continue
        pairs.append(BalancePair(node, act, out, list(users)))
    return pairs


def tensor_maxima(pair: BalancePair, outputs: list[np.ndarray]) -> np.ndarray:
    """m_c: the largest |value| per channel of ``pair.tensor`` on the calibration data, from
    the batches of the producer's output (a Relu / Clip(0, u) is monotone: its channel maximum
    is the activation of the output's)."""
    hi = lo = None
    for y in outputs:
        y3 = y.reshape(y.shape[0], y.shape[1], -1)
        h, m = y3.max((0, 2)).astype(np.float64), y3.min((0, 2)).astype(np.float64)
        hi, lo = (h, m) if hi is None else (np.maximum(hi, h), np.minimum(lo, m))
    if pair.activation is None:
        return np.maximum(hi, -lo)
    floor, ceiling = _clip_bounds(pair.activation)
    return np.clip(hi, 0.0, np.inf if ceiling is None else ceiling)


def apply_balance(graph: ir.Graph, pair: BalancePair, m: np.ndarray, alpha: float) -> np.ndarray:
    """Scales ``pair``'s channels by s_c = (R / m_c)^α (:func:`factors`); returns s."""
    s = factors(m, alpha)
    w = const_array(pair.producer.inputs[1])
    dtype = w.dtype
    shape = (-1,) + (1,) * (w.ndim - 1)
    set_const_input(
        graph, pair.producer, 1, (w.astype(np.float64) * s.reshape(shape)).astype(dtype), "balanced"
    )
    if len(pair.producer.inputs) > 2 and pair.producer.inputs[2] is not None:
        b = const_array(pair.producer.inputs[2])
        set_const_input(
            graph, pair.producer, 2, (b.astype(np.float64) * s).astype(dtype), "balanced"
        )
    for u in pair.consumers:
        w_u = const_array(u.inputs[1])
        wu = w_u.astype(np.float64)
        if u.attributes.get_int("group", 1) == 1 and len(s) > 1:  # column c of every filter
            scaled = wu / s.reshape(1, -1, 1, 1)
        else:  # depthwise: filters per input channel, one after the other
            scaled = wu / np.repeat(s, wu.shape[0] // len(s)).reshape(shape)
        set_const_input(graph, u, 1, scaled.astype(w_u.dtype), "balanced")
    marks.scale_channels(pair.producer, s)
    return s


def factors(m: np.ndarray, alpha: float) -> np.ndarray:
    """s_c = (R / m_c)^α, 1 for dead channels, at most 1e4."""
    R = float(m.max())
    s = np.ones_like(m, dtype=np.float64)
    live = m > 1e-6 * R
    s[live] = (R / m[live]) ** alpha
    return np.minimum(s, 1e4)


def sample_rows(pair: BalancePair, outputs: list[np.ndarray], rows: int = 2048) -> np.ndarray:
    """Up to ``rows`` positions [R, C] of ``pair.tensor`` (the activation applied to the
    producer's output batches), sampled with a fixed seed."""
    rng = np.random.default_rng(0)
    per = max(1, rows // max(len(outputs), 1))
    floor, ceiling = _clip_bounds(pair.activation) if pair.activation is not None else (None, None)
    taken = []
    for y in outputs:
        flat = y.reshape(y.shape[0], y.shape[1], -1).transpose(0, 2, 1).reshape(-1, y.shape[1])
        flat = flat[rng.choice(len(flat), min(per, len(flat)), replace=False)]
        taken.append(np.clip(flat, floor, ceiling) if pair.activation is not None else flat)
    return np.concatenate(taken).astype(np.float32)


def _fake_int8(u: ir.Node, w: np.ndarray, safe: bool) -> np.ndarray:
    """A pointwise reader's weights [O, C] through its int8 grid: symmetric per filter, nearest,
    the step at least the largest pair sum / 128 with ``safe`` (the pair rule, ``cpu=any``)."""
    from onnxshrink.analysis.qplan import quantize_weight
    from onnxshrink.analysis.saturation import weight_pairs

    w4 = w[:, :, None, None]
    scale, q = quantize_weight(w4, 0, pairs=weight_pairs(u, w4.shape) if safe else None)
    return (q[:, :, 0, 0] * scale[:, None]).astype(np.float32)


def choose_alpha(
    pair: BalancePair, x: np.ndarray, m: np.ndarray, alpha: float, safe: bool = False
) -> tuple[float | None, dict[str, float]]:
    """(α for ``pair``, or None: no balancing; relative error per candidate). Depthwise readers
    only: ``alpha``. With pointwise readers: the candidate α·FRACTIONS (or none) whose readers'
    quantized output on the rows ``x`` [R, C] is closest to the float one (``safe``: weights
    within the pair rule)."""
    readers = [const_array(u.inputs[1])[:, :, 0, 0].T for u in pair.pointwise]  # [C, O]
    if not readers:
        return alpha, {}
    error = readers_error(  # its s divides X: 1/s here
        x, readers, lambda w, i: _fake_int8(pair.pointwise[i], w.T, safe).T
    )
    errors = {"none": error(None)}
    best = None
    for a in (alpha * f for f in FRACTIONS):
        errors[f"{a:g}"] = e = error(1.0 / factors(m, a))
        if e < errors["none" if best is None else f"{best:g}"]:
            best = a
    return best, errors

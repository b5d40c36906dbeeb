"""Activation range balancing in front of depthwise convolutions, for per-tensor quantization.

A per-tensor uint8 activation gives every channel the step R/255 of the widest channel's range
R; a channel whose values stay below m_c ≪ R keeps only m_c/R of the 256 levels. After an
expand Conv of an inverted residual block the channel ranges differ by one to two orders of
magnitude, and the tensor feeds a depthwise Conv: each of its channels is read by its own
filter. So channel c can be multiplied by s_c in the producer (weight row and bias) and divided
by s_c in the depthwise filter, leaving the function unchanged while the quantized tensor uses
more of its levels -- in effect per-channel activation scales, at no cost in the weights
(both layers' weights are per-channel quantized: a whole channel scaled is the same grid).

    s_c = (R / m_c)^α,  α = 0.5 by default (SmoothQuant's migration strength, Xiao et al. 2023)

m_c is channel c's largest |value| on the calibration data, R the largest over channels, so
s_c ≥ 1 and s_c·m_c ≤ R: with a ReLU6 / Clip(0, u) between the layers (u ≥ R), the scaled
channel never reaches the clip on the calibration data, so the rewrite is exact there; above
the calibration maximum a channel clips at u/s_c instead of u (the quantized tensor saturates
at R anyway). α < 1 leaves headroom (R/m_c)^(1−α) above the calibration maximum (α = 1 fills
the range and clips unseen inputs: docs/design.md).

Handled: Conv → (Relu | Clip(min = 0, any max) | nothing) → only depthwise Convs (group =
channels), weights constant and not shared. Everything else is left alone.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from onnxshrink.irtools import const_array, set_const_input, weight_users_outside

__all__ = ["BalancePair", "apply_balance", "balance_pairs", "tensor_maxima"]


@dataclasses.dataclass
class BalancePair:
    producer: ir.Node  # the Conv whose output channels are scaled
    activation: ir.Node | None  # Relu / Clip in between
    tensor: ir.Value  # the activation tensor that gets quantized
    consumers: list[ir.Node]  # depthwise Convs reading it


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


def balance_pairs(graph: ir.Graph) -> list[BalancePair]:
    """Every Conv → (Relu | Clip(min = 0)) → depthwise-Conv-only tensor that can be balanced."""
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
            or u.attributes.get_int("group", 1) != channels
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
    """Scales ``pair``'s channels by s_c = (R / m_c)^α (dead channels: 1); returns s."""
    R = float(m.max())
    s = np.ones_like(m)
    live = m > 1e-6 * R
    s[live] = (R / m[live]) ** alpha
    s = np.minimum(s, 1e4)
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
        wu = const_array(u.inputs[1])
        per = wu.shape[0] // len(s)  # depthwise multiplier: filters per input channel
        set_const_input(
            graph,
            u,
            1,
            (wu.astype(np.float64) / np.repeat(s, per).reshape(shape)).astype(wu.dtype),
            "balanced",
        )
    return s

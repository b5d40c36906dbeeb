"""Small facts about QDQ graphs shared by the quantization passes.

:func:`shield_float_layer` -- float layers stay float in onnxruntime. onnxruntime's
``WeightBiasQuantization`` transformer (level 1, on in every default session) takes a Conv /
ConvTranspose / Gemm whose input comes from a DequantizeLinear with a *scalar* scale and whose
weight is a float initializer, and quantizes that weight to per-*tensor* int8 (bias to int32) at
session start, so the layer runs on integer kernels. A layer we leave float on purpose (excluded,
kept by mixed precision) would silently be quantized, and per tensor: on BatchNorm-folded
weights, whose channels differ in scale by orders of magnitude, that loses more than our
per-channel quantization would (docs/design.md). The layer reads a DQ of its own instead, with the
same scale and zero point repeated along the channel axis (``axis``, one entry per channel: the
same numbers, so the graph computes exactly what it did); a per-axis scale is not the pattern.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxshrink.irtools import const_array, unique_name

__all__ = ["dq_of", "qdq_params", "shield_float_layer"]


def qdq_params(node: ir.Node) -> tuple[np.ndarray, np.ndarray | None, int] | None:
    """(scale, zero point or None, axis) of a QuantizeLinear / DequantizeLinear, if constant."""
    scale = const_array(node.inputs[1])
    zp = (
        const_array(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
    )
    if scale is None or (len(node.inputs) > 2 and node.inputs[2] is not None and zp is None):
        return None
    return scale, zp, node.attributes.get_int("axis", 1)


def dq_of(value: ir.Value | None) -> ir.Node | None:
    """The DequantizeLinear that produces ``value``, if one does."""
    p = value.producer() if value is not None else None
    return p if p is not None and p.op_type == "DequantizeLinear" else None


def _channels(node: ir.Node, w: np.ndarray) -> tuple[int, int]:
    """(axis, size) of the input's channel axis -- the one the layer reduces over -- from the
    weight: Conv (O, C/g, ...) → C; ConvTranspose (C, O/g, ...) → C; Gemm → K, on axis 0 of A
    when transA."""
    if node.op_type == "Conv":
        return 1, w.shape[1] * node.attributes.get_int("group", 1)
    if node.op_type == "ConvTranspose":
        return 1, w.shape[0]
    k = w.shape[1] if node.attributes.get_int("transB", 0) else w.shape[0]
    return (0 if node.attributes.get_int("transA", 0) else 1), k


def shield_float_layer(graph: ir.Graph, node: ir.Node) -> tuple[str | None, str | None]:
    """(change, refusal): a float-weight layer after a per-tensor DQ reads a per-axis copy."""
    if node.op_type not in ("Conv", "ConvTranspose", "Gemm") or len(node.inputs) < 2:
        return None, None
    x_dq = dq_of(node.inputs[0])
    w = const_array(node.inputs[1]) if node.inputs[1] is not None else None
    if x_dq is None or w is None or dq_of(node.inputs[1]) is not None or w.dtype != np.float32:
        return None, None
    params = qdq_params(x_dq)
    if params is None or params[0].size != 1:
        return None, None
    axis, n = _channels(node, w)
    if n < 2:
        return None, (
            "one input channel: onnxruntime quantizes this float layer's weight per tensor "
            "at session start (WeightBiasQuantization)"
        )
    scale, zp, _ = params
    base = node.name or node.op_type
    s_val = ir.val(
        unique_name(graph, f"{base}.float_input_scale"),
        const_value=ir.tensor(np.full(n, scale.reshape(()), np.float32)),
    )
    ins = [x_dq.inputs[0], s_val]
    graph.register_initializer(s_val)
    if zp is not None:
        z_val = ir.val(
            unique_name(graph, f"{base}.float_input_zero_point"),
            const_value=ir.tensor(np.full(n, zp.reshape(()), zp.dtype)),
        )
        graph.register_initializer(z_val)
        ins.append(z_val)
    dq = ir.node(
        "DequantizeLinear",
        ins,
        attributes={"axis": axis},
        name=unique_name(graph, f"{base}.float_input_dq"),
    )
    x, out = node.inputs[0], dq.outputs[0]
    out.name, out.type = unique_name(graph, f"{base}.float_input"), x.type
    out.shape = x.shape.copy() if x.shape is not None else None
    graph.insert_before(node, dq)
    node.replace_input_with(0, out)
    return f"{base}: float layer reads a per-channel DQ (onnxruntime leaves its weight float)", None

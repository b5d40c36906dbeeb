"""Folds a QDQ graph into its lean form: what onnxruntime's integer kernels want to see.

Rules, on any QDQ model (ours or another tool's):

1. *weights pre-quantized*: ``DequantizeLinear(QuantizeLinear(W_float))`` with a constant W
   becomes ``DequantizeLinear(W_int8)`` -- W_int8 = saturate(round(W / s) + zp), exactly what
   the QuantizeLinear computed -- so no float weight is stored;
2. *int32 bias*: a constant float bias of a Conv / ConvTranspose / Gemm whose input and weight
   are both dequantized becomes ``DequantizeLinear(round(b / (s_x · s_w)), s_x · s_w, 0)``
   (per output channel when the weight is), the form onnxruntime fuses into QLinearConv / QGemm;
3. *no redundant pairs*: ``QuantizeLinear(DequantizeLinear(q))`` with equal scale, zero point and
   type is the identity on q: readers of the Q read q directly ("delete adjacent DQ and Q");
4. *float layers stay float*: a Conv / ConvTranspose / Gemm with a float weight that reads a
   per-tensor DQ gets a per-channel copy of that DQ (onnxruntime would otherwise quantize its
   weight per tensor at session start; :func:`onnxshrink.analysis.qdq.shield_float_layer`).
A DQ -> scale-preserving op -> Q with other parameters requantizes and is left alone.

Rule 2 rounds the bias to the accumulator's grid, which can move an output across a rounding
boundary of its own quantization: the pass is validated against the model before it (cosine
floor 0.9999), not as bit-exact.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import ClassVar

import numpy as np
import onnx_ir as ir

from onnxshrink.analysis.qdq import dq_of, qdq_params, shield_float_layer
from onnxshrink.irtools import const_array, unique_name, weight_users_outside
from onnxshrink.passes import options
from onnxshrink.passes.base import ShrinkPass

__all__ = ["FoldQDQPass"]

logger = logging.getLogger(__name__)


def _broadcast(arr: np.ndarray, axis: int, ndim: int) -> np.ndarray:
    if arr.ndim == 0 or ndim == 0:
        return arr
    shape = [1] * ndim
    shape[axis] = -1
    return arr.reshape(shape)


def _fold_weight(graph: ir.Graph, dq: ir.Node) -> str | None:
    q_out = dq.inputs[0]
    q = q_out.producer()
    if q is None or q.op_type != "QuantizeLinear" or len(q_out.uses()) != 1:
        return None
    w = const_array(q.inputs[0])
    params = qdq_params(q)
    if w is None or params is None:
        return None
    scale, zp, axis = params
    dtype = zp.dtype if zp is not None else np.uint8
    info = {
        np.dtype(np.int8): (-128, 127),
        np.dtype(np.uint8): (0, 255),
        np.dtype(np.int16): (-32768, 32767),
        np.dtype(np.uint16): (0, 65535),
    }.get(np.dtype(dtype))
    if info is None:
        return None
    axis = axis + w.ndim if axis < 0 else axis
    s = _broadcast(scale.astype(np.float32), axis, w.ndim)
    z = _broadcast((zp if zp is not None else np.zeros((), dtype)).astype(np.int32), axis, w.ndim)
    # QuantizeLinear rounds half to even after dividing in float32
    qv = np.clip(np.rint(w.astype(np.float32) / s) + z, *info).astype(dtype)
    base = q.name or q_out.name
    value = ir.val(unique_name(graph, f"{base}.int"), const_value=ir.tensor(qv))
    graph.register_initializer(value)
    dq.replace_input_with(0, value)
    return f"{q_out.name}: weight stored as {np.dtype(dtype).name}"


def _fold_bias(graph: ir.Graph, node: ir.Node) -> str | None:
    if (
        node.op_type not in ("Conv", "ConvTranspose", "Gemm")
        or len(node.inputs) < 3
        or node.inputs[2] is None
    ):
        return None
    if dq_of(node.inputs[2]) is not None:
        return None
    x_dq, w_dq = dq_of(node.inputs[0]), dq_of(node.inputs[1])
    b = const_array(node.inputs[2])
    if x_dq is None or w_dq is None or b is None or weight_users_outside(node.inputs[2], node):
        return None
    px, pw = qdq_params(x_dq), qdq_params(w_dq)
    if px is None or pw is None or px[0].size != 1:
        return None
    if node.op_type == "Gemm" and (
        node.attributes.get_float("alpha", 1.0) != 1.0
        or node.attributes.get_float("beta", 1.0) != 1.0
    ):
        return None
    n_out = b.shape[-1] if b.ndim else 1
    if b.ndim != 1:
        return None
    sw = pw[0].astype(np.float64).reshape(-1)
    if sw.size not in (1, n_out):
        return None
    s_b = float(px[0].reshape(())) * sw
    if sw.size == 1:
        s_b = np.full(n_out, s_b[0])
    bq = np.clip(np.rint(b.astype(np.float64) / s_b), -(2**31), 2**31 - 1).astype(np.int32)
    base = node.name or node.op_type
    bq_val = ir.val(unique_name(graph, f"{base}.bias_int32"), const_value=ir.tensor(bq))
    sb_val = ir.val(
        unique_name(graph, f"{base}.bias_scale"), const_value=ir.tensor(s_b.astype(np.float32))
    )
    zb_val = ir.val(
        unique_name(graph, f"{base}.bias_zero_point"),
        const_value=ir.tensor(np.zeros(n_out, np.int32)),
    )
    for v in (bq_val, sb_val, zb_val):
        graph.register_initializer(v)
    dq = ir.node(
        "DequantizeLinear",
        [bq_val, sb_val, zb_val],
        attributes={"axis": 0},
        name=unique_name(graph, f"{base}.bias_dq"),
    )
    dq.outputs[0].name = unique_name(graph, f"{base}.bias_dequantized")
    graph.insert_before(node, dq)
    node.replace_input_with(2, dq.outputs[0])
    return f"{base}: bias stored as int32 (scale s_x·s_w)"


def _same(a: tuple | None, b: tuple | None) -> bool:
    if a is None or b is None:
        return False
    (sa, za, xa), (sb, zb, xb) = a, b
    if sa.shape != sb.shape or not np.array_equal(sa, sb):
        return False
    if (za is None) != (zb is None):
        return False
    if za is not None and (za.dtype != zb.dtype or not np.array_equal(za, zb)):
        return False
    return sa.size == 1 or xa == xb


def _drop_pair(q: ir.Node) -> str | None:
    """Q(DQ(x)) with equal parameters: readers of the Q output read x."""
    dq = dq_of(q.inputs[0])
    if dq is None or not _same(qdq_params(dq), qdq_params(q)):
        return None
    out = q.outputs[0]
    if out.is_graph_output():
        return None
    out.replace_all_uses_with(dq.inputs[0])
    return f"removed DQ -> Q pair {dq.name or ''} -> {q.name or ''}"


@dataclasses.dataclass
class FoldQDQPass(ShrinkPass):
    """Pre-quantized weights, int32 biases, no redundant DQ -> Q pairs, float layers kept float."""

    name: ClassVar[str] = "fold-qdq"
    lossy: ClassVar[bool] = True
    compare_to: ClassVar[str] = "before"
    floor: float | None = options.floor(0.9999)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        modified = False
        for node in list(graph):
            what = None
            if node.op_type == "DequantizeLinear":
                what = _fold_weight(graph, node)
            elif node.op_type == "QuantizeLinear":
                what = _drop_pair(node)
            if what:
                self.change(what)
                modified = True
        for node in list(graph):
            if what := _fold_bias(graph, node):
                self.change(what)
                modified = True
        for node in list(graph):
            what, refusal = shield_float_layer(graph, node)
            if what:
                self.change(what)
                modified = True
            elif refusal:
                self.skip(node, refusal)
        return ir.passes.PassResult(model, modified=modified)

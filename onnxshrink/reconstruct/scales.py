"""Activation scales that reconstruction may learn (LSQ, Esser et al. 2020), and their biases.

An activation QuantizeLinear → DequantizeLinear pair computes s·(clamp(round(x/s) + z) − z);
with the rounding's gradient taken straight through, s gets a gradient (LSQ), so a block can
move its clipping ranges with its weights (BRECQ and QDrop learn them so). :func:`own_scales`
gives each pair its own scale initializer first -- ``quantize`` shares one between equal
scales -- except around ops that pass quantized values through unchanged (onnxruntime drops
their Q/DQ only when both sides' scales are equal). A learned input scale s_x changes the
grid of the int32 biases of the layers it feeds, s_b = s_x·s_w, which onnxruntime's integer
kernels assume: :func:`rescale_biases` re-rounds them, b = q·s_b kept (error ≤ s_b / 2).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxshrink.analysis.qplan import SHARE_OPS
from onnxshrink.irtools import unique_name

__all__ = ["is_activation_q", "own_scales", "rescale_biases"]

# ops onnxruntime runs on quantized values as they are, when their Q/DQ scales match: those
# ``quantize`` gives one scale (SHARE_OPS), and those other quantizers do
_PASS_THROUGH = SHARE_OPS | {"Gather", "Slice", "Split", "Identity", "Expand", "Tile"}
_PASS_THROUGH |= {"DepthToSpace"}


def is_activation_q(node: ir.Node) -> bool:
    """A QuantizeLinear of an activation (not of a constant weight)."""
    return node.op_type == "QuantizeLinear" and node.inputs[0].const_value is None


def _pairs(model: ir.Model):
    """(Q, its DequantizeLinear readers) of each activation QuantizeLinear."""
    for node in model.graph:
        if not is_activation_q(node):
            continue
        readers = node.outputs[0].consumers()
        if readers and all(r.op_type == "DequantizeLinear" for r in readers):
            yield node, readers


def own_scales(model: ir.Model) -> int:
    """Gives each activation Q/DQ pair its own scale initializer; returns how many it made.
    A pair next to a pass-through op, or whose scale is not a float scalar, is left alone."""
    made = 0
    graph = model.graph
    for q, dqs in _pairs(model):
        scale = q.inputs[1]
        arr = scale.const_value.numpy() if scale.const_value is not None else None
        if arr is None or arr.size != 1 or arr.dtype != np.float32:
            continue
        producer = q.inputs[0].producer()
        after = {r.op_type for dq in dqs for r in dq.outputs[0].consumers()}
        if (producer is not None and producer.op_type in _PASS_THROUGH) or after & _PASS_THROUGH:
            continue
        pair = {id(q), *(id(d) for d in dqs)}
        if all(id(u) in pair for u in scale.consumers()):
            continue  # its own already
        name = unique_name(graph, f"{q.inputs[0].name}.scale")
        own = ir.val(name, const_value=ir.tensor(arr.copy()))
        graph.register_initializer(own)
        for node in (q, *dqs):
            node.replace_input_with(1, own)
        made += 1
    return made


def rescale_biases(scales: list[ir.Value]) -> None:
    """Re-rounds the int32 biases of the layers that read a DequantizeLinear of each of
    ``scales`` (their new values already written) onto the grid s_x·s_w."""
    for scale in scales:
        s_x = float(scale.const_value.numpy())
        for dq in scale.consumers():
            if dq.op_type != "DequantizeLinear":
                continue
            for layer in dq.outputs[0].consumers():
                _rebias(layer, dq, s_x)


def _rebias(layer: ir.Node, dq: ir.Node, s_x: float) -> None:
    if layer.op_type not in ("Conv", "Gemm") or len(layer.inputs) < 3:
        return
    if layer.inputs[0] is not dq.outputs[0] or layer.inputs[2] is None:
        return
    w_dq, b_dq = layer.inputs[1].producer(), layer.inputs[2].producer()
    if any(n is None or n.op_type != "DequantizeLinear" for n in (w_dq, b_dq)):
        return
    codes, b_scale = b_dq.inputs[0], b_dq.inputs[1]
    if codes.const_value is None or codes.dtype != ir.DataType.INT32 or b_scale.const_value is None:
        return
    if len(b_scale.consumers()) != 1 or len(codes.consumers()) != 1:
        return  # shared: left as it is
    s_w = np.asarray(w_dq.inputs[1].const_value.numpy(), np.float64)
    old = np.asarray(b_scale.const_value.numpy(), np.float64)
    bias = codes.const_value.numpy().astype(np.float64) * old
    new = s_x * s_w
    if new.size != old.size:
        return
    new = new.reshape(old.shape)
    q = np.clip(np.round(bias / new), -(2**31), 2**31 - 1).astype(np.int32)
    codes.const_value = ir.tensor(q, name=codes.name)
    b_scale.const_value = ir.tensor(new.astype(np.float32), name=b_scale.name)

"""Step 7: the rewrite -- QuantizeLinear -> DequantizeLinear pairs where the plan says.

Fused activations go first (a Relu / Clip(min ≥ 0) after a compute op: removed, the uint8
saturation at zero point 0 is the ReLU); then each weighted layer's weight becomes
W -> Q -> DQ per output channel (:func:`~onnxshrink.passes.quantize.weights.int8_weights`, bias
corrected by ``weights`` / ``full``); then every planned tensor gets Q -> DQ with
scale = (hi − lo) / 255, zero point = round(−lo / scale) (uint8; int8 symmetric around it),
tensors with equal parameters sharing one scale/zero-point pair (in the linear scope, the
dequantized tensor reaches the quantized layers alone); layers left float get a
per-channel DQ so onnxruntime keeps them float (:func:`onnxshrink.analysis.qdq.shield_float_layer`).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxshrink.analysis.qdq import shield_float_layer
from onnxshrink.analysis.qplan import COMPUTE_OPS, WEIGHTED_OPS, QuantPlan, weight_axis
from onnxshrink.analysis.ranges import qparams
from onnxshrink.calibrate import all_values
from onnxshrink.irtools import const_array, insert_after_value, unique_name
from onnxshrink.passes.quantize.bias import correct_bias
from onnxshrink.passes.quantize.state import Log, QuantState, Step
from onnxshrink.passes.quantize.weights import int8_weights

__all__ = ["InsertQDQ", "rewrite"]


def _scalar_init(graph: ir.Graph, base: str, arr) -> ir.Value:
    v = ir.val(unique_name(graph, base), const_value=ir.tensor(np.asarray(arr)))
    graph.register_initializer(v)
    return v


def rewrite(
    p,
    state: QuantState,
    model: ir.Model,
    plan: QuantPlan,
    log: Log,
    *,
    means,
    deltas,
    moved: dict | None,
) -> None:
    """Quantizes ``model`` by ``plan`` with ``state``'s ranges and rounded weights; what it does
    goes to ``log`` (and weights the pair rule moved to ``moved``, when given)."""
    graph = model.graph
    values = {v.name: v for v in all_values(graph)}
    params = plan.params(state.ranges)
    qp = {t: qparams(*params[t], p.activations) for t in plan.tensors}
    for node, act in plan.fused:
        out = node.outputs[0]
        act.outputs[0].replace_all_uses_with(out, replace_graph_outputs=False)
        graph.remove(act, safe=True)
        log.change(f"fused {act.op_type} into {node.name or node.op_type}")
    for node in plan.nodes:
        if (
            node.op_type in WEIGHTED_OPS
            and len(node.inputs) > 1
            and const_array(node.inputs[1]) is not None
        ):
            float_in = plan.inputs.get(node.name, (None, None))[0]
            mu = means.get(float_in) if means is not None else None
            delta = deltas.get(float_in) if deltas is not None else None
            _quantize_weights(p, state, graph, node, mu, delta, log, moved)
        elif node.op_type in COMPUTE_OPS:  # named, so that a partial application can spare it
            log.change(f"{node.name}: {node.op_type} on int8 inputs", node.name)
    for out, why in plan.float_concat.items():
        if (node := values[out].producer()) is not None:
            log.skip(node, why)
    shared: dict[tuple[float, int], tuple[ir.Value, ir.Value]] = {}
    readers = {id(n) for n in plan.nodes} if plan.linear else None
    for t in plan.tensors:
        _insert(graph, values[t], *qp[t], shared, readers)
    for node in list(graph):  # layers left float must stay float in onnxruntime too
        what, refusal = shield_float_layer(graph, node)
        if what:
            log.change(what)
        elif refusal:
            log.skip(node, refusal)


def _quantize_weights(p, state, graph, node, mu, delta, log: Log, moved) -> None:
    w = const_array(node.inputs[1])
    scale, zp, deq, resolved = int8_weights(p, state, graph, node, w, delta, moved)
    axis = weight_axis(node, state.plan.linear)
    base = node.name or node.op_type
    s_val = _scalar_init(graph, f"{base}.weight_scale", scale)
    z_val = _scalar_init(graph, f"{base}.weight_zero_point", zp)
    attrs = {} if axis is None else {"axis": axis}
    q_node = ir.node(
        "QuantizeLinear",
        [node.inputs[1], s_val, z_val],
        attributes=attrs,
        name=unique_name(graph, f"{base}.weight_q"),
    )
    dq_node = ir.node(
        "DequantizeLinear",
        [q_node.outputs[0], s_val, z_val],
        attributes=attrs,
        name=unique_name(graph, f"{base}.weight_dq"),
    )
    q_node.outputs[0].name = unique_name(graph, f"{base}.weight_quantized")
    dq_node.outputs[0].name = unique_name(graph, f"{base}.weight_dequantized")
    graph.insert_before(node, [q_node, dq_node])
    node.replace_input_with(1, dq_node.outputs[0])
    if mu is not None and not resolved and node.op_type in ("Conv", "Gemm"):
        correct_bias(graph, node, w, deq, mu, delta)
    how = ", Hessian-aware rounding" if resolved else ""
    kind = "per-channel" if axis is not None else "per-tensor"
    log.change(f"{base}: weights int8 {kind}{how}", node.name)


def _insert(graph, value: ir.Value, scale, zp, shared: dict, readers: set[int] | None) -> None:
    """Q -> DQ after ``value`` (for the nodes in ``readers`` alone, when given); tensors with
    equal parameters share one scale/zero point initializer pair (so a scale-preserving op
    visibly reads and writes the same scale)."""
    base = value.name
    key = (float(scale), int(zp))
    if key not in shared:
        shared[key] = (
            _scalar_init(graph, f"{base}.scale", scale),
            _scalar_init(graph, f"{base}.zero_point", zp),
        )
    s_val, z_val = shared[key]
    q_node = ir.node("QuantizeLinear", [value, s_val, z_val], name=unique_name(graph, f"{base}.q"))
    dq_node = ir.node(
        "DequantizeLinear", [q_node.outputs[0], s_val, z_val], name=unique_name(graph, f"{base}.dq")
    )
    q_node.outputs[0].name = unique_name(graph, f"{base}.quantized")
    dq = dq_node.outputs[0]
    dq.name = unique_name(graph, f"{base}.dequantized")
    if value.dtype is not None:
        dq.dtype = value.dtype
    insert_after_value(graph, value, [q_node, dq_node], dq, readers)
    if value.is_graph_output() and readers is None:
        # the dequantized tensor takes the output's name and type
        dq.type, dq.shape = value.type, value.shape
        idx = [i for i, o in enumerate(graph.outputs) if o is value]
        name = value.name
        value.name = unique_name(graph, f"{name}.float")
        dq.name = name
        for i in idx:
            graph.outputs[i] = dq


class InsertQDQ(Step):
    name = "insert-qdq"

    def run(self, p, state: QuantState) -> None:
        rewrite(
            p,
            state,
            state.model,
            state.plan,
            p,
            means=state.means,
            deltas=state.deltas,
            moved=state.moved,
        )
        state.modified = True
        p.details["tensors"] = len(state.plan.tensors)
        p.details["nodes"] = len(state.plan.nodes)
        p.details["int8_cpu"] = {
            "cpu": p.cpu,
            "pair_rule": state.safe,
            "layers_moved": len(state.moved),
            "weights_moved": sum(state.moved.values()),
        }

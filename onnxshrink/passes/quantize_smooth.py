"""SmoothQuant applied to a graph: the inputs of the layers a quantization pass will quantize.

For each tensor X read by layers to be quantized (their weights W_i, [K, N] each), α and the
factors s come from :func:`onnxshrink.analysis.smoothing.choose_alpha` on calibration rows;
then W_i ← diag(s)·W_i, and X/s reaches those readers (other readers keep X): folded into the
LayerNormalization that makes X when the readers are all it feeds (γ/s, β/s), else one
``Mul(X, 1/s)`` node in front of them. Exact in float.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxshrink import marks
from onnxshrink.analysis.qplan import quantize_weight
from onnxshrink.analysis.saturation import make_safe, pairs
from onnxshrink.analysis.smoothing import choose_alpha, collect
from onnxshrink.irtools import const_array, set_const_input, unique_name, weight_users_outside

__all__ = ["smooth_inputs"]


def _kn(node: ir.Node) -> np.ndarray:
    """``node``'s weight as [K, N] (a Gemm's transB undone)."""
    w = const_array(node.inputs[1])
    return w.T if node.op_type == "Gemm" and node.attributes.get_int("transB", 0) else w


def _dequantized(w: np.ndarray, method: str, safe: bool) -> np.ndarray:
    """A [K, N] weight through per-column int8 (the pair rule kept when ``safe``) and back."""
    idx = pairs("MatMul", w.shape) if safe else None
    scale, q = quantize_weight(w, 1, method, idx)
    q, _ = make_safe(q, w / scale[None, :], idx)
    return q.astype(np.float64) * scale[None, :]


def _foldable_norm(x: ir.Value, readers: list[ir.Node]) -> ir.Node | None:
    """The LayerNormalization making ``x`` when ``readers`` are all that read it."""
    norm = x.producer()
    if norm is None or norm.op_type != "LayerNormalization" or x.is_graph_output():
        return None
    if {id(n) for n, _ in x.uses()} != {id(n) for n in readers}:
        return None
    if norm.attributes.get_int("axis", -1) not in (-1, len(x.shape or ()) - 1):
        return None
    params = [v for v in norm.inputs[1:3] if v is not None]
    if any(const_array(v) is None or weight_users_outside(v, norm) for v in params):
        return None
    return norm


def _apply(graph: ir.Graph, x: ir.Value, readers: list[ir.Node], s: np.ndarray) -> str:
    """Weights × s, X / s for ``readers``; returns how X was divided."""
    for node in readers:
        w = const_array(node.inputs[1])
        transposed = node.op_type == "Gemm" and node.attributes.get_int("transB", 0)
        new = w * s[None, :] if transposed else w * s[:, None]
        set_const_input(graph, node, 1, new.astype(w.dtype), "weight_smoothed")
    norm = _foldable_norm(x, readers)
    if norm is not None:
        for i in (1, 2):
            if i < len(norm.inputs) and norm.inputs[i] is not None:
                v = const_array(norm.inputs[i])
                set_const_input(graph, norm, i, (v / s).astype(v.dtype), "smoothed")
        marks.scale_channels(norm, 1 / s)
        return "folded into its LayerNormalization"
    inv = ir.val(
        unique_name(graph, f"{x.name}.smooth"), const_value=ir.tensor((1 / s).astype(np.float32))
    )
    graph.register_initializer(inv)
    mul = ir.node("Mul", [x, inv], name=unique_name(graph, f"{x.name}.smoothed"))
    mul.outputs[0].name = unique_name(graph, f"{x.name}.smoothed")
    graph.insert_before(readers[0], [mul])
    for node in readers:
        node.replace_input_with(0, mul.outputs[0])
    return "a Mul in front of its readers"


def smooth_inputs(p, model: ir.Model, nodes: list[ir.Node], safe: bool) -> dict[str, dict]:
    """Smooths the input of ``nodes`` (grouped by tensor) where it lowers the quantized output
    error on ``p``'s calibration data; what was chosen, per tensor."""
    groups: dict[str, list[ir.Node]] = {}
    for node in nodes:
        groups.setdefault(node.inputs[0].name, []).append(node)
    data = p.context.data
    n = min(p.samples, data.n_samples)
    task = p.task(f"{p.name}: smoothing", n)
    with p.scratch() as workdir:
        stats = collect(model, list(groups), data, workdir, n, progress=task)
    task.done()
    out = {}
    for name, readers in groups.items():
        weights = [_kn(node) for node in readers]
        alpha, s, errors = choose_alpha(
            stats.rows_of(name),
            stats.absmax[name],
            weights,
            lambda w, i: _dequantized(w, p.weights, safe),
        )
        record = {"alpha": alpha, "error_none": round(errors["none"], 6)}
        if alpha is not None:
            record["error"] = round(errors[f"{alpha:g}"], 6)
            record["how"] = _apply(model.graph, readers[0].inputs[0], readers, s)
        out[name] = record
    return out

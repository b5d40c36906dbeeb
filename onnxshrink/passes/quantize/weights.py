"""Step 4 and the weight half of step 7: int8 weights, per output channel, within the pair rule.

Scale per output channel s = max|W| / 127 (``weights=mse``: the clipping that minimises
‖W − s·q‖²); with ``cpu=any`` at least the largest pair sum / 128, and every pair (2j, 2j+1) of
the integer kernel's reduction axis kept within |q_a + q_b| ≤ 128
(:mod:`onnxshrink.analysis.saturation`:
CPUs without VNNI add pairs in int16). Rounding: nearest, or Hessian-aware (``rounding=hessian``,
GPTQ; :func:`onnxshrink.analysis.rounding.round_int8`): each rounding error pushed onto the
inputs not yet rounded so the layer's output on the calibration data moves least, the bias
re-solved in the same system. The weight is stored on its grid, so QuantizeLinear gives back q.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxshrink.analysis.bias import apply_to_mean, subtract_from_bias
from onnxshrink.analysis.qplan import WEIGHTED_OPS, quantize_weight, weight_axis, weight_scale
from onnxshrink.analysis.rounding import (
    chunks_needed,
    round_int8,
    steerable,
    too_few_rows,
    usable_grams,
)
from onnxshrink.analysis.saturation import make_safe, weight_pairs
from onnxshrink.irtools import const_array, set_const_input
from onnxshrink.passes.quantize.state import QuantState, Step

__all__ = ["RoundWeights", "hessian_nodes", "int8_weights"]


def _pairs(state: QuantState, node: ir.Node, w: np.ndarray):
    """The weight pairs an integer kernel adds in int16 (None: no rule, ``cpu=vnni``)."""
    return weight_pairs(node, w.shape) if state.safe else None


def hessian_nodes(state: QuantState, refused: dict[str, str]) -> list[ir.Node]:
    """The weighted layers Hessian-aware rounding can steer (the others named in ``refused``)."""
    return steerable(
        [
            node
            for node in state.plan.nodes
            if node.op_type in WEIGHTED_OPS
            and len(node.inputs) > 1
            and const_array(node.inputs[1]) is not None
        ],
        refused,
    )


class RoundWeights(Step):
    """Hessian-aware rounding of every weighted layer it can steer: ``state.presets``."""

    name = "round-weights"

    def wanted(self, p, state: QuantState) -> bool:
        return state.rounding == "hessian"

    def run(self, p, state: QuantState) -> None:
        refused: dict[str, str] = {}
        nodes = hessian_nodes(state, refused)
        presets = {}
        errors = []
        tapped = state.grams  # collected in the calibration sweep (cascade.py), when they fit
        if tapped is not None:
            for node in [n for n in nodes if id(n) in tapped.H]:
                H, rows = tapped.pop(node)
                if reason := too_few_rows(H, rows):
                    refused[node.name] = reason
                else:
                    presets[node.name] = self._round_layer(p, state, node, H)
                    errors.append(presets[node.name][3])
            nodes = [n for n in nodes if n.name not in presets and n.name not in refused]
        if nodes:
            n = min(p.samples, state.data.n_samples)
            task = p.task(f"{p.name}: Hessian-aware rounding", n * chunks_needed(nodes))
            for node, H in usable_grams(
                state.model, nodes, state.data, state.workdir, n, refused, progress=task
            ):
                presets[node.name] = self._round_layer(p, state, node, H)
                errors.append(presets[node.name][3])
            task.done()
        state.grams = None
        if refused:
            p.details["nearest_rounding"] = refused
        if errors:
            p.details["rounding"] = {
                "layers": len(errors),
                "output_error_nearest": round(float(np.mean([e[0] for e in errors])), 8),
                "output_error_hessian": round(float(np.mean([e[1] for e in errors])), 8),
            }
        state.presets = presets

    @staticmethod
    def _round_layer(p, state: QuantState, node: ir.Node, H: np.ndarray) -> tuple:
        """(scale, int8 weights, bias or None, (error nearest, error Hessian)) of one layer."""
        axis = weight_axis(node, state.plan.linear)
        w = const_array(node.inputs[1])
        scale = weight_scale(w, axis, p.weights, _pairs(state, node, w))
        q, b, errs, moved = round_int8(node, H, scale, axis, safe=state.safe)
        if moved:
            state.moved[node.name] = moved
        return scale, q, b, errs


def _pair_safe(state: QuantState, graph, node, q, scale, w, moved: dict | None) -> np.ndarray:
    """The dequantized weight q * scale, every pair within the pair rule first (``cpu=any``); a
    weight that moved is stored on its grid (QuantizeLinear gives back exactly q)."""
    n_moved = 0
    if state.safe:
        q, n_moved = make_safe(q, w / scale, weight_pairs(node, np.shape(q)))
    deq = np.asarray(q, np.float64) * scale
    if n_moved:
        set_const_input(graph, node, 1, deq.astype(w.dtype), "weight_rounded")
        if moved is not None:
            moved[node.name] = moved.get(node.name, 0) + n_moved
    return deq


def int8_weights(
    p, state: QuantState, graph: ir.Graph, node: ir.Node, w: np.ndarray, delta, moved: dict | None
) -> tuple[object, np.ndarray, np.ndarray, bool]:
    """(scale, zero point, dequantized weight, whether the bias was re-solved) of ``node``'s
    weight ``w``; a Hessian-rounded layer's weight and bias are written to the graph here."""
    axis = weight_axis(node, state.plan.linear)
    preset = state.presets.get(node.name)
    if preset is not None:
        scale, q, b, _ = preset
        shape = [1] * w.ndim
        if axis is not None:
            shape[axis] = -1
        deq = _pair_safe(state, graph, node, q, np.reshape(scale, shape), w, moved)
        zp = np.zeros(len(scale), np.int8) if axis is not None else np.array(0, np.int8)
        # the weight is stored on its grid: QuantizeLinear gives back exactly q
        set_const_input(graph, node, 1, deq.astype(w.dtype), "weight_rounded")
        if b is not None:
            set_const_input(graph, node, 2, np.asarray(b).astype(w.dtype), "bias_rounded")
            if node.op_type == "Gemm":
                node.attributes["alpha"] = ir.AttrFloat32("alpha", 1.0)
                node.attributes["beta"] = ir.AttrFloat32("beta", 1.0)
        if delta is not None:
            subtract_from_bias(graph, node, apply_to_mean(node, deq, delta))
        return scale, zp, deq, True
    if axis is None:
        scale = weight_scale(w, None, pairs=_pairs(state, node, w))
        q = np.clip(np.round(w / scale), -127, 127).astype(np.int8)
        deq = _pair_safe(state, graph, node, q, float(scale), w, moved)
        return scale, np.array(0, np.int8), deq, False
    scale, q = quantize_weight(w, axis, p.weights, _pairs(state, node, w))
    shape = [1] * w.ndim
    shape[axis] = -1
    deq = _pair_safe(state, graph, node, q, scale.reshape(shape), w, moved)
    return scale, np.zeros(len(scale), np.int8), deq, False

"""Dynamic int8 for MatMul/Gemm with constant weights: activations quantized at run time.

For Y = X·W (+ b), W constant [K, N]: W per output column, symmetric int8 (W ≈ q_W·diag(s_W));
X per tensor at run time by ``DynamicQuantizeLinear`` (uint8, X ≈ s_x·(q_x − z_x), the range
of each call's values and 0). Then Y = Cast(MatMulInteger(q_x, q_W, z_x, 0))·(s_x·s_W) (+ b):
the form onnxruntime fuses into ``DynamicQuantizeMatMul`` / ``MatMulIntegerToFloat`` (one
DynamicQuantizeLinear per tensor, shared by its readers). Gemm: W = α·B (Bᵀ when transB), the
bias β·C added after.

``cpu=any`` (default): every weight pair keeps the pair rule (:mod:`onnxshrink.analysis.
saturation`) -- onnxruntime's dynamic MatMul runs the same u8s8 kernels that saturate without
VNNI. With real data (``rounding=auto``): Hessian-aware rounding (GPTQ,
:func:`onnxshrink.analysis.rounding.round_int8`) on the Gram of each layer's float inputs.
MatMuls of two activations (attention scores) stay float. Refused (reason in the report):
non-float32 tensors, a weight shared with another node, Gemm with transA or a non-constant C.
With real data (``smooth=auto``), each quantized layer's input is smoothed first where that
lowers the quantized output error (SmoothQuant: :mod:`onnxshrink.passes.quantize_smooth`).
``embeddings=true``: a Gather from a constant float matrix (token, position tables) becomes
8-bit ``GatherBlockQuantized`` (:mod:`onnxshrink.passes.embeddings`; rows dequantized as read).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal

import numpy as np
import onnx_ir as ir

from onnxshrink import cpu as host
from onnxshrink.analysis.heldout_rounding import choose_rounding
from onnxshrink.analysis.qplan import quantize_weight
from onnxshrink.analysis.saturation import make_safe, weight_pairs
from onnxshrink.irtools import (
    const_array,
    infer_types,
    unique_name,
)
from onnxshrink.passes import options
from onnxshrink.passes.base import ShrinkPass
from onnxshrink.passes.embeddings import layers_and_tables
from onnxshrink.passes.quantize_smooth import smooth_inputs
from onnxshrink.passes.weight_layers import (
    constant,
    held_out_layers,
    weight_refusal,
)

__all__ = ["QuantizeDynamicPass"]

_F32 = ir.DataType.FLOAT
_QUANTIZED = ("DynamicQuantizeLinear", "MatMulInteger", "GatherBlockQuantized")


def _axis(node: ir.Node) -> int:
    """The output-column axis of ``node``'s weight."""
    return 0 if node.op_type == "Gemm" and node.attributes.get_int("transB", 0) else 1


def _alpha(node: ir.Node) -> float:
    """Gemm's α (1 for a MatMul): the weight grid is scaled by it (the system holds α·B)."""
    return node.attributes.get_float("alpha", 1.0) if node.op_type == "Gemm" else 1.0


def _refusal(node: ir.Node, dtypes: dict[str, ir.DataType]) -> str | None:
    """Why ``node`` (a MatMul/Gemm) is left float, or None."""
    return weight_refusal(node, dtypes, "a per-column MatMulInteger")


@dataclasses.dataclass
class QuantizeDynamicPass(ShrinkPass):
    """Dynamic int8 MatMul/Gemm: int8 weights per output column, activations quantized at run
    time (onnxruntime's DynamicQuantizeMatMul); no activation ranges to calibrate."""

    name: ClassVar[str] = "quantize-dynamic"
    lossy: ClassVar[bool] = True

    rounding: Literal["auto", "nearest", "hessian"] = "auto"
    weights: Literal["minmax", "mse"] = "minmax"
    cpu: Literal["any", "vnni", "auto"] = "any"
    embeddings: bool = True
    smooth: Literal["auto", "off"] = "auto"
    skip_: tuple[str, ...] = options.layers()  # CLI name: skip (or exclude, its old name)
    samples: int = options.samples(128)
    floor: float | None = options.floor(0.95)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if any(n.op_type in _QUANTIZED for n in model.graph):
            self.skip("model", "the model is already quantized (has MatMulInteger)")
            return ir.passes.PassResult(model, modified=False)
        nodes, tables = layers_and_tables(self, model, _refusal, bits=8)
        if not nodes and not tables:
            return ir.passes.PassResult(model, modified=False)
        safe = self.cpu == "any" or (self.cpu == "auto" and host.this_cpu().int8 != "exact")
        if nodes and self.smooth == "auto" and self.has_real_data:
            smoothed = smooth_inputs(self, model, nodes, safe)
            self.details["smoothing"] = {
                name: r for name, r in smoothed.items() if r["alpha"] is not None
            }
        rounded, steered = self._hessian(model, nodes, safe)
        shared: dict[str, tuple[ir.Value, ...]] = {}
        moved = 0
        for node in nodes:
            scale, q, bias, n_moved = rounded.get(node.name) or self._nearest(node, safe)
            moved += n_moved
            self._emit(model.graph, node, scale, q, bias, shared)
            how = ", Hessian-aware rounding" if node.name in steered else ""
            self.change(f"{node.name}: dynamic int8 (weights per column{how})", node.name)
        if safe:
            self.details["int8_cpu"] = {"pair_rule": True, "weights_moved": moved}
        self.details["dynamic_int8"] = len(nodes)
        if tables:
            self.details["embeddings_int8"] = tables
        infer_types(model)  # onnxruntime's fusions (SkipLayerNormalization) check shapes
        return ir.passes.PassResult(model, modified=True)

    def _nearest(self, node: ir.Node, safe: bool) -> tuple:
        """(scale [N] of α·W, int8 weight in the node's layout, bias or None, weights the rule
        moved)."""
        w = const_array(node.inputs[1])
        axis = _axis(node)
        pairs = weight_pairs(node, w.shape) if safe else None
        scale, q = quantize_weight(w, axis, self.weights, pairs)
        shape = [1, 1]
        shape[axis] = -1
        q, n_moved = make_safe(q, w / scale.reshape(shape), pairs)
        return scale * _alpha(node), q, None, n_moved

    def _hessian(self, model: ir.Model, nodes: list[ir.Node], safe: bool):
        """(node name -> what :meth:`_nearest` gives, or Hessian-aware rounding where it does
        better on held-out calibration rows (:mod:`onnxshrink.analysis.heldout_rounding`); the
        names rounded Hessian-aware). Empty without real data or with ``rounding=nearest``."""
        want = self.rounding == "hessian" or (self.rounding == "auto" and self.has_real_data)
        data = self.context.data
        if not want or data is None:
            return {}, set()
        out, chosen, steered = {}, {}, set()
        for node, H_fit, H_val in held_out_layers(self, model, nodes):
            nearest = self._nearest(node, safe)
            scale = nearest[0]
            q, b, moved, record = choose_rounding(
                node, H_fit, H_val, scale, _axis(node), nearest[1], safe=safe
            )
            chosen[record["chosen"]] = chosen.get(record["chosen"], 0) + 1
            if record["chosen"] == "nearest":
                out[node.name] = nearest
            else:
                out[node.name] = (scale, q, b, moved)
                steered.add(node.name)
        self.details["rounding"] = chosen
        return out, steered

    def _emit(self, graph: ir.Graph, node: ir.Node, scale, q, bias, shared) -> None:
        """Replaces ``node`` by MatMulInteger → Cast → Mul(s_x·s_W) (→ Add bias)."""
        base = node.name
        x = node.inputs[0]
        if x.name not in shared:
            dql = ir.node(
                "DynamicQuantizeLinear", [x], num_outputs=3, name=unique_name(graph, f"{base}.dql")
            )
            for out, what in zip(dql.outputs, ("quantized", "scale", "zero_point")):
                out.name = unique_name(graph, f"{x.name}.{what}")
            graph.insert_before(node, [dql])
            shared[x.name] = tuple(dql.outputs)
        xq, xs, xz = shared[x.name]
        if node.op_type == "Gemm" and node.attributes.get_int("transB", 0):
            q = q.T
        c = None
        if node.op_type == "Gemm" and len(node.inputs) > 2 and node.inputs[2] is not None:
            c = node.inputs[2]
            beta = node.attributes.get_float("beta", 1.0)
            b = np.asarray(const_array(c), np.float64) * beta if bias is None else bias
            c = constant(graph, f"{base}.bias", np.asarray(b, np.float32))
        elif bias is not None and node.op_type == "Gemm":
            c = constant(graph, f"{base}.bias", np.asarray(bias, np.float32))
        wq = constant(graph, f"{base}.weight_quantized", np.ascontiguousarray(q, np.int8))
        wz = constant(graph, f"{base}.weight_zero_point", np.zeros(q.shape[1], np.int8))
        ws = constant(graph, f"{base}.weight_scale", np.asarray(scale, np.float32))
        mm = ir.node("MatMulInteger", [xq, wq, xz, wz], name=unique_name(graph, f"{base}.int"))
        cast = ir.node(
            "Cast",
            [mm.outputs[0]],
            attributes={"to": _F32},
            name=unique_name(graph, f"{base}.cast"),
        )
        sc = ir.node("Mul", [xs, ws], name=unique_name(graph, f"{base}.scales"))
        mul = ir.node("Mul", [cast.outputs[0], sc.outputs[0]], name=unique_name(graph, f"{base}.y"))
        new = [mm, cast, sc, mul]
        if c is not None:
            new.append(ir.node("Add", [mul.outputs[0], c], name=unique_name(graph, f"{base}.b")))
        for n in new:
            for o in n.outputs:
                if o.name is None:
                    o.name = unique_name(graph, f"{n.name}.out")
        old = node.outputs[0]
        ir.convenience.replace_nodes_and_values(
            graph, node, [node], new, [old], [new[-1].outputs[0]]
        )

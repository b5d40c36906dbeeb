"""Cross-layer equalization (Nagel et al. 2019, "Data-Free Quantization"): rescale channels between
two layers so both have the same weight range, which quantizes better.

For a pair L1 -> f -> L2 where f is positively homogeneous (f(s·x) = s·f(x) for s > 0: nothing,
Relu, LeakyRelu) and channel c of L1's output is channel c of L2's input:

    r1_c = max |W1[c]|,  r2_c = max |W2[:, c]|,  s_c = sqrt(r1_c · r2_c) / r2_c
    W1[c] /= s_c,  b1[c] /= s_c,  W2[:, c] *= s_c

leaves the pair's function unchanged and gives both weights the range sqrt(r1_c · r2_c). A
depthwise L2 carries the channel on (its filter c is both input and output c), so chains
Conv -> DWConv -> Conv are equalized pair by pair, the sweep repeated ``iterations`` times.

ReLU6 / Clip(0, 6) is not homogeneous: with ``relu6-to-relu=true`` it is replaced by Relu on
equalized pairs, as the paper does for MobileNetV2 -- which changes the model (activations
above 6 are no longer clipped); otherwise such pairs are left alone (reason in the report).

Refused: shared weights, non-constant weights or biases, L1's output read by anything else,
grouped (non-depthwise) convolutions. BatchNormalization is folded into its layer first (exact,
as ``fold-batchnorm``), so Conv -> BN -> ReLU -> Conv is a pair.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import ClassVar

import numpy as np
import onnx_ir as ir

from onnxshrink import marks
from onnxshrink.irtools import const_array, set_const_input, weight_users_outside
from onnxshrink.passes import options
from onnxshrink.passes.base import ShrinkPass

__all__ = ["EqualizePass", "equalize_scales"]

logger = logging.getLogger(__name__)

_HOMOGENEOUS = {"Relu", "LeakyRelu"}


def equalize_scales(r1: np.ndarray, r2: np.ndarray) -> np.ndarray:
    """s with r1 / s == r2 · s (channels where either range is 0 keep s = 1)."""
    s = np.ones_like(r1, dtype=np.float64)
    ok = (r1 > 0) & (r2 > 0)
    s[ok] = np.sqrt(r1[ok] * r2[ok]) / r2[ok]
    return s


def _is_relu6(node: ir.Node) -> bool:
    if node.op_type != "Clip":
        return False
    lo = (
        const_array(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else None
    )
    hi = (
        const_array(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
    )
    return lo is not None and float(np.asarray(lo)) == 0.0 and hi is not None


def _depthwise(node: ir.Node, w: np.ndarray) -> bool:
    return node.attributes.get_int("group", 1) == w.shape[0] and w.shape[1] == 1


def _pair(first: ir.Node, relu6: bool):
    """(activation or None, second layer) when ``first``'s output reaches one Conv through at
    most one homogeneous activation; else a refusal string or None (not a pattern)."""
    out = first.outputs[0]
    if out.is_graph_output() or len(out.uses()) != 1:
        return None
    nxt = out.consumers()[0]
    act = None
    if nxt.op_type in _HOMOGENEOUS or (nxt.op_type == "Clip" and _is_relu6(nxt)):
        act = nxt
        a_out = act.outputs[0]
        if a_out.is_graph_output() or len(a_out.uses()) != 1:
            return None
        nxt = a_out.consumers()[0]
        if act.op_type == "Clip" and not relu6:
            return (
                "ReLU6 between the layers is not positively homogeneous "
                "(relu6-to-relu=true allows it)"
            )
    if nxt.op_type != "Conv" or nxt.inputs[0] is not (act.outputs[0] if act else out):
        return None
    return act, nxt


@dataclasses.dataclass
class EqualizePass(ShrinkPass):
    """Cross-layer equalization of Conv -> (ReLU) -> Conv pairs and depthwise chains."""

    name: ClassVar[str] = "equalize"
    lossy: ClassVar[bool] = True

    relu6_to_relu: bool = False
    iterations: int = 4
    floor: float | None = options.floor(0.99)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        folded_bn, _ = self.fold_batchnorm(model)  # Conv -> BN -> Relu -> Conv is a pair too
        pairs, reported = [], set()
        for first in graph:
            if first.op_type != "Conv":
                continue
            found = _pair(first, self.relu6_to_relu)
            if found is None:
                continue
            if isinstance(found, str):
                self.skip(first, found)
                continue
            act, second = found
            if reason := self._refusal(first, second):
                self.skip(first, reason)
                continue
            pairs.append((first, act, second))
        if not pairs:
            return ir.passes.PassResult(model, modified=folded_bn)
        for _ in range(self.iterations):
            for first, _act, second in pairs:
                self._equalize(graph, first, second)
        for first, act, second in pairs:
            if act is not None and act.op_type == "Clip":
                relu = ir.node("Relu", [act.inputs[0]], name=act.name)
                graph.insert_before(act, relu)
                act.outputs[0].replace_all_uses_with(relu.outputs[0])
                relu.outputs[0].name, act.outputs[0].name = act.outputs[0].name, None
                graph.remove(act, safe=True)
                reported.add(act.name)
            self.change(f"{first.name or 'Conv'} <-> {second.name or 'Conv'}")
        if reported:
            self.details["relu6_replaced"] = sorted(reported)
        return ir.passes.PassResult(model, modified=True)

    def _refusal(self, first: ir.Node, second: ir.Node) -> str | None:
        for node in (first, second):
            w = const_array(node.inputs[1])
            if w is None or w.ndim != 4:
                return f"{node.name}: weight is not a constant 2-D kernel"
            if weight_users_outside(node.inputs[1], node):
                return f"{node.name}: weight is shared"
            if (
                len(node.inputs) > 2
                and node.inputs[2] is not None
                and const_array(node.inputs[2]) is None
            ):
                return f"{node.name}: bias is not constant"
        w1, w2 = const_array(first.inputs[1]), const_array(second.inputs[1])
        if first.attributes.get_int("group", 1) != 1 and not _depthwise(first, w1):
            return f"{first.name}: grouped convolution"
        if second.attributes.get_int("group", 1) != 1 and not _depthwise(second, w2):
            return f"{second.name}: grouped convolution"
        return None

    def _equalize(self, graph: ir.Graph, first: ir.Node, second: ir.Node) -> None:
        w1 = const_array(first.inputs[1]).astype(np.float64)
        w2 = const_array(second.inputs[1]).astype(np.float64)
        r1 = np.abs(w1).reshape(w1.shape[0], -1).max(1)
        dw2 = _depthwise(second, w2)
        r2 = np.abs(w2).reshape(w2.shape[0], -1).max(1) if dw2 else np.abs(w2).max(axis=(0, 2, 3))
        s = equalize_scales(r1, r2)
        dtype = const_array(first.inputs[1]).dtype
        set_const_input(
            graph, first, 1, (w1 / s[:, None, None, None]).astype(dtype), "equalized.weight"
        )
        if len(first.inputs) > 2 and first.inputs[2] is not None:
            b1 = const_array(first.inputs[2]).astype(np.float64)
            set_const_input(graph, first, 2, (b1 / s).astype(dtype), "equalized.bias")
        marks.scale_channels(first, 1 / s)
        w2s = w2 * (s[:, None, None, None] if dw2 else s[None, :, None, None])
        set_const_input(graph, second, 1, w2s.astype(dtype), "equalized.weight")

"""Folds ``BatchNormalization`` into the Conv, ConvTranspose or Gemm that feeds it.

With s = gamma / sqrt(var + eps) per output channel c:

* Conv, W: [C_out, C_in/g, *k]:            W'[c] = W[c] * s[c],  b' = (b - mean) * s + beta
* ConvTranspose, W: [C_in, C_out/g, *k]:   output channel c = g_idx * (C_out/g) + j lives in
  W[g_idx * (C_in/g) : ..., j], so W' = W scaled along axis 1 group by group; b' as above.
* Gemm, Y = alpha * A @ B + beta * C (features on Y's axis 1):
  B' = B * s along the output-feature axis (columns, or rows when transB=1),
  C' = (beta * C - mean) * s + bn_beta and beta' = 1.

Exact up to float rounding (computed in float64, stored in the weight's dtype).

Refused, with the reason in the report: the BN is in training mode or has extra outputs; the
producer's output has other users or is a graph output (they would see the folded values); a
weight, bias or BN parameter is not constant; the weight is shared with another node (follows
``Identity`` chains, as older exports share tensors that way); shapes needed by the math are
unknown; the BN channel axis is not the producer's channel axis.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import ClassVar

import numpy as np
import onnx_ir as ir

from onnxshrink.irtools import const_array, unique_name, weight_users_outside
from onnxshrink.passes.base import ShrinkPass

__all__ = ["FoldBatchNormPass"]

logger = logging.getLogger(__name__)

_PRODUCERS = ("Conv", "ConvTranspose", "Gemm")


@dataclasses.dataclass
class _Match:
    producer: ir.Node
    bn: ir.Node
    weight: np.ndarray
    bias: np.ndarray | None  # Conv/ConvTranspose bias, or Gemm C
    scale: np.ndarray  # s = gamma / sqrt(var + eps)
    shift: np.ndarray  # beta - mean * s


def _bn_params(bn: ir.Node) -> tuple[np.ndarray, np.ndarray] | str:
    arrays = [const_array(v) for v in bn.inputs[1:5]]
    if any(a is None for a in arrays):
        return "BatchNormalization parameters are not constant"
    gamma, beta, mean, var = (a.astype(np.float64) for a in arrays)
    eps = bn.attributes.get_float("epsilon", 1e-5)
    s = gamma / np.sqrt(var + eps)
    return s, beta - mean * s


def _match(bn: ir.Node) -> _Match | str | None:
    """A fold candidate, a refusal reason, or None when the pattern does not apply."""
    if bn.op_type != "BatchNormalization" or bn.domain not in ("", "ai.onnx"):
        return None
    x = bn.inputs[0]
    producer = x.producer() if x is not None else None
    if (
        producer is None
        or producer.op_type not in _PRODUCERS
        or producer.domain not in ("", "ai.onnx")
    ):
        return None
    if (
        bn.attributes.get_int("training_mode", 0)
        or len([o for o in bn.outputs if o.uses() or o.is_graph_output()]) > 1
    ):
        return "BatchNormalization is in training mode"
    if x.is_graph_output():
        return f"{producer.op_type} output is a graph output"
    if len(x.uses()) != 1:
        return f"{producer.op_type} output is also read by other nodes"
    if len(producer.inputs) < 2 or producer.inputs[1] is None:
        return f"{producer.op_type} has no weight input"
    w_value = producer.inputs[1]
    weight = const_array(w_value)
    if weight is None:
        return f"{producer.op_type} weight is not constant"
    if others := weight_users_outside(w_value, producer):
        return f"weight is shared with node '{others[0].name or others[0].op_type}'"
    bias = None
    if len(producer.inputs) > 2 and producer.inputs[2] is not None:
        bias = const_array(producer.inputs[2])
        if bias is None:
            return f"{producer.op_type} bias is not constant"
        if weight_users_outside(producer.inputs[2], producer):
            return "bias is shared with another node"
    params = _bn_params(bn)
    if isinstance(params, str):
        return params
    scale, shift = params
    return _Match(producer, bn, weight, bias, scale, shift)


def _fold_conv(m: _Match) -> tuple[np.ndarray, np.ndarray] | str:
    c_out = m.weight.shape[0]
    if m.scale.shape != (c_out,):
        return f"BatchNormalization has {m.scale.shape[0]} channels, Conv has {c_out}"
    w = m.weight.astype(np.float64) * m.scale.reshape(-1, *([1] * (m.weight.ndim - 1)))
    b = np.zeros(c_out) if m.bias is None else m.bias.astype(np.float64)
    return w, b * m.scale + m.shift


def _fold_conv_transpose(m: _Match) -> tuple[np.ndarray, np.ndarray] | str:
    group = m.producer.attributes.get_int("group", 1)
    c_in, c_out_g = m.weight.shape[:2]
    c_out = c_out_g * group
    if m.scale.shape != (c_out,) or c_in % group:
        return f"BatchNormalization has {m.scale.shape[0]} channels, ConvTranspose has {c_out}"
    k = m.weight.shape[2:]
    w = m.weight.astype(np.float64).reshape(group, c_in // group, c_out_g, *k)
    w = w * m.scale.reshape(group, 1, c_out_g, *([1] * len(k)))
    b = np.zeros(c_out) if m.bias is None else m.bias.astype(np.float64)
    return w.reshape(m.weight.shape), b * m.scale + m.shift


def _fold_gemm(m: _Match) -> tuple[np.ndarray, np.ndarray] | str:
    attrs = m.producer.attributes
    trans_b = attrs.get_int("transB", 0)
    beta = attrs.get_float("beta", 1.0)
    n = m.weight.shape[0] if trans_b else m.weight.shape[1]
    if m.weight.ndim != 2 or m.scale.shape != (n,):
        return f"BatchNormalization has {m.scale.shape[0]} channels, Gemm has {n} outputs"
    w = m.weight.astype(np.float64)
    w = w * (m.scale[:, None] if trans_b else m.scale[None, :])
    c = np.zeros(n) if m.bias is None else beta * m.bias.astype(np.float64)
    return w, c * m.scale + m.shift  # broadcasts over C's shape ([N], [1, N], [M, N] or scalar)


_FOLD = {"Conv": _fold_conv, "ConvTranspose": _fold_conv_transpose, "Gemm": _fold_gemm}


def _rewrite(graph: ir.Graph, m: _Match, w: np.ndarray, b: np.ndarray) -> None:
    dtype = m.weight.dtype
    base = m.producer.name or m.producer.outputs[0].name or m.producer.op_type
    w_val = ir.val(
        unique_name(graph, f"{base}.bn_folded.weight"), const_value=ir.tensor(w.astype(dtype))
    )
    b_val = ir.val(
        unique_name(graph, f"{base}.bn_folded.bias"), const_value=ir.tensor(b.astype(dtype))
    )
    graph.register_initializer(w_val)
    graph.register_initializer(b_val)
    attrs = dict(m.producer.attributes)
    if m.producer.op_type == "Gemm":
        attrs["beta"] = ir.AttrFloat32("beta", 1.0)
    folded = ir.node(
        m.producer.op_type,
        [m.producer.inputs[0], w_val, b_val],
        attributes=attrs,
        name=m.producer.name,
        domain=m.producer.domain,
    )
    y = m.bn.outputs[0]
    ir.convenience.replace_nodes_and_values(
        graph, m.bn, [m.producer, m.bn], [folded], [y], [folded.outputs[0]]
    )


@dataclasses.dataclass
class FoldBatchNormPass(ShrinkPass):
    """Folds BatchNormalization into the preceding Conv, ConvTranspose or Gemm."""

    name: ClassVar[str] = "fold-batchnorm"
    lossy: ClassVar[bool] = False

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        modified = False
        for bn in list(graph):
            match = _match(bn)
            if match is None:
                continue
            if isinstance(match, str):
                self.skip(bn, match)
                continue
            folded = _FOLD[match.producer.op_type](match)
            if isinstance(folded, str):
                self.skip(bn, folded)
                continue
            _rewrite(graph, match, *folded)
            self.change(
                f"{match.producer.name or match.producer.op_type} <- "
                f"{bn.name or 'BatchNormalization'}"
            )
            modified = True
        for bn in graph:
            if bn.op_type == "BatchNormalization" and _match(bn) is None:
                producer = bn.inputs[0].producer() if bn.inputs[0] is not None else None
                what = producer.op_type if producer else "a graph input"
                self.skip(bn, f"input comes from {what}, not from Conv, ConvTranspose or Gemm")
        return ir.passes.PassResult(model, modified=modified)

"""Params, MACs and bytes: per node and in total.

MACs are multiply-accumulates for one run of the model with dynamic batch dimensions set to 1
(or with the shapes the data gives). Counted ops (the float and the quantized forms):

* Conv / ConvInteger / QLinearConv: ``prod(Y.shape) * (C_in / group) * prod(kernel)``
  -- every output element is a dot product over one group's input channels and the kernel;
  stride, pads and dilation enter through the output shape.
* ConvTranspose: ``N * C_in * prod(X spatial) * (C_out / group) * prod(kernel)``
  -- every input element is scattered to one group's outputs through the kernel.
* Gemm / MatMul / MatMulInteger / QLinearMatMul: ``prod(Y.shape) * K`` with K the reduced axis;
  batched and broadcast MatMul included.
* LSTM / GRU / RNN: ``T * N * directions * G·H * (I + H)``, G = 4 / 3 / 1 gates.
* If: its costlier branch; Loop / Scan: one run of the body (per iteration).

Other ops (element-wise, pooling, normalisation) are not counted as MACs, as is customary.
Params are the elements of all initializers except INT64 ones (shapes, axes, indices); a node's
params are those of the constants it reads, directly or through Identity / Cast /
DequantizeLinear / Gather (decoded weights). Model-local functions are inlined before counting.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping

import onnx_ir as ir
from onnx_ir.passes.common import InlinePass, ShapeInferencePass

from onnxshrink.timing import timed

__all__ = [
    "LayerStats",
    "ModelStats",
    "model_stats",
    "node_macs",
    "macs_by_node",
    "count_params",
    "serialized_bytes",
    "constant_blowups",
]

logger = logging.getLogger(__name__)

_WEIGHT_CARRIERS = {"Identity", "Cast", "DequantizeLinear", "Gather", "Reshape", "Transpose"}


@dataclasses.dataclass
class LayerStats:
    name: str
    op_type: str
    output_shape: list[int | str] | None
    params: int
    macs: int | None


@dataclasses.dataclass
class ModelStats:
    params: int
    macs: int
    bytes: int | None
    layers: list[LayerStats]
    macs_unknown: list[str]  # nodes whose MACs could not be counted (dynamic shapes)

    def to_dict(self) -> dict:
        return {"params": self.params, "macs": self.macs, "bytes": self.bytes}


def _static(shape: ir.Shape | None) -> list[int] | None:
    if shape is None or not all(isinstance(d, int) for d in shape):
        return None
    return [int(d) for d in shape]


def _shape_of(value: ir.Value | None) -> list[int] | None:
    if value is None:
        return None
    if value.const_value is not None:
        return list(value.const_value.shape)
    return _static(value.shape)


def _conv(node: ir.Node, w_index: int = 1) -> int | None:
    w, y = _shape_of(node.inputs[w_index]), _static(node.outputs[0].shape)
    if w is None or y is None:
        return None
    return math.prod(y) * math.prod(w[1:])


def _conv_transpose(node: ir.Node) -> int | None:
    x, w = _shape_of(node.inputs[0]), _shape_of(node.inputs[1])
    if x is None or w is None:
        return None
    return math.prod(x) * math.prod(w[1:])  # w: [C_in, C_out / group, *kernel]


def _matmul(node: ir.Node, a_index: int = 0) -> int | None:
    a, y = _shape_of(node.inputs[a_index]), _static(node.outputs[0].shape)
    if a is None or y is None or not a:
        return None
    return math.prod(y) * a[-1]


def _gemm(node: ir.Node) -> int | None:
    a, y = _shape_of(node.inputs[0]), _static(node.outputs[0].shape)
    if a is None or y is None or len(a) != 2:
        return None
    k = a[0] if node.attributes.get_int("transA", 0) else a[1]
    return math.prod(y) * k


def _recurrent(node: ir.Node) -> int | None:
    x, w, r = (_shape_of(node.inputs[i]) for i in range(3))
    if x is None or w is None or r is None or len(x) != 3:
        return None
    steps, batch = (x[1], x[0]) if node.attributes.get_int("layout", 0) else (x[0], x[1])
    return steps * batch * w[0] * w[1] * (w[2] + r[2])  # w: [dirs, G*H, I], r: [dirs, G*H, H]


def _control(node: ir.Node) -> int | None:
    """If: the costlier branch; Loop / Scan: the body once (None if any count is unknown)."""
    per_graph = []
    for attr in node.attributes.values():
        if attr.type == ir.AttributeType.GRAPH:
            graphs = [attr.as_graph()]
        elif attr.type == ir.AttributeType.GRAPHS:
            graphs = list(attr.as_graphs())
        else:
            continue
        for g in graphs:
            counts = [node_macs(n) for n in g]
            per_graph.append(None if None in counts else sum(counts))
    if None in per_graph:
        return None
    return max(per_graph, default=0)


_MACS = {
    "Conv": _conv,
    "ConvInteger": _conv,
    "QLinearConv": lambda n: _conv(n, w_index=3),
    "ConvTranspose": _conv_transpose,
    "Gemm": _gemm,
    "MatMul": _matmul,
    "MatMulInteger": _matmul,
    "QLinearMatMul": _matmul,
    "LSTM": _recurrent,
    "GRU": _recurrent,
    "RNN": _recurrent,
    "If": _control,
    "Loop": _control,
    "Scan": _control,
}


def node_macs(node: ir.Node) -> int | None:
    """MACs of one node (0 for ops that are not counted, None when shapes are unknown)."""
    fn = _MACS.get(node.op_type) if node.domain in ("", "ai.onnx") else None
    return fn(node) if fn else 0


def _constants_read(node: ir.Node) -> list[ir.Value]:
    """Initializers a node reads, directly or through weight-carrying ops."""
    found: list[ir.Value] = []
    stack = [v for v in node.inputs if v is not None]
    seen: set[int] = set()
    while stack:
        v = stack.pop()
        if id(v) in seen:
            continue
        seen.add(id(v))
        if v.const_value is not None and v.is_initializer():
            found.append(v)
            continue
        producer = v.producer()
        if producer is not None and producer.op_type in _WEIGHT_CARRIERS:
            stack.extend(i for i in producer.inputs if i is not None)
    return found


def _numel(value: ir.Value) -> int:
    t = value.const_value
    if t is None or t.dtype == ir.DataType.INT64:
        return 0
    return math.prod(t.shape)


def count_params(model: ir.Model) -> int:
    """Elements of all non-INT64 initializers, each counted once."""
    return sum(_numel(v) for g in model.graphs() for v in g.initializers.values())


def serialized_bytes(model: ir.Model) -> int:
    """Bytes on disk of the model as onnxshrink would save it (model file + external data).

    External tensors are counted by their length without being read; the rest is the size of
    the serialized protobuf. Above 256 MB of tensors in memory, their bytes alone: the graph
    is a rounding error next to them, and serializing to count would copy them all.
    """
    from onnxshrink import io

    external = sum(
        v.const_value.nbytes
        for g in model.graphs()
        for v in g.initializers.values()
        if isinstance(v.const_value, ir.ExternalTensor)
    )
    in_memory = io.tensor_bytes(model) - external
    if in_memory > 1 << 28:
        return in_memory + external
    return ir.to_proto(model).ByteSize() + external


def _with_shapes(
    model: ir.Model, input_shapes: Mapping[str, tuple[int, ...]] | None, inline: bool = True
) -> ir.Model:
    clone = model.clone()
    if clone.functions and inline:
        InlinePass()(clone)
    for value in clone.graph.inputs:
        if value.shape is None:
            continue
        if input_shapes and value.name in input_shapes:
            value.shape = ir.Shape(input_shapes[value.name])
        elif len(value.shape) and not isinstance(value.shape[0], int):
            value.shape = ir.Shape([1, *value.shape[1:]])
    for node in clone.graph:  # let inference recompute what depends on the new input shapes
        for out in node.outputs:
            if not out.is_graph_output():
                out.shape = None
    # data propagation computes constant subgraphs' values: a Tile of a constant 10^5 times
    # took onnx 16 s and 7 GB; without it such a model only loses shapes that depend on values
    ShapeInferencePass(check_type=False, strict_mode=False, data_prop=not constant_blowups(clone))(
        clone
    )
    return clone


_BLOWUP_OPS = {"Tile", "Expand", "ConstantOfShape", "Range", "Resize", "Pad"}


def constant_blowups(model: ir.Model, limit: int = 1 << 22) -> list[tuple[str, int]]:
    """(node, elements) for every Tile / Expand / ConstantOfShape / Range / Resize / Pad whose
    inputs are all constant and whose output would hold more than ``limit`` elements: what
    constant folding or data propagation would materialise (a 4 KB model can hold 10^8)."""
    from onnxshrink.irtools import const_array

    found = []
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.op_type not in _BLOWUP_OPS:
            continue
        arrays = [None if v is None else const_array(v) for v in node.inputs]
        if any(a is None for v, a in zip(node.inputs, arrays) if v is not None) or not arrays:
            continue
        try:
            n = _constant_output_size(node.op_type, [a for a in arrays])
        except (ValueError, TypeError, IndexError, OverflowError):
            continue
        if n is not None and n > limit:
            found.append((node.name or node.op_type, n))
    return found


def _constant_output_size(op: str, arrays: list) -> int | None:
    import numpy as np

    first = arrays[0]
    if op == "Tile":
        return int(first.size) * int(np.prod(arrays[1].astype(np.float64)))
    if op == "Expand":
        shape = np.broadcast_shapes(first.shape, tuple(int(d) for d in arrays[1]))
        return int(np.prod(shape, dtype=np.float64))
    if op == "ConstantOfShape":
        return int(np.prod(first.astype(np.float64)))
    if op == "Range":
        start, stop, step = (float(a) for a in arrays[:3])
        return int(max(0.0, math.ceil((stop - start) / step))) if step else None
    return None


def macs_by_node(
    model: ir.Model, input_shapes: Mapping[str, tuple[int, ...]] | None = None
) -> dict[int, int]:
    """MACs of each node of ``model`` keyed by ``id(node)`` (nodes with unknown MACs omitted).

    Relies on cloning preserving node order (model-local functions must not be present).
    """
    shaped = _with_shapes(model, input_shapes, inline=False)
    out = {}
    for orig, node in zip(model.graph, shaped.graph):
        macs = node_macs(node)
        if macs is not None:
            out[id(orig)] = macs
    return out


@timed("MACs and params")
def model_stats(
    model: ir.Model,
    *,
    input_shapes: Mapping[str, tuple[int, ...]] | None = None,
    with_bytes: bool = True,
) -> ModelStats:
    """Counts params and MACs per node and in total (bytes by serializing, if asked)."""
    shaped = _with_shapes(model, input_shapes)
    layers, unknown, total = [], [], 0
    for node in shaped.graph:
        macs = node_macs(node)
        params = sum(_numel(v) for v in _constants_read(node))
        if node.op_type in _WEIGHT_CARRIERS:
            params = 0  # counted at the node that uses the weight
        if macs is None:
            unknown.append(node.name or node.op_type)
        else:
            total += macs
        shape = node.outputs[0].shape if node.outputs else None
        layers.append(
            LayerStats(
                name=node.name or "",
                op_type=node.op_type,
                output_shape=None
                if shape is None
                else [d if isinstance(d, int) else str(d) for d in shape],
                params=params,
                macs=macs,
            )
        )
    return ModelStats(
        params=count_params(model),
        macs=total,
        bytes=serialized_bytes(model) if with_bytes else None,
        layers=layers,
        macs_unknown=unknown,
    )

"""How to cut one op: given the channels removed from its input and output tensors, rewrite it.

Each op's cut is the ``cut`` of its record in :data:`onnxshrink.analysis.ops.OPS`; ops without
one need no change (element-wise activations, pooling, Concat, Flatten: their shapes follow from
their inputs). Weights are never edited in place:
each cut writes a new initializer named after the node (``<node>.pruned.<what>``) and rewires
only that node, so a tensor shared through Identity chains stays intact for its other users.
After cutting, intermediate shape annotations are stale; :func:`cut_model` clears them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from onnxshrink.analysis.channels import ChannelInfo
from onnxshrink.irtools import const_array, set_const_input

__all__ = ["cut_model"]

logger = logging.getLogger(__name__)

Cut = Callable[["_Ctx", ir.Node], None]


class _Ctx:
    def __init__(
        self,
        graph: ir.Graph,
        removed: dict[ir.Value, np.ndarray],
        info: dict[ir.Value, ChannelInfo],
    ):
        self.graph, self.removed, self.info = graph, removed, info

    def rem(self, value: ir.Value | None) -> np.ndarray:
        if value is None:
            return np.zeros(0, np.int64)
        return self.removed.get(value, np.zeros(0, np.int64))

    def slice(
        self, node: ir.Node, index: int, cuts: list[tuple[int, np.ndarray]], what: str
    ) -> None:
        if index >= len(node.inputs) or node.inputs[index] is None:
            return
        cuts = [(axis, r) for axis, r in cuts if len(r)]
        if not cuts:
            return
        arr = const_array(node.inputs[index])
        for axis, r in cuts:
            arr = np.delete(arr, r, axis=axis)
        set_const_input(self.graph, node, index, np.ascontiguousarray(arr), what)


def conv(c: _Ctx, node: ir.Node) -> None:
    rin, rout = c.rem(node.inputs[0]), c.rem(node.outputs[0])
    group = node.attributes.get_int("group", 1)
    if group == 1:
        c.slice(node, 1, [(0, rout), (1, rin)], "pruned.weight")
    else:  # depthwise: the channel set of input and output is the same
        c.slice(node, 1, [(0, rout)], "pruned.weight")
        node.attributes["group"] = ir.AttrInt64("group", group - len(rout))
    c.slice(node, 2, [(0, rout)], "pruned.bias")


def conv_transpose(c: _Ctx, node: ir.Node) -> None:
    rin, rout = c.rem(node.inputs[0]), c.rem(node.outputs[0])
    c.slice(node, 1, [(0, rin), (1, rout)], "pruned.weight")
    c.slice(node, 2, [(0, rout)], "pruned.bias")


def gemm(c: _Ctx, node: ir.Node) -> None:
    rin, rout = c.rem(node.inputs[0]), c.rem(node.outputs[0])
    in_axis, out_axis = (1, 0) if node.attributes.get_int("transB", 0) else (0, 1)
    c.slice(node, 1, [(in_axis, rin), (out_axis, rout)], "pruned.weight")
    if len(node.inputs) > 2 and node.inputs[2] is not None and len(rout):
        bias = const_array(node.inputs[2])
        if bias.ndim and bias.shape[-1] > 1:
            c.slice(node, 2, [(bias.ndim - 1, rout)], "pruned.bias")


def matmul(c: _Ctx, node: ir.Node) -> None:
    c.slice(node, 1, [(0, c.rem(node.inputs[0])), (1, c.rem(node.outputs[0]))], "pruned.weight")


def norm(c: _Ctx, node: ir.Node) -> None:
    r = c.rem(node.outputs[0])
    for i, what in enumerate(("scale", "bias", "mean", "var"), start=1):
        c.slice(node, i, [(0, r)], f"pruned.{what}")


def broadcast_consts(c: _Ctx, node: ir.Node) -> None:
    """Per-channel constant operands of element-wise ops (and PRelu's slope) are sliced."""
    out = node.outputs[0]
    info, r = c.info.get(out), c.rem(out)
    if info is None or not len(r):
        return
    for i, v in enumerate(node.inputs):
        if v is None or v in c.info:
            continue
        arr = const_array(v)
        if arr is None:
            continue
        axis = info.axis - (info.rank - arr.ndim)
        if axis >= 0 and arr.shape[axis] == info.size:
            c.slice(node, i, [(axis, r)], f"pruned.input{i}")


def split(c: _Ctx, node: ir.Node) -> None:
    if not any(len(c.rem(o)) for o in node.outputs):
        return
    sizes = []
    for o in node.outputs:
        info = c.info[o]
        sizes.append(info.size - len(c.rem(o)))
    node.attributes.pop("num_outputs", None)
    if "split" in node.attributes:  # opset < 13
        node.attributes["split"] = ir.AttrInt64s("split", sizes)
    else:
        set_const_input(c.graph, node, 1, np.asarray(sizes, np.int64), "pruned.split")


def resize(c: _Ctx, node: ir.Node) -> None:
    r = c.rem(node.outputs[0])
    if len(r) and len(node.inputs) > 3 and node.inputs[3] is not None:
        info = c.info[node.outputs[0]]
        sizes = const_array(node.inputs[3]).copy()
        sizes[info.axis] -= len(r)
        set_const_input(c.graph, node, 3, sizes, "pruned.sizes")


def cut_model(
    model: ir.Model, removed: dict[ir.Value, np.ndarray], info: dict[ir.Value, ChannelInfo]
) -> int:
    """Applies the removal to every affected node; returns how many nodes were rewritten."""
    from onnxshrink.analysis.ops import OPS

    graph = model.graph
    ctx = _Ctx(graph, removed, info)
    touched = 0
    for node in list(graph):
        if not any(v is not None and v in removed for v in (*node.inputs, *node.outputs)):
            continue
        rule = OPS.get(node.op_type)
        if rule is not None and rule.cut is not None:
            rule.cut(ctx, node)
            touched += 1
    for node in graph:  # shapes downstream of a cut are stale: let inference redo them
        for out in node.outputs:
            if not out.is_graph_output():
                out.shape = None
    return touched

"""How weight ops move channel groups: a producer starts one, a consumer reads one.

A Conv (group = 1), ConvTranspose, Gemm or MatMul with a constant weight starts a group of its
output channels (its weight rows are the members) and consumes its input's groups (weight
columns); a depthwise Conv passes its input's channels on, with its filters and bias as
members. BatchNormalization, InstanceNormalization and PRelu pass channels on with per-channel
parameters sliced along. A non-constant or shared weight, a grouped (non-depthwise) Conv or an
unknown weight shape freezes what it touches, with the reason.
"""

from __future__ import annotations

import onnx_ir as ir

from onnxshrink.analysis.channels import (
    ChannelGraph,
    ChannelInfo,
    Segment,
    dims,
    freeze_inputs,
    input_info,
    name_of,
    per_channel_const,
    static_shape,
    unknown,
)
from onnxshrink.irtools import const_array, weight_users_outside

__all__ = ["batchnorm", "conv", "conv_transpose", "gemm", "matmul", "prelu"]


def _weight_ok(cg: ChannelGraph, node: ir.Node, index: int) -> str | None:
    w = node.inputs[index] if index < len(node.inputs) else None
    if w is None:
        return "no weight"
    if const_array(w) is None:
        return f"{node.op_type} '{name_of(node)}' weight is not constant"
    if others := weight_users_outside(w, node):
        return f"{node.op_type} '{name_of(node)}' weight is shared with '{name_of(others[0])}'"
    if len(node.inputs) > index + 1 and node.inputs[index + 1] is not None:
        b = node.inputs[index + 1]
        if const_array(b) is None:
            return f"{node.op_type} '{name_of(node)}' bias is not constant"
        if weight_users_outside(b, node):
            return f"{node.op_type} '{name_of(node)}' bias is shared with another node"
    return None


def _consume(
    cg: ChannelGraph, node: ir.Node, info: ChannelInfo | None, weight_axis: int, problem: str | None
) -> None:
    """``node`` reads ``info``'s channels through axis ``weight_axis`` of its weight."""
    if info is None:
        return
    if problem:
        cg.freeze(info, problem)
        return
    for seg in info.segments:
        g = cg.group(seg.group)
        if node not in g.consumers:
            g.consumers.append(node)
    cg.add_member("in", node, node.inputs[1], weight_axis, info)
    cg.add_member("act", node, node.inputs[0], info.axis, info)


def _produce(
    cg: ChannelGraph,
    node: ir.Node,
    size: int,
    weight_axis: int,
    axis: int,
    rank: int,
    problem: str | None,
) -> None:
    gid = cg.new_group(size, node)
    info = ChannelInfo(axis, rank, size, [Segment(gid, 0, size, 0)])
    out = node.outputs[0]
    cg.info[out] = info
    if problem:
        cg.freeze(info, problem)
    else:
        cg.add_member("out", node, node.inputs[1], weight_axis, info)


def conv(cg: ChannelGraph, node: ir.Node) -> None:
    w = static_shape(node.inputs[1])
    x = input_info(cg, node)
    y = node.outputs[0]
    if w is None:
        freeze_inputs(cg, node, f"Conv '{name_of(node)}' weight shape is unknown")
        return
    group = node.attributes.get_int("group", 1)
    c_out = w[0]
    rank = len(w)
    problem = _weight_ok(cg, node, 1)
    if group == 1:
        _consume(cg, node, x, 1, problem)
        _produce(cg, node, c_out, 0, 1, rank, problem)
        return
    c_in = w[1] * group
    if group == c_in == c_out and x is not None:
        # depthwise: channel c in -> channel c out; its own filter and bias go with it
        if problem:
            cg.freeze(x, problem)
        cg.info[y] = ChannelInfo(1, rank, c_out, list(x.segments))
        cg.add_member("out", node, node.inputs[1], 0, x)
        return
    cg.freeze(x, f"grouped Conv '{name_of(node)}' (group={group}) couples channels in blocks")
    gid = cg.new_group(c_out, node)
    info = ChannelInfo(1, rank, c_out, [Segment(gid, 0, c_out, 0)])
    cg.info[y] = info
    cg.freeze(info, f"output of grouped Conv '{name_of(node)}' (group={group})")


def conv_transpose(cg: ChannelGraph, node: ir.Node) -> None:
    w = static_shape(node.inputs[1])
    x = input_info(cg, node)
    if w is None:
        freeze_inputs(cg, node, f"ConvTranspose '{name_of(node)}' weight shape is unknown")
        return
    group = node.attributes.get_int("group", 1)
    problem = _weight_ok(cg, node, 1)
    if group != 1:
        cg.freeze(x, f"grouped ConvTranspose '{name_of(node)}'")
        problem = problem or f"grouped ConvTranspose '{name_of(node)}'"
        x = None
    _consume(cg, node, x, 0, problem)
    _produce(cg, node, w[1] * group, 1, 1, len(w), problem)


def gemm(cg: ChannelGraph, node: ir.Node) -> None:
    b = static_shape(node.inputs[1])
    x = input_info(cg, node)
    if b is None or len(b) != 2:
        freeze_inputs(cg, node, f"Gemm '{name_of(node)}' weight shape is unknown")
        return
    trans_a, trans_b = node.attributes.get_int("transA", 0), node.attributes.get_int("transB", 0)
    problem = _weight_ok(cg, node, 1)
    if trans_a:
        cg.freeze(x, f"Gemm '{name_of(node)}' has transA=1")
        x = None
    if x is not None and x.axis != 1:
        cg.freeze(x, f"Gemm '{name_of(node)}' reads channels on axis {x.axis}")
        x = None
    in_axis, out_axis = (1, 0) if trans_b else (0, 1)
    _consume(cg, node, x, in_axis, problem)
    _produce(cg, node, b[out_axis], out_axis, 1, 2, problem)


def matmul(cg: ChannelGraph, node: ir.Node) -> None:
    b = static_shape(node.inputs[1]) if const_array(node.inputs[1]) is not None else None
    x = input_info(cg, node)
    a_shape = dims(node.inputs[0])
    a_rank = len(a_shape) if a_shape is not None else x.rank if x is not None else None
    if b is None or len(b) != 2 or a_rank != 2:
        unknown(cg, node)
        return
    problem = _weight_ok(cg, node, 1)
    if x is not None and x.axis != 1:
        cg.freeze(x, f"MatMul '{name_of(node)}' reads channels on axis {x.axis}")
        x = None
    _consume(cg, node, x, 0, problem)
    _produce(cg, node, b[1], 1, 1, 2, problem)


def batchnorm(cg: ChannelGraph, node: ir.Node) -> None:
    x = input_info(cg, node)
    if x is None:
        return
    if x.axis != 1:
        cg.freeze(
            x, f"{node.op_type} '{name_of(node)}' normalises axis 1, channels are on axis {x.axis}"
        )
        return
    params = [const_array(v) for v in node.inputs[1:5] if v is not None]
    if any(p is None for p in params) or any(
        weight_users_outside(v, node) for v in node.inputs[1:5] if v is not None
    ):
        cg.freeze(x, f"{node.op_type} '{name_of(node)}' parameters are not constant or are shared")
        return
    if node.op_type == "BatchNormalization" and len([o for o in node.outputs if o.uses()]) > 1:
        cg.freeze(x, f"BatchNormalization '{name_of(node)}' is in training mode")
        return
    cg.info[node.outputs[0]] = x
    cg.add_member("bn", node, node.inputs[1], 0, x)


def prelu(cg: ChannelGraph, node: ir.Node) -> None:
    x = input_info(cg, node)
    if x is None:
        return
    slope = const_array(node.inputs[1])
    if slope is None:
        cg.freeze(x, f"PRelu '{name_of(node)}' slope is not constant")
        return
    kind, _ = per_channel_const(list(slope.shape), x)
    if kind == "bad" or weight_users_outside(node.inputs[1], node):
        cg.freeze(x, f"PRelu '{name_of(node)}' slope cannot be sliced")
        return
    cg.info[node.outputs[0]] = x

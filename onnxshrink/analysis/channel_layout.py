"""How layout ops move channel groups: pass through, couple, concatenate, split, flatten.

Element-wise and pooling ops pass channels on unchanged; two tracked tensors meeting in an
element-wise op couple (merge) their groups when their segments are whole and aligned, and a
per-channel constant operand is sliced along; Concat offsets each input's segments, Split cuts
them at its boundaries; Flatten/Reshape to [N, C·H·W] repeats each channel H·W times; spatial
Pad and Resize keep them (ops that move or window the channel axis: channel_axes). Anything else
freezes what it touches.
"""

from __future__ import annotations

import dataclasses
import math

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
)
from onnxshrink.irtools import const_array, weight_users_outside

__all__ = [
    "UNARY",
    "concat",
    "const_ints",
    "elementwise",
    "flatten",
    "flattened",
    "pad",
    "passthrough",
    "resize",
    "split",
    "window",
]


def passthrough(cg: ChannelGraph, node: ir.Node) -> None:
    """y[c] depends only on x[c]: the output carries the input's channels."""
    x = input_info(cg, node)
    if x is not None:
        for out in node.outputs[:1]:
            cg.info[out] = x


def _by_offset(info: ChannelInfo) -> list[Segment]:
    return sorted(info.segments, key=lambda s: s.offset)


def _whole_groups(cg: ChannelGraph, infos: list[ChannelInfo]) -> bool:
    """Do the tensors line up run by run, each run a whole group of the same size?"""
    ref = infos[0]
    for b in infos[1:]:
        if b.size != ref.size or b.rank - b.axis != ref.rank - ref.axis:
            return False
        pairs = list(zip(_by_offset(ref), _by_offset(b)))
        if len(ref.segments) != len(b.segments) or any(
            (s.length, s.offset, s.repeat) != (t.length, t.offset, t.repeat)
            or s.start != 0
            or t.start != 0
            or cg.group(s.group).size != s.length
            or cg.group(t.group).size != t.length
            for s, t in pairs
        ):
            return False
    return True


def _in_pieces(cg: ChannelGraph, infos: list[ChannelInfo]) -> bool:
    """Splits groups until the tensors' channels line up as whole groups, run by run (a CSP
    block adds half of a Split to a conv's output: that half becomes a group of its own).
    False, changing nothing, when the layouts differ or a channel is flattened."""
    ref = infos[0]
    if any(
        i.size != ref.size or i.rank - i.axis != ref.rank - ref.axis or not i.segments
        for i in infos
    ) or any(s.repeat != 1 for i in infos for s in i.segments):
        return False
    runs = [sorted((s.offset, s.offset + s.length) for s in i.segments) for i in infos]
    covered = [sum(b - a for a, b in r) for r in runs]
    if any(c != ref.size for c in covered):
        return False  # an untracked run would be coupled with a tracked one
    cuts = {p for r in runs for run in r for p in run}
    while True:
        needed = [
            (s.group, k)
            for i in infos
            for s in i.segments
            for k in {s.start, s.start + s.length}
            | {s.start + c - s.offset for c in cuts if s.offset < c < s.offset + s.length}
            if 0 < k < cg.group(s.group).size
        ]
        if not needed:
            return True
        cg.split(*needed[0])


def elementwise(cg: ChannelGraph, node: ir.Node) -> None:
    """Add / Sub / Mul / Div / Max / Min / Sum / Mean / Where-free binary and n-ary ops."""
    tracked = [(i, cg.info[v]) for i, v in enumerate(node.inputs) if v is not None and v in cg.info]
    if not tracked:
        return
    out_rank = max(tracked, key=lambda t: t[1].rank)[1].rank
    ref = tracked[0][1]
    for i, v in enumerate(node.inputs):
        if v is None or v in cg.info:
            continue
        arr = const_array(v)
        if arr is None:
            freeze_inputs(
                cg,
                node,
                f"{node.op_type} '{name_of(node)}' mixes pruned channels with an untracked tensor",
            )
            return
        kind, _ = per_channel_const(
            list(arr.shape), ChannelInfo(ref.axis + out_rank - ref.rank, out_rank, ref.size, [])
        )
        if kind == "bad" or (kind == "channel" and weight_users_outside(v, node)):
            freeze_inputs(
                cg, node, f"{node.op_type} '{name_of(node)}' constant operand cannot be sliced"
            )
            return
    infos = [info for _, info in tracked]
    if not _whole_groups(cg, infos) and not (_in_pieces(cg, infos) and _whole_groups(cg, infos)):
        freeze_inputs(
            cg,
            node,
            f"{node.op_type} '{name_of(node)}' joins tensors whose channels do not line up",
        )
        return
    for info in infos[1:]:
        for s, t in zip(_by_offset(ref), _by_offset(info)):
            cg.merge(s.group, t.group)
    cg.info[node.outputs[0]] = ChannelInfo(
        ref.axis + out_rank - ref.rank, out_rank, ref.size, list(ref.segments)
    )


def concat(cg: ChannelGraph, node: ir.Node) -> None:
    infos = [cg.info.get(v) if v is not None else None for v in node.inputs]
    if not any(infos):
        return
    first = next(i for i in infos if i is not None)
    axis = node.attributes.get_int("axis", 0)
    axis = axis + first.rank if axis < 0 else axis
    if axis != first.axis:
        freeze_inputs(cg, node, f"Concat '{name_of(node)}' on axis {axis}, not the channel axis")
        return
    segments, offset = [], 0
    for v, info in zip(node.inputs, infos):
        if info is None:
            shape = dims(v)
            if shape is None or shape[axis] is None:
                freeze_inputs(
                    cg,
                    node,
                    f"Concat '{name_of(node)}' input '{v.name}' has an unknown channel count",
                )
                return
            offset += shape[axis]
            continue
        segments += [dataclasses.replace(s, offset=s.offset + offset) for s in info.segments]
        offset += info.size
    cg.info[node.outputs[0]] = ChannelInfo(axis, first.rank, offset, segments)


def split(cg: ChannelGraph, node: ir.Node) -> None:
    """Output k takes input channels [start_k, start_k + size_k): segments are cut there."""
    x = input_info(cg, node)
    if x is None:
        return
    axis = node.attributes.get_int("axis", 0)
    axis = axis + x.rank if axis < 0 else axis
    if axis != x.axis:
        cg.freeze(x, f"Split '{name_of(node)}' on axis {axis}, not the channel axis")
        return
    sizes = [(dims(o) or [None] * x.rank)[axis] for o in node.outputs]
    if any(s is None for s in sizes) or sum(sizes) != x.size:
        cg.freeze(x, f"Split '{name_of(node)}' output sizes are unknown")
        return
    windows, start = [], 0
    for size in sizes:
        windows.append(window(x, start, size))
        start += size
    if any(w is None for w in windows):
        cg.freeze(x, f"Split '{name_of(node)}' cuts through a flattened channel")
        return
    for out, size, segs in zip(node.outputs, sizes, windows):
        cg.info[out] = ChannelInfo(axis, x.rank, size, segs)


def window(x: ChannelInfo, start: int, size: int) -> list[Segment] | None:
    """The segments of tensor channels [start, start + size) of ``x``, renumbered from 0; None
    when the window cuts through a flattened channel (``repeat`` > 1)."""
    segs = []
    for s in x.segments:
        lo, hi = max(start, s.offset), min(start + size, s.offset + s.length * s.repeat)
        if lo >= hi:
            continue
        if (lo - s.offset) % s.repeat or (hi - s.offset) % s.repeat:
            return None
        segs.append(
            Segment(
                s.group,
                s.start + (lo - s.offset) // s.repeat,
                (hi - lo) // s.repeat,
                lo - start,
                s.repeat,
            )
        )
    return segs


def flatten(cg: ChannelGraph, node: ir.Node) -> None:
    """[N, C, H, W] -> [N, C·H·W]: channel c becomes features [c·HW, (c+1)·HW)."""
    x = input_info(cg, node)
    if x is None:
        return
    shape, out_shape = dims(node.inputs[0]), dims(node.outputs[0])
    inner = None if shape is None or any(d is None for d in shape[1:]) else math.prod(shape[1:])  # type: ignore[misc]
    if node.op_type == "Flatten":
        ok = node.attributes.get_int("axis", 1) == 1
    else:
        ok = out_shape is not None and len(out_shape) == 2 and out_shape[1] == inner
    if not ok or inner is None or x.axis != 1:
        cg.freeze(x, f"{node.op_type} '{name_of(node)}' does not flatten [N, C, ...] to [N, C·...]")
        return
    cg.info[node.outputs[0]] = flattened(x, inner)


def flattened(x: ChannelInfo, inner: int) -> ChannelInfo:
    """The layout of ``x`` (channel axis 1) flattened to [N, inner]."""
    hw = inner // x.size
    segs = [dataclasses.replace(s, offset=s.offset * hw, repeat=s.repeat * hw) for s in x.segments]
    return ChannelInfo(1, 2, x.size * hw, segs)


def const_ints(node: ir.Node, attr: str, index: int) -> list[int] | None:
    """An int list given as attribute (older opsets) or as constant input ``index`` (newer)."""
    values = node.attributes.get_ints(attr, None) if attr else None
    if values is None and len(node.inputs) > index and node.inputs[index] is not None:
        arr = const_array(node.inputs[index])
        values = None if arr is None else [int(a) for a in arr.reshape(-1)]
    return None if values is None else list(values)


def pad(cg: ChannelGraph, node: ir.Node) -> None:
    x = input_info(cg, node)
    if x is None:
        return
    pads = const_ints(node, "pads", 1)
    if len(node.inputs) > 3 and node.inputs[3] is not None:
        pads = None  # explicit axes: not handled
    if pads is None or pads[x.axis] != 0 or pads[x.axis + x.rank] != 0:
        cg.freeze(x, f"Pad '{name_of(node)}' pads the channel axis or has unknown pads")
        return
    cg.info[node.outputs[0]] = x


def resize(cg: ChannelGraph, node: ir.Node) -> None:
    x = input_info(cg, node)
    if x is None:
        return
    scales = (
        const_array(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
    )
    sizes = (
        const_array(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] is not None else None
    )
    if node.op_type == "Upsample":
        scales = const_array(node.inputs[1]) if len(node.inputs) > 1 else None
    if scales is not None and scales.size and float(scales.reshape(-1)[x.axis]) == 1.0:
        cg.info[node.outputs[0]] = x
        return
    if sizes is not None and sizes.size == x.rank and int(sizes[x.axis]) == x.size:
        if weight_users_outside(node.inputs[3], node):
            cg.freeze(x, f"Resize '{name_of(node)}' sizes tensor is shared")
            return
        cg.info[node.outputs[0]] = x
        return
    cg.freeze(x, f"{node.op_type} '{name_of(node)}' scales the channel axis or has unknown scales")


UNARY = (
    "Relu",
    "LeakyRelu",
    "Clip",
    "Sigmoid",
    "HardSigmoid",
    "HardSwish",
    "Tanh",
    "Elu",
    "Selu",
    "Celu",
    "Softplus",
    "Softsign",
    "Gelu",
    "Mish",
    "ThresholdedRelu",
    "Identity",
    "Dropout",
    "Neg",
    "Abs",
    "Exp",
    "Log",
    "Sqrt",
    "Reciprocal",
    "Floor",
    "Ceil",
    "Round",
    "Sign",
    "Erf",
    "Sin",
    "Cos",
    "Cast",
    "Not",
    "IsNaN",
)

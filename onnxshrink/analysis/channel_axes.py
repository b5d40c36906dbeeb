"""Ops that move, window or read the channel axis: where its channels go, and their cuts.

Transpose moves the channel axis to ``perm.index(axis)``; Squeeze, Unsqueeze and a Reduce*
with keepdims=0 shift it by the axes removed or inserted before it; a Reduce* over other axes,
a Softmax over another axis and a Slice along other axes keep it. A Slice along it with constant
bounds and step 1 takes the window [start, end) like one output of Split, and its bounds are
rewritten: start' = start − #{removed < start}, the same for end. A Reshape keeps it when the
dims before it multiply to the same number in and out and the channel dim stays whole
([N, C, H, W] → [N, C, H·W]; otherwise :func:`channel_layout.flatten`); its shape entry there
is −1, a copy (0) or a constant that is rewritten. Shape reads no channel values: it passes when
every use takes other dims only (a constant Slice or Gather, through Cast) -- the channel count
read elsewhere could meet a hard-coded one. Anything else freezes what it touches, with why.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

from onnxshrink.analysis.channel_layout import (
    const_ints,
    flatten,
    flattened,
    passthrough,
    window,
)
from onnxshrink.analysis.channels import ChannelGraph, ChannelInfo, dims, input_info, name_of
from onnxshrink.irtools import const_array, set_const_input

__all__ = ["reduce", "reshape", "shape", "slice_", "cut_slice", "softmax", "squeeze", "transpose"]


def transpose(cg: ChannelGraph, node: ir.Node) -> None:
    x = input_info(cg, node)
    if x is not None:
        perm = node.attributes.get_ints("perm", None)
        perm = list(perm) if perm is not None else list(range(x.rank))[::-1]
        cg.info[node.outputs[0]] = ChannelInfo(perm.index(x.axis), x.rank, x.size, x.segments)


def squeeze(cg: ChannelGraph, node: ir.Node) -> None:
    """Squeeze / Unsqueeze with known axes, not the channel axis itself."""
    x = input_info(cg, node)
    if x is None:
        return
    axes = const_ints(node, "axes", 1)
    if node.op_type == "Squeeze" and axes is None:  # every size-1 dim, when all are known
        shape = dims(node.inputs[0])
        axes = (
            None if shape is None or None in shape else [i for i, d in enumerate(shape) if d == 1]
        )
    if axes is None:
        cg.freeze(x, f"{node.op_type} '{name_of(node)}' has axes known only at run time")
        return
    if node.op_type == "Squeeze":
        axes = {a % x.rank for a in axes}
        if x.axis in axes:
            cg.freeze(x, f"Squeeze '{name_of(node)}' removes the channel axis")
            return
        axis, rank = x.axis - sum(a < x.axis for a in axes), x.rank - len(axes)
    else:
        rank = x.rank + len(axes)
        inserted = {a % rank for a in axes}
        axis = [i for i in range(rank) if i not in inserted][x.axis]
    cg.info[node.outputs[0]] = ChannelInfo(axis, rank, x.size, x.segments)


def reduce(cg: ChannelGraph, node: ir.Node) -> None:
    """Reduce* over other axes: the channel axis stays, or moves down when keepdims=0."""
    x = input_info(cg, node)
    if x is None:
        return
    axes = const_ints(node, "axes", 1)
    keep = node.attributes.get_int("keepdims", 1)
    if axes == [] and node.attributes.get_int("noop_with_empty_axes", 0):
        passthrough(cg, node)
        return
    if not axes or x.axis in {a % x.rank for a in axes}:
        given = len(node.inputs) > 1 and node.inputs[1] is not None
        why = (
            "reduces over the channel axis"
            if axes
            else "has axes known only at run time"
            if axes is None and given
            else "reduces over every axis"
        )
        cg.freeze(x, f"{node.op_type} '{name_of(node)}' {why}")
        return
    axes = sorted({a % x.rank for a in axes})
    axis = x.axis if keep else x.axis - sum(a < x.axis for a in axes)
    rank = x.rank if keep else x.rank - len(axes)
    cg.info[node.outputs[0]] = ChannelInfo(axis, rank, x.size, x.segments)


def softmax(cg: ChannelGraph, node: ir.Node) -> None:
    """Before opset 13, Softmax normalises over all axes from ``axis`` on."""
    x = input_info(cg, node)
    if x is None:
        return
    opset = node.version or cg.model.opset_imports.get("", 13)
    axis = node.attributes.get_int("axis", -1 if opset >= 13 else 1) % x.rank
    if (axis == x.axis) if opset >= 13 else (axis <= x.axis):
        cg.freeze(x, f"{node.op_type} '{name_of(node)}' normalises over the channel axis")
        return
    passthrough(cg, node)


def _slice_params(node: ir.Node, rank: int):
    """(starts, ends, axes, steps) as int lists (None where not constant); axes normalised."""
    if len(node.inputs) > 1:  # opset >= 10: inputs; absent axes and steps take their defaults

        def given(i: int) -> bool:
            return len(node.inputs) > i and node.inputs[i] is not None

        starts, ends = const_ints(node, "", 1), const_ints(node, "", 2)
        n = (dims(node.inputs[1]) or [None])[0]
        axes = const_ints(node, "", 3) if given(3) else (None if n is None else list(range(n)))
        steps = const_ints(node, "", 4) if given(4) else (None if n is None else [1] * n)
    else:  # attributes; axes default to the first len(starts)
        starts, ends = (
            node.attributes.get_ints("starts", None),
            node.attributes.get_ints("ends", None),
        )
        axes = node.attributes.get_ints("axes", None) or (list(range(len(starts or []))) or None)
        steps = None if axes is None else [1] * len(axes)
        starts, ends = (None if v is None else list(v) for v in (starts, ends))
    axes = None if axes is None else [a % rank for a in axes]
    return starts, ends, axes, steps


def _bounds(start: int, end: int, size: int) -> tuple[int, int]:
    lo = min(max(start + size if start < 0 else start, 0), size)
    hi = min(max(end + size if end < 0 else end, 0), size)
    return lo, max(lo, hi)


def slice_(cg: ChannelGraph, node: ir.Node) -> None:
    x = input_info(cg, node)
    if x is None:
        return
    starts, ends, axes, steps = _slice_params(node, x.rank)
    if axes is None:
        cg.freeze(x, f"Slice '{name_of(node)}' has axes known only at run time")
        return
    if x.axis not in axes:
        passthrough(cg, node)
        return
    k = axes.index(x.axis)
    if starts is None or ends is None or steps is None or steps[k] != 1:
        cg.freeze(x, f"Slice '{name_of(node)}' cuts the channel axis with run-time bounds or steps")
        return
    lo, hi = _bounds(starts[k], ends[k], x.size)
    segments = window(x, lo, hi - lo)
    if segments is None or hi == lo:
        cg.freeze(x, f"Slice '{name_of(node)}' cuts through a flattened channel or is empty")
        return
    cg.info[node.outputs[0]] = ChannelInfo(x.axis, x.rank, hi - lo, segments)


def cut_slice(c, node: ir.Node) -> None:
    """Rewrites the channel axis's start and end once input channels are removed."""
    removed, x = c.rem(node.inputs[0]), c.info.get(node.inputs[0])
    if not len(removed) or x is None:
        return
    starts, ends, axes, _ = _slice_params(node, x.rank)
    if x.axis not in axes:
        return
    k = axes.index(x.axis)
    lo, hi = _bounds(starts[k], ends[k], x.size)
    starts[k], ends[k] = lo - int(np.sum(removed < lo)), hi - int(np.sum(removed < hi))
    if len(node.inputs) > 1:
        set_const_input(c.graph, node, 1, np.asarray(starts, np.int64), "pruned.starts")
        set_const_input(c.graph, node, 2, np.asarray(ends, np.int64), "pruned.ends")
    else:
        node.attributes["starts"] = ir.AttrInt64s("starts", starts)
        node.attributes["ends"] = ir.AttrInt64s("ends", ends)


def _kept_axis(node: ir.Node, axis: int) -> int | None:
    """Where a Reshape puts the input's channel axis whole, or None."""
    src, dst = node.inputs[0].shape, node.outputs[0].shape
    if src is None or dst is None or not isinstance(src[axis], int):
        return None
    for b, d in enumerate(dst):
        if d != src[axis]:
            continue
        before, after = list(src[:axis]), list(dst[:b])
        if before == after or (
            all(isinstance(v, int) for v in before + after)
            and math.prod(before) == math.prod(after)
        ):
            return b
    return None


def _piece(concat: ir.Node, i: int) -> tuple[int, ir.Value, int] | None:
    """(input index, input, entry in it) of entry ``i`` of a Concat of 1-D shape pieces."""
    for k, v in enumerate(concat.inputs):
        n = (dims(v) or [None])[0]
        if n is None:
            return None
        if i < n:
            return k, v, i
        i -= n
    return None


def _entry(value: ir.Value, i: int, owner: ir.Node, index: int) -> tuple | None:
    """Entry ``i`` of the 1-D shape tensor ``value`` (input ``index`` of ``owner``) when it is
    a constant, through Cast and Concat: (the int, where it can be rewritten or None). Where:
    (node, input index, position) of the constant, when no other op reads the path to it."""
    arr = const_array(value)
    if arr is not None:
        return (int(arr.reshape(-1)[i]), (owner, index, i)) if i < arr.size else None
    p = value.producer()
    if p is None:
        return None
    if p.op_type == "Cast":
        found = _entry(p.inputs[0], i, p, 0)
    elif p.op_type == "Concat":
        piece = _piece(p, i)
        found = None if piece is None else _entry(piece[1], piece[2], p, piece[0])
    else:
        return None
    if found is not None and len(value.uses()) != 1:
        return found[0], None  # read by another op too: not rewritten here
    return found


def _shape_entry(value: ir.Value, i: int) -> int | None:
    found = _entry(value, i, None, -1)  # type: ignore[arg-type]
    return None if found is None else found[0]


def _shape_of(value: ir.Value) -> ir.Node | None:
    """The Shape node behind ``value`` (through Cast), or None."""
    p = value.producer()
    while p is not None and p.op_type == "Cast":
        p = p.inputs[0].producer()
    return p if p is not None and p.op_type == "Shape" else None


def _reads_dim(value: ir.Value, i: int, tensor: ir.Value, dim: int) -> bool:
    """True when entry ``i`` of the shape vector ``value`` is ``tensor``'s dim ``dim``, read
    at run time (Shape, a constant Slice or Gather of it, through Cast and Concat)."""
    p = value.producer()
    if p is not None and p.op_type == "Cast":
        return _reads_dim(p.inputs[0], i, tensor, dim)
    if p is not None and p.op_type == "Concat":
        piece = _piece(p, i)
        return piece is not None and _reads_dim(piece[1], piece[2], tensor, dim)
    if p is not None and p.op_type in ("Slice", "Gather"):
        shape_ = _shape_of(p.inputs[0])
    else:
        shape_ = p if p is not None and p.op_type == "Shape" else None
    if shape_ is None or shape_.inputs[0] is not tensor:
        return False
    rank = len(tensor.shape) if tensor.shape is not None else None
    if rank is None:
        return False
    first = _bounds(shape_.attributes.get_int("start", 0), rank, rank)[0]
    if p.op_type == "Shape":
        return first + i == dim
    if p.op_type == "Gather":
        picked = const_array(p.inputs[1])
        picked = None if picked is None else np.atleast_1d(picked).tolist()
        return picked is not None and i < len(picked) and first + picked[i] % rank == dim
    starts, ends, _, steps = _slice_params(p, 1)
    if starts is None or ends is None or steps != [1]:
        return False
    return first + _bounds(starts[0], ends[0], rank - first)[0] + i == dim


def _batch_flatten(node: ir.Node, inner: int) -> bool:
    """``x.view(x.size(0), -1)`` with the shape built at run time: [x's dim 0, −1 or inner]."""
    if (dims(node.inputs[1]) or [None])[0] != 2:
        return False
    first = _shape_entry(node.inputs[1], 0) == 0 or _reads_dim(node.inputs[1], 0, node.inputs[0], 0)
    return first and _shape_entry(node.inputs[1], 1) in (-1, inner)


def reshape(cg: ChannelGraph, node: ir.Node) -> None:
    """Keeps the channel axis whole, or flattens [N, C, ...] to [N, C·...]."""
    x = input_info(cg, node)
    if x is None:
        return
    b = _kept_axis(node, x.axis)
    src = dims(node.inputs[0])
    inner = None if src is None or None in src[1:] else math.prod(src[1:])  # type: ignore[arg-type]
    if b is None and x.axis == 1 and inner is not None and _batch_flatten(node, inner):
        cg.info[node.outputs[0]] = flattened(x, inner)
        b = 1
    elif b is None:
        flatten(cg, node)
        if node.outputs[0] not in cg.info:
            return
        b = 1
    entry, where = _entry(node.inputs[1], b, node, 1) or (None, None)
    copies = entry == 0 and b == x.axis and not node.attributes.get_int("allowzero", 0)
    if not (entry == -1 or copies or (entry is not None and entry > 0 and where is not None)):
        cg.info.pop(node.outputs[0], None)
        cg.freeze(x, f"Reshape '{name_of(node)}' has a channel count it cannot rewrite")
        return
    if node.outputs[0] not in cg.info:
        rank = len(node.outputs[0].shape)
        cg.info[node.outputs[0]] = ChannelInfo(b, rank, x.size, x.segments)


def cut_reshape(c, node: ir.Node) -> None:
    """A channel count written in the shape (as a constant, or a constant piece of a Concat)
    loses the removed channels; −1 and a copied dim follow the input by themselves."""
    r, info = c.rem(node.outputs[0]), c.info.get(node.outputs[0])
    if not len(r) or info is None:
        return
    entry, where = _entry(node.inputs[1], info.axis, node, 1) or (None, None)
    if entry is None or entry <= 0 or where is None:
        return
    owner, index, pos = where
    arr = const_array(owner.inputs[index]).copy()
    arr.reshape(-1)[pos] -= len(r)
    set_const_input(c.graph, owner, index, arr, "pruned.shape")


def _reads_only_other_dims(value: ir.Value, index: int) -> bool:
    """True when every use of the shape vector ``value`` leaves out entry ``index``."""
    for user, _ in value.uses():
        if user.op_type == "Cast":
            ok = _reads_only_other_dims(user.outputs[0], index)
        elif user.op_type == "Gather" and user.inputs[0] is value:
            picked = const_array(user.inputs[1])
            n = (dims(value) or [None])[0]
            ok = (
                picked is not None
                and n is not None
                and index not in np.atleast_1d(picked % n).tolist()
            )
        elif user.op_type == "Slice" and user.inputs[0] is value:
            n = (dims(value) or [None])[0]
            starts, ends, _, steps = _slice_params(user, 1)
            ok = n is not None and None not in (starts, ends) and steps == [1]
            if ok:
                lo, hi = _bounds(starts[0], ends[0], n)
                ok = not lo <= index < hi
        else:
            ok = False
        if not ok:
            return False
    return True


def shape(cg: ChannelGraph, node: ir.Node) -> None:
    x = input_info(cg, node)
    if x is None:
        return
    start, end = _bounds(
        node.attributes.get_int("start", 0), node.attributes.get_int("end", x.rank), x.rank
    )
    if start <= x.axis < end and not _reads_only_other_dims(node.outputs[0], x.axis - start):
        cg.freeze(x, f"Shape '{name_of(node)}' reads the channel count for other ops")

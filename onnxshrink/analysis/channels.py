"""Channel dependency groups: which channels must be removed together, over the IR.

A *group* is a set of channels that live or die together. It is born at a *producer* -- an op
whose output channels are rows of a constant weight (Conv with group = 1, ConvTranspose, Gemm
or MatMul with a constant right-hand side) -- and followed forward through the graph by a per-op
table (``_PROPAGATE``). Every tensor that carries a group's channels gets a :class:`ChannelInfo`:
its channel axis and a list of :class:`Segment` s, each mapping a run of group channels onto a run
of the tensor's channels::

    Conv A (16) ─┐                 value    segments
                 ├ Concat ─ Conv C  a        [A 0..16 -> 0..16]
    Conv B (16) ─┘                 b        [B 0..16 -> 0..16]
                                   concat   [A 0..16 -> 0..16, B 0..16 -> 16..32]

so removing channel 3 of group B removes channel 19 of the Concat output and input channel 19
of Conv C. ``Flatten``/``Reshape`` to [N, C·H·W] before a Gemm maps group channel c to the
H·W features ``[c·HW, (c+1)·HW)`` (``repeat = HW``). ``Split`` cuts segments at its boundaries.

Two tracked tensors meeting in an element-wise op (a residual ``Add``, the ``Mul`` of a
squeeze-and-excitation gate) *couple* their groups: channel i of one is channel i of the other,
so the groups are merged (union-find) and pruned as one. That needs whole, aligned segments;
anything else freezes them. A per-channel constant operand (``[C, 1, 1]``) is sliced along;
a scalar or size-1 axis passes.

A group is *frozen* (never pruned), with the reason kept for the report, when its channels
reach a graph output, meet an op missing from the table (the conservative default is the
correct default), a grouped (non-depthwise) Conv, a non-constant or shared weight, an operand
whose channels are not tracked, or a layout the table cannot map.

Each group also records its *members* -- (weight or tensor, axis, segment) triples -- from which
importance criteria read per-channel slices: producer weights (output axis), consumer weights
(input axis), BatchNorm scales, and the activations that consumers read.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Iterable

import numpy as np
import onnx_ir as ir

from onnxshrink.irtools import const_array, weight_users_outside

__all__ = [
    "Segment",
    "ChannelInfo",
    "Member",
    "Group",
    "ChannelGraph",
    "analyze",
]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Segment:
    """Group channels [start, start + length) of ``group`` are tensor channels starting at
    ``offset``, ``repeat`` tensor channels per group channel."""

    group: int
    start: int
    length: int
    offset: int
    repeat: int = 1

    def tensor_indices(self, group_channels: np.ndarray) -> np.ndarray:
        """Tensor channels of the given group channels (those inside this segment)."""
        inside = group_channels[
            (group_channels >= self.start) & (group_channels < self.start + self.length)
        ]
        base = self.offset + (inside - self.start) * self.repeat
        return (base[:, None] + np.arange(self.repeat)[None, :]).reshape(-1)


@dataclasses.dataclass
class ChannelInfo:
    """The channel layout of one tensor: its channel axis, size, and segments covering it."""

    axis: int  # non-negative, for a tensor of rank ``rank``
    rank: int
    size: int
    segments: list[Segment]


@dataclasses.dataclass(frozen=True)
class Member:
    """A per-channel slice owner of a group, for importance and for reading activations.

    ``kind``: "out" (producer weight, channel = output), "in" (consumer weight, channel =
    input), "bn" (BatchNorm scale), "act" (an activation tensor a consumer reads).
    """

    kind: str
    node: ir.Node
    value: ir.Value
    axis: int
    segment: Segment


@dataclasses.dataclass
class Group:
    id: int
    size: int
    producers: list[ir.Node] = dataclasses.field(default_factory=list)
    consumers: list[ir.Node] = dataclasses.field(default_factory=list)
    members: list[Member] = dataclasses.field(default_factory=list)
    frozen: str | None = None

    @property
    def name(self) -> str:
        return ", ".join(p.name or p.op_type for p in self.producers[:3]) + (
            f" (+{len(self.producers) - 3})" if len(self.producers) > 3 else ""
        )


def _static_shape(value: ir.Value | None) -> list[int] | None:
    """All dims, when all are known."""
    dims = _dims(value)
    return None if dims is None or any(d is None for d in dims) else dims  # type: ignore[return-value]


def _dims(value: ir.Value | None) -> list[int | None] | None:
    """Dims with None for symbolic ones (a dynamic batch), or None when the rank is unknown."""
    if value is None:
        return None
    if value.const_value is not None:
        return list(value.const_value.shape)
    if value.shape is None:
        return None
    return [int(d) if isinstance(d, int) else None for d in value.shape]


def _name(node: ir.Node) -> str:
    return node.name or node.op_type


class ChannelGraph:
    """The result of :func:`analyze`: groups (union-find) and per-tensor channel layouts."""

    def __init__(self, model: ir.Model) -> None:
        self.model = model
        self.groups: dict[int, Group] = {}
        self.parent: dict[int, int] = {}
        self.info: dict[ir.Value, ChannelInfo] = {}

    # -- groups -------------------------------------------------------------------------------
    def new_group(self, size: int, producer: ir.Node) -> int:
        gid = len(self.parent)
        self.parent[gid] = gid
        self.groups[gid] = Group(gid, size, producers=[producer])
        return gid

    def find(self, gid: int) -> int:
        while self.parent[gid] != gid:
            self.parent[gid] = self.parent[self.parent[gid]]
            gid = self.parent[gid]
        return gid

    def group(self, gid: int) -> Group:
        return self.groups[self.find(gid)]

    def merge(self, a: int, b: int) -> int:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        ga, gb = self.groups[ra], self.groups[rb]
        self.parent[rb] = ra
        ga.producers += gb.producers
        ga.consumers += gb.consumers
        ga.members += gb.members
        ga.frozen = ga.frozen or gb.frozen
        del self.groups[rb]
        return ra

    def freeze(self, info: ChannelInfo | None, reason: str) -> None:
        if info is None:
            return
        for seg in info.segments:
            g = self.group(seg.group)
            if g.frozen is None:
                g.frozen = reason

    def add_member(
        self, kind: str, node: ir.Node, value: ir.Value, axis: int, info: ChannelInfo
    ) -> None:
        for seg in info.segments:
            self.group(seg.group).members.append(Member(kind, node, value, axis, seg))

    def roots(self) -> list[Group]:
        return [self.groups[g] for g in sorted(self.groups)]

    # -- removal -------------------------------------------------------------------------------
    def removed_channels(self, removed: dict[int, np.ndarray]) -> dict[ir.Value, np.ndarray]:
        """Tensor channels to remove, per tracked tensor, from group channels to remove."""
        out: dict[ir.Value, np.ndarray] = {}
        for value, info in self.info.items():
            parts = []
            for seg in info.segments:
                r = removed.get(self.find(seg.group))
                if r is not None and len(r):
                    parts.append(seg.tensor_indices(np.asarray(r)))
            if parts:
                out[value] = np.unique(np.concatenate(parts))
        return out


# -- propagation handlers -------------------------------------------------------------------
Handler = Callable[[ChannelGraph, ir.Node], None]


def _input_info(cg: ChannelGraph, node: ir.Node, i: int = 0) -> ChannelInfo | None:
    v = node.inputs[i] if i < len(node.inputs) else None
    return cg.info.get(v) if v is not None else None


def _freeze_inputs(cg: ChannelGraph, node: ir.Node, reason: str) -> None:
    for v in node.inputs:
        if v is not None:
            cg.freeze(cg.info.get(v), reason)


def _unknown(cg: ChannelGraph, node: ir.Node) -> None:
    if any(v is not None and v in cg.info for v in node.inputs):
        _freeze_inputs(
            cg,
            node,
            f"channels reach {node.op_type} '{_name(node)}', which pruning does not handle",
        )


def _weight_ok(cg: ChannelGraph, node: ir.Node, index: int) -> str | None:
    w = node.inputs[index] if index < len(node.inputs) else None
    if w is None:
        return "no weight"
    if const_array(w) is None:
        return f"{node.op_type} '{_name(node)}' weight is not constant"
    if others := weight_users_outside(w, node):
        return f"{node.op_type} '{_name(node)}' weight is shared with '{_name(others[0])}'"
    if len(node.inputs) > index + 1 and node.inputs[index + 1] is not None:
        b = node.inputs[index + 1]
        if const_array(b) is None:
            return f"{node.op_type} '{_name(node)}' bias is not constant"
        if weight_users_outside(b, node):
            return f"{node.op_type} '{_name(node)}' bias is shared with another node"
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


def _conv(cg: ChannelGraph, node: ir.Node) -> None:
    w = _static_shape(node.inputs[1])
    x = _input_info(cg, node)
    y = node.outputs[0]
    if w is None:
        _freeze_inputs(cg, node, f"Conv '{_name(node)}' weight shape is unknown")
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
    cg.freeze(x, f"grouped Conv '{_name(node)}' (group={group}) couples channels in blocks")
    gid = cg.new_group(c_out, node)
    info = ChannelInfo(1, rank, c_out, [Segment(gid, 0, c_out, 0)])
    cg.info[y] = info
    cg.freeze(info, f"output of grouped Conv '{_name(node)}' (group={group})")


def _conv_transpose(cg: ChannelGraph, node: ir.Node) -> None:
    w = _static_shape(node.inputs[1])
    x = _input_info(cg, node)
    if w is None:
        _freeze_inputs(cg, node, f"ConvTranspose '{_name(node)}' weight shape is unknown")
        return
    group = node.attributes.get_int("group", 1)
    problem = _weight_ok(cg, node, 1)
    if group != 1:
        cg.freeze(x, f"grouped ConvTranspose '{_name(node)}'")
        problem = problem or f"grouped ConvTranspose '{_name(node)}'"
        x = None
    _consume(cg, node, x, 0, problem)
    _produce(cg, node, w[1] * group, 1, 1, len(w), problem)


def _gemm(cg: ChannelGraph, node: ir.Node) -> None:
    b = _static_shape(node.inputs[1])
    x = _input_info(cg, node)
    if b is None or len(b) != 2:
        _freeze_inputs(cg, node, f"Gemm '{_name(node)}' weight shape is unknown")
        return
    trans_a, trans_b = node.attributes.get_int("transA", 0), node.attributes.get_int("transB", 0)
    problem = _weight_ok(cg, node, 1)
    if trans_a:
        cg.freeze(x, f"Gemm '{_name(node)}' has transA=1")
        x = None
    if x is not None and x.axis != 1:
        cg.freeze(x, f"Gemm '{_name(node)}' reads channels on axis {x.axis}")
        x = None
    in_axis, out_axis = (1, 0) if trans_b else (0, 1)
    _consume(cg, node, x, in_axis, problem)
    _produce(cg, node, b[out_axis], out_axis, 1, 2, problem)


def _matmul(cg: ChannelGraph, node: ir.Node) -> None:
    b = _static_shape(node.inputs[1]) if const_array(node.inputs[1]) is not None else None
    x = _input_info(cg, node)
    a_shape = _dims(node.inputs[0])
    if b is None or len(b) != 2 or a_shape is None or len(a_shape) != 2:
        _unknown(cg, node)
        return
    problem = _weight_ok(cg, node, 1)
    if x is not None and x.axis != 1:
        cg.freeze(x, f"MatMul '{_name(node)}' reads channels on axis {x.axis}")
        x = None
    _consume(cg, node, x, 0, problem)
    _produce(cg, node, b[1], 1, 1, 2, problem)


def _passthrough(cg: ChannelGraph, node: ir.Node) -> None:
    """y[c] depends only on x[c]: the output carries the input's channels."""
    x = _input_info(cg, node)
    if x is not None:
        for out in node.outputs[:1]:
            cg.info[out] = x


def _batchnorm(cg: ChannelGraph, node: ir.Node) -> None:
    x = _input_info(cg, node)
    if x is None:
        return
    if x.axis != 1:
        cg.freeze(
            x, f"{node.op_type} '{_name(node)}' normalises axis 1, channels are on axis {x.axis}"
        )
        return
    params = [const_array(v) for v in node.inputs[1:5] if v is not None]
    if any(p is None for p in params) or any(
        weight_users_outside(v, node) for v in node.inputs[1:5] if v is not None
    ):
        cg.freeze(x, f"{node.op_type} '{_name(node)}' parameters are not constant or are shared")
        return
    if node.op_type == "BatchNormalization" and len([o for o in node.outputs if o.uses()]) > 1:
        cg.freeze(x, f"BatchNormalization '{_name(node)}' is in training mode")
        return
    cg.info[node.outputs[0]] = x
    cg.add_member("bn", node, node.inputs[1], 0, x)


def _per_channel_const(arr_shape: list[int], x: ChannelInfo) -> tuple[str, int]:
    """How a constant operand broadcasts against ``x``: ("scalar"|"channel"|"bad", axis)."""
    offset = x.rank - len(arr_shape)
    axis = x.axis - offset
    if axis < 0 or arr_shape[axis] == 1:
        return "scalar", -1
    if arr_shape[axis] == x.size:
        return "channel", axis
    return "bad", axis


def _prelu(cg: ChannelGraph, node: ir.Node) -> None:
    x = _input_info(cg, node)
    if x is None:
        return
    slope = const_array(node.inputs[1])
    if slope is None:
        cg.freeze(x, f"PRelu '{_name(node)}' slope is not constant")
        return
    kind, _ = _per_channel_const(list(slope.shape), x)
    if kind == "bad" or weight_users_outside(node.inputs[1], node):
        cg.freeze(x, f"PRelu '{_name(node)}' slope cannot be sliced")
        return
    cg.info[node.outputs[0]] = x


def _aligned(a: ChannelInfo, b: ChannelInfo) -> bool:
    if a.size != b.size or a.rank - a.axis != b.rank - b.axis or len(a.segments) != len(b.segments):
        return False
    return all(
        (s.start, s.length, s.offset, s.repeat) == (t.start, t.length, t.offset, t.repeat)
        for s, t in zip(a.segments, b.segments)
    )


def _elementwise(cg: ChannelGraph, node: ir.Node) -> None:
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
            _freeze_inputs(
                cg,
                node,
                f"{node.op_type} '{_name(node)}' mixes pruned channels with an untracked tensor",
            )
            return
        kind, _ = _per_channel_const(
            list(arr.shape), ChannelInfo(ref.axis + out_rank - ref.rank, out_rank, ref.size, [])
        )
        if kind == "bad" or (kind == "channel" and weight_users_outside(v, node)):
            _freeze_inputs(
                cg, node, f"{node.op_type} '{_name(node)}' constant operand cannot be sliced"
            )
            return
    for _, info in tracked[1:]:
        if not _aligned(ref, info):
            _freeze_inputs(
                cg,
                node,
                f"{node.op_type} '{_name(node)}' joins tensors whose channels do not line up",
            )
            return
    for _, info in tracked[1:]:
        for s, t in zip(ref.segments, info.segments):
            gs, gt = cg.group(s.group), cg.group(t.group)
            if (
                s.start != 0
                or t.start != 0
                or s.length != gs.size
                or t.length != gt.size
                or gs.size != gt.size
            ):
                _freeze_inputs(cg, node, f"{node.op_type} '{_name(node)}' couples parts of groups")
                return
    for _, info in tracked[1:]:
        for s, t in zip(ref.segments, info.segments):
            cg.merge(s.group, t.group)
    cg.info[node.outputs[0]] = ChannelInfo(
        ref.axis + out_rank - ref.rank, out_rank, ref.size, list(ref.segments)
    )


def _concat(cg: ChannelGraph, node: ir.Node) -> None:
    infos = [cg.info.get(v) if v is not None else None for v in node.inputs]
    if not any(infos):
        return
    first = next(i for i in infos if i is not None)
    axis = node.attributes.get_int("axis", 0)
    axis = axis + first.rank if axis < 0 else axis
    if axis != first.axis:
        _freeze_inputs(cg, node, f"Concat '{_name(node)}' on axis {axis}, not the channel axis")
        return
    segments, offset = [], 0
    for v, info in zip(node.inputs, infos):
        if info is None:
            shape = _dims(v)
            if shape is None or shape[axis] is None:
                _freeze_inputs(
                    cg,
                    node,
                    f"Concat '{_name(node)}' input '{v.name}' has an unknown channel count",
                )
                return
            offset += shape[axis]
            continue
        segments += [dataclasses.replace(s, offset=s.offset + offset) for s in info.segments]
        offset += info.size
    cg.info[node.outputs[0]] = ChannelInfo(axis, first.rank, offset, segments)


def _split(cg: ChannelGraph, node: ir.Node) -> None:
    """Output k takes input channels [start_k, start_k + size_k): segments are cut there."""
    x = _input_info(cg, node)
    if x is None:
        return
    axis = node.attributes.get_int("axis", 0)
    axis = axis + x.rank if axis < 0 else axis
    if axis != x.axis:
        cg.freeze(x, f"Split '{_name(node)}' on axis {axis}, not the channel axis")
        return
    sizes = [(_dims(o) or [None] * x.rank)[axis] for o in node.outputs]
    if any(s is None for s in sizes) or sum(sizes) != x.size:
        cg.freeze(x, f"Split '{_name(node)}' output sizes are unknown")
        return
    start = 0
    for out, size in zip(node.outputs, sizes):
        segs = []
        for s in x.segments:
            lo, hi = max(start, s.offset), min(start + size, s.offset + s.length * s.repeat)
            if lo >= hi:
                continue
            if (lo - s.offset) % s.repeat or (hi - s.offset) % s.repeat:
                cg.freeze(x, f"Split '{_name(node)}' cuts through a flattened channel")
                return
            segs.append(
                Segment(
                    s.group,
                    s.start + (lo - s.offset) // s.repeat,
                    (hi - lo) // s.repeat,
                    lo - start,
                    s.repeat,
                )
            )
        cg.info[out] = ChannelInfo(axis, x.rank, size, segs)
        start += size


def _flatten(cg: ChannelGraph, node: ir.Node) -> None:
    """[N, C, H, W] -> [N, C·H·W]: channel c becomes features [c·HW, (c+1)·HW)."""
    x = _input_info(cg, node)
    if x is None:
        return
    shape, out_shape = _dims(node.inputs[0]), _dims(node.outputs[0])
    inner = None if shape is None or any(d is None for d in shape[1:]) else math.prod(shape[1:])  # type: ignore[misc]
    if node.op_type == "Flatten":
        ok = node.attributes.get_int("axis", 1) == 1
    else:
        ok = out_shape is not None and len(out_shape) == 2 and out_shape[1] == inner
    if not ok or inner is None or x.axis != 1:
        cg.freeze(x, f"{node.op_type} '{_name(node)}' does not flatten [N, C, ...] to [N, C·...]")
        return
    hw = inner // x.size
    segs = [dataclasses.replace(s, offset=s.offset * hw, repeat=s.repeat * hw) for s in x.segments]
    cg.info[node.outputs[0]] = ChannelInfo(1, 2, x.size * hw, segs)


def _ints(node: ir.Node, attr: str, index: int) -> list[int] | None:
    """An int list given as attribute (older opsets) or as constant input ``index`` (newer)."""
    values = node.attributes.get_ints(attr, None)
    if values is None and len(node.inputs) > index and node.inputs[index] is not None:
        arr = const_array(node.inputs[index])
        values = None if arr is None else [int(a) for a in arr.reshape(-1)]
    return None if values is None else list(values)


def _reduce_spatial(cg: ChannelGraph, node: ir.Node) -> None:
    x = _input_info(cg, node)
    if x is None:
        return
    axes = _ints(node, "axes", 1)
    keep = node.attributes.get_int("keepdims", 1)
    if axes is None or not keep or any((a + x.rank) % x.rank == x.axis for a in axes):
        cg.freeze(x, f"{node.op_type} '{_name(node)}' reduces over the channel axis or drops axes")
        return
    cg.info[node.outputs[0]] = x


def _pad(cg: ChannelGraph, node: ir.Node) -> None:
    x = _input_info(cg, node)
    if x is None:
        return
    pads = _ints(node, "pads", 1)
    if len(node.inputs) > 3 and node.inputs[3] is not None:
        pads = None  # explicit axes: not handled
    if pads is None or pads[x.axis] != 0 or pads[x.axis + x.rank] != 0:
        cg.freeze(x, f"Pad '{_name(node)}' pads the channel axis or has unknown pads")
        return
    cg.info[node.outputs[0]] = x


def _resize(cg: ChannelGraph, node: ir.Node) -> None:
    x = _input_info(cg, node)
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
            cg.freeze(x, f"Resize '{_name(node)}' sizes tensor is shared")
            return
        cg.info[node.outputs[0]] = x
        return
    cg.freeze(x, f"{node.op_type} '{_name(node)}' scales the channel axis or has unknown scales")


_UNARY = (
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

_PROPAGATE: dict[str, Handler] = {
    "Conv": _conv,  # out channels start a group; in channels consume one (depthwise passes it on)
    "ConvTranspose": _conv_transpose,  # W: [C_in, C_out/g, k, k]
    "Gemm": _gemm,
    "MatMul": _matmul,
    "BatchNormalization": _batchnorm,  # per-channel affine: slice scale/bias/mean/var
    "InstanceNormalization": _batchnorm,
    "PRelu": _prelu,
    **{op: _passthrough for op in _UNARY},  # y[c] depends only on x[c]
    "MaxPool": _passthrough,
    "AveragePool": _passthrough,
    "LpPool": _passthrough,
    "GlobalAveragePool": _passthrough,
    "GlobalMaxPool": _passthrough,
    "GlobalLpPool": _passthrough,
    "ReduceMean": _reduce_spatial,
    "ReduceMax": _reduce_spatial,
    "ReduceSum": _reduce_spatial,
    "Add": _elementwise,  # two tensors couple their channels; per-channel constants are sliced
    "Sub": _elementwise,
    "Mul": _elementwise,
    "Div": _elementwise,
    "Max": _elementwise,
    "Min": _elementwise,
    "Sum": _elementwise,
    "Mean": _elementwise,
    "Concat": _concat,  # channel c of input k is channel offset_k + c of the output
    "Split": _split,
    "Flatten": _flatten,  # channel c -> features [c·HW, (c+1)·HW)
    "Reshape": _flatten,
    "Pad": _pad,
    "Resize": _resize,
    "Upsample": _resize,
}


def analyze(model: ir.Model) -> ChannelGraph:
    """Builds the channel groups of ``model`` (shapes must be inferred beforehand)."""
    cg = ChannelGraph(model)
    graph = model.graph
    for node in graph:
        if node.domain not in ("", "ai.onnx"):
            _unknown(cg, node)
            continue
        _PROPAGATE.get(node.op_type, _unknown)(cg, node)
    for value, info in list(cg.info.items()):
        if value.is_graph_output():
            cg.freeze(info, f"channels reach the graph output '{value.name}'")
        for user, _ in value.uses():
            if user.graph is not graph:
                cg.freeze(info, f"channels are read inside a subgraph of '{_name(user)}'")
    return cg


def describe(groups: Iterable[Group]) -> list[str]:
    return [
        f"{g.name}: {g.size} channels{' (frozen: ' + g.frozen + ')' if g.frozen else ''}"
        for g in groups
    ]

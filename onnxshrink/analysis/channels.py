"""Channel dependency groups: which channels must be removed together, over the IR.

A *group* is a set of channels that live or die together. It is born at a *producer* -- an op
whose output channels are rows of a constant weight (Conv with group = 1, ConvTranspose, Gemm
or MatMul with a constant right-hand side) -- and followed forward through the graph by one
record per op (:data:`onnxshrink.analysis.ops.OPS`). Every tensor that carries a group's channels
gets a :class:`ChannelInfo`: its channel axis and a list of :class:`Segment` s, each mapping a run
of group channels onto a run of the tensor's channels::

    Conv A (16) ─┐                 value    segments
                 ├ Concat ─ Conv C  a        [A 0..16 -> 0..16]
    Conv B (16) ─┘                 b        [B 0..16 -> 0..16]
                                   concat   [A 0..16 -> 0..16, B 0..16 -> 16..32]

so removing channel 3 of group B removes channel 19 of the Concat output and input channel 19
of Conv C. A Flatten to [N, C·H·W] maps channel c to features ``[c·HW, (c+1)·HW)``.

Two tracked tensors meeting in an element-wise op (a residual ``Add``, the ``Mul`` of a
squeeze-and-excitation gate) *couple* their groups: channel i of one is channel i of the other,
so the groups are merged (union-find) and pruned as one. That needs whole, aligned segments;
anything else freezes them. A per-channel constant operand (``[C, 1, 1]``) is sliced along;
a scalar or size-1 axis passes.

A group is *frozen* (never pruned), with the reason kept for the report, when its channels
reach a graph output, meet an op missing from the table, a grouped (non-depthwise) Conv, a
non-constant or shared weight, an operand whose channels are not tracked, or a layout the table
cannot map.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable

import numpy as np
import onnx_ir as ir

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


def static_shape(value: ir.Value | None) -> list[int] | None:
    """All dims, when all are known."""
    known = dims(value)
    return None if known is None or any(d is None for d in known) else known  # type: ignore[return-value]


def dims(value: ir.Value | None) -> list[int | None] | None:
    """Dims with None for symbolic ones (a dynamic batch), or None when the rank is unknown."""
    if value is None:
        return None
    if value.const_value is not None:
        return list(value.const_value.shape)
    if value.shape is None:
        return None
    return [int(d) if isinstance(d, int) else None for d in value.shape]


def name_of(node: ir.Node) -> str:
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

    def split(self, gid: int, k: int) -> int:
        """Cuts group ``gid`` at group channel ``k``: channels [k, size) become a new group
        (channels are removed one by one anyway; only the shared ratio and coupling change).
        Every segment and member of the group is cut there. Returns the new group's id."""
        root, g = self.find(gid), self.group(gid)
        new = len(self.parent)
        self.parent[new] = new
        self.groups[new] = Group(
            new, g.size - k, list(g.producers), list(g.consumers), frozen=g.frozen
        )
        g.size = k

        def cut(seg: Segment) -> list[Segment]:
            if self.find(seg.group) != root or seg.start + seg.length <= k:
                return [seg]
            if seg.start >= k:
                return [dataclasses.replace(seg, group=new, start=seg.start - k)]
            head = dataclasses.replace(seg, length=k - seg.start)
            tail_at = seg.offset + (k - seg.start) * seg.repeat
            tail = Segment(new, 0, seg.start + seg.length - k, tail_at, seg.repeat)
            return [head, tail]

        for info in {id(i): i for i in self.info.values()}.values():
            info.segments = [part for seg in info.segments for part in cut(seg)]
        members, g.members = g.members, []
        for m in members:
            for part in cut(m.segment):
                owner = self.groups[new] if part.group == new else g
                owner.members.append(dataclasses.replace(m, segment=part))
        return new

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


def input_info(cg: ChannelGraph, node: ir.Node, i: int = 0) -> ChannelInfo | None:
    v = node.inputs[i] if i < len(node.inputs) else None
    return cg.info.get(v) if v is not None else None


def freeze_inputs(cg: ChannelGraph, node: ir.Node, reason: str) -> None:
    for v in node.inputs:
        if v is not None:
            cg.freeze(cg.info.get(v), reason)


def per_channel_const(arr_shape: list[int], x: ChannelInfo) -> tuple[str, int]:
    """How a constant operand broadcasts against ``x``: ("scalar"|"channel"|"bad", axis)."""
    offset = x.rank - len(arr_shape)
    axis = x.axis - offset
    if axis < 0 or arr_shape[axis] == 1:
        return "scalar", -1
    if arr_shape[axis] == x.size:
        return "channel", axis
    return "bad", axis


def unknown(cg: ChannelGraph, node: ir.Node) -> None:
    if any(v is not None and v in cg.info for v in node.inputs):
        freeze_inputs(
            cg,
            node,
            f"channels reach {node.op_type} '{name_of(node)}', which pruning does not handle",
        )


def analyze(model: ir.Model) -> ChannelGraph:
    """Builds the channel groups of ``model`` (shapes must be inferred beforehand)."""
    from onnxshrink.analysis.ops import OPS

    cg = ChannelGraph(model)
    graph = model.graph
    for node in graph:
        if node.domain not in ("", "ai.onnx"):
            unknown(cg, node)
            continue
        rule = OPS.get(node.op_type)
        try:
            (rule.propagate if rule is not None else unknown)(cg, node)
        except Exception as e:  # one odd node freezes what it touches, never the analysis
            logger.debug("channels through %s", name_of(node), exc_info=True)
            for out in node.outputs:
                cg.info.pop(out, None)
            freeze_inputs(cg, node, f"{node.op_type} '{name_of(node)}' could not be followed: {e}")
    for value, info in list(cg.info.items()):
        if value.is_graph_output():
            cg.freeze(info, f"channels reach the graph output '{value.name}'")
        for user, _ in value.uses():
            if user.graph is not graph:
                cg.freeze(info, f"channels are read inside a subgraph of '{name_of(user)}'")
    return cg


def describe(groups: Iterable[Group]) -> list[str]:
    return [
        f"{g.name}: {g.size} channels{' (frozen: ' + g.frozen + ')' if g.frozen else ''}"
        for g in groups
    ]

"""Blocks: the regions of a compressed model between tensors it shares with the original.

A *cut* is a point in the compressed (student) model's node order where exactly one computed
tensor is live -- everything downstream depends on the inputs only through it -- and the
original (teacher) model has a tensor of that name and shape -- or, for a pruned tensor, the
channels ``prune`` recorded it kept (:func:`kept_of`); a tensor rescaled per channel (balanced
by ``quantize``, equalized) is compared as s_c times the original's (:func:`scale_of`).
Between two consecutive cuts lies a block with one input and one output: in a residual network
the cuts fall at the residual Adds (inside a block the skip tensor stays live), in a chain after
every layer whose output kept its shape. Constants (initializers, Constant nodes, and what
:func:`constant` sees through) never count as live. A block's *parameters* are the initializers
only it reads: float weights (input 1) and biases (input 2) of Conv/ConvTranspose/Gemm/MatMul,
and the integer codes a DequantizeLinear reads (quantized weights and biases).

    x ─ Conv ─ Clip ─ Conv ─ Clip ─ Conv ─ Add ─ y        cuts: x, y (the skip keeps x live)
    └──────────────────────────────────────┘
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_ir as ir

from onnxshrink import marks
from onnxshrink.irtools import const_array
from onnxshrink.reconstruct.scales import is_activation_q

__all__ = ["Block", "constant", "find_blocks", "kept_of", "live_cuts", "merge", "scale_of"]

logger = logging.getLogger(__name__)

_WEIGHTED = ("Conv", "ConvTranspose", "Gemm", "MatMul")
# ops whose output channel c comes from input channel c (or the same c of every input)
_CHANNELWISE = ("Add", "Sub", "Mul", "Div", "Relu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish")
_CHANNELWISE += ("LeakyRelu", "Identity", "MaxPool", "AveragePool", "BatchNormalization")
# ops that carry a per-channel factor s > 0 through: f(s·x) = s·f(x) (a Clip(0, u) on the data
# the rescaling was chosen on), Q/DQ on a grid set for the rescaled values
_HOMOGENEOUS = ("Relu", "Clip", "LeakyRelu", "Identity", "MaxPool", "AveragePool")
_HOMOGENEOUS += ("QuantizeLinear", "DequantizeLinear")


def constant(value: ir.Value) -> np.ndarray | None:
    """The constant behind ``value`` (an initializer, a Constant node's tensor, through the
    chains :func:`onnxshrink.irtools.const_array` follows), or None."""
    arr = const_array(value)
    if arr is not None:
        return arr
    producer = value.producer()
    if producer is not None and producer.op_type == "Constant" and producer.domain == "":
        attr = producer.attributes.get("value")
        return None if attr is None else attr.as_tensor().numpy()
    return None


def kept_of(value: ir.Value) -> np.ndarray | None:
    """The original channels (axis 1) a pruned tensor still has: the ``kept_channels`` mark of
    the weight layer that made it, followed through channel-wise ops; None if unknown."""
    for _ in range(64):
        producer = value.producer()
        if producer is None:
            return None
        if producer.op_type in _WEIGHTED:
            return marks.kept_channels(producer)
        if producer.op_type not in _CHANNELWISE:
            return None
        inputs = [v for v in producer.inputs if v is not None and constant(v) is None]
        if not inputs:
            return None
        value = inputs[0]
    return None


def scale_of(value: ir.Value) -> tuple[np.ndarray, int] | None:
    """(s, axis): ``value`` is s_c times the original's tensor in channel c of ``axis`` -- the
    ``channel_scale`` mark of the node that made it, followed back through positively
    homogeneous ops; None: as the original's (or unknown)."""
    for _ in range(64):
        producer = value.producer()
        if producer is None:
            return None
        if (scale := marks.channel_scale(producer)) is not None:
            return scale, marks.channel_axis(producer)
        if producer.op_type not in _HOMOGENEOUS or not producer.inputs:
            return None
        value = producer.inputs[0]
    return None


@dataclasses.dataclass
class Block:
    """Nodes ``nodes`` compute ``output`` from ``input`` (and constants); ``params``: the
    initializers reconstruction may change."""

    input: ir.Value
    output: ir.Value
    nodes: list[ir.Node]
    params: list[ir.Value]
    channels: np.ndarray | None = None  # the teacher's channels of ``output`` (None: all)
    scale: tuple | None = None  # (s, axis): ``output`` is s[c] times the teacher's channel c

    @property
    def name(self) -> str:
        return f"{self.input.name} -> {self.output.name}"

    def as_student(self, y: np.ndarray) -> np.ndarray:
        """The teacher's ``output`` values ``y`` as the student should compute them: its kept
        channels, each times its scale (along :func:`onnxshrink.marks.channel_axis`)."""
        if self.channels is not None:
            y = y[:, self.channels]
        if self.scale is not None:
            s, axis = self.scale
            shape = [1] * y.ndim
            shape[axis] = -1
            y = (y * s.reshape(shape)).astype(y.dtype)
        return np.ascontiguousarray(y)


def live_cuts(model: ir.Model) -> list[tuple[int, ir.Value]]:
    """``(i, value)`` for each point after node ``i`` (-1: before the first) where ``value`` is
    the only live computed tensor."""
    nodes = list(model.graph)
    end = len(nodes)
    last: dict[int, int] = {}  # id(value) -> index of its last reader (end: a graph output)
    for i, node in enumerate(nodes):
        for v in node.inputs:
            if v is not None:
                last[id(v)] = i
    for v in model.graph.outputs:
        last[id(v)] = end
    live: dict[int, ir.Value] = {}
    cuts = []
    for v in model.graph.inputs:
        if v.const_value is None and last.get(id(v), -1) >= 0:
            live[id(v)] = v
    if len(live) == 1:
        cuts.append((-1, *live.values()))
    for i, node in enumerate(nodes):
        for v in node.inputs:
            if v is not None and last.get(id(v)) == i:
                live.pop(id(v), None)
        if node.op_type != "Constant":
            for v in node.outputs:
                if last.get(id(v), -1) > i and constant(v) is None:
                    live[id(v)] = v
        if len(live) == 1 and i < end - 1:
            cuts.append((i, *live.values()))
    outputs = [v for v in model.graph.outputs if v.producer() is not None]
    if len(model.graph.outputs) == 1 and outputs:
        cuts.append((end - 1, outputs[0]))
    return cuts


_CODES = (ir.DataType.INT8, ir.DataType.UINT8, ir.DataType.INT32)
_QDQ = ("QuantizeLinear", "DequantizeLinear")


def is_scale(value: ir.Value) -> bool:
    """An activation QuantizeLinear's scale (what :func:`_params` offers besides weights)."""
    return any(is_activation_q(u) and u.inputs[1] is value for u in value.consumers())


def _params(nodes: list[ir.Node]) -> list[ir.Value]:
    """Initializers only ``nodes`` read: float weights and biases of weight layers, the
    integer codes a DequantizeLinear reads (quantized weights and biases), and the scales of
    activation Q/DQ pairs (:mod:`onnxshrink.reconstruct.scales`)."""
    inside = {id(n) for n in nodes}
    out: dict[int, ir.Value] = {}
    for node in nodes:
        if node.domain not in ("", "ai.onnx"):
            continue
        if node.op_type in _WEIGHTED:
            wanted, slots = (ir.DataType.FLOAT,), node.inputs[1:3]
        elif node.op_type == "DequantizeLinear":
            wanted, slots = _CODES, node.inputs[:1]
        elif is_activation_q(node):
            wanted, slots = (ir.DataType.FLOAT,), node.inputs[1:2]  # an activation's scale
        else:
            continue
        for v in slots:
            if v is None or v.const_value is None or v.dtype not in wanted:
                continue
            users = v.consumers()
            ops = _QDQ if node.op_type == "QuantizeLinear" else (node.op_type,)
            if all(id(u) in inside and u.op_type in ops for u in users):
                out[id(v)] = v
    return list(out.values())


def find_blocks(
    model: ir.Model, shapes: dict[str, tuple], teacher_shapes: dict[str, tuple]
) -> list[Block]:
    """The blocks between consecutive cuts whose tensor the teacher has in the same shape, or
    whose pruned channels are known (``shapes``: the student's tensor shapes on one sample,
    without the batch axis; ``teacher_shapes`` the teacher's)."""
    nodes = list(model.graph)
    cuts = []
    for i, v in live_cuts(model):
        mine, theirs = shapes.get(v.name), teacher_shapes.get(v.name)
        if mine is None or theirs is None:
            continue
        if (scale := scale_of(v)) is not None and (
            not mine or scale[0].size != mine[0 if scale[1] == 1 else -1]
        ):
            continue  # rescaled, but not along an axis of this size: no known relation
        if mine == theirs:
            cuts.append((i, v, None, scale))
        elif (kept := kept_of(v)) is not None and len(mine) == len(theirs) >= 1:
            if mine == (len(kept), *theirs[1:]) and kept.max() < theirs[0]:
                cuts.append((i, v, kept, scale))
    blocks = []
    for (a, x, _, _), (b, y, kept, scale) in zip(cuts, cuts[1:]):
        inner = nodes[a + 1 : b + 1]
        blocks.append(Block(x, y, inner, _params(inner), kept, scale))
    return blocks


def merge(blocks: list[Block], span: int) -> list[Block]:
    """Consecutive blocks joined ``span`` at a time (a block without parameters joins the next
    without counting): a larger block can correct upstream errors its residual path carries."""
    out: list[Block] = []
    run: list[Block] = []
    for block in blocks:
        run.append(block)
        if sum(bool(b.params) for b in run) >= span:
            out.append(_join(run))
            run = []
    if run:
        out.append(_join(run))
    return out


def _join(run: list[Block]) -> Block:
    nodes = [n for b in run for n in b.nodes]
    params = [p for b in run for p in b.params]
    return Block(run[0].input, run[-1].output, nodes, params, run[-1].channels, run[-1].scale)

"""One record per op for channel pruning: how its channels propagate, and how it is cut.

``propagate(cg, node)`` (:mod:`~onnxshrink.analysis.channel_weights`,
:mod:`~onnxshrink.analysis.channel_layout`) follows channel groups through the op during
:func:`~onnxshrink.analysis.channels.analyze`; ``cut(ctx, node)`` (:mod:`~onnxshrink.analysis.cut`)
rewrites it once channels are removed (None: its shapes follow from its inputs). An op missing
here freezes every group that reaches it: the conservative default is the correct default.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from onnxshrink.analysis import channel_axes as axes
from onnxshrink.analysis import channel_layout as layout
from onnxshrink.analysis import channel_weights as weights
from onnxshrink.analysis import cut

__all__ = ["OPS", "OpRule"]


@dataclasses.dataclass(frozen=True)
class OpRule:
    propagate: Callable
    cut: Callable | None = None


_ELEMENTWISE = OpRule(layout.elementwise, cut.broadcast_consts)  # couple; slice constants
_PASS = OpRule(layout.passthrough)  # y[c] depends only on x[c]
_REDUCE = ("ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceProd", "ReduceL1")
_REDUCE += ("ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare")

OPS: dict[str, OpRule] = {
    # out channels start a group; in channels consume one (depthwise passes it on)
    "Conv": OpRule(weights.conv, cut.conv),
    "ConvTranspose": OpRule(weights.conv_transpose, cut.conv_transpose),  # W: [C_in, C_out/g, ..]
    "Gemm": OpRule(weights.gemm, cut.gemm),
    "MatMul": OpRule(weights.matmul, cut.matmul),
    # per-channel affine: scale, bias, mean and var sliced
    "BatchNormalization": OpRule(weights.batchnorm, cut.norm),
    "InstanceNormalization": OpRule(weights.batchnorm, cut.norm),
    "PRelu": OpRule(weights.prelu, cut.broadcast_consts),
    **dict.fromkeys(layout.UNARY, _PASS),
    **dict.fromkeys(("MaxPool", "AveragePool", "LpPool"), _PASS),
    **dict.fromkeys(("GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"), _PASS),
    **dict.fromkeys(_REDUCE, OpRule(axes.reduce)),  # over other axes
    **dict.fromkeys(("Softmax", "LogSoftmax", "Hardmax"), OpRule(axes.softmax)),  # other axes
    **dict.fromkeys(("Add", "Sub", "Mul", "Div", "Max", "Min", "Sum", "Mean"), _ELEMENTWISE),
    "Concat": OpRule(layout.concat),  # channel c of input k is channel offset_k + c
    "Split": OpRule(layout.split, cut.split),
    "Flatten": OpRule(layout.flatten),  # channel c -> features [c·HW, (c+1)·HW)
    "Reshape": OpRule(axes.reshape, axes.cut_reshape),  # channel axis kept whole, or flattened
    "Slice": OpRule(axes.slice_, axes.cut_slice),  # a window of the channels: bounds rewritten
    "Transpose": OpRule(axes.transpose),
    "Squeeze": OpRule(axes.squeeze),
    "Unsqueeze": OpRule(axes.squeeze),
    "Shape": OpRule(axes.shape),  # passes when only other dims are read
    "Pad": OpRule(layout.pad),
    "Resize": OpRule(layout.resize, cut.resize),
    "Upsample": OpRule(layout.resize, cut.resize),
}

"""ONNX ops as PyTorch functions: a small table for the blocks ``reconstruct`` trains.

Each entry takes the node and its inputs (torch tensors; None for an omitted optional input)
and returns its outputs, computing what the ONNX operator computes in float32 -- Conv with
explicit pads (asymmetric ones through ``F.pad``), groups, strides and dilations; ConvTranspose
cropped by its pads; Gemm with alpha, beta and transposes; Clip with its min/max inputs;
Flatten and Reshape with ONNX's axis and 0-means-copy rules; Softmax before opset 13 on its
2-D view. tests/test_torch_ops.py checks every entry against onnxruntime to 1e-5. An op that
is not here, or an attribute form an entry does not handle (``auto_pad``, Reshape's
``allowzero``), raises :class:`Unsupported`: the block is left as it is, with that reason.
QuantizeLinear gives its integer codes as floats (rounded half to even, the gradient straight
through), DequantizeLinear reads them back. Tensor plumbing (Split, Slice, Resize, shape
arithmetic) is in :mod:`onnxshrink.reconstruct.torch_shape_ops`. Not a general converter: the
ops of convolutional classifiers and detectors, transformer MLPs, QDQ.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
import onnx_ir as ir
import torch
import torch.nn.functional as F

from onnxshrink.reconstruct import Unsupported
from onnxshrink.reconstruct.torch_shape_ops import SHAPE_OPS, ints, pad

__all__ = ["OPS", "Unsupported", "code_range", "per_axis", "round_ste", "run_node"]


def _spatial(node: ir.Node, nd: int):
    if node.attributes.get_string("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        raise Unsupported(f"{node.op_type} with auto_pad")
    pads = ints(node, "pads", [0] * 2 * nd)
    strides = ints(node, "strides", [1] * nd)
    dilations = ints(node, "dilations", [1] * nd)
    return pads, strides, dilations


def _conv(node, x, w, b=None):
    nd = w.dim() - 2
    if nd not in (1, 2, 3):
        raise Unsupported(f"Conv over {nd} spatial axes")
    pads, strides, dilations = _spatial(node, nd)
    conv = (F.conv1d, F.conv2d, F.conv3d)[nd - 1]
    group = node.attributes.get_int("group", 1)
    return [conv(pad(x, pads), w, b, strides, 0, dilations, group)]


def _conv_transpose(node, x, w, b=None):
    """PyTorch pads nothing; ONNX's ``pads`` then crop the output, each side its own."""
    nd = w.dim() - 2
    if nd not in (1, 2, 3) or node.attributes.get("output_shape") is not None:
        raise Unsupported(f"ConvTranspose over {nd} axes or with output_shape")
    pads, strides, dilations = _spatial(node, nd)
    extra = ints(node, "output_padding", [0] * nd)
    conv = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[nd - 1]
    y = conv(x, w, b, strides, 0, extra, node.attributes.get_int("group", 1), dilations)
    crop = [slice(pads[i], y.shape[2 + i] - pads[i + nd]) for i in range(nd)]
    return [y[(slice(None), slice(None), *crop)]]


def _gemm(node, a, b, c=None):
    if node.attributes.get_int("transA", 0):
        a = a.t()
    if node.attributes.get_int("transB", 0):
        b = b.t()
    y = node.attributes.get_float("alpha", 1.0) * (a @ b)
    if c is not None:
        y = y + node.attributes.get_float("beta", 1.0) * c
    return [y]


def _clip(node, x, lo=None, hi=None):
    if node.attributes.get("min") is not None or node.attributes.get("max") is not None:
        raise Unsupported("Clip with min/max attributes (opset < 11)")
    return [torch.clamp(x, lo, hi)]


def _pool(node, x):
    nd = x.dim() - 2
    kernel = ints(node, "kernel_shape")
    pads, strides, dilations = _spatial(node, nd)
    if node.attributes.get_int("ceil_mode", 0):
        raise Unsupported(f"{node.op_type} with ceil_mode")
    if node.op_type == "MaxPool":
        if len(node.outputs) > 1 and node.outputs[1].name:
            raise Unsupported("MaxPool with indices")
        pool = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[nd - 1]
        return [pool(pad(x, pads, float("-inf")), kernel, strides, 0, dilations)]
    if any(d != 1 for d in dilations):
        raise Unsupported("AveragePool with dilations")
    pool = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[nd - 1]
    if not node.attributes.get_int("count_include_pad", 0) and any(pads):
        ones = pad(torch.ones_like(x[:1, :1]), pads)
        return [pool(pad(x, pads), kernel, strides) / pool(ones, kernel, strides)]
    return [pool(pad(x, pads), kernel, strides)]


def _flatten(node, x):
    axis = node.attributes.get_int("axis", 1) % max(x.dim(), 1)
    lead = int(np.prod(x.shape[:axis])) if axis else 1
    return [x.reshape(lead, -1)]


def _reshape(node, x, shape):
    if node.attributes.get_int("allowzero", 0):
        raise Unsupported("Reshape with allowzero")
    dims = [x.shape[i] if d == 0 else int(d) for i, d in enumerate(shape.tolist())]
    return [x.reshape(dims)]


def _batchnorm(node, x, scale, bias, mean, var):
    eps = node.attributes.get_float("epsilon", 1e-5)
    if len([o for o in node.outputs if o.name]) > 1:
        raise Unsupported("BatchNormalization in training mode")
    return [F.batch_norm(x, mean, var, scale, bias, False, 0.0, eps)]


def _layernorm(node, x, scale, bias=None):
    axis = node.attributes.get_int("axis", -1) % x.dim()
    eps = node.attributes.get_float("epsilon", 1e-5)
    return [F.layer_norm(x, x.shape[axis:], scale, bias, eps)]


def _gelu(node, x):
    return [F.gelu(x, approximate=node.attributes.get_string("approximate", "none"))]


def _hardsigmoid(node, x):
    alpha = node.attributes.get_float("alpha", 0.2)
    beta = node.attributes.get_float("beta", 0.5)
    return [torch.clamp(alpha * x + beta, 0.0, 1.0)]


def _softmax(node, x):
    if not _opset_below_13(node):
        return [torch.softmax(x, node.attributes.get_int("axis", -1))]
    axis = node.attributes.get_int("axis", 1)
    flat = x.reshape(int(np.prod(x.shape[: axis % x.dim()])), -1)  # coerced to 2-D (axis 1)
    return [torch.softmax(flat, 1).reshape(x.shape)]


def _concat(node, *xs):
    return [torch.cat(xs, node.attributes.get_int("axis"))]


def _transpose(node, x):
    perm = ints(node, "perm", list(reversed(range(x.dim()))))
    return [x.permute(perm)]


def _reduce(f: Callable) -> Callable:
    def reduce(node, x, axes=None):
        axes = ints(node, "axes") if axes is None else np.asarray(axes).ravel().tolist()
        if not axes and node.attributes.get_int("noop_with_empty_axes", 0):
            return [x]
        dims = list(range(x.dim())) if not axes else [int(a) % x.dim() for a in axes]
        return [f(x, dims, keepdim=bool(node.attributes.get_int("keepdims", 1)))]

    return reduce


def _prelu(node, x, slope):
    return [torch.where(x >= 0, x, x * slope)]


def _constant(node):
    attr = node.attributes.get("value")
    if attr is None:
        raise Unsupported("Constant without a tensor 'value'")
    return [torch.from_numpy(np.array(attr.as_tensor().numpy()))]


def round_ste(x):
    """Round half to even (as QuantizeLinear), with the gradient of the identity (the
    straight-through estimator), so what feeds a rounding can be trained."""
    return x + (torch.round(x) - x).detach()


def code_range(zero_point) -> tuple[float, float]:
    """The integer range of a quantized type, from its zero point's dtype (uint8 by default)."""
    dtype = torch.uint8 if zero_point is None else zero_point.dtype
    info = torch.iinfo(dtype) if not dtype.is_floating_point else torch.iinfo(torch.uint8)
    return float(info.min), float(info.max)


def per_axis(node, t, x):
    """A scale or zero point broadcast along the op's ``axis`` of ``x`` (1-D: per channel)."""
    if t is None or t.dim() == 0 or t.numel() == 1:
        return t.reshape(()) if t is not None else None
    axis = node.attributes.get_int("axis", 1) % x.dim()
    return t.reshape([-1 if i == axis else 1 for i in range(x.dim())])


def _quantize(node, x, scale, zero_point=None):
    if node.attributes.get_int("block_size", 0):
        raise Unsupported("blocked QuantizeLinear")
    lo, hi = code_range(zero_point)
    zp = torch.zeros(()) if zero_point is None else per_axis(node, zero_point, x).float()
    # saturated before rounding too: ±inf (a Reciprocal of 0) gives a bound, not inf − inf = NaN
    steps = torch.clamp(x / per_axis(node, scale, x), lo - zp, hi - zp)
    return [torch.clamp(round_ste(steps) + zp, lo, hi)]  # the codes, as floats, for the DQ


def _dequantize(node, q, scale, zero_point=None):
    if node.attributes.get_int("block_size", 0):
        raise Unsupported("blocked DequantizeLinear")
    q = q.float()
    zp = 0.0 if zero_point is None else per_axis(node, zero_point, q).float()
    return [(q - zp) * per_axis(node, scale, q)]


def _unary(f: Callable) -> Callable:
    return lambda node, x: [f(x)]


def _binary(f: Callable) -> Callable:
    return lambda node, a, b: [f(a, b)]


OPS: dict[str, Callable] = {
    "Conv": _conv,
    "ConvTranspose": _conv_transpose,
    "Gemm": _gemm,
    "MatMul": _binary(torch.matmul),
    "Add": _binary(torch.add),
    "Sub": _binary(torch.sub),
    "Mul": _binary(torch.mul),
    "Div": _binary(torch.div),
    "Pow": _binary(torch.pow),
    "Max": lambda node, *xs: [functools.reduce(torch.maximum, xs)],
    "Min": lambda node, *xs: [functools.reduce(torch.minimum, xs)],
    "Neg": _unary(torch.neg),
    "Abs": _unary(torch.abs),
    "Exp": _unary(torch.exp),
    "Log": _unary(torch.log),
    "Reciprocal": _unary(torch.reciprocal),
    "Softplus": _unary(F.softplus),
    "LeakyRelu": lambda node, x: [F.leaky_relu(x, node.attributes.get_float("alpha", 0.01))],
    "PRelu": _prelu,
    "Relu": _unary(torch.relu),
    "Sigmoid": _unary(torch.sigmoid),
    "Tanh": _unary(torch.tanh),
    "Erf": _unary(torch.erf),
    "Sqrt": _unary(torch.sqrt),
    "HardSwish": _unary(F.hardswish),
    "HardSigmoid": _hardsigmoid,
    "Gelu": _gelu,
    "Clip": _clip,
    "BatchNormalization": _batchnorm,
    "LayerNormalization": _layernorm,
    "MaxPool": _pool,
    "AveragePool": _pool,
    "GlobalAveragePool": lambda node, x: [x.mean(list(range(2, x.dim())), keepdim=True)],
    "GlobalMaxPool": lambda node, x: [x.amax(list(range(2, x.dim())), keepdim=True)],
    "ReduceMean": _reduce(torch.mean),
    "ReduceSum": _reduce(torch.sum),
    "ReduceMax": _reduce(torch.amax),
    "Flatten": _flatten,
    "Reshape": _reshape,
    "Transpose": _transpose,
    "Concat": _concat,
    "Softmax": _softmax,
    "Identity": _unary(lambda x: x),
    "Constant": _constant,
    "QuantizeLinear": _quantize,
    "DequantizeLinear": _dequantize,
    **SHAPE_OPS,
}


def run_node(node: ir.Node, inputs: list) -> list:
    """The node's outputs from its inputs (torch tensors, None where omitted)."""
    if node.domain not in ("", "ai.onnx") or node.op_type not in OPS:
        raise Unsupported(f"no PyTorch form for {node.domain or 'ai.onnx'}::{node.op_type}")
    return OPS[node.op_type](node, *inputs)


def _opset_below_13(node: ir.Node) -> bool:
    graph = node.graph
    model_opset = graph.opset_imports.get("", 13) if graph is not None else 13
    return (node.version or model_opset) < 13

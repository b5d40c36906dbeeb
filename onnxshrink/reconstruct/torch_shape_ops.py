"""ONNX's tensor plumbing as PyTorch functions: the second half of reconstruct's op table.

:mod:`onnxshrink.reconstruct.torch_ops` computes the layers and their arithmetic; this module
moves, cuts and resizes tensors -- Split (C2f blocks of YOLO detectors), Slice with positive
steps, Squeeze / Unsqueeze, Resize over the spatial axes (nearest in the asymmetric / floor
form exporters write, or half-pixel / round up; linear with half-pixel or aligned corners),
Pad, Expand -- and evaluates the integer shape arithmetic exporters write in front of a
Reshape (Shape, Gather, Cast, ConstantOfShape, Range, Equal, Where) on each batch, as
onnxruntime does. Any other form raises :class:`~onnxshrink.reconstruct.Unsupported` saying
which; tests/test_torch_ops.py checks each entry against onnxruntime to 1e-5.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import torch
import torch.nn.functional as F

from onnxshrink.reconstruct import Unsupported

__all__ = ["SHAPE_OPS", "ints", "pad"]


def ints(node: ir.Node, name: str, default=None):
    """A list-of-ints attribute, or ``default`` when the node has none."""
    attr = node.attributes.get(name)
    return default if attr is None else list(attr.as_ints())


def pad(x, pads: list[int], value: float = 0.0, mode: str = "constant"):
    """ONNX pads [b1, b2, .., e1, e2, ..] (for the last len(pads) / 2 axes): ``F.pad`` takes
    the last axis first."""
    nd = len(pads) // 2
    if not any(pads):
        return x
    flat = [p for i in reversed(range(nd)) for p in (pads[i], pads[i + nd])]
    return F.pad(x, flat, mode=mode, value=value if mode == "constant" else None)


def _axes(node: ir.Node, given, rank: int) -> list[int] | None:
    """Axes from the input (opset 13+) or the attribute, made non-negative against ``rank``."""
    axes = ints(node, "axes") if given is None else [int(a) for a in given.reshape(-1).tolist()]
    return None if axes is None else [a % rank for a in axes]


def _split(node, x, split=None):
    axis = node.attributes.get_int("axis", 0) % x.dim()
    n = len(node.outputs)
    sizes = ints(node, "split") if split is None else [int(s) for s in split.tolist()]
    if sizes is None:  # equal parts; since opset 18 the last may be smaller
        sizes = -(-x.shape[axis] // n)
    return list(torch.split(x, sizes, axis))


def _slice(node, x, starts, ends, axes=None, steps=None):
    axes = list(range(len(starts))) if axes is None else [int(a) for a in axes.tolist()]
    steps = [1] * len(axes) if steps is None else [int(s) for s in steps.tolist()]
    if any(s <= 0 for s in steps):
        raise Unsupported("Slice with a negative step")
    index = [slice(None)] * x.dim()
    for a, b, e, s in zip(axes, starts.tolist(), ends.tolist(), steps):
        index[a % x.dim()] = slice(int(b), int(e), s)  # Python's clamping is ONNX's (steps > 0)
    return [x[tuple(index)]]


def _squeeze(node, x, axes=None):
    axes = _axes(node, axes, x.dim())
    if axes is None:
        return [x.squeeze()]
    return [x.squeeze(tuple(axes))]


def _unsqueeze(node, x, axes=None):
    rank = x.dim() + len(_axes(node, axes, 1 << 30) or [])
    for a in sorted(_axes(node, axes, rank)):
        x = x.unsqueeze(a)
    return [x]


_NEAREST = {  # (coordinate_transformation_mode, nearest_mode) -> interpolate's mode
    ("asymmetric", "floor"): "nearest",
    ("half_pixel", "round_prefer_ceil"): "nearest-exact",
}
_LINEAR = {"half_pixel": False, "pytorch_half_pixel": False, "align_corners": True}


def _resize(node, x, roi=None, scales=None, sizes=None):
    attr = node.attributes
    mode = attr.get_string("mode", "nearest")
    coord = attr.get_string("coordinate_transformation_mode", "half_pixel")
    key = (coord, attr.get_string("nearest_mode", "round_prefer_floor"))
    if attr.get_int("antialias", 0) or attr.get("axes") is not None:
        raise Unsupported("Resize with antialias or axes")
    if mode == "nearest" and key not in _NEAREST:
        raise Unsupported(f"Resize nearest with {key[0]} / {key[1]}")
    if mode != "nearest" and (mode != "linear" or coord not in _LINEAR or x.dim() > 5):
        raise Unsupported(f"Resize {mode} with {coord}")
    if scales is not None and scales.numel():
        if scales[:2].tolist() != [1.0, 1.0]:
            raise Unsupported("Resize over the batch or channel axis")
        how = {"scale_factor": [float(s) for s in scales[2:].tolist()]}
    elif sizes is not None and sizes.numel():
        if sizes[:2].tolist() != list(x.shape[:2]):
            raise Unsupported("Resize over the batch or channel axis")
        how = {"size": [int(s) for s in sizes[2:].tolist()]}
    else:
        raise Unsupported("Resize without scales or sizes")
    if mode == "nearest":
        return [F.interpolate(x, mode=_NEAREST[key], **how)]
    if coord == "pytorch_half_pixel" and 1 in how.get("size", []):
        raise Unsupported("Resize pytorch_half_pixel to length 1")
    kind = ("linear", "bilinear", "trilinear")[x.dim() - 3]
    return [F.interpolate(x, mode=kind, align_corners=_LINEAR[coord], **how)]


def _pad_op(node, x, pads=None, value=None, axes=None):
    if axes is not None:
        raise Unsupported("Pad with axes")
    pads = ints(node, "pads") if pads is None else [int(p) for p in pads.tolist()]
    mode = node.attributes.get_string("mode", "constant")
    nd = len(pads) // 2
    if mode == "constant":
        fill = node.attributes.get_float("value", 0.0) if value is None else float(value)
        return [pad(x, pads, fill)]
    if mode in ("reflect", "edge") and not any(pads[:2] + pads[nd : nd + 2]):
        spatial = pads[2:nd] + pads[nd + 2 :]  # F.pad reflects / replicates only those
        return [pad(x, spatial, mode={"edge": "replicate"}.get(mode, mode))]
    raise Unsupported(f"Pad {mode} over the batch or channel axis")


def _shape(node, x):
    shape = list(x.shape)
    start = node.attributes.get_int("start", 0)
    end = node.attributes.get("end")
    return [torch.tensor(shape[start : None if end is None else end.as_int()], dtype=torch.int64)]


def _gather(node, data, indices):
    axis = node.attributes.get_int("axis", 0) % data.dim()
    return [data[(slice(None),) * axis + (indices.long(),)]]


_DTYPES = {
    onnx.TensorProto.FLOAT: torch.float32,
    onnx.TensorProto.INT64: torch.int64,
    onnx.TensorProto.INT32: torch.int32,
    onnx.TensorProto.BOOL: torch.bool,
}


def _cast(node, x):
    to = node.attributes.get_int("to")
    if to not in _DTYPES:
        raise Unsupported(f"Cast to {onnx.TensorProto.DataType.Name(to)}")
    return [x.to(_DTYPES[to])]


def _constant_of_shape(node, shape):
    attr = node.attributes.get("value")
    fill = torch.zeros(1) if attr is None else torch.from_numpy(np.array(attr.as_tensor().numpy()))
    return [fill.reshape(()).expand([int(d) for d in shape.tolist()]).clone()]


def _expand(node, x, shape):
    dims = [int(d) for d in shape.tolist()]
    rank = max(len(dims), x.dim())
    dims = [1] * (rank - len(dims)) + dims
    have = [1] * (rank - x.dim()) + list(x.shape)
    return [x.reshape(have).expand([max(d, h) for d, h in zip(dims, have)])]


SHAPE_OPS = {
    "Split": _split,
    "Slice": _slice,
    "Squeeze": _squeeze,
    "Unsqueeze": _unsqueeze,
    "Resize": _resize,
    "Pad": _pad_op,
    "Shape": _shape,
    "Gather": _gather,
    "Cast": _cast,
    "ConstantOfShape": _constant_of_shape,
    "Expand": _expand,
    "Range": lambda node, start, limit, delta: [torch.arange(start, limit, delta)],
    "Equal": lambda node, a, b: [torch.eq(a, b)],
    "Where": lambda node, c, a, b: [torch.where(c, a, b)],
}

"""What int8 QDQ quantization covers, decided without changing the model, and the int8 weight
grid.

:func:`plan_quantization` walks the graph once: *compute* ops (``COMPUTE_OPS``) get quantized
inputs and output; *scale-preserving* ops take their input's parameters (``share``); a Concat's
inputs and output share one range; a Relu / Clip(min >= 0) that is the only reader of a Conv,
Gemm, MatMul or Add output is *fused* (its range used for the op's output, the node removed at
rewrite); a Gemm / MatMul that feeds no quantized op keeps a float output; a Concat whose inputs'
ranges differ more than MIXED_RANGES times (a detector's boxes in pixels next to its class
scores) stays float, its inputs each on their own scale; an Add / Mul computing a normaliser's
denominator stays float (:mod:`onnxshrink.analysis.denominators`). Weights are int8,
symmetric, per output channel (:func:`weight_axis`; MatMul per tensor), scale max|w| / 127 or
the MSE-best clipping (:func:`quantize_weight`).

*Linear* scope (``linear=True``, attention models: :func:`attention_like`): only MatMul/Gemm
with constant weights are quantized -- their input (Q -> DQ for them alone; the residual stream
and every other reader keep the float tensor) and their weight, per output column -- and their
output stays float (onnxruntime's MatMulIntegerToFloat / QGemm); attention MatMuls of two
activations, Softmax, LayerNorm, GELU and the residual Adds stay float.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from onnxshrink.analysis.denominators import denominator_ops
from onnxshrink.irtools import const_array, weight_users_outside

__all__ = [
    "COMPUTE_OPS",
    "WEIGHTED_OPS",
    "QuantPlan",
    "attention_like",
    "plan_quantization",
    "quantize_weight",
    "stem_layers",
    "weight_axis",
    "weight_scale",
]

COMPUTE_OPS = {
    "Conv",
    "ConvTranspose",
    "Gemm",
    "MatMul",
    "Add",
    "Mul",
    "AveragePool",
    "GlobalAveragePool",
    "Concat",
}
SHARE_OPS = {"MaxPool", "Resize", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze"}
WEIGHTED_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul"}
MIXED_RANGES = 16  # a Concat whose narrowest input is this many times narrower stays float
_FUSABLE = {"Conv", "ConvTranspose", "Gemm", "MatMul", "Add"}


def _data_inputs(node: ir.Node) -> list[ir.Value]:
    """The activation inputs a quantized node reads (constants and shape inputs excluded)."""
    if node.op_type in (
        "Conv",
        "ConvTranspose",
        "Gemm",
        "Reshape",
        "Resize",
        "Squeeze",
        "Unsqueeze",
    ):
        return [node.inputs[0]]
    return [v for v in node.inputs if v is not None and const_array(v) is None]


def _fusable_activation(node: ir.Node) -> ir.Node | None:
    """The Relu / Clip(min >= 0) that is the only reader of ``node``'s output, if any."""
    out = node.outputs[0]
    if out.is_graph_output() or len(out.uses()) != 1:
        return None
    act = out.consumers()[0]
    if act.outputs[0].is_graph_output():  # its name and float type are the model's output
        return None
    if act.op_type == "Relu":
        return act
    if act.op_type == "Clip":
        if len(act.inputs) > 1 and act.inputs[1] is not None:
            lo = const_array(act.inputs[1])
        else:
            lo = act.attributes.get_float("min", None)
        if lo is not None and float(np.asarray(lo)) >= 0.0:
            return act
    return None


@dataclasses.dataclass
class QuantPlan:
    """What gets quantized: nodes, tensors (with the tensor whose range they use), fusions."""

    nodes: list[ir.Node]
    tensors: dict[str, str]  # quantized tensor -> tensor (float model) its range comes from
    share: dict[str, str]  # tensor -> tensor whose parameters it reuses (scale-preserving ops)
    concat: list[list[str]]  # tensors that must share one scale
    fused: list[tuple[ir.Node, ir.Node]]  # (compute node, activation removed)
    float_out: set[str]  # outputs of Gemm/MatMul left float
    inputs: dict[str, tuple[str, str]]  # Conv/Gemm node name -> (float input, quantized input)
    float_concat: dict[str, str] = dataclasses.field(default_factory=dict)  # output -> why
    linear: bool = False  # linear scope: Q -> DQ reaches the planned readers only

    def params(self, ranges: dict[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
        """Each quantized tensor's range: its source's, unified over a Concat, shared through
        scale-preserving ops. Tensors whose source was not calibrated are dropped (float)."""
        for t in [t for t, src in self.tensors.items() if src not in ranges]:
            self.tensors.pop(t)
        params = {t: ranges[src] for t, src in self.tensors.items()}
        self.float_concat = {}
        for group in self.concat:
            inside = [t for t in group if t in params]
            if not inside:
                continue
            lo, hi = min(params[t][0] for t in inside), max(params[t][1] for t in inside)
            narrowest = min(params[t][1] - params[t][0] for t in inside)
            if narrowest * MIXED_RANGES < hi - lo:  # one scale would leave it < 16 levels
                out = group[-1]
                self.tensors.pop(out, None)
                params.pop(out, None)
                self.float_concat[out] = (
                    f"joins ranges {narrowest:.3g} and {hi - lo:.3g} wide: one int8 scale "
                    f"would leave the narrowest fewer than {256 // MIXED_RANGES} levels; left float"
                )
                continue
            for t in inside:
                params[t] = (lo, hi)
        for t, src in self.share.items():
            if t in params:
                params[t] = params.get(src, params[t])
        return params


_PREPROCESS = {"Sub", "Div", "Mul", "Add", "Transpose", "Cast"}


def input_chain(value: ir.Value) -> list[ir.Node] | None:
    """The in-graph preprocessing between a graph input and ``value``: a chain of
    ``_PREPROCESS`` nodes (normalisation by constants, layout, dtype), each with one non-constant
    input and its output read only by the next; ``[]`` when ``value`` is a graph input, None when
    it does not come from one that way."""
    chain: list[ir.Node] = []
    while not value.is_graph_input():
        node = value.producer()
        if node is None or node.op_type not in _PREPROCESS or node.domain not in ("", "ai.onnx"):
            return None
        varying = [v for v in node.inputs if v is not None and const_array(v) is None]
        if len(varying) != 1 or len(value.uses()) != 1 or value.is_graph_output():
            return None
        chain.append(node)
        value = varying[0]
    return chain


def stem_layers(plan: QuantPlan, *, rule: bool = True) -> list[ir.Node]:
    """The planned layers of the model's *stem*: a non-grouped Conv that reads a graph input
    (directly or through in-graph preprocessing, :func:`input_chain`, whose quantized nodes join
    the stem), with the depthwise Convs that alone read its output (directly or through its fused
    Relu / Clip) -- the layers that see the image at full resolution.

    With ``rule`` only the stems where int8 loses on onnxruntime's CPU kernels (option
    ``stem``; the timings in docs/design.md): at most 4 input channels (an image), and only
    quantized compute ops reading the output (after a float stem onnxruntime would run a
    MaxPool on uint8 NCHW, far slower than NHWC). Something quantized must follow, or the stem
    stays as it is.
    """
    planned = {id(n) for n in plan.nodes}
    fused = {id(c): a for c, a in plan.fused}
    stem = []
    for node in plan.nodes:
        if (
            node.op_type != "Conv"
            or node.attributes.get_int("group", 1) != 1
            or node.inputs[0] is None
        ):
            continue
        chain = input_chain(node.inputs[0])
        if chain is None:
            continue
        w = const_array(node.inputs[1])
        out = fused[id(node)].outputs[0] if id(node) in fused else node.outputs[0]
        readers = out.consumers()
        if w is None or out.is_graph_output() or not readers:
            continue
        if rule and (
            w.shape[1] > 4
            or any(id(r) not in planned or r.op_type not in COMPUTE_OPS for r in readers)
        ):
            continue
        stem.extend(n for n in reversed(chain) if id(n) in planned)
        stem.append(node)
        if all(
            r.op_type == "Conv"
            and id(r) in planned
            and r.inputs[0] is out
            and r.attributes.get_int("group", 1) == w.shape[0]
            for r in readers
        ):
            stem.extend(readers)
    return stem


def plan_quantization(
    model: ir.Model,
    exclude: set[str],
    exclude_types: set[str],
    dtypes: dict[str, ir.DataType] | None = None,
    *,
    linear: bool = False,
) -> tuple[QuantPlan, list[tuple[ir.Node, str]]]:
    """Decides what to quantize (no change to the model). Returns the plan and refusals.
    ``dtypes`` (value -> element type, e.g. inferred) completes the types the model leaves out;
    ``linear``: the linear scope (module docstring)."""
    if linear:
        return _linear_plan(model, exclude, exclude_types, dtypes or {})
    refused = []
    denominators = denominator_ops(model)
    nodes, tensors, share, concat, fused = [], {}, {}, [], []
    inputs: dict[str, tuple[str, str]] = {}
    quantized: set[str] = set()
    alias: dict[str, str] = {}  # output of a fused activation -> output of the op it is fused into
    for node in model.graph:
        op = node.op_type
        if node.domain not in ("", "ai.onnx") or (op not in COMPUTE_OPS and op not in SHARE_OPS):
            continue
        if node.name in exclude or op in exclude_types:
            refused.append((node, "excluded by option"))
            continue
        if op in WEIGHTED_OPS:
            if reason := _weight_refusal(node):
                refused.append((node, reason))
                continue
        if reason := _not_float(node, dtypes or {}) or denominators.get(id(node)):
            refused.append((node, reason))
            continue
        data_in = [alias.get(v.name, v.name) for v in _data_inputs(node)]
        if op in SHARE_OPS:
            if not data_in or data_in[0] not in quantized:
                continue  # only worth it between quantized ops
            nodes.append(node)
            out = node.outputs[0].name
            tensors[out] = out
            share[out] = data_in[0]
            quantized.add(out)
            continue
        nodes.append(node)
        if op in ("Conv", "Gemm"):
            inputs[node.name] = (node.inputs[0].name, data_in[0])
        for name in data_in:
            tensors.setdefault(name, name)
            quantized.add(name)
        out = node.outputs[0]
        source = out.name
        if op in _FUSABLE and (act := _fusable_activation(node)) is not None:
            fused.append((node, act))
            source = act.outputs[0].name
            alias[source] = out.name
        tensors[out.name] = source
        quantized.add(out.name)
        if op == "Concat":
            concat.append(data_in + [out.name])
    # A Gemm / MatMul whose output no quantized op reads keeps a float output (QGemm /
    # MatMulIntegerToFloat): no Q after it, and its activation (if any) stays a float op.
    qnames = {id(n) for n in nodes}
    fused_by = {id(n): act for n, act in fused}
    float_out = set()
    for node in nodes:
        if node.op_type not in ("Gemm", "MatMul"):
            continue
        act = fused_by.get(id(node))
        out = act.outputs[0] if act is not None else node.outputs[0]
        if not any(id(u) in qnames for u in out.consumers()):
            float_out.add(node.outputs[0].name)
            tensors.pop(node.outputs[0].name, None)
            fused = [(n, a) for n, a in fused if n is not node]
    return QuantPlan(nodes, tensors, share, concat, fused, float_out, inputs), refused


def _linear_plan(model, exclude, exclude_types, dtypes) -> tuple[QuantPlan, list]:
    """The linear scope's plan: MatMul/Gemm with constant weights, float outputs."""
    nodes, tensors, refused = [], {}, []
    for node in model.graph:
        if node.op_type not in ("MatMul", "Gemm") or node.domain not in ("", "ai.onnx"):
            continue
        if node.name in exclude or node.op_type in exclude_types:
            refused.append((node, "excluded by option"))
        elif node.op_type == "MatMul" and const_array(node.inputs[1]) is None:
            refused.append((node, "MatMul of two activations (attention) left float"))
        elif reason := _weight_refusal(node) or _not_float(node, dtypes):
            refused.append((node, reason))
        else:
            nodes.append(node)
            tensors.setdefault(node.inputs[0].name, node.inputs[0].name)
    inputs = {n.name: (n.inputs[0].name, n.inputs[0].name) for n in nodes if n.op_type == "Gemm"}
    float_out = {n.outputs[0].name for n in nodes}
    return QuantPlan(nodes, tensors, {}, [], [], float_out, inputs, linear=True), refused


def attention_like(model: ir.Model) -> bool:
    """A transformer-style graph: a LayerNormalization, or a MatMul of two activations."""
    for node in model.graph:
        if node.op_type == "LayerNormalization":
            return True
        if node.op_type == "MatMul" and all(const_array(v) is None for v in node.inputs[:2]):
            return True
    return False


def _not_float(node: ir.Node, dtypes: dict[str, ir.DataType]) -> str | None:
    """Only float32 tensors are quantized: shape arithmetic on int64, bool masks and float16
    stay as they are (a Q on an integer tensor is not even a valid model)."""
    for v in [*_data_inputs(node), *node.outputs[:1]]:
        dtype = v.dtype or dtypes.get(v.name)
        if dtype is not None and dtype != ir.DataType.FLOAT:
            return f"{node.op_type} on a {dtype.name.lower()} tensor: only float32 is quantized"
    return None


def _weight_refusal(node: ir.Node) -> str | None:
    op = node.op_type
    w = node.inputs[1] if len(node.inputs) > 1 else None
    if op == "MatMul" and (w is None or const_array(w) is None):
        return None  # activation x activation: both inputs are quantized as activations
    if w is None or const_array(w) is None:
        return f"{op} weight is not constant"
    if weight_users_outside(w, node):
        return f"{op} weight is shared with another node"
    if op == "ConvTranspose" and node.attributes.get_int("group", 1) != 1:
        return "grouped ConvTranspose is left float"
    if op == "Gemm" and node.attributes.get_int("transA", 0):
        return "Gemm with transA=1 is left float"
    return None


def quantize_weight(
    w: np.ndarray, axis: int, method: str = "minmax", pairs=None
) -> tuple[np.ndarray, np.ndarray]:
    """(per-channel scale, int8 weights): symmetric int8 along ``axis`` (all other axes reduced).

    With ``pairs`` (:func:`onnxshrink.analysis.saturation.pairs`) no channel's scale is below
    its largest pair sum / 128, so the integer kernels cannot saturate before rounding (``mse``
    measures each candidate after :func:`~onnxshrink.analysis.saturation.make_safe`)."""
    from onnxshrink.analysis.saturation import make_safe, pair_scale

    w = np.asarray(w, np.float64)
    w64 = np.moveaxis(w, axis, 0)
    flat = w64.reshape(w64.shape[0], -1)
    amax = np.abs(flat).max(1)
    floor = pair_scale(w, pairs, axis)
    shape = [1] * w.ndim
    shape[axis] = -1
    if method == "mse":
        best = np.maximum(amax / 127.0, floor)
        best_err = np.full(len(amax), np.inf)
        for frac in np.linspace(0.5, 1.0, 51):
            s = np.maximum(amax * frac / 127.0, floor)
            s = np.where(s > 0, s, 1.0)
            q = np.clip(np.round(w / s.reshape(shape)), -127, 127)
            if pairs is not None:
                q = make_safe(q, w / s.reshape(shape), pairs)[0]
            err = (
                np.square(np.moveaxis(q * s.reshape(shape) - w, axis, 0)).reshape(len(s), -1).sum(1)
            )
            better = err < best_err
            best[better], best_err[better] = s[better], err[better]
        scale = best
    else:
        scale = np.maximum(amax / 127.0, floor)
    scale = np.where(scale > 0, scale, 1.0)
    q = np.clip(np.round(w / scale.reshape(shape)), -127, 127).astype(np.int8)
    return scale.astype(np.float32), q


def weight_scale(w: np.ndarray, axis: int | None, method: str = "minmax", pairs=None):
    """The symmetric int8 scale of a weight: per channel along ``axis`` (:func:`quantize_weight`),
    or one float32 scalar max(max|w| / 127, largest pair sum / 128) for the whole tensor."""
    if axis is not None:
        return quantize_weight(w, axis, method, pairs)[0]
    from onnxshrink.analysis.saturation import pair_scale

    amax = max(float(np.abs(w).max()) / 127.0, pair_scale(w, pairs, None))
    return np.float32(amax if amax > 0 else 1.0)


def weight_axis(node: ir.Node, matmul_columns: bool = False) -> int | None:
    """Output-channel axis of the weight of a quantized node (None: per-tensor); a 2-D MatMul
    weight per column with ``matmul_columns`` (the linear scope: MatMulIntegerToFloat)."""
    if node.op_type == "MatMul" and matmul_columns and len(node.inputs[1].shape or ()) == 2:
        return 1
    if node.op_type == "Conv":
        return 0
    if node.op_type == "ConvTranspose":
        return 1
    if node.op_type == "Gemm":
        return 0 if node.attributes.get_int("transB", 0) else 1
    return None  # MatMul: per-tensor (the safe form for onnxruntime's integer MatMul)

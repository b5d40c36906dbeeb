"""Where int8 MobileNetV2's error comes from: weights, activation clipping, activation rounding.

One model from ``insert-qdq:balance=off,bias-correction=off,cpu=vnni``: no bias is shifted to
offset the activations' error, and every weight keeps its whole grid. Its error against the
original on the evaluation photos is split by rewriting each activation QuantizeLinear →
DequantizeLinear pair of the model as written; the weights' pairs stay:

* weights only: each pair becomes the function its range stands for: a Clip at the bounds of
  the ReLU/Clip that was fused into it, nothing where none was;
* + clipping: each pair becomes a Clip at its grid's two ends;
* + rounding: the pairs as they are (the model as written).

Then each pair alone is given back its function, in the model as written: the gain each makes
(the largest, and their sum against the whole). For scale, the default ``quantize`` as written
and with onnxruntime's integer kernels (optimized session).

    python bench/int8_error.py        # ~3 min on 2 cores
"""

from __future__ import annotations

import numpy as np
import onnx
from common import agreement, cpu_line, mobilenet, outputs
from onnx import helper
from onnx import numpy_helper as nh

import onnxshrink


def activation_pairs(model: onnx.ModelProto) -> list[tuple[onnx.NodeProto, onnx.NodeProto]]:
    """(QuantizeLinear, DequantizeLinear) pairs on computed tensors (not weights)."""
    inits = {i.name for i in model.graph.initializer}
    made = {o: n for n in model.graph.node for o in n.output}
    pairs = []
    for n in model.graph.node:
        q = made.get(n.input[0])
        if n.op_type == "DequantizeLinear" and q is not None and q.op_type == "QuantizeLinear":
            if q.input[0] not in inits:
                pairs.append((q, n))
    return pairs


def grid_ends(model: onnx.ModelProto, q: onnx.NodeProto) -> tuple[float, float]:
    """The two ends of a QuantizeLinear's (per-tensor) grid, in float."""
    inits = {i.name: nh.to_array(i) for i in model.graph.initializer}
    scale, zero = float(inits[q.input[1]]), inits[q.input[2]]
    info = np.iinfo(zero.dtype)
    return (info.min - int(zero)) * scale, (info.max - int(zero)) * scale


def fused_function(original: onnx.ModelProto, tensor: str) -> tuple[float, float]:
    """The bounds of the ReLU/Clip that read ``tensor`` in the original (±inf: none)."""
    readers = [n for n in original.graph.node if tensor in n.input]
    if len(readers) == 1 and readers[0].op_type == "Relu":
        return 0.0, np.inf
    if len(readers) == 1 and readers[0].op_type == "Clip":
        inits = {i.name: nh.to_array(i) for i in original.graph.initializer}
        for n in original.graph.node:  # the exporter's Constant nodes
            if n.op_type == "Constant" and n.attribute[0].name == "value":
                inits[n.output[0]] = nh.to_array(n.attribute[0].t)
        ends = [float(inits[i]) if i in inits else None for i in readers[0].input[1:3]]
        ends += [None] * (2 - len(ends))
        return (
            -np.inf if ends[0] is None else ends[0],
            np.inf if ends[1] is None else ends[1],
        )
    return -np.inf, np.inf


def rewritten(model: onnx.ModelProto, bounds: dict[str, tuple[float, float]]) -> onnx.ModelProto:
    """``model`` with each activation pair whose DequantizeLinear output is in ``bounds``
    replaced by a Clip at those bounds."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g, renamed, added = m.graph, {}, []
    for q, dq in activation_pairs(model):
        if dq.output[0] not in bounds:
            continue
        name = dq.output[0] + ".clip"
        lo, hi = (np.float32(max(min(b, 3e38), -3e38)) for b in bounds[dq.output[0]])
        g.initializer.extend([nh.from_array(np.array(lo), name + ".lo")])
        g.initializer.extend([nh.from_array(np.array(hi), name + ".hi")])
        added.append(helper.make_node("Clip", [q.input[0], name + ".lo", name + ".hi"], [name]))
        renamed[dq.output[0]] = name
    for n in g.node:
        n.input[:] = [renamed.get(i, i) for i in n.input]
    g.node.extend(added)  # onnxruntime sorts the graph
    return m


def main() -> None:
    print(cpu_line())
    _, folded, calib, evaluation = mobilenet()
    original = onnx.load(str(folded))
    x = np.load(evaluation)["input"]
    ref = outputs(original, x)
    spec = "insert-qdq:balance=off,bias-correction=off,cpu=vnni"
    model = onnxshrink.compress(original, [spec], data=str(calib))[0]
    pairs = activation_pairs(model)
    function = {dq.output[0]: fused_function(original, q.input[0]) for q, dq in pairs}
    ends = {dq.output[0]: grid_ends(model, q) for q, dq in pairs}
    default = onnxshrink.compress(original, ["quantize"], data=str(calib))[0]
    rows = [
        ("weights only", outputs(rewritten(model, function), x)),
        ("+ activation clipping", outputs(rewritten(model, ends), x)),
        ("+ activation rounding (as written)", outputs(model, x)),
        ("default `quantize`, as written", outputs(default, x)),
        ("default `quantize`, integer kernels", outputs(default, x, optimize=True)),
    ]
    total = 1 - agreement(ref, rows[2][1])[1]
    print(f"\n`{spec}`, {len(pairs)} activation pairs; evaluation photos ({len(x)} crops)\n")
    print("| model | top-1 agreement | 1 − cosine | share of the error as written |")
    print("| --- | --- | --- | --- |")
    for name, out in rows:
        top1, cos = agreement(ref, out)
        print(f"| {name} | {top1:.1%} | {1 - cos:.5f} | {(1 - cos) / total:.0%} |")
    gains = []
    for q, dq in pairs:
        alone = rewritten(model, {dq.output[0]: function[dq.output[0]]})
        gains.append((total - (1 - agreement(ref, outputs(alone, x))[1]), q.input[0]))
    gains.sort(reverse=True)
    print("\n| pair given back its function alone | 1 − cosine gained |\n| --- | --- |")
    for gain, name in gains[:8]:
        print(f"| `{name}` | {gain:.5f} |")
    print(f"| sum over all {len(gains)} | {sum(g for g, _ in gains):.5f} (whole: {total:.5f}) |")


if __name__ == "__main__":
    main()

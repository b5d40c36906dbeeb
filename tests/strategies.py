"""Hypothesis strategies: random but valid CNN graphs for the property tests.

A network is an input [batch, C, H, W] followed by 1-4 blocks drawn from: a convolution (kernel
1 or 3, stride, pads, dilation, groups 1 / 2 / depthwise, bias or not) with optional
BatchNormalization and activation; a residual block (two convs, ``Add``); two conv branches
joined by ``Concat``; a squeeze-and-excitation gate (GlobalAveragePool → 1×1 conv → ReLU → 1×1
conv → Sigmoid → ``Mul``); Max/AveragePool. The head is GlobalAveragePool → Flatten → Gemm,
Flatten → Gemm, or the feature map itself. Opsets 13-21, batch fixed or dynamic. Weights are
He-initialised from a drawn seed, so activations stay in a sane range at any depth.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

__all__ = ["cnn_models", "transformer_models", "Net"]

IR_FOR_OPSET = {13: 7, 14: 7, 15: 8, 16: 8, 17: 8, 18: 8, 19: 9, 20: 9, 21: 10}


@dataclasses.dataclass
class Net:
    model: onnx.ModelProto
    input_shape: tuple[int, ...]  # concrete (batch of 2)
    description: str

    def __repr__(self) -> str:  # what hypothesis prints for a failing example
        opset = self.model.opset_import[0].version
        return f"Net({self.description}, input {self.input_shape}, opset {opset})"


class _Builder:
    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.n = 0
        self.parts: list[str] = []

    def name(self, base: str) -> str:
        self.n += 1
        return f"{base}{self.n}"

    def const(self, arr: np.ndarray, base: str) -> str:
        name = self.name(base)
        self.inits.append(numpy_helper.from_array(np.asarray(arr), name))
        return name

    def node(self, op: str, inputs: list[str], **attrs) -> str:
        out = self.name(op.lower() + "_")
        self.nodes.append(helper.make_node(op, inputs, [out], name=self.name(op), **attrs))
        return out

    def conv(
        self,
        x: str,
        c_in: int,
        c_out: int,
        k: int,
        stride: int,
        pad: int,
        dilation: int,
        group: int,
        bias: bool,
    ) -> str:
        fan_in = c_in // group * k * k
        w = (self.rng.standard_normal((c_out, c_in // group, k, k)) * np.sqrt(2.0 / fan_in)).astype(
            np.float32
        )
        inputs = [x, self.const(w, "W")]
        if bias:
            inputs.append(
                self.const((self.rng.standard_normal(c_out) * 0.1).astype(np.float32), "b")
            )
        return self.node(
            "Conv",
            inputs,
            kernel_shape=[k, k],
            strides=[stride, stride],
            pads=[pad] * 4,
            dilations=[dilation, dilation],
            group=group,
        )

    def batchnorm(self, x: str, c: int) -> str:
        r = self.rng
        return self.node(
            "BatchNormalization",
            [
                x,
                self.const((1 + 0.2 * r.standard_normal(c)).astype(np.float32), "gamma"),
                self.const((0.1 * r.standard_normal(c)).astype(np.float32), "beta"),
                self.const((0.1 * r.standard_normal(c)).astype(np.float32), "mean"),
                self.const((0.5 + r.random(c)).astype(np.float32), "var"),
            ],
            epsilon=1e-5,
        )

    def activation(self, x: str, kind: str) -> str:
        if kind == "relu":
            return self.node("Relu", [x])
        if kind == "relu6":
            return self.node(
                "Clip",
                [
                    x,
                    self.const(np.array(0, np.float32), "lo"),
                    self.const(np.array(6, np.float32), "hi"),
                ],
            )
        if kind == "leaky":
            return self.node("LeakyRelu", [x], alpha=0.1)
        if kind == "sigmoid":
            return self.node("Sigmoid", [x])
        return x


@st.composite
def _conv_spec(draw, c_in: int, size: int, *, keep_shape: bool = False):
    k = draw(st.sampled_from([1, 3]))
    dilation = draw(st.sampled_from([1, 2])) if k == 3 and size >= 6 else 1
    stride = 1 if keep_shape else draw(st.sampled_from([1, 1, 2]))
    pad = (k // 2) * dilation if keep_shape else draw(st.sampled_from([0, (k // 2) * dilation]))
    kinds = ["dense", "dense"]
    if k == 3 and not keep_shape:
        kinds.append("depthwise")
    if c_in % 2 == 0:
        kinds.append("grouped")
    kind = draw(st.sampled_from(kinds))
    if kind == "depthwise":
        c_out, group = c_in, c_in
    elif kind == "grouped":
        c_out, group = 2 * draw(st.integers(1, 8)), 2
    else:
        c_out, group = draw(st.integers(2, 20)), 1
    return {
        "k": k,
        "stride": stride,
        "pad": pad,
        "dilation": dilation,
        "group": group,
        "c_out": c_out,
        "bias": draw(st.booleans()),
        "bn": draw(st.booleans()),
        "act": draw(st.sampled_from(["relu", "relu", "relu6", "leaky", "none"])),
    }


def _out_size(size: int, s: dict) -> int:
    eff = (s["k"] - 1) * s["dilation"] + 1
    return (size + 2 * s["pad"] - eff) // s["stride"] + 1


def _apply_conv(b: _Builder, x: str, c: int, s: dict) -> tuple[str, int]:
    y = b.conv(
        x, c, s["c_out"], s["k"], s["stride"], s["pad"], s["dilation"], s["group"], s["bias"]
    )
    if s["bn"]:
        y = b.batchnorm(y, s["c_out"])
    return b.activation(y, s["act"]), s["c_out"]


@st.composite
def cnn_models(draw, max_blocks: int = 4) -> Net:
    """A random valid CNN as an ONNX model (see the module docstring)."""
    opset = draw(st.sampled_from(sorted(IR_FOR_OPSET)))
    c = draw(st.sampled_from([1, 3, 4]))
    size = draw(st.integers(6, 14))
    dynamic = draw(st.booleans())
    b = _Builder(draw(st.integers(0, 2**31 - 1)))
    x, input_shape = "input", (2, c, size, size)
    for _ in range(draw(st.integers(1, max_blocks))):
        kinds = ["conv", "conv", "residual", "concat", "se"] + (["pool"] if size >= 4 else [])
        kind = draw(st.sampled_from(kinds))
        if kind == "conv":
            s = draw(_conv_spec(c, size))
            if _out_size(size, s) < 2:
                continue
            x, c = _apply_conv(b, x, c, s)
            size = _out_size(size, s)
        elif kind == "residual":
            s1 = draw(_conv_spec(c, size, keep_shape=True))
            s1["group"], s1["c_out"] = 1, draw(st.integers(2, 16))
            if s1["k"] == 3 and draw(st.booleans()):  # depthwise middle, as in MobileNet blocks
                s1["group"], s1["c_out"] = c, c
            s2 = draw(_conv_spec(s1["c_out"], size, keep_shape=True))
            s2["group"], s2["c_out"], s2["act"] = 1, c, "none"
            h, hc = _apply_conv(b, x, c, s1)
            y, _ = _apply_conv(b, h, hc, s2)
            x = b.activation(b.node("Add", [x, y]), draw(st.sampled_from(["relu", "none"])))
            b.parts.append("residual")
        elif kind == "concat":
            outs, total = [], 0
            for _ in range(2):
                s = draw(_conv_spec(c, size, keep_shape=True))
                s["group"], s["c_out"] = 1, draw(st.integers(2, 12))
                y, cy = _apply_conv(b, x, c, s)
                outs.append(y)
                total += cy
            x, c = b.node("Concat", outs, axis=1), total
            b.parts.append("concat")
        elif kind == "se":
            mid = max(1, c // 2)
            g = b.node("GlobalAveragePool", [x])
            g = b.node("Relu", [b.conv(g, c, mid, 1, 1, 0, 1, 1, True)])
            g = b.node("Sigmoid", [b.conv(g, mid, c, 1, 1, 0, 1, 1, True)])
            x = b.node("Mul", [x, g])
            b.parts.append("se")
        else:
            op = draw(st.sampled_from(["MaxPool", "AveragePool"]))
            x = b.node(op, [x], kernel_shape=[2, 2], strides=[2, 2])
            size //= 2
            b.parts.append(op)
        if kind == "conv":
            b.parts.append("conv")
    head = draw(st.sampled_from(["gap-gemm", "flatten-gemm", "map"]))
    classes = draw(st.integers(2, 10))
    if head == "map":
        y, out_shape = x, ["N" if dynamic else 2, c, size, size]
    else:
        if head == "gap-gemm":
            x, feats = b.node("GlobalAveragePool", [x]), c
        else:
            feats = c * size * size
        x = b.node("Flatten", [x], axis=1)
        w = (b.rng.standard_normal((classes, feats)) * np.sqrt(1.0 / feats)).astype(np.float32)
        y = b.node(
            "Gemm", [x, b.const(w, "fc"), b.const(np.zeros(classes, np.float32), "fcb")], transB=1
        )
        out_shape = ["N" if dynamic else 2, classes]
    b.parts.append(head)
    final = helper.make_node("Identity", [y], ["output"], name="output_identity")
    graph = helper.make_graph(
        [*b.nodes, final],
        "generated",
        [
            helper.make_tensor_value_info(
                "input", TensorProto.FLOAT, ["N" if dynamic else 2, *input_shape[1:]]
            )
        ],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, out_shape)],
        b.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = IR_FOR_OPSET[opset]
    onnx.checker.check_model(model, full_check=True)
    return Net(model, input_shape, " → ".join(b.parts) + (" (dynamic batch)" if dynamic else ""))


@st.composite
def transformer_models(draw, max_layers: int = 2) -> Net:
    """A random valid encoder as an ONNX model: input [batch, sequence, hidden], 1-2 layers of
    LayerNorm → Q/K/V MatMul + bias → heads (Reshape/Transpose) → Q·Kᵀ (two activations) →
    scale → Softmax → ·V → MatMul + bias, residual; LayerNorm → MatMul → GELU (exact Erf form,
    tanh form, or the opset-20 op) → MatMul, residual; then a mean over the sequence, or the
    sequence itself. Opsets 17-21, batch fixed or dynamic."""
    opset = draw(st.sampled_from([17, 18, 19, 20, 21]))
    heads = draw(st.sampled_from([1, 2, 4]))
    hidden = heads * draw(st.sampled_from([4, 8]))
    seq = draw(st.integers(2, 9))
    ffn = hidden * draw(st.integers(2, 4))
    dynamic = draw(st.booleans())
    b = _Builder(draw(st.integers(0, 2**31 - 1)))

    def dense(x: str, n_in: int, n_out: int) -> str:
        w = (b.rng.standard_normal((n_in, n_out)) / np.sqrt(n_in)).astype(np.float32)
        y = b.node("MatMul", [x, b.const(w, "w")])
        return b.node("Add", [y, b.const(b.rng.normal(0, 0.1, n_out).astype(np.float32), "b")])

    def layernorm(x: str) -> str:
        gamma = b.rng.uniform(0.5, 1.5, hidden).astype(np.float32)
        gamma[0] *= draw(st.sampled_from([1.0, 8.0]))  # an outlier channel, as BERT's have
        beta = b.rng.normal(0, 0.1, hidden).astype(np.float32)
        return b.node("LayerNormalization", [x, b.const(gamma, "g"), b.const(beta, "bt")], axis=-1)

    def gelu(x: str) -> str:
        kind = draw(st.sampled_from(["erf", "tanh"] + (["op"] if opset >= 20 else [])))
        b.parts.append(f"gelu-{kind}")
        if kind == "op":
            return b.node("Gelu", [x])
        half, one = b.const(np.float32(0.5), "half"), b.const(np.float32(1.0), "one")
        if kind == "erf":
            inner = b.node("Erf", [b.node("Mul", [x, b.const(np.float32(0.70710678), "c")])])
        else:
            cube = b.node("Mul", [b.node("Mul", [x, x]), x])
            poly = b.node("Add", [x, b.node("Mul", [cube, b.const(np.float32(0.044715), "c")])])
            inner = b.node("Tanh", [b.node("Mul", [poly, b.const(np.float32(0.79788456), "c")])])
        return b.node("Mul", [b.node("Mul", [x, b.node("Add", [inner, one])]), half])

    split = b.const(np.array([0, 0, heads, hidden // heads], np.int64), "shape")
    merge = b.const(np.array([0, 0, hidden], np.int64), "shape")
    x = "input"
    for _ in range(draw(st.integers(1, max_layers))):
        h = layernorm(x)
        q, k, v = (
            b.node("Transpose", [b.node("Reshape", [dense(h, hidden, hidden), split])], perm=p)
            for p in ([0, 2, 1, 3], [0, 2, 3, 1], [0, 2, 1, 3])
        )
        scale = b.const(np.float32(1.0 / np.sqrt(hidden // heads)), "scale")
        s = b.node("Softmax", [b.node("Mul", [b.node("MatMul", [q, k]), scale])], axis=-1)
        heads_out = b.node("Transpose", [b.node("MatMul", [s, v])], perm=[0, 2, 1, 3])
        a = b.node("Reshape", [heads_out, merge])
        x = b.node("Add", [x, dense(a, hidden, hidden)])
        x = b.node("Add", [x, dense(gelu(dense(layernorm(x), hidden, ffn)), ffn, hidden)])
        b.parts.append("layer")
    batch = "N" if dynamic else 2
    if draw(st.booleans()):  # ReduceMean's axes became an input in opset 18
        if opset >= 18:
            axes = b.const(np.array([1], np.int64), "axes")
            x = b.node("ReduceMean", [x, axes], keepdims=0)
        else:
            x = b.node("ReduceMean", [x], axes=[1], keepdims=0)
        out_shape = [batch, hidden]
        b.parts.append("mean")
    else:
        out_shape = [batch, seq, hidden]
    final = helper.make_node("Identity", [x], ["output"], name="output_identity")
    graph = helper.make_graph(
        [*b.nodes, final],
        "generated",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, seq, hidden])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, out_shape)],
        b.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = IR_FOR_OPSET[opset]
    onnx.checker.check_model(model, full_check=True)
    desc = f"hidden {hidden}, {heads} heads, ffn {ffn}: " + " → ".join(b.parts)
    return Net(model, (2, seq, hidden), desc + (" (dynamic batch)" if dynamic else ""))

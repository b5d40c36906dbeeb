"""A ResNet-18-style network written directly in ONNX (no torch), with seeded random weights.

For timing and structure tests where real weights are not needed: stem Conv7×7/2 + BN + ReLU +
MaxPool, four stages of two basic blocks (3×3 convs, BN, residual Add, 1×1 stride-2 projection
shortcuts where the shape changes), GlobalAveragePool, Flatten, Gemm. ``width`` scales every
channel count (64 for ResNet-18; 16 for a quick one), ``blocks`` the blocks per stage (one
number, or one per stage). ``bottleneck``: ResNet-50's blocks instead (1×1 down to the stage's
width, 3×3 with the stride, 1×1 up to 4× it): ``build(blocks=(3, 4, 6, 3), bottleneck=True)``
is ResNet-50 (25.6 M parameters, 4.1 G MACs at 224 px).

Weights are He-initialised; BatchNorm statistics are random but sane (var in [0.5, 1.5]) so
activations keep their scale through the depth.

    python models/resnet.py            # writes resnet18.onnx into the cache
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def build(
    width: int = 64,
    blocks: int | tuple[int, ...] = 2,
    image: int = 224,
    classes: int = 1000,
    seed: int = 0,
    batchnorm: bool = True,
    opset: int = 17,
    bottleneck: bool = False,
) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    count = iter(range(10_000))

    def name(prefix: str) -> str:
        return f"{prefix}_{next(count)}"

    def const(prefix: str, arr: np.ndarray) -> str:
        n = name(prefix)
        inits.append(numpy_helper.from_array(arr.astype(np.float32), n))
        return n

    def conv(x: str, cin: int, cout: int, k: int, s: int, relu: bool) -> str:
        w = rng.standard_normal((cout, cin, k, k)) * np.sqrt(2.0 / (cin * k * k))
        y = name("conv")
        inputs = [x, const("w", w)]
        if not batchnorm:
            inputs.append(const("b", rng.standard_normal(cout) * 0.01))
        nodes.append(
            helper.make_node("Conv", inputs, [y], name=y, pads=[k // 2] * 4, strides=[s, s])
        )
        if batchnorm:
            z = name("bn")
            nodes.append(
                helper.make_node(
                    "BatchNormalization",
                    [
                        y,
                        const("gamma", rng.uniform(0.5, 1.0, cout)),
                        const("beta", rng.standard_normal(cout) * 0.1),
                        const("mean", rng.standard_normal(cout) * 0.1),
                        const("var", rng.uniform(0.5, 1.5, cout)),
                    ],
                    [z],
                    name=z,
                )
            )
            y = z
        if relu:
            r = name("relu")
            nodes.append(helper.make_node("Relu", [y], [r], name=r))
            y = r
        return y

    x = conv("input", 3, width, 7, 2, True)
    p = name("pool")
    nodes.append(
        helper.make_node(
            "MaxPool", [x], [p], name=p, kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[2, 2]
        )
    )
    x, cin = p, width
    per_stage = (blocks,) * 4 if isinstance(blocks, int) else tuple(blocks)
    for stage, mult in enumerate((1, 2, 4, 8)):
        mid = width * mult
        cout = mid * 4 if bottleneck else mid
        for b in range(per_stage[stage]):
            stride = 2 if stage > 0 and b == 0 else 1
            if bottleneck:
                h = conv(x, cin, mid, 1, 1, True)
                h = conv(h, mid, mid, 3, stride, True)
                h = conv(h, mid, cout, 1, 1, False)
            else:
                h = conv(x, cin, cout, 3, stride, True)
                h = conv(h, cout, cout, 3, 1, False)
            short = x if stride == 1 and cin == cout else conv(x, cin, cout, 1, stride, False)
            a, r = name("add"), name("relu")
            nodes.append(helper.make_node("Add", [h, short], [a], name=a))
            nodes.append(helper.make_node("Relu", [a], [r], name=r))
            x, cin = r, cout
    g, f = name("gap"), name("flatten")
    nodes.append(helper.make_node("GlobalAveragePool", [x], [g], name=g))
    nodes.append(helper.make_node("Flatten", [g], [f], name=f))
    fc_w = const("fc_w", rng.standard_normal((classes, cin)) * np.sqrt(1.0 / cin))
    fc_b = const("fc_b", np.zeros(classes))
    nodes.append(helper.make_node("Gemm", [f, fc_w, fc_b], ["logits"], name="fc", transB=1))
    graph = helper.make_graph(
        nodes,
        "resnet",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, image, image])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])],
        inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="onnxshrink-models"
    )
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


if __name__ == "__main__":
    from models.common import cache_dir

    out = cache_dir() / "resnet18.onnx"
    onnx.save(build(), str(out))
    print(out)

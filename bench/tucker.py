"""Tucker-2 decomposition: is a decomposed layer faster as three convs or with MatMul 1×1
stages, and what do whole-model settings buy in latency against MACs?

1. One 256 -> 256 3×3 convolution at 56×56 (batch 1), Tucker ranks from ``speedup=2``
   (152, 152): the original, the three-conv block, and the block with its 1×1 stages written as
   Reshape -> MatMul -> Reshape; latency ratios to the original, 1 and 2 threads.
2. A ResNet-18-style net (random weights, real photos): ``rank`` 0.25 / 0.5 / 0.604 / 0.75,
   ``energy=0.9`` and ``vbmf`` -- MACs ratio, measured latency ratio (original in the same
   run) and output cosine on the evaluation photos, with re-fit on the calibration photos.

    python bench/tucker.py
"""

from __future__ import annotations

import numpy as np
import onnx
from common import agreement, latency_ratios, mobilenet, outputs, stats
from onnx import TensorProto, helper, numpy_helper

import onnxshrink
from onnxshrink.passes.tucker_conv import speedup_ranks, tucker2


def _model(nodes, inits, c_out=256, hw=56) -> onnx.ModelProto:
    g = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 256, hw, hw])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, c_out, hw, hw])],
        [
            numpy_helper.from_array(v if v.dtype == np.int64 else v.astype(np.float32), k)
            for k, v in inits.items()
        ],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    return m


def single_layer() -> None:
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((256, 256, 3, 3)) * 0.03).astype(np.float32)
    b = rng.standard_normal(256).astype(np.float32) * 0.1
    r_in, r_out = speedup_ranks(256, 256, 3, 3, 2.0, 1, 8)
    u_out, core, u_in = tucker2(w, r_out, r_in)
    conv = _model(
        [helper.make_node("Conv", ["x", "W", "b"], ["y"], pads=[1, 1, 1, 1])], {"W": w, "b": b}
    )
    three = _model(
        [
            helper.make_node("Conv", ["x", "U_in"], ["a"]),
            helper.make_node("Conv", ["a", "core"], ["c"], pads=[1, 1, 1, 1]),
            helper.make_node("Conv", ["c", "U_out", "b"], ["y"]),
        ],
        {"U_in": u_in.T[:, :, None, None], "core": core, "U_out": u_out[:, :, None, None], "b": b},
    )
    matmul = _model(
        [
            helper.make_node("Reshape", ["x", "s1"], ["x2"]),
            helper.make_node("MatMul", ["Uin_t", "x2"], ["a2"]),
            helper.make_node("Reshape", ["a2", "s2"], ["a"]),
            helper.make_node("Conv", ["a", "core"], ["c"], pads=[1, 1, 1, 1]),
            helper.make_node("Reshape", ["c", "s3"], ["c2"]),
            helper.make_node("MatMul", ["U_out", "c2"], ["y2"]),
            helper.make_node("Add", ["y2", "b2"], ["y3"]),
            helper.make_node("Reshape", ["y3", "s4"], ["y"]),
        ],
        {
            "Uin_t": u_in.T,
            "core": core,
            "U_out": u_out,
            "b2": b[:, None],
            "s1": np.array([1, 256, 3136], np.int64),
            "s2": np.array([1, r_in, 56, 56], np.int64),
            "s3": np.array([1, r_out, 3136], np.int64),
            "s4": np.array([1, 256, 56, 56], np.int64),
        },
    )
    x = rng.standard_normal((1, 256, 56, 56)).astype(np.float32)
    ref = outputs(conv, x)
    lat = latency_ratios(conv, {"three convs": three, "MatMul 1×1 stages": matmul}, x, runs=30)
    print(
        f"256->256 3×3 conv at 56×56, Tucker ranks ({r_out}, {r_in}) from speedup=2; "
        f"original {lat['__ms__'][1]:.2f} ms (1 thread), {lat['__ms__'][2]:.2f} ms (2 threads)"
    )
    for k, m in (("three convs", three), ("MatMul 1×1 stages", matmul)):
        cos = agreement(ref.reshape(1, -1), outputs(m, x).reshape(1, -1))[1]
        print(
            f"  {k:<20} latency ratio {lat[k][1]:.3f} (1 thread) {lat[k][2]:.3f} (2 threads); "
            f"cosine {cos:.4f}"
        )


def whole_model() -> None:
    from models import resnet

    _, _, calib, evaluation = mobilenet()
    x_eval = np.load(evaluation)["input"]
    original = onnxshrink.compress(resnet.build(), ["fold-batchnorm"])[0]
    base = stats(original)
    ref = outputs(original, x_eval)
    specs = [
        "tucker:rank=0.25",
        "tucker:rank=0.5",
        "tucker:rank=0.604",
        "tucker:rank=0.75",
        "tucker:energy=0.9",
        "tucker:vbmf=true",
        "tucker:speedup=2",
    ]
    models = {}
    for spec in specs:
        out, rep = onnxshrink.compress(original, [spec + ",floor=0"], data=str(calib), holdout=0)
        models[spec] = out
    lat = latency_ratios(original, models, x_eval[:1], runs=30)
    print(
        f"\nResNet-18-style (random weights): {base.macs / 1e9:.2f} G MACs; original "
        f"{lat['__ms__'][1]:.1f} ms (1 thread), {lat['__ms__'][2]:.1f} ms (2 threads)"
    )
    print(f"{'setting':<22} {'MACs':>6} {'lat1':>6} {'lat2':>6} {'cosine':>7}")
    for spec, out in models.items():
        st = stats(out)
        cos = agreement(ref, outputs(out, x_eval))[1]
        print(
            f"{spec:<22} {st.macs / base.macs:6.3f} {lat[spec][1]:6.3f} {lat[spec][2]:6.3f} "
            f"{cos:7.4f}"
        )


if __name__ == "__main__":
    single_layer()
    whole_model()

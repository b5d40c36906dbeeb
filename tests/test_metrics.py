"""MACs and params against hand counts."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from onnxshrink import metrics
from tests.helpers import make_model, rand


def _stats(text, inits):
    return metrics.model_stats(ir.from_proto(make_model(text, inits)), with_bytes=False)


def _layer(stats, op):
    return [lay for lay in stats.layers if lay.op_type == op]


def test_resnet_basic_block_hand_count():
    # x: 1×64×56×56; conv3x3 64->64 pad 1 twice, residual Add.
    rng = np.random.default_rng(0)
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[1, 64, 56, 56] x, float[64, 64, 3, 3] W1, float[64] b1, float[64, 64, 3, 3] W2)
      => (float[1, 64, 56, 56] y) {
        h = Conv <pads = [1, 1, 1, 1]> (x, W1, b1)
        r = Relu (h)
        k = Conv <pads = [1, 1, 1, 1]> (r, W2)
        s = Add (k, x)
        y = Relu (s)
    }"""
    st = _stats(
        text, {"W1": rand(rng, 64, 64, 3, 3), "b1": rand(rng, 64), "W2": rand(rng, 64, 64, 3, 3)}
    )
    per_conv = 56 * 56 * 64 * 64 * 9  # 115,605,504
    assert [lay.macs for lay in _layer(st, "Conv")] == [per_conv, per_conv]
    assert st.macs == 2 * per_conv == 231_211_008
    assert st.params == 2 * 64 * 64 * 9 + 64 == 73_792
    assert [lay.params for lay in _layer(st, "Conv")] == [64 * 64 * 9 + 64, 64 * 64 * 9]


def test_strided_conv_downsample():
    # ResNet stage transition: 3x3 stride 2 64->128 on 56×56 -> 28×28, and 1x1 stride 2 shortcut
    rng = np.random.default_rng(1)
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[1, 64, 56, 56] x, float[128, 64, 3, 3] W, float[128, 64, 1, 1] S) => (float[1, 128,
        28, 28] y) {
        a = Conv <strides = [2, 2], pads = [1, 1, 1, 1]> (x, W)
        b = Conv <strides = [2, 2]> (x, S)
        y = Add (a, b)
    }"""
    st = _stats(text, {"W": rand(rng, 128, 64, 3, 3), "S": rand(rng, 128, 64, 1, 1)})
    assert [lay.macs for lay in _layer(st, "Conv")] == [28 * 28 * 128 * 64 * 9, 28 * 28 * 128 * 64]
    assert st.macs == 57_802_752 + 6_422_528


def test_depthwise_and_pointwise():
    # MobileNet block: depthwise 3x3 on 32×112×112, then pointwise 32->16
    rng = np.random.default_rng(2)
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[1, 32, 112, 112] x, float[32, 1, 3, 3] D, float[16, 32, 1, 1] P) => (float[1, 16, 112,
        112] y) {
        d = Conv <group = 32, pads = [1, 1, 1, 1]> (x, D)
        r = Clip (d)
        y = Conv (r, P)
    }"""
    st = _stats(text, {"D": rand(rng, 32, 1, 3, 3), "P": rand(rng, 16, 32, 1, 1)})
    dw, pw = _layer(st, "Conv")
    assert dw.macs == 112 * 112 * 32 * 9 == 3_612_672
    assert pw.macs == 112 * 112 * 16 * 32 == 6_422_528


def test_grouped_dilated_conv():
    rng = np.random.default_rng(3)
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2, 8, 20, 20] x, float[12, 2, 3, 3] W) => (float[2, 12, 16, 16] y) {
        y = Conv <group = 4, dilations = [2, 2]> (x, W)
    }"""
    st = _stats(text, {"W": rand(rng, 12, 2, 3, 3)})
    # output 20 - 2*(3-1) = 16; each output element: 2 input channels × 9 taps; batch 2
    assert st.macs == 2 * 12 * 16 * 16 * 2 * 9


def test_conv_transpose():
    rng = np.random.default_rng(4)
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[1, 8, 5, 5] x, float[8, 3, 3, 3] W) => (float[1, 6, 11, 11] y) {
        y = ConvTranspose <group = 2, strides = [2, 2]> (x, W)
    }"""
    st = _stats(text, {"W": rand(rng, 8, 3, 3, 3)})
    # every input element (8×5×5) meets C_out/group = 3 outputs through 9 taps
    assert st.macs == 8 * 5 * 5 * 3 * 9


@pytest.mark.parametrize("trans_a", [0, 1])
def test_gemm(trans_a):
    rng = np.random.default_rng(5)
    a_shape = "4, 7" if trans_a else "7, 4"
    text = f"""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[{a_shape}] a, float[5, 4] B, float[5] C) => (float[7, 5] y) {{
        y = Gemm <transA = {trans_a}, transB = 1> (a, B, C)
    }}"""
    st = _stats(text, {"B": rand(rng, 5, 4), "C": rand(rng, 5)})
    assert st.macs == 7 * 5 * 4
    assert st.params == 25


def test_batched_and_broadcast_matmul():
    rng = np.random.default_rng(6)
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2, 3, 10, 16] q, float[2, 3, 16, 12] k, float[16, 32] W) => (float[2, 3, 10, 12] s,
        float[2, 3, 10, 32] p) {
        s = MatMul (q, k)
        p = MatMul (q, W)
    }"""
    st = _stats(text, {"W": rand(rng, 16, 32)})
    s, p = _layer(st, "MatMul")
    assert s.macs == 2 * 3 * 10 * 12 * 16
    assert p.macs == 2 * 3 * 10 * 32 * 16


def test_dynamic_batch_counts_one_sample():
    rng = np.random.default_rng(7)
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 4, 8, 8] x, float[6, 4, 3, 3] W) => (float[N, 6, 6, 6] y) {
        y = Conv (x, W)
    }"""
    st = _stats(text, {"W": rand(rng, 6, 4, 3, 3)})
    assert st.macs == 6 * 6 * 6 * 4 * 9
    assert not st.macs_unknown


def test_int64_initializers_are_not_params():
    rng = np.random.default_rng(8)
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2, 12] x, int64[2] shape, float[12, 3] W) => (float[2, 3] y) {
        r = Reshape (x, shape)
        y = MatMul (r, W)
    }"""
    st = _stats(text, {"shape": np.array([2, 12], np.int64), "W": rand(rng, 12, 3)})
    assert st.params == 36


def test_digits_model_totals(digits_model):
    from onnxshrink import io

    st = metrics.model_stats(io.load(digits_model).model, with_bytes=False)
    convs = [lay for lay in st.layers if lay.op_type == "Conv"]
    # stem 32×32×16×1×9, two 16->16 convs, stride-2 16->32, dw 32, pw 32->32, stride-2 32->64,
    # two 64->64, dw 64, pw 64->64
    expected = [
        32 * 32 * 16 * 9,
        32 * 32 * 16 * 16 * 9,
        32 * 32 * 16 * 16 * 9,
        16 * 16 * 32 * 16 * 9,
        16 * 16 * 32 * 9,
        16 * 16 * 32 * 32,
        8 * 8 * 64 * 32 * 9,
        8 * 8 * 64 * 64 * 9,
        8 * 8 * 64 * 64 * 9,
        8 * 8 * 64 * 9,
        8 * 8 * 64 * 64,
    ]
    assert [lay.macs for lay in convs] == expected
    assert st.macs == sum(expected) + 64 * 10


def test_if_counts_its_costlier_branch_and_loads_its_weights(tmp_path):
    """Branch weights held in Constant nodes become params (lifted on load); the If's MACs are
    its costlier branch: else = 8 out channels x 6x6 x 27 = 7,776 (then: 4 channels, 3,888)."""
    import onnx
    import onnxruntime as ort
    from onnx import helper as h

    from onnxshrink import io

    rng = np.random.default_rng(0)

    def branch(name, c_out):
        w = h.make_tensor(
            f"{name}_w", onnx.TensorProto.FLOAT, [c_out, 3, 3, 3], rand(rng, c_out, 3, 3, 3).ravel()
        )
        return h.make_graph(
            [
                h.make_node("Constant", [], [f"{name}_wv"], value=w),
                h.make_node("Conv", ["x", f"{name}_wv"], [f"{name}_y"]),
                h.make_node("ReduceMean", [f"{name}_y"], [f"{name}_out"], keepdims=1),
            ],
            name,
            [],
            [h.make_tensor_value_info(f"{name}_out", onnx.TensorProto.FLOAT, [1, c_out, 1, 1])],
        )

    graph = h.make_graph(
        [h.make_node("If", ["c"], ["y"], then_branch=branch("t", 4), else_branch=branch("e", 8))],
        "g",
        [
            h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 8, 8]),
            h.make_tensor_value_info("c", onnx.TensorProto.BOOL, []),
        ],
        [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, "c", 1, 1])],
    )
    proto = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    loaded = io.load(proto)
    assert loaded.lifted_constants == 2
    stats = metrics.model_stats(loaded.model, with_bytes=False)
    assert stats.params == (4 + 8) * 27
    assert stats.macs == 8 * 6 * 6 * 27 and not stats.macs_unknown
    io.write(loaded.model, tmp_path / "m.onnx")  # lifted into the branches, still runs the same
    feed = {"x": rand(rng, 1, 3, 8, 8), "c": np.array(True)}
    want = ort.InferenceSession(proto.SerializeToString()).run(None, feed)[0]
    got = ort.InferenceSession(str(tmp_path / "m.onnx")).run(None, feed)[0]
    np.testing.assert_array_equal(got, want)


def test_lstm_hand_count():
    # T=5 steps, batch 2, input 3, hidden 2, bidirectional: 5 * 2 * 2 dirs * 4*2 gates * (3 + 2)
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[5, 2, 3] x, float[2, 8, 3] W, float[2, 8, 2] R) => (float[5, 2, 2, 2] y) {
        y = LSTM <hidden_size = 2, direction = "bidirectional"> (x, W, R)
    }
    """
    rng = np.random.default_rng(0)
    stats = _stats(text, {"W": rand(rng, 2, 8, 3), "R": rand(rng, 2, 8, 2)})
    assert stats.macs == 5 * 2 * 2 * 8 * (3 + 2)

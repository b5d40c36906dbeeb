"""equalize: cross-layer equalization keeps the function and evens the weight ranges."""

from __future__ import annotations

import numpy as np

from onnxshrink.passes.equalize import EqualizePass, equalize_scales
from tests.helpers import apply, make_model, op_count, ort_run, rand

CHAIN = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[2, 4, 8, 8] x, float[16, 4, 1, 1] W1, float[16] b1, float[16, 1, 3, 3] D, float[16] db,
   float[8, 16, 1, 1] W3, float lo, float hi) => (float[2, 8, 8, 8] y) {
    a = Conv (x, W1, b1)
    r = {act}
    d = Conv <group = 16, pads = [1, 1, 1, 1]> (r, D, db)
    e = Relu (d)
    y = Conv (e, W3)
}"""


def _model(act: str, seed=0):
    rng = np.random.default_rng(seed)
    scales = np.logspace(-2, 1, 16).astype(np.float32)  # very uneven channel ranges
    inits = {
        "W1": rand(rng, 16, 4, 1, 1) * scales[:, None, None, None],
        "b1": rand(rng, 16) * scales,
        "D": rand(rng, 16, 1, 3, 3),
        "db": rand(rng, 16),
        "W3": rand(rng, 8, 16, 1, 1),
        "lo": np.array(0, np.float32),
        "hi": np.array(6, np.float32),
    }
    return make_model(CHAIN.replace("{act}", act), inits), {"x": rand(rng, 2, 4, 8, 8)}


def _ranges(model, name_order):
    init = {i.name: i for i in model.graph.initializer}
    from onnx import numpy_helper

    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    return [numpy_helper.to_array(init[c.input[1]]) for c in convs]


def test_relu_and_depthwise_chain_exact_and_balanced():
    model, feeds = _model("Relu (a)")
    p = EqualizePass()
    out, modified = apply(p, model)
    assert modified and len(p.changed) == 2  # conv -> dw and dw -> conv
    np.testing.assert_allclose(
        ort_run(out, feeds)[0], ort_run(model, feeds)[0], rtol=1e-4, atol=1e-4
    )
    w1_before = _ranges(model, None)[0]
    w1_after, d_after, w3_after = _ranges(out, None)
    spread = lambda r: r.max() / r.min()  # noqa: E731
    before = np.abs(w1_before).reshape(16, -1).max(1)
    after = np.abs(w1_after).reshape(16, -1).max(1)
    assert spread(after) < spread(before) / 10


def test_relu6_left_alone_unless_asked():
    model, feeds = _model("Clip (a, lo, hi)")
    p = EqualizePass()
    out, modified = apply(p, model)
    assert any("ReLU6" in s.reason for s in p.skipped)
    assert op_count(out, "Clip") == 1
    p = EqualizePass(relu6_to_relu=True)
    out, modified = apply(p, model)
    assert modified and op_count(out, "Clip") == 0 and p.details["relu6_replaced"]


def test_scales_formula():
    s = equalize_scales(np.array([4.0, 1.0, 0.0]), np.array([1.0, 4.0, 2.0]))
    np.testing.assert_allclose(s, [2.0, 0.5, 1.0])
    r1, r2 = np.array([4.0, 1.0]), np.array([1.0, 4.0])
    np.testing.assert_allclose(r1 / s[:2], r2 * s[:2])


def test_batchnorm_folded_first_so_conv_bn_relu_conv_is_a_pair(digits_model, digits_test):
    import onnx

    model = onnx.load(str(digits_model))
    p = EqualizePass()
    out, modified = apply(p, model)
    assert modified and op_count(out, "BatchNormalization") == 0
    assert p.details["batchnorm_folded"] == 11
    pairs = [c for c in p.changed if "<->" in c]
    assert len(pairs) == 4, p.changed  # unchanged before: Conv -> BN hid every pair
    x = digits_test[0][:32]
    ref = ort_run(model, {"input": x})[0]
    np.testing.assert_allclose(ort_run(out, {"input": x})[0], ref, atol=1e-4 * np.abs(ref).max())

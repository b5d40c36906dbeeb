"""fold-batchnorm: BN folded into Conv / ConvTranspose / Gemm, exact to 1e-5 on onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from onnxshrink.passes.fold_batchnorm import FoldBatchNormPass
from tests.helpers import apply, make_model, op_count, ort_run, rand

TOL = 1e-5  # float32 rounding of the folded weights; outputs are O(1)


def _bn(rng, c):
    return {
        "gamma": (rng.uniform(0.5, 1.5, c)).astype(np.float32),
        "beta": rand(rng, c),
        "mean": rand(rng, c),
        "var": rng.uniform(0.1, 2.0, c).astype(np.float32),
    }


def _check(model, feeds, *, n_bn_left=0):
    out, modified = apply(FoldBatchNormPass(), model)
    assert modified is True
    assert op_count(out, "BatchNormalization") == n_bn_left
    ref, got = ort_run(model, feeds), ort_run(out, feeds)
    for r, g in zip(ref, got):
        assert r.shape == g.shape
        np.testing.assert_allclose(g, r, atol=TOL, rtol=TOL)
    # idempotent: nothing left to fold
    _, again = apply(FoldBatchNormPass(), out)
    assert again is False
    return out


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("group,stride,dilation", [(1, 1, 1), (2, 2, 1), (8, 1, 2)])
def test_conv(bias, group, stride, dilation):
    rng = np.random.default_rng(0)
    c_in, c_out = 8, 16
    b = ", float[16] b" if bias else ""
    text = f"""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2, 8, 12, 12] x, float[16, {c_in // group}, 3, 3] W{b},
       float[16] gamma, float[16] beta, float[16] mean, float[16] var) => (float[2, 16, ?, ?] y) {{
        c = Conv <group = {group}, strides = [{stride}, {stride}], dilations = [{dilation},
            {dilation}], pads = [1, 1, 1, 1]> (x, W{", b" if bias else ""})
        y = BatchNormalization <epsilon = 0.001> (c, gamma, beta, mean, var)
    }}"""
    inits = {"W": rand(rng, c_out, c_in // group, 3, 3), **_bn(rng, c_out)}
    if bias:
        inits["b"] = rand(rng, c_out)
    model = make_model(text, inits)
    out = _check(model, {"x": rand(rng, 2, 8, 12, 12)})
    assert op_count(out, "Conv") == 1


@pytest.mark.parametrize("group", [1, 2])
def test_conv_transpose(group):
    rng = np.random.default_rng(1)
    text = f"""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[1, 8, 5, 5] x, float[8, {12 // group}, 3, 3] W, float[12] b,
       float[12] gamma, float[12] beta, float[12] mean, float[12] var) => (float[1, 12, ?, ?] y) {{
        c = ConvTranspose <group = {group}, strides = [2, 2]> (x, W, b)
        y = BatchNormalization (c, gamma, beta, mean, var)
    }}"""
    inits = {"W": rand(rng, 8, 12 // group, 3, 3), "b": rand(rng, 12), **_bn(rng, 12)}
    _check(make_model(text, inits), {"x": rand(rng, 1, 8, 5, 5)})


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("c_shape", [None, (6,), (1, 6), (3, 6)])
@pytest.mark.parametrize("alpha,beta", [(1.0, 1.0), (0.5, 2.0)])
def test_gemm(trans_b, c_shape, alpha, beta):
    rng = np.random.default_rng(2)
    w_shape = (6, 4) if trans_b else (4, 6)
    c_decl = f", float[{','.join(map(str, c_shape))}] C" if c_shape else ""
    text = f"""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[3, 4] a, float[{w_shape[0]}, {w_shape[1]}] B{c_decl},
       float[6] gamma, float[6] beta, float[6] mean, float[6] var) => (float[3, 6] y) {{
        h = Gemm <transB = {trans_b}, alpha = {alpha}, beta = {beta}>
            (a, B{", C" if c_shape else ""})
        y = BatchNormalization (h, gamma, beta, mean, var)
    }}"""
    inits = {"B": rand(rng, *w_shape), **_bn(rng, 6)}
    if c_shape:
        inits["C"] = rand(rng, *c_shape)
    out = _check(make_model(text, inits), {"a": rand(rng, 3, 4)})
    assert op_count(out, "Gemm") == 1


def test_bn_output_is_graph_output_keeps_name():
    rng = np.random.default_rng(3)
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[1, 3, 4, 4] x, float[4, 3, 1, 1] W, float[4] gamma, float[4] beta, float[4] mean,
        float[4] var)
      => (float[1, 4, 4, 4] y) {
        c = Conv (x, W)
        y = BatchNormalization (c, gamma, beta, mean, var)
    }"""
    out = _check(
        make_model(text, {"W": rand(rng, 4, 3, 1, 1), **_bn(rng, 4)}), {"x": rand(rng, 1, 3, 4, 4)}
    )
    assert [o.name for o in out.graph.output] == ["y"]


def _refused(text, inits, reason_part):
    model = make_model(text, inits)
    p = FoldBatchNormPass()
    out, modified = apply(p, model)
    assert modified is False
    assert op_count(out, "BatchNormalization") >= 1
    assert any(reason_part in s.reason for s in p.skipped), p.skipped


_SHARED = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[1, 3, 4, 4] x, float[3, 3, 1, 1] W, float[3] gamma, float[3] beta, float[3] mean,
    float[3] var)
  => (float[1, 3, 4, 4] y, float[1, 3, 4, 4] z) {
    c = Conv (x, W)
    y = BatchNormalization (c, gamma, beta, mean, var)
    Wi = Identity (W)
    z = Conv (x, Wi)
}"""


def test_refuses_shared_weight_through_identity():
    rng = np.random.default_rng(4)
    _refused(_SHARED, {"W": rand(rng, 3, 3, 1, 1), **_bn(rng, 3)}, "shared")


def test_refuses_conv_output_read_elsewhere():
    rng = np.random.default_rng(5)
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[1, 3, 4, 4] x, float[3, 3, 1, 1] W, float[3] gamma, float[3] beta, float[3] mean,
        float[3] var)
      => (float[1, 3, 4, 4] y, float[1, 3, 4, 4] z) {
        c = Conv (x, W)
        y = BatchNormalization (c, gamma, beta, mean, var)
        z = Relu (c)
    }"""
    _refused(text, {"W": rand(rng, 3, 3, 1, 1), **_bn(rng, 3)}, "other nodes")


def test_refuses_conv_output_that_is_graph_output():
    rng = np.random.default_rng(6)
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[1, 3, 4, 4] x, float[3, 3, 1, 1] W, float[3] gamma, float[3] beta, float[3] mean,
        float[3] var)
      => (float[1, 3, 4, 4] y, float[1, 3, 4, 4] c) {
        c = Conv (x, W)
        y = BatchNormalization (c, gamma, beta, mean, var)
    }"""
    _refused(text, {"W": rand(rng, 3, 3, 1, 1), **_bn(rng, 3)}, "graph output")


def test_refuses_non_constant_bn_parameters():
    rng = np.random.default_rng(7)
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[1, 3, 4, 4] x, float[3, 3, 1, 1] W, float[3] gamma, float[3] beta, float[3] mean,
        float[3] var)
      => (float[1, 3, 4, 4] y) {
        c = Conv (x, W)
        y = BatchNormalization (c, gamma, beta, mean, var)
    }"""
    inits = {"W": rand(rng, 3, 3, 1, 1), **_bn(rng, 3)}
    del inits["gamma"]  # stays a graph input
    _refused(text, inits, "not constant")


def test_refuses_non_constant_weight():
    rng = np.random.default_rng(8)
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[1, 3, 4, 4] x, float[3, 3, 1, 1] W, float[3] gamma, float[3] beta, float[3] mean,
        float[3] var)
      => (float[1, 3, 4, 4] y) {
        c = Conv (x, W)
        y = BatchNormalization (c, gamma, beta, mean, var)
    }"""
    inits = _bn(rng, 3)
    _refused(text, inits, "weight is not constant")


def test_reports_bn_after_other_op():
    rng = np.random.default_rng(9)
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[1, 3, 4, 4] x, float[3] gamma, float[3] beta, float[3] mean,
        float[3] var) => (float[1, 3, 4, 4] y) {
        r = Relu (x)
        y = BatchNormalization (r, gamma, beta, mean, var)
    }"""
    model = make_model(text, _bn(rng, 3))
    p = FoldBatchNormPass()
    _, modified = apply(p, model)
    assert modified is False
    assert p.skipped and "Relu" in p.skipped[0].reason


def test_float16_weights_keep_dtype():
    rng = np.random.default_rng(10)
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float16[1, 3, 4, 4] x, float16[4, 3, 3, 3] W, float16[4] gamma, float16[4] beta,
       float16[4] mean, float16[4] var)
      => (float16[1, 4, 2, 2] y) {
        c = Conv (x, W)
        y = BatchNormalization (c, gamma, beta, mean, var)
    }"""
    inits = {
        k: v.astype(np.float16) for k, v in {"W": rand(rng, 4, 3, 3, 3), **_bn(rng, 4)}.items()
    }
    model = make_model(text, inits)
    out, modified = apply(FoldBatchNormPass(), model)
    assert modified
    x = rand(rng, 1, 3, 4, 4).astype(np.float16)
    (r,), (g,) = ort_run(model, {"x": x}), ort_run(out, {"x": x})
    assert g.dtype == np.float16
    np.testing.assert_allclose(g.astype(np.float32), r.astype(np.float32), atol=2e-2, rtol=2e-2)
    assert all(
        ir.from_proto(out).graph.initializers[n].dtype == ir.DataType.FLOAT16
        for n in ir.from_proto(out).graph.initializers
    )

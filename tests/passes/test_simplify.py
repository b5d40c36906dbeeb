"""simplify: onnxsim folding plus Constant weights to initializers; refusals with reasons."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir

from onnxshrink.passes.simplify import SimplifyPass
from tests.helpers import apply, make_model, op_count, ort_run, rand

_FOLDABLE = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[2, 4, 6, 6] x, float[8, 4, 3, 3] W, float[8] gamma, float[8] beta, float[8] mean,
    float[8] var)
  => (float[2, 288] y) {
    c = Conv <pads = [1, 1, 1, 1]> (x, W)
    n = BatchNormalization (c, gamma, beta, mean, var)
    s = Shape (n)
    b = Gather <axis = 0> (s, zero)
    shape = Concat <axis = 0> (b, minus_one)
    two = Add (W, W)
    w2 = Mul (two, half)
    c2 = Conv <pads = [1, 1, 1, 1]> (x, w2)
    sum = Add (n, c2)
    y = Reshape (sum, shape)
}"""


def _inits(rng):
    return {
        "W": rand(rng, 8, 4, 3, 3),
        "gamma": rng.uniform(0.5, 1.5, 8).astype(np.float32),
        "beta": rand(rng, 8),
        "mean": rand(rng, 8),
        "var": rng.uniform(0.5, 1.5, 8).astype(np.float32),
        "zero": np.array([0], np.int64),
        "minus_one": np.array([-1], np.int64),
        "half": np.array(0.5, np.float32),
    }


def test_folds_constant_subgraphs_but_not_batchnorm():
    rng = np.random.default_rng(0)
    model = make_model(_FOLDABLE, _inits(rng))
    out, modified = apply(SimplifyPass(), model)
    assert modified is True
    assert len(out.graph.node) < len(model.graph.node)
    assert op_count(out, "Shape") == 0 and op_count(out, "Mul") == 0
    assert op_count(out, "BatchNormalization") == 1  # left to fold-batchnorm
    assert not any(n.op_type == "Constant" for n in out.graph.node)  # weights are initializers
    x = rand(rng, 2, 4, 6, 6)
    np.testing.assert_allclose(ort_run(out, {"x": x})[0], ort_run(model, {"x": x})[0], atol=1e-5)
    _, again = apply(SimplifyPass(), out)
    assert again is False


def test_constant_node_weights_become_initializers():
    text = """
    <ir_version: 8, opset_import: ["" : 13]>
    g (float[1, 3, 4, 4] x) => (float[1, 2, 4, 4] y) {
        W = Constant <value = float[2, 3, 1, 1] {1, 2, 3, 4, 5, 6}> ()
        y = Conv (x, W)
    }"""
    p = SimplifyPass()
    out, modified = apply(p, make_model(text))
    assert modified and op_count(out, "Constant") == 0
    assert [i.name for i in out.graph.initializer] == ["W"]


def test_model_with_local_function_is_left_alone():
    text = """
    <ir_version: 8, opset_import: ["" : 17, "local" : 1]>
    g (float[2, 3] x) => (float[2, 3] y) {
        y = local.Twice (x)
    }
    <domain: "local", opset_import: ["" : 17]>
    Twice (a) => (b) {
        b = Add (a, a)
    }"""
    model = onnx.parser.parse_model(text)
    p = SimplifyPass()
    out, modified = apply(p, model)
    assert modified is False
    assert "local functions" in p.skipped[0].reason
    assert len(out.functions) == 1


def test_keeps_output_names_on_digits(digits_model):
    model = onnx.load(str(digits_model))
    out, _ = apply(SimplifyPass(), model)
    assert [o.name for o in out.graph.output] == [o.name for o in model.graph.output]
    assert ir.from_proto(out).graph.inputs[0].name == "input"

"""Shared IR edits: fresh names with and without a pass's name scope."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxshrink.irtools import const_array, names, set_const_input, take, unique_name
from tests.helpers import make_model


def _graph() -> ir.Graph:
    x = ir.val("x", ir.DataType.FLOAT, [2])
    relu = ir.node("Relu", [x], name="relu")
    relu.outputs[0].name = "y"
    return ir.Graph([x], relu.outputs, nodes=[relu], name="g")


def test_unique_name_avoids_values_nodes_and_what_the_scope_handed_out():
    g = _graph()
    assert [unique_name(g, b) for b in ("x", "relu", "y", "z")] == ["x_1", "relu_1", "y_1", "z"]
    # without a scope a name not yet in the graph can be handed out twice; in one it cannot
    assert unique_name(g, "z") == "z"
    with names():
        assert [unique_name(g, "z") for _ in range(3)] == ["z", "z_1", "z_2"]
        take(g, "w")  # set directly, registered
        assert unique_name(g, "w") == "w_1"
        v = set_const_input(g, g.node(0), 1, np.zeros(1, np.float32), "extra")
        assert v.name == "relu.extra" and unique_name(g, "relu.extra") == "relu.extra_1"
    assert unique_name(g, "w") == "w"  # the scope is gone: the graph as it is


def test_const_array_sees_through_a_reshaped_constant():
    """Paddle exports add each conv bias as Reshape(bias, [1, C, 1, 1]); Unsqueeze/Squeeze of a
    constant are constants too (axes as input or, before opset 13, as attribute)."""
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 4, 2, 2] x, float[4] b, int64[4] shape, int64[2] axes) => (float[N, 4, 2, 2] y) {
        r = Reshape (b, shape)
        u = Unsqueeze (b, axes)
        s = Squeeze (u, axes)
        y = Add (x, r)
    }"""
    b = np.arange(4, dtype=np.float32)
    model = ir.from_proto(
        make_model(
            text,
            {"b": b, "shape": np.array([1, 4, 1, 1]), "axes": np.array([0, 2])},
            check=False,
        )
    )
    values = {n.outputs[0].name: n.outputs[0] for n in model.graph}
    assert const_array(values["r"]).shape == (1, 4, 1, 1)
    assert const_array(values["u"]).shape == (1, 4, 1)
    np.testing.assert_array_equal(const_array(values["s"]), b)
    assert const_array(values["y"]) is None  # x is not constant

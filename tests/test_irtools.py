"""Shared IR edits: fresh names with and without a pass's name scope."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxshrink.irtools import names, set_const_input, take, unique_name


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

"""What the weight-quantizing passes share: which MatMul/Gemm layers they take, and how a node
becomes an onnxruntime contrib op (com.microsoft) in its place.

A layer is taken when its weight (input 1) is a constant 2-D float32 tensor read by it alone
and its input is float32; otherwise it stays float with the reason in the report (a MatMul of
two activations -- attention scores -- among them). The pass adds its own refusals.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import NameFixPass

from onnxshrink.irtools import const_array, inferred_dtypes, unique_name, weight_users_outside

__all__ = [
    "constant",
    "held_out_layers",
    "release",
    "replace_with_contrib",
    "select_layers",
    "weight_refusal",
]


def weight_refusal(node: ir.Node, dtypes: dict[str, ir.DataType], kernel: str) -> str | None:
    """Why ``node``'s weight cannot go to ``kernel`` (named in the reason), or None; a Gemm
    also needs transA = 0 and a constant C (or none)."""
    w = const_array(node.inputs[1])
    if w is None:
        return "two activations (e.g. attention scores): left float"
    if w.dtype != np.float32 or dtypes.get(node.inputs[0].name) != ir.DataType.FLOAT:
        return "not a float32 input and weight"
    if w.ndim != 2:
        return f"a {w.ndim}-D weight ({kernel} takes 2-D)"
    if weight_users_outside(node.inputs[1], node):
        return "weight is shared with another node"
    if node.op_type == "Gemm":
        if node.attributes.get_int("transA", 0):
            return "Gemm with transA=1 is left float"
        c = node.inputs[2] if len(node.inputs) > 2 else None
        if c is not None and const_array(c) is None:
            return "Gemm with a non-constant C is left float"
    return None


def release(value: ir.Value) -> None:
    """Unmaps ``value``'s external data (read again lazily if needed): a pass that reads one
    weight at a time then holds one weight's pages, not the whole file's."""
    tensor = value.const_value
    if isinstance(tensor, ir.ExternalTensor):
        try:
            tensor.release()
        except BufferError:  # an array still views it: it stays mapped
            pass


def select_layers(p, model: ir.Model, refusal: Callable) -> list[ir.Node]:
    """The MatMul/Gemm nodes of ``model`` that ``refusal(node, dtypes)`` accepts; the others
    (and those in ``p.skip_``) skipped on ``p`` with the reason. Names every node first."""
    NameFixPass()(model)  # the report and ``skip`` refer to node names
    dtypes = inferred_dtypes(model)
    nodes = []
    for node in model.graph:
        if node.op_type not in ("MatMul", "Gemm"):
            continue
        if node.name in p.skip_:
            p.skip(node, "excluded")
        elif reason := refusal(node, dtypes):
            p.skip(node, reason)
        else:
            nodes.append(node)
    return nodes


def constant(graph: ir.Graph, name: str, arr: np.ndarray) -> ir.Value:
    """A new initializer named ``name`` (or the first free ``name_<k>``)."""
    value = ir.val(unique_name(graph, name), const_value=ir.tensor(arr))
    graph.register_initializer(value)
    return value


def replace_with_contrib(
    model: ir.Model, node: ir.Node, op: str, inputs: list, attrs: dict, name: str
) -> ir.Node:
    """``node`` replaced by the com.microsoft ``op`` computing its output (name kept)."""
    graph = model.graph
    new = ir.node(
        op, inputs, attributes=attrs, domain="com.microsoft", name=unique_name(graph, name)
    )
    model.opset_imports.setdefault("com.microsoft", 1)
    ir.convenience.replace_nodes_and_values(
        graph, node, [node], [new], [node.outputs[0]], [new.outputs[0]]
    )
    return new


def held_out_layers(p, model: ir.Model, nodes: list[ir.Node]) -> Iterator[tuple]:
    """(node, H_fit, H_val) of every layer of ``nodes`` Hessian-aware rounding can steer, on
    ``p``'s calibration samples (:func:`onnxshrink.analysis.heldout_rounding.held_out_grams`),
    with a progress bar; the layers left to nearest rounding go to ``details`` with the reason."""
    from onnxshrink.analysis.heldout_rounding import held_out_grams
    from onnxshrink.analysis.rounding import steerable

    refused: dict[str, str] = {}
    steer = steerable(nodes, refused)
    n = min(p.samples, p.context.data.n_samples)
    task = p.task(f"{p.name}: Hessian-aware rounding", n)
    yield from held_out_grams(model, steer, p.context.data, n, refused, task)
    task.done()
    if refused:
        p.details["nearest_rounding"] = refused

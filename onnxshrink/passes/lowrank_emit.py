"""How a factorised layer is written: a call of a model-local function, or the plain products.

``fused=true``: one call of a function in domain ``onnxshrink``: ``LowRankMatMul(X, A, B) =
MatMul(MatMul(X, A), B)``, ``LowRankGemm(X, A, B, C) = Gemm(Gemm(X, A), B, C)``,
``LowRankConv(X, A, B, bias) = Conv(Conv(X, A), B, bias)``; onnxruntime inlines them. A
transposed Gemm input gets a Transpose before the call, a beta on a non-constant C a Mul;
strided or padded 1×1 convs are emitted plain. ``fused=false`` emits the plain products. The
result keeps the layer's output name; every emitted node is marked a factor
(:func:`onnxshrink.marks.mark_factor`).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from onnxshrink import marks
from onnxshrink.irtools import const_array, new_initializer, unique_name, weight_users_outside

__all__ = ["DOMAIN", "Target", "rewrite"]

DOMAIN = "onnxshrink"


@dataclasses.dataclass
class Target:
    """A layer to factorise: its node, kind and effective weight."""

    node: ir.Node
    kind: str  # matmul | gemm | conv
    W: np.ndarray  # effective (n_in, n_out), float64
    bias_add: ir.Node | None = None  # MatMul's consumer Add of a constant bias

    @property
    def row_key(self) -> tuple:
        n = self.node
        if self.kind == "gemm":
            return (n.inputs[0].name, "T" if n.attributes.get_int("transA", 0) else "")
        if self.kind == "conv":
            return (n.inputs[0].name, "conv", *n.attributes.get_ints("strides", [1, 1]))
        return (n.inputs[0].name, "")

    @property
    def has_bias_slot(self) -> bool:
        if self.kind == "conv":
            return True
        if self.kind == "gemm":
            c = self.node.inputs[2] if len(self.node.inputs) > 2 else None
            return c is None or (
                const_array(c) is not None and not weight_users_outside(c, self.node)
            )
        return self.bias_add is not None


def _function(model: ir.Model, kind: str) -> tuple[str, str]:
    """Defines (once) the model-local function for ``kind``; returns its (domain, name)."""
    fname = {"matmul": "LowRankMatMul", "gemm": "LowRankGemm", "conv": "LowRankConv"}[kind]
    if (DOMAIN, fname, "") not in model.functions:
        op = {"matmul": "MatMul", "gemm": "Gemm", "conv": "Conv"}[kind]
        names = ["X", "A", "B"] + {"matmul": [], "gemm": ["C"], "conv": ["bias"]}[kind]
        inputs = [ir.Value(name=n) for n in names]
        first = ir.node(op, inputs[:2], name="first")
        first.outputs[0].name = "H"
        second = ir.node(op, [first.outputs[0], *inputs[2:]], name="second")
        second.outputs[0].name = "Y"
        graph = ir.Graph(
            inputs,
            [second.outputs[0]],
            nodes=[first, second],
            opset_imports={"": model.opset_imports.get("", 17)},
            name=fname,
        )
        func = ir.Function(DOMAIN, fname, graph=graph, attributes=[])
        model.functions[func.identifier()] = func
        model.opset_imports[DOMAIN] = 1
    return DOMAIN, fname


def rewrite(model: ir.Model, t: Target, f, shift: np.ndarray | None, fused: bool) -> str:
    """Replaces ``t``'s layer by its factors ``f`` (``shift``: added to the bias); returns the
    form emitted, "fused" or "plain"."""
    graph, node = model.graph, t.node
    base = node.name or node.op_type
    dtype = const_array(node.inputs[1]).dtype

    def const(arr, what):
        return new_initializer(graph, f"{base}.lowrank.{what}", np.asarray(arr).astype(dtype))

    x, before = node.inputs[0], []
    if t.kind == "conv":
        A, B = const(f.A.T[:, :, None, None], "A"), const(f.B.T[:, :, None, None], "B")
        b = (
            const_array(node.inputs[2])
            if len(node.inputs) > 2 and node.inputs[2] is not None
            else 0.0
        )
        bias = const(
            np.broadcast_to(
                np.asarray(b, np.float64) + (shift if shift is not None else 0.0),
                (t.W.shape[1],),
            ),
            "bias",
        )
        geometry = {
            a.name: a
            for a in node.attributes.values()
            if a.name in ("strides", "pads", "dilations")
        }
        plain_geometry = all(
            v == 1 for v in node.attributes.get_ints("strides", [1, 1])
        ) and not any(node.attributes.get_ints("pads", [0, 0, 0, 0]))
        fused = fused and plain_geometry
        if fused:
            call = [ir.node(_function(model, "conv")[1], [x, A, B, bias], domain=DOMAIN)]
        else:
            first = ir.node("Conv", [x, A], attributes=geometry)
            call = [first, ir.node("Conv", [first.outputs[0], B, bias])]
    elif t.kind == "gemm":
        A, B = const(f.A, "A"), const(f.B, "B")
        c, beta = (
            (node.inputs[2] if len(node.inputs) > 2 else None),
            node.attributes.get_float("beta", 1.0),
        )
        c_arr = const_array(c) if c is not None else None
        if c is not None and c_arr is None:  # a runtime C: kept, its beta applied
            if beta != 1.0:
                scale = ir.node("Mul", [c, const(np.array(beta), "beta")])
                before.append(scale)
                c = scale.outputs[0]
        elif c_arr is not None or shift is not None:
            c = const(
                (beta * np.asarray(c_arr if c_arr is not None else 0.0, np.float64))
                + (shift if shift is not None else 0.0),
                "C",
            )
        if node.attributes.get_int("transA", 0):
            tr = ir.node("Transpose", [x], attributes={"perm": [1, 0]})
            before.append(tr)
            x = tr.outputs[0]
        op = "gemm" if c is not None else "matmul"
        if fused:
            call = [
                ir.node(
                    _function(model, op)[1],
                    [x, A, B, *([c] if c is not None else [])],
                    domain=DOMAIN,
                )
            ]
        else:
            first = ir.node("Gemm", [x, A])
            call = [
                first,
                ir.node("Gemm", [first.outputs[0], B, *([c] if c is not None else [])]),
            ]
    else:
        A, B = const(f.A, "A"), const(f.B, "B")
        if fused:
            call = [ir.node(_function(model, "matmul")[1], [x, A, B], domain=DOMAIN)]
        else:
            first = ir.node("MatMul", [x, A])
            call = [first, ir.node("MatMul", [first.outputs[0], B])]
        if shift is not None:
            add = t.bias_add
            i = 1 if add.inputs[0] is node.outputs[0] else 0
            b = const_array(add.inputs[i])
            add.replace_input_with(
                i, const((np.asarray(b, np.float64) + shift.reshape(b.shape)), "bias")
            )
    _replace(graph, node, before + call)
    return "fused" if fused else "plain"


def _replace(graph: ir.Graph, node: ir.Node, nodes: list[ir.Node]) -> None:
    base = node.name or node.op_type
    for i, n in enumerate(nodes):
        n.name = unique_name(graph, f"{base}.lowrank{i}")
        marks.mark_factor(node=n)
        if n is not nodes[-1]:
            n.outputs[0].name = unique_name(graph, f"{base}.lowrank{i}.out")
    out, last = node.outputs[0], nodes[-1].outputs[0]
    graph.insert_before(node, nodes)
    out.replace_all_uses_with(last, replace_graph_outputs=True)
    graph.remove(node, safe=True)
    name = out.name
    out.name = None
    last.name = name  # the result keeps the layer's output name
    last.type, last.shape = out.type, out.shape

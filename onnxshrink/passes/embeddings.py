"""Embedding tables to ``GatherBlockQuantized`` (com.microsoft): rows dequantized as read.

A Gather along axis 0 from a constant float32 matrix of ≥ 1,024 values (token and position
tables) is replaced by GatherBlockQuantized over a ``bits``-bit copy of the table (8: uint8,
4: uint4), blocks of the largest of 128/64/32/16 values that divides a row, each with its
scale and zero point (:mod:`onnxshrink.analysis.blockquant`). Refused with a reason: a table
shared with another node, a row width that is not a multiple of 16, a skipped node.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx_ir as ir

from onnxshrink.analysis.blockquant import block_quantize, block_size
from onnxshrink.irtools import const_array, weight_users_outside
from onnxshrink.passes.weight_layers import (
    constant,
    release,
    replace_with_contrib,
    select_layers,
)

__all__ = ["embedding_gathers", "layers_and_tables", "quantize_gather"]


def embedding_gathers(p, model: ir.Model) -> list[ir.Node]:
    """The Gathers of rows of a constant float32 matrix (the others skipped on ``p`` with a
    reason)."""
    out = []
    for node in model.graph:
        if node.op_type != "Gather" or node.attributes.get_int("axis", 0) != 0:
            continue
        w = const_array(node.inputs[0])
        if w is None or w.dtype != np.float32 or w.ndim != 2 or w.size < 1024:
            continue
        if node.name in p.skip_:
            p.skip(node, "excluded")
        elif weight_users_outside(node.inputs[0], node):
            p.skip(node, "embedding table is shared with another node")
        elif block_size(w.shape[1]) is None:
            p.skip(node, f"row width {w.shape[1]} is not a multiple of 16")
        else:
            out.append(node)
    return out


def quantize_gather(p, model: ir.Model, node: ir.Node, *, bits: int) -> None:
    """Replaces ``node`` by GatherBlockQuantized over a ``bits``-bit copy of its table."""
    graph = model.graph
    source, w = node.inputs[0], const_array(node.inputs[0])
    block = block_size(w.shape[1])
    q, scale, zp = block_quantize(w, bits, block)
    if bits == 4:
        q, zp = q.astype(ml_dtypes.uint4), zp.astype(ml_dtypes.uint4)
    base = node.name
    inputs = [
        constant(graph, f"{base}.table_quantized", q),
        node.inputs[1],
        constant(graph, f"{base}.table_scale", scale),
        constant(graph, f"{base}.table_zero_point", zp),
    ]
    attrs = {"gather_axis": 0, "quantize_axis": 1, "block_size": block, "bits": bits}
    replace_with_contrib(model, node, "GatherBlockQuantized", inputs, attrs, f"{base}.int{bits}")
    del w
    release(source)
    p.change(f"{base}: embedding table {bits}-bit, blocks of {block}", base)


def layers_and_tables(p, model: ir.Model, refusal, *, bits: int) -> tuple[list[ir.Node], int]:
    """(the MatMul/Gemm layers ``p`` will quantize, how many embedding tables it quantized to
    ``bits`` here -- none unless ``p.embeddings``): the first steps the weight passes share."""
    nodes = select_layers(p, model, refusal)
    tables = embedding_gathers(p, model) if p.embeddings else []
    for node in tables:
        quantize_gather(p, model, node, bits=bits)
    return nodes, len(tables)

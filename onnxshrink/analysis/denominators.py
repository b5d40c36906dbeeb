"""The Add / Mul ops that compute a normaliser's denominator, which int8 must not round.

A decomposed LayerNorm / RMSNorm divides by √(var + ε). Its variance spans a tiny range near 0
(magika: [0, 0.023]), and on a uint8 grid over [0, max] the small variances round to 0: then
1/√(0 + ε) is huge, or with ε folded away, Reciprocal(0) = inf. Computed as E[x²] − E[x]²
from quantized terms, it cancels to 0 as well. So every Add and Mul of the statistic's own
arithmetic stays float: walking back from the inputs of the ops singular at 0,

    Reciprocal · Div (its divisor) · Log · Pow (a negative exponent)

through Add, Sub, Mul, Max, Min, Abs, Sqrt, Pow and the ops that only move data (Reshape,
Expand, Squeeze, Unsqueeze, Flatten, Transpose, Identity, Cast), marking the Adds and Muls. A
ReduceMean / ReduceSum ends the walk, its input's square x · x (E[x²]) marked too; so does any
other producer (a Conv, the residual stream). A Sqrt alone is continuous at 0 and is not a
reason (a spectrogram's magnitude √(re² + im²) is quantized as before).
"""

from __future__ import annotations

import onnx_ir as ir

from onnxshrink.irtools import const_array

__all__ = ["denominator_ops"]

_WALK = {"Add", "Sub", "Mul", "Max", "Min", "Abs", "Reshape", "Expand", "Squeeze", "Unsqueeze"}
_WALK |= {"Flatten", "Transpose", "Identity", "Cast", "Sqrt", "Pow"}
_REDUCE = {"ReduceMean", "ReduceSum"}
_READERS = {"Reciprocal": 0, "Div": 1, "Log": 0, "Pow": 0}  # singular at 0


def denominator_ops(model: ir.Model) -> dict[int, str]:
    """id(node) -> why it stays float, for each Add / Mul that computes a denominator."""
    out: dict[int, str] = {}
    for node in model.graph:
        slot = _READERS.get(node.op_type)
        if slot is None or node.domain not in ("", "ai.onnx") or len(node.inputs) <= slot:
            continue
        if node.op_type == "Pow" and not _negative(node):
            continue  # x², √x: no division
        todo, seen = [node.inputs[slot]], set()
        while todo and len(seen) < 32:  # the statistic's arithmetic, not the network: bounded
            value = todo.pop()
            prod = value.producer() if value is not None else None
            if prod is not None and prod.op_type in _REDUCE and (sq := _square(prod.inputs[0])):
                out.setdefault(id(sq), _why(sq, node))  # E[x²]'s x·x, and no further
                continue
            if prod is None or id(prod) in seen or prod.op_type not in _WALK:
                continue  # a Reduce (the statistic's source), a constant, anything else
            seen.add(id(prod))
            if prod.op_type in ("Add", "Mul"):
                out.setdefault(id(prod), _why(prod, node))
            todo += [v for v in prod.inputs if v is not None and const_array(v) is None]
    return out


def _negative(pow_: ir.Node) -> bool:
    """A Pow whose exponent is a negative constant: a division (x^-0.5)."""
    e = const_array(pow_.inputs[1]) if len(pow_.inputs) > 1 else None
    return e is not None and e.size == 1 and float(e.reshape(-1)[0]) < 0


def _square(value: ir.Value | None) -> ir.Node | None:
    """The Mul that made ``value`` as x · x, or None."""
    prod = value.producer() if value is not None else None
    if prod is not None and prod.op_type == "Mul" and prod.inputs[0] is prod.inputs[1]:
        return prod
    return None


def _why(node: ir.Node, reader: ir.Node) -> str:
    return (
        f"{node.op_type} computes what {reader.op_type} {reader.name!r} reads (a normaliser's "
        "denominator): int8 would round its small values to 0"
    )

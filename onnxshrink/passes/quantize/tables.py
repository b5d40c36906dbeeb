"""Last step in the linear scope: embedding tables to 8-bit ``GatherBlockQuantized``.

An attention model's largest tensor is often its token table, read by a Gather that the QDQ
form cannot express. With ``embeddings=true`` (default) in the linear scope, each Gather of rows
of a constant float matrix becomes ``GatherBlockQuantized`` over a uint8 copy, a scale and zero
point per block of the row (:mod:`onnxshrink.passes.embeddings`, as ``quantize-dynamic`` does):
every value within half a step of its block's grid.
"""

from __future__ import annotations

from onnxshrink.passes.embeddings import embedding_gathers, quantize_gather
from onnxshrink.passes.quantize.state import QuantState, Step

__all__ = ["EmbeddingTables"]


class EmbeddingTables(Step):
    name = "embedding-tables"

    def wanted(self, p, state: QuantState) -> bool:
        return state.plan.linear and p.embeddings

    def run(self, p, state: QuantState) -> None:
        tables = embedding_gathers(p, state.model)
        for node in tables:
            quantize_gather(p, state.model, node, bits=8)
        if tables:
            p.details["embeddings_int8"] = len(tables)

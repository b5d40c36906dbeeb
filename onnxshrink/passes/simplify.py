"""Simplifies the graph with onnxsim (constant folding, dead code, redundant ops).

Rule: the model is handed to ``onnxsim.simplify`` as protobuf and the result replaces the graph
when onnxsim succeeds; the outputs keep their names and shapes. Constant-node weights are turned
into initializers before and after, so later passes find every weight.

BatchNorm is *not* folded here (``skip_fuse_bn=True``): the ``fold-batchnorm`` pass does that
over the IR, with per-node reasons for what it refuses.

Refused (model left unchanged, reason in the report):

* the model is larger than protobuf's 2 GB (onnxsim works on one in-memory protobuf);
* the model uses model-local functions (onnxsim would inline or drop them);
* onnxsim raises (its message is the reason).

onnxsim is a large package (~1.8 s to import): it is imported here, inside the pass.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import ClassVar

import onnx_ir as ir

from onnxshrink.errors import first_line
from onnxshrink.io import lift_constants, tensor_bytes
from onnxshrink.passes.base import ShrinkPass

__all__ = ["SimplifyPass"]

logger = logging.getLogger(__name__)

_PROTO_LIMIT = 1_800_000_000


def _counts(model: ir.Model) -> tuple[int, int]:
    return len(model.graph), len(model.graph.initializers)


@dataclasses.dataclass
class SimplifyPass(ShrinkPass):
    """Constant folding and graph clean-up with onnxsim, plus Constant weights to initializers."""

    name: ClassVar[str] = "simplify"
    lossy: ClassVar[bool] = False

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        lifted = lift_constants(model)
        if lifted:
            self.change(f"{lifted} Constant nodes -> initializers")
        before = _counts(model)
        if reason := self._refusal(model):
            self.skip("model", reason)
            return ir.passes.PassResult(model, modified=bool(lifted))
        try:
            simplified = self._run_onnxsim(model)
        except Exception as e:  # onnxsim's own failure: report it, keep the model
            self.skip("model", f"onnxsim failed: {first_line(e, 200)}")
            return ir.passes.PassResult(model, modified=bool(lifted))
        if simplified is None:
            return ir.passes.PassResult(model, modified=bool(lifted))
        _replace_graph(model, simplified)
        lift_constants(model)
        after = _counts(model)
        if after != before:
            self.change(f"nodes {before[0]} -> {after[0]}, initializers {before[1]} -> {after[1]}")
        return ir.passes.PassResult(model, modified=bool(lifted) or after != before)

    def _refusal(self, model: ir.Model) -> str | None:
        if tensor_bytes(model) > _PROTO_LIMIT:
            return "model is larger than 2 GB; onnxsim needs one in-memory protobuf"
        if model.functions:
            return "model has local functions; onnxsim would inline them"
        return None

    def _run_onnxsim(self, model: ir.Model) -> ir.Model | None:
        import onnxsim

        from onnxshrink.io import _in_memory_copies

        swapped = _in_memory_copies(model)
        try:
            proto = ir.to_proto(model)
        finally:
            for value, tensor in swapped:
                value.const_value = tensor
        out, ok = onnxsim.simplify(proto, skip_fuse_bn=True)
        if not ok:
            self.skip("model", "onnxsim reported a failed self-check; result discarded")
            return None
        return ir.from_proto(out)


def _replace_graph(model: ir.Model, simplified: ir.Model) -> None:
    """Puts the simplified graph into ``model`` (the same Model object: the pass is in place)."""
    if [v.name for v in simplified.graph.outputs] != [v.name for v in model.graph.outputs]:
        raise RuntimeError("onnxsim changed the output names")
    model.graph = simplified.graph

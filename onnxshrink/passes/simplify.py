"""Simplifies the graph with onnxsim (constant folding, dead code, redundant ops).

Rule: the model is handed to ``onnxsim.simplify`` as protobuf and the result replaces the graph
when onnxsim succeeds; the outputs keep their names and shapes. Constant-node weights are turned
into initializers before and after, so later passes find every weight.

BatchNorm is *not* folded here (``skip_fuse_bn=True``): the ``fold-batchnorm`` pass does that
over the IR, with per-node reasons for what it refuses.

Constant folding is bounded: no folded tensor may exceed max(16 MiB, 2x the largest initializer)
(onnxsim's ``tensor_size_threshold``), and a result whose tensors grew beyond max(1.1x, +1 MiB)
is discarded -- a 4 KB model tiling a constant 10^4 times came out at 40 MB. onnxsim runs in a
child process with an address-space limit (:mod:`onnxshrink.sandbox`): a crash there (it died
with SIGSEGV at 7.7 GB on 10^5 tiles) or an exhausted limit rolls the pass back instead of
killing the compiler.

Refused (model left unchanged, reason in the report):

* the model is larger than protobuf's 2 GB (onnxsim works on one in-memory protobuf);
* the model uses model-local functions (onnxsim would inline or drop them);
* onnxsim raises (its message is the reason), or its result grew the model.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
from pathlib import Path
from typing import ClassVar

import onnx_ir as ir

from onnxshrink.errors import one_line
from onnxshrink.io import lift_constants, tensor_bytes
from onnxshrink.passes.base import ShrinkPass
from onnxshrink.sandbox import SandboxCrash

__all__ = ["SimplifyPass"]

logger = logging.getLogger(__name__)

_PROTO_LIMIT = 1_800_000_000
_FOLD_MIN = 16 << 20  # bytes a folded constant may always reach
_GROWTH, _GROWTH_MIN = 1.1, 1 << 20  # tensor bytes the result may gain: 10%, or 1 MiB
_TIMEOUT = 1800.0  # seconds onnxsim may take


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
        size = tensor_bytes(model)
        try:
            simplified = self._run_onnxsim(model)
        except SandboxCrash:  # the pass is rolled back with this reason
            raise
        except Exception as e:  # onnxsim's own failure: report it, keep the model
            self.skip("model", f"onnxsim failed: {one_line(e, 400)}")
            return ir.passes.PassResult(model, modified=bool(lifted))
        if simplified is None:
            return ir.passes.PassResult(model, modified=bool(lifted))
        grown = tensor_bytes(simplified)
        if grown > max(_GROWTH * size, size + _GROWTH_MIN):
            self.skip(
                "model",
                f"constant folding grew the model's tensors from {size:,} to {grown:,} bytes: "
                "result discarded",
            )
            return ir.passes.PassResult(model, modified=bool(lifted))
        _replace_graph(model, simplified)
        lift_constants(model)
        after = _counts(model)
        if after != before:
            self.change(f"nodes {before[0]} -> {after[0]}, initializers {before[1]} -> {after[1]}")
        return ir.passes.PassResult(model, modified=bool(lifted) or after != before)

    def _refusal(self, model: ir.Model) -> str | None:
        from onnxshrink.metrics import constant_blowups

        if tensor_bytes(model) > _PROTO_LIMIT:
            return "model is larger than 2 GB; onnxsim needs one in-memory protobuf"
        if blowups := constant_blowups(model):
            node, n = max(blowups, key=lambda b: b[1])
            return (
                f"{node} makes a constant of {n:,} elements from small inputs: folding it would "
                "grow the model (and onnxsim computes it); left as it is"
            )
        if model.functions:
            return "model has local functions; onnxsim would inline them"
        return None

    def _run_onnxsim(self, model: ir.Model) -> ir.Model | None:
        import onnx

        from onnxshrink import sandbox
        from onnxshrink.io import _in_memory_copies

        swapped = _in_memory_copies(model)
        try:
            proto = ir.to_proto(model)
        finally:
            for value, tensor in swapped:
                value.const_value = tensor
        largest = max(
            (
                v.const_value.nbytes
                for v in model.graph.initializers.values()
                if v.const_value is not None
            ),
            default=0,
        )
        fold = min(max(_FOLD_MIN, 2 * largest), 2**31 - 10000)
        with self.scratch() as workdir, tempfile.TemporaryDirectory(dir=workdir) as tmp:
            src, dst = Path(tmp) / "in.onnx", Path(tmp) / "out.onnx"
            onnx.save(proto, str(src))
            del proto
            ok = sandbox.simplify_file(
                str(src), str(dst), f"{fold}B", _memory_limit(src.stat().st_size), _TIMEOUT
            )
            if not ok:
                self.skip("model", "onnxsim reported a failed self-check; result discarded")
                return None
            return ir.load(str(dst)) if dst.exists() else None


def _memory_limit(model_bytes: int) -> int:
    """Address space for onnxsim's process: 12x the model and 4 GiB at least, 3/4 of RAM at most."""
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        ram = 16 << 30
    return int(min(max(4 << 30, 12 * model_bytes), 0.75 * ram))


def _replace_graph(model: ir.Model, simplified: ir.Model) -> None:
    """Puts the simplified graph into ``model`` (the same Model object: the pass is in place)."""
    if [v.name for v in simplified.graph.outputs] != [v.name for v in model.graph.outputs]:
        raise RuntimeError("onnxsim changed the output names")
    model.graph = simplified.graph

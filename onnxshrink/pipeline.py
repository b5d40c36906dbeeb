"""The pipeline: runs passes in order, with instruments observing every pass from outside.

After each pass that changed the model the pipeline removes unused nodes, initializers and
functions and re-sorts the graph. Instruments (TVM's ``PassInstrument`` idea) are called around
every pass: ``before_pass`` in reverse order, ``after_pass`` in order, so a timer measures the
pass alone (:mod:`onnxshrink.instruments`). An instrument may mark a pass ``rolled-back``; the
pipeline then restores the model as it was before the pass (a clone taken beforehand: tensors
are shared, never mutated) and goes on -- or raises :class:`ValidationError` when ``strict``;
it may also hand back another model for the pass (``run.model``: the pass applied partly).
"""

from __future__ import annotations

import dataclasses
import logging
import traceback
from collections.abc import Sequence

import onnx_ir as ir
from onnx_ir.passes.common import (
    RemoveUnusedFunctionsPass,
    RemoveUnusedNodesPass,
    TopologicalSortPass,
)

from onnxshrink.errors import ValidationError, one_line
from onnxshrink.passes.base import PassContext, ShrinkPass
from onnxshrink.report import PassRecord
from onnxshrink.timing import phase

__all__ = ["DEFAULT_FLOOR", "Instrument", "PassRun", "Pipeline", "cleanup", "custom_ops"]

logger = logging.getLogger(__name__)

DEFAULT_FLOOR = 0.99  # cosine with the original that a lossy pass must keep, unless set
# domains onnxruntime's CPU provider implements; a node of another domain is a custom op
_RUNTIME_DOMAINS = {"", "ai.onnx", "ai.onnx.ml", "com.microsoft"}


def custom_ops(model: ir.Model) -> list[str]:
    """``domain.op`` of the nodes (subgraphs included) that neither onnxruntime nor a model-local
    function defines."""
    local = {(f.domain, f.name) for f in model.functions.values()}
    found = {
        f"{n.domain}.{n.op_type}"
        for n in ir.traversal.RecursiveGraphIterator(model.graph)
        if n.domain not in _RUNTIME_DOMAINS and (n.domain, n.op_type) not in local
    }
    return sorted(found)


def cleanup(model: ir.Model) -> None:
    """Dead nodes, initializers and functions removed; graph re-sorted."""
    RemoveUnusedNodesPass()(model)
    RemoveUnusedFunctionsPass()(model)
    TopologicalSortPass()(model)


@dataclasses.dataclass
class PassRun:
    """One pass application, as the instruments see it."""

    index: int
    total: int
    pass_: ShrinkPass
    record: PassRecord
    snapshot: ir.Model
    model: ir.Model
    modified: bool = False
    error: BaseException | None = None
    traceback: str | None = None


class Instrument:
    """Observes the pipeline; default methods do nothing."""

    def enter(self, model: ir.Model) -> None: ...

    def before_pass(self, run: PassRun) -> None: ...

    def after_pass(self, run: PassRun) -> None: ...

    def exit(self, model: ir.Model) -> None: ...


class Pipeline:
    """Runs ``passes`` on a model with ``instruments`` around each one."""

    def __init__(
        self,
        passes: Sequence[ShrinkPass],
        instruments: Sequence[Instrument] = (),
        *,
        context: PassContext | None = None,
        strict: bool = False,
    ) -> None:
        self.passes = list(passes)
        self.instruments = list(instruments)
        self.context = context or PassContext()
        self.strict = strict

    def run(self, model: ir.Model) -> ir.Model:
        for inst in self.instruments:
            inst.enter(model)
        for i, p in enumerate(self.passes):
            p.bind(self.context)
            record = PassRecord(name=p.name, options=p.options())
            with phase("copy the model before each pass"):
                snapshot = model.clone()
            run = PassRun(i, len(self.passes), p, record, snapshot=snapshot, model=model)
            for inst in reversed(self.instruments):
                inst.before_pass(run)
            try:
                with phase(f"pass {p.name}"):
                    result = p(model)
                    run.modified = result.modified
                    if run.modified:
                        cleanup(model)
            except Exception as e:  # a bug in a pass must not cost the user the model
                run.error, run.traceback = e, traceback.format_exc()
                logger.debug("pass %s raised:\n%s", p.name, run.traceback)
            record.changed, record.skipped, record.details = (
                list(p.changed),
                list(p.skipped),
                dict(p.details),
            )
            if run.error is not None:
                record.status, record.reason = (
                    "rolled-back",
                    f"pass raised {type(run.error).__name__}: {one_line(run.error)}",
                )
                record.traceback = run.traceback
            else:
                record.status = "applied" if run.modified else "unchanged"
            for inst in self.instruments:
                with phase(f"after each pass: {type(inst).__name__}"):
                    inst.after_pass(run)
            if self.context.memo is not None:  # its results were for this pass's model only
                self.context.memo.clear()
            if record.status != "rolled-back":
                model = run.model  # an instrument may hand back another (a partial application)
            else:
                model = run.snapshot
                if self.strict:
                    for inst in self.instruments:
                        if callable(close := getattr(inst, "close", None)):
                            close()  # a progress bar
                    raise ValidationError(f"pass '{p.name}' failed validation: {record.reason}")
        for inst in self.instruments:
            inst.exit(model)
        return model

"""The pipeline's instruments: timing, progress, validation with rollback, the report.

:class:`Validate` runs every changed model with onnxruntime against the model before the pass
and the original: a pass is rolled back when the model is invalid (checker, strict shape
inference, onnxruntime), slower than its bound, changes output names or shapes, leaves a lossless
pass's outputs different, takes a lossy pass's cosine below its floor, or lets the optimized
session's integer kernels disagree with the reference -- except that a lossy pass below its
floor is first re-run sparing its most damaging layers (:mod:`onnxshrink.degrade`) and kept if
one such try holds. :class:`ReportCollector` fills the
:class:`~onnxshrink.report.Report`; :class:`Timing` measures, :class:`Progress`
(:mod:`onnxshrink.progress`) shows.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import onnx_ir as ir

from onnxshrink import degrade, io, metrics, runtime, task
from onnxshrink.data import Dataset
from onnxshrink.errors import ModelError, OptionError, first_line, one_line
from onnxshrink.passes.base import NullTask, ShrinkPass
from onnxshrink.pipeline import DEFAULT_FLOOR, Instrument, PassRun, custom_ops
from onnxshrink.progress import Progress
from onnxshrink.report import Fidelity, Report
from onnxshrink.timing import phase
from onnxshrink.validate import (
    BelowFloor,
    Invalid,
    Signature,
    check_file,
    compare,
    exact_ok,
    kernel_verdict,
    kernels_agree,
    strict_inference_ok,
    uses_integer_kernels,
)

__all__ = ["ReportCollector", "Timing", "Validate"]

# seconds one validation batch of the input model may take (a Loop of 10^12 steps never ends);
# a pass's model gets SLOWER_BOUND times the input's slowest batch, and at least MIN_BOUND s
ORIGINAL_BOUND, SLOWER_BOUND, MIN_BOUND = 600.0, 20.0, 30.0
# an input model with more weight bytes than this is run one segment at a time for its
# reference outputs (onnxshrink.sweep.run_in_segments): one session would hold all its weights
LARGE_MODEL = 1 << 30

logger = logging.getLogger(__name__)


class Timing(Instrument):
    """Seconds spent in each pass (validation excluded)."""

    def before_pass(self, run: PassRun) -> None:
        self._t0 = time.perf_counter()

    def after_pass(self, run: PassRun) -> None:
        run.record.seconds = time.perf_counter() - self._t0


class Validate(Instrument):
    """Checks every changed model against the one before it and the original; rolls back failures.

    ``limit`` caps the validation samples (the first ones of the data).
    """

    def __init__(
        self,
        data: Dataset,
        workdir: Path,
        *,
        limit: int = 64,
        progress: Progress | None = None,
        original_path: Path | None = None,
        metric=None,
    ) -> None:
        self.data = data
        self.metric = metric  # the user's task metric (onnxshrink.task), judged instead of cosine
        self.original_path = original_path
        self.workdir = workdir
        self.limit = limit
        self.progress = progress
        self.original_outputs: runtime.Outputs = []
        self.before_outputs: runtime.Outputs = []
        self.fidelity: Fidelity | None = None
        self._strict = True
        self._signature: Signature | None = None
        self.static: str | None = None  # why outputs cannot be compared (custom ops), if so
        self.kernel_gap = 0.0  # 1 − cosine of the current model's integer kernels vs as written
        self.bound = ORIGINAL_BOUND  # seconds a validation batch may take
        self.segmented = False  # the original ran one segment at a time

    def _run(
        self, path: Path, what: str, *, optimize: bool = False, model: ir.Model | None = None
    ) -> runtime.Outputs:
        """Outputs of the model at ``path``; one segment at a time when ``model`` (the same, in
        memory) runs no integer kernels and is too large for one session, or the original was
        (a candidate just under the bound would hold it all again, beside the run's own)."""
        segments = model is not None and not optimize and self._in_segments(model)
        if segments:
            what += " (one segment at a time)"
        n = min(self.limit, self.data.n_samples)
        task = self.progress.task(f"validating {what}", n) if self.progress else NullTask()
        try:
            if segments:
                from onnxshrink.sweep import run_in_segments

                with phase("validation: one segment at a time"):
                    return run_in_segments(
                        model, self.data, self.limit, progress=task, timeout=self.bound
                    )
            sess = runtime.session(path, optimize=optimize)
            return runtime.run(sess, self.data, limit=self.limit, on_batch=task, timeout=self.bound)
        except runtime.RunTimeout as e:
            raise Invalid(f"{e}: over {SLOWER_BOUND:.0f}x the input model's slowest batch") from e
        finally:
            task.done()

    def _in_segments(self, model: ir.Model) -> bool:
        return _large(model) or (self.segmented and not uses_integer_kernels(model))

    def enter(self, model: ir.Model) -> None:
        # The user's file is the original as it is; an in-memory model is written out once.
        path = self.original_path or self.workdir / "original.onnx"
        if self.original_path is None:
            io.write(model, path)
        self._strict = strict_inference_ok(path)
        try:
            self._signature = check_file(path, strict_inference=self._strict)
        except Invalid as e:
            raise ModelError(f"the input model is not valid: {e}") from e
        try:
            t0 = time.perf_counter()
            self.bound = ORIGINAL_BOUND
            self.segmented = _large(model)
            self.original_outputs = self._run(path, "original", model=model)
            batches = max(1, len(self.original_outputs))
            self.bound = max(MIN_BOUND, SLOWER_BOUND * (time.perf_counter() - t0) / batches)
        except Invalid as e:  # the input model's own run did not end
            raise ModelError(
                f"the input model did not finish a validation batch within {ORIGINAL_BOUND:.0f} s "
                "(a Loop or Scan that long?); nothing to validate against"
            ) from e
        except Exception as e:
            if not (custom := custom_ops(model)):
                raise ModelError(f"onnxruntime cannot run the input model: {first_line(e)}") from e
            # A model with custom ops still gets the passes that can be checked without running
            # it: exact ones, verified by checker, shape inference and the output signature.
            self.static = (
                f"onnxruntime cannot run the model (custom op {', '.join(custom)}): outputs "
                f"are not compared; exact passes are checked structurally, lossy ones refused"
            )
        self.before_outputs = self.original_outputs
        try:
            self.fidelity = (
                None if self.static else compare(self.original_outputs, self.original_outputs)
            )
        except Invalid as e:  # NaN/Inf outputs: data outside the model's domain (Log of random:N)
            raise ModelError(
                f"the input model cannot be validated on {self.data.source}: {e}; give --data "
                "with inputs in its domain"
            ) from e
        if self.fidelity is not None and self.metric is not None:
            try:
                self.fidelity.metric = task.score(self.metric, *[self.original_outputs] * 2)
            except Exception as e:  # the user's code: one line, before any pass runs
                raise OptionError(
                    f"--metric failed on the input model's own outputs: {type(e).__name__}: "
                    f"{first_line(e)}"
                ) from e
        if not self.static and uses_integer_kernels(model):  # an int8 input: its kernels' own gap
            kernels = self._run(path, "original (integer kernels)", optimize=True)
            self.kernel_gap = 1.0 - compare(self.original_outputs, kernels).cosine
        for extra in self.workdir.glob("original.onnx*"):
            extra.unlink()

    def after_pass(self, run: PassRun) -> None:
        rec = run.record
        if run.error is not None or not run.modified:
            rec.fidelity = self.fidelity if run.error is None else None
            return
        t0 = time.perf_counter()
        checked = None
        try:
            checked = self._validate(run.pass_, run.model, f"{run.index:02d}")
        except BelowFloor as e:
            e.__traceback__ = None  # its frames hold the failed candidate's outputs
            stopped = None
            try:
                checked = self._degrade(run, e)
            except degrade.NoHelp as why:
                stopped = str(why)
            except Exception as err:  # a bug here must not cost the user the rollback
                logger.warning("partial application of %s failed: %s", run.pass_.name, err)
            if checked is None:
                rec.status, rec.reason = "rolled-back", str(e)
                if stopped:
                    rec.reason += f"; partial application stopped early: {stopped}"
                elif layers := degrade.spareable(run.pass_):
                    rec.reason += (
                        f"; nor when sparing the most damaging of its {len(layers)} layers"
                    )
        except Invalid as e:
            rec.status, rec.reason = "rolled-back", str(e)
        except Exception as e:  # onnxruntime refusing the model, a write failure, ...
            rec.status, rec.reason = "rolled-back", f"{type(e).__name__}: {one_line(e)}"
        if checked is not None:
            outputs, step, total, rec.stats, rec.kernels = checked
            if outputs is not None:
                rec.fidelity, rec.fidelity_step = total, step
                self.before_outputs, self.fidelity = outputs, total
        rec.validate_seconds = time.perf_counter() - t0

    def _validate(self, p: ShrinkPass, model: ir.Model, tag: str) -> tuple:
        """(outputs, fidelity against the model before, against the original, stats, kernels)
        of ``model``, ``p``'s result; raises :class:`Invalid` (:class:`BelowFloor`) if it fails."""
        path = self.workdir / f"pass{tag}.onnx"
        segments = self._in_segments(model)
        try:
            size = io.write(model, path, external_data=segments or None)
            sig = check_file(path, strict_inference=self._strict)
            if diff := sig.differs(self._signature):
                raise Invalid(diff)
            if self.static:
                if p.lossy:
                    raise Invalid(
                        "fidelity cannot be measured: onnxruntime cannot run this model (custom "
                        "ops)"
                    )
                return None, None, None, {"bytes": size}, None
            # in segments the sweep reads the weights from the file just written: serialized
            # from memory, a segment's tensors are copied thrice on their way into onnxruntime
            outputs = self._run(path, p.name, model=ir.load(path) if segments else model)
            step = self._compare(self.before_outputs, outputs)
            total = self._compare(self.original_outputs, outputs)
            self._judge(p, step, total)
            kernels = (
                self._kernels(p, model, path, outputs, total)
                if uses_integer_kernels(model)
                else None
            )
            return outputs, step, total, {"bytes": size}, kernels
        finally:
            for f in self.workdir.glob(f"pass{tag}.onnx*"):
                f.unlink()

    def _degrade(self, run: PassRun, failure: BelowFloor) -> tuple | None:
        """The pass re-run sparing its most damaging layers (:mod:`onnxshrink.degrade`); the
        record then tells what was kept back. None when no try held."""
        t0 = time.perf_counter()
        whole = metrics.model_stats(
            run.model, input_shapes=self.data.input_shapes(), with_bytes=False
        )  # what the whole pass reached, for the summary (partial drops its weights)
        with phase("partial application"):
            found = degrade.partial(
                run.pass_,
                run.snapshot,
                run.model,
                failure.drop,
                failure.cosine,
                lambda q, model, k: self._validate(q, model, f"{run.index:02d}k{k}"),
                lambda reference, outputs: _damage(self._compare(reference, outputs)),
                self.data,
                self.workdir,
                self.progress,
                segments=_large(run.snapshot),
            )
        if found is None:
            return None
        run.model = found.model
        found.record(run.record, str(failure))
        run.record.partial.update(
            whole_macs=whole.macs,
            whole_params=whole.params,
            seconds=round(time.perf_counter() - t0, 2),
        )
        return found.checked

    def _compare(self, reference: runtime.Outputs, outputs: runtime.Outputs) -> Fidelity:
        """:func:`~onnxshrink.validate.compare`, with the user's task metric when given."""
        f = compare(reference, outputs)
        if self.metric is not None:
            f.metric = task.score(self.metric, reference, outputs)
        return f

    def _kernels(
        self, p: ShrinkPass, model: ir.Model, path: Path, written: runtime.Outputs, total: Fidelity
    ) -> dict:
        """The candidate in an optimized session (onnxruntime's integer kernels on this CPU)
        against its run as written (:func:`onnxshrink.validate.kernel_verdict`)."""
        from onnxshrink.analysis.saturation import unsafe_layers
        from onnxshrink.cpu import this_cpu

        cpu = this_cpu()
        run = self._run(path, f"{p.name} (integer kernels)", optimize=True)
        agree = compare(written, run)
        against = compare(self.original_outputs, run)
        info = {
            "cpu": cpu.summary(),
            "cosine": agree.cosine,
            "max_abs": agree.max_abs,
            "cosine_with_original": against.cosine,
        }
        if self.metric is not None and p.lossy and p.compare_to != "improve":
            # the task decides on what users run: a detection can flip on one rounding step
            ref = self.before_outputs if p.compare_to == "before" else self.original_outputs
            info["metric"] = value = task.score(self.metric, ref, run)
            where = " in onnxruntime's integer kernels"
            _hold_floor(p, value, "task metric", where, cosine=against.cosine)
        ok = kernels_agree(agree, total, self.kernel_gap, against)
        unsafe = {} if ok else unsafe_layers(model)
        failure, warning = kernel_verdict(
            agree, total, cpu, unsafe, getattr(p, "cpu", None) == "vnni", self.kernel_gap, against
        )
        if failure:
            raise Invalid(failure)
        if warning:
            info["warning"] = f"{p.name}: {warning}"
        self.kernel_gap = 1.0 - agree.cosine
        return info

    def _judge(self, p: ShrinkPass, step: Fidelity, total: Fidelity) -> None:
        if not p.lossy:
            if not exact_ok(step, self.before_outputs):
                raise Invalid(
                    f"exact pass changed the outputs: max |Δ| = {step.max_abs:.3g} "
                    f"(cosine {step.cosine:.6f})"
                )
            return
        what = "cosine" if self.metric is None else "task metric"
        if p.compare_to == "improve":  # a pass meant to raise fidelity must not lower it
            if self.fidelity is not None and _gate(total) < _gate(self.fidelity) - 1e-4:
                raise Invalid(
                    f"fidelity fell: {what} with the original {_gate(self.fidelity):.5f} -> "
                    f"{_gate(total):.5f}"
                )
            return
        judged = step if p.compare_to == "before" else total
        _hold_floor(p, _gate(judged), what, cosine=judged.cosine)


def _large(model: ir.Model) -> bool:
    """Too large for one validation session: run one segment at a time (integer kernels need
    the optimized session over the whole graph)."""
    return io.tensor_bytes(model) > LARGE_MODEL and not uses_integer_kernels(model)


def _hold_floor(p: ShrinkPass, value: float, what: str, where: str = "", *, cosine: float) -> None:
    """Raises :class:`BelowFloor` when ``value`` (against the original, or against the model
    before the pass for ``compare_to == "before"``) is below ``p``'s floor; ``cosine``: the
    outputs' (``value`` itself unless that is a task metric)."""
    floor = getattr(p, "floor", None)
    floor = DEFAULT_FLOOR if floor is None else floor
    than = "the model before the pass" if p.compare_to == "before" else "the original"
    if value < floor:
        raise BelowFloor(
            f"fidelity below the floor: {what} with {than}{where} {value:.5f} < {floor}",
            (1.0 - value, 1.0 - floor),
            cosine,
        )


def _damage(f: Fidelity) -> float:
    """A layer's damage as partial application ranks it: the drop of what the floor judges,
    plus the cosine's drop when that is a task metric (a metric on a few samples moves in steps:
    most layers would tie at 0)."""
    return 1.0 - _gate(f) + (0.0 if f.metric is None else 1.0 - f.cosine)


def _gate(f: Fidelity) -> float:
    """What a floor is judged on: the user's task metric when given, else the cosine."""
    return f.cosine if f.metric is None else f.metric


class ReportCollector(Instrument):
    """Builds the :class:`Report`: totals before and after, one record per pass."""

    def __init__(self, report: Report, input_shapes=None, validate: Validate | None = None) -> None:
        self._counted = None
        self.report = report
        self.input_shapes = input_shapes
        self.validate = validate

    def enter(self, model: ir.Model) -> None:
        self.report.before = metrics.model_stats(model, input_shapes=self.input_shapes).to_dict()
        if self.validate is not None and self.validate.static:
            self.report.warnings.append(self.validate.static)

    def after_pass(self, run: PassRun) -> None:
        rec = run.record
        if rec.kernels and rec.kernels.get("warning"):
            self.report.warnings.append(rec.kernels["warning"])
        if rec.status != "rolled-back" and run.modified:
            s = metrics.model_stats(run.model, input_shapes=self.input_shapes, with_bytes=False)
            rec.stats = {"params": s.params, "macs": s.macs, **(rec.stats or {})}
            self._counted = (run.model, s)  # the last pass's model is the one ``exit`` gets
        self.report.passes.append(rec)

    def exit(self, model: ir.Model) -> None:
        from onnxshrink.analysis.saturation import vnni_only

        counted = self._counted
        if counted is not None and counted[0] is model:  # counted after its pass: not again
            self.report.after = {**counted[1].to_dict(), "bytes": metrics.serialized_bytes(model)}
        else:
            self.report.after = metrics.model_stats(model, input_shapes=self.input_shapes).to_dict()
        if (warning := vnni_only(model)) and warning not in self.report.warnings:
            self.report.warnings.append(warning)
        if self.validate is not None:
            self.report.fidelity = self.validate.fidelity

"""``onnxshrink.compress``: the one entry point behind the CLI and the Python API."""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir

from onnxshrink import atomic, io, marks
from onnxshrink.data import Dataset, ImageOptions, input_specs, load_data
from onnxshrink.errors import OptionError
from onnxshrink.instruments import ReportCollector, Timing, Validate
from onnxshrink.memo import Memo
from onnxshrink.passes import DEFAULT_PIPELINE, PassContext, ShrinkPass, make_pass
from onnxshrink.pipeline import Pipeline
from onnxshrink.progress import Progress
from onnxshrink.report import Report
from onnxshrink.task import load_metric

__all__ = ["compress"]

logger = logging.getLogger(__name__)

RANDOM_WARNING = (
    "validation used random data ({source}); fidelity figures say little about real inputs "
    "and data-driven passes are weak: give --data with real samples"
)


def compress(
    model: str | os.PathLike | onnx.ModelProto | ir.Model,
    passes: Sequence[str | ShrinkPass] | None = None,
    data: Any = None,
    *,
    output: str | os.PathLike | None = None,
    strict: bool = False,
    images: ImageOptions | None = None,
    validate_samples: int = 64,
    holdout: float = 0.25,
    progress: bool = False,
    console: Any = None,
    target: str | None = None,
    max_drop: float = 0.01,
    time_budget: float | None = 300.0,
    reconstruct: bool | None = None,
    report_html: str | os.PathLike | None = None,
    report_json: str | os.PathLike | None = None,
    metric: Any = None,
) -> tuple[Any, Report]:
    """Compresses ``model`` with ``passes`` (default: the exact passes), validating each one.

    Args:
        model: a path, an ``onnx.ModelProto`` or an ``onnx_ir.Model``; never modified.
        passes: pass specs (``"prune:ratio=0.3"``) or pass instances, applied in order.
        data: calibration / validation data: a path (``.npz``, ``.npy``, image folder),
            ``"random:N"``, a dict of arrays, an array, a :class:`Dataset`, or None (random).
        output: where to write the result (atomically); required when ``model`` is a path.
        strict: raise :class:`~onnxshrink.errors.ValidationError` when a pass is rolled back.
        validate_samples: how many samples of ``data`` validation runs on.
        holdout: share of real ``data`` (the last samples; whole groups when the data gives
            ``groups``) kept out of calibration and used for validation, so data-fitted passes
            are judged on inputs they did not fit; 0 (or fewer than 8 samples, or random data)
            validates on the calibration data itself.
        progress: show progress bars (on a terminal).
        target: ``"speedup=2"``, ``"macs=0.5"``, ``"size=0.25"`` or ``"latency-ms=5"``: after
            ``passes`` (default: the exact ones), search per-layer pruning, decomposition and
            int8 choices that meet it (:mod:`onnxshrink.target`), losing at most ``max_drop``
            of top-1 agreement (cosine for non-classifiers) on the held-out data.
        time_budget: seconds the whole call may take with ``target`` (None: no limit): the
            search measures fewer candidates and tries fewer choices to end in time, and the
            best result found by then is the result (the report says when time ran out).
        reconstruct: with ``target``, finish each attempt's pruning / decomposition with the
            ``reconstruct`` pass (None: when PyTorch is installed; True without it is an error).
        report_html: write a self-contained HTML report there (plots with matplotlib if installed).
        report_json: write the report as JSON there (after the model).
        metric: a task metric, ``f(reference_outputs, outputs) -> float`` in [0, 1] (1: as good;
            dicts of output name -> array over the validation samples), or ``"module:function"``
            naming one: judged instead of the cosine against each pass's floor and in
            ``target``'s drop (:mod:`onnxshrink.task`).

    Returns:
        ``(result, report)``: the result is of the kind given -- the output ``Path`` for a path,
        an ``onnx.ModelProto`` for a ModelProto, an ``onnx_ir.Model`` for an ``ir.Model``.
    """
    if isinstance(model, (str, os.PathLike)) and output is None:
        raise OptionError("compress(path, ...) needs output=<path> to write the result to")
    if validate_samples < 1:
        raise OptionError("validate_samples must be at least 1")
    if not 0.0 <= holdout < 1.0:
        raise OptionError(f"holdout must be in [0, 1), got {holdout}")
    task_metric = load_metric(metric) if metric is not None else None
    parsed_target = None
    if target is not None:
        from onnxshrink.target import Target

        parsed_target = Target.parse(target)
        if not 0.0 <= max_drop < 1.0:
            raise OptionError(f"--max-drop must be in [0, 1), got {max_drop}")
        if time_budget is not None and not time_budget > 0:
            raise OptionError(f"--time-budget must be > 0 seconds, got {time_budget}")
        reconstruct = _with_reconstruct(reconstruct)
    deadline = None if time_budget is None else time.monotonic() + time_budget
    if isinstance(passes, (str, ShrinkPass)):  # compress(model, "quantize"): one pass, not letters
        passes = [passes]
    pass_list = [make_pass(p) for p in (passes if passes is not None else DEFAULT_PIPELINE)]
    loaded = io.load(model)
    reports = [Path(r) for r in (report_json, report_html) if r is not None]
    protected = loaded.protected_paths  # the input's files, read before a pass rewrites it
    split_input = bool(io.external_files(loaded.model))  # it keeps tensors in other files
    atomic.check_outputs(Path(output) if output is not None else None, reports, protected)
    dataset = load_data(data, input_specs(loaded.model), images=images)
    if holdout > 0 and not dataset.is_random and dataset.n_samples >= 8:
        calibration, validation = dataset.split(holdout)
        source = (
            f"{dataset.source}: {calibration.n_samples} calibration + "
            f"{validation.n_samples} held-out validation samples"
        )
        if (groups := dataset.n_groups()) and groups > 1:
            source += f" ({calibration.n_groups()} + {validation.n_groups()} whole groups)"
    else:
        calibration = validation = dataset
        source = f"{dataset.source}: {dataset.n_samples} samples (calibration = validation)"
    report = Report(model=str(model) if loaded.path else type(model).__name__, data=source)
    report.notes += dataset.notes
    if dataset.is_random:
        report.warnings.append(RANDOM_WARNING.format(source=dataset.source))
        for p in pass_list:
            if p.needs_data:
                report.warnings.append(f"pass '{p.name}' is data-driven and ran on random data")
    if loaded.lifted_constants:
        report.notes.append(
            f"{loaded.lifted_constants} Constant-node weights were turned into initializers"
        )
    # the passes rewrite the model in place: the report's "before" and --target's reference are
    # a clone taken first (tensors shared, never mutated); the pipeline gets the only reference,
    # so a pass it rolls back or applies partly leaves no weights held here
    original = loaded.model.clone()
    run = _Run(calibration, validation, strict, validate_samples, progress, console, task_metric)
    result = run(loaded.release(), loaded.path, pass_list, report)
    if parsed_target is not None:
        if dataset.is_random:
            raise OptionError(
                "--target needs real calibration data (--data): sensitivity on random "
                "inputs says nothing about yours"
            )
        result = _search(
            result, original, parsed_target, max_drop, run, report, deadline, reconstruct
        )
    marks.strip(result)  # notes between this run's passes, not part of the user's model
    if loaded.path is not None:
        report.before["bytes"] = io.file_bytes(loaded.path)
    unchanged = (
        loaded.path is not None
        and not loaded.lifted_constants
        and report.target is None
        and not split_input
        and all(p.status != "applied" for p in report.passes)
    )
    if output is not None and unchanged:  # what the user gave, byte for byte (not re-serialized)
        atomic.copy_file(loaded.path, Path(output), protect=protected)
        report.output = str(output)
        report.notes.append("no pass changed the model: the output is a copy of the input")
    elif output is not None:
        atomic.save(result, output, protect=protected)
        report.output = str(output)
        report.after["bytes"] = io.file_bytes(output)
    if report_json is not None:
        report.write_json(report_json)
    if report_html is not None:
        from onnxshrink.report_html import write_report

        write_report(report, original, result, Path(report_html), calibration.input_shapes())
    if loaded.kind == "path":
        return Path(output), report
    if loaded.kind == "proto":
        return ir.to_proto(result), report
    return result, report


@dataclasses.dataclass
class _Run:
    """Runs passes on a model through the validated pipeline, with compress's settings."""

    calibration: Dataset
    validation: Dataset
    strict: bool
    limit: int  # validation samples
    progress: bool
    console: Any
    metric: Any = None  # the user's task metric (onnxshrink.task)

    def __call__(
        self, model: ir.Model, path: Path | None, pass_list: list, report: Report
    ) -> ir.Model:
        """``model`` (rewritten in place) through ``pass_list``; ``path``: the file it was
        loaded from, if any (the original's outputs are computed from it as it is)."""
        with tempfile.TemporaryDirectory(prefix="onnxshrink-") as tmp:
            workdir = Path(tmp)
            bar = Progress(console=self.console, enabled=self.progress)
            validate = Validate(
                self.validation,
                workdir,
                limit=self.limit,
                progress=bar,
                original_path=path,
                metric=self.metric,
            )
            shapes = self.calibration.input_shapes()
            context = PassContext(
                data=self.calibration,
                workdir=workdir,
                original=model.clone(),
                progress=bar,
                memo=Memo(workdir / "memo"),
            )
            pipeline = Pipeline(
                pass_list,
                [bar, Timing(), validate, ReportCollector(report, shapes, validate)],
                context=context,
                strict=self.strict,
            )
            try:
                return pipeline.run(model)
            finally:
                bar.close()


class _TargetRunner:
    """What the ``--target`` search runs through (:class:`onnxshrink.target.Runner`): passes
    applied to a copy of ``model`` in the validated pipeline; latency of a model against the
    original's, optimized sessions side by side on one held-out sample."""

    def __init__(self, model: ir.Model, original: ir.Model, run: _Run, workdir: Path, data: str):
        self.model, self.run, self.workdir, self.data = model, run, workdir, data
        self.progress = Progress(console=run.console, enabled=run.progress)
        self.original_path = workdir / "original.onnx"
        io.write(original, self.original_path)
        self.feed = next(iter(run.validation.batches(1)))

    def apply(self, passes: list) -> tuple[ir.Model, Report]:
        rep = Report(model="target", data=self.data)
        return self.run(self.model.clone(), None, passes, rep), rep

    def latency(self, model: ir.Model) -> tuple[float, float]:
        from onnxshrink import runtime

        path = self.workdir / "candidate.onnx"
        io.write(model, path)
        sessions = {
            "a": runtime.session(self.original_path, optimize=True, spin=False),
            "b": runtime.session(path, optimize=True, spin=False),
        }
        ms = runtime.latency(sessions, self.feed, runs=30, warmup=5)
        return ms["a"], ms["b"]


def _with_reconstruct(asked: bool | None) -> bool:
    """Whether ``--target`` finishes its attempts with ``reconstruct``: as asked, or (None)
    when PyTorch is installed; asked for without it, one error line naming the extra."""
    from onnxshrink.passes.reconstruct import torch_missing

    reason = torch_missing() if asked is not False else None
    if reason and asked:
        raise OptionError(f"--reconstruct on: {reason}")
    return asked is not False and reason is None


def _search(
    model: ir.Model, original: ir.Model, target, max_drop, run: _Run, report, deadline,
    reconstruct: bool,
) -> ir.Model:  # fmt: skip
    """``target`` search on ``model`` (the result of the user's passes), to end by ``deadline``
    (``time.monotonic()``, None: no limit), finishing attempts with ``reconstruct`` if asked;
    merges into ``report``."""
    from onnxshrink.target import search

    with tempfile.TemporaryDirectory(prefix="onnxshrink-target-") as tmp:
        runner = _TargetRunner(model, original, run, Path(tmp), report.data)
        try:
            result, info = search(
                model,
                target,
                max_drop,
                run.calibration,
                Path(tmp),
                runner,
                original_totals=report.before,
                deadline=deadline,
                reconstruct=reconstruct,
            )
        finally:
            runner.progress.close()
    final = info.pop("report")
    report.passes += final.passes
    report.fidelity = final.fidelity
    report.after = final.after
    report.target = info
    return result

"""``onnxshrink.compress``: the one entry point behind the CLI and the Python API."""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir

from onnxshrink import io
from onnxshrink.data import Dataset, ImageOptions, input_specs, load_data
from onnxshrink.errors import OptionError
from onnxshrink.passes import DEFAULT_PIPELINE, PassContext, ShrinkPass, make_pass
from onnxshrink.pipeline import Pipeline, Progress, ReportCollector, Timing, Validate
from onnxshrink.report import Report

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
        holdout: share of real ``data`` (the last samples) kept out of calibration and used for
            validation, so data-fitted passes are judged on inputs they did not fit; 0 (or
            fewer than 8 samples, or random data) validates on the calibration data itself.
        progress: show progress bars (on a terminal).

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
    pass_list = [make_pass(p) for p in (passes if passes is not None else DEFAULT_PIPELINE)]
    loaded = io.load(model)
    if output is not None:
        io.check_output_path(Path(output), loaded.protected_paths)
    dataset = load_data(data, input_specs(loaded.model), images=images)
    if holdout > 0 and not dataset.is_random and dataset.n_samples >= 8:
        calibration, validation = dataset.split(holdout)
        source = (f"{dataset.source}: {calibration.n_samples} calibration + "
                  f"{validation.n_samples} held-out validation samples")
    else:
        calibration = validation = dataset
        source = f"{dataset.source}: {dataset.n_samples} samples (calibration = validation)"
    report = Report(model=str(model) if loaded.path else type(model).__name__, data=source)
    if dataset.is_random:
        report.warnings.append(RANDOM_WARNING.format(source=dataset.source))
        for p in pass_list:
            if p.needs_data:
                report.warnings.append(f"pass '{p.name}' is data-driven and ran on random data")
    if loaded.lifted_constants:
        report.notes.append(
            f"{loaded.lifted_constants} Constant-node weights were turned into initializers"
        )
    result = _run(loaded, pass_list, calibration, validation, report, strict, validate_samples,
                  progress, console)
    if loaded.path is not None:
        report.before["bytes"] = io.file_bytes(loaded.path)
    if output is not None:
        io.save(result, output, protect=loaded.protected_paths)
        report.output = str(output)
        report.after["bytes"] = io.file_bytes(output)
    if loaded.kind == "path":
        return Path(output), report
    if loaded.kind == "proto":
        return ir.to_proto(result), report
    return result, report


def _run(loaded, pass_list, calibration: Dataset, validation: Dataset, report, strict, limit,
         progress, console) -> ir.Model:
    with tempfile.TemporaryDirectory(prefix="onnxshrink-") as tmp:
        workdir = Path(tmp)
        bar = Progress(console=console, enabled=progress)
        validate = Validate(validation, workdir, limit=limit, progress=bar, original_path=loaded.path)
        shapes = calibration.input_shapes()
        context = PassContext(data=calibration, workdir=workdir, original=loaded.model.clone(), progress=bar)
        pipeline = Pipeline(
            pass_list,
            [bar, Timing(), validate, ReportCollector(report, shapes, validate)],
            context=context,
            strict=strict,
        )
        try:
            return pipeline.run(loaded.model)
        finally:
            bar.close()

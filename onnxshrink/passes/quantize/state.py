"""What the quantization steps hand each other, and what a step is.

``quantize`` is a declared sequence of steps (:data:`onnxshrink.passes.quantize.passes.STEPS`),
each with one job: plan, balance, calibrate, round weights, mixed precision, bias probes, insert
Q/DQ, empirical bias correction. A step reads the pass's options, reads and fills a
:class:`QuantState`, and records what it did through a :class:`Log` -- the pass itself on the
real model, :data:`DISCARD` on a trial copy (mixed precision), so nothing a trial does reaches
the report.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import onnx_ir as ir

from onnxshrink.analysis.qplan import QuantPlan, plan_quantization
from onnxshrink.passes.base import DISCARD, Log

__all__ = ["DISCARD", "Log", "QuantState", "Step"]


@dataclasses.dataclass
class QuantState:
    """One quantization run: the plan, and what each step measured for the ones after it."""

    model: ir.Model
    data: Any  # onnxshrink.data.Dataset
    workdir: Path
    exclude: set[str]
    linear: bool = False  # the linear scope (analysis.qplan): MatMul/Gemm alone
    plan: QuantPlan | None = None
    dtypes: dict[str, ir.DataType] | None = None  # value -> element type, inferred once
    bias_mode: str = "off"  # off | weights | full | empirical (``auto`` resolved)
    rounding: str = "nearest"  # nearest | hessian
    calibration: str = "percentile"  # minmax | percentile | entropy | mse (``auto`` resolved)
    safe: bool = True  # weights keep the pair rule (analysis.saturation)
    balance: list = dataclasses.field(default_factory=list)  # analysis.balance.BalancePair
    ranges: dict[str, tuple[float, float]] = dataclasses.field(default_factory=dict)
    means: dict[str, np.ndarray] | None = None  # per-channel E[x] of Conv/Gemm inputs
    deltas: dict[str, np.ndarray] | None = None  # per-channel E[Q(x) - x] (bias-correction=full)
    presets: dict[str, tuple] = dataclasses.field(default_factory=dict)  # Hessian-rounded weights
    # per layer, how many weights the pair rule moved (reported in details["int8_cpu"])
    moved: dict[str, int] = dataclasses.field(default_factory=dict)
    reference: ir.Model | None = None  # the float model saturated at the grids (empirical bias)
    # taken in the calibration sweep, for the steps after it (None: they measure themselves)
    reference_moments: dict[str, Any] | None = None  # Conv/Gemm output -> ChannelMoments
    grams: Any = None  # onnxshrink.analysis.rounding.Grams of the layers Hessian rounding steers
    done: bool = False  # nothing (more) to do: the steps after are not run
    modified: bool = False  # Q/DQ inserted

    def make_plan(
        self, p, model: ir.Model | None = None, exclude: set[str] | None = None
    ) -> tuple[QuantPlan, list]:
        """The plan (and refusals) of ``model`` (the state's) without ``exclude`` (the state's),
        in this run's scope: made again after a step changes either."""
        return plan_quantization(
            self.model if model is None else model,
            self.exclude if exclude is None else exclude,
            set(p.exclude_types),
            self.dtypes,
            linear=self.linear,
        )


class Step:
    """One job of the quantization sequence: ``wanted`` decides, ``run`` does it."""

    name: ClassVar[str] = ""

    def wanted(self, p, state: QuantState) -> bool:
        return True

    def run(self, p, state: QuantState) -> None:
        raise NotImplementedError

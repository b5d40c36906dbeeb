"""The ``insert-qdq`` and ``quantize`` passes: calibrated int8 QDQ as a declared sequence of steps.

``insert-qdq`` runs :data:`STEPS` in order -- plan, smooth, balance, calibrate, round weights,
mixed precision, bias probes, insert Q/DQ, empirical bias, embedding tables -- each a small step
with one job (its module states its rule and math) sharing a
:class:`~onnxshrink.passes.quantize.state.QuantState`.
``quantize`` folds BatchNormalization first (a BN left in would stay float between a DQ and a Q)
and folds the QDQ graph after (``fold-qdq``: weights stored as int8, int32 biases).

Per-channel QDQ needs opset 13: an opset 7-12 model is converted first (onnx's version
converter; put back if nothing is quantized). Refused (reason in the report): an opset the
converter cannot take; a model already quantized or in float16/bfloat16; non-float32 tensors; a
weight shared with another node; nodes in ``skip`` / ``exclude-types``.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import ClassVar, Literal

import onnx
import onnx_ir as ir
from onnx import version_converter
from onnx_ir.passes.common import NameFixPass

from onnxshrink.errors import OptionError, first_line
from onnxshrink.passes import options
from onnxshrink.passes.base import ShrinkPass
from onnxshrink.passes.quantize.bias import EmpiricalBias, InputErrors, SaturatedReference
from onnxshrink.passes.quantize.calibrate import Balance, Calibrate
from onnxshrink.passes.quantize.fold import FoldQDQPass
from onnxshrink.passes.quantize.insert import InsertQDQ
from onnxshrink.passes.quantize.mixed import MixedPrecision
from onnxshrink.passes.quantize.plan import PlanLayers
from onnxshrink.passes.quantize.smooth import Smooth
from onnxshrink.passes.quantize.state import QuantState, Step
from onnxshrink.passes.quantize.tables import EmbeddingTables
from onnxshrink.passes.quantize.weights import RoundWeights
from onnxshrink.timing import phase

__all__ = ["STEPS", "InsertQDQPass", "QuantizePass"]

logger = logging.getLogger(__name__)

# the order matters: the saturated reference is taken before the rewrite changes the model
STEPS: tuple[Step, ...] = (
    PlanLayers(),
    Smooth(),
    Balance(),
    Calibrate(),
    RoundWeights(),
    MixedPrecision(),
    InputErrors(),
    SaturatedReference(),
    InsertQDQ(),
    EmpiricalBias(),
    EmbeddingTables(),
)


def _model_refusal(model: ir.Model) -> str | None:
    """Why the whole model cannot be quantized, or None."""
    opset = model.graph.opset_imports.get("", 0)
    if opset < 13:
        return f"opset {opset} < 13: per-channel QDQ needs opset 13 or later"
    if any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph):
        return "the model is already quantized (has QuantizeLinear/DequantizeLinear)"
    coarse = {
        v.type.dtype.name
        for v in [*model.graph.inputs, *model.graph.initializers.values()]
        if v.type is not None and v.type.dtype in (ir.DataType.FLOAT16, ir.DataType.BFLOAT16)
    }
    if coarse:
        kinds = "/".join(sorted(coarse)).lower()
        return (
            f"{kinds} model: int8 QDQ is implemented for float32 models (convert to float32 first)"
        )
    return None


@dataclasses.dataclass
class InsertQDQPass(ShrinkPass):
    """Calibrated int8 QDQ insertion: per-channel weights, uint8/int8 activations, bias
    correction."""

    name: ClassVar[str] = "insert-qdq"
    lossy: ClassVar[bool] = True
    steps: ClassVar[tuple[Step, ...]] = STEPS

    activations: Literal["uint8", "int8"] = "uint8"
    calibration: Literal["auto", "minmax", "percentile", "entropy", "mse"] = "auto"
    percentile: float = 99.99
    cascade_rounds: int = 6
    weights: Literal["minmax", "mse"] = "minmax"
    bias_correction: Literal["auto", "off", "weights", "full", "empirical"] = "auto"
    rounding: Literal["auto", "nearest", "hessian"] = "auto"
    balance: Literal["auto", "on", "off"] = "auto"
    balance_alpha: float = 0.5
    stem: Literal["auto", "float", "int8"] = "auto"
    cpu: Literal["any", "vnni", "auto"] = "any"
    scope: Literal["auto", "all", "linear"] = "auto"
    smooth: Literal["auto", "off"] = "auto"
    embeddings: bool = True
    skip_: tuple[str, ...] = options.layers()  # CLI name: skip (or exclude, its old name)
    exclude_types: tuple[str, ...] = ()
    samples: int = options.samples(128)
    min_fidelity: float | None = options.share()
    max_float: int = 8
    floor: float | None = options.floor(0.95)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 50.0 < self.percentile <= 100.0:
            raise OptionError(
                f"pass '{self.name}': percentile must be in (50, 100], got {self.percentile}"
            )
        if self.cascade_rounds < 0:
            raise OptionError(
                f"pass '{self.name}': cascade-rounds must be >= 0, got {self.cascade_rounds}"
            )
        if not 0.0 < self.balance_alpha <= 1.0:
            raise OptionError(
                f"pass '{self.name}': balance-alpha must be in (0, 1], got {self.balance_alpha}"
            )

    def _float_batchnorm(self, bn: ir.Node) -> str:
        return "BatchNormalization stays float between DQ and Q: run fold-batchnorm first"

    def opset_13(self, model: ir.Model) -> ir.Graph | None:
        """Converts an opset 7-12 model to opset 13 in place; returns the graph it had (to put
        back if nothing gets quantized), or None when nothing was converted."""
        opset = model.graph.opset_imports.get("", 0)
        if not 7 <= opset < 13:
            return None
        try:
            converted = version_converter.convert_version(ir.to_proto(model), 13)
            onnx.checker.check_model(converted)
        except Exception as e:  # the converter lacks an adapter, or writes an invalid model
            self.skip("model", f"opset {opset} could not be converted to 13: {first_line(e)}")
            return None
        old, model.graph = model.graph, ir.from_proto(converted).graph
        model.ir_version = max(model.ir_version, converted.ir_version, 7)  # opset 13 needs IR 7
        self.change(f"model: opset {opset} -> 13 (per-channel QDQ needs it)")
        return old

    def undo_opset_13(self, model: ir.Model, old: ir.Graph | None) -> None:
        """Nothing quantized: ``model`` gets back the graph :meth:`opset_13` replaced."""
        if old is not None:
            model.graph = old
            self.changed = [c for c in self.changed if not c.startswith("model: opset")]

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        old = self.opset_13(model)
        if reason := _model_refusal(model):
            self.skip("model", reason)
            return ir.passes.PassResult(model, modified=False)
        NameFixPass()(model)  # every node named: exclusions and the report refer to names
        for bn in (n for n in model.graph if n.op_type == "BatchNormalization"):
            self.skip(bn, self._float_batchnorm(bn))
        with self.scratch() as workdir:
            state = QuantState(model, self.context.data, workdir, set(self.skip_))
            for step in self.steps:
                if state.done:
                    break
                if step.wanted(self, state):
                    logger.debug("%s: %s", self.name, step.name)
                    with phase(f"quantize: {step.name}"):
                        step.run(self, state)
        if not state.modified:
            self.undo_opset_13(model, old)
        return ir.passes.PassResult(model, modified=state.modified)


@dataclasses.dataclass
class QuantizePass(InsertQDQPass):
    """int8 quantization: BatchNormalization folded, calibrated QDQ insertion, then folding into
    the lean QDQ form.

    A BatchNormalization left in the graph would stay float between a DQ and a Q (onnxruntime
    then runs float kernels and requantizes around it), so ``quantize`` folds every BatchNorm it
    can into its Conv/ConvTranspose/Gemm first (exact, as the ``fold-batchnorm`` pass);
    ``insert-qdq`` alone does not.
    """

    name: ClassVar[str] = "quantize"

    def __post_init__(self) -> None:
        super().__post_init__()
        self._unfoldable: dict[str, str] = {}

    def _float_batchnorm(self, bn: ir.Node) -> str:
        why = self._unfoldable.get(bn.name, "")
        return f"BatchNormalization stays float between DQ and Q: it cannot be folded ({why})"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        folded_bn = False
        old = self.opset_13(model)
        if _model_refusal(model) is None:
            NameFixPass()(model)  # the skips of both steps name the same nodes
            folded_bn, self._unfoldable = self.fold_batchnorm(model)
        result = super().call(model)
        if not result.modified:
            if not folded_bn:
                self.undo_opset_13(model, old)
            return ir.passes.PassResult(model, modified=folded_bn)
        fold = FoldQDQPass()
        fold.bind(self.context)
        fold.call(model)
        self.details["folded"] = len(fold.changed)
        return ir.passes.PassResult(model, modified=True)

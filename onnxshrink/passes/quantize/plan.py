"""Step 1: which nodes and tensors get quantized, and how the later steps are set up.

The rule per op is :func:`onnxshrink.analysis.qplan.plan_quantization`'s. The stem -- a Conv
reading the model's image input (≤ 4 channels) and the depthwise Convs that alone read its
output -- stays float unless ``stem=int8`` (:func:`~onnxshrink.analysis.qplan.stem_layers`):
onnxruntime's int8 kernels are slow on so few channels, and the image is not rounded.
``auto`` settings resolve here: with real data, empirical bias correction and Hessian-aware
rounding; ``cpu=auto`` follows this machine's int8 kernels; ``scope=auto`` is the linear scope
(MatMul/Gemm alone, :mod:`onnxshrink.analysis.qplan`) on an attention model, else ``all``;
``calibration=auto`` is minmax in the linear scope, else percentile.
"""

from __future__ import annotations

from onnxshrink import cpu as host
from onnxshrink.analysis.qplan import WEIGHTED_OPS, attention_like, stem_layers
from onnxshrink.errors import OptionError
from onnxshrink.irtools import inferred_dtypes
from onnxshrink.passes.quantize.state import QuantState, Step

__all__ = ["PlanLayers"]


class PlanLayers(Step):
    name = "plan"

    def run(self, p, state: QuantState) -> None:
        state.dtypes = inferred_dtypes(state.model)  # shape arithmetic is int64: left alone
        state.linear = p.scope == "linear" or (p.scope == "auto" and attention_like(state.model))
        if state.linear:
            p.details["scope"] = "linear" + (" (attention model)" if p.scope == "auto" else "")
        plan, refused = state.make_plan(p)
        for node, reason in refused:
            p.skip(node, reason)
        stem = (
            [] if p.stem == "int8" else [n.name for n in stem_layers(plan, rule=p.stem == "auto")]
        )
        if stem:
            for name in stem:
                p.skip(
                    name,
                    f"stem kept float (stem={p.stem}): onnxruntime's int8 kernels are slower "
                    f"on an image's few channels, and the image is not rounded",
                )
            p.details["float_stem"] = stem
            state.exclude |= set(stem)
            plan, _ = state.make_plan(p)
        state.plan = plan
        if not plan.nodes:
            state.done = True
            return
        if not any(n.op_type in WEIGHTED_OPS for n in plan.nodes):
            p.skip(
                "model",
                "no Conv, Gemm or MatMul with float weights to quantize (activations "
                "alone would only add rounding and Q/DQ ops)",
            )
            state.done = True
            return
        if state.data is None:
            raise OptionError(f"pass '{p.name}' needs calibration data")
        real = p.has_real_data
        state.bias_mode = (
            p.bias_correction if p.bias_correction != "auto" else ("empirical" if real else "off")
        )
        state.rounding = p.rounding if p.rounding != "auto" else ("hessian" if real else "nearest")
        if p.calibration != "auto":
            state.calibration = p.calibration
        elif plan.linear:  # a transformer's rare large activations carry its output: not clipped
            state.calibration = "minmax"
        state.safe = p.cpu == "any" or (p.cpu == "auto" and host.this_cpu().int8 != "exact")

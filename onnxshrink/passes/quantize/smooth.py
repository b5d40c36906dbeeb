"""Step 1b: SmoothQuant on the inputs of the layers the linear scope quantizes.

With real data (``smooth=auto``) in the linear scope (attention models), each quantized MatMul /
Gemm input X with weights W_i is smoothed where that lowers the quantized output error on the
calibration rows: X/s feeds the layers (folded into the LayerNormalization that makes X, or a
Mul) and W_i ← diag(s)·W_i, s_j = max|X_j|^α / max|W_j|^(1−α), α chosen per tensor
(:mod:`onnxshrink.passes.quantize_smooth`). Exact in float; the plan is made again after it,
since a Mul put in front of the layers is the tensor they now read.
"""

from __future__ import annotations

from onnxshrink.passes.quantize.state import QuantState, Step
from onnxshrink.passes.quantize_smooth import smooth_inputs

__all__ = ["Smooth"]


class Smooth(Step):
    name = "smooth"

    def wanted(self, p, state: QuantState) -> bool:
        return state.plan.linear and p.smooth == "auto" and p.has_real_data

    def run(self, p, state: QuantState) -> None:
        smoothed = smooth_inputs(p, state.model, list(state.plan.nodes), state.safe)
        chosen = {name: r for name, r in smoothed.items() if r["alpha"] is not None}
        p.details["smoothing"] = chosen
        for name, r in chosen.items():
            p.change(f"smoothed {name} (alpha {r['alpha']:g}, {r['how']})")
        if chosen:
            state.plan, _ = state.make_plan(p)

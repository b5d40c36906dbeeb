"""Step 5 (``min-fidelity``): mixed precision -- the most sensitive layers stay float.

Sensitivity of a layer = the cosine gained when only it is left float, all others quantized,
measured with onnxruntime's integer kernels on the first 32 calibration samples
(:class:`onnxshrink.search.Fidelity`); the most sensitive are left float one by one, re-measuring
the whole model, until the cosine reaches ``min-fidelity`` or ``max-float`` layers are float
(:func:`onnxshrink.search.spare_until`). Each trial is a copy quantized with the ranges and
rounded weights already found, then folded: nothing is re-calibrated.
"""

from __future__ import annotations

import onnx_ir as ir

from onnxshrink.analysis.qplan import COMPUTE_OPS
from onnxshrink.passes.quantize.fold import FoldQDQPass
from onnxshrink.passes.quantize.insert import rewrite
from onnxshrink.passes.quantize.state import DISCARD, QuantState, Step
from onnxshrink.search import Fidelity, spare_until

__all__ = ["MixedPrecision"]


class MixedPrecision(Step):
    name = "mixed-precision"

    def wanted(self, p, state: QuantState) -> bool:
        return p.min_fidelity is not None

    def run(self, p, state: QuantState) -> None:
        kept = self._float_layers(p, state)
        for name in kept:
            p.skip(name, "kept float by mixed precision (most sensitive layers)")
        state.exclude |= set(kept)
        if kept:  # the saturated reference the calibration sweep measured clipped them
            state.reference_moments = None
        state.plan, _ = state.make_plan(p)

    @staticmethod
    def _variant(p, state: QuantState, exclude: set[str]) -> ir.Model:
        clone = state.model.clone()
        plan, _ = state.make_plan(p, clone, exclude)
        rewrite(p, state, clone, plan, DISCARD, means=state.means, deltas=None, moved=None)
        FoldQDQPass().call(clone)
        return clone

    def _float_layers(self, p, state: QuantState) -> list[str]:
        n = min(32, state.data.n_samples)
        fidelity = Fidelity(state.model, state.data, n, state.workdir, optimize=True)
        base = set(state.exclude)
        full = fidelity(self._variant(p, state, base))
        p.details["fidelity_all_quantized"] = round(full, 6)
        if full >= p.min_fidelity:
            return []
        candidates = [node.name for node in state.plan.nodes if node.op_type in COMPUTE_OPS]
        task = p.task(f"{p.name}: layer sensitivity", len(candidates))
        gains = {}
        for name in candidates:
            gains[name] = fidelity(self._variant(p, state, base | {name})) - full
            task(1)
        task.done()
        order = sorted(gains, key=gains.get, reverse=True)
        kept, current = spare_until(
            order,
            lambda spared: fidelity(self._variant(p, state, base | spared)),
            p.min_fidelity,
            limit=p.max_float,
        )
        current = full if current is None else current
        p.details["mixed_precision"] = {
            "float": kept,
            "fidelity": round(current, 6),
            "sensitivity": {k: round(gains[k], 6) for k in order[:10]},
        }
        return kept

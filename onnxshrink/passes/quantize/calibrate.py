"""Steps 2-3: range balancing, then activation ranges measured in cascade.

Balance (``balance``; ``auto`` = on with real data): a tensor that only depthwise Convs read has
its channels scaled by (R/m_c)^α in the producer and divided back in the depthwise filters
(:mod:`onnxshrink.analysis.balance`): exact, per-channel activation steps in effect.

Calibrate: each quantized tensor's range by ``calibration`` (minmax | percentile | entropy |
mse), re-measured on the float model saturated at the quantized grids until no range end moves
by more than 1% of its width (``cascade-rounds``,
:func:`onnxshrink.analysis.ranges.cascade_calibrate`);
the per-channel means of Conv/Gemm inputs come with it (bias correction).
"""

from __future__ import annotations

import numpy as np

from onnxshrink.analysis.balance import apply_balance, balance_pairs, channel_max
from onnxshrink.analysis.qplan import QuantPlan
from onnxshrink.analysis.ranges import SETTLED, cascade_calibrate, grid_bounds
from onnxshrink.passes.quantize.state import QuantState, Step

__all__ = ["Balance", "Calibrate", "saturation_bounds"]


def saturation_bounds(plan: QuantPlan, ranges, activations: str) -> dict[str, tuple[float, float]]:
    """Float-model tensor -> the interval the quantized model clips it to: each quantized
    tensor's grid, on the tensor its range comes from (a fused ReLU's output, say)."""
    bounds: dict[str, tuple[float, float]] = {}
    for t, (lo, hi) in plan.params(dict(ranges)).items():
        lo, hi = grid_bounds(lo, hi, activations)
        src = plan.tensors[t]
        if src in bounds:  # two quantized tensors on one source: the narrower grid clips
            lo, hi = max(lo, bounds[src][0]), min(hi, bounds[src][1])
        bounds[src] = (lo, hi)
    return bounds


class Balance(Step):
    name = "balance"

    def wanted(self, p, state: QuantState) -> bool:
        return p.balance == "on" or (p.balance == "auto" and p.has_real_data)

    def run(self, p, state: QuantState) -> None:
        model, data = state.model, state.data
        sources = set(state.plan.tensors.values())
        pairs = [pr for pr in balance_pairs(model.graph) if pr.tensor.name in sources]
        if not pairs:
            return
        n = min(p.samples, data.n_samples)
        task = p.task(f"{p.name}: channel ranges", n)
        maxes = channel_max(
            model, [pr.tensor.name for pr in pairs], data, state.workdir, n, progress=task
        )
        task.done()
        gains = []
        for pr in pairs:
            m = maxes[pr.tensor.name]
            s = apply_balance(model.graph, pr, m, p.balance_alpha)
            gains.append(float(np.mean(s)))
            p.change(
                f"balanced {pr.tensor.name} ({len(m)} channels, scale "
                f"x{s.min():.2g}..x{s.max():.2g}) "
                f"between {pr.producer.name} and {', '.join(u.name for u in pr.consumers)}"
            )
        p.details["balanced"] = {
            "tensors": len(pairs),
            "mean_scale": round(float(np.mean(gains)), 3),
        }


class Calibrate(Step):
    name = "calibrate"

    def run(self, p, state: QuantState) -> None:
        plan, data = state.plan, state.data
        sources = sorted(set(plan.tensors.values()))
        mean_names = sorted({n.inputs[0].name for n in plan.nodes if n.op_type in ("Conv", "Gemm")})
        n = min(p.samples, data.n_samples)
        passes = 1 if p.calibration == "minmax" else 2
        task = p.task(f"{p.name}: calibration", n * (passes + p.cascade_rounds))
        found = cascade_calibrate(
            state.model,
            lambda r: saturation_bounds(plan, r, p.activations),
            sources,
            mean_names,
            data,
            state.workdir,
            n,
            p.calibration,
            p.percentile,
            p.cascade_rounds,
            progress=task,
        )
        task.done()
        if p.cascade_rounds:
            narrowed = sorted(found.shrunk.items(), key=lambda kv: kv[1])
            p.details["cascade"] = {
                "rounds": len(found.changes),
                "largest_move": [round(c, 4) for c in found.changes],
                "narrowed": len(narrowed),
                "narrowest": {k: round(v, 3) for k, v in narrowed[:5]},
            }
            if found.changes and found.changes[-1] > SETTLED:
                p.details["cascade"]["note"] = (
                    f"ranges still moved {found.changes[-1]:.1%} in the last "
                    f"round (cascade-rounds={p.cascade_rounds})"
                )
        state.ranges = found.ranges
        state.means = found.means if state.bias_mode != "off" else None

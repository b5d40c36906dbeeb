"""Steps 2-3: range balancing, then activation ranges measured in cascade.

Balance (``balance``; ``auto`` = on with real data): a tensor that only depthwise or 1×1 Convs
read has its channels scaled by (R/m_c)^α in the producer and divided back in the readers
(:mod:`onnxshrink.analysis.balance`; α by the readers' error with 1×1 ones): exact, per-channel
activation steps in effect.

Calibrate: each quantized tensor's range by ``calibration`` (minmax | percentile | entropy |
mse), measured in one sweep on the float model saturated at the quantized grids upstream
(:func:`onnxshrink.analysis.cascade.cascade_calibrate`; ``cascade-rounds=0``: not saturated;
a grid shared over a Concat takes up to ``cascade-rounds`` sweeps to settle). The same sweep
balances the chosen tensors where they are computed, and takes for the later steps the
per-channel means of Conv/Gemm inputs (bias correction), the Conv/Gemm outputs' moments (the
empirical bias's reference) and the Gram matrices of Hessian-aware rounding.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from onnxshrink.analysis.balance import (
    apply_balance,
    balance_pairs,
    choose_alpha,
    sample_rows,
    tensor_maxima,
)
from onnxshrink.analysis.cascade import MomentTap, Tap, cascade_calibrate
from onnxshrink.analysis.qplan import QuantPlan
from onnxshrink.analysis.ranges import SETTLED, grid_bounds
from onnxshrink.analysis.rounding import Grams, gram_chunks
from onnxshrink.passes.quantize.state import QuantState, Step
from onnxshrink.passes.quantize.weights import hessian_nodes

__all__ = ["Balance", "Calibrate", "saturation_bounds"]


def saturation_bounds(plan: QuantPlan, ranges, activations: str) -> dict[str, tuple[float, float]]:
    """Float-model tensor -> the interval the quantized model clips it to: each quantized
    tensor's grid, on the tensor its range comes from (a fused ReLU's output, say). ``plan`` is
    left as it is (its ``params`` drops tensors not in ``ranges``: here, not measured yet)."""
    bounds: dict[str, tuple[float, float]] = {}
    plan = dataclasses.replace(plan, tensors=dict(plan.tensors))
    for t, (lo, hi) in plan.params(dict(ranges)).items():
        lo, hi = grid_bounds(lo, hi, activations)
        src = plan.tensors[t]
        if src in bounds:  # two quantized tensors on one source: the narrower grid clips
            lo, hi = max(lo, bounds[src][0]), min(hi, bounds[src][1])
        bounds[src] = (lo, hi)
    return bounds


class Balance(Step):
    """Which tensors get balanced; the calibration sweep measures and balances them."""

    name = "balance"

    def wanted(self, p, state: QuantState) -> bool:
        return p.balance == "on" or (p.balance == "auto" and p.has_real_data)

    def run(self, p, state: QuantState) -> None:
        sources = set(state.plan.tensors.values())
        state.balance = [pr for pr in balance_pairs(state.model.graph) if pr.tensor.name in sources]


class BalanceTap(Tap):
    """Balances each pair where its producer's output is computed, before anything reads it:
    m_c (and, with pointwise readers, α) from the output's batches, s_c written into both
    layers (:func:`apply_balance`), and the output's values multiplied by s_c -- what the
    scaled producer now computes (s_c·m_c ≤ R stays below a Clip's ceiling). Once: a further
    sweep finds the model balanced."""

    edits = True

    def __init__(self, graph, pairs, alpha: float, safe: bool) -> None:
        self.graph, self.alpha, self.safe = graph, alpha, safe
        self.pairs = {pr.producer.outputs[0].name: pr for pr in pairs}
        self.names = frozenset(self.pairs)
        self.scales: dict[str, np.ndarray] = {}
        self.alphas: dict[str, float | None] = {}  # tensors with pointwise readers

    def see(self, name: str, arrays: list[np.ndarray]) -> None:
        pr = self.pairs[name]
        if pr.tensor.name in self.scales or pr.tensor.name in self.alphas:
            return
        m, alpha = tensor_maxima(pr, arrays), self.alpha
        if pr.pointwise:
            alpha, _ = choose_alpha(pr, sample_rows(pr, arrays), m, self.alpha, self.safe)
            self.alphas[pr.tensor.name] = alpha
            if alpha is None:
                return
        s = apply_balance(self.graph, pr, m, alpha)
        self.scales[pr.tensor.name] = s
        for a in arrays:
            a *= s.reshape((-1,) + (1,) * (a.ndim - 2)).astype(a.dtype)

    def report(self, p) -> None:
        for pr in self.pairs.values():
            s = self.scales.get(pr.tensor.name)
            if s is None:
                continue
            chosen = self.alphas.get(pr.tensor.name)
            how = f", alpha {chosen:g} by the readers' error" if chosen is not None else ""
            p.change(
                f"balanced {pr.tensor.name} ({len(s)} channels, scale "
                f"x{s.min():.2g}..x{s.max():.2g}{how}) "
                f"between {pr.producer.name} and {', '.join(u.name for u in pr.consumers)}"
            )
        if self.scales:
            p.details["balanced"] = {
                "tensors": len(self.scales),
                "mean_scale": round(float(np.mean([s.mean() for s in self.scales.values()])), 3),
                "pointwise_readers": {
                    "balanced": sum(a is not None for a in self.alphas.values()),
                    "left": sum(a is None for a in self.alphas.values()),
                },
            }


class Calibrate(Step):
    name = "calibrate"

    def run(self, p, state: QuantState) -> None:
        plan, data = state.plan, state.data
        sources = sorted(set(plan.tensors.values()))
        n = min(p.samples, data.n_samples)
        shared = p.cascade_rounds > 0 and any(len(g) > 1 for g in plan.concat)
        taps = self._taps(p, state)
        task = p.task(f"{p.name}: calibration", n * (p.cascade_rounds if shared else 1))
        found = cascade_calibrate(
            state.model,
            lambda r: saturation_bounds(plan, r, p.activations),
            sources,
            data,
            n,
            state.calibration,
            p.percentile,
            p.cascade_rounds,
            shared_downstream=shared,
            taps=tuple(taps.values()),
            progress=task,
        )
        task.done()
        if p.cascade_rounds:
            clipped = sorted(found.clipped.items(), key=lambda kv: -kv[1])
            p.details["cascade"] = {
                "sweeps": 1 + len(found.changes),
                "largest_move": [round(c, 4) for c in found.changes],
                "clipped": len(clipped),
                "most_clipped": {k: round(v, 5) for k, v in clipped[:5]},
            }
            if found.changes and found.changes[-1] > SETTLED:
                p.details["cascade"]["note"] = (
                    f"ranges still moved {found.changes[-1]:.1%} in the last "
                    f"sweep (cascade-rounds={p.cascade_rounds})"
                )
        state.ranges = found.ranges
        if "means" in taps:
            state.means = {k: m.mean for k, m in taps["means"].moments.items()}
        if "reference" in taps:
            state.reference_moments = taps["reference"].moments
        if "grams" in taps:
            state.grams = taps["grams"].grams
        if "balance" in taps:
            taps["balance"].report(p)

    @staticmethod
    def _taps(p, state: QuantState) -> dict[str, Tap]:
        """What the later steps take from the calibration sweep: the per-channel means of the
        Conv/Gemm inputs (bias correction), their outputs' moments before their own clipping
        (the saturated reference of empirical bias correction) and the Gram matrices of the
        layers Hessian-aware rounding steers (those that fit in memory at once)."""
        taps: dict[str, Tap] = {}
        if state.balance:
            taps["balance"] = BalanceTap(
                state.model.graph, state.balance, p.balance_alpha, state.safe
            )
        convs = [n for n in state.model.graph if n.op_type in ("Conv", "Gemm")]
        if state.bias_mode != "off":  # empirical too: it starts from the weights' correction
            inputs = {n.inputs[0].name for n in state.plan.nodes if n.op_type in ("Conv", "Gemm")}
            taps["means"] = MomentTap(inputs, saturated=True)
        if state.bias_mode == "empirical" and convs:
            taps["reference"] = MomentTap({n.outputs[0].name for n in convs}, saturated=False)
        if state.rounding == "hessian":
            nodes = hessian_nodes(state, {})
            if nodes:
                taps["grams"] = GramTap(gram_chunks(nodes)[0])
        return taps


class GramTap(Tap):
    """The input Gram matrices of ``nodes`` (:class:`onnxshrink.analysis.rounding.Grams`), as
    each node reads its input: after that tensor's clipping."""

    saturated = True

    def __init__(self, nodes) -> None:
        self.nodes = nodes
        self.names = frozenset(n.inputs[0].name for n in nodes)
        self.start()

    def start(self) -> None:
        self.grams = Grams(self.nodes)

    def see(self, name: str, arrays: list[np.ndarray]) -> None:
        for a in arrays:
            self.grams.add(name, a)

"""Bias correction: the output mean shift that quantization causes, taken out of the bias.

``weights`` (Nagel et al. 2019): weight rounding moves output channel o's mean by
Σ_{c,k} (Q(W) − W)[o, c, k] · E[x_c]; the bias absorbs it. ``full`` also corrects
Q(W) · E[Q(x) − x], the shift from quantizing the layer's input (:class:`InputErrors`).
``empirical`` (``auto`` with real data): after the rewrite every Conv / Gemm in graph order moves
its bias so its output's per-channel mean in the quantized model equals that of the float model
saturated at the quantized grids (:class:`SaturatedReference`; noise through a ReLU has a
positive mean no per-layer formula sees) -- against the saturated model, so the clipping the
ranges chose stays (:func:`onnxshrink.analysis.bias.empirical_correction`).
"""

from __future__ import annotations

import numpy as np

from onnxshrink.analysis.bias import (
    apply_to_mean,
    empirical_correction,
    input_moments,
    quantization_shift,
    subtract_from_bias,
)
from onnxshrink.analysis.ranges import clipped_copy, qparams
from onnxshrink.calibrate import all_values
from onnxshrink.passes.quantize.calibrate import saturation_bounds
from onnxshrink.passes.quantize.state import QuantState, Step

__all__ = ["EmpiricalBias", "InputErrors", "SaturatedReference", "correct_bias"]


def correct_bias(graph, node, w, deq, mu, delta=None) -> None:
    """b -= (Q(W) − W)·E[x] + Q(W)·E[Q(x) − x]: the output mean shift that weight rounding and
    input quantization cause, per output channel (E[W_q x_q] − E[W x], expanded)."""
    shift = apply_to_mean(node, deq - w.astype(np.float64), mu)
    if delta is not None:
        shift = shift + apply_to_mean(node, deq, delta)
    subtract_from_bias(graph, node, shift)


class InputErrors(Step):
    """``bias-correction=full``: per-channel mean of Q(x) − x for each Conv/Gemm input x."""

    name = "input-errors"

    def wanted(self, p, state: QuantState) -> bool:
        return state.bias_mode == "full"

    def run(self, p, state: QuantState) -> None:
        plan = state.plan
        params = plan.params(dict(state.ranges))
        pairs = {f: q for f, q in plan.inputs.values() if q in params}
        if not pairs:
            state.deltas = {}
            return
        qp = {f: qparams(*params[q], p.activations) for f, q in pairs.items()}
        n = min(p.samples, state.data.n_samples)
        task = p.task(f"{p.name}: bias correction", n)
        state.deltas = quantization_shift(
            state.model, qp, p.activations, state.data, state.workdir, n, progress=task
        )
        task.done()


class SaturatedReference(Step):
    """``bias-correction=empirical``: the float model clipped at the grids, before the rewrite
    (unless the calibration sweep already measured its Conv/Gemm outputs)."""

    name = "saturated-reference"

    def wanted(self, p, state: QuantState) -> bool:
        return state.bias_mode == "empirical" and state.reference_moments is None

    def run(self, p, state: QuantState) -> None:
        state.reference = clipped_copy(
            state.model, saturation_bounds(state.plan, state.ranges, p.activations)
        )


class EmpiricalBias(Step):
    """Sequential empirical bias correction of every Conv / Gemm with a constant bias."""

    name = "empirical-bias"

    def wanted(self, p, state: QuantState) -> bool:
        return state.reference is not None or state.reference_moments is not None

    def run(self, p, state: QuantState) -> None:
        model, reference = state.model, state.reference
        tapped = state.reference_moments
        known = set(tapped) if tapped is not None else {v.name for v in all_values(reference.graph)}
        nodes = [
            n
            for n in model.graph
            if n.op_type in ("Conv", "Gemm")
            and n.outputs[0].name in known
            and not (n.op_type == "Gemm" and n.attributes.get_int("transA", 0))
        ]
        if not nodes:
            return
        n = min(p.samples, state.data.n_samples)
        task = p.task(f"{p.name}: empirical bias correction", n * (2 if tapped is None else 1))
        names = [node.outputs[0].name for node in nodes]
        want = tapped or input_moments(reference, names, state.data, state.workdir, n, task)
        moved = empirical_correction(model, want, nodes, state.data, n, progress=task)
        task.done()
        if moved:
            shifts = sorted(moved.values())
            p.details["empirical_bias"] = {
                "layers": len(moved),
                "median_shift": round(shifts[len(shifts) // 2], 4),
                "largest_shift": round(shifts[-1], 4),
            }

"""Hessian-aware rounding whose damping is chosen on held-out calibration rows.

GPTQ (:func:`onnxshrink.analysis.rounding.round_int8`) minimises the output error on the rows
it saw; where those rows leave directions of the input barely excited, it parks rounding
error there, and a new input that excites them pays for it. The calibration samples are split:
H_fit from the first three quarters, H_val from the rest. Each candidate -- nearest rounding,
and GPTQ on H_fit with each damping of :data:`DAMPS` -- is scored by its relative output error
on H_val, tr(EᵀH_val E) / tr(WᵀH_val W); the winner is applied with H_fit + H_val (nearest
stays nearest): never worse on held-out rows than rounding to nearest. GPTQ's own damping,
0.01, is not a candidate: held-out sentences as alike as the calibration ones did not show
what it cost on a sentence unlike them (docs/benchmarks.md, "Transformers").
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import onnx_ir as ir

from onnxshrink.analysis.refit import current_solution
from onnxshrink.analysis.rounding import Grams, round_int8, too_few_rows

__all__ = ["DAMPS", "choose", "choose_in_parts", "choose_rounding", "held_out_grams"]

DAMPS = (0.1, 1.0)


class _FitThenHeldOut:
    """The first ``samples`` of ``data`` fed as the fit part's batches, then the held-out
    part's: the batches (and so the rows sampled from them) are those of the two parts alone."""

    def __init__(self, data, fit: int, samples: int) -> None:
        self.parts = (data.subset(slice(0, fit)), data.subset(slice(fit, samples)))
        self.n_samples = samples
        self.fit_batches = sum(1 for _ in self.parts[0].batches())

    def batches(self, limit: int | None = None) -> Iterator[dict[str, np.ndarray]]:
        for part in self.parts:
            yield from part.batches()


def held_out_grams(
    model: ir.Model, nodes: list[ir.Node], data, samples: int, refused, progress
) -> Iterator[tuple[ir.Node, np.ndarray, np.ndarray]]:
    """(node, H_fit, H_val) of every node with enough rows (the others in ``refused``), in
    graph order, from one sweep of the model (:class:`onnxshrink.sweep.Sweep`) cut at the
    nodes' inputs: each segment's session holds only its own weights, and a node's Grams are
    handed out (and can be dropped) before the next input is reached. The model must not be
    changed until the iteration ends."""
    from onnxshrink.sweep import Sweep

    fit = max(1, samples * 3 // 4)
    if samples - fit < 1:
        return
    feeds = _FitThenHeldOut(data, fit, samples)
    readers: dict[str, list[ir.Node]] = {}
    for i, node in enumerate(nodes):
        readers.setdefault(node.inputs[0].name, []).append((i, node))
    for name, arrays in Sweep(model, list(readers), feeds, samples, progress=progress):
        chunk = [n for _, n in readers[name]]
        seeds = [i for i, _ in readers[name]]
        parts = [Grams(chunk, seeds=seeds) for _ in range(2)]  # fit, held out
        for b, x in enumerate(arrays):
            parts[b >= feeds.fit_batches].add(name, x)
        for node in chunk:
            (H_fit, rows), (H_val, _) = parts[0].pop(node), parts[1].pop(node)
            if reason := too_few_rows(H_fit, rows):
                refused[node.name] = reason
            else:
                yield node, H_fit, H_val


def _system(node: ir.Node, q: np.ndarray, scale: np.ndarray, b) -> np.ndarray:
    """The dequantized layer as the rounding's system [1, D, o] (bias row last for a Gemm)."""
    if node.op_type == "Gemm" and node.attributes.get_int("transB", 0):
        W = (q * np.reshape(scale, (-1, 1))).T
    else:
        W = q * np.reshape(scale, (1, -1))
    if node.op_type == "MatMul":
        return W[None].astype(np.float64)
    if b is None:
        b = current_solution(node, True)[0, -1]
    return np.concatenate([W, np.reshape(b, (1, -1))], 0)[None].astype(np.float64)


def choose(W, H_fit, H_val, nearest: np.ndarray, fit) -> tuple[float | None, dict]:
    """(damping of the best candidate, None for nearest; record) for a layer whose system is
    ``W`` [1, D, o]: ``nearest`` its nearest rounding, ``fit(H, damp)`` its GPTQ rounding, both
    as systems; scored by the relative output error on ``H_val``."""
    return choose_in_parts([(W, nearest, fit)], H_fit, H_val)


def choose_in_parts(parts, H_fit, H_val) -> tuple[float | None, dict]:
    """:func:`choose` over ``parts``, (W, nearest, fit) of disjoint output columns of one
    layer: their errors add up, so a wide layer (a vocabulary head) can come one column chunk
    at a time and hold one chunk's float64 copies."""
    num: dict[str, float] = {}
    den = 0.0
    for W, nearest, fit in parts:
        den += float(np.einsum("gio,gio->", W, H_val @ W))
        candidates = {"nearest": nearest}
        for damp in DAMPS:
            candidates[f"damp {damp:g}"] = fit(H_fit, damp)
        for name, W_hat in candidates.items():  # tr(EᵀH_val E), over tr(WᵀH_val W) below
            E = W_hat - W
            num[name] = num.get(name, 0.0) + float(np.einsum("gio,gio->", E, H_val @ E))
        del candidates, W_hat, E
    errors = {k: v / max(den, 1e-30) for k, v in num.items()}
    best = min(errors, key=errors.get)
    record = {"chosen": best, "held_out_error": {k: round(v, 8) for k, v in errors.items()}}
    return (None if best == "nearest" else float(best.split()[1])), record


def choose_rounding(
    node: ir.Node, H_fit, H_val, scale, axis: int, nearest_q, *, safe: bool
) -> tuple[np.ndarray, object, int, dict]:
    """(int8 weight, bias or None, weights the pair rule moved, record) of the best candidate:
    ``nearest_q`` (the nearest-rounded weight) or GPTQ at one of :data:`DAMPS`."""
    W = current_solution(node, node.op_type != "MatMul")

    def fit(H, damp):
        q, b, _, _ = round_int8(node, H, scale, axis, safe=safe, damp=damp, errors=False)
        return _system(node, q, scale, b)

    damp, record = choose(W, H_fit, H_val, _system(node, nearest_q, scale, None), fit)
    if damp is None:
        return nearest_q, None, 0, record
    q, b, _, moved = round_int8(
        node, H_fit + H_val, scale, axis, safe=safe, damp=damp, errors=False
    )
    return q, b, moved, record

"""Least-squares re-fit of a layer's weights on calibration data (He et al., ICCV 2017).

After channels are removed, a consumer layer sees fewer inputs. Its remaining weights W (and a
bias b) are re-solved so its output matches the *teacher's* output for the same layer:

    minimise  ‖Y − [X, 1]·[W; bᵀ]‖² + λ‖W‖²,    λ = ridge · trace(XᵀX) / d

where X holds the layer's inputs in the pruned (student) model -- im2col patches for a Conv --
and Y the teacher's layer outputs on the same samples and positions. Only the normal equations
are kept: A = Σ [X,1]ᵀ[X,1] and B = Σ [X,1]ᵀY, accumulated batch by batch (memory does not grow
with the number of samples); at most ``rows`` positions per batch are sampled (seeded).

Supported layers: Conv (2-D; grouped and depthwise ones as one small system per group, stacked:
A is [groups, d+1, d+1]) and Gemm (bias refitted; alpha, beta reset to 1) and MatMul with a 2-D
input (weights only).
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_ir as ir

from onnxshrink import marks
from onnxshrink.irtools import const_array, set_const_input
from onnxshrink.timing import timed

__all__ = [
    "NormalEquations",
    "conv_patches",
    "input_rows",
    "refit_supported",
    "solve",
    "write_weights",
]

logger = logging.getLogger(__name__)


MAX_FAN_IN = 8192  # inputs per output: the normal equations take fan-in² float64 (512 MB here)


def _fan_in(node: ir.Node) -> int | None:
    w = const_array(node.inputs[1]) if len(node.inputs) > 1 else None
    if w is None or w.ndim < 2:
        return None
    if node.op_type == "Conv":
        return int(np.prod(w.shape[1:]))
    if node.op_type == "Gemm":
        return int(w.shape[1] if node.attributes.get_int("transB", 0) else w.shape[0])
    return int(w.shape[-2])


def refit_supported(node: ir.Node) -> str | None:
    """None when ``node`` can be re-fitted, else the reason."""
    if (fan_in := _fan_in(node)) is not None and fan_in > MAX_FAN_IN:
        gb = fan_in**2 * 8 / 2**30
        return f"{fan_in} inputs per output: its normal equations would take {gb:.0f} GiB"
    if node.op_type == "Conv":
        w = const_array(node.inputs[1])
        if w is None or w.ndim != 4:
            return "only 2-D convolutions are re-fitted"
        if node.attributes.get_string("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
            return "auto_pad SAME_* convolutions are not re-fitted"
        return None
    if node.op_type == "Gemm":
        return (
            "Gemm with transA=1 is not re-fitted" if node.attributes.get_int("transA", 0) else None
        )
    if node.op_type == "MatMul":
        return None
    return f"{node.op_type} is not re-fitted"


def _conv_geometry(node: ir.Node, kernel: tuple[int, int]):
    pads = list(node.attributes.get_ints("pads", [0, 0, 0, 0]))
    strides = list(node.attributes.get_ints("strides", [1, 1]))
    dil = list(node.attributes.get_ints("dilations", [1, 1]))
    return pads, strides, dil


def conv_patches(
    x: np.ndarray, node: ir.Node, kernel: tuple[int, int], rows: np.ndarray
) -> np.ndarray:
    """im2col rows: patch of output position ``rows`` (flat over N, Ho, Wo) as [R, C·kh·kw].

    Gathered straight from ``x`` for the sampled positions only (taps in the zero padding read
    0), so a few sampled rows do not cost a padded copy of the whole batch; when the patches
    outweigh the batch, from a padded channels-last copy (contiguous channel rows)."""
    (pt, pl, pb, pr), (sh, sw), (dh, dw) = _conv_geometry(node, kernel)
    kh, kw = kernel
    n, c, h, w = x.shape
    ho = (h + pt + pb - ((kh - 1) * dh + 1)) // sh + 1
    wo = (w + pl + pr - ((kw - 1) * dw + 1)) // sw + 1
    ni, hi, wi = np.unravel_index(rows, (n, ho, wo))
    if x.size <= 2 * len(rows) * c * kh * kw:  # a small map: gather whole channel rows
        xp = np.zeros((n, h + pt + pb, w + pl + pr, c), x.dtype)  # channels last, padded
        xp[:, pt : pt + h, pl : pl + w] = x.transpose(0, 2, 3, 1)
        ih = (hi * sh)[:, None] + np.arange(kh) * dh
        iw = (wi * sw)[:, None] + np.arange(kw) * dw
        patch = xp[ni[:, None, None], ih[:, :, None], iw[:, None, :]]  # [R, kh, kw, C]
        return patch.transpose(0, 3, 1, 2).reshape(len(rows), -1)
    ih = (hi * sh - pt)[:, None] + np.arange(kh) * dh  # [R, kh]
    iw = (wi * sw - pl)[:, None] + np.arange(kw) * dw  # [R, kw]
    inside = ((ih >= 0) & (ih < h))[:, :, None] & ((iw >= 0) & (iw < w))[:, None, :]
    ih, iw = np.clip(ih, 0, h - 1), np.clip(iw, 0, w - 1)
    patch = x[ni[:, None, None], :, ih[:, :, None], iw[:, None, :]]  # [R, kh, kw, C]
    if not inside.all():
        patch = patch * inside[:, :, :, None]
    return patch.transpose(0, 3, 1, 2).reshape(len(rows), -1)


def _positions(x: np.ndarray, node: ir.Node, kernel: tuple[int, int]) -> int:
    """N·Ho·Wo: the number of output positions of a 2-D Conv on input ``x``."""
    (pt, pl, pb, pr), (sh, sw), (dh, dw) = _conv_geometry(node, kernel)
    ho = (x.shape[2] + pt + pb - ((kernel[0] - 1) * dh + 1)) // sh + 1
    wo = (x.shape[3] + pl + pr - ((kernel[1] - 1) * dw + 1)) // sw + 1
    return x.shape[0] * ho * wo


def input_rows(node: ir.Node, x: np.ndarray, rng: np.random.Generator, rows: int) -> np.ndarray:
    """The rows a layer multiplies its weights by, [R, d] (grouped Conv: [R, G, d/G]): sampled
    im2col patches (at most ``rows`` per batch) for a Conv, samples for Gemm/MatMul."""
    if node.op_type == "Conv":
        w = const_array(node.inputs[1])
        kernel = (w.shape[2], w.shape[3])
        total = _positions(x, node, kernel)
        idx = np.sort(rng.choice(total, min(rows, total), replace=False))
        X = conv_patches(x, node, kernel, idx)
        g = _groups(node)  # channel-major patches: group i's inputs are one contiguous block
        return X.reshape(len(idx), g, -1) if g > 1 else X
    return x.reshape(-1, x.shape[-1])


@dataclasses.dataclass
class NormalEquations:
    """Σ [X, 1]ᵀ[X, 1], Σ [X, 1]ᵀY and Σ‖Y‖² for one layer, one system per group:
    A [G, d(+1), d(+1)], B [G, d(+1), outputs per group] (G = 1 but for grouped convs)."""

    bias: bool
    A: np.ndarray | None = None
    B: np.ndarray | None = None
    yy: float = 0.0
    n: int = 0

    def add(self, X: np.ndarray, Y: np.ndarray) -> None:
        """Rows X [R, d] and Y [R, o], or per group X [R, G, d] and Y [R, G, o/G]."""
        X = np.asarray(X, np.float64)
        Y = np.asarray(Y, np.float64)
        if X.ndim == 2:
            X, Y = X[:, None, :], Y[:, None, :]
        if self.bias:
            X = np.concatenate([X, np.ones(X.shape[:2] + (1,))], axis=2)
        Xg = X.transpose(1, 2, 0)  # [G, d, R]: batched BLAS products
        a, b = Xg @ Xg.transpose(0, 2, 1), Xg @ Y.transpose(1, 0, 2)
        if self.A is None:
            self.A, self.B = a, b
        else:
            self.A += a
            self.B += b
        self.yy += float(np.square(Y).sum())
        self.n += X.shape[0]

    def error(self, W: np.ndarray) -> float:
        """Relative squared error ‖Y − XW‖² / ‖Y‖² of the (bias-augmented) solution ``W``."""
        err = float(
            np.einsum("gio,gio->", W, self.A @ W) - 2 * np.einsum("gio,gio->", W, self.B) + self.yy
        )
        return max(err, 0.0) / max(self.yy, 1e-30)


def solve(eq: NormalEquations, ridge: float, prior: np.ndarray | None = None) -> np.ndarray:
    """The ridge solution [W; bᵀ] per group, [G, d (+1), outputs/G], shrunk towards ``prior``.

    Minimises ‖Y − XW‖² + λ‖W − prior‖² (prior = 0 without one): λ → ∞ keeps the prior (the
    cut weights), λ → 0 is plain least squares. λ = ridge · trace(XᵀX) / d (over all groups).
    """
    A = eq.A.copy()
    B = eq.B.copy()
    d = A.shape[1] - (1 if eq.bias else 0)
    lam = max(
        ridge * float(np.trace(A[:, :d, :d], axis1=1, axis2=2).sum()) / max(d * A.shape[0], 1),
        1e-12,
    )
    A[:, np.arange(d), np.arange(d)] += lam
    if prior is not None:
        B[:, :d] += lam * prior[:, :d]
    try:
        return np.linalg.solve(A, B)
    except np.linalg.LinAlgError:
        return np.stack([np.linalg.lstsq(a, b, rcond=None)[0] for a, b in zip(A, B)])


def _groups(node: ir.Node) -> int:
    return node.attributes.get_int("group", 1) if node.op_type == "Conv" else 1


def current_solution(node: ir.Node, bias: bool) -> np.ndarray:
    """The layer's present weights as augmented [W; bᵀ] per group (for the error before)."""
    w = const_array(node.inputs[1]).astype(np.float64)
    if node.op_type == "Conv":
        g = _groups(node)
        W = w.reshape(g, w.shape[0] // g, -1).transpose(0, 2, 1)  # [G, d, O/G]
        b = (
            const_array(node.inputs[2])
            if len(node.inputs) > 2 and node.inputs[2] is not None
            else np.zeros(w.shape[0])
        )
        b = np.asarray(b, np.float64).reshape(g, 1, -1)
    elif node.op_type == "Gemm":
        W = (w.T if node.attributes.get_int("transB", 0) else w) * node.attributes.get_float(
            "alpha", 1.0
        )
        c = (
            const_array(node.inputs[2])
            if len(node.inputs) > 2 and node.inputs[2] is not None
            else np.zeros(W.shape[1])
        )
        b = np.broadcast_to(
            np.asarray(c, np.float64).reshape(-1)[-W.shape[1] :] if np.size(c) > 1 else c,
            (W.shape[1],),
        )
        W, b = W[None], (b * node.attributes.get_float("beta", 1.0))[None, None, :]
    else:
        W, b = w[None], None
    return np.concatenate([W, b], axis=1) if bias else W


def write_weights(graph: ir.Graph, node: ir.Node, sol: np.ndarray, bias: bool) -> None:
    """Stores the solution (per group) as the node's new weights (new initializers, rewired)."""
    w_old = const_array(node.inputs[1])
    dtype = w_old.dtype
    W, b = (sol[:, :-1], sol[:, -1]) if bias else (sol, None)
    if node.op_type == "Conv":
        set_const_input(
            graph, node, 1, W.transpose(0, 2, 1).reshape(w_old.shape).astype(dtype), "refit.weight"
        )
        set_const_input(graph, node, 2, b.reshape(-1).astype(dtype), "refit.bias")
    elif node.op_type == "Gemm":
        B = W[0].T if node.attributes.get_int("transB", 0) else W[0]
        set_const_input(graph, node, 1, np.ascontiguousarray(B).astype(dtype), "refit.weight")
        set_const_input(graph, node, 2, b[0].astype(dtype), "refit.bias")
        node.attributes["alpha"] = ir.AttrFloat32("alpha", 1.0)
        node.attributes["beta"] = ir.AttrFloat32("beta", 1.0)
    else:
        set_const_input(graph, node, 1, np.ascontiguousarray(W[0]).astype(dtype), "refit.weight")


@timed("least-squares re-fit")
def refit_layers(
    student: ir.Model,
    teacher: ir.Model,
    nodes: list[ir.Node],
    removed: dict[ir.Value, np.ndarray],
    data,
    workdir,
    *,
    samples: int,
    ridge: float,
    rows: int = 4096,
    progress=None,
) -> list[dict]:
    """Re-fits ``nodes`` of ``student`` in graph order against the same layers of ``teacher``.

    Layers reading the same tensor are solved together; later layers see the already re-fitted
    earlier ones: the student is swept (:class:`onnxshrink.sweep.Sweep`) stopping at each
    step's input, the teacher in step with it stopping at the layers' outputs, and a step's new
    weights are in place before the sweep builds the segment that runs them. The last quarter
    of the calibration batches is held out (whole samples, so the check sees inputs the fit did
    not): the ridge strength -- shrinking towards the cut weights -- is chosen among
    ``ridge`` × {1, 10, ..., 10⁵} by the held-out error, and new weights are kept only if they
    beat the cut weights there (a classifier fed 64 samples is left as cut). Returns one record
    per layer.
    """
    from onnxshrink.sweep import Sweep

    order = {id(n): i for i, n in enumerate(student.graph)}
    steps: dict[str, list[ir.Node]] = {}
    for n in sorted(nodes, key=lambda n: order[id(n)]):
        steps.setdefault(n.inputs[0].name, []).append(n)
    results: list[dict] = []
    n_batches = len(list(data.batches(samples)))
    held_batches = (
        set(range(n_batches - max(1, n_batches // 4), n_batches)) if n_batches > 1 else set()
    )
    seeds = {x: i for i, x in enumerate(steps)}
    outputs = [n.outputs[0].name for step in steps.values() for n in step]
    teacher_sweep = iter(Sweep(teacher, outputs, data, samples))
    seen: dict[str, list[np.ndarray]] = {}

    def teacher_values(name: str) -> list[np.ndarray]:
        while name not in seen:
            got, arrays = next(teacher_sweep)
            seen[got] = arrays
        return seen.pop(name)

    for x_name, xs in Sweep(student, list(steps), data, samples):
        step = steps[x_name]
        eqs = [
            (
                NormalEquations(bias=n.op_type != "MatMul"),
                NormalEquations(bias=n.op_type != "MatMul"),
            )
            for n in step
        ]
        rng = np.random.default_rng(seeds[x_name])
        ys = [teacher_values(n.outputs[0].name) for n in step]
        for b, x in enumerate(xs):
            for n, (fit, hold), y in zip(step, eqs, ys):
                X, Y = _rows(n, x, y[b], removed.get(n.outputs[0]), rng, rows)
                if held_batches:
                    (hold if b in held_batches else fit).add(X, Y)
                else:  # one batch only: hold out a quarter of its rows
                    held = rng.random(X.shape[0]) < 0.25
                    fit.add(X[~held], Y[~held])
                    hold.add(X[held], Y[held])
        for n, (fit, hold) in zip(step, eqs):
            results.append(_choose(student.graph, n, fit, hold, ridge))
        if progress is not None:
            progress(1)
    return results


def _choose(
    graph: ir.Graph, node: ir.Node, fit: NormalEquations, hold: NormalEquations, ridge: float
) -> dict:
    cut = current_solution(node, fit.bias)
    best_err, best_ridge = hold.error(cut), None
    before = best_err
    margin = max(1e-3 * before, 1e-9)  # a gain below this is rounding noise, not a better fit
    for lam in ridge * 10.0 ** np.arange(6):
        err = hold.error(solve(fit, float(lam), prior=cut))
        if err < best_err - margin:
            best_err, best_ridge = err, float(lam)
    record = {
        "node": node.name,
        "heldout_error_before": round(before, 6),
        "heldout_error_after": round(best_err, 6),
        "ridge": best_ridge,
        "applied": best_ridge is not None,
        "rows": fit.n + hold.n,
    }
    if best_ridge is not None:
        both = NormalEquations(
            fit.bias, fit.A + hold.A, fit.B + hold.B, fit.yy + hold.yy, fit.n + hold.n
        )
        write_weights(graph, node, solve(both, best_ridge, prior=cut), fit.bias)
    return record


def _rows(
    node: ir.Node,
    x: np.ndarray,
    y: np.ndarray,
    removed_out: np.ndarray | None,
    rng: np.random.Generator,
    rows: int,
) -> tuple[np.ndarray, np.ndarray]:
    """(X, Y) rows of one batch: sampled im2col patches for a Conv, samples for Gemm/MatMul
    (sampled positions for a batched MatMul). Y: the teacher's kept channels, each times the
    node's ``channel_scale`` mark (its readers divide a rescaled channel back)."""
    axis = marks.channel_axis(node)
    keep = np.setdiff1d(np.arange(y.shape[axis]), removed_out if removed_out is not None else [])
    scale = marks.channel_scale(node)
    if scale is not None and scale.size != len(keep):
        scale = None  # not a factor per kept channel: no known relation, compared as it is
    if node.op_type == "Conv":
        w = const_array(node.inputs[1])
        total = y.shape[0] * y.shape[2] * y.shape[3]
        idx = np.sort(rng.choice(total, min(rows, total), replace=False))
        ni, hi, wi = np.unravel_index(idx, (y.shape[0], y.shape[2], y.shape[3]))
        X = conv_patches(x, node, (w.shape[2], w.shape[3]), idx)
        Y = _times(y[ni, :, hi, wi][:, keep], scale)
        g = _groups(node)  # channel-major patches: group i's inputs are one contiguous block
        return (X.reshape(len(idx), g, -1), Y.reshape(len(idx), g, -1)) if g > 1 else (X, Y)
    if x.ndim > 2:  # a batched MatMul [..., K] @ [K, M]: every leading position is a row
        X, Y = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
        idx = np.sort(rng.choice(len(X), min(rows, len(X)), replace=False))
        return X[idx], _times(Y[idx][:, keep], scale)
    return x.reshape(x.shape[0], -1), _times(y.reshape(y.shape[0], -1)[:, keep], scale)


def _times(Y: np.ndarray, scale: np.ndarray | None) -> np.ndarray:
    return Y if scale is None else (Y * scale).astype(Y.dtype)

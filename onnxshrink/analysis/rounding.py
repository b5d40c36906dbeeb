"""Hessian-aware rounding of a layer's weights onto a grid (GPTQ: Frantar et al., ICLR 2023,
after Optimal Brain Quantization).

Rounding each weight to its nearest grid point minimises the *weight* error; what matters is
the *output* error on the data the layer sees, ‖X·(Ŵ − W)‖² = tr((Ŵ − W)ᵀ H (Ŵ − W)) with
H = Σ xᵀx over the calibration rows. GPTQ rounds the inputs one at a time and moves each
rounding error onto the inputs not yet rounded, in proportion to the inverse of H (one upper
Cholesky factor U of H⁻¹ does it all: row i's error e_i / U_ii, times U_i,i+1:), so later
weights compensate for earlier ones. Inputs go in decreasing order of H's diagonal (the most
active first, "act order"); H is damped by ``damp`` · mean(diag H).

With a bias the system is augmented by a constant input 1 (H's last row holds Σx): that row is
not rounded and is last, so the bias absorbs whatever mean shift is left -- bias correction
falls out of the same solve.

The grid is a function ``project(values [G, o]) -> [G, o]`` applied to one input row of every
output channel at once: uniform per-channel int8, a k-means codebook, anything. Grouped and
depthwise convolutions are one system per group (H is [G, D, D]).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnx_ir as ir

from onnxshrink.analysis.refit import input_rows
from onnxshrink.irtools import const_array
from onnxshrink.timing import timed

__all__ = [
    "MAX_INPUTS",
    "Grams",
    "gram_chunks",
    "chunks_needed",
    "from_system",
    "gram_refusal",
    "hessian_round",
    "iter_grams",
    "output_error",
    "round_int8",
    "steerable",
    "system_scale",
    "too_few_rows",
    "usable_grams",
]

MAX_INPUTS = 4096  # inputs per output (C_in/group · k²) above which H is not collected (128 MB)
_BUDGET = 1 << 29  # bytes of Gram matrices held at once (more layers: more passes over the data)
_BLOCK = 128  # rows rounded one by one before their errors reach the rest in one product


def _inputs_per_group(node: ir.Node) -> tuple[int, int]:
    w = const_array(node.inputs[1])
    if node.op_type == "Conv":
        return node.attributes.get_int("group", 1), int(np.prod(w.shape[1:]))
    if node.op_type == "Gemm":
        return 1, int(w.shape[1] if node.attributes.get_int("transB", 0) else w.shape[0])
    return 1, int(w.shape[0])


def gram_refusal(node: ir.Node) -> str | None:
    """None when :func:`iter_grams` handles ``node``, else why it is rounded to nearest."""
    w = const_array(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else None
    if w is None:
        return "weight is not constant"
    if node.op_type == "Conv":
        if w.ndim != 4:
            return "only 2-D convolutions get Hessian-aware rounding"
        if node.attributes.get_string("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
            return "auto_pad SAME_* convolutions get nearest rounding"
    elif node.op_type == "Gemm":
        if node.attributes.get_int("transA", 0):
            return "Gemm with transA=1 gets nearest rounding"
        if (
            node.attributes.get_float("alpha", 1.0) != 1.0
            or node.attributes.get_float("beta", 1.0) != 1.0
        ):
            return "Gemm with alpha or beta != 1 gets nearest rounding"
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            c = const_array(node.inputs[2])
            if c is None or c.size not in (
                1,
                w.shape[0] if node.attributes.get_int("transB", 0) else w.shape[1],
            ):
                return "Gemm whose C is not a constant bias vector gets nearest rounding"
    elif node.op_type != "MatMul" or w.ndim != 2:
        return f"{node.op_type} gets nearest rounding"
    d = _inputs_per_group(node)[1]
    if d > MAX_INPUTS:
        return f"{d} inputs per output (> {MAX_INPUTS}): nearest rounding (H would be too large)"
    return None


class Grams:
    """Running H = Σ [x, 1]ᵀ[x, 1] ([G, D, D]; no constant input for a MatMul) of each node's
    input rows: im2col patches, at most ``rows`` -- and at most 64·D -- per batch, sampled with
    one seeded generator per node (so the rows do not depend on which other nodes are collected
    with it). A depthwise 3×3 Conv's 10 × 10 systems are known well from 640 rows a batch, and
    its patches are the costliest to gather. Each batch's product is taken in float32 and
    summed in float64."""

    def __init__(
        self, nodes: list[ir.Node], rows: int = 2048, seeds: list[int] | None = None
    ) -> None:
        self.nodes, self.rows = list(nodes), rows
        seeds = list(range(len(self.nodes))) if seeds is None else seeds
        self.readers: dict[str, list[ir.Node]] = {}
        for n in self.nodes:
            self.readers.setdefault(n.inputs[0].name, []).append(n)
        self._rng = {id(n): np.random.default_rng(i) for i, n in zip(seeds, self.nodes)}
        self._rows = {id(n): min(rows, 64 * (_inputs_per_group(n)[1] + 1)) for n in self.nodes}
        self.H: dict[int, np.ndarray] = {}
        self.count: dict[int, int] = {}

    def add(self, name: str, x: np.ndarray) -> None:
        """One batch of tensor ``name``, for every node that reads it."""
        for n in self.readers.get(name, ()):
            X = input_rows(n, x, self._rng[id(n)], self._rows[id(n)]).astype(np.float32, copy=False)
            Xg = (X[:, None, :] if X.ndim == 2 else X).transpose(1, 2, 0)  # [G, d, R]
            G, d, R = Xg.shape
            xx = np.matmul(Xg, Xg.transpose(0, 2, 1))
            if n.op_type == "MatMul":
                h = xx.astype(np.float64)
            else:  # the constant input 1: Σx in the last row and column, the row count last
                h = np.empty((G, d + 1, d + 1))
                h[:, :d, :d] = xx
                h[:, :d, d] = h[:, d, :d] = Xg.sum(2, dtype=np.float64)
                h[:, d, d] = R
            self.H[id(n)] = h if id(n) not in self.H else self.H[id(n)] + h
            self.count[id(n)] = self.count.get(id(n), 0) + R

    def pop(self, node: ir.Node) -> tuple[np.ndarray, int]:
        return self.H.pop(id(node)), self.count.pop(id(node))


def gram_chunks(nodes: list[ir.Node], budget: int = _BUDGET) -> list[list[ir.Node]]:
    """``nodes`` in graph order, in chunks whose Gram matrices fit in ``budget`` bytes."""
    chunks: list[list[ir.Node]] = [[]]
    used = 0
    for n in nodes:
        g, d = _inputs_per_group(n)
        size = g * (d + 1) ** 2 * 8
        if chunks[-1] and used + size > budget:
            chunks.append([])
            used = 0
        chunks[-1].append(n)
        used += size
    return [c for c in chunks if c]


def iter_grams(
    model: ir.Model,
    nodes: list[ir.Node],
    data,
    workdir: Path,
    samples: int,
    *,
    rows: int = 2048,
    budget: int = _BUDGET,
    progress=None,
) -> Iterator[tuple[ir.Node, np.ndarray, int]]:
    """(node, H, rows seen) for every node (:class:`Grams`) on the first ``samples``
    calibration samples.

    Memory stays bounded: the nodes go in chunks whose Grams fit in ``budget`` bytes, one pass
    over the data per chunk, and a chunk's Grams are handed out (and can be dropped) before the
    next is collected. ``progress`` advances by samples seen, ``samples`` × chunks in all."""
    from onnxshrink.calibrate import Probe, batch_samples

    seeds = {id(n): i for i, n in enumerate(nodes)}
    for chunk in gram_chunks(nodes, budget):
        grams = Grams(chunk, rows, [seeds[id(n)] for n in chunk])
        with Probe(model, sorted(grams.readers), workdir) as probe:
            for batch in probe.run(data, samples):
                for name, x in batch.items():
                    grams.add(name, x)
                if progress is not None:
                    progress(batch_samples(batch))
        for n in chunk:
            yield (n, *grams.pop(n))


def steerable(nodes: list[ir.Node], refused: dict[str, str]) -> list[ir.Node]:
    """The ``nodes`` whose Grams :func:`iter_grams` collects; each other one is named in
    ``refused`` with the reason (it gets nearest rounding)."""
    out = []
    for node in nodes:
        if reason := gram_refusal(node):
            refused[node.name] = reason
        else:
            out.append(node)
    return out


def usable_grams(
    model: ir.Model,
    nodes: list[ir.Node],
    data,
    workdir: Path,
    samples: int,
    refused: dict[str, str],
    progress=None,
) -> Iterator[tuple[ir.Node, np.ndarray]]:
    """(node, H) from :func:`iter_grams` for every node whose H saw enough calibration rows to
    steer rounding (:func:`too_few_rows`); the others are named in ``refused`` with the reason."""
    for node, H, rows in iter_grams(model, nodes, data, workdir, samples, progress=progress):
        if reason := too_few_rows(H, rows):
            refused[node.name] = reason
        else:
            yield node, H


def too_few_rows(H: np.ndarray, rows: int) -> str | None:
    """Why ``H`` (from ``rows`` calibration rows) should not steer rounding, or None.

    With fewer rows than 2 × its inputs, H is (nearly) rank-deficient: GPTQ would push the
    rounding errors into directions the calibration data never excites but new data does.
    """
    if rows < 2 * H.shape[-1]:
        return f"{rows} calibration rows for {H.shape[-1]} inputs (< 2x): nearest rounding"
    return None


def chunks_needed(nodes: list[ir.Node], budget: int = _BUDGET) -> int:
    """How many passes over the data :func:`iter_grams` makes for ``nodes``."""
    return len(gram_chunks(nodes, budget))


@timed("Hessian-aware rounding")
def hessian_round(
    H: np.ndarray,
    W: np.ndarray,
    project: Callable[[np.ndarray, int], np.ndarray],
    *,
    bias: bool,
    damp: float = 0.01,
) -> np.ndarray:
    """Ŵ on the grid (bias row free) that approximately minimises tr((Ŵ − W)ᵀ H (Ŵ − W)).

    ``H`` [G, D, D] and ``W`` [G, D, o] (D = d + 1 with ``bias``: the last row is the bias);
    ``project(rows, i)`` maps input ``i``'s weights of every output, [G, o], onto the grid.
    Inputs that never fire (zero diagonal) are rounded to nearest and give no error downstream.
    """
    H = np.array(H, np.float64)
    W = np.array(W, np.float64)
    G, D, _ = W.shape
    d = D - 1 if bias else D
    diag = np.einsum("gii->gi", H)[:, :d]
    lam = np.maximum(damp * diag.mean(1), 1e-12)
    dead = diag <= 0
    # act order: most active inputs first, per group; the bias row stays last
    order = np.argsort(-diag, axis=1, kind="stable")
    if bias:
        order = np.concatenate([order, np.full((G, 1), d)], axis=1)
    if G == 1:  # one gather instead of two
        Hp = H[0][np.ix_(order[0], order[0])][None]
    else:
        Hp = np.take_along_axis(np.take_along_axis(H, order[:, :, None], 1), order[:, None, :], 2)
    Wp = np.take_along_axis(W, order[:, :, None], 1)
    deadp = np.take_along_axis(dead, order[:, :d], 1)
    for g, i in zip(*np.nonzero(deadp)):
        Hp[g, i, :] = 0.0
        Hp[g, :, i] = 0.0
        Hp[g, i, i] = 1.0
    idx = np.arange(d)
    Hp[:, idx, idx] += lam[:, None]
    if bias:  # the constant input: damped too, so H stays positive definite with dead inputs
        Hp[:, d, d] += lam
    try:
        U = np.linalg.cholesky(np.linalg.inv(Hp)).transpose(0, 2, 1)
    except np.linalg.LinAlgError:
        Hp[:, idx, idx] += 100 * lam[:, None]
        U = np.linalg.cholesky(np.linalg.inv(Hp)).transpose(0, 2, 1)
    Q = Wp.copy()
    gi = np.arange(G)
    E = np.zeros_like(Wp)
    Ud = np.einsum("gii->gi", U)
    for b0 in range(0, d, _BLOCK):  # GPTQ's lazy batches: within a block one row at a time,
        b1 = min(b0 + _BLOCK, d)  # then the block's errors onto all later rows in one product
        for k in range(b0, b1):
            w = Wp[:, k, :]
            q = project(w, order[:, k])  # order: the original input index per group
            Q[:, k, :] = q
            E[:, k, :] = err = (w - q) / Ud[:, k, None]
            if G == 1:  # (a row-at-a-time loop: fewer temporaries count)
                Wp[0, k + 1 : b1] -= np.multiply.outer(U[0, k, k + 1 : b1], err[0])
            else:
                Wp[:, k + 1 : b1, :] -= U[:, k, k + 1 : b1][:, :, None] * err[:, None, :]
        Wp[:, b1:, :] -= np.matmul(U[:, b0:b1, b1:].transpose(0, 2, 1), E[:, b0:b1, :])
    if bias:
        Q[:, d, :] = Wp[:, d, :]
    out = np.empty_like(Q)
    out[gi[:, None], order, :] = Q
    return out


def output_error(H: np.ndarray, W: np.ndarray, W_hat: np.ndarray) -> float:
    """tr((Ŵ − W)ᵀ H (Ŵ − W)) / tr(Wᵀ H W): the relative output error on the calibration rows."""
    E = np.asarray(W_hat, np.float64) - W
    num = float(np.einsum("gio,gio->", E, H @ E))
    den = float(np.einsum("gio,gio->", W, H @ W))
    return num / max(den, 1e-30)


def system_scale(node: ir.Node, scale: np.ndarray | float, G: int, o: int) -> np.ndarray:
    """A per-output-channel scale (or one scalar) laid out like the system's outputs, [G, o]."""
    return (
        np.broadcast_to(np.asarray(scale, np.float64).reshape(-1), (G * o,)).reshape(G, o)
        if np.size(scale) > 1
        else np.full((G, o), float(np.asarray(scale).reshape(-1)[0]))
    )


def from_system(node: ir.Node, W: np.ndarray, bias: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """(weight in the node's own layout, bias [outputs] or None) from a system [G, D, o]
    (the inverse of :func:`onnxshrink.analysis.refit.current_solution` for alpha = beta = 1)."""
    w = const_array(node.inputs[1])
    Wm = W[:, :-1] if bias else W
    b = W[:, -1].reshape(-1) if bias else None
    if node.op_type == "Conv":
        return Wm.transpose(0, 2, 1).reshape(w.shape), b
    if node.op_type == "Gemm" and node.attributes.get_int("transB", 0):
        return Wm[0].T, b
    return Wm[0], b


def round_int8(
    node: ir.Node,
    H: np.ndarray,
    scale,
    axis: int | None,
    *,
    safe: bool = False,
    damp: float = 0.01,
    errors: bool = True,
):
    """A layer's weights rounded Hessian-aware onto its symmetric int8 grid.

    ``scale`` is per output channel along ``axis`` (None: one scale for the tensor). With
    ``safe``, the second weight of each pair of the integer kernel's reduction axis is rounded
    within the pair rule (:mod:`onnxshrink.analysis.saturation`), its error pushed onward like
    any other; ``damp`` as :func:`hessian_round`'s. Returns the int8 weights in the node's
    layout, the re-solved bias (None for a MatMul), the relative output errors (nearest,
    Hessian) on the calibration rows (None without ``errors``) and how many weights the pair
    rule moved.
    """
    from onnxshrink.analysis.refit import current_solution
    from onnxshrink.analysis.saturation import input_partners, pair_bounds

    w = const_array(node.inputs[1])
    bias = node.op_type != "MatMul"
    W = current_solution(node, bias)  # [G, D, o]: D = inputs per group (+ 1 for the bias)
    G, D, o = W.shape
    d = D - 1 if bias else D
    s = system_scale(node, scale, G, o)
    partner = input_partners(node, w.shape) if safe else None
    gi = np.arange(G)
    rounded = np.zeros((G, d, o))
    done = np.zeros((G, d), bool)
    moved = [0]

    def within(q, partner_q, has=True):  # q inside the pair rule beside rounded partners
        lo, hi = pair_bounds(partner_q)
        safe = np.where(has, np.minimum(np.maximum(q, lo), hi), q)
        moved[0] += int(np.count_nonzero(safe != q))
        return safe

    def project(rows, src):
        q = np.round(rows / s)
        q = np.minimum(np.maximum(q, -127, out=q), 127, out=q)
        if partner is None:
            return q * s
        if G == 1:  # scalar indices: one group's rows come one by one, many of them
            i, p = src[0], partner[src[0]]
            if p >= 0 and done[0, p]:
                q = within(q, rounded[0, p][None])
            rounded[0, i], done[0, i] = q[0], True
            return q * s
        p = partner[src]
        has = (p >= 0) & done[gi, np.maximum(p, 0)]
        if has.any():
            q = within(q, rounded[gi, np.maximum(p, 0)], has[:, None])
        rounded[gi, src], done[gi, src] = q, True
        return q * s

    nearest = W.copy()
    nearest[:, :d] = np.clip(np.round(W[:, :d] / s[:, None, :]), -127, 127) * s[:, None, :]
    W_hat = hessian_round(H, W, project, bias=bias, damp=damp)
    w_hat, b = from_system(node, W_hat, bias)
    shape = [1] * w.ndim
    if axis is not None:
        shape[axis] = -1
    q = np.clip(np.round(w_hat / np.reshape(scale, shape)), -127, 127).astype(np.int8)
    errs = (output_error(H, W, nearest), output_error(H, W, W_hat)) if errors else None
    return q, b, errs, moved[0]

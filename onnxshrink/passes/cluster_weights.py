"""Clusters each large weight into a k-means codebook: uint8 indices + ≤ 256 float centroids.

For a weight W of a Conv / ConvTranspose / Gemm / MatMul with at least ``min-size`` elements:
each output channel is first divided by its max |w| (``per-channel``, default), then 1-D
k-means (k = 2^bits; Lloyd iterations on the sorted values, started from Panter & Dite's
density^(1/3) rule) gives centroids c and indices i with W ≈ c[i] · s.

The graph stores i as uint8, c as float32 (and s as float32 per channel) and decodes
``Gather(c, Cast(i, int32)) · s`` in front of the layer, which onnxruntime constant-folds at
session start: the float layer at full speed, one byte per weight in the file.

With real data (``rounding=auto`` → ``hessian``) each weight is assigned its centroid
Hessian-aware (GPTQ, :mod:`onnxshrink.analysis.rounding`): inputs one by one, each assignment
error pushed onto the inputs not yet assigned so the layer *output* on the calibration data
moves least, and the bias re-solved with them. Without it (``nearest``), each layer's bias is
corrected for the output mean shift, (Ŵ − W)·E[x] (:mod:`onnxshrink.analysis.bias`).

Weights inside If/Loop/Scan bodies are clustered too, rounded to nearest without bias
correction (their inputs cannot be probed); a branch the data never takes is not validated by it.
Refused: weights shared with another node, non-float weights, weights under ``min-size``.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import ClassVar, Literal

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import NameFixPass

from onnxshrink.analysis.bias import apply_to_mean, input_moments, subtract_from_bias
from onnxshrink.analysis.refit import current_solution
from onnxshrink.analysis.rounding import (
    chunks_needed,
    from_system,
    hessian_round,
    steerable,
    system_scale,
    usable_grams,
)
from onnxshrink.errors import OptionError
from onnxshrink.irtools import const_array, set_const_input, unique_name, weight_users_outside
from onnxshrink.passes import options
from onnxshrink.passes.base import DISCARD, Log, ShrinkPass

__all__ = ["ClusterWeightsPass", "kmeans_1d"]

logger = logging.getLogger(__name__)

_TARGETS = {"Conv", "ConvTranspose", "Gemm", "MatMul"}


def _out_axis(node: ir.Node) -> int:
    if node.op_type == "ConvTranspose":
        return 1
    if node.op_type == "Gemm":
        return 0 if node.attributes.get_int("transB", 0) else 1
    if node.op_type == "MatMul":
        return 1
    return 0


def _panter_dite_init(s: np.ndarray, k: int) -> np.ndarray:
    """Initial centroids at equal steps of the cumulative density^(1/3): the asymptotically
    optimal level density for squared error (Panter & Dite 1951). Quantile (equal-mass) starts
    leave the tails under-served and Lloyd's iterations are slow to move them out."""
    hist, edges = np.histogram(s, bins=4096)
    dens = np.cbrt(hist.astype(np.float64))
    cdf = np.concatenate([[0.0], np.cumsum(dens)])
    cdf /= cdf[-1]
    return np.unique(np.interp((np.arange(k) + 0.5) / k, cdf, edges))


def kmeans_1d(
    values: np.ndarray, k: int, iterations: int = 25, weights: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(centroids [k'], indices) minimising Σ h·(v − c[i])² by Lloyd's algorithm in 1-D.

    ``weights`` h (default 1) say how much each value's error costs. Sorting once makes each
    iteration O(n): assignment is a search among the midpoints between sorted centroids, and
    the update is a difference of cumulative (weighted) sums.
    """
    v = np.asarray(values, np.float64).reshape(-1)
    h = np.ones_like(v) if weights is None else np.asarray(weights, np.float64).reshape(-1) + 1e-12
    order = np.argsort(v, kind="stable")
    s, hs = v[order], h[order]
    uniq = np.unique(s)
    if len(uniq) <= k:
        centroids = uniq
    else:
        centroids = _panter_dite_init(s, k)
    cw = np.concatenate([[0.0], np.cumsum(hs * s)])
    ch = np.concatenate([[0.0], np.cumsum(hs)])
    for _ in range(iterations):
        bounds = np.searchsorted(s, (centroids[:-1] + centroids[1:]) / 2.0)
        starts = np.concatenate([[0], bounds])
        ends = np.concatenate([bounds, [len(s)]])
        keep = ends > starts
        new = (cw[ends[keep]] - cw[starts[keep]]) / (ch[ends[keep]] - ch[starts[keep]])
        if len(new) == len(centroids) and np.allclose(new, centroids, rtol=0, atol=1e-12):
            centroids = new
            break
        centroids = new
    bounds = np.searchsorted(s, (centroids[:-1] + centroids[1:]) / 2.0)
    idx_sorted = np.searchsorted(bounds, np.arange(len(s)), side="right")
    indices = np.empty(len(s), np.int64)
    indices[order] = idx_sorted
    return centroids, indices


@dataclasses.dataclass
class ClusterWeightsPass(ShrinkPass):
    """k-means weight clustering for storage: uint8 indices and a float codebook per tensor."""

    name: ClassVar[str] = "cluster"
    lossy: ClassVar[bool] = True
    subgraphs: ClassVar[bool] = True

    bits: int = 8
    min_size: int = 1024
    per_channel: bool = True
    bias_correction: Literal["auto", "off", "on"] = "auto"
    rounding: Literal["auto", "nearest", "hessian"] = "auto"
    samples: int = options.samples(128)
    skip_: tuple[str, ...] = options.layers()  # CLI name: skip (or exclude, its old name)
    min_fidelity: float | None = options.share()
    floor: float | None = options.floor(0.99)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 1 <= self.bits <= 8:
            raise OptionError(f"pass 'cluster': bits must be between 1 and 8, got {self.bits}")
        self._assigned: dict[str, tuple] = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        rounding = (
            self.rounding
            if self.rounding != "auto"
            else ("hessian" if self.has_real_data else "nearest")
        )
        if rounding == "hessian":
            NameFixPass()(model)  # assignments (and min-fidelity's trial copies) go by node name
        self._assigned = self._assign(model) if rounding == "hessian" else {}
        means = self._means(model)
        exclude = set(self.skip_)
        if self.min_fidelity is not None:
            exclude |= self._sensitive(model, means, exclude)
        modified, before, after = self._cluster(model, means, exclude, self)
        self._assigned = {}
        if modified:
            self.details["weight_bytes"] = {"before": int(before), "after": int(after)}
        return ir.passes.PassResult(model, modified=modified)

    def _cluster(
        self, model: ir.Model, means, exclude: set[str], log: Log, only: str | None = None
    ):
        modified = False
        total_before = total_after = 0
        for node in list(ir.traversal.RecursiveGraphIterator(model.graph)):
            if node.op_type not in _TARGETS or len(node.inputs) < 2 or node.inputs[1] is None:
                continue
            graph = node.graph
            if node.name in exclude or (only is not None and node.name != only):
                if node.name in exclude:
                    log.skip(
                        node,
                        "excluded"
                        if node.name in self.skip_
                        else "kept by min-fidelity (most sensitive)",
                    )
                continue
            w_val = node.inputs[1]
            w = const_array(w_val)
            if w is None:
                continue
            if not np.issubdtype(w.dtype, np.floating):
                log.skip(node, f"weight is {w.dtype}, not float")
                continue
            if w.size < self.min_size:
                continue
            if weight_users_outside(w_val, node):
                log.skip(node, "weight is shared with another node")
                continue
            if node.name in self._assigned:
                centroids, indices, scale, new_bias = self._assigned[node.name]
            else:
                centroids, indices, scale = self._codebook(node, w)
                new_bias = None
            decoded = self._rewrite(graph, node, w, centroids, indices, scale, log)
            if graph is not model.graph and log is self:
                self.details["in_subgraphs"] = self.details.get("in_subgraphs", 0) + 1
            mu = means.get(node.inputs[0].name) if node.op_type in ("Conv", "Gemm") else None
            if new_bias is not None:
                set_const_input(graph, node, 2, new_bias.astype(w.dtype), "bias_clustered")
            elif mu is not None:
                subtract_from_bias(
                    graph, node, apply_to_mean(node, decoded - w.astype(np.float64), mu)
                )
            total_before += w.nbytes
            total_after += (
                indices.size + centroids.size * 4 + (0 if scale is None else scale.size * 4)
            )
            modified = True
        return modified, total_before, total_after

    def _codebook(self, node: ir.Node, w: np.ndarray):
        """(centroids, nearest indices, per-channel scale or None) of one weight."""
        axis = _out_axis(node) if self.per_channel else None
        scale = None
        values = w.astype(np.float64)
        if axis is not None:
            shape = [1] * w.ndim
            shape[axis] = -1
            amax = np.abs(np.moveaxis(values, axis, 0).reshape(w.shape[axis], -1)).max(1)
            scale = np.where(amax > 0, amax, 1.0).reshape(shape)
            values = values / scale
        centroids, indices = kmeans_1d(values, 2**self.bits)
        return centroids, indices, scale

    def _assign(self, model: ir.Model) -> dict[str, tuple]:
        """Per eligible layer: (centroids, indices, scale, new bias) with the centroids assigned
        Hessian-aware; the layer Grams are collected in bounded chunks and dropped after use."""
        data = self.context.data
        refused: dict[str, str] = {}
        nodes = []
        for n in model.graph:
            if (
                n.op_type not in _TARGETS
                or len(n.inputs) < 2
                or n.inputs[1] is None
                or n.name in self.skip_
            ):
                continue
            w = const_array(n.inputs[1])
            if w is not None and w.size >= self.min_size and np.issubdtype(w.dtype, np.floating):
                nodes.append(n)
        nodes = steerable(nodes, refused)
        out = {}
        if nodes and data is not None:
            n = min(self.samples, data.n_samples)
            task = self.task(f"{self.name}: Hessian-aware assignment", n * chunks_needed(nodes))
            with self.scratch() as workdir:
                for node, H in usable_grams(model, nodes, data, workdir, n, refused, progress=task):
                    centroids, _, scale = self._codebook(node, const_array(node.inputs[1]))
                    indices, bias = self._hessian_assign(node, H, centroids, scale)
                    out[node.name] = (centroids, indices, scale, bias)
            task.done()
        if refused:
            self.details["nearest_rounding"] = refused
        return out

    def _hessian_assign(self, node: ir.Node, H: np.ndarray, centroids: np.ndarray, scale) -> tuple:
        """(indices in the weight's layout, new bias or None): centroids assigned GPTQ-style."""
        bias = node.op_type != "MatMul"
        W = current_solution(node, bias)
        G, _, o = W.shape
        s = system_scale(node, 1.0 if scale is None else scale, G, o)
        mids = (centroids[:-1] + centroids[1:]) / 2.0

        def project(rows, _src):
            return centroids[np.searchsorted(mids, rows / s)] * s

        w_hat, b = from_system(node, hessian_round(H, W, project, bias=bias), bias)
        norm = w_hat if scale is None else w_hat / scale
        return np.searchsorted(mids, np.asarray(norm, np.float64).reshape(-1)), b

    def _sensitive(self, model: ir.Model, means, exclude: set[str]) -> set[str]:
        """Layers to leave unclustered so the cosine on 32 calibration samples reaches
        ``min-fidelity``: each layer is clustered alone, the most damaging ones are kept float
        one by one (re-measuring the whole model; :func:`onnxshrink.search.spare_until`)."""
        from onnxshrink.search import Fidelity, spare_until

        data = self.context.data
        if data is None:
            return set()
        with self.scratch() as workdir:
            fidelity = Fidelity(model, data, min(32, data.n_samples), workdir)

            def trial(excl: set[str], only: str | None = None) -> float:
                copy = model.clone()
                self._cluster(copy, means, excl, DISCARD, only=only)
                return fidelity(copy)

            full = trial(exclude)
            self.details["fidelity_all_clustered"] = round(full, 6)
            if full >= self.min_fidelity:
                return set()
            names = [
                nd.name
                for nd in model.graph
                if nd.op_type in _TARGETS
                and nd.name not in exclude
                and const_array(nd.inputs[1]) is not None
                and const_array(nd.inputs[1]).size >= self.min_size
            ]
            damage = {name: 1.0 - trial(exclude, only=name) for name in names}
            order = sorted(damage, key=damage.get, reverse=True)
            kept, current = spare_until(
                order, lambda spared: trial(exclude | spared), self.min_fidelity
            )
            current = full if current is None else current
            self.details["min_fidelity"] = {
                "kept_float": sorted(kept),
                "fidelity": round(current, 6),
            }
            return set(kept)

    def _rewrite(self, graph, node, w, centroids, indices, scale, log: Log) -> np.ndarray:
        base = node.name or node.op_type
        codebook = ir.val(
            unique_name(graph, f"{base}.codebook"), const_value=ir.tensor(centroids.astype(w.dtype))
        )
        idx = ir.val(
            unique_name(graph, f"{base}.indices"),
            const_value=ir.tensor(indices.reshape(w.shape).astype(np.uint8)),
        )
        graph.register_initializer(codebook)
        graph.register_initializer(idx)
        cast = ir.node(
            "Cast",
            [idx],
            attributes={"to": ir.DataType.INT32},
            name=unique_name(graph, f"{base}.indices_cast"),
        )
        gather = ir.node(
            "Gather",
            [codebook, cast.outputs[0]],
            attributes={"axis": 0},
            name=unique_name(graph, f"{base}.decode"),
        )
        cast.outputs[0].name = unique_name(graph, f"{base}.indices_int32")
        gather.outputs[0].name = unique_name(graph, f"{base}.weight_clustered")
        nodes, out = [cast, gather], gather.outputs[0]
        decoded = centroids[indices].reshape(w.shape)
        if scale is not None:
            s_val = ir.val(
                unique_name(graph, f"{base}.channel_scale"),
                const_value=ir.tensor(scale.astype(w.dtype)),
            )
            graph.register_initializer(s_val)
            mul = ir.node("Mul", [out, s_val], name=unique_name(graph, f"{base}.rescale"))
            mul.outputs[0].name = unique_name(graph, f"{base}.weight_rescaled")
            nodes.append(mul)
            out = mul.outputs[0]
            decoded = decoded * scale
        graph.insert_before(node, nodes)
        node.replace_input_with(1, out)
        err = float(np.sqrt(np.mean((decoded - w) ** 2)) / (np.std(w) + 1e-30))
        log.change(
            f"{base}: {w.size} weights -> {len(centroids)} centroids "
            f"(relative RMS error {err:.4f})",
            node.name,
        )
        return decoded

    def _means(self, model: ir.Model) -> dict[str, np.ndarray]:
        """Per-channel E[x] of the layers' inputs, for bias correction (``auto``: with real data
        only); the k-means objective stays unweighted (docs/design.md, clustering)."""
        data = self.context.data
        if (
            self.bias_correction == "off"
            or (self.bias_correction == "auto" and not self.has_real_data)
            or data is None
        ):
            return {}
        names = sorted(
            {
                n.inputs[0].name
                for n in model.graph
                if n.op_type in ("Conv", "Gemm") and const_array(n.inputs[1]) is not None
            }
        )
        if not names:
            return {}
        with self.scratch() as workdir:
            moments = input_moments(model, names, data, workdir, self.samples)
        return {n: m.mean for n, m in moments.items()}

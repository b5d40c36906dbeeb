"""Tucker-2 decomposition of K×K convolutions into three convolutions (or spatial SVD into two).

Tucker-2 (``mode=tucker``): W [C_out, C_in, K, K] ≈ core ×₀ U_out ×₁ U_in from tensorly's
``partial_tucker(W, rank=[R_out, R_in], modes=[0, 1])`` (tensorly >= 0.8 returns
``((core, factors), errors)``), emitted as

    Conv 1×1 (C_in -> R_in, weight U_inᵀ)  ->  Conv K×K (R_in -> R_out, weight core, the original
    stride, pads, dilation)  ->  Conv 1×1 (R_out -> C_out, weight U_out, the original bias)

MACs per output pixel go from C_out·C_in·K² to s²·C_in·R_in + R_in·R_out·K² + R_out·C_out (s the
stride: the first 1×1 runs at the input resolution). With C_in = C_out = C and R = r·C, a 2×
cut (stride 1, 3×3) needs 9r² + 2r = 4.5, r ≈ 0.604.

Spatial SVD (``mode=spatial``): the matrix W[(c_in, kh), (c_out, kw)] is cut to rank R by SVD,
emitted as Conv K×1 (C_in -> R, vertical stride/pads/dilation) -> Conv 1×K (R -> C_out,
horizontal ones, the bias); MACs per output pixel s_w·R·C_in·K + R·C_out·K.

Ranks: ``speedup=<x>`` (default 2, the largest ranks with at most 1/x of the layer's MACs,
rounded down to ``round``), ``rank``, ``energy`` or ``vbmf`` (docs/usage.md). With real data the
last conv of each block is re-fitted to the original's outputs (:mod:`onnxshrink.analysis.refit`).

Left alone, with the reason: grouped / depthwise convs, 1×1 kernels (``lowrank`` handles
those), non-2-D kernels, ``auto_pad`` SAME_*, non-constant or shared weights, layers under
``min-channels``, and layers where the decomposition would not cut MACs.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import ClassVar, Literal

import numpy as np
import onnx_ir as ir

from onnxshrink.analysis.ranks import energy_rank, evbmf_rank, round_rank
from onnxshrink.irtools import const_array, new_initializer, unique_name, weight_users_outside
from onnxshrink.passes import options
from onnxshrink.passes.base import ShrinkPass

__all__ = ["TuckerConvPass", "tucker_macs", "speedup_ranks", "tucker2", "spatial_svd"]

logger = logging.getLogger(__name__)


def tucker_macs(c_in: int, c_out: int, r_in: int, r_out: int, k: int, stride: int = 1) -> int:
    """MACs per output pixel of the three-conv block with a K×K core (stride s: the first 1×1
    runs at the input resolution, s² times per output pixel)."""
    return stride * stride * c_in * r_in + r_in * r_out * k * k + r_out * c_out


def spatial_macs(c_in: int, c_out: int, r: int, kh: int, kw: int, stride_w: int = 1) -> int:
    return stride_w * r * c_in * kh + r * c_out * kw


def speedup_ranks(
    c_in: int, c_out: int, kh: int, kw: int, x: float, stride2: int = 1, multiple: int = 8
) -> tuple[int, int]:
    """The largest (R_in, R_out) = r·(C_in, C_out), rounded down to ``multiple``, whose block has
    at most 1/x of the convolution's MACs (``stride2`` = s_h·s_w)."""
    budget = c_out * c_in * kh * kw / x
    lo, hi = 0.0, 1.0
    for _ in range(60):  # the block's MACs grow with r: bisect
        mid = (lo + hi) / 2
        macs = (
            stride2 * c_in * mid * c_in
            + (mid * c_in) * (mid * c_out) * kh * kw
            + mid * c_out * c_out
        )
        if macs <= budget:
            lo = mid
        else:
            hi = mid

    def down(r: float, size: int) -> int:
        if multiple > 1 and size >= 16:
            return max(multiple, int(math.floor(r / multiple)) * multiple)
        return max(1, int(math.floor(r)))

    return down(lo * c_in, c_in), down(lo * c_out, c_out)


# HOOI's stop (it was 1e-6 and 100 iterations): the same fidelity in 1/2.7 of the time on
# random weights, which converge slowest (docs/benchmarks.md, compile time)
HOOI_TOL, HOOI_ITERATIONS = 1e-5, 25


def tucker2(w: np.ndarray, r_out: int, r_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(U_out [C_out, R_out], core [R_out, R_in, kh, kw], U_in [C_in, R_in]) by tensorly's HOOI
    from the HOSVD, stopped when an iteration moves the relative error by < ``HOOI_TOL``.
    A mode's rank cannot exceed the other's times kh·kw (the core's unfolding has no more
    columns): larger ranks are cut to that."""
    from tensorly.decomposition import partial_tucker

    k = int(np.prod(w.shape[2:]))
    r_out, r_in = min(r_out, r_in * k), min(r_in, r_out * k)

    (core, factors), _ = partial_tucker(
        np.asarray(w, np.float64),
        rank=[r_out, r_in],
        modes=[0, 1],
        init="svd",
        n_iter_max=HOOI_ITERATIONS,
        tol=HOOI_TOL,
    )
    return np.asarray(factors[0]), np.asarray(core), np.asarray(factors[1])


def spatial_svd(w: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray]:
    """(V1 [R, C_in, kh, 1], V2 [C_out, R, 1, kw]) with W ≈ V2 ∘ V1."""
    c_out, c_in, kh, kw = w.shape
    m = np.asarray(w, np.float64).transpose(1, 2, 0, 3).reshape(c_in * kh, c_out * kw)
    u, s, vt = np.linalg.svd(m, full_matrices=False)
    a = u[:, :r] * np.sqrt(s[:r])
    b = np.sqrt(s[:r])[:, None] * vt[:r]
    v1 = a.reshape(c_in, kh, r).transpose(2, 0, 1)[..., None]
    v2 = b.reshape(r, c_out, kw).transpose(1, 0, 2)[:, :, None, :]
    return v1, v2


def _unfold(w: np.ndarray, mode: int) -> np.ndarray:
    return np.moveaxis(np.asarray(w, np.float64), mode, 0).reshape(w.shape[mode], -1)


@dataclasses.dataclass
class TuckerConvPass(ShrinkPass):
    """Tucker-2 (three convs) or spatial SVD (two convs) of K×K convolutions, with rank
    selection."""

    name: ClassVar[str] = "tucker"
    lossy: ClassVar[bool] = True
    one_of: ClassVar[tuple[str, ...]] = ("rank", "energy", "vbmf", "speedup")

    mode: Literal["tucker", "spatial"] = "tucker"
    rank: float | None = options.share()
    energy: float | None = options.share()
    vbmf: bool = False
    speedup: float | None = options.speedup()
    round: int = 8
    min_channels: int = 16
    min_rank: float = 0.1
    refit: bool | None = None
    ridge: float = options.ridge(1e-3)
    samples: int = options.samples(128)
    skip_: tuple[str, ...] = options.layers()
    only: tuple[str, ...] = options.layers()
    floor: float | None = options.floor(0.9)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not any(getattr(self, k) not in (None, False) for k in self.one_of):
            self.speedup = 2.0

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        teacher = model.clone()
        done: list[ir.Node] = []
        layers = []
        for node in list(graph):
            if node.op_type != "Conv" or node.domain not in ("", "ai.onnx"):
                continue
            if self.only and node.name not in self.only:
                continue
            if reason := self._refusal(node):
                self.skip(node, reason)
                continue
            w = const_array(node.inputs[1])
            ranks = self._ranks(node, w)
            if isinstance(ranks, str):
                self.skip(node, ranks)
                continue
            last, record = self._rewrite(graph, node, w, ranks)
            done.append(last)
            layers.append(record)
            self.change(
                f"{record['node']}: {record['form']} ranks {record['ranks']}, MACs/pixel "
                f"{record['macs_before']} -> {record['macs_after']}",
                node.name,
            )
        if not done:
            return ir.passes.PassResult(model, modified=False)
        self.details["layers"] = layers
        if self.refit if self.refit is not None else self.has_real_data:
            with self.scratch() as workdir:
                self.details["refit"] = self.refit_nodes(
                    model, teacher, done, self.context.data, workdir
                )
        return ir.passes.PassResult(model, modified=True)

    # -- checks and ranks ----------------------------------------------------------------------
    def _refusal(self, node: ir.Node) -> str | None:
        if node.name in self.skip_:
            return "listed in skip"
        w = const_array(node.inputs[1]) if len(node.inputs) > 1 else None
        if w is None:
            return "weight is not constant"
        if w.ndim != 4:
            return f"{w.ndim - 2}-D convolution: only 2-D kernels are decomposed"
        if node.attributes.get_int("group", 1) != 1:
            return "grouped or depthwise convolution"
        if w.shape[2] == 1 and w.shape[3] == 1:
            return "1×1 kernel: the lowrank pass handles it"
        if node.attributes.get_string("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
            return "auto_pad SAME_* is not decomposed"
        if weight_users_outside(node.inputs[1], node):
            return "weight is shared with another node"
        if (
            len(node.inputs) > 2
            and node.inputs[2] is not None
            and const_array(node.inputs[2]) is None
        ):
            return "bias is not constant"
        if min(w.shape[0], w.shape[1]) < self.min_channels:
            return f"fewer than {self.min_channels} channels"
        return None

    def _ranks(self, node: ir.Node, w: np.ndarray):
        c_out, c_in, kh, kw = w.shape
        strides = list(node.attributes.get_ints("strides", [1, 1]))
        orig = c_out * c_in * kh * kw
        floor_in = max(2, math.ceil(self.min_rank * c_in))
        floor_out = max(2, math.ceil(self.min_rank * c_out))
        if self.mode == "spatial":
            full = min(c_in * kh, c_out * kw)
            if self.speedup is not None:
                r = int(orig / self.speedup // (strides[1] * c_in * kh + c_out * kw))
                r = (
                    max(1, (r // self.round) * self.round)
                    if self.round > 1 and full >= 16 and r >= self.round
                    else max(1, r)
                )
            elif self.rank is not None:
                r = round_rank(self.rank * full, full, self.round)
            else:
                m = np.asarray(w, np.float64).transpose(1, 2, 0, 3).reshape(c_in * kh, c_out * kw)
                r = (
                    energy_rank(np.linalg.svd(m, compute_uv=False), self.energy)
                    if self.energy
                    else evbmf_rank(m)
                )
                r = round_rank(max(r, floor_out), full, self.round)
            after = spatial_macs(c_in, c_out, r, kh, kw, strides[1])
            if after >= orig:
                return f"spatial SVD at rank {r} would not cut MACs ({after} >= {orig} per pixel)"
            return (r,)
        s = strides[0] * strides[1]
        if self.speedup is not None:
            r_in, r_out = speedup_ranks(c_in, c_out, kh, kw, self.speedup, s, self.round)
        elif self.rank is not None:
            r_in = round_rank(self.rank * c_in, c_in, self.round)
            r_out = round_rank(self.rank * c_out, c_out, self.round)
        else:
            if self.energy is not None:
                r_out = energy_rank(np.linalg.svd(_unfold(w, 0), compute_uv=False), self.energy)
                r_in = energy_rank(np.linalg.svd(_unfold(w, 1), compute_uv=False), self.energy)
            else:
                r_out, r_in = evbmf_rank(_unfold(w, 0)), evbmf_rank(_unfold(w, 1))
            r_in = round_rank(max(r_in, floor_in), c_in, self.round)
            r_out = round_rank(max(r_out, floor_out), c_out, self.round)
        after = s * c_in * r_in + r_in * r_out * kh * kw + r_out * c_out
        if after >= orig:
            return (
                f"Tucker at ranks ({r_out}, {r_in}) would not cut MACs "
                f"({after} >= {orig} per pixel)"
            )
        return (r_out, r_in)

    # -- rewrite --------------------------------------------------------------------------------
    def _rewrite(
        self, graph: ir.Graph, node: ir.Node, w: np.ndarray, ranks
    ) -> tuple[ir.Node, dict]:
        base = node.name or node.op_type
        dtype = w.dtype
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        attrs = {a.name: a for a in node.attributes.values()}
        pads = list(node.attributes.get_ints("pads", [0, 0, 0, 0]))
        strides = list(node.attributes.get_ints("strides", [1, 1]))
        dil = list(node.attributes.get_ints("dilations", [1, 1]))
        c_out, c_in, kh, kw = w.shape

        def const(arr, what):
            return new_initializer(graph, f"{base}.{what}", np.asarray(arr).astype(dtype))

        if self.mode == "tucker":
            r_out, r_in = ranks
            u_out, core, u_in = tucker2(w, r_out, r_in)
            first = ir.node(
                "Conv",
                [node.inputs[0], const(u_in.T[:, :, None, None], "tucker.in")],
                name=unique_name(graph, f"{base}.tucker_in"),
            )
            middle_attrs = {k: v for k, v in attrs.items() if k not in ("group", "kernel_shape")}
            middle = ir.node(
                "Conv",
                [first.outputs[0], const(core, "tucker.core")],
                attributes=middle_attrs,
                name=unique_name(graph, f"{base}.tucker_core"),
            )
            last = ir.node(
                "Conv",
                [
                    middle.outputs[0],
                    const(u_out[:, :, None, None], "tucker.out"),
                    *([bias] if bias is not None else []),
                ],
                name=unique_name(graph, f"{base}.tucker_out"),
            )
            nodes = [first, middle, last]
            after = strides[0] * strides[1] * c_in * r_in + r_in * r_out * kh * kw + r_out * c_out
            form, shown = "Tucker-2", [r_out, r_in]
        else:
            (r,) = ranks
            v1, v2 = spatial_svd(w, r)
            first = ir.node(
                "Conv",
                [node.inputs[0], const(v1, "svd.vertical")],
                attributes={
                    "pads": [pads[0], 0, pads[2], 0],
                    "strides": [strides[0], 1],
                    "dilations": [dil[0], 1],
                },
                name=unique_name(graph, f"{base}.svd_vertical"),
            )
            last = ir.node(
                "Conv",
                [
                    first.outputs[0],
                    const(v2, "svd.horizontal"),
                    *([bias] if bias is not None else []),
                ],
                attributes={
                    "pads": [0, pads[1], 0, pads[3]],
                    "strides": [1, strides[1]],
                    "dilations": [1, dil[1]],
                },
                name=unique_name(graph, f"{base}.svd_horizontal"),
            )
            nodes = [first, last]
            after = strides[1] * r * c_in * kh + r * c_out * kw
            form, shown = "spatial SVD", [r]
        for n in nodes[:-1]:
            n.outputs[0].name = unique_name(graph, f"{n.name}.out")
        out = node.outputs[0]
        graph.insert_before(node, nodes)
        out.replace_all_uses_with(last.outputs[0], replace_graph_outputs=True)
        graph.remove(node, safe=True)
        name = out.name
        out.name = None
        last.outputs[0].name = name  # the block's output keeps the convolution's output name
        last.outputs[0].type, last.outputs[0].shape = out.type, out.shape
        record = {
            "node": base,
            "form": form,
            "ranks": shown,
            "channels": [c_out, c_in],
            "macs_before": c_out * c_in * kh * kw,
            "macs_after": int(after),
        }
        return last, record

"""Fine-grained (unstructured or N:M) sparsity with compact storage.

Scores: ``magnitude`` |W|, or ``activation`` |W|·‖X_c‖₂ (Wanda, Sun et al. 2023: the weight times
the norm of the input feature it multiplies, measured on calibration data), compared within each
output (Wanda) or, with ``scope=layer``, across the whole layer. ``sparsity`` of each layer's
weights is zeroed -- or of all eligible weights together with ``scope=global`` (one magnitude
threshold) -- or, with ``pattern=2:4``, the N smallest of every M consecutive weights along the
input dimension of each output.

Weights inside If/Loop/Scan bodies are sparsified too, by magnitude (their inputs cannot be
probed). Storage (``storage=auto``, the smallest): a layer's weight becomes a bit mask (1 bit
per weight, packed in uint8) plus its non-zero values, decoded in the graph::

    bits = Mod(BitShift(packed[:, None], [0..7], RIGHT), 2) -> Reshape -> Slice(n)
    W = Reshape(Where(Cast(bits, bool), Gather(values, CumSum(bits) − 1), 0), shape)

which onnxruntime folds into the dense weight when the session is created. Float values cost
(1 − s)·4 + 1/8 bytes per weight: 0.53× the dense bytes at 50%, 0.23× at 80%; ``values=int8``
stores them as int8 with one scale per tensor (Cast, Mul) for (1 − s) + 1/8 bytes, at the
price of int8 rounding error. Stock onnxruntime runs the model at dense speed: unstructured zeros
do not make its kernels faster -- the saving is the file.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from typing import ClassVar, Literal

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import NameFixPass

from onnxshrink.errors import OptionError
from onnxshrink.irtools import const_array, new_initializer, take, unique_name, weight_users_outside
from onnxshrink.passes import options
from onnxshrink.passes.base import ShrinkPass

__all__ = ["SparsifyPass", "nm_mask", "encoded_bytes"]

logger = logging.getLogger(__name__)


def _rows(node: ir.Node, w: np.ndarray) -> np.ndarray:
    """The weights as [outputs, inputs] (a view order the scores and N:M groups use)."""
    if node.op_type == "Conv":
        return w.reshape(w.shape[0], -1)
    if node.op_type == "Gemm" and node.attributes.get_int("transB", 0):
        return w
    return w.T  # MatMul / Gemm: [K, N] -> [N, K]


def _unrows(node: ir.Node, rows: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if node.op_type == "Conv" or (node.op_type == "Gemm" and node.attributes.get_int("transB", 0)):
        return rows.reshape(shape)
    return rows.T.reshape(shape)


def nm_mask(scores: np.ndarray, n: int, m: int) -> np.ndarray:
    """Keep mask [outputs, inputs]: the (m − n) largest of every m consecutive inputs kept,
    n pruned (inputs not a multiple of m: the padding of the short tail group is pruned first)."""
    out, k = scores.shape
    pad = (-k) % m
    s = np.concatenate([scores, np.full((out, pad), -np.inf)], axis=1).reshape(out, -1, m)
    order = np.argsort(s, axis=2, kind="stable")
    keep = np.ones_like(s, dtype=bool)
    np.put_along_axis(keep, order[:, :, :n], False, axis=2)
    return keep.reshape(out, -1)[:, :k]


def encoded_bytes(n: int, nnz: int, values: str) -> int:
    return (n + 7) // 8 + nnz * (1 if values == "int8" else 4)


@dataclasses.dataclass
class SparsifyPass(ShrinkPass):
    """Unstructured or N:M weight sparsity (magnitude or activation-aware), stored compactly."""

    name: ClassVar[str] = "sparsify"
    lossy: ClassVar[bool] = True
    subgraphs: ClassVar[bool] = True

    sparsity: float = 0.5
    method: Literal["auto", "magnitude", "activation"] = "auto"
    scope: Literal["output", "layer", "global"] = "output"
    pattern: str = "none"
    values: Literal["float", "int8"] = "float"
    storage: Literal["auto", "dense", "mask"] = "auto"
    min_size: int = 1024
    samples: int = options.samples(64)
    skip_: tuple[str, ...] = options.layers()
    floor: float | None = options.floor(0.9)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.sparsity < 1:
            raise OptionError(f"pass 'sparsify': sparsity must be in (0, 1), got {self.sparsity}")
        self._nm = None
        if self.pattern != "none":
            m = re.fullmatch(r"(\d+):(\d+)", self.pattern)
            if not m or not 0 < int(m.group(1)) < int(m.group(2)):
                raise OptionError(
                    "pass 'sparsify': pattern must be none or N:M with 0 < N < M, got "
                    f"'{self.pattern}'"
                )
            self._nm = (int(m.group(2)) - int(m.group(1)), int(m.group(2)))  # (pruned, group)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        NameFixPass()(model)  # every node named: the decoders and the report are named after them
        graph = model.graph
        if (opset := graph.opset_imports.get("", 1)) < 11:
            self.skip("model", f"opset {opset}: the decoder needs BitShift and CumSum (opset 11)")
            return ir.passes.PassResult(model, modified=False)
        layers = []
        for node in list(ir.traversal.RecursiveGraphIterator(graph)):
            if node.op_type not in ("Conv", "Gemm", "MatMul") or node.domain not in ("", "ai.onnx"):
                continue
            w = const_array(node.inputs[1]) if len(node.inputs) > 1 else None
            reason = self._refusal(node, w)
            if reason:
                self.skip(node, reason)
                continue
            layers.append((node, w))
        if not layers:
            return ir.passes.PassResult(model, modified=False)
        data = self.context.data
        method = (
            self.method
            if self.method != "auto"
            else ("activation" if self.has_real_data else "magnitude")
        )
        main = [n for n, _ in layers if n.graph is graph]  # a body's inputs cannot be probed
        norms = self._input_norms(model, main, data) if method == "activation" and main else {}
        scores = {
            id(n): np.abs(_rows(n, w).astype(np.float64)) * norms.get(id(n), 1.0) for n, w in layers
        }
        threshold = None
        if self.scope == "global" and self._nm is None:
            threshold = np.quantile(
                np.concatenate([s.ravel() for s in scores.values()]), self.sparsity
            )
        before = after = 0
        records = []
        for node, w in layers:
            keep = self._keep(scores[id(node)], threshold)
            rows = np.where(keep, _rows(node, w), 0)
            sparse = _unrows(node, rows, w.shape).astype(w.dtype)
            nnz = int(np.count_nonzero(sparse))
            form = self._store(node.graph, node, sparse, opset)
            size = w.nbytes if form == "dense" else encoded_bytes(sparse.size, nnz, self.values)
            before, after = before + w.nbytes, after + size
            records.append(
                {
                    "node": node.name,
                    "sparsity": round(1 - nnz / sparse.size, 4),
                    "form": form,
                    "bytes": [int(w.nbytes), int(size)],
                }
            )
            self.change(
                f"{node.name}: {100 * (1 - nnz / sparse.size):.1f}% zeros, {form}, "
                f"{w.nbytes} -> {size} bytes",
                node.name,
            )
        self.details.update(
            {
                "method": method,
                "layers": records,
                "weight_bytes": [before, after],
                "note": "stock onnxruntime runs unstructured sparsity at dense speed; "
                "the saving is the file size",
            }
        )
        return ir.passes.PassResult(model, modified=True)

    def _refusal(self, node: ir.Node, w: np.ndarray | None) -> str | None:
        if node.name in self.skip_:
            return "listed in skip"
        if w is None:
            return "weight is not constant"
        if not np.issubdtype(w.dtype, np.floating):
            return f"weight is {w.dtype}: already quantized or encoded"
        if (w.ndim < 3) if node.op_type == "Conv" else (w.ndim != 2):
            return f"weight of rank {w.ndim} is not sparsified"
        if w.size < self.min_size:
            return f"fewer than min-size {self.min_size} weights"
        if weight_users_outside(node.inputs[1], node):
            return "weight is shared with another node"
        if node.op_type == "Gemm" and node.attributes.get_int("transA", 0):
            return "Gemm with transA is not sparsified"
        return None

    def _keep(self, score: np.ndarray, threshold: float | None) -> np.ndarray:
        if self._nm is not None:
            return nm_mask(score, *self._nm)
        if threshold is not None:
            return score > threshold
        if self.scope == "layer":
            return score > np.quantile(score, self.sparsity)
        k = int(round(self.sparsity * score.shape[1]))  # per output (Wanda's comparison group)
        order = np.argsort(score, axis=1, kind="stable")
        keep = np.ones_like(score, dtype=bool)
        np.put_along_axis(keep, order[:, :k], False, axis=1)
        return keep

    def _input_norms(self, model, nodes, data) -> dict[int, np.ndarray]:
        """Per node, ‖x‖₂ of the input feature each weight multiplies, shaped like its rows
        [outputs, inputs] (a Conv's input channel repeated over the kernel taps, by group)."""
        from onnxshrink.calibrate import ChannelMoments, Probe

        axes = {n.inputs[0].name: (1 if n.op_type == "Conv" else -1) for n in nodes}
        moments: dict[str, ChannelMoments] = {}
        with self.scratch() as workdir:
            with Probe(model, list(axes), workdir) as probe:
                for batch in probe.run(data, self.samples):
                    for name, arr in batch.items():
                        axis = axes[name] % arr.ndim
                        moments.setdefault(name, ChannelMoments(axis)).update(arr)
        out = {}
        for node in nodes:
            norm = np.sqrt(moments[node.inputs[0].name].mean_sq)
            w = const_array(node.inputs[1])
            if node.op_type == "Conv":
                group = node.attributes.get_int("group", 1)
                per_group = w.shape[1]
                taps = int(np.prod(w.shape[2:]))
                if norm.size != group * per_group:
                    continue  # the input's channel count does not match: magnitude for this layer
                rows = np.repeat(
                    norm.reshape(group, per_group), taps, axis=1
                )  # [group, in/g · taps]
                out[id(node)] = np.repeat(rows, w.shape[0] // group, axis=0)  # [outputs, ...]
            elif norm.size == _rows(node, w).shape[1]:
                out[id(node)] = norm[None, :]
        return out

    def _store(self, graph: ir.Graph, node: ir.Node, sparse: np.ndarray, opset: int) -> str:
        n = sparse.size
        nnz = int(np.count_nonzero(sparse))
        if self.storage == "dense" or (
            self.storage == "auto" and encoded_bytes(n, nnz, self.values) >= sparse.nbytes
        ):
            v = ir.val(
                unique_name(graph, f"{node.name}.sparse"),
                const_value=ir.tensor(np.ascontiguousarray(sparse)),
            )
            graph.register_initializer(v)
            node.replace_input_with(1, v)
            return "dense"
        _decode(graph, node, sparse, self.values, opset)
        return "mask+int8" if self.values == "int8" else "mask"


def onnx_dtype(dtype: np.dtype) -> int:
    from onnx.helper import np_dtype_to_tensor_dtype

    return int(np_dtype_to_tensor_dtype(np.dtype(dtype)))


def _decode(graph: ir.Graph, node: ir.Node, sparse: np.ndarray, values: str, opset: int) -> None:
    """Inserts the mask + values decoder in front of ``node`` (in ``graph``, the main graph or a
    body; ``opset``: the model's) and feeds it the decoded weight."""
    base = f"{node.name}.sparse"
    flat = sparse.reshape(-1)
    mask = flat != 0
    packed = np.packbits(mask, bitorder="little")

    def const(arr, what):
        return new_initializer(graph, f"{base}.{what}", arr)

    count = iter(range(100))

    def op(kind, inputs, **attrs):
        name = take(graph, f"{base}.decode{next(count)}.{kind}")
        nd = ir.node(kind, inputs, attributes=attrs or None, name=name)
        graph.insert_before(node, nd)  # in the graph at once: the next unique name sees it
        nd.outputs[0].name = unique_name(graph, f"{nd.name}.out")
        return nd.outputs[0]

    shifted = op(
        "BitShift",
        [
            op("Unsqueeze", [const(packed, "mask"), const(np.array([1], np.int64), "axis")])
            if opset >= 13
            else op("Unsqueeze", [const(packed, "mask")], axes=[1]),  # axes: an attribute < 13
            const(np.arange(8, dtype=np.uint8), "shifts"),
        ],
        direction="RIGHT",
    )
    bits = op("Mod", [shifted, const(np.array(2, np.uint8), "two")])
    bits = op("Reshape", [bits, const(np.array([-1], np.int64), "flat")])
    bits = op(
        "Slice",
        [
            bits,
            const(np.array([0], np.int64), "start"),
            const(np.array([flat.size], np.int64), "end"),
        ],
    )
    keep = op("Cast", [bits], to=ir.DataType.BOOL)
    # position p takes value number cumsum(bits)[p] - 1 (-1 where nothing is kept yet: Gather
    # wraps it, and Where discards it). No NonZero: onnxruntime's constant folding skips it.
    index = op(
        "Sub",
        [
            op(
                "CumSum",
                [op("Cast", [bits], to=ir.DataType.INT64), const(np.array(0, np.int64), "axis0")],
            ),
            const(np.array(1, np.int64), "one"),
        ],
    )
    nz = flat[mask]
    if values == "int8":
        scale = max(float(np.abs(nz).max(initial=0.0)) / 127.0, 1e-12)
        q = np.clip(np.round(nz / scale), -127, 127).astype(np.int8)
        # Cast + Mul rather than DequantizeLinear, which onnxruntime leaves unfolded (QDQ fusion)
        vals = op(
            "Mul",
            [
                op("Cast", [const(q, "values")], to=ir.DataType(onnx_dtype(sparse.dtype))),
                const(np.array(scale, sparse.dtype), "scale"),
            ],
        )
    else:
        vals = const(nz.astype(sparse.dtype), "values")
    dense = op(
        "Where",
        [keep, op("Gather", [vals, index], axis=0), const(np.array(0, sparse.dtype), "zero")],
    )
    weight = op("Reshape", [dense, const(np.array(sparse.shape, np.int64), "shape")])
    node.replace_input_with(1, weight)

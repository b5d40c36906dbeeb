"""4-bit (or 8-bit) weight-only quantization: MatMul → onnxruntime's ``MatMulNBits``.

Each MatMul with a constant 2-D float32 weight W [K, N] keeps float activations and stores W
per column in blocks of ``block`` inputs, ``bits``-bit codes with a scale and zero point per
block (:mod:`onnxshrink.analysis.nbits`): w ≈ s·(c − z). The grid of each block is the range
∋ 0 shrunk by the share (1 down to 0.7) that minimises Σ h_k (w_k − ŵ_k)², h_k the input's
second moment on the calibration data (activation-aware: a large input's weight costs more;
h = 1 without data). With real data the codes are then rounded Hessian-aware (GPTQ) where that
beats nearest rounding on held-out calibration samples
(:mod:`onnxshrink.analysis.heldout_rounding`). Embedding tables become ``GatherBlockQuantized``
with the same bits (:mod:`onnxshrink.passes.embeddings`). A Gemm's weight is α·B (Bᵀ when
transB), β·C added after. ``symmetric=true``: every zero point 2^(bits−1), left out of the
file (MatMulNBits' default); ``accuracy-level`` is the op's attribute (4: onnxruntime may
quantize the activations to int8 per block to multiply). Refused with a reason: non-float32
tensors, a weight shared with another node, MatMuls of two activations, Gemm with transA or a
non-constant C.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal

import numpy as np
import onnx_ir as ir

from onnxshrink import memo
from onnxshrink.analysis import nbits
from onnxshrink.analysis.blockquant import chunks
from onnxshrink.analysis.heldout_rounding import choose_in_parts
from onnxshrink.errors import OptionError
from onnxshrink.irtools import const_array, unique_name
from onnxshrink.passes import options
from onnxshrink.passes.base import ShrinkPass
from onnxshrink.passes.embeddings import embedding_gathers, quantize_gather
from onnxshrink.passes.weight_layers import (
    constant,
    held_out_layers,
    release,
    replace_with_contrib,
    select_layers,
    weight_refusal,
)

__all__ = ["QuantizeWeightsPass"]

# weights per column chunk in the held-out choice: a vocabulary head's float64 systems (W,
# nearest, three candidates) would otherwise be 0.5 GB each
COLUMN_CHUNK = 1 << 22


def _refusal(node: ir.Node, dtypes) -> str | None:
    return weight_refusal(node, dtypes, "MatMulNBits")


def _bias(node: ir.Node) -> ir.Value | None:
    """A Gemm's C, or None."""
    return node.inputs[2] if node.op_type == "Gemm" and len(node.inputs) > 2 else None


def _weight(node: ir.Node) -> np.ndarray:
    """The [K, N] weight of a MatMul, or a Gemm's α·B (Bᵀ when transB)."""
    w = const_array(node.inputs[1])
    if node.op_type != "Gemm":
        return w
    if node.attributes.get_int("transB", 0):
        w = np.ascontiguousarray(w.T)
    alpha = node.attributes.get_float("alpha", 1.0)
    return w if alpha == 1.0 else w * np.float32(alpha)


def _shape(node: ir.Node) -> tuple[int, int]:
    """[K, N] of :func:`_weight`, without reading it."""
    k, n = (int(d) for d in node.inputs[1].const_value.shape)
    return (n, k) if node.op_type == "Gemm" and node.attributes.get_int("transB", 0) else (k, n)


@dataclasses.dataclass
class QuantizeWeightsPass(ShrinkPass):
    """Weight-only 4/8-bit MatMul (onnxruntime's MatMulNBits) with activation-aware block grids
    and Hessian-aware rounding; embedding tables block-quantized too."""

    name: ClassVar[str] = "quantize-weights"
    lossy: ClassVar[bool] = True

    bits: int = 4
    block: int = 32
    rounding: Literal["auto", "nearest", "hessian"] = "auto"
    embeddings: bool = True
    symmetric: bool = False
    accuracy_level: int = 0
    skip_: tuple[str, ...] = options.layers()  # CLI name: skip (or exclude, its old name)
    samples: int = options.samples(128)
    floor: float | None = options.floor(0.9)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.bits not in (4, 8):
            raise OptionError(f"pass '{self.name}': bits must be 4 or 8, got {self.bits}")
        if self.block not in (16, 32, 64, 128, 256):
            raise OptionError(
                f"pass '{self.name}': block must be 16, 32, 64, 128 or 256, got {self.block}"
            )
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise OptionError(
                f"pass '{self.name}': accuracy-level must be 0-4, got {self.accuracy_level}"
            )

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if any(n.op_type in ("MatMulNBits", "GatherBlockQuantized") for n in model.graph):
            self.skip("model", "the model already has block-quantized weights")
            return ir.passes.PassResult(model, modified=False)
        nodes = select_layers(self, model, _refusal)
        tables = embedding_gathers(self, model) if self.embeddings else []
        if not nodes and not tables:
            return ir.passes.PassResult(model, modified=False)
        # Grams from the model before the pass, tables still float: a layer's result then does
        # not depend on which others a re-run spares (onnxshrink.memo)
        chosen = self._hessian(model, [n for n in nodes if not memo.known(self, n.name)])
        for table in tables:
            quantize_gather(self, model, table, bits=self.bits)
        before = after = 0
        counts: dict[str, int] = {}  # layers per rounding chosen on held-out samples
        for node in nodes:
            source, shape = node.inputs[1], _shape(node)
            if (got := memo.recall(self, node.name)) is not None:  # a re-run (partial application)
                packed, (how, label) = tuple(got[0]), got[1]
            else:
                w = _weight(node)
                packed, how, label = chosen.pop(node.name, None) or (
                    self._pack(w, *self._nearest(w, None)), "", None
                )  # fmt: skip
                del w
                memo.remember(self, node.name, list(packed), (how, label))
            if label is not None:
                counts[label] = counts.get(label, 0) + 1
            before += 4 * shape[0] * shape[1]  # float32 (others are refused)
            after += self._emit(model, node, shape, packed)
            release(source)
            self.change(
                f"{node.name}: {self.bits}-bit weights, blocks of {self.block}{how}", node.name
            )
        if self._wants_hessian():
            self.details["rounding"] = counts
        self.details["weight_only"] = {
            "layers": len(nodes),
            "bytes_before": before,
            "bytes_after": after,
        }
        return ir.passes.PassResult(model, modified=True)

    def _nearest(self, w: np.ndarray, h):
        scales, zps = nbits.block_grid(w, self.bits, self.block, h, self.symmetric)
        return nbits.nearest_codes(w, scales, zps, self.bits, self.block), scales, zps

    def _wants_hessian(self) -> bool:
        return self.context.data is not None and (
            self.rounding == "hessian" or (self.rounding == "auto" and self.has_real_data)
        )

    def _hessian(self, model: ir.Model, nodes: list[ir.Node]) -> dict[str, tuple]:
        """Node name -> (packed weight, how, the rounding chosen) with an activation-aware
        grid, rounded Hessian-aware where that wins on held-out samples."""
        if not self._wants_hessian():
            return {}
        out = {}
        for node, H_fit, H_val in held_out_layers(self, model, nodes):
            w = _weight(node)
            k = w.shape[0]  # a Gemm's Grams carry a bias row last: C stays float, exact
            H_fit, H_val = H_fit[..., :k, :k], H_val[..., :k, :k]
            H = H_fit + H_val
            codes, scales, zps = self._nearest(w, np.einsum("gii->gi", H)[0])
            cols = chunks(w.shape[1], w.shape[0], COLUMN_CHUNK)
            parts = (self._candidates(w[:, c], codes[c], scales[c], zps[c]) for c in cols)
            damp, record = choose_in_parts(parts, H_fit, H_val)
            how = ", activation-aware grid"
            if damp is not None:
                codes = np.concatenate(
                    [
                        nbits.gptq_codes(H, w[:, c], scales[c], zps[c], self.bits, self.block, damp)
                        for c in cols
                    ]
                )
                how += ", Hessian-aware rounding"
            packed = self._pack(w, codes, scales, zps)  # half the codes' bytes
            out[node.name] = (packed, how, record["chosen"])
            del w
            release(node.inputs[1])
        return out

    def _candidates(self, w, codes, scales, zps) -> tuple:
        """(W, its nearest rounding, GPTQ rounding as a function of (H, damp)) as systems
        [1, K, n] of the columns ``w`` [K, n], for :func:`choose_in_parts`."""
        k = w.shape[0]

        def fit(Hx, damp):
            c = nbits.gptq_codes(Hx, w, scales, zps, self.bits, self.block, damp)
            return nbits.dequantized(c, scales, zps, self.block, k)[None]

        nearest = nbits.dequantized(codes, scales, zps, self.block, k)[None]
        return np.asarray(w, np.float64)[None], nearest, fit

    def _pack(self, w, codes, scales, zps) -> tuple:
        return nbits.pack(w, self.bits, self.block, codes, scales, zps)

    def _emit(self, model: ir.Model, node: ir.Node, shape, packed) -> int:
        """Replaces ``node`` by MatMulNBits over ``packed`` (:func:`nbits.pack`'s B, scales and
        zero points); the bytes its weight takes now."""
        graph = model.graph
        (k, n), (b, s, z) = shape, packed
        base = node.name
        inputs = [node.inputs[0]]
        if self.symmetric:  # every zero point is the op's default
            z = z[:0]
        for arr, what in ((b, "weight_quantized"), (s, "weight_scale"), (z, "weight_zero_point")):
            if arr.size:
                inputs.append(constant(graph, f"{base}.{what}", arr))
        attrs = {"K": k, "N": n, "bits": self.bits, "block_size": self.block}
        if self.accuracy_level:  # the compute type onnxruntime may use (4: int8 activations)
            attrs["accuracy_level"] = self.accuracy_level
        c = _bias(node)
        if c is not None:  # a Gemm's β·C, added after: Y = X·(α·B) + β·C
            bias = const_array(c) * np.float32(node.attributes.get_float("beta", 1.0))
            c = constant(graph, f"{base}.bias", np.asarray(bias, np.float32))
        new = replace_with_contrib(model, node, "MatMulNBits", inputs, attrs, f"{base}.nbits")
        if c is not None:
            y = new.outputs[0]
            out = ir.Value(name=y.name, type=y.type, shape=y.shape)
            y.name = unique_name(graph, f"{y.name}.nobias")
            y.replace_all_uses_with(out, replace_graph_outputs=True)
            add = ir.Node("", "Add", [y, c], outputs=[out], name=unique_name(graph, f"{base}.b"))
            graph.insert_after(new, [add])
        return b.nbytes + s.nbytes + z.nbytes + (0 if c is None else 4 * bias.size)

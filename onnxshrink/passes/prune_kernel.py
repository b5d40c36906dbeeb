"""Kernel-shape pruning: drop whole kernel rows / columns of K×K convolutions, shrinking the kernel.

For a Conv with weights W [C_out, C_in/g, K_h, K_w], the energy of a tap (i, j) is
Σ_{o,c} W[o, c, i, j]² -- the same spatial position across every filter of the layer. The pass
keeps the rows R ⊆ {0..K_h-1} and columns C ⊆ {0..K_w-1} that hold the most energy with at most
(1 − ``ratio``)·K_h·K_w taps, and rewrites the layer with the smaller kernel W[:, :, R][..., C]:
no new operator, fewer MACs and bytes.

A kept set must be an arithmetic progression R = {a, a+m, ..., a+(n-1)m} (any set of one or two
rows is). Along that axis the output is then unchanged in shape and alignment with

    dilation' = m·d,   pad_begin' = pad_begin − a·d,   pad_end' = pad_end − (K−1−(a+(n−1)m))·d

since y[i] = Σ_t W[a+mt]·x[i·s + (a+mt)·d − pad_begin] is a convolution with taps t·(m·d) from
offset −(pad_begin − a·d), and the output length (H + pads − ((K−1)d + 1))/s + 1 keeps its
numerator. E.g. 3×3, pads 1, stride 1: dropping the top row gives 2×3 with pads (0, 1, 1, 1) in
(top, left, bottom, right) order; dropping the middle row gives 2×3 with dilation (2, 1). A
shape whose pads would go negative is not representable without cropping the input: the next
best shape is tried, and a layer with none is left alone with the reason.

With real data (``refit``), the remaining taps of each changed layer (group by group) are
re-fitted by ridge least squares to the original layer's outputs (:mod:`onnxshrink.analysis.refit`).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from typing import ClassVar

import numpy as np
import onnx_ir as ir

from onnxshrink.errors import OptionError
from onnxshrink.irtools import const_array, set_const_input, weight_users_outside
from onnxshrink.passes import options
from onnxshrink.passes.base import ShrinkPass

__all__ = ["PruneKernelPass", "progressions", "kernel_shape"]

logger = logging.getLogger(__name__)


def progressions(k: int) -> list[tuple[int, ...]]:
    """Every non-empty arithmetic progression of kept positions in range(k)."""
    out = {(a,) for a in range(k)}
    for a in range(k):
        for m in range(1, k):
            for n in range(2, k + 1):
                last = a + (n - 1) * m
                if last < k:
                    out.add(tuple(range(a, last + 1, m)))
    return sorted(out, key=lambda p: (-len(p), p))


def _axis(
    keep: tuple[int, ...], k: int, d: int, begin: int, end: int
) -> tuple[int, int, int] | None:
    """(dilation, pad_begin, pad_end) keeping ``keep`` of ``k`` taps, or None if pads go
    negative."""
    a, last = keep[0], keep[-1]
    m = keep[1] - keep[0] if len(keep) > 1 else 1
    b, e = begin - a * d, end - (k - 1 - last) * d
    if b < 0 or e < 0:
        return None
    return (m * d if len(keep) > 1 else d), b, e


def kernel_shape(energy: np.ndarray, budget: int, dil: list[int], pads: list[int]):
    """The (rows, cols, geometry) with at most ``budget`` taps and the most energy, or None.
    ``energy`` is [K_h, K_w]; pads in ONNX order (top, left, bottom, right)."""
    kh, kw = energy.shape
    best, best_e = None, -1.0
    for rows, cols in itertools.product(progressions(kh), progressions(kw)):
        if len(rows) * len(cols) > budget:
            continue
        gh = _axis(rows, kh, dil[0], pads[0], pads[2])
        gw = _axis(cols, kw, dil[1], pads[1], pads[3])
        if gh is None or gw is None:
            continue
        e = float(energy[np.ix_(rows, cols)].sum())
        if e > best_e:
            best, best_e = (rows, cols, gh, gw), e
    return best


@dataclasses.dataclass
class PruneKernelPass(ShrinkPass):
    """Kernel-shape pruning: whole kernel rows/columns of K×K convs removed, kernels shrunk."""

    name: ClassVar[str] = "prune-kernel"
    lossy: ClassVar[bool] = True

    ratio: float = 0.25
    refit: bool | None = None
    ridge: float = options.ridge(1e-3)
    samples: int = options.samples(128)
    skip_: tuple[str, ...] = options.layers()
    only: tuple[str, ...] = options.layers()
    floor: float | None = options.floor(0.9)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.ratio < 1:
            raise OptionError(f"pass 'prune-kernel': ratio must be in (0, 1), got {self.ratio}")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        teacher = model.clone()
        changed: list[ir.Node] = []
        layers = []
        for node in list(model.graph):
            if node.op_type != "Conv" or node.domain not in ("", "ai.onnx"):
                continue
            if self.only and node.name not in self.only:
                continue
            if reason := self._refusal(node):
                self.skip(node, reason)
                continue
            w = const_array(node.inputs[1])
            energy = np.square(w.astype(np.float64)).sum((0, 1))
            kh, kw = energy.shape
            budget = int(np.floor((1 - self.ratio) * kh * kw + 1e-9))
            dil = list(node.attributes.get_ints("dilations", [1, 1]))
            pads = list(node.attributes.get_ints("pads", [0, 0, 0, 0]))
            choice = kernel_shape(energy, budget, dil, pads)
            if choice is None:
                self.skip(
                    node,
                    f"no kernel shape with at most {budget} of {kh * kw} taps keeps the pads "
                    f"{pads} non-negative (the output would shift)",
                )
                continue
            rows, cols, (dh, pt, pb), (dw, pl, pr) = choice
            set_const_input(
                model.graph,
                node,
                1,
                np.ascontiguousarray(w[:, :, list(rows)][:, :, :, list(cols)]),
                "kernel_pruned",
            )
            node.attributes["dilations"] = ir.AttrInt64s("dilations", [dh, dw])
            node.attributes["pads"] = ir.AttrInt64s("pads", [pt, pl, pb, pr])
            if "kernel_shape" in node.attributes:
                node.attributes["kernel_shape"] = ir.AttrInt64s(
                    "kernel_shape", [len(rows), len(cols)]
                )
            kept = float(energy[np.ix_(rows, cols)].sum() / max(energy.sum(), 1e-30))
            layers.append(
                {
                    "node": node.name,
                    "kernel": f"{kh}×{kw} -> {len(rows)}×{len(cols)}",
                    "rows": list(rows),
                    "cols": list(cols),
                    "energy_kept": round(kept, 6),
                }
            )
            self.change(
                f"{node.name}: kernel {kh}×{kw} -> {len(rows)}×{len(cols)} (rows {list(rows)}, "
                f"cols {list(cols)}; {100 * kept:.1f}% of the weight energy)",
                node.name,
            )
            changed.append(node)
        if not changed:
            return ir.passes.PassResult(model, modified=False)
        self.details["layers"] = layers
        if self.refit if self.refit is not None else self.has_real_data:
            with self.scratch() as workdir:
                if results := self.refit_nodes(model, teacher, changed, self.context.data, workdir):
                    self.details["refit"] = results
        return ir.passes.PassResult(model, modified=True)

    def _refusal(self, node: ir.Node) -> str | None:
        if node.name in self.skip_:
            return "listed in skip"
        w = const_array(node.inputs[1]) if len(node.inputs) > 1 else None
        if w is None:
            return "weight is not constant"
        if w.ndim != 4:
            return f"{w.ndim - 2}-D convolution: only 2-D kernels are pruned"
        if w.shape[2] * w.shape[3] < 2:
            return "1×1 kernel: nothing to prune"
        if node.attributes.get_string("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
            return "auto_pad SAME_*: the pads are implicit"
        if weight_users_outside(node.inputs[1], node):
            return "weight is shared with another node"
        return None

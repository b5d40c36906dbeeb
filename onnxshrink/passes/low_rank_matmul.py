"""Low-rank factorisation of MatMul, Gemm and 1×1 Conv weights into a fused pair of products.

A layer Y = X·W (+ b) with a constant W (n_in × n_out) becomes Y ≈ (X·A)·B through rank r,
where r·(n_in + n_out) < n_in·n_out (layers that would not shrink are left alone, with the
reason). Targets:

* ``MatMul(X, W)``, W a constant matrix, X of any rank (batched rows: [..., n_in]);
* ``Gemm(A, B, C)`` with every ``transA``/``transB``/``alpha``/``beta``: W = alpha·op(B),
  the rows are op(A); C (constant or not) is kept with its beta;
* ``Conv`` with a 1×1 kernel and group 1: W = weight[:, :, 0, 0]ᵀ, the pixels are the rows.

Factors (:mod:`onnxshrink.analysis.lowrank`): ``method=svd`` truncates W's SVD;
``method=activation`` (the default with real data) whitens by the calibration inputs' second
moment (Cholesky, ``ridge``) so the error is least on the outputs the layer really produces;
where the layer has a bias -- Gemm with a constant or no C, Conv, MatMul followed by an Add of a
constant vector -- the covariance is used and the bias takes the mean shift, b̃ = b + μ(W − AB).

Ranks: ``rank=<ratio>`` of min(n_in, n_out); ``energy=<f>`` of the squared spectrum (the
whitened one when activation-aware -- the share of output energy kept on the calibration data --
or W's own with ``spectrum=weights``); ``speedup=<x>`` (default 2): at most 1/x of each layer's
MACs; ``target-macs=<f>``: a whole-model MAC budget, ranks allocated greedily by output energy
lost per MAC saved. Ranks are rounded to a multiple of ``round`` (up for energy, down for
speedup, nearest for rank).

Emitted form: :mod:`onnxshrink.passes.lowrank_emit`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import ClassVar, Literal

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import NameFixPass

from onnxshrink import marks
from onnxshrink.analysis.lowrank import (
    InputMoments,
    factorize,
    shrinks,
    spectrum,
    speedup_rank,
)
from onnxshrink.analysis.ranks import energy_rank, round_rank
from onnxshrink.errors import OptionError
from onnxshrink.irtools import const_array, weight_users_outside
from onnxshrink.passes import options
from onnxshrink.passes.base import ShrinkPass
from onnxshrink.passes.lowrank_emit import DOMAIN, Target, rewrite

__all__ = ["DOMAIN", "LowRankMatMulPass"]

logger = logging.getLogger(__name__)

_ROWS_PER_BATCH = 8192


def _rows(key: tuple, x: np.ndarray, n_in: int) -> np.ndarray:
    if key[1] == "T":
        return x.T
    if key[1] == "conv":
        return x[:, :, :: key[2], :: key[3]].transpose(0, 2, 3, 1).reshape(-1, n_in)
    return x.reshape(-1, n_in)


def _bias_add(node: ir.Node, n_out: int) -> ir.Node | None:
    """The Add right after a MatMul that adds a constant vector of n_out (a Linear's bias)."""
    out = node.outputs[0]
    users = out.consumers()
    if len(users) != 1 or out.is_graph_output() or users[0].op_type != "Add":
        return None
    add = users[0]
    other = add.inputs[1] if add.inputs[0] is out else add.inputs[0]
    b = const_array(other)
    if b is None or b.size != n_out or b.shape[-1] != n_out or weight_users_outside(other, add):
        return None
    return add


@dataclasses.dataclass
class LowRankMatMulPass(ShrinkPass):
    """Low-rank (SVD or activation-aware) factorisation of MatMul/Gemm/1×1 Conv weights."""

    name: ClassVar[str] = "lowrank"
    lossy: ClassVar[bool] = True
    one_of: ClassVar[tuple[str, ...]] = ("rank", "energy", "speedup", "target_macs")

    method: Literal["auto", "svd", "activation"] = "auto"
    rank: float | None = options.share()
    energy: float | None = options.share()
    speedup: float | None = options.speedup()
    target_macs: float | None = options.share(closed=False)
    spectrum: Literal["factorised", "weights"] = "factorised"
    round: int = 8
    fused: bool = True
    ops: tuple[str, ...] = ("MatMul", "Gemm", "Conv")
    min_size: int = 16
    ridge: float = options.ridge(1e-4)
    samples: int = options.samples(128)
    shrink_only: bool = True
    skip_: tuple[str, ...] = options.layers()
    only: tuple[str, ...] = options.layers()
    floor: float | None = options.floor(0.9)

    def __post_init__(self) -> None:
        super().__post_init__()
        if all(getattr(self, k) is None for k in self.one_of):
            self.speedup = 2.0
        bad = set(self.ops) - {"MatMul", "Gemm", "Conv"}
        if bad:
            raise OptionError(
                "pass 'lowrank': ops must be among MatMul, Gemm, Conv; got "
                f"{', '.join(sorted(bad))}"
            )
        if self.round < 0:
            raise OptionError(f"pass 'lowrank': round must be >= 0, got {self.round}")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        NameFixPass()(model)  # every node named: skip lists and the report refer to names
        targets = []
        for node in list(model.graph):
            if node.op_type not in self.ops or node.domain not in ("", "ai.onnx"):
                continue
            if self.only and node.name not in self.only:
                continue
            found = self._target(node)
            if isinstance(found, str):
                self.skip(node, found)
            else:
                targets.append(found)
        if not targets:
            return ir.passes.PassResult(model, modified=False)
        data = self.context.data
        aware = self.method == "activation" or (self.method == "auto" and self.has_real_data)
        moments = self._moments(model, targets, data) if aware else {}
        spectra = []
        for t in targets:
            m = moments.get(t.row_key)
            G = m.second_moment(centred=t.has_bias_slot) if m is not None else None
            spectra.append((t, m, G, spectrum(t.W, G, self.ridge)))
        if self.target_macs is not None:
            ranks = self._allocate(model, spectra, data)
        else:
            ranks = {id(t.node): self._rank(t, self._spectrum(t, svd)) for t, _, _, svd in spectra}
        plan = []
        for t, m, G, svd in spectra:
            r = ranks.get(id(t.node))
            n_in, n_out = t.W.shape
            if r is None:
                self.skip(t.node, "left dense by the MAC budget allocation (target-macs)")
            elif self.shrink_only and not shrinks(r, n_in, n_out):
                self.skip(
                    t.node,
                    f"rank {r} would not shrink it: r·(n_in + n_out) = {r * (n_in + n_out)} "
                    f">= n_in·n_out = {n_in * n_out}",
                )
            else:
                plan.append((t, m, G, svd, r))
        layers = [
            self._apply(model, t, t.W, r, svd, G, *((m.mean, m.mean) if m else (None, None)))
            for t, m, G, svd, r in plan
        ]
        self.details["method"] = "activation-aware" if aware else "svd"
        self.details["layers"] = layers
        return ir.passes.PassResult(model, modified=bool(layers))

    def _apply(self, model, t: Target, W: np.ndarray, r: int, svd, G, mu_s, mu_t) -> dict:
        """Factorises ``W`` at rank r and rewrites the layer."""
        f = factorize(W, r, svd, G, self.ridge)
        shift = (
            (mu_t @ t.W - mu_s @ (f.A @ f.B)) if (mu_s is not None and t.has_bias_slot) else None
        )
        kept = float(np.sum(f.s[:r] ** 2) / max(np.sum(f.s**2), 1e-30))
        form = rewrite(model, t, f, shift, self.fused)
        n_in, n_out = t.W.shape
        self.change(
            f"{t.node.name}: {n_in}×{n_out} -> rank {r} "
            f"({'activation-aware' if G is not None else 'SVD'}, "
            f"{form}, {100 * kept:.1f}% energy kept)",
            t.node.name,
        )
        return {
            "node": t.node.name,
            "op": t.node.op_type,
            "shape": [n_in, n_out],
            "rank": r,
            "energy_kept": round(kept, 6),
            "form": form,
            "macs_per_row": [n_in * n_out, r * (n_in + n_out)],
        }

    # -- matching ---------------------------------------------------------------------------------
    def _target(self, node: ir.Node) -> Target | str:
        if node.name in self.skip_:
            return "listed in skip"
        if marks.is_factor(node):
            return "already a low-rank factor"
        w = const_array(node.inputs[1]) if len(node.inputs) > 1 else None
        if w is None:
            return "weight is not constant"
        if not np.issubdtype(w.dtype, np.floating):
            return f"weight is {w.dtype}, not float"
        if weight_users_outside(node.inputs[1], node):
            return "weight is shared with another node"
        if node.op_type == "Conv":
            if w.ndim != 4 or w.shape[2:] != (1, 1):
                return "not a 1×1 2-D convolution (tucker handles K×K kernels)"
            if node.attributes.get_int("group", 1) != 1:
                return "grouped or depthwise convolution"
            if node.attributes.get_string("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
                return "auto_pad SAME_* is not factorised"
            if (
                len(node.inputs) > 2
                and node.inputs[2] is not None
                and const_array(node.inputs[2]) is None
            ):
                return "bias is not constant"
            W = w[:, :, 0, 0].T.astype(np.float64)
            kind = "conv"
        else:
            if w.ndim != 2:
                return f"weight has rank {w.ndim}: only matrices are factorised"
            W = w.astype(np.float64)
            kind = node.op_type.lower()
            if kind == "gemm":
                if node.attributes.get_int("transB", 0):
                    W = W.T
                W = W * node.attributes.get_float("alpha", 1.0)
        if min(W.shape) < self.min_size:
            return f"smaller than min-size {self.min_size} ({W.shape[0]}×{W.shape[1]})"
        return Target(node, kind, W, _bias_add(node, W.shape[1]) if kind == "matmul" else None)

    def _spectrum(self, t: Target, svd) -> np.ndarray:
        """The singular values ranks are read from: those factorised (whitened when
        activation-aware), or W's own (``spectrum=weights``: same ranks as plain SVD)."""
        if self.spectrum == "weights" and svd[3] is not None:
            return np.linalg.svd(t.W, compute_uv=False)
        return svd[1]

    def _rank(self, t: Target, s: np.ndarray) -> int:
        n_in, n_out = t.W.shape
        full = min(n_in, n_out)
        if self.speedup is not None:
            return min(speedup_rank(n_in, n_out, self.speedup, self.round), full)
        if self.rank is not None:
            return round_rank(self.rank * full, full, self.round)
        r = energy_rank(s, self.energy)
        if self.round > 1 and full >= 16:
            r = math.ceil(r / self.round) * self.round
        return min(max(r, 1), full)

    def _allocate(self, model: ir.Model, spectra, data) -> dict[int, int]:
        """Ranks for a whole-model MAC budget: greedy on (output energy lost) / (MACs saved)
        (:func:`onnxshrink.search.allocate`).

        Each layer's first step goes from dense to the rank with the best average ratio; later
        steps drop one rounding unit of rank. The step with the least relative output energy
        lost per MAC saved is taken until the model's MACs are down to ``target-macs``.
        """
        from onnxshrink.metrics import macs_by_node
        from onnxshrink.search import Curve, allocate

        macs = macs_by_node(model, data.input_shapes() if data is not None else None)
        total = sum(macs.values())
        need = total * (1.0 - self.target_macs)
        step = max(self.round, 1)
        curves, grids = [], {}
        for t, _, _, svd in spectra:
            n_in, n_out = t.W.shape
            if id(t.node) not in macs:
                self.skip(t.node, "MACs unknown (dynamic shape): left out of the budget allocation")
                continue
            rows = macs[id(t.node)] / (n_in * n_out)
            s = self._spectrum(t, svd)
            energy = np.cumsum(s**2) / max(float(np.sum(s**2)), 1e-30)
            top = max(
                (r for r in range(step, min(n_in, n_out) + 1, step) if shrinks(r, n_in, n_out)),
                default=None,
            )
            if top is None:
                continue
            grid = list(range(top, 0, -step))  # levels: smaller ranks save more, lose more
            saving = [rows * (n_in * n_out - r * (n_in + n_out)) for r in grid]
            curves.append(Curve(id(t.node), saving, [1.0 - float(energy[r - 1]) for r in grid]))
            grids[id(t.node)] = grid
        levels, saved = allocate(curves, need)
        chosen = {key: grids[key][i] for key, i in levels.items()}
        self.details["budget"] = {
            "target_macs": self.target_macs,
            "reached": round(1.0 - saved / max(total, 1), 4),
        }
        if saved < need:
            self.skip(
                "model",
                f"target-macs {self.target_macs} not reached: every candidate layer is at its "
                f"smallest rank, MACs at {1.0 - saved / max(total, 1):.3f} of the original",
            )
        return chosen

    def _moments(self, model: ir.Model, targets: list[Target], data) -> dict[tuple, InputMoments]:
        from onnxshrink.calibrate import Probe

        keys = {t.row_key: t.W.shape[0] for t in targets}
        moments = {k: InputMoments(n) for k, n in keys.items()}
        names = sorted({k[0] for k in keys})
        rng = np.random.default_rng(0)
        task = self.task("lowrank: input statistics", sum(1 for _ in data.batches(self.samples)))
        try:
            with self.scratch() as workdir, Probe(model, names, workdir) as probe:
                for batch in probe.run(data, self.samples):
                    for key, m in moments.items():
                        rows = _rows(key, batch[key[0]], m.sum.shape[0])
                        if rows.shape[0] > _ROWS_PER_BATCH:
                            rows = rows[
                                np.sort(rng.choice(rows.shape[0], _ROWS_PER_BATCH, replace=False))
                            ]
                        m.update(rows)
                    task(1)
        finally:
            task.done()
        return moments

    # -- rewrite ----------------------------------------------------------------------------------

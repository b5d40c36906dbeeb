"""Post-training distillation: re-fit the compressed model's layers to the original's outputs.

The original model (the input of the pipeline) is the teacher, the model being compressed the
student. Every weight layer of the student whose output has a namesake of the same shape in the
teacher -- the layers the lossy passes kept, re-shaped or fed with changed inputs, and the last
factor of a decomposed layer, which keeps its layer's output name -- is re-fitted by ridge least
squares so that, from the inputs the *student* produces, it reproduces the *teacher's* output:

    W, b = argmin ‖Y_teacher − [X_student, 1]·[W; bᵀ]‖² + λ‖W − W_now‖²

(:mod:`onnxshrink.analysis.refit`: normal equations accumulated batch by batch, λ chosen on
held-out calibration batches, a new solution kept only where it beats the present weights
there). Layers go from input to output in one sweep of the student (onnxshrink.sweep), so later
layers see the already corrected earlier ones and absorb what is left of their error.

Layers left alone, with the reason: Gemm with transA (not
re-fitted), quantized or otherwise non-constant weights (run distill before quantize), layers
whose output the teacher does not have or has in another shape -- except a pruned layer, which
``prune`` marks with the original channels it kept (node metadata ``onnxshrink.kept_channels``):
it is fitted to those channels of the original layer's output.
Options: ``blocks`` (node names; default all eligible), ``ridge``, ``samples``.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import ClassVar

import numpy as np
import onnx_ir as ir

from onnxshrink import marks
from onnxshrink.analysis.refit import refit_supported
from onnxshrink.errors import OptionError
from onnxshrink.irtools import const_array
from onnxshrink.passes import options
from onnxshrink.passes.base import ShrinkPass

__all__ = ["DistillPass"]

logger = logging.getLogger(__name__)

_WEIGHT_OPS = ("Conv", "Gemm", "MatMul")


def _cosine(ref: list[np.ndarray], out: list[np.ndarray]) -> float:
    r = np.concatenate([a.reshape(len(a), -1) for a in ref]).astype(np.float64)
    o = np.concatenate([a.reshape(len(a), -1) for a in out]).astype(np.float64)
    den = np.linalg.norm(r, axis=1) * np.linalg.norm(o, axis=1)
    return float(np.mean(np.sum(r * o, 1) / np.maximum(den, 1e-30)))


@dataclasses.dataclass
class DistillPass(ShrinkPass):
    """Post-training distillation: layer outputs re-fitted to the original model's, input to
    output."""

    name: ClassVar[str] = "distill"
    lossy: ClassVar[bool] = True
    needs_data: ClassVar[bool] = True
    compare_to: ClassVar[str] = "improve"  # validated: the cosine with the original must not fall

    blocks: tuple[str, ...] = ()
    ridge: float = options.ridge(1e-3)
    samples: int = options.samples(128, least=2)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        teacher, data = self.context.original, self.context.data
        if teacher is None or data is None:
            raise OptionError("pass 'distill' needs the original model and calibration data")
        if not self.has_real_data:
            self.skip("model", "random data: distilling on noise would fit the noise; give --data")
            return ir.passes.PassResult(model, modified=False)
        with self.scratch() as workdir:
            self.removed: dict[ir.Value, np.ndarray] = {}  # teacher channels a pruned layer lacks
            nodes = self._eligible(model, teacher, data, workdir)
            if not nodes:
                return ir.passes.PassResult(model, modified=False)
            before = self._fidelity(model, teacher, data, workdir)
            results = self.refit_nodes(model, teacher, nodes, data, workdir, self.removed)
            changed = [r for r in results if r["applied"]]
            for r in changed:
                self.change(
                    f"{r['node']}: held-out error {r['heldout_error_before']:.4g} -> "
                    f"{r['heldout_error_after']:.4g}"
                )
            for r in results:
                if not r["applied"]:
                    self.skip(r["node"], "re-fit did not lower the held-out error: kept as it was")
            self.details["layers"] = results
            # pruned layers matched to the original's channels they kept (prune's marks)
            self.details["kept_channels"] = sorted(v.producer().name for v in self.removed)
            if changed:
                self.details["calibration_cosine"] = {
                    "before": round(before, 6),
                    "after": round(self._fidelity(model, teacher, data, workdir), 6),
                }
            return ir.passes.PassResult(model, modified=bool(changed))

    def _eligible(self, model: ir.Model, teacher: ir.Model, data, workdir: Path) -> list[ir.Node]:
        from onnxshrink.calibrate import Probe, all_values

        wanted = set(self.blocks)
        teacher_names = {v.name for v in all_values(teacher.graph)}
        candidates = []
        for node in model.graph:
            if node.op_type not in _WEIGHT_OPS or node.domain not in ("", "ai.onnx"):
                continue
            if wanted and node.name not in wanted:
                continue
            if const_array(node.inputs[1]) is None:
                self.skip(
                    node, "weights are not constant (quantized?): run distill before quantize"
                )
            elif reason := refit_supported(node):
                self.skip(node, f"not re-fitted: {reason}")
            elif node.outputs[0].name not in teacher_names:
                self.skip(node, "the original model has no tensor of this name")
            else:
                candidates.append(node)
        if not candidates:
            return []
        names = [n.outputs[0].name for n in candidates]
        one = data.subset(slice(0, 1))
        with Probe(model, names, workdir) as sp, Probe(teacher, names, workdir) as tp:
            s, t = next(sp.run(one, 1)), next(tp.run(one, 1))
        out = []
        for n in candidates:
            name = n.outputs[0].name
            ss, ts = s[name].shape, t[name].shape
            if ss == ts:
                out.append(n)
                continue
            idx = marks.kept_channels(n)
            if idx is not None and len(ss) > 1 and ss[:1] + ss[2:] == ts[:1] + ts[2:]:
                if len(idx) == ss[1] and idx.max() < ts[1]:
                    self.removed[n.outputs[0]] = np.setdiff1d(np.arange(ts[1]), idx)
                    out.append(n)  # fitted to the original layer's kept channels
                    continue
            self.skip(
                n,
                f"output shape {list(ss)} differs from the original's {list(ts)} and the "
                f"kept channels are not recorded",
            )
        return out

    def _fidelity(self, model: ir.Model, teacher: ir.Model, data, workdir: Path) -> float:
        """Cosine of the graph outputs with the teacher's on the calibration samples."""
        from onnxshrink.calibrate import run_model

        ref = run_model(teacher, data, self.samples, workdir)
        out = run_model(model, data, self.samples, workdir)
        return _cosine([v for b in ref for v in b.values()], [v for b in out for v in b.values()])

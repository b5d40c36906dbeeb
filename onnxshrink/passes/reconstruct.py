"""Block-wise reconstruction: fit each block of the compressed model to the original's output.

The original is the teacher, the compressed model the student, cut into blocks between tensors
both have in the same shape (:mod:`onnxshrink.reconstruct.blocks`: residual blocks, or layers
in a chain; ``span`` of them fitted together). From input to output, each block's float weights
and biases (in a quantized model also its activation ``scales``) are optimised by gradient
descent (BRECQ, Li et al. 2021; :mod:`onnxshrink.reconstruct.train`) so that, from the input x̂
the *student* computes (earlier blocks already fitted), it gives the *teacher's* output:

    θ = argmin mean ‖f̂_θ(x̂) − f(x)‖²   (Adam; early stopping on held-out samples)

Held-out samples (a ``heldout`` share, spread over the data) keep a block's new weights only
where they lower its error, then only the blocks up to the best held-out cosine. Left alone,
with the reason: ops the torch table lacks, no weights of their own. Needs PyTorch (extra
``onnxshrink[reconstruct]``); ``iterations`` per block and ``time-budget`` bound the work.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import ClassVar

import numpy as np
import onnx_ir as ir

from onnxshrink.errors import OptionError, one_line
from onnxshrink.passes import options
from onnxshrink.passes.base import ShrinkPass

__all__ = ["ReconstructPass", "torch_missing"]

logger = logging.getLogger(__name__)


def torch_missing() -> str | None:
    """Why reconstruction cannot run here (PyTorch absent), or None."""
    try:
        import torch  # noqa: F401
    except ImportError:
        return "PyTorch is not installed: pip install 'onnxshrink[reconstruct]'"
    return None


def _shapes(model: ir.Model, names: list[str], data, workdir) -> dict[str, tuple]:
    """Shapes (batch axis dropped) of the tensors ``names`` on one sample."""
    from onnxshrink.calibrate import Probe

    if not names:
        return {}
    with Probe(model, names, workdir) as probe:
        got = next(probe.run(data.subset(slice(0, 1)), 1))
    return {k: tuple(v.shape[1:]) for k, v in got.items()}


@dataclasses.dataclass
class ReconstructPass(ShrinkPass):
    """Block-wise reconstruction: each block's weights fitted by gradient descent so that the
    compressed model reproduces the original's block outputs (needs PyTorch)."""

    name: ClassVar[str] = "reconstruct"
    lossy: ClassVar[bool] = True
    needs_data: ClassVar[bool] = True
    compare_to: ClassVar[str] = "improve"  # validated: the cosine with the original must not fall

    iterations: int = options.count(300)  # per block
    time_budget: float | None = options.positive(None)  # seconds, the whole pass
    lr: float = options.positive(1e-3)  # a step, as a share of each tensor's RMS
    batch: int = options.count(16)
    samples: int = options.samples(1024, least=4)
    heldout: float = options.share(0.2, closed=False)
    span: int = options.count(3)  # blocks fitted together
    scales: bool = True  # quantized models: learn the activation scales inside blocks too

    def __post_init__(self) -> None:
        super().__post_init__()
        if reason := torch_missing():  # refused before any work, in one line
            raise OptionError(f"pass 'reconstruct': {reason}")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        from onnxshrink.reconstruct.scales import own_scales

        teacher, data = self.context.original, self.context.data
        if teacher is None or data is None:
            raise OptionError("pass 'reconstruct' needs the original model and calibration data")
        if not self.has_real_data:
            self.skip("model", "random data: reconstructing on noise would fit the noise")
            return ir.passes.PassResult(model, modified=False)
        if min(data.n_samples, self.samples) < 4:
            self.skip("model", "fewer than 4 calibration samples: nothing to hold out")
            return ir.passes.PassResult(model, modified=False)
        if self.scales and (made := own_scales(model)):
            self.details["scales_unshared"] = made
        data, held = self._held_out_last(data)
        with self.scratch() as workdir:
            blocks = self._blocks(model, teacher, data, workdir)
            if not blocks:
                return ir.passes.PassResult(model, modified=False)
            results = self._fit_all(model, teacher, blocks, data, held, workdir)
        self.details["blocks"] = results
        return ir.passes.PassResult(model, modified=any(r["applied"] for r in results))

    def _held_out_last(self, data):
        """(the first ``samples`` of the data, the held-out ``heldout`` share of them last; how
        many), spread over them all (:meth:`Dataset.spread`). Not the tail: ``compress``
        validates the pass on the tail it held out already (inputs unlike those fitted); these
        only stop a fit before it learns its samples by heart and choose the blocks kept."""
        return data.subset(slice(0, min(self.samples, data.n_samples))).spread(self.heldout)

    def _blocks(self, model, teacher, data, workdir):
        """The blocks to fit, each with its torch module; the others skipped with the reason."""
        from onnxshrink.calibrate import all_values
        from onnxshrink.reconstruct.blocks import find_blocks, is_scale, live_cuts, merge
        from onnxshrink.reconstruct.torch_ops import Unsupported
        from onnxshrink.reconstruct.train import TorchBlock

        known = {v.name for v in all_values(teacher.graph)}
        names = [v.name for _, v in live_cuts(model) if v.name in known]
        shapes = _shapes(model, names, data, workdir)
        found = find_blocks(model, shapes, _shapes(teacher, names, data, workdir))
        found = merge(found, self.span)
        self.details["partition"] = [b.name for b in found]
        if not found:
            self.skip("model", "no blocks: no two points where one tensor, shared with the "
                      "original in its shape, alone carries the computation")  # fmt: skip
        out = []
        for block in found:
            if not self.scales:
                block.params = [v for v in block.params if not is_scale(v)]
            if not block.params:
                self.skip(block.name, "no weights of its own to fit (float, or quantized codes)")
                continue
            try:
                out.append((block, TorchBlock(block)))
            except Unsupported as e:
                self.skip(block.name, f"not reconstructed: {e}")
        return out

    def _fit_all(self, model, teacher, blocks, data, held, workdir) -> list[dict]:
        from onnxshrink.reconstruct.torch_ops import Unsupported
        from onnxshrink.reconstruct.train import fit_block
        from onnxshrink.search import Fidelity
        from onnxshrink.sweep import Sweep

        held_out = data.subset(slice(data.n_samples - held, data.n_samples))
        judge = Fidelity(teacher, held_out, held_out.n_samples, workdir)
        trail = [(judge(model), None, None)]  # (held-out cosine, block's row, state before it)

        student = Sweep(model, [b.input.name for b, _ in blocks], data, None)
        target = iter(Sweep(teacher, [b.output.name for b, _ in blocks], data, None))
        total = self.task(f"{self.name}: {len(blocks)} blocks", self.iterations * len(blocks))
        start, results = time.perf_counter(), []
        values = {v.name: v for b, _ in blocks for v in b.params}
        try:
            for k, ((block, module), (_, x)) in enumerate(zip(blocks, student)):
                _, y = next(target)
                x, y = np.concatenate(x), block.as_student(np.concatenate(y))
                y = module.seen(y)  # the original's output as the compressed model sees it
                budget = None
                if self.time_budget is not None:
                    left = self.time_budget - (time.perf_counter() - start)
                    budget = max(left, 0.0) / (len(blocks) - k)
                one = self.task(
                    f"  block {k + 1}/{len(blocks)} -> {block.output.name}", self.iterations
                )

                def advance(n: int = 1, one=one) -> None:
                    one(n)
                    total(n)

                try:
                    fit = fit_block(
                        module, x, y, held, iterations=self.iterations, lr=self.lr,
                        batch=self.batch, seconds=budget, progress=advance,
                    )  # fmt: skip
                except Exception as e:  # one block never fails the pass
                    why = e if isinstance(e, Unsupported) else f"{type(e).__name__}: {one_line(e)}"
                    logger.debug("block %s not reconstructed", block.name, exc_info=True)
                    self.skip(block.name, f"not reconstructed: {why}")
                    total(self.iterations)
                    continue
                finally:
                    one.done()
                total(self.iterations - fit.steps)
                state = {v: v.const_value for v in model.graph.initializers.values()}
                results.append(row := self._apply(block, fit, values))
                if row["applied"]:
                    row["heldout_cosine"] = round(now := judge(model), 6)
                    trail.append((now, (block, row, self.changed[-1]), state))
        finally:
            total.done()
        self._best_prefix(trail)
        return results

    def _best_prefix(self, trail: list) -> None:
        """Keeps the fitted blocks up to the one after which the whole model's output on the
        held-out samples was closest to the original's (cosine), and undoes the rest: a
        lower block error can still hurt downstream (a range clipped where a later layer
        weighs it most), and a later block may win back what an earlier one lost, so the
        cut is taken at the end, not block by block."""
        cosines = [c for c, _, _ in trail]
        best = int(np.argmax(cosines))  # the first of equals: the fewest changes
        if best == len(trail) - 1:
            return
        for value, tensor in trail[best + 1][2].items():
            value.const_value = tensor
        undone = [said for _, (_, _, said), _ in trail[best + 1 :]]
        self.changed = [c for c in self.changed if c not in undone]
        for _, (block, row, _), _ in trail[best + 1 :]:
            row["applied"] = False
            self.skip(block.name, f"undone: the output's held-out cosine was highest "
                      f"({cosines[best]:.5f}) before this block, {row['heldout_cosine']:.5f} "
                      "after")  # fmt: skip

    def _apply(self, block, fit, values: dict[str, ir.Value]) -> dict:
        from onnxshrink.reconstruct.blocks import is_scale
        from onnxshrink.reconstruct.scales import rescale_biases

        applied = fit.after < fit.before
        if applied:
            for name, arr in fit.weights.items():
                values[name].const_value = ir.tensor(arr, name=name)  # its dtype kept
            rescale_biases([v for v in block.params if is_scale(v)])
            self.change(
                f"{block.name}: held-out error {fit.before:.4g} -> {fit.after:.4g} "
                f"({fit.steps} steps, {fit.seconds:.1f} s)"
            )
        elif fit.stopped == "exact":
            self.skip(block.name, "matches the original already: nothing to fit")
        else:
            self.skip(block.name, "reconstruction did not lower the held-out error: kept")
        return {
            "block": block.name,
            "nodes": len(block.nodes),
            "params": len(block.params),
            "heldout_error_before": fit.before,
            "heldout_error_after": fit.after,
            "steps": fit.steps,
            "stopped": fit.stopped,
            "seconds": round(fit.seconds, 2),
            "applied": applied,
        }

"""The cosine of a candidate model's outputs with a reference model's, on the first n samples.

The reference runs once, unoptimized (``ORT_DISABLE_ALL``: the model as written); a candidate
runs unoptimized too, or optimized (``optimize=True``) where what matters is the integer kernels
a deployed int8 model runs. Cosine = mean over samples of ⟨r, o⟩ / (‖r‖ ‖o‖)
(:func:`onnxshrink.validate.compare`).
"""

from __future__ import annotations

from pathlib import Path

import onnx_ir as ir

from onnxshrink.calibrate import run_model
from onnxshrink.validate import compare

__all__ = ["Fidelity"]


class Fidelity:
    """``Fidelity(reference, data, n, workdir)(candidate)`` -> cosine with the reference."""

    def __init__(self, reference: ir.Model, data, n: int, workdir: Path, *, optimize: bool = False):
        self.data, self.n, self.workdir, self.optimize = data, n, workdir, optimize
        self.reference = run_model(reference, data, n, workdir, optimize=False)

    def __call__(self, candidate: ir.Model) -> float:
        outputs = run_model(candidate, self.data, self.n, self.workdir, optimize=self.optimize)
        return compare(self.reference, outputs).cosine

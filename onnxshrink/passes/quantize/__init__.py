"""int8 quantization as small passes and steps: ``quantize``, ``insert-qdq``, ``fold-qdq``.

:mod:`~onnxshrink.passes.quantize.passes` declares the sequence; each step's module states its
rule: ``plan``, ``calibrate`` (balance, ranges in cascade), ``weights`` (int8 grid, pair rule,
Hessian-aware rounding), ``mixed`` (min-fidelity), ``bias``, ``insert``, ``fold``.
"""

from onnxshrink.passes.quantize.fold import FoldQDQPass
from onnxshrink.passes.quantize.passes import STEPS, InsertQDQPass, QuantizePass

__all__ = ["STEPS", "FoldQDQPass", "InsertQDQPass", "QuantizePass"]

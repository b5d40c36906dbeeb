"""Measuring candidates: how faithful a variant of a model is, and which layers to spare.

Passes that search (``quantize`` and ``cluster`` with ``min-fidelity``) measure their trial copies
here, never through :mod:`onnxshrink.runtime` or :mod:`onnxshrink.validate` themselves.
"""

from onnxshrink.search.fidelity import Fidelity
from onnxshrink.search.greedy import spare_until

__all__ = ["Fidelity", "spare_until"]

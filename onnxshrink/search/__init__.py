"""Searching for what to compress: how faithful a variant of a model is, which layers to spare
for a fidelity floor, and how to spend a saving budget across layers.

Passes that search (``quantize`` and ``cluster`` with ``min-fidelity``) measure their trial copies
here, never through :mod:`onnxshrink.runtime` or :mod:`onnxshrink.validate` themselves; a pass
below its floor spares the fewest worst layers (:func:`fewest`, :mod:`onnxshrink.degrade`); budgets
(``--target``, ``prune`` global / ``target-macs``, ``lowrank`` ``target-macs``) are spent by
:func:`allocate`.
"""

from onnxshrink.search.allocate import Curve, allocate
from onnxshrink.search.fidelity import Fidelity
from onnxshrink.search.greedy import fewest, spare_until

__all__ = ["Curve", "Fidelity", "allocate", "fewest", "spare_until"]

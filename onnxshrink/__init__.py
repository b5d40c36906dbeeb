"""onnxshrink: a graph-rewriting compiler over ONNX that makes trained networks smaller and faster.

>>> import onnxshrink
>>> out_path, report = onnxshrink.compress("model.onnx", ["fold-batchnorm"], output="small.onnx")

Heavy imports (onnx, onnxruntime) happen on first use of :func:`compress`.
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["compress", "__version__"]


def compress(*args, **kwargs):
    """See :func:`onnxshrink.api.compress`."""
    from onnxshrink.api import compress as _compress

    return _compress(*args, **kwargs)

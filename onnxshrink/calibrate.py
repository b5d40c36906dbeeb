"""Activation capture: run a model with chosen intermediate tensors exposed as outputs.

The model is copied (its graph outputs become the requested tensors, and nodes they do not need
are dropped), written to the pass's scratch folder and run by onnxruntime batch by batch, with
graph optimizations on for speed (a requested tensor is a graph output, so onnxruntime keeps
it). Callers reduce each batch to statistics right away -- per-channel
moments, XᵀX and XᵀY sums -- so memory does not grow with the number of samples.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from onnxshrink import io, runtime
from onnxshrink.data import Dataset
from onnxshrink.irtools import infer_types
from onnxshrink.timing import phase

__all__ = ["ChannelMoments", "Probe", "all_values", "batch_samples", "run_model"]

logger = logging.getLogger(__name__)

_counter = itertools.count()


class Probe:
    """``model`` cut down to compute just the tensors ``names``; ``run`` yields one dict per batch.

    The copy's graph outputs are exactly ``names`` and every node they do not need is dropped,
    so probing an early layer runs only the graph up to it.
    """

    def __init__(
        self, model: ir.Model, names: Sequence[str], workdir: Path, *, optimize: bool = True
    ) -> None:
        self.names = list(dict.fromkeys(names))
        with phase("probes: copy the model"):
            clone = model.clone()
        values = {v.name: v for v in all_values(clone.graph)}
        missing = [n for n in self.names if n not in values]
        if missing:
            raise KeyError(f"no tensor named {missing[0]!r} in the model")
        if any(values[n].type is None for n in self.names):
            infer_types(clone)  # a graph output needs its type; guessing float broke int64 ones
        clone.graph.outputs.clear()
        for n in self.names:
            v = values[n]
            if v.type is None:
                v.type = ir.TensorType(ir.DataType.FLOAT)
            clone.graph.outputs.append(v)
        RemoveUnusedNodesPass()(clone)
        self.path = workdir / f"probe{next(_counter)}.onnx"
        io.write(clone, self.path)
        self.session = runtime.session(self.path, optimize=optimize)

    def run(
        self, data: Dataset, limit: int | None = None, names: Sequence[str] | None = None
    ) -> Iterator[dict[str, np.ndarray]]:
        fetch = list(names) if names is not None else self.names
        for feed in data.batches(limit):
            with phase("onnxruntime: run"):
                values = self.session.run(fetch, feed)
            yield dict(zip(fetch, values))

    def close(self) -> None:
        del self.session
        for f in self.path.parent.glob(self.path.name + "*"):
            f.unlink(missing_ok=True)

    def __enter__(self) -> Probe:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def batch_samples(batch: dict[str, np.ndarray]) -> int:
    """How many samples one batch of :meth:`Probe.run` holds (progress counts samples)."""
    arr = next(iter(batch.values()))
    return arr.shape[0] if arr.ndim else 1


def run_model(
    model: ir.Model, data: Dataset, limit: int | None, workdir: Path, *, optimize: bool = True
):
    """The model's outputs on the first ``limit`` samples (written to ``workdir``, then removed)."""
    path = workdir / f"run{next(_counter)}.onnx"
    io.write(model, path)
    try:
        return runtime.run(runtime.session(path, optimize=optimize), data, limit=limit)
    finally:
        for f in workdir.glob(path.name + "*"):
            f.unlink(missing_ok=True)


def all_values(graph: ir.Graph) -> Iterator[ir.Value]:
    """Every value of the graph: inputs, initializers, node outputs."""
    yield from graph.inputs
    yield from graph.initializers.values()
    for node in graph:
        yield from node.outputs


class ChannelMoments:
    """Running per-channel mean x, mean |x| (unless ``absolute=False``) and mean x² of a tensor
    along ``axis``.

    Each batch is reduced per channel in float32 by BLAS (x viewed as [pre, C, post] times a
    vector of ones; squares by a batched dot), and the per-batch sums are added in float64.
    """

    def __init__(self, axis: int, absolute: bool = True) -> None:
        self.axis, self.absolute = axis, absolute
        self.sum: np.ndarray | None = None
        self.abs_sum: np.ndarray | None = None
        self.sq_sum: np.ndarray | None = None
        self.count = 0

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x)
        axis = self.axis % x.ndim
        c = x.shape[axis]
        x3 = x.reshape(int(np.prod(x.shape[:axis])), c, -1)
        if x3.dtype != np.float32:
            x3 = x3.astype(np.float64)
        ones = np.ones(x3.shape[2], x3.dtype)
        m = (x3 @ ones).sum(0, dtype=np.float64)
        s = np.einsum("pcq,pcq->pc", x3, x3).sum(0, dtype=np.float64)
        a = (np.abs(x3) @ ones).sum(0, dtype=np.float64) if self.absolute else None
        if self.sum is None:
            self.sum, self.abs_sum, self.sq_sum = m, a, s
        else:
            self.sum += m
            self.sq_sum += s
            if a is not None:
                self.abs_sum += a
        self.count += x.size // max(c, 1)

    @property
    def mean(self) -> np.ndarray:
        return self.sum / max(self.count, 1)

    @property
    def mean_abs(self) -> np.ndarray:
        return self.abs_sum / max(self.count, 1)

    @property
    def mean_sq(self) -> np.ndarray:
        return self.sq_sum / max(self.count, 1)

"""Sweeps: a model run one segment at a time over the calibration samples, stopping at chosen
tensors so the caller can measure them -- and change them, or the weights downstream -- before
the rest of the model runs.

A quantity that needs everything upstream decided first (a range measured where the upstream
ranges already clip, a bias measured where the upstream biases are already corrected) costs one
pass over the model this way, instead of one run of the model's prefix per tensor (L tensors:
~L²/2 layer runs) or one whole run per depth. The main graph's nodes go in graph order and are
cut after each stop's producer; a segment is built from the model *as it is when the sweep
reaches it* (a change to a later node's weights takes effect) and fed the live tensors of every
batch, which stay in memory: the memory is the samples times the widest set of live tensors.
Nodes after the last stop are not run. A tensor only looked at (``watch``) is taken out of the
segment that computes it, without a cut: changing it changes nothing downstream.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence

import numpy as np
import onnx
import onnx_ir as ir

from onnxshrink import runtime
from onnxshrink.timing import phase

__all__ = ["Sweep"]

logger = logging.getLogger(__name__)


def _release():
    """Run options that give the shared arena's free memory back after the run: the sweep's
    last, so what it held is not kept for the rest of the process."""
    import onnxruntime as ort

    opts = ort.RunOptions()
    opts.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    return opts


def _captured(node: ir.Node) -> list[ir.Value]:
    """Values a node's subgraphs (If/Loop/Scan bodies) read from outside themselves."""
    out: list[ir.Value] = []
    for attr in node.attributes.values():
        graphs = (
            [attr.value]
            if attr.type == ir.AttributeType.GRAPH
            else list(attr.value)
            if attr.type == ir.AttributeType.GRAPHS
            else []
        )
        for g in graphs:
            inner = {id(v) for v in g.inputs} | {id(v) for v in g.initializers.values()}
            for n in ir.traversal.RecursiveGraphIterator(g):
                inner.update(id(v) for v in n.outputs)
            for n in ir.traversal.RecursiveGraphIterator(g):
                out.extend(v for v in n.inputs if v is not None and id(v) not in inner)
    return out


def _reads(node: ir.Node) -> list[ir.Value]:
    return [v for v in node.inputs if v is not None] + _captured(node)


class Sweep:
    """Iterating yields ``(name, arrays)`` for each stop in graph order: ``arrays`` holds the
    tensor for every batch of the first ``samples`` samples; replace or change its items and
    the nodes after the stop read the new values.

    >>> for name, arrays in Sweep(model, ["conv1_out"], data, 64):
    ...     arrays[:] = [np.clip(a, 0, 6) for a in arrays]

    Tensors in ``watch`` are yielded too, in the same order, but do not end a segment: the
    nodes after them have run with their values as computed.
    """

    def __init__(
        self,
        model: ir.Model,
        stops: Sequence[str],
        data,
        samples: int | None,
        *,
        watch: Sequence[str] = (),
        optimize: bool = True,
        progress=None,
        timeout: float | None = None,
    ) -> None:
        self.model, self.data, self.samples = model, data, samples
        self.optimize, self.progress = optimize, progress
        self.timeout = timeout  # seconds a batch may take through all segments
        self.nodes = list(model.graph)
        where = {}
        for i, node in enumerate(self.nodes):
            for v in node.outputs:
                where[v.name] = i
        for v in model.graph.inputs:
            where[v.name] = -1
        missing = [s for s in [*stops, *watch] if s not in where]
        if missing:
            raise KeyError(f"no computed tensor named {missing[0]!r} in the model")
        watch = set(watch) - set(stops)
        self.stops = sorted(dict.fromkeys([*stops, *watch]), key=lambda s: where[s])
        self._at = where
        # after which node index each value is last read (graph outputs are not kept)
        self._last: dict[str, int] = {}
        for i, node in enumerate(self.nodes):
            for v in _reads(node):
                self._last[v.name] = i
        ends = sorted({where[s] for s in stops if where[s] >= 0})
        last_watched = max((where[s] for s in watch), default=-1)
        if last_watched > max(ends, default=-1):
            ends.append(last_watched)  # the last watched tensor is computed too
        self.segments = list(zip([-1, *ends[:-1]], ends))  # (after node a, through node b]

    def __len__(self) -> int:
        return len(self.segments)

    def __iter__(self) -> Iterator[tuple[str, list[np.ndarray]]]:
        feeds = list(self.data.batches(self.samples))
        self._batches = len(feeds)
        self._spent = [0.0] * len(feeds)  # seconds each batch has run so far
        n = self.data.n_samples
        self._samples = n if self.samples is None else min(self.samples, n)
        fed = [v.name for v in self.model.graph.inputs if feeds and v.name in feeds[0]]
        # copies: a caller changing a graph input's values must not change the dataset's
        live: dict[str, list[np.ndarray]] = {n: [np.array(f[n]) for f in feeds] for n in fed}
        del feeds
        pending = list(self.stops)
        while pending and self._at[pending[0]] < 0:
            name = pending.pop(0)
            yield name, live[name]
        for a, b in self.segments:
            self._run(a, b, live, set(pending))
            while pending and self._at[pending[0]] <= b:
                name = pending.pop(0)
                yield name, live[name]
            for name in [n for n in live if self._last.get(n, -1) <= b and n not in pending]:
                del live[name]
            if self.progress is not None:  # one sweep advances it by the samples it covers
                self.progress(self._samples / len(self.segments))

    def _run(self, a: int, b: int, live: dict[str, list[np.ndarray]], stops: set[str]) -> None:
        """Runs nodes a+1..b on every batch of ``live``; their outputs read later join it."""
        nodes = self.nodes[a + 1 : b + 1]
        made = {v.name for n in nodes for v in n.outputs}
        reads = {v.name: v for n in nodes for v in _reads(n) if v.name not in made}
        inputs = [n for n in reads if n in live]
        consts = [v for n, v in reads.items() if n not in live]
        outputs = [
            v.name
            for n in nodes
            for v in n.outputs
            if v.name and (self._last.get(v.name, -1) > b or v.name in stops)
        ]
        if not outputs:
            return
        with phase("sweep: build a segment"):
            session = self._session(nodes, inputs, consts, outputs, live)
        last = (a, b) == self.segments[-1]
        with phase("onnxruntime: run"):
            for i in range(self._batches):
                end = last and i == self._batches - 1
                feed, options = {n: live[n][i] for n in inputs}, _release() if end else None
                if self.timeout is None:
                    got = session.run(outputs, feed, options)
                else:
                    t0 = time.perf_counter()
                    left = self.timeout - self._spent[i]
                    got = runtime.bounded(session, outputs, feed, left, options, self.timeout)
                    self._spent[i] += time.perf_counter() - t0
                for name, arr in zip(outputs, got):
                    live.setdefault(name, []).append(arr)

    def _session(self, nodes, inputs, consts, outputs, live):
        tensors, folders = [], set()
        for v in consts:
            if v.const_value is None:
                raise ValueError(f"segment reads {v.name!r}, neither computed nor constant")
            t = ir.serde.serialize_tensor(v.const_value)  # external data stays a reference
            t.name = v.name
            tensors.append(t)
            if isinstance(v.const_value, ir.ExternalTensor):
                folders.add(v.const_value.base_dir)
        if len(folders) > 1:
            raise ValueError(f"segment reads external data from {len(folders)} folders")
        graph = onnx.helper.make_graph(
            [ir.serde.serialize_node(n) for n in nodes],
            "segment",
            [
                onnx.helper.make_tensor_value_info(
                    n, onnx.helper.np_dtype_to_tensor_dtype(np.asarray(live[n][0]).dtype), None
                )
                for n in inputs
            ],
            [onnx.ValueInfoProto(name=n) for n in outputs],  # onnxruntime infers their types
            tensors,
        )
        proto = onnx.helper.make_model(
            graph,
            opset_imports=[
                onnx.helper.make_opsetid(d, v) for d, v in self.model.opset_imports.items()
            ],
            ir_version=self.model.ir_version,
        )
        proto.functions.extend(
            ir.serde.serialize_function(f) for f in self.model.functions.values()
        )
        # many small sessions, one after the other: idle workers must not spin (measured: a
        # MobileNetV2 sweep of 100 segments 2.6 -> 1.9 s), and one arena serves them all
        return runtime.session(
            proto.SerializeToString(),
            optimize=self.optimize,
            spin=False,
            shared_arena=True,
            weights_folder=str(folders.pop()) if folders else None,
        )


def run_in_segments(
    model: ir.Model,
    data,
    limit: int | None,
    budget: int = 1 << 28,
    progress=None,
    timeout: float | None = None,
) -> list:
    """The model's outputs per batch (as :func:`onnxshrink.runtime.run` gives them), from a
    sweep cut wherever the weights read since the last cut pass ``budget`` bytes: each
    session holds a segment's weights, never the whole model's (a model larger than memory).
    ``timeout``: seconds a batch may take through all segments (:class:`RunTimeout`)."""
    cuts, held = [], 0
    for node in model.graph:
        held += sum(
            v.const_value.nbytes for v in node.inputs if v is not None and v.is_initializer()
        )
        if held > budget and node.outputs and node.outputs[0].name:
            cuts.append(node.outputs[0].name)
            held = 0
    names = [v.name for v in model.graph.outputs]
    sweep = Sweep(
        model, [*cuts, *names], data, limit, optimize=False, progress=progress, timeout=timeout
    )
    got = {name: arrays for name, arrays in sweep if name in names}
    return [{n: got[n][i] for n in names} for i in range(len(got[names[0]]))]

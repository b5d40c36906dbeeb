"""Degrade, don't collapse: a lossy pass below its floor is re-run sparing its worst layers.

The layers are those the pass compressed, named as its ``skip`` option names them (a prune group
by its first producer). A layer's damage is measured at the model's outputs: for a set S of
tensors both models have (same name and shape), D(S) = the drop (1 − fidelity) of the model
before the pass run with S taken from the model after it, on a few validation samples; then
d(u) = max(0, D(down) − D(up)), down and up the nearest such tensors after and before u -- what
u adds, weighed by how much the rest of the model amplifies it. With the full pass's drop D and
the floor's F = 1 − floor, the first try spares the fewest worst layers whose share of Σd
reaches (D − F/2)/D; then the number spared is bisected (:func:`onnxshrink.search.fewest`)
within ``TRIES`` re-runs, each validated like the pass. Early refusal: ``MISSES`` re-runs in a
row sparing the k worst-ranked layers whose drop is no lower than the full pass's -- nor, when
the floor judges a task metric that moves in steps, their cosine higher -- show the ranking is no
guide (the damage is spread, or arises between layers), so the search stops there
(:class:`NoHelp`). One such re-run alone is no proof: an int8 network is chaotic.
A model too large for one session (``segments``) gets each layer's own damage instead, from two
sweeps in lockstep: d(u) = 1 − cosine at u's down tensors of the pass's nodes fed the values of
the model before it -- what u adds, not amplified. The best try waits on disk (its outputs
and new weights); the whole pass's weights are dropped once its damage is measured.
"""

from __future__ import annotations

import dataclasses
import logging
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxshrink import io, runtime
from onnxshrink.calibrate import Probe, run_model
from onnxshrink.errors import one_line
from onnxshrink.irtools import infer_types
from onnxshrink.passes.base import ShrinkPass
from onnxshrink.pipeline import cleanup
from onnxshrink.report import PassRecord, Skip
from onnxshrink.search import fewest
from onnxshrink.sweep import Sweep
from onnxshrink.timing import phase
from onnxshrink.validate import BelowFloor, compare

__all__ = ["TRIES", "NoHelp", "Partial", "damage", "partial", "spareable"]

logger = logging.getLogger(__name__)

TRIES = 5  # re-runs of the pass (each validated) a partial application may take
SAMPLES = 8  # validation samples the layer damage is measured on
MISSES = 2  # tries in a row no better than the whole pass that stop the search


class NoHelp(Exception):
    """Sparing the layers ranked most damaging did not lower the drop: the search stopped."""


@dataclasses.dataclass
class Partial:
    """The pass re-run with ``kept`` layers spared, and what its validation returned."""

    pass_: ShrinkPass
    model: ir.Model
    checked: Any
    kept: list[str]
    layers: int  # layers the full pass compressed
    tries: int
    damage: dict[str, float]
    full: float  # 1 − fidelity of the full pass

    def record(self, rec: PassRecord, failure: str) -> None:
        """Fills the pass's record: what this run changed, and the layers kept back and why
        (``failure``: how the whole pass broke the floor)."""
        q, kept = self.pass_, set(self.kept)
        rec.changed, rec.details = list(q.changed), dict(q.details)
        failure = failure.removeprefix("fidelity below the floor: ")
        why = f"kept back: the whole pass broke the floor ({failure})"
        rec.skipped = [s for s in q.skipped if s.node not in kept]
        rec.skipped += [Skip(u, why) for u in self.kept]
        rec.partial = {
            "applied": self.layers - len(self.kept),
            "layers": self.layers,
            "kept": self.kept,
            "whole": failure,
            "whole_fidelity": round(1.0 - self.full, 6),
            "tries": self.tries,
            "damage": {u: round(self.damage[u], 6) for u in self.kept},
        }


def spareable(p: ShrinkPass) -> list[str]:
    """The layers ``p`` compressed that a re-run could spare: none with fewer than two, or with
    no ``skip`` option to spare them by."""
    layers = list(dict.fromkeys(p.layers))
    return layers if len(layers) >= 2 and hasattr(p, "skip_") else []


def partial(
    p: ShrinkPass,
    before: ir.Model,
    after: ir.Model,
    drop: tuple[float, float],
    cosine: float,
    validate: Callable[[ShrinkPass, ir.Model, int], Any],
    drop_of: Callable[[list, list], float],
    data,
    workdir: Path,
    progress=None,
    *,
    segments: bool = False,
) -> Partial | None:
    """``p`` re-run on ``before`` sparing its most damaging layers until ``validate`` (which
    raises for a failing model) passes; None when no try within ``TRIES`` did; raises
    :class:`NoHelp` when ``MISSES`` tries in a row show the ranking is no guide. ``drop`` is the
    full pass's (1 − fidelity, 1 − floor), ``cosine`` its outputs' cosine (a try no better
    on either is a miss); ``drop_of(reference, outputs)`` measures one; ``segments``: the model
    is too large for one session (each layer's own damage, see the module docstring).
    ``after``, the whole pass's result, is consumed: its weights are dropped once measured."""
    layers = spareable(p)
    if not layers:
        return None
    try:
        n = min(SAMPLES, data.n_samples)
        d = damage(before, after, layers, data, n, workdir, drop_of, progress, segments=segments)
    except Exception as e:  # a model the probes cannot run: spare in the pass's own order
        logger.debug("layer damage not measured: %s", one_line(e))
        d = {u: 1.0 for u in layers}
    _drop_weights(after)  # discarded either way: the try found, or the model before, replaces it
    order = sorted(layers, key=lambda u: -d[u])
    share = np.cumsum([d[u] for u in order]) / max(sum(d.values()), 1e-30)
    full, allowed = drop
    need = (full - allowed / 2) / full if full > 0 else 1.0
    first = int(np.searchsorted(share, min(need, 1.0) - 1e-9)) + 1
    best: list[Partial] = []  # the holding try that spares the fewest layers, and what it
    stash = workdir / "partial-outputs.pickle"  # returned and wrote out, until the search ends
    weights = workdir / "partial-weights.bin"
    spilled: list = []
    calls: list[int] = []
    misses: list[int] = []  # the last tries in a row that were no better than the whole pass
    task = progress.task(f"{p.name}: sparing the worst layers", TRIES) if progress else None

    def holds(k: int) -> bool:
        calls.append(k)
        q = dataclasses.replace(p, skip_=tuple(p.skip_) + tuple(order[:k]))
        q.bind(p.context)
        model = before.clone()
        try:
            if not q(model).modified:
                return False
            cleanup(model)
            checked = validate(q, model, len(calls))
        except BelowFloor as e:
            logger.debug("%s sparing %d layer(s): %s", p.name, k, one_line(e))
            if e.drop[0] < full or e.cosine > cosine:  # progress: not a miss
                misses.clear()
                return False
            misses.append(k)
            if len(misses) >= MISSES:
                spared = " then ".join(map(str, misses))
                raise NoHelp(
                    f"sparing the {spared} layer(s) ranked most damaging left the drop at "
                    f"{e.drop[0]:.4g} (whole pass {full:.4g}): the damage is spread, not in a few "
                    "layers"
                ) from None
            return False
        except Exception as e:  # invalid, or the pass raised
            logger.debug("%s sparing %d layer(s): %s", p.name, k, one_line(e))
            return False
        finally:
            if task:
                task()
        if not best or k < len(best[0].kept):
            with stash.open("wb") as f:  # the next try must not hold two sets of outputs, nor
                pickle.dump(checked[0], f, protocol=pickle.HIGHEST_PROTOCOL)  # two of weights
            best.clear()  # the previous best's tensors may still map the file: a new one
            weights.unlink(missing_ok=True)
            spilled[:] = io.spill(model, weights)
            checked = (None, *checked[1:])
            best[:] = [Partial(q, model, checked, order[:k], len(layers), 0, d, full)]
        return True

    most, k = len(layers) - 1, None
    try:
        while k is None and len(calls) < TRIES:
            k = fewest(most, holds, min(max(first, 1), most), TRIES - len(calls))
            if k is not None or calls[-1] != most:
                break  # found, or out of tries
            # sparing all but the last layer failed: that one alone breaks the floor, so every
            # holding set spares it (sparing more never hurts): it goes first, and again
            order, first = [order[-1], *order[:-1]], 1
    finally:
        if task:
            task.done()
    if k is None or not best:
        return None
    found = best[0]
    with stash.open("rb") as f:
        found.checked = (pickle.load(f), *found.checked[1:])
    io.unspill(spilled)
    stash.unlink()
    weights.unlink()
    found.tries = len(calls)
    return found


def _drop_weights(model: ir.Model) -> None:
    """``model``'s initializers emptied (it is not used again), whatever the model's size:
    no try is validated while the whole pass's weights are still held beside it."""
    for graph in model.graphs():
        for value in graph.initializers.values():
            value.const_value = None


def damage(
    before: ir.Model,
    after: ir.Model,
    layers: list[str],
    data,
    n: int,
    workdir: Path,
    drop: Callable[[list, list], float],
    progress=None,
    *,
    segments: bool = False,
) -> dict[str, float]:
    """d(u) per layer name (see the module docstring); 0 for a layer not found."""
    shapes_before, shapes_after = _shapes(before), _shapes(after, untyped=True)
    common = [name for name in shapes_before if name in shapes_after]  # node outputs only: a
    seen = {n for n in common if shapes_before[n] == shapes_after[n] is not None}  # graph input
    lost = {n for n in common if None in (shapes_before[n], shapes_after[n])}  # is never spliced
    # a shape inference lost (a contrib op upstream): in segments checked when the tensor is
    # run, else both models are run once to compare them
    seen |= lost if segments or not lost else _alike(before, after, lost, data)
    nodes = {node.name: node for node in before.graph if node.name}
    around = {}
    for u in layers:
        if (node := nodes.get(u)) is not None:
            around[u] = (_nearest(node, seen, down=True), _nearest(node, seen, down=False))
    sets = {s for pair in around.values() for s in pair if s}
    if segments:
        own = _own_drops(before, after, set().union(*sets), data, n, progress)
        return {u: sum(own[t] for t in around[u][0]) if u in around else 0.0 for u in layers}
    drops = _spliced_drops(before, after, sets, data, n, workdir, drop, progress)
    return {
        u: max(0.0, drops.get(down, 0.0) - drops.get(up, 0.0))
        for u, (down, up) in ((u, around.get(u, (frozenset(), frozenset()))) for u in layers)
    }


def _shapes(model: ir.Model, *, untyped: bool = False) -> dict[str, tuple | None]:
    """Float node output name -> inferred shape of the main graph, a symbolic dim as None
    (inference names unknown dims afresh per model: ``unk__0`` here is ``unk__3`` there);
    ``untyped``: outputs whose type inference did not reach too (shape None)."""
    clone = model.clone()
    infer_types(clone)
    out = {}
    floats = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE)
    for node in clone.graph:
        for v in node.outputs:
            if v.name and (v.dtype in floats or (untyped and v.dtype is None)):
                out[v.name] = (
                    None
                    if v.shape is None
                    else tuple(d if isinstance(d, int) else None for d in v.shape)
                )
    return out


def _alike(before: ir.Model, after: ir.Model, names: set[str], data) -> set[str]:
    """Of ``names``, those both models compute as floats of one shape, run on one sample."""
    watch = sorted(names)
    got = [{n: a[0] for n, a in Sweep(m, [], data, 1, watch=watch)} for m in (before, after)]
    return {
        n
        for n in names
        if got[0][n].shape == got[1][n].shape
        and got[0][n].dtype == got[1][n].dtype
        and np.issubdtype(got[0][n].dtype, np.floating)
    }


def _nearest(node: ir.Node, seen: set[str], *, down: bool) -> frozenset[str]:
    """Names in ``seen`` first reached from ``node`` along consumers (``down``) or producers."""
    found: set[str] = set()
    stack, visited = [node], {id(node)}
    while stack:
        cur = stack.pop()
        values = cur.outputs if down else [v for v in cur.inputs if v is not None]
        for v in values:
            if v.name in seen:
                found.add(v.name)
                continue
            nxt = [c for c, _ in v.uses()] if down else [v.producer()]
            for m in nxt:
                if m is not None and id(m) not in visited:
                    visited.add(id(m))
                    stack.append(m)
    return frozenset(found)


def _spliced_drops(before, after, sets, data, n: int, workdir: Path, drop, progress=None) -> dict:
    """Per set S of tensor names: ``drop`` of the model before the pass, run with the tensors S
    taken from the model after it, against its own outputs (first ``n`` samples). One session
    serves every set (:func:`_switched`): S's switches on and fed, the others off."""
    names = sorted(set().union(*sets)) if sets else []
    if not names:
        return {}
    with Probe(after, names, workdir) as probe:
        values = list(probe.run(data, n))
    reference = run_model(before, data, n, workdir)
    dtypes = {t: values[0][t].dtype for t in names}
    path = workdir / "switched.onnx"
    io.write(_switched(before, dtypes), path)
    task = None
    try:
        sess = runtime.session(path, optimize=True)
        wanted = [o.name for o in sess.get_outputs()]
        off = {f"{t}.take": np.array(False) for t in names}
        off.update({f"{t}.fed": np.zeros((), dtypes[t]) for t in names})  # broadcast, unread
        out = {}
        task = progress.task("measuring each layer's damage", len(sets)) if progress else None
        for spliced in sets:
            outputs = []
            for feed, b in zip(data.batches(n), values):
                feed = {**feed, **off}
                for t in spliced:
                    feed[f"{t}.take"], feed[f"{t}.fed"] = np.array(True), b[t]
                with phase("onnxruntime: run"):
                    outputs.append(dict(zip(wanted, sess.run(wanted, feed))))
            out[spliced] = drop(reference, outputs)
            if task:
                task()
        del sess
        return out
    finally:
        if task:
            task.done()
        for f in workdir.glob(path.name + "*"):
            f.unlink(missing_ok=True)


def _own_drops(before, after, names: set[str], data, n: int, progress=None) -> dict[str, float]:
    """Per tensor t in ``names``: 1 − cosine of ``after``'s t, computed from ``before``'s values
    at the tensors of ``names`` ahead of it, with ``before``'s t -- what the nodes since those add
    on their own. Two sweeps in lockstep (one segment at a time: no session holds the model);
    raises ValueError if the two models order the tensors differently."""
    own: dict[str, float] = {}
    if not names:
        return own
    task = progress.task("measuring each layer's own damage", len(names)) if progress else None
    try:
        clean, spliced = Sweep(before, list(names), data, n), Sweep(after, list(names), data, n)
        for (name, ref), (other, got) in zip(clean, spliced):
            if name != other:
                raise ValueError(f"the models compute {name!r} and {other!r} in another order")
            if [r.shape for r in ref] != [g.shape for g in got]:
                own[name] = 0.0  # not shared after all (its shape was not inferred)
            else:
                own[name] = 1.0 - compare([{name: r} for r in ref], [{name: g} for g in got]).cosine
                got[:] = ref  # downstream of here, the pass's nodes see the clean values
            if task:
                task()
    finally:
        if task:
            task.done()
    return own


def _switched(model: ir.Model, dtypes: dict[str, np.dtype]) -> ir.Model:
    """A copy of ``model`` in which each tensor t named in ``dtypes`` becomes
    ``Where(t.take, t.fed, t)``: two new graph inputs, a boolean scalar and the value fed (any
    shape that broadcasts), so one session can splice any set of them. A graph output keeps its
    name on the switched value."""
    clone = model.clone()
    graph = clone.graph
    values = [v for node in list(graph) for v in node.outputs if v.name in dtypes]
    for v in values:
        name = v.name
        take = ir.Value(
            name=f"{name}.take", type=ir.TensorType(ir.DataType.BOOL), shape=ir.Shape([])
        )
        fed = ir.Value(name=f"{name}.fed", type=ir.TensorType(ir.DataType.from_numpy(dtypes[name])))
        graph.inputs.extend([take, fed])
        v.name = f"{name}.computed"
        out = ir.Value(name=name, type=v.type, shape=v.shape)
        v.replace_all_uses_with(out, replace_graph_outputs=True)
        graph.insert_after(
            v.producer(), ir.Node("", "Where", [take, fed, v], outputs=[out], name=f"{name}.switch")
        )
    return clone

"""Degrade, don't collapse: a lossy pass below its floor is re-run sparing its worst layers.

The layers are those the pass compressed, named as its ``skip`` option names them (a prune group
by its first producer). A layer's damage is the error it adds where it can be seen: with
e(t) = Σ‖t̂ − t‖² / Σ‖t‖² for a tensor t of the model before the pass and t̂ the same tensor
(same name and shape) after it, on a few validation samples, d(u) = max(0, max e(down) −
max e(up)), down and up the nearest such tensors after and before the layer. With the full
pass's drop D = 1 − cosine and the floor's F = 1 − floor, the first try spares the fewest worst
layers whose share of Σd reaches (D − F/2)/D; then the number spared is bisected
(:func:`onnxshrink.search.fewest`) within ``TRIES`` re-runs, each validated like the pass.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxshrink.calibrate import Probe
from onnxshrink.errors import one_line
from onnxshrink.passes.base import ShrinkPass
from onnxshrink.pipeline import cleanup
from onnxshrink.report import PassRecord, Skip
from onnxshrink.search import fewest

__all__ = ["TRIES", "Partial", "damage", "partial"]

logger = logging.getLogger(__name__)

TRIES = 5  # re-runs of the pass (each validated) a partial application may take
SAMPLES = 8  # validation samples the layer damage is measured on


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
    full: float  # 1 − cosine of the full pass

    def record(self, rec: PassRecord, failure: str) -> None:
        """Fills the pass's record: what this run changed, and the layers kept back and why."""
        q, kept = self.pass_, set(self.kept)
        rec.changed, rec.details = list(q.changed), dict(q.details)
        why = f"kept back: the full pass broke the floor ({failure})"
        rec.skipped = [s for s in q.skipped if s.node not in kept]
        rec.skipped += [Skip(u, why) for u in self.kept]
        rec.partial = {
            "applied": self.layers - len(self.kept),
            "layers": self.layers,
            "kept": self.kept,
            "full_cosine": round(1.0 - self.full, 6),
            "tries": self.tries,
            "damage": {u: round(self.damage[u], 6) for u in self.kept},
        }


def partial(
    p: ShrinkPass,
    before: ir.Model,
    after: ir.Model,
    drop: tuple[float, float],
    validate: Callable[[ShrinkPass, ir.Model, int], Any],
    data,
    workdir: Path,
    progress=None,
) -> Partial | None:
    """``p`` re-run on ``before`` sparing its most damaging layers until ``validate`` (which
    raises for a failing model) passes; None when no try within ``TRIES`` did. ``drop`` is the
    full pass's (1 − cosine, 1 − floor)."""
    layers = list(dict.fromkeys(p.layers))
    if len(layers) < 2:
        return None
    try:
        d = damage(before, after, layers, data, min(SAMPLES, data.n_samples), workdir)
    except Exception as e:  # a model the probes cannot run: spare in the pass's own order
        logger.debug("layer damage not measured: %s", one_line(e))
        d = {u: 1.0 for u in layers}
    order = sorted(layers, key=lambda u: -d[u])
    share = np.cumsum([d[u] for u in order]) / max(sum(d.values()), 1e-30)
    full, allowed = drop
    need = (full - allowed / 2) / full if full > 0 else 1.0
    first = int(np.searchsorted(share, min(need, 1.0) - 1e-9)) + 1
    found: dict[int, Partial] = {}
    calls = []
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
            checked = validate(q, model, k)
        except Exception as e:  # below the floor, invalid, or the pass raised
            logger.debug("%s sparing %d layer(s): %s", p.name, k, one_line(e))
            return False
        finally:
            if task:
                task()
        found[k] = Partial(q, model, checked, order[:k], len(layers), 0, d, full)
        return True

    try:
        k = fewest(len(layers) - 1, holds, min(max(first, 1), len(layers) - 1), TRIES)
    finally:
        if task:
            task.done()
    if k is None:
        return None
    found[k].tries = len(calls)
    return found[k]


def damage(
    before: ir.Model, after: ir.Model, layers: list[str], data, n: int, workdir: Path
) -> dict[str, float]:
    """d(u) per layer name (see the module docstring); 0 for a layer not found."""
    shapes_before, shapes_after = _shapes(before), _shapes(after)
    seen = {
        name
        for name, shape in shapes_before.items()
        if name in shapes_after and shape == shapes_after[name]
    }
    nodes = {node.name: node for node in before.graph if node.name}
    graph_in = {v.name for v in before.graph.inputs}
    around = {}
    for u in layers:
        if (node := nodes.get(u)) is not None:
            around[u] = (_nearest(node, seen, down=True), _nearest(node, seen, down=False))
    names = sorted({t for down, up in around.values() for t in (*down, *up) if t not in graph_in})
    err = _errors(before, after, names, data, n, workdir)
    out = {}
    for u in layers:
        down, up = around.get(u, ((), ()))
        worst_down = max((err.get(t, 0.0) for t in down), default=0.0)
        worst_up = max((err.get(t, 0.0) for t in up), default=0.0)
        out[u] = max(0.0, worst_down - worst_up)
    return out


def _shapes(model: ir.Model) -> dict[str, tuple | None]:
    """Float tensor name -> inferred shape (dims as ints or symbols) of the main graph."""
    from onnx_ir.passes.common import ShapeInferencePass

    clone = model.clone()
    ShapeInferencePass(check_type=False, strict_mode=False)(clone)
    out = {}
    for node in clone.graph:
        for v in node.outputs:
            if v.name and v.dtype in (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE):
                out[v.name] = None if v.shape is None else tuple(str(d) for d in v.shape)
    for v in clone.graph.inputs:
        out[v.name] = None if v.shape is None else tuple(str(d) for d in v.shape)
    return out


def _nearest(node: ir.Node, seen: set[str], *, down: bool) -> set[str]:
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
    return found


def _errors(before, after, names: list[str], data, n: int, workdir: Path) -> dict[str, float]:
    """e(t) per tensor name on the first ``n`` samples (tensors whose shapes differ: left out)."""
    if not names:
        return {}
    num, den, bad = dict.fromkeys(names, 0.0), dict.fromkeys(names, 0.0), set()
    with Probe(before, names, workdir) as ref, Probe(after, names, workdir) as new:
        for rb, nb in zip(ref.run(data, n), new.run(data, n)):
            for t in names:
                r, o = np.asarray(rb[t], np.float64), np.asarray(nb[t], np.float64)
                if r.shape != o.shape:
                    bad.add(t)
                    continue
                num[t] += float(np.sum((o - r) ** 2))
                den[t] += float(np.sum(r**2))
    return {t: num[t] / max(den[t], 1e-30) for t in names if t not in bad}

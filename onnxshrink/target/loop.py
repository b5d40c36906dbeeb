"""Compress to a target: allocate the budget across measured candidates, apply, back off.

1. Candidates are measured alone (:mod:`onnxshrink.target.candidates`), on two worker
   processes (:mod:`onnxshrink.target.pool`).
2. Allocation: :func:`onnxshrink.search.allocate` on each (method, layer)'s curve of drop
   against saving (one method per layer), until the predicted saving meets the target.
3. Apply and verify: the choices run as one validated pipeline (one pass per method and level,
   structural first, then ``distill``, then ``reconstruct`` when asked (PyTorch; a third of
   the time left), ``quantize`` last). When the drop (1 − top-1
   agreement for classifiers, else 1 − cosine) on held-out data exceeds ``max_drop``, the
   request is bisected between what held and what broke the budget (the greedy takes the least
   damaging steps first, so less compression drops the most damaging layers); when the budget
   holds but the target is not reached -- savings do not add up exactly -- more is asked for.
   At most ten attempts; the best one that held the budget is the result.

In time (``deadline``): the candidates are measured largest layer first (cached ones first of
all: they cost nothing), and measuring stops once half the time left at the start is spent; an
attempt starts only if the time left holds the longest one so far, and the first one only if
any is left -- when one cannot, the best attempt so far is the result and the record says
``stopped``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from pathlib import Path
from typing import Any, Protocol

import onnx_ir as ir

from onnxshrink import io
from onnxshrink.search import Curve
from onnxshrink.search import allocate as allocate_budget
from onnxshrink.target.candidates import Candidate, Sensitivity, build_pass, candidates, node_times
from onnxshrink.target.kinds import Budget, Target
from onnxshrink.target.pool import measure_all

__all__ = ["Runner", "allocate", "plan", "search"]

ATTEMPTS = 10


class Runner(Protocol):
    """What the search needs from its caller (:func:`onnxshrink.compress`)."""

    progress: Any  # a Progress, or None

    def apply(self, passes: list) -> tuple[ir.Model, Any]:
        """The search's starting model after ``passes`` (validated), and their report."""

    def latency(self, model: ir.Model) -> tuple[float, float]:
        """(ms of the original model, ms of ``model``), optimized sessions side by side."""


def allocate(
    measured: list[Candidate],
    target: Target,
    need: float,
    caps: dict[tuple[str, str], float] | None = None,
) -> tuple[dict[str, Candidate], float]:
    """(layer -> chosen candidate, ``"quantize"`` for int8 of the whole model; the predicted
    saving). ``caps`` bounds the level of a (method, layer) after a back-off."""
    caps = caps or {}
    items: dict[tuple[str, str], list[Candidate]] = {}
    for c in measured:
        key = (c.method, c.layer)
        if c.applied and target.saving(c) > 0 and c.level <= caps.get(key, math.inf):
            items.setdefault(key, []).append(c)
    curves = []
    for (method, layer), levels in items.items():
        levels.sort(key=lambda c: c.level)
        savings, drops = [target.saving(c) for c in levels], [c.drop for c in levels]
        curves.append(Curve((method, layer), savings, drops, group=layer or "quantize"))
    chosen, saved = allocate_budget(curves, need, finish=True)
    return {(layer or "quantize"): items[(m, layer)][i] for (m, layer), i in chosen.items()}, saved


def plan(chosen: dict[str, Candidate], reconstruct=None) -> list:
    """The passes for the choices: one per (method, level), structural first, then ``distill``
    and ``reconstruct`` (a pass instance, or None), then ``quantize``."""
    from onnxshrink.passes import DistillPass

    groups: dict[tuple[str, float], list[str]] = {}
    for c in chosen.values():
        if c.method != "quantize":
            groups.setdefault((c.method, c.level), []).append(c.layer)
    order = ("prune", "tucker", "lowrank")
    passes = [
        build_pass(m, tuple(layers), level)
        for (m, level), layers in sorted(groups.items(), key=lambda kv: (order.index(kv[0][0]), kv))
    ]
    if passes:
        passes.append(DistillPass())
        if reconstruct is not None:
            passes.append(reconstruct)
    if "quantize" in chosen:
        passes.append(build_pass("quantize", (), 1.0))
    return passes


def _back_off(chosen: dict[str, Candidate], measured: list[Candidate], caps) -> None:
    """Less compression on the most damaging choice from now on: capped at its previous level,
    or excluded."""
    worst = max(chosen.values(), key=lambda c: c.drop)
    same = [c for c in measured if (c.method, c.layer) == (worst.method, worst.layer)]
    lower = [c.level for c in same if c.applied and c.level < worst.level]
    caps[(worst.method, worst.layer)] = max(lower) if lower else -math.inf


def search(
    model: ir.Model,
    target: Target,
    max_drop: float,
    calibration,
    workdir: Path,
    runner: Runner,
    *,
    samples: int = 32,
    original_totals: dict[str, float] | None = None,
    deadline: float | None = None,
    reconstruct: bool = False,
) -> tuple[ir.Model, dict[str, Any]]:
    """Finds and applies the compression of ``model`` (the result of the user's passes);
    ``original_totals`` (``macs``, ``bytes``) are the original model's; ``deadline``: the
    ``time.monotonic()`` to end by; ``reconstruct``: finish each attempt's structural passes with
    ``reconstruct``. Returns the result and the search's record (with the final pipeline's
    report under ``"report"``)."""
    from onnxshrink.passes.base import NullTask

    started = time.monotonic()

    def left() -> float:
        return math.inf if deadline is None else deadline - time.monotonic()

    cut: list[str] = []  # what the time budget cut short
    base_path = workdir / "target_base.onnx"
    io.write(model, base_path)
    times, _ = node_times(base_path, calibration)
    cache = Path(os.environ.get("ONNXSHRINK_CACHE", Path.home() / ".cache" / "onnxshrink"))
    n = min(samples, calibration.n_samples)
    shapes = calibration.input_shapes()
    sens = Sensitivity(model, calibration, workdir, n, shapes, times, cache / "sensitivity")
    todo = _largest_first(candidates(model, target), sens)
    progress = runner.progress
    task = NullTask() if progress is None else progress.task("target: sensitivity", len(todo))
    measured = measure_all(sens, todo, base_path, time.monotonic() + left() / 2, task)
    if len(measured) < len(todo):
        cut.append(f"{len(measured)} of {len(todo)} candidates measured")
    task.done()
    orig = original_totals or {"macs": sens.stats.macs, "bytes": sens.stats.bytes}
    budget = Budget(
        orig["macs"] or 1, orig["bytes"] or 1, sens.stats.macs, sens.stats.bytes or 0,
        sum(times.values()),
    )  # fmt: skip
    if target.timed:
        budget.orig_ms, budget.base_ms = runner.latency(model)
    need = target.need(budget)
    info: dict[str, Any] = {
        "target": str(target),
        "max_drop": max_drop,
        "base_ms_profiled": round(budget.base_ms_profiled, 3),
        "candidates": [dataclasses.asdict(c) for c in measured],
        "candidates_total": len(todo),
        "attempts": [],
        "reconstruct": reconstruct,
    }
    caps: dict[tuple[str, str], float] = {}
    want, best, tried = need, None, set()
    ok_want, fail_want = 0.0, math.inf  # the largest request that held, the smallest that broke
    longest = 0.0
    for _attempt in range(ATTEMPTS):
        if left() < (longest if info["attempts"] else 0.0):
            cut.append(f"{len(info['attempts'])} attempt(s) made")
            break
        chosen, predicted = allocate(measured, target, want, caps)
        for _ in range(20):  # tried already: ask for just more than it saves, so a step is added
            if _key(chosen) not in tried or predicted * 1.001 >= fail_want:
                break
            want = predicted * 1.001
            chosen, predicted = allocate(measured, target, want, caps)
        if _key(chosen) in tried:
            break  # nothing new to try
        tried.add(_key(chosen))
        passes = plan(chosen, _reconstruct(left()) if reconstruct else None)
        t0 = time.monotonic()
        result, rep = runner.apply(passes)
        longest = max(longest, time.monotonic() - t0)
        drop = _drop(rep)
        reached = _reached(target, rep, result, runner, budget)
        info["attempts"].append(
            {
                "passes": [p.spec() for p in passes],
                "drop": round(drop, 5),
                "reached": reached,
                "choices": {k: f"{c.method}@{c.level:g}" for k, c in chosen.items()},
            }
        )
        if drop > max_drop:
            # less compression: a smaller request drops the most damaging choices; a single
            # all-or-nothing step (int8 of the whole model) that broke the budget is excluded
            if len(chosen) == 1:
                _back_off(chosen, measured, caps)
            else:
                fail_want = min(fail_want, want)
                want = (ok_want + want) / 2
            continue
        if best is None or target.better(reached, best[2]):
            best = (result, rep, reached, drop, dict(chosen))
        if target.met(reached):
            break
        ok_want = max(ok_want, want)
        # savings are not additive (a pruned group and a decomposed consumer share MACs):
        # ask for more, by the measured shortfall, below what broke the budget
        got = target.saved(budget, reached)
        more = want * min(4.0, need / max(got, 1e-9 * need)) if got > 0 else want * 2
        want = min(more, (want + fail_want) / 2) if fail_want < math.inf else more
    if best is None:  # nothing within the budget: the model as it was
        result, rep = runner.apply([])
        best = (result, rep, _reached(target, rep, result, runner, budget), _drop(rep), {})
    result, rep, reached, drop, chosen = best
    info.update(
        {
            "seconds": round(time.monotonic() - started, 1),
            "stopped": f"time budget: {', '.join(cut)}" if cut else None,
            "met": target.met(reached),
            "reached": reached,
            "drop": round(drop, 5),
            "choices": [dataclasses.asdict(c) for c in chosen.values()],
            "report": rep,
            "coarse": _coarse(rep, max_drop),
        }
    )
    return result, info


def _reconstruct(left: float):
    """``reconstruct`` for one attempt: a third of the time left (so that the bisection still
    has attempts after it), no limit without a deadline."""
    from onnxshrink.passes.reconstruct import ReconstructPass

    return ReconstructPass(time_budget=None if math.isinf(left) else float(max(round(left / 3), 1)))


def _largest_first(todo: list[Candidate], sens: Sensitivity) -> list[Candidate]:
    """Cached candidates first (free), then by the MACs of their layer, largest first (int8 of
    the whole model first of all): cut short, the search still has the layers that matter."""

    def size(c: Candidate) -> float:
        return math.inf if not c.layer else sens.macs.get(c.layer, 0)

    return sorted(todo, key=lambda c: (sens.cached(c) is None, -size(c)))


def _key(chosen: dict[str, Candidate]) -> tuple:
    return tuple(sorted((k, c.method, c.level) for k, c in chosen.items()))


def _drop(rep) -> float:
    """1 − the user's task metric when given, else 1 − top-1 agreement for classifier-like
    outputs (what a user's budget is about), else 1 − cosine. Few held-out samples measure
    agreement in coarse steps: one of 50 is 2%."""
    f = rep.fidelity
    if f is None:
        return 1.0
    if f.metric is not None:
        return 1.0 - f.metric
    return 1.0 - (f.top1_agreement if f.top1_agreement is not None else f.cosine)


def _coarse(rep, max_drop: float) -> str | None:
    """What to tell a user whose ``max_drop`` is finer than one held-out sample's decision
    (40 held-out crops: one flipped decision is a drop of 2.5%), or None."""
    f = rep.fidelity
    if f is None or f.metric is not None or f.top1_agreement is None or not f.samples:
        return None
    step = 1.0 / f.samples
    if max_drop >= step:
        return None
    return (
        f"the drop is 1 − top-1 agreement on {f.samples} held-out samples, in steps of "
        f"{step:.1%}: a budget of {max_drop:.1%} allows no changed decision (hold out more "
        f"samples, or --max-drop {step:.3f} or more)"
    )


def _reached(target: Target, rep, model, runner: Runner, budget: Budget) -> dict[str, float]:
    """MACs and bytes as shares of the original model's; latency against the original's."""
    out = {
        "macs": rep.after["macs"] / budget.orig_macs,
        "size": (rep.after.get("bytes") or 0) / budget.orig_bytes,
    }
    if target.timed:
        ms0, ms1 = runner.latency(model)
        out.update({"speedup": ms0 / ms1, "latency-ms": ms1, "original-ms": ms0})
    return {k: round(v, 4) for k, v in out.items()}

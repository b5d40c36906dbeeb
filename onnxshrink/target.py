"""Compress to a target: measured sensitivity, budget allocation across passes, back-off.

``compress(..., target="speedup=2", max_drop=0.01)``:

1. **Candidates**: for every prunable channel group (``prune`` at ratios 0.25 / 0.5 / 0.75), every
   K×K convolution (``tucker`` at speed-ups 1.5 / 2 / 4 / 8), every MatMul, Gemm and 1×1 convolution
   (``lowrank`` at speed-ups 1.5 / 2 / 4 / 8), and -- for latency and size targets -- int8
   ``quantize`` of the whole model.
2. **Sensitivity**: each candidate is applied *alone* to the model and run with onnxruntime on
   calibration samples: its drop (1 − cosine of the outputs with the model's) is measured, as
   are the MACs and bytes it saves. Results are cached on disk (``$ONNXSHRINK_CACHE/sensitivity``,
   keyed by the model, the data and the candidate), so a second run with another target is fast.
3. **Cost**: each layer's share of latency from onnxruntime's profiler (``enable_profiling``);
   a candidate's predicted time saved is Σ over the nodes it changes of node time × share of
   the node's MACs removed. int8 is timed directly.
4. **Allocation**: greedy on the sensitivity curves across methods: the step (a new layer, or
   the next level of a layer already chosen; one method per layer) with the least drop per unit
   of saving (MACs, ms or bytes, by target) is taken until the predicted saving meets the target.
5. **Apply and verify**: the chosen steps run as one pipeline (grouped by pass and level,
   ``distill`` after the structural passes, ``quantize`` last), validated on the held-out data.
   When the drop (1 − top-1 agreement for classifiers, else 1 − cosine) exceeds ``max_drop``,
   the request is bisected between what held and what broke the budget (the greedy takes the
   least damaging steps first, so less compression drops the most damaging layers); when the
   budget holds but the target is not reached -- savings do not add up exactly -- more is asked
   for. At most ten attempts; the report says whether the target was met, what was reached, and
   every choice and attempt.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxshrink import io, metrics, runtime
from onnxshrink.errors import OptionError

__all__ = ["Target", "Candidate", "search"]

logger = logging.getLogger(__name__)

KINDS = ("speedup", "macs", "size", "latency-ms")
_LEVELS = {
    "prune": (0.25, 0.5, 0.75),
    "tucker": (1.5, 2.0, 4.0, 8.0),
    "lowrank": (1.5, 2.0, 4.0, 8.0),
}
_SPEC = {
    "prune": "prune:only={layer},ratio={level},floor=0",
    "tucker": "tucker:only={layer},speedup={level},floor=0",
    "lowrank": "lowrank:only={layer},speedup={level},floor=0,fused=false",
}
_CACHE_VERSION = (
    "3"  # bump when a candidate pass changes its output (2: quantize rounding, 3: cascade ranges)
)


@dataclasses.dataclass
class Target:
    kind: str
    value: float

    @classmethod
    def parse(cls, text: str) -> Target:
        m = re.fullmatch(r"\s*([a-z-]+)\s*=\s*([0-9.eE+-]+)\s*", text or "")
        if not m or m.group(1) not in KINDS:
            raise OptionError(
                f"--target: expected one of {', '.join(k + '=<x>' for k in KINDS)}; got '{text}'"
            )
        try:
            value = float(m.group(2))
        except ValueError as e:
            raise OptionError(f"--target: '{m.group(2)}' is not a number") from e
        kind = m.group(1)
        if (
            kind == "speedup"
            and value <= 1
            or kind in ("macs", "size")
            and not 0 < value < 1
            or kind == "latency-ms"
            and value <= 0
        ):
            raise OptionError(
                f"--target {kind}={value}: speedup > 1, macs and size in (0, 1), latency-ms > 0"
            )
        return cls(kind, value)

    def __str__(self) -> str:
        return f"{self.kind}={self.value:g}"


@dataclasses.dataclass
class Candidate:
    method: str
    layer: str
    level: float
    drop: float = 0.0
    macs_saved: float = 0.0
    bytes_saved: float = 0.0
    ms_saved: float = 0.0
    applied: bool = True  # False: the pass refused it (reason in ``note``)
    note: str = ""

    @property
    def spec(self) -> str:
        if self.method == "quantize":
            return "quantize"
        return _SPEC[self.method].format(layer=self.layer, level=self.level)

    def saving(self, kind: str) -> float:
        return {"macs": self.macs_saved, "size": self.bytes_saved}.get(kind, self.ms_saved)


# -- candidates ----------------------------------------------------------------------------------
def _candidates(model: ir.Model, target: Target) -> list[Candidate]:
    from onnxshrink.analysis import channels as ch
    from onnxshrink.analysis.channels import const_array

    out: list[Candidate] = []
    cg = ch.analyze(model.clone())
    for g in cg.roots():
        if g.frozen is None and g.size >= 16 and g.producers[0].name:
            out += [Candidate("prune", g.producers[0].name, r) for r in _LEVELS["prune"]]
    for node in model.graph:
        if node.domain not in ("", "ai.onnx") or not node.name or len(node.inputs) < 2:
            continue
        w = const_array(node.inputs[1])
        if w is None:
            continue
        if (
            node.op_type == "Conv"
            and w.ndim == 4
            and node.attributes.get_int("group", 1) == 1
            and min(w.shape[:2]) >= 16
        ):
            method = "lowrank" if w.shape[2:] == (1, 1) else "tucker"
            out += [Candidate(method, node.name, s) for s in _LEVELS[method]]
        elif node.op_type in ("MatMul", "Gemm") and w.ndim == 2 and min(w.shape) >= 16:
            out += [Candidate("lowrank", node.name, s) for s in _LEVELS["lowrank"]]
    if target.kind != "macs":
        out.append(Candidate("quantize", "", 1.0))
    return out


# -- cost: per-node time from onnxruntime's profiler --------------------------------------------
def node_times(path: Path, data, runs: int = 10) -> tuple[dict[str, float], float]:
    """(ms per run of each node, ms per run of the model), graph optimizations basic so node
    names survive."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 4
    opts.enable_profiling = True
    opts.profile_file_prefix = str(path.parent / "profile")
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    feed = next(iter(data.batches(1)))
    for _ in range(3):
        sess.run(None, feed)
    t0 = time.perf_counter()
    for _ in range(runs):
        sess.run(None, feed)
    total = (time.perf_counter() - t0) * 1e3 / runs
    prof = Path(sess.end_profiling())
    times: dict[str, float] = {}
    for e in json.loads(prof.read_text()):
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            name = e["name"][: -len("_kernel_time")]
            times[name] = times.get(name, 0.0) + e.get("dur", 0) / 1e3
    prof.unlink(missing_ok=True)
    scale = total / max(sum(times.values()), 1e-9)  # warm-up runs are profiled too: rescale
    return {k: v * scale for k, v in times.items()}, total


def _macs_by_name(model: ir.Model, shapes) -> dict[str, int]:
    return {
        layer.name: layer.macs or 0
        for layer in metrics.model_stats(model, input_shapes=shapes, with_bytes=False).layers
    }


def _ms_saved(before: dict[str, int], after: dict[str, int], times: dict[str, float]) -> float:
    saved = 0.0
    for name, macs in before.items():
        if not macs or name not in times:
            continue
        now = after.get(name)
        if now is None:  # replaced: its parts are named after it (tucker, lowrank)
            now = sum(v for k, v in after.items() if k.startswith(name + "."))
        saved += times[name] * max(0.0, 1.0 - now / macs)
    return saved


# -- sensitivity --------------------------------------------------------------------------------
class Sensitivity:
    """Measures candidates one at a time against ``model`` on ``data``; caches on disk."""

    def __init__(
        self, model: ir.Model, data, workdir: Path, samples: int, shapes, times, cache: Path | None
    ):
        from onnxshrink.calibrate import run_model

        self.model, self.data, self.workdir, self.samples, self.shapes = (
            model,
            data,
            workdir,
            samples,
            shapes,
        )
        self.times = times
        self.ref = run_model(model, data, samples, workdir)
        self.stats = metrics.model_stats(model, input_shapes=shapes)
        self.macs = _macs_by_name(model, shapes)
        self.cache = cache
        digest = hashlib.sha256(_CACHE_VERSION.encode())
        digest.update(ir.to_proto(model).SerializeToString(deterministic=True))
        for k in sorted(data.arrays):
            digest.update(np.ascontiguousarray(data.arrays[k][:samples]).tobytes())
        self.key = digest.hexdigest()[:24]

    def measure(self, c: Candidate) -> Candidate:
        cached = self._cached(c)
        if cached is not None:
            return cached
        from onnxshrink.calibrate import run_model
        from onnxshrink.passes import PassContext, make_pass
        from onnxshrink.pipeline import cleanup
        from onnxshrink.validate import compare

        clone = self.model.clone()
        p = make_pass(c.spec)
        p.bind(
            PassContext(
                data=self.data.subset(slice(0, self.samples)),
                workdir=self.workdir,
                original=self.model,
            )
        )
        try:
            modified = p(clone).modified
        except Exception as e:  # a candidate that fails is just not a candidate
            modified, c.note = False, f"{type(e).__name__}: {e}"
        if not modified:
            c.applied = False
            c.note = c.note or "; ".join(s.reason for s in p.skipped[:1]) or "nothing to change"
            return self._store(c)
        cleanup(clone)
        out = run_model(clone, self.data, self.samples, self.workdir)
        c.drop = max(0.0, 1.0 - compare(self.ref, out).cosine)
        st = metrics.model_stats(clone, input_shapes=self.shapes)
        c.macs_saved = float(self.stats.macs - st.macs)
        c.bytes_saved = float((self.stats.bytes or 0) - (st.bytes or 0))
        if c.method == "quantize":
            c.ms_saved = self._timed_saving(clone)
        else:
            c.ms_saved = _ms_saved(self.macs, _macs_by_name(clone, self.shapes), self.times)
        return self._store(c)

    def _timed_saving(self, model: ir.Model) -> float:
        a, b = self.workdir / "sens_a.onnx", self.workdir / "sens_b.onnx"
        io.write(self.model, a)
        io.write(model, b)
        feed = next(iter(self.data.batches(1)))
        ms = runtime.latency(
            {
                "a": runtime.session(a, optimize=True, spin=False),
                "b": runtime.session(b, optimize=True, spin=False),
            },
            feed,
            runs=20,
            warmup=3,
        )
        base = sum(self.times.values())
        return base * (1.0 - ms["b"] / ms["a"])

    def _path(self, c: Candidate) -> Path | None:
        if self.cache is None:
            return None
        name = hashlib.sha256(f"{self.key}|{c.spec}".encode()).hexdigest()[:24]
        return self.cache / f"{name}.json"

    def _cached(self, c: Candidate) -> Candidate | None:
        path = self._path(c)
        if path is None or not path.exists():
            return None
        try:
            return Candidate(**json.loads(path.read_text()))
        except (ValueError, TypeError):
            return None

    def _store(self, c: Candidate) -> Candidate:
        path = self._path(c)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            io.atomic_text(path, json.dumps(dataclasses.asdict(c)))
        return c


# -- allocation ------------------------------------------------------------------------------------
def allocate(
    candidates: list[Candidate],
    kind: str,
    need: float,
    caps: dict[tuple[str, str], float] | None = None,
) -> dict[str, Candidate]:
    """Greedy across methods: layer -> chosen candidate, least drop per unit of saving first.
    ``caps`` bounds the level of a (method, layer) after a back-off."""
    caps = caps or {}
    by_layer: dict[tuple[str, str], list[Candidate]] = {}
    for c in candidates:
        if c.applied and c.saving(kind) > 0 and c.level <= caps.get((c.method, c.layer), math.inf):
            by_layer.setdefault((c.method, c.layer), []).append(c)
    for levels in by_layer.values():
        levels.sort(key=lambda c: c.level)
    chosen: dict[str, Candidate] = {}
    saved = 0.0
    while saved < need:
        best, best_ratio = None, math.inf
        finish, finish_drop = (
            None,
            math.inf,
        )  # the least damaging step that alone completes the need
        for (method, layer), levels in by_layer.items():
            cur = chosen.get(layer or "quantize")
            if cur is not None and cur.method != method:
                continue  # one method per layer
            nxt = (
                levels[0] if cur is None else next((c for c in levels if c.level > cur.level), None)
            )
            if nxt is None:
                continue
            d_save = nxt.saving(kind) - (cur.saving(kind) if cur else 0.0)
            d_drop = nxt.drop - (cur.drop if cur else 0.0)
            if d_save <= 0:
                continue
            ratio = max(d_drop, 0.0) / d_save
            if ratio < best_ratio:
                best, best_ratio = nxt, ratio
            if d_save >= need - saved and d_drop < finish_drop:
                finish, finish_drop = nxt, d_drop
        if finish is not None:
            best = (
                finish  # do not overshoot with a big cheap-per-unit step when a small one suffices
            )
        if best is None:
            break
        prev = chosen.get(best.layer or "quantize")
        saved += best.saving(kind) - (prev.saving(kind) if prev else 0.0)
        chosen[best.layer or "quantize"] = best
    return chosen


def _pipeline(chosen: dict[str, Candidate]) -> list[str]:
    """Pass specs for the choices: one pass per (method, level), structural first, then
    ``distill``, then ``quantize``."""
    groups: dict[tuple[str, float], list[str]] = {}
    for c in chosen.values():
        if c.method != "quantize":
            groups.setdefault((c.method, c.level), []).append(c.layer)
    specs = []
    for method in ("prune", "tucker", "lowrank"):
        for (m, level), layers in sorted(groups.items()):
            if m == method:
                specs.append(_SPEC[m].format(layer="+".join(layers), level=level))
    if specs:
        specs.append("distill")
    if "quantize" in chosen:
        specs.append("quantize")
    return specs


def _back_off(
    chosen: dict[str, Candidate], candidates: list[Candidate], caps: dict[tuple[str, str], float]
) -> bool:
    """Less compression on the most damaging choice from now on: capped at its previous level,
    or excluded. False if nothing is left to back off."""
    if not chosen:
        return False
    worst = max(chosen.values(), key=lambda c: c.drop)
    lower = [
        c.level
        for c in candidates
        if c.method == worst.method
        and c.layer == worst.layer
        and c.applied
        and c.level < worst.level
    ]
    caps[(worst.method, worst.layer)] = max(lower) if lower else -math.inf
    return True


@dataclasses.dataclass
class Budget:
    """Converts between the target (relative to the *original* model, before any ``-p`` pass)
    and savings on the model the search starts from (MACs, bytes, profiled ms)."""

    orig_macs: float
    orig_bytes: float
    base_macs: float
    base_bytes: float
    base_ms_profiled: float
    orig_ms: float = 0.0  # measured, optimized sessions
    base_ms: float = 0.0

    def need(self, target: Target) -> float:
        if target.kind == "macs":
            return max(self.base_macs - target.value * self.orig_macs, 0.0)
        if target.kind == "size":
            return max(self.base_bytes - target.value * self.orig_bytes, 0.0)
        want_ms = self.orig_ms / target.value if target.kind == "speedup" else target.value
        return max(self.base_ms_profiled * (1.0 - want_ms / max(self.base_ms, 1e-9)), 0.0)

    def saved(self, target: Target, reached: dict[str, float]) -> float:
        if target.kind == "macs":
            return self.base_macs - reached["macs"] * self.orig_macs
        if target.kind == "size":
            return self.base_bytes - reached["size"] * self.orig_bytes
        return self.base_ms_profiled * (1.0 - reached["latency-ms"] / max(self.base_ms, 1e-9))


def search(
    model: ir.Model,
    target: Target,
    max_drop: float,
    calibration,
    workdir: Path,
    apply,
    measure_latency,
    *,
    samples: int = 32,
    progress=None,
    original_totals: dict[str, float] | None = None,
) -> tuple[ir.Model, dict[str, Any]]:
    """Finds and applies the compression; ``apply(specs) -> (model, report)`` runs a validated
    pipeline on ``model``, ``measure_latency(model) -> (ms_original, ms_model)`` times it against
    the original; ``original_totals`` (``macs``, ``bytes``) are the original's, when ``model`` is
    already the result of other passes."""
    from onnxshrink.passes.base import NullTask

    shapes = calibration.input_shapes()
    base_path = workdir / "target_base.onnx"
    io.write(model, base_path)
    times, _ = node_times(base_path, calibration)
    cache_root = (
        Path(os.environ.get("ONNXSHRINK_CACHE", Path.home() / ".cache" / "onnxshrink"))
        / "sensitivity"
    )
    sens = Sensitivity(
        model, calibration, workdir, min(samples, calibration.n_samples), shapes, times, cache_root
    )
    cands = _candidates(model, target)
    task = progress.task("target: sensitivity", len(cands)) if progress is not None else NullTask()
    measured = []
    for c in cands:
        measured.append(sens.measure(c))
        task(1)
    task.done()
    base_ms = sum(times.values())
    orig = original_totals or {"macs": sens.stats.macs, "bytes": sens.stats.bytes}
    budget = Budget(
        orig["macs"] or 1, orig["bytes"] or 1, sens.stats.macs, sens.stats.bytes or 0, base_ms
    )
    if target.kind in ("speedup", "latency-ms"):
        budget.orig_ms, budget.base_ms = measure_latency(model)
    need = budget.need(target)
    info: dict[str, Any] = {
        "target": str(target),
        "max_drop": max_drop,
        "base_ms_profiled": round(base_ms, 3),
        "candidates": [dataclasses.asdict(c) for c in measured],
        "attempts": [],
    }
    caps: dict[tuple[str, str], float] = {}
    want, best, tried = need, None, set()
    ok_want, fail_want = (
        0.0,
        math.inf,
    )  # the largest request that held the budget, the smallest that broke it
    for _attempt in range(10):
        chosen = allocate(measured, target.kind, want, caps)
        specs = _pipeline(chosen)
        for _ in range(
            80
        ):  # the greedy moves in discrete steps: ask for a little more until it changes
            if tuple(specs) not in tried or want * 1.03 >= fail_want:
                break
            want *= 1.03
            chosen = allocate(measured, target.kind, want, caps)
            specs = _pipeline(chosen)
        if tuple(specs) in tried:
            break  # nothing new to try
        tried.add(tuple(specs))
        result, rep = apply(specs)
        drop = _drop(rep)
        reached = _reached(target, rep, result, measure_latency, budget)
        info["attempts"].append(
            {
                "passes": specs,
                "drop": round(drop, 5),
                "reached": reached,
                "choices": {k: f"{c.method}@{c.level:g}" for k, c in chosen.items()},
            }
        )
        if drop > max_drop:
            # less compression: the greedy takes the least damaging steps first, so a smaller
            # request drops the most damaging choices; a single all-or-nothing step (int8 of the
            # whole model) that broke the budget alone is excluded
            if len(chosen) == 1:
                _back_off(chosen, measured, caps)
            else:
                fail_want = min(fail_want, want)
                want = (ok_want + want) / 2
            continue
        if best is None or _better(target, reached, best[2]):
            best = (result, rep, reached, drop, dict(chosen))
        if _met(target, reached):
            break
        ok_want = max(ok_want, want)
        # savings are not additive (a pruned group and a decomposed consumer share MACs):
        # ask the allocation for more, by the measured shortfall, below what broke the budget
        got = budget.saved(target, reached)
        more = want * min(4.0, need / max(got, 1e-9 * need)) if got > 0 else want * 2
        want = min(more, (want + fail_want) / 2) if fail_want < math.inf else more
    if best is None:  # nothing within the budget: the model as it was
        result, rep = apply([])
        best = (result, rep, _reached(target, rep, result, measure_latency, budget), _drop(rep), {})
    result, rep, reached, drop, chosen = best
    met = _met(target, reached)
    info.update(
        {
            "met": met,
            "reached": reached,
            "drop": round(drop, 5),
            "choices": [dataclasses.asdict(c) for c in chosen.values()],
            "report": rep,
        }
    )
    return result, info


def _better(target: Target, a: dict[str, float], b: dict[str, float]) -> bool:
    if target.kind in ("speedup", "latency-ms"):
        return a["speedup"] > b["speedup"]
    return a[target.kind] < b[target.kind]


def _drop(rep) -> float:
    """1 − top-1 agreement for classifier-like outputs (what a user's budget is about), else
    1 − cosine. Few held-out samples measure agreement in coarse steps: one of 50 is 2%."""
    f = rep.fidelity
    if f is None:
        return 1.0
    return 1.0 - (f.top1_agreement if f.top1_agreement is not None else f.cosine)


def _reached(target: Target, rep, model, measure_latency, budget: Budget) -> dict[str, float]:
    """MACs and bytes as shares of the original model's; latency against the original's."""
    out = {
        "macs": rep.after["macs"] / budget.orig_macs,
        "size": (rep.after.get("bytes") or 0) / budget.orig_bytes,
    }
    if target.kind in ("speedup", "latency-ms"):
        ms0, ms1 = measure_latency(model)
        out.update({"speedup": ms0 / ms1, "latency-ms": ms1, "original-ms": ms0})
    return {k: round(v, 4) for k, v in out.items()}


def _met(target: Target, reached: dict[str, float]) -> bool:
    if target.kind == "speedup":
        return reached["speedup"] >= target.value
    if target.kind == "latency-ms":
        return reached["latency-ms"] <= target.value
    return reached[target.kind] <= target.value

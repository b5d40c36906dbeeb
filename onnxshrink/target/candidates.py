"""Candidates for ``--target``: one layer under one method at one level, measured alone.

Candidates: every prunable channel group (``prune`` at ratios 0.25 / 0.5 / 0.75), every K×K
convolution (``tucker`` at speed-ups 1.5 / 2 / 4 / 8), every MatMul, Gemm and 1×1 convolution
(``lowrank`` at the same speed-ups) and, unless the target is MACs, int8 ``quantize`` of the
whole model. Each is applied alone, fitted on the first ``samples`` calibration samples and
judged on the next ones (judged on the samples its re-fit used, a candidate hides its damage):
drop = 1 − cosine of the outputs with the model's; MACs and bytes saved are counted. Time
saved is predicted from onnxruntime's profiler: Σ over the nodes it changes of node time ×
share of the node's MACs removed (int8 is timed directly). Results are cached on disk
(``$ONNXSHRINK_CACHE/sensitivity``, keyed by the model, the data and the candidate), so a
second run with another target is fast.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir

from onnxshrink import atomic, io, metrics, runtime
from onnxshrink.target.kinds import Target

__all__ = ["Candidate", "Sensitivity", "build_pass", "candidates", "node_times"]

LEVELS = {
    "prune": (0.25, 0.5, 0.75),
    "tucker": (1.5, 2.0, 4.0, 8.0),
    "lowrank": (1.5, 2.0, 4.0, 8.0),
}
CACHE_VERSION = "5"  # bump when a candidate's measure changes (4: keyed by label, 5: held out)


def build_pass(method: str, layers: tuple[str, ...], level: float):
    """The pass that applies ``method`` at ``level`` to ``layers`` only. ``floor=0``: the search
    judges fidelity itself (its budget), so the pass must not roll itself back."""
    from onnxshrink.passes import LowRankMatMulPass, PruneChannelsPass, QuantizePass, TuckerConvPass

    if method == "prune":
        return PruneChannelsPass(only=layers, ratio=level, floor=0.0)
    if method == "tucker":
        return TuckerConvPass(only=layers, speedup=level, floor=0.0)
    if method == "lowrank":
        return LowRankMatMulPass(only=layers, speedup=level, floor=0.0, fused=False)
    if method == "quantize":
        return QuantizePass()
    raise ValueError(f"unknown method {method}")


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

    def make_pass(self):
        """This candidate as a pass (a fresh instance each call: passes keep state)."""
        return build_pass(self.method, (self.layer,), self.level)

    @property
    def label(self) -> str:
        """``method@level layer``: the cache key and what the report shows."""
        return f"{self.method}@{self.level:g} {self.layer}".rstrip()


# -- candidates ----------------------------------------------------------------------------------
def candidates(model: ir.Model, target: Target) -> list[Candidate]:
    from onnxshrink.analysis import channels as ch
    from onnxshrink.irtools import const_array

    out: list[Candidate] = []
    cg = ch.analyze(model.clone())
    for g in cg.roots():
        if g.frozen is None and g.size >= 16 and g.producers[0].name:
            out += [Candidate("prune", g.producers[0].name, r) for r in LEVELS["prune"]]
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
            out += [Candidate(method, node.name, s) for s in LEVELS[method]]
        elif node.op_type in ("MatMul", "Gemm") and w.ndim == 2 and min(w.shape) >= 16:
            out += [Candidate("lowrank", node.name, s) for s in LEVELS["lowrank"]]
    if target.with_int8:
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


def _fit_and_judged(data, samples: int):
    """(the samples a candidate is fitted on, the ones it is judged on): the first ``samples``
    and the next as many -- halves when there are fewer; the same ones with fewer than 8."""
    if data.n_samples < 8:
        return data, data
    k = min(samples, data.n_samples // 2)
    return data.subset(slice(0, k)), data.subset(slice(k, 2 * k))


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
        self.fit, self.judged = _fit_and_judged(data, samples)
        self.ref = run_model(model, self.judged, None, workdir)
        self.stats = metrics.model_stats(model, input_shapes=shapes)
        self.macs = _macs_by_name(model, shapes)
        self.cache = cache
        digest = hashlib.sha256(CACHE_VERSION.encode())
        digest.update(ir.to_proto(model).SerializeToString(deterministic=True))
        for k in sorted(data.arrays):
            digest.update(np.ascontiguousarray(data.arrays[k][: 2 * samples]).tobytes())
        self.key = digest.hexdigest()[:24]

    def measure(self, c: Candidate) -> Candidate:
        cached = self.cached(c)
        if cached is not None:
            return cached
        from onnxshrink.calibrate import run_model
        from onnxshrink.passes import PassContext
        from onnxshrink.pipeline import cleanup
        from onnxshrink.validate import compare

        clone = self.model.clone()
        p = c.make_pass()
        p.bind(
            PassContext(
                data=self.fit,
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
        out = run_model(clone, self.judged, None, self.workdir)
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
        name = hashlib.sha256(f"{self.key}|{c.label}".encode()).hexdigest()[:24]
        return self.cache / f"{name}.json"

    def cached(self, c: Candidate) -> Candidate | None:
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
            atomic.atomic_text(path, json.dumps(dataclasses.asdict(c)))
        return c

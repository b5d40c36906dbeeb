"""``onnxshrink compare A B``: how far B's outputs are from A's, and how fast B runs relative to A.

Fidelity uses reference runs (graph optimizations off); latency uses full optimizations, both
models timed interleaved in one loop on the first batch of the data (median of ``runs``).
"""

from __future__ import annotations

from typing import Any

from onnxshrink import io, metrics, runtime
from onnxshrink.data import ImageOptions, input_specs, load_data
from onnxshrink.errors import ModelError
from onnxshrink.report import human
from onnxshrink.validate import compare

__all__ = ["compare_models", "render"]


def compare_models(
    a: str, b: str, *, data: Any = None, images: ImageOptions | None = None,
    runs: int = 30, threads: int = 1, limit: int = 256,
) -> dict[str, Any]:
    la, lb = io.load(a), io.load(b)
    sa, sb = input_specs(la.model), input_specs(lb.model)
    if [s.name for s in sa] != [s.name for s in sb]:
        raise ModelError(f"{b}: inputs {[s.name for s in sb]} differ from {a}'s {[s.name for s in sa]}")
    outs_a = [v.name for v in la.model.graph.outputs]
    if outs_a != [v.name for v in lb.model.graph.outputs]:
        raise ModelError(f"{b}: outputs differ from {a}'s ({outs_a})")
    dataset = load_data(data, sa, images=images)
    ref = runtime.run(_session(a, ModelError), dataset, limit=limit)
    out = runtime.run(_session(b, ModelError), dataset, limit=limit)
    fid = compare(ref, out)
    feed = next(dataset.batches(1))
    sess = {"a": runtime.session(a, optimize=True, threads=threads, spin=False),
            "b": runtime.session(b, optimize=True, threads=threads, spin=False)}
    ms = runtime.latency(sess, feed, runs=runs)
    shapes = dataset.input_shapes()
    st_a = metrics.model_stats(la.model, input_shapes=shapes, with_bytes=False)
    st_b = metrics.model_stats(lb.model, input_shapes=shapes, with_bytes=False)
    return {
        "a": a, "b": b, "data": dataset.source, "random_data": dataset.is_random,
        "fidelity": fid.to_dict(),
        "latency_ms": {"a": ms["a"], "b": ms["b"], "ratio": ms["b"] / ms["a"], "threads": threads, "runs": runs},
        "params": {"a": st_a.params, "b": st_b.params},
        "macs": {"a": st_a.macs, "b": st_b.macs},
        "bytes": {"a": io.file_bytes(a), "b": io.file_bytes(b)},
    }


def _session(path: str, err):
    try:
        return runtime.session(path)
    except Exception as e:
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise err(f"{path}: onnxruntime cannot run the model: {msg}") from e


def render(r: dict[str, Any], console) -> None:
    from rich.table import Table

    t = Table(title=f"{r['b']} vs {r['a']}", title_justify="left", box=None)
    for col in ("", "A", "B", "B / A"):
        t.add_column(col, justify="right" if col else "left")
    for key in ("params", "macs", "bytes"):
        a, b = r[key]["a"], r[key]["b"]
        t.add_row(key, human(a), human(b), f"{b / a:.3f}" if a else "")
    lat = r["latency_ms"]
    t.add_row(f"latency ms ({lat['threads']} thread, median of {lat['runs']})",
              f"{lat['a']:.3f}", f"{lat['b']:.3f}", f"{lat['ratio']:.3f}")
    console.print(t)
    f = r["fidelity"]
    top1 = f"{f['top1_agreement']:.1%}" if f["top1_agreement"] is not None else "n/a"
    console.print(f"fidelity on {f['samples']} samples ({r['data']}): cosine {f['cosine']:.6f} "
                  f"(worst {f['cosine_min']:.6f}), max |Δ| {f['max_abs']:.3g}, top-1 agreement {top1}")
    if r["random_data"]:
        console.print("[yellow]warning:[/] random data: give --data with real samples for real figures")

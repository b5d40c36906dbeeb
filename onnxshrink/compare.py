"""``onnxshrink compare A B``: how far B's outputs are from A's, and how fast B runs relative to A.

Fidelity uses reference runs (graph optimizations off); latency uses full optimizations, both
models timed interleaved in one loop on the first batch of the data (median of ``runs``). A B
with integer ops is also measured in an optimized session (its integer kernels on this CPU,
named in the result), with a warning where they saturate (:mod:`onnxshrink.analysis.saturation`).
With ``--layers``, every intermediate tensor named alike in both models is compared too, in
A's order, so a user sees *where* a quantized or pruned model starts to drift.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from onnxshrink import cpu, io, metrics, runtime
from onnxshrink.data import ImageOptions, input_specs, load_data
from onnxshrink.errors import ModelError, first_line
from onnxshrink.report import human
from onnxshrink.text import literal
from onnxshrink.validate import compare, uses_integer_kernels

__all__ = ["compare_models", "int8_warnings", "layer_drift", "render", "render_drift"]


def compare_models(
    a: str,
    b: str,
    *,
    data: Any = None,
    images: ImageOptions | None = None,
    runs: int = 30,
    threads: int = 1,
    limit: int = 256,
) -> dict[str, Any]:
    la, lb = io.load(a), io.load(b)
    sa, sb = input_specs(la.model), input_specs(lb.model)
    if [s.name for s in sa] != [s.name for s in sb]:
        raise ModelError(
            f"{b}: inputs {[s.name for s in sb]} differ from {a}'s {[s.name for s in sa]}"
        )
    outs_a = [v.name for v in la.model.graph.outputs]
    if outs_a != [v.name for v in lb.model.graph.outputs]:
        raise ModelError(f"{b}: outputs differ from {a}'s ({outs_a})")
    dataset = load_data(data, sa, images=images)
    ref = runtime.run(_session(a, ModelError), dataset, limit=limit)
    out = runtime.run(_session(b, ModelError), dataset, limit=limit)
    fid = compare(ref, out)
    kernels = None
    if uses_integer_kernels(lb.model):
        kernels = compare(
            ref, runtime.run(runtime.session(b, optimize=True), dataset, limit=limit)
        ).to_dict()
    feed = next(dataset.batches(1))
    sess = {
        "a": runtime.session(a, optimize=True, threads=threads, spin=False),
        "b": runtime.session(b, optimize=True, threads=threads, spin=False),
    }
    ms = runtime.latency(sess, feed, runs=runs)
    shapes = dataset.input_shapes()
    st_a = metrics.model_stats(la.model, input_shapes=shapes, with_bytes=False)
    st_b = metrics.model_stats(lb.model, input_shapes=shapes, with_bytes=False)
    return {
        "a": a,
        "b": b,
        "data": dataset.source,
        "random_data": dataset.is_random,
        "fidelity": fid.to_dict(),
        "latency_ms": {
            "a": ms["a"],
            "b": ms["b"],
            "ratio": ms["b"] / ms["a"],
            "threads": threads,
            "runs": runs,
        },
        "params": {"a": st_a.params, "b": st_b.params},
        "macs": {"a": st_a.macs, "b": st_b.macs},
        "bytes": {"a": io.file_bytes(a), "b": io.file_bytes(b)},
        "fidelity_kernels": kernels,
        "cpu": {**cpu.this_cpu().to_dict(), "summary": cpu.this_cpu().summary()},
        "warnings": int8_warnings({a: la.model, b: lb.model}),
    }


def int8_warnings(models: dict[str, Any]) -> list[str]:
    """One warning per model whose int8 weights saturate this CPU's integer kernels."""
    from onnxshrink.analysis.saturation import unsafe_layers

    here = cpu.this_cpu()
    if here.int8 == "exact":
        return []
    out = []
    for path, model in models.items():
        if unsafe := unsafe_layers(model):
            out.append(
                f"{path}: {len(unsafe)} layers have int8 weight pairs that saturate this CPU's "
                "kernels "
                f"({here.int8_kernel}): in an optimized session here they compute other values "
                "than on "
                "VNNI/AMX or ARM CPUs (re-quantize with quantize:cpu=any)"
            )
    return out


def layer_drift(
    a: str, b: str, *, data=None, images: ImageOptions | None = None, limit: int = 32
) -> list[dict[str, Any]]:
    """Per-tensor agreement of B with A on every intermediate tensor both models name alike.

    In A's order: where a quantized or pruned model first drifts from the original, and how
    the error grows. Both run with optimizations off (B's QDQ pairs simulated in float).
    """
    import tempfile

    from onnxshrink.calibrate import Probe

    la, lb = io.load(a), io.load(b)
    dataset = load_data(data, input_specs(la.model), images=images)
    names_b = {o.name for n in lb.model.graph for o in n.outputs}
    order, ops = [], {}
    for node in la.model.graph:
        for o in node.outputs:
            if o.name in names_b and o.name not in ops:
                order.append(o.name)
                ops[o.name] = node.op_type
    if not order:
        return []
    acc = {n: [0.0, 0.0, 0.0, 0.0, 0] for n in order}  # dot, |a|², |b|², max|Δ|, count
    ref_max = dict.fromkeys(order, 0.0)
    with tempfile.TemporaryDirectory(prefix="onnxshrink-drift-") as tmp:
        with (
            Probe(la.model, order, Path(tmp), optimize=False) as pa,
            Probe(lb.model, order, Path(tmp), optimize=False) as pb,
        ):
            for xa, xb in zip(pa.run(dataset, limit), pb.run(dataset, limit)):
                for n in order:
                    ra, rb = np.asarray(xa[n], np.float64), np.asarray(xb[n], np.float64)
                    if ra.shape != rb.shape:
                        acc[n][4] = -1
                        continue
                    s = acc[n]
                    s[0] += float((ra * rb).sum())
                    s[1] += float((ra * ra).sum())
                    s[2] += float((rb * rb).sum())
                    s[3] = max(s[3], float(np.abs(ra - rb).max(initial=0.0)))
                    s[4] += 1
                    ref_max[n] = max(ref_max[n], float(np.abs(ra).max(initial=0.0)))
    rows = []
    for n in order:
        dot, na, nb, mx, cnt = acc[n]
        if cnt <= 0:
            continue
        cos = dot / np.sqrt(na * nb) if na > 0 and nb > 0 else float(na == nb)
        rows.append(
            {
                "tensor": n,
                "op": ops[n],
                "cosine": float(cos),
                "max_abs": mx,
                "rel_max_abs": mx / ref_max[n] if ref_max[n] > 0 else mx,
            }
        )
    return rows


def render_drift(rows: list[dict[str, Any]], console, threshold: float = 0.999) -> None:
    from rich.table import Table

    if not rows:
        console.print("no intermediate tensor is named alike in both models")
        return
    first = next((r for r in rows if r["cosine"] < threshold), None)
    worst = min(rows, key=lambda r: r["cosine"])
    t = Table(
        title=f"per-layer drift (cosine of B's tensor with A's; first below {threshold} marked)",
        title_justify="left",
        box=None,
    )
    for col in ("tensor", "op", "cosine", "max |Δ| / max |A|"):
        t.add_column(col, justify="left" if col in ("tensor", "op") else "right")
    for r in rows:
        mark = "[red]" if r is first else ""
        t.add_row(
            f"{mark}{literal(r['tensor'])}",
            literal(r["op"]),
            f"{r['cosine']:.6f}",
            f"{r['rel_max_abs']:.3g}",
        )
    console.print(t)
    if first is not None:
        console.print(
            f"first drift below {threshold}: [bold]{literal(first['tensor'])}[/] "
            f"({literal(first['op'])}, "
            f"cosine {first['cosine']:.6f})"
        )
    console.print(
        f"worst: {literal(worst['tensor'])} ({literal(worst['op'])}, cosine {worst['cosine']:.6f})"
    )


def _session(path: str, err):
    try:
        return runtime.session(path)
    except Exception as e:
        raise err(f"{path}: onnxruntime cannot run the model: {first_line(e)}") from e


def render(r: dict[str, Any], console) -> None:
    from rich.table import Table

    t = Table(title=f"{literal(r['b'])} vs {literal(r['a'])}", title_justify="left", box=None)
    for col in ("", "A", "B", "B / A"):
        t.add_column(col, justify="right" if col else "left")
    for key in ("params", "macs", "bytes"):
        a, b = r[key]["a"], r[key]["b"]
        t.add_row(key, human(a), human(b), f"{b / a:.3f}" if a else "")
    lat = r["latency_ms"]
    t.add_row(
        f"latency ms ({lat['threads']} thread, median of {lat['runs']})",
        f"{lat['a']:.3f}",
        f"{lat['b']:.3f}",
        f"{lat['ratio']:.3f}",
    )
    console.print(t)
    f = r["fidelity"]
    top1 = f"{f['top1_agreement']:.1%}" if f["top1_agreement"] is not None else "n/a"
    console.print(
        f"fidelity on {f['samples']} samples ({literal(r['data'])}): cosine {f['cosine']:.6f} "
        f"(worst {f['cosine_min']:.6f}), max |Δ| {f['max_abs']:.3g}, top-1 agreement {top1}"
    )
    if (k := r.get("fidelity_kernels")) is not None:
        top1 = f"{k['top1_agreement']:.1%}" if k["top1_agreement"] is not None else "n/a"
        console.print(
            f"with B's integer kernels (an optimized session): cosine {k['cosine']:.6f} (worst "
            f"{k['cosine_min']:.6f}), max |Δ| {k['max_abs']:.3g}, top-1 agreement {top1}"
        )
    console.print(f"[dim]CPU: {literal(r['cpu']['summary'])}[/]")
    for w in r.get("warnings", []):
        console.print(f"[yellow]warning:[/] {literal(w)}")
    if r["random_data"]:
        console.print(
            "[yellow]warning:[/] random data: give --data with real samples for real figures"
        )

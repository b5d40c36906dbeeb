"""The HTML report: one self-contained page (plots embedded as PNG), readable without matplotlib.

Sections: totals before → after; the pass table; per-layer MACs and params before and after
(bars); with ``--target``, the sensitivity curves (drop against level per layer and method) and
the fidelity-against-saving points of every candidate and attempt; then the choices.
"""

from __future__ import annotations

import base64
import html
import io as _io
import logging
import warnings
from pathlib import Path

import onnx_ir as ir

from onnxshrink import metrics
from onnxshrink.report import Report, format_options, human
from onnxshrink.text import printable

__all__ = ["write_report", "figures"]

logger = logging.getLogger(__name__)

_STYLE = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:1em 0}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
td:first-child,th:first-child{text-align:left}.applied{color:#070}.rolled-back{color:#b00}.unchanged{color:#888}
img{max-width:100%;border:1px solid #eee;margin:0.5em 0}.note{color:#666}"""


def _layer_rows(before: ir.Model, after: ir.Model, shapes) -> list[tuple[str, int, int, int, int]]:
    """(layer, MACs before, after, params before, after) for layers with MACs, renamed parts
    (``name.tucker_in``, ``name.lowrank0``...) summed into their layer."""
    b = {
        x.name: x
        for x in metrics.model_stats(before, input_shapes=shapes, with_bytes=False).layers
        if x.macs
    }
    a = [
        x
        for x in metrics.model_stats(after, input_shapes=shapes, with_bytes=False).layers
        if x.macs or x.params
    ]
    rows = []
    for name, x in b.items():
        parts = [y for y in a if y.name == name or y.name.startswith(name + ".")]
        rows.append(
            (
                name,
                x.macs or 0,
                sum(y.macs or 0 for y in parts),
                x.params,
                sum(y.params for y in parts),
            )
        )
    return rows


def figures(report: Report, before: ir.Model, after: ir.Model, shapes) -> dict[str, bytes]:
    """PNG figures by name (empty without matplotlib). Layer names are text: mathtext off, so a
    name like ``conv$\\frac{$`` is drawn as it is instead of breaking the page."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return {}
    with matplotlib.rc_context({"text.parse_math": False}), warnings.catch_warnings():
        warnings.simplefilter(
            "ignore"
        )  # e.g. a glyph missing from the font: not the user's concern
        return _figures(plt, report, before, after, shapes)


def _figures(plt, report: Report, before: ir.Model, after: ir.Model, shapes) -> dict[str, bytes]:
    out = {}

    def png(fig) -> bytes:
        buf = _io.BytesIO()
        fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
        plt.close(fig)
        return buf.getvalue()

    rows = sorted(_layer_rows(before, after, shapes), key=lambda r: -r[1])[:40]
    if rows:
        fig, axes = plt.subplots(1, 2, figsize=(12, 0.28 * len(rows) + 1.5), sharey=True)
        y = range(len(rows))
        labels = [printable(r[0])[-40:] for r in rows]
        for ax, (i, j), what in ((axes[0], (1, 2), "MACs"), (axes[1], (3, 4), "params")):
            ax.barh([k + 0.2 for k in y], [r[i] for r in rows], 0.4, label="before", color="#9ab")
            ax.barh([k - 0.2 for k in y], [r[j] for r in rows], 0.4, label="after", color="#c53")
            ax.set_xlabel(what)
            ax.legend(loc="lower right")
        axes[0].set_yticks(list(y), labels, fontsize=7)
        axes[0].invert_yaxis()
        fig.suptitle("per layer, before and after (largest 40 by MACs)")
        out["layers"] = png(fig)
    t = report.target
    if t and t.get("candidates"):
        out.update(_target_charts(plt, png, t))
    return out


def _short(name: str, n: int = 28) -> str:
    """Its start and its end: layer names share long middles (``/5/body/body.1/…/Conv``)."""
    return name if len(name) <= n else name[:10] + "…" + name[-(n - 11) :]


def _symlog(ax) -> None:
    """A symmetric log y axis with plain tick labels (mathtext is off for layer names)."""
    from matplotlib.ticker import FuncFormatter

    ax.set_yscale("symlog", linthresh=1e-4)
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))


_LEVEL = {"prune": "ratio of channels removed", "tucker": "speed-up", "lowrank": "speed-up"}
_COLORS = {"prune": "#c53", "tucker": "#36a", "lowrank": "#3a6", "quantize": "#a3a"}


def _target_charts(plt, png, t: dict) -> dict[str, str]:
    """Sensitivity, one panel per method (prune ratios and speed-ups are different scales), its
    six most sensitive layers each; candidates as drop against saving -- for time, the share of
    the model's profiled time, as the profile's milliseconds are not the deployed latency."""
    out = {}
    cands = [c for c in t["candidates"] if c["applied"]]
    methods = [m for m in _LEVEL if any(c["method"] == m for c in cands)]
    if methods:
        fig, axes = plt.subplots(1, len(methods), figsize=(4.5 * len(methods), 4), squeeze=False)
        for ax, method in zip(axes[0], methods):
            curves: dict[str, list] = {}
            for c in cands:
                if c["method"] == method:
                    curves.setdefault(c["layer"], []).append((c["level"], c["drop"]))
            for layer, pts in sorted(curves.items(), key=lambda kv: -max(d for _, d in kv[1]))[:6]:
                pts.sort()
                xs, ys = [p[0] for p in pts], [p[1] for p in pts]
                ax.plot(xs, ys, marker="o", label=_short(printable(layer)))
            ax.set_title(method)
            ax.set_xlabel(_LEVEL[method])
            _symlog(ax)
            ax.legend(fontsize=6)
        axes[0][0].set_ylabel("drop (1 − cosine) on calibration data")
        fig.suptitle("sensitivity: the most sensitive layers of each method")
        out["sensitivity"] = png(fig)
    kind = t["target"].split("=")[0]
    key = {"macs": "macs_saved", "size": "bytes_saved"}.get(kind, "ms_saved")
    scale = {"ms_saved": max(t.get("base_ms_profiled") or 0.0, 1e-9)}.get(key, 1.0)
    fig, ax = plt.subplots(figsize=(8, 5))
    for method, color in _COLORS.items():
        pts = [(c[key] / scale, c["drop"]) for c in cands if c["method"] == method]
        if pts:
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=14, color=color, label=method)
    what = "share of the profiled time saved" if key == "ms_saved" else key.replace("_", " ")
    ax.set_xlabel(what + " (one candidate alone)")
    ax.set_ylabel("drop on calibration data")
    _symlog(ax)
    ax.set_title("candidates tried: fidelity against saving")
    ax.legend()
    out["candidates"] = png(fig)
    attempts = t.get("attempts", [])
    if attempts:
        fig, ax = plt.subplots(figsize=(6, 4))
        xs = [a["reached"].get(kind, a["reached"].get("macs")) for a in attempts]
        ax.plot(xs, [a["drop"] for a in attempts], marker="o")
        for i, (x, a) in enumerate(zip(xs, attempts)):  # labels fanned out: points overlap
            offset = (4 + 10 * (i % 3), 4 + 8 * (i % 4))
            ax.annotate(str(i + 1), (x, a["drop"]), xytext=offset, textcoords="offset points")
        ax.axhline(t["max_drop"], color="#b00", ls="--", label="max drop")
        ax.set_xlabel(f"{kind} reached")
        ax.set_ylabel("drop on held-out data")
        ax.set_title("attempts (back-off until the budget holds)")
        ax.legend()
        out["attempts"] = png(fig)
    return out


def _table(headers: list[str], rows: list[list[str]], classes: list[str] | None = None) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join(
        f"<tr class='{(classes or [''] * len(rows))[i]}'>"
        + "".join(f"<td>{html.escape(str(c))}</td>" for c in r)
        + "</tr>"
        for i, r in enumerate(rows)
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def render(report: Report, figs: dict[str, bytes], layer_rows) -> str:
    parts = [
        f"<h1>onnxshrink report</h1><p>{html.escape(report.model)} → "
        f"{html.escape(report.output or '(in memory)')}"
        f"<br><span class='note'>data: {html.escape(report.data)}</span></p>"
    ]
    tot = [
        [
            k,
            human(report.before.get(k)),
            human(report.after.get(k)),
            f"{report.after[k] / report.before[k]:.3f}×"
            if report.before.get(k) and report.after.get(k)
            else "",
        ]
        for k in ("params", "macs", "bytes")
    ]
    parts.append(_table(["", "before", "after", "ratio"], tot))
    rows, classes = [], []
    for p in report.passes:
        f = p.fidelity
        rows.append(
            [
                p.name + (f" ({format_options(p.options)})" if p.options else ""),
                p.status,
                len(p.changed),
                len(p.skipped),
                f"{p.seconds + p.validate_seconds:.2f}",
                f"{f.cosine:.6f}" if f else "",
                f"{f.top1_agreement:.1%}" if f and f.top1_agreement is not None else "",
                p.reason or "",
            ]
        )
        classes.append(p.status)
    parts.append(
        "<h2>Passes</h2>"
        + _table(
            ["pass", "status", "changed", "skipped", "seconds", "cosine", "top-1", "reason"],
            rows,
            classes,
        )
    )
    if report.target:
        t = report.target
        r = ", ".join(f"{k} {v:.3f}" for k, v in t.get("reached", {}).items())
        parts.append(
            f"<h2>Target {html.escape(t['target'])}: {'met' if t.get('met') else 'not met'}</h2>"
            f"<p>reached {html.escape(r)}; drop {t['drop']:.2%} (budget {t['max_drop']:.2%})</p>"
        )
        if not t.get("met") and t.get("coarse"):
            parts.append(f"<p>{html.escape(t['coarse'])}</p>")
        parts.append(
            _table(
                ["layer", "method", "level", "drop (alone)"],
                [
                    [c["layer"] or "(model)", c["method"], f"{c['level']:g}", f"{c['drop']:.5f}"]
                    for c in t.get("choices", [])
                ],
            )
        )
    captions = {
        "layers": "Per-layer MACs and params",
        "sensitivity": "Sensitivity curves",
        "candidates": "Candidates tried",
        "attempts": "Attempts",
    }
    for name, data in figs.items():
        b64 = base64.b64encode(data).decode()
        parts.append(
            f"<h2>{captions.get(name, name)}</h2><img alt='{name}' "
            f"src='data:image/png;base64,{b64}'>"
        )
    if not figs:
        parts.append(
            "<p class='note'>plots need matplotlib (pip install 'onnxshrink[report]'); the "
            "per-layer table follows</p>"
        )
        parts.append(
            _table(
                ["layer", "MACs before", "MACs after", "params before", "params after"],
                [[n, human(a), human(b), human(c), human(d)] for n, a, b, c, d in layer_rows],
            )
        )
    for w in report.warnings:
        parts.append(f"<p class='note'>warning: {html.escape(w)}</p>")
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>onnxshrink "
        f"report</title><style>{_STYLE}</style>"
        f"</head><body>{''.join(parts)}</body></html>\n"
    )


def write_report(
    report: Report,
    before: ir.Model,
    after: ir.Model,
    path: Path,
    shapes=None,
    png_dir: Path | None = None,
) -> dict[str, bytes]:
    from onnxshrink.atomic import atomic_text

    figs = figures(report, before, after, shapes)
    rows = [] if figs else _layer_rows(before, after, shapes)
    atomic_text(path, render(report, figs, rows))
    if png_dir is not None:
        png_dir.mkdir(parents=True, exist_ok=True)
        for name, data in figs.items():
            (png_dir / f"{name}.png").write_bytes(data)
    return figs

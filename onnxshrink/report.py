"""The report: what each pass did, what it refused and why, and what it cost in fidelity.

Its JSON form (``--report FILE.json``) is a contract (DESIGN.md): ``before`` and ``after`` with
``params``, ``macs``, ``bytes``; ``passes`` as a list of ``{name, options, status, seconds,
changed, skipped: [{node, reason}], fidelity}``; ``fidelity`` of the final output against the
original. Extra keys may be added; these never change meaning.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from onnxshrink.text import literal

__all__ = ["Fidelity", "Skip", "PassRecord", "Report", "human"]


@dataclasses.dataclass
class Fidelity:
    """Agreement of a model's outputs with a reference on the validation data.

    ``cosine``: mean over samples (and outputs) of the cosine similarity of the flattened
    sample outputs; ``cosine_min`` the worst sample. ``max_abs``: largest absolute difference;
    ``rel_max_abs`` the same divided by the largest reference magnitude. ``top1_agreement``:
    share of samples whose arg-max over the last axis agrees, for classifier-like outputs
    (rank 2, float, at least 2 classes), else None. ``metric``: the user's task metric.
    """

    cosine: float
    cosine_min: float
    max_abs: float
    rel_max_abs: float
    top1_agreement: float | None
    samples: int
    metric: float | None = None  # the user's task metric (onnxshrink.task), when given

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Skip:
    node: str
    reason: str


@dataclasses.dataclass
class PassRecord:
    name: str
    options: dict[str, Any]
    status: str = "pending"  # applied (``partial``: in part) | unchanged | rolled-back
    seconds: float = 0.0
    validate_seconds: float = 0.0
    changed: list[str] = dataclasses.field(default_factory=list)
    skipped: list[Skip] = dataclasses.field(default_factory=list)
    fidelity: Fidelity | None = None  # against the original model
    fidelity_step: Fidelity | None = None  # against the model before this pass
    reason: str | None = None  # why it was rolled back
    stats: dict[str, int | None] | None = None  # params / macs / bytes after the pass
    details: dict[str, Any] = dataclasses.field(default_factory=dict)
    # integer kernels (an optimized session on this CPU) against the model as written
    kernels: dict[str, Any] | None = None
    traceback: str | None = None  # where a pass that raised did (shown with --verbose)
    # applied partly (onnxshrink.degrade): layers applied / compressed by the full pass, kept back
    partial: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        d = {
            "name": self.name,
            "options": self.options,
            "status": self.status,
            "seconds": round(self.seconds, 4),
            "validate_seconds": round(self.validate_seconds, 4),
            "changed": self.changed,
            "skipped": [dataclasses.asdict(s) for s in self.skipped],
            "fidelity": self.fidelity.to_dict() if self.fidelity else None,
            "fidelity_step": self.fidelity_step.to_dict() if self.fidelity_step else None,
            "reason": self.reason,
            "stats": self.stats,
        }
        if self.details:
            d["details"] = self.details
        if self.kernels:
            d["kernels"] = self.kernels
        if self.traceback:
            d["traceback"] = self.traceback
        if self.partial:
            d["partial"] = self.partial
        return d


@dataclasses.dataclass
class Report:
    model: str
    data: str
    before: dict[str, int | None] = dataclasses.field(default_factory=dict)
    after: dict[str, int | None] = dataclasses.field(default_factory=dict)
    passes: list[PassRecord] = dataclasses.field(default_factory=list)
    fidelity: Fidelity | None = None
    warnings: list[str] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    output: str | None = None
    target: dict[str, Any] | None = None  # what --target searched, chose and reached

    @property
    def _has_metric(self) -> bool:
        return any(p.fidelity and p.fidelity.metric is not None for p in self.passes)

    @property
    def rolled_back(self) -> list[PassRecord]:
        return [p for p in self.passes if p.status == "rolled-back"]

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "output": self.output,
            "data": self.data,
            "before": self.before,
            "after": self.after,
            "passes": [p.to_dict() for p in self.passes],
            "fidelity": self.fidelity.to_dict() if self.fidelity else None,
            "warnings": self.warnings,
            "notes": self.notes,
            "target": self.target,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=_jsonable)

    def write_json(self, path: str | Path) -> None:
        from onnxshrink.atomic import atomic_text

        atomic_text(Path(path), self.to_json() + "\n")

    # -- rendering ---------------------------------------------------------------------------
    def render(self, console, *, verbose: bool = False) -> None:
        """Prints the summary: totals before -> after, then one row per pass."""
        from rich.table import Table

        console.print(
            f"[bold]{literal(self.model)}[/] -> {literal(self.output or '(in memory)')}  "
            f"[dim](data: {literal(self.data)})[/]"
        )
        totals = Table(box=None)
        totals.add_column("", style="bold")
        for col in ("before", "after", "ratio"):
            totals.add_column(col, justify="right")
        for key in ("params", "macs", "bytes"):
            b, a = self.before.get(key), self.after.get(key)
            totals.add_row("MACs" if key == "macs" else key, human(b), human(a), _ratio(a, b))
        console.print(totals)

        table = Table(box=None, title_justify="left", show_edge=False)
        for col, just in (
            ("pass", "left"),
            ("status", "left"),
            ("changed", "right"),
            ("skipped", "right"),
            ("seconds", "right"),
            ("cosine", "right"),
            ("max |Δ|", "right"),
            ("top-1", "right"),
            *([("metric", "right")] if self._has_metric else []),
        ):
            table.add_column(col, justify=just)
        for p in self.passes:
            style = {"applied": "green", "unchanged": "dim", "rolled-back": "red"}.get(p.status, "")
            status = p.status
            if p.partial:
                style, status = "yellow", f"partly ({p.partial['applied']}/{p.partial['layers']})"
            f = p.fidelity
            table.add_row(
                literal(p.name + (f" ({format_options(p.options)})" if p.options else "")),
                f"[{style}]{status}[/]",
                str(len(p.changed)),
                str(len(p.skipped)),
                f"{p.seconds + p.validate_seconds:.2f}",
                f"{f.cosine:.6f}" if f else "",
                f"{f.max_abs:.2e}" if f else "",
                f"{f.top1_agreement:.1%}" if f and f.top1_agreement is not None else "",
                *(
                    [f"{f.metric:.4f}" if f and f.metric is not None else ""]
                    if self._has_metric
                    else []
                ),
            )
        console.print(table)
        for p in self.passes:
            if p.status == "rolled-back":
                console.print(f"[red]rolled back[/] {literal(p.name)}: {literal(p.reason)}")
                for line in (p.traceback or "").splitlines() if verbose else ():
                    console.print(f"[dim]{literal(line)}[/]")
            elif p.partial:
                _render_partial(console, p, verbose, self.before)
            if p.kernels and p.status != "rolled-back":
                original = p.kernels.get("cosine_with_original")
                console.print(
                    f"  [dim]{literal(p.name)}: cosine {p.kernels['cosine']:.6f} between the model "
                    f"as written and an optimized session on {literal(p.kernels['cpu'])}"
                    + (f" ({original:.6f} with the original)" if original is not None else "")
                    + "[/]"
                )
            if verbose:
                for s in p.skipped:
                    console.print(
                        f"  [dim]{literal(p.name)} skipped {literal(s.node)}: "
                        f"{literal(s.reason)}[/]"
                    )
            else:
                _render_reasons(console, p)
        if self.target:
            self._render_target(console, verbose)
        for n in self.notes:
            console.print(f"[dim]note: {literal(n)}[/]")
        for w in self.warnings:
            console.print(f"[yellow]warning:[/] {literal(w)}")

    def _render_target(self, console, verbose: bool) -> None:
        t = self.target
        r = t.get("reached", {})
        shown = ", ".join(f"{k} {v:.3f}" for k, v in r.items() if k in ("speedup", "macs", "size"))
        verdict = "[green]met[/]" if t.get("met") else "[yellow]not met[/]"
        console.print(
            f"target {literal(t['target'])}: {verdict} — reached {shown}; drop {t['drop']:.2%} "
            f"(budget {t['max_drop']:.2%}); {len(t.get('choices', []))} layer choice(s), "
            f"{len(t.get('candidates', []))} candidates measured, {len(t.get('attempts', []))} "
            f"attempt(s) in {t.get('seconds', 0):.0f} s"
        )
        if t.get("reconstruct"):
            console.print("[dim]each attempt's structural passes finished with reconstruct[/]")
        if t.get("stopped"):
            console.print(f"[yellow]stopped early ({literal(t['stopped'])}); the best so far[/]")
        if not t.get("met"):
            console.print(
                "[yellow]the target cannot be met within the fidelity budget; the result is the "
                "most compression that kept it[/]"
            )
            if t.get("coarse"):
                console.print(f"[yellow]{literal(t['coarse'])}[/]")
        if verbose:
            for c in t.get("choices", []):
                console.print(
                    f"  [dim]{c['method']} {literal(c['layer'] or '(model)')} @ {c['level']:g}: "
                    f"drop {c['drop']:.4f}[/]"
                )


def _render_partial(console, p: PassRecord, verbose: bool, before: dict, shown: int = 4) -> None:
    """``prune applied to 21 of 30 layers; kept back 9 whose damage broke the floor ...``, and
    the MACs reached against what the whole pass would have reached."""
    a = p.partial
    kept = a["kept"] if verbose else a["kept"][:shown]
    more = "" if len(kept) == len(a["kept"]) else f", … ({len(a['kept'])}; --verbose lists them)"
    console.print(
        f"[yellow]applied partly[/] {literal(p.name)}: to {a['applied']} of {a['layers']} layers; "
        f"kept back {len(a['kept'])} whose damage broke the floor (the whole pass: "
        f"{literal(a['whole'])}; {a['tries']} tries): {literal(', '.join(kept))}{more}"
    )
    now, whole = (p.stats or {}).get("macs"), a.get("whole_macs")
    if now and whole and before.get("macs"):
        console.print(
            f"  [dim]{literal(p.name)}: MACs {_ratio(now, before['macs'])} of the input's (the "
            f"whole pass: {_ratio(whole, before['macs'])})[/]"
        )


def _render_reasons(console, p: PassRecord, shown: int = 3) -> None:
    """The most frequent reasons ``p`` skipped nodes for, one line each, with the node count
    (``--verbose`` lists every node): a count alone does not tell a user what to do."""
    reasons = collections.Counter(s.reason for s in p.skipped).most_common()
    for reason, n in reasons[:shown]:
        node = next(s.node for s in p.skipped if s.reason == reason)
        what = literal(node) if n == 1 else f"{n} nodes"
        console.print(f"  [dim]{literal(p.name)} skipped {what}: {literal(reason)}[/]")
    if len(reasons) > shown:
        rest, kinds = sum(n for _, n in reasons[shown:]), len(reasons) - shown
        console.print(
            f"  [dim]{literal(p.name)} skipped {rest} more node(s) for {kinds} other reason(s): "
            f"--verbose lists them[/]"
        )


def format_options(options: dict[str, Any], items: int = 2) -> str:
    """``ratio=0.5,only=conv1+conv2+… (12)``: lists joined as on the command line, long ones cut
    to their first ``items`` and their length."""

    def value(v: Any) -> str:
        if not isinstance(v, (list, tuple)):
            return str(v).lower() if isinstance(v, bool) else str(v)
        shown = "+".join(map(str, v[:items]))
        return shown + (f"+… ({len(v)})" if len(v) > items else "")

    return ",".join(f"{k}={value(v)}" for k, v in options.items())


def _ratio(after: int | None, before: int | None) -> str:
    if not after or not before:
        return "" if after is None or before is None else "-"
    return f"{after / before:.3f}×"


def human(n: int | float | None) -> str:
    """1234567 -> '1.23M'."""
    if n is None:
        return "?"
    n = float(n)
    if abs(n) < 1000:
        return f"{n:.0f}"
    exp = min(int(math.log10(abs(n)) // 3), 4)
    return f"{n / 10 ** (3 * exp):.2f}{' KMGT'[exp]}"


def _jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return dataclasses.asdict(obj)
    if isinstance(obj, (set, tuple)):
        return list(obj)
    if hasattr(obj, "item"):
        return obj.item()
    return str(obj)

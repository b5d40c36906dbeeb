"""What each ``onnxshrink`` subcommand does with its parsed arguments (the parser is in
:mod:`onnxshrink.cli`). Heavy modules are imported inside the commands so ``--help`` starts fast.
"""

from __future__ import annotations

import json
import sys

__all__ = ["COMMANDS"]


def _images(args):
    from onnxshrink.data import ImageOptions

    return ImageOptions(
        image_size=args.image_size, mean=args.mean, std=args.std, layout=args.layout
    )


def _consoles(args):
    from rich.console import Console

    # names are the model author's: no emoji codes (":x:"), no highlighting, no markup from them
    out = Console(
        soft_wrap=False, width=None if sys.stdout.isatty() else 120, emoji=False, highlight=False
    )
    err = Console(stderr=True, emoji=False, highlight=False)
    return out, err


def cmd_compress(args) -> int:
    from onnxshrink.api import compress
    from onnxshrink.text import literal

    out, err = _consoles(args)
    _, report = compress(
        args.model,
        passes=args.passes,
        data=args.data,
        output=args.output,
        strict=args.strict,
        images=_images(args),
        validate_samples=args.validate_samples,
        holdout=args.holdout,
        progress=not args.quiet and err.is_terminal,
        console=err,
        target=args.target,
        max_drop=args.max_drop,
        time_budget=args.time_budget,
        reconstruct={"auto": None, "on": True, "off": False}[args.reconstruct],
        report_html=args.report_html,
        report_json=args.report,
        metric=args.metric,
    )
    if not args.quiet:
        report.render(out, verbose=args.verbose)
        out.print(f"wrote {literal(args.output)}")
    return 0


def cmd_inspect(args) -> int:
    from onnxshrink import io, metrics
    from onnxshrink.report import human
    from onnxshrink.text import literal

    loaded = io.load(args.model)
    shapes = None
    if args.data:
        from onnxshrink.data import input_specs, load_data

        shapes = load_data(args.data, input_specs(loaded.model)).input_shapes()
    stats = metrics.model_stats(loaded.model, input_shapes=shapes, with_bytes=False)
    stats.bytes = io.file_bytes(args.model)
    layers = [lay for lay in stats.layers if args.all or lay.params or lay.macs or lay.macs is None]
    int8 = _int8_summary(loaded.model)
    if args.json:
        print(
            json.dumps(
                {
                    "model": args.model,
                    "params": stats.params,
                    "macs": stats.macs,
                    "bytes": stats.bytes,
                    "macs_unknown": stats.macs_unknown,
                    "layers": [lay.__dict__ for lay in layers],
                    "int8": int8,
                },
                indent=2,
            )
        )
        return 0
    from rich.table import Table

    out, _ = _consoles(args)
    table = Table(title=literal(args.model), title_justify="left", box=None)
    for col, just in (
        ("node", "left"),
        ("op", "left"),
        ("output shape", "left"),
        ("params", "right"),
        ("MACs", "right"),
        ("% MACs", "right"),
    ):
        table.add_column(col, justify=just)
    for lay in layers:
        share = f"{100 * lay.macs / stats.macs:.1f}" if lay.macs and stats.macs else ""
        shape = "×".join(map(str, lay.output_shape)) if lay.output_shape is not None else "?"
        table.add_row(
            literal(lay.name),
            literal(lay.op_type),
            shape,
            human(lay.params) if lay.params else "",
            human(lay.macs) if lay.macs else ("?" if lay.macs is None else ""),
            share,
        )
    out.print(table)
    out.print(
        f"[bold]total[/]: {human(stats.params)} params, {human(stats.macs)} MACs, "
        f"{human(stats.bytes)}B on disk, {len(loaded.model.graph)} nodes"
    )
    if stats.macs_unknown:
        out.print(
            f"[yellow]{len(stats.macs_unknown)} node(s) with dynamic shapes not counted[/]"
            + ("" if args.data else " (give --data to take the shapes from data)")
        )
    if int8["layers"]:
        unsafe = int8["unsafe_layers"]
        verdict = (
            f"[yellow]{len(unsafe)} break the pair rule |w_a + w_b| <= 128: their integer kernels "
            "saturate on CPUs without VNNI[/]"
            if unsafe
            else "saturation-safe on every x86 CPU"
        )
        out.print(f"int8: {int8['layers']} layers with int8 weights, {verdict}")
        out.print(f"[dim]CPU: {literal(int8['cpu'])}[/]")
    return 0


def _int8_summary(model) -> dict:
    """Layers with int8 weights, those that break the pair rule, and this CPU's int8 kernels."""
    from onnxshrink.analysis.saturation import int8_layers, unsafe_layers
    from onnxshrink.cpu import this_cpu

    return {
        "layers": len(int8_layers(model)),
        "unsafe_layers": unsafe_layers(model),
        "cpu": this_cpu().summary(),
    }


def cmd_compare(args) -> int:
    from onnxshrink.compare import compare_models

    result = compare_models(
        args.a, args.b, data=args.data, images=_images(args), runs=args.runs, threads=args.threads
    )
    if args.layers:
        from onnxshrink.compare import layer_drift

        result["layers"] = layer_drift(args.a, args.b, data=args.data, images=_images(args))
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    out, _ = _consoles(args)
    from onnxshrink.compare import render, render_drift

    render(result, out)
    if args.layers:
        render_drift(result["layers"], out)
    return 0


def cmd_passes(args) -> int:
    from onnxshrink.catalog import load

    rows = load()  # no pass imported: listing starts like --help
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return 0
    out, _ = _consoles(args)
    for r in rows:
        tag = ", default" if r["default"] else ""
        out.print(
            f"[bold]{r['name']}[/] ({r['kind']}{', needs data' if r['data'] else ''}{tag}): "
            f"{r['description']}"
        )
        for o in r["options"]:
            out.print(f"    {o['name']} = {o['default']!r}  [dim]({o['type']})[/]")
    return 0


COMMANDS = {
    "compress": cmd_compress,
    "inspect": cmd_inspect,
    "compare": cmd_compare,
    "passes": cmd_passes,
}

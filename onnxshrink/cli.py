"""The ``onnxshrink`` command: compress, inspect, compare, passes.

Exit codes: 0 success; 2 bad usage or bad input (one line on stderr); 1 a pass failed validation
under ``--strict``; 3 an internal error (a bug: the line says so; ``--verbose`` shows the
traceback). Heavy modules are imported inside the commands so ``--help`` starts fast.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

__all__ = ["main"]

EPILOG = (
    "Docs: README.md and docs/usage.md. Pass specs: NAME[:KEY=VALUE[,KEY=VALUE]...]; "
    "see `onnxshrink passes`."
)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit code 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"error: {message} (see '{self.prog} --help')\n")


def _parser() -> argparse.ArgumentParser:
    from onnxshrink import __version__

    p = _Parser(
        prog="onnxshrink",
        description="Make trained ONNX models smaller and faster, with no retraining.",
        epilog=EPILOG,
    )
    p.add_argument("--version", action="version", version=f"onnxshrink {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    c = sub.add_parser(
        "compress", help="apply passes, validate each with onnxruntime, write the result"
    )
    c.add_argument("model", metavar="MODEL", help="input .onnx file (never modified)")
    c.add_argument(
        "-o",
        "--output",
        required=True,
        metavar="OUT",
        help="output .onnx file (written atomically)",
    )
    c.add_argument(
        "-p",
        "--pass",
        dest="passes",
        action="append",
        metavar="SPEC",
        help="a pass to run, e.g. -p fold-batchnorm or -p prune:ratio=0.3 (repeatable; "
        "default: the exact passes simplify, fold-batchnorm)",
    )
    _data_args(c)
    c.add_argument("--report", metavar="FILE.json", help="write the full report as JSON")
    c.add_argument(
        "--report-html",
        metavar="FILE.html",
        help="write a self-contained HTML report "
        "(plots need matplotlib: pip install 'onnxshrink[report]')",
    )
    c.add_argument(
        "--target",
        metavar="KIND=X",
        help="compress to a target: speedup=2, macs=0.5, size=0.25 or latency-ms=5 "
        "(after the -p passes; "
        "per-layer choices from measured sensitivity)",
    )
    c.add_argument(
        "--max-drop",
        type=float,
        default=0.01,
        metavar="F",
        help="with --target: largest loss of top-1 agreement (cosine for non-classifiers) on the "
        "held-out data (default 0.01)",
    )
    c.add_argument(
        "--time-budget",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="with --target: the whole run ends within about this many seconds, with the best "
        "result found by then (default 300)",
    )
    c.add_argument(
        "--reconstruct",
        choices=("auto", "on", "off"),
        default="auto",
        help="with --target: finish each attempt's pruning / decomposition with the reconstruct "
        "pass (default auto: when PyTorch is installed, pip install 'onnxshrink[reconstruct]')",
    )
    c.add_argument(
        "--metric",
        metavar="MODULE:FUNCTION",
        help="your task metric, f(reference_outputs, outputs) -> [0, 1] (1: as good), judged "
        "instead of the cosine against each pass's floor and in --max-drop (MODULE may be a "
        "FILE.py)",
    )
    c.add_argument("--strict", action="store_true", help="fail (exit 1) when a pass is rolled back")
    c.add_argument(
        "--validate-samples",
        type=int,
        default=64,
        metavar="N",
        help="validate on at most N samples (default 64)",
    )
    c.add_argument(
        "--holdout",
        type=float,
        default=0.25,
        metavar="F",
        help="share of real data (its last samples) held out of calibration and used "
        "for validation (default 0.25; 0: validate on the calibration data)",
    )
    _common(c)

    i = sub.add_parser("inspect", help="per-layer table: op, output shape, params, MACs; totals")
    i.add_argument("model", metavar="MODEL")
    i.add_argument("--json", action="store_true", help="print JSON instead of a table")
    i.add_argument(
        "--all", action="store_true", help="list every node, not only layers with params or MACs"
    )
    i.add_argument(
        "--data",
        metavar="DATA",
        help="take dynamic dims (other than the batch) from this data, e.g. a sequence length "
        "(.npz / .npy; one sample)",
    )
    _common(i)

    m = sub.add_parser("compare", help="fidelity of B against A, and B's latency relative to A")
    m.add_argument("a", metavar="A", help="reference model (e.g. the original)")
    m.add_argument("b", metavar="B", help="model to compare (e.g. the compressed one)")
    _data_args(m)
    m.add_argument(
        "--runs", type=_positive, default=30, help="timed runs per model (median; default 30)"
    )
    m.add_argument(
        "--threads", type=_positive, default=1, help="onnxruntime intra-op threads (default 1)"
    )
    m.add_argument(
        "--layers",
        action="store_true",
        help="also compare every intermediate tensor both models name alike: where B drifts",
    )
    m.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _common(m)

    s = sub.add_parser("passes", help="list every pass with its options and defaults")
    s.add_argument("--json", action="store_true")
    _common(s)
    return p


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got '{text}'")
    return value


def _data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data",
        metavar="DATA",
        help="calibration/validation data: .npz (keys = input names), .npy, an image "
        "folder, or random:N (default random:8)",
    )
    p.add_argument(
        "--image-size",
        type=int,
        metavar="N",
        help="image folder: crop size (default: from the model)",
    )
    p.add_argument("--mean", help="image folder: per-channel mean on the 0..1 scale (default 0)")
    p.add_argument("--std", help="image folder: per-channel std on the 0..1 scale (default 1)")
    p.add_argument(
        "--layout", choices=("NCHW", "NHWC"), help="image folder: layout (default: from the model)"
    )


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars, no summary")
    p.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="list every skipped node with its reason; tracebacks on errors",
    )


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("onnx_ir").setLevel(logging.WARNING)
    from onnxshrink.errors import OnnxShrinkError, first_line
    from onnxshrink.text import printable

    try:
        from onnxshrink.commands import COMMANDS

        return COMMANDS[args.command](args)
    except OnnxShrinkError as e:
        if args.verbose:
            import traceback

            traceback.print_exc()
        print(f"error: {printable(e)}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("error: interrupted; nothing was written", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `onnxshrink inspect --json | head`: the reader has all it wanted
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # no second error when Python flushes stdout at exit
        return 0
    except Exception as e:  # a bug: still one line unless --verbose
        if args.verbose:
            import traceback

            traceback.print_exc()
        print(
            f"error: internal error ({type(e).__name__}: {printable(first_line(e, empty=''))}); "
            "rerun "
            "with --verbose and please report it",
            file=sys.stderr,
        )
        return 3


if __name__ == "__main__":
    sys.exit(main())

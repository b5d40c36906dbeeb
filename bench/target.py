"""Compress to a target on MobileNetV2 (ImageNet weights): ``--target speedup=1.5 --max-drop 0.02``
on the calibration photos; the result's latency against the original in the same run (1 and 2
threads) and its top-1 agreement on the evaluation photos (never used for calibration), with the
per-layer choices.

    python bench/target.py [--target speedup=1.5] [--max-drop 0.02]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from common import agreement, latency_ratios, mobilenet, outputs, stats

import onnxshrink


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", default="speedup=1.5")
    ap.add_argument("--max-drop", type=float, default=0.02)
    args = ap.parse_args()
    _, folded, calib, evaluation = mobilenet()
    x = np.load(evaluation)["input"]
    ref = outputs(folded, x)
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "target.onnx"
        t0 = time.perf_counter()
        _, rep = onnxshrink.compress(
            str(folded),
            data=str(calib),
            output=out,
            target=args.target,
            max_drop=args.max_drop,
            progress=True,
        )
        seconds = time.perf_counter() - t0
        t = rep.target
        top1, cos = agreement(ref, outputs(out, x))
        lat = latency_ratios(folded, {"result": out}, x[:1], runs=40)
        base, now = stats(folded), stats(onnx.load(str(out)))
        print(
            f"MobileNetV2 --target {args.target} --max-drop {args.max_drop}: "
            f"{'met' if t['met'] else 'NOT met'} "
            f"in {seconds:.0f} s ({len(t['candidates'])} candidates, {len(t['attempts'])} attempts)"
        )
        print(
            f"  latency ratio {lat['result'][1]:.3f} (1 thread), {lat['result'][2]:.3f} (2 "
            "threads); "
            f"speed-up {1 / lat['result'][1]:.2f}× / {1 / lat['result'][2]:.2f}×"
        )
        print(
            f"  MACs {now.macs / base.macs:.3f}, bytes "
            f"{rep.after['bytes'] / rep.before['bytes']:.3f}"
        )
        print(
            f"  evaluation photos: top-1 agreement {top1:.3f}, cosine {cos:.4f}; "
            f"held-out calibration drop {t['drop']:.3f}"
        )
        print("  choices:")
        for c in t["choices"]:
            print(
                f"    {c['method']:<8} {c['layer'] or '(whole model)':<48} level {c['level']:<5g} "
                f"drop alone {c['drop']:.4f}"
            )
        for i, a in enumerate(t["attempts"], 1):
            print(f"  attempt {i}: drop {a['drop']:.3f}, reached {a['reached']}")


if __name__ == "__main__":
    main()

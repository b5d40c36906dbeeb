"""Block-wise reconstruction: what `reconstruct` adds after prune / tucker / lowrank.

For each model, method and MACs share: the method alone (its closed-form least-squares re-fit)
and the method followed by ``reconstruct``, side by side -- MACs ratio, latency ratio vs the
original measured in the same run (onnxruntime, full optimizations, 1 and 2 threads, median of
40 interleaved runs, batch 1), top-1 agreement and mean logit cosine with the original on the
*evaluation* photos (never calibrated on), and the seconds each compile took on this machine.
As ``compress`` does by default, the last quarter of the calibration crops (two photos) is
kept for validation and never fitted; reconstruct's own early stopping and choice of blocks
hold out every fifth sample of the rest. ``--int8``: ``quantize`` with and without
``reconstruct``, measured in an optimized session (the integer kernels). ``tucker`` has no
MACs target: ``speedup=1/f`` of the decomposed convs, and the MACs column says what the
whole model kept.

    python bench/reconstruct.py                                   # everything (hours on 2 cores)
    python bench/reconstruct.py --models mobilenet --methods prune --macs 0.85
"""

from __future__ import annotations

import argparse

import numpy as np
import onnx
from common import Timer, agreement, cpu_line, latency_ratios, mobilenet, outputs, stats

import onnxshrink

SPECS = {
    "prune": "prune:target-macs={f},floor=0",
    "tucker": "tucker:speedup={s:.3f},floor=0",
    "lowrank": "lowrank:target-macs={f},fused=false,floor=0",
}


def _models(names: list[str]):
    _, folded, calib, evaluation = mobilenet()
    x_eval = np.load(evaluation)["input"]
    if "mobilenet" in names:
        yield "MobileNetV2", onnx.load(str(folded)), calib, x_eval
    if "resnet" in names:
        from models import resnet

        res = onnxshrink.compress(resnet.build(), ["fold-batchnorm"])[0]
        yield "ResNet-18-style (random weights)", res, calib, x_eval


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["mobilenet", "resnet"])
    ap.add_argument("--methods", nargs="+", default=list(SPECS))
    ap.add_argument("--macs", type=float, nargs="+", default=[0.85, 0.70, 0.50])
    ap.add_argument("--reconstruct", default="reconstruct", help="the reconstruct pass spec")
    ap.add_argument("--int8", action="store_true", help="also quantize, with and without it")
    args = ap.parse_args()
    print(cpu_line())
    for title, original, calib, x_eval in _models(args.models):
        ref, base = outputs(original, x_eval), stats(original)
        rows, models = [], {}
        for method in args.methods:
            for f in args.macs:
                spec = SPECS[method].format(f=f, s=1 / f)
                for passes in ([spec], [spec, args.reconstruct]):
                    with Timer() as t:
                        out, rep = onnxshrink.compress(original, passes, data=str(calib))
                    key = " + ".join(p.split(":")[0] for p in passes) + f" @ {f}"
                    status = "/".join(p.status for p in rep.passes)
                    models[key] = out
                    rows.append((key, out, t.seconds, status))
                    print(f"  done: {key} ({t.seconds:.0f} s, {status})", flush=True)
        if args.int8:
            for passes in (["quantize"], ["quantize", args.reconstruct]):
                with Timer() as t:
                    out, rep = onnxshrink.compress(original, passes, data=str(calib))
                key = " + ".join(p.split(":")[0] for p in passes)
                models[key] = out
                rows.append((key, out, t.seconds, "/".join(p.status for p in rep.passes)))
        lat = latency_ratios(original, models, x_eval[:1])
        print(f"\n{title}: original {lat['__ms__'][1]:.2f} ms at 1 thread, "
              f"{lat['__ms__'][2]:.2f} ms at 2")  # fmt: skip
        print(f"{'passes':<34} {'MACs':>6} {'lat1':>6} {'lat2':>6} {'top-1':>6} {'cosine':>7} "
              f"{'sec':>5}  status")  # fmt: skip
        for key, out, sec, status in rows:
            # int8: what users run, the integer kernels of an optimized session
            top1, cos = agreement(ref, outputs(out, x_eval, optimize=key.startswith("quantize")))
            print(
                f"{key:<34} {stats(out).macs / base.macs:6.3f} {lat[key][1]:6.3f} "
                f"{lat[key][2]:6.3f} {top1:6.1%} {cos:7.4f} {sec:5.0f}  {status}"
            )


if __name__ == "__main__":
    main()

"""Structured pruning of MobileNetV2 (ImageNet weights): ours vs onnxsim, side by side.

For each ratio: MACs, params and bytes ratios; latency ratio vs the original measured in the
same run (onnxruntime, full optimizations, 1 and 2 threads, median of 40 interleaved runs,
batch 1); top-1 agreement and mean logit cosine with the original on the *evaluation* photos
(never the calibration ones). Ours for each criterion with and without least-squares re-fit,
uniform per-group ratio and global allocation at the same MACs (and at onnxsim's MACs);
onnxsim's ``apply_structured_pruning`` at the same sparsity as the anchor. All calibration photos
calibrate (``holdout=0``): fidelity is measured on the separate evaluation photos.

    python bench/prune.py                       # all ratios and criteria (~25 min on 2 cores)
    python bench/prune.py --ratios 0.1 --criteria hessian
"""

from __future__ import annotations

import argparse

import numpy as np
import onnx
from common import Timer, agreement, latency_ratios, mobilenet, outputs, stats

import onnxshrink


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.4])
    ap.add_argument("--criteria", nargs="+", default=["l1", "l2", "bn", "activation", "hessian"])
    ap.add_argument("--samples", type=int, default=128)
    args = ap.parse_args()

    bn_path, folded_path, calib, evaluation = mobilenet()
    x_eval = np.load(evaluation)["input"]
    original = onnx.load(str(folded_path))
    ref = outputs(original, x_eval)
    base = stats(original)
    x1 = x_eval[:1]
    print(
        f"MobileNetV2: {base.macs / 1e6:.1f} M MACs, {base.params / 1e6:.2f} M params; "
        f"evaluation: {len(x_eval)} crops of 9 photos; calibration: {calib.name}"
    )
    header = (
        f"{'ratio':>5} {'method':<38} {'MACs':>6} {'params':>6} {'bytes':>6} {'lat1':>6} "
        f"{'lat2':>6} {'top-1':>6} {'cosine':>7} {'sec':>5}"
    )
    for ratio in args.ratios:
        rows, models = [], {}
        for criterion in args.criteria:
            for refit in (False, True):
                src = bn_path if criterion == "bn" else folded_path
                passes = [
                    f"prune:ratio={ratio},criterion={criterion},refit={str(refit).lower()},floor=-1,samples={args.samples}"
                ]
                if criterion == "bn":
                    passes.append("fold-batchnorm")
                with Timer() as t:
                    out, rep = onnxshrink.compress(
                        onnx.load(str(src)), passes, data=str(calib), holdout=0
                    )
                key = f"ours {criterion}{' + refit' if refit else ''}"
                if (
                    rep.passes[0].status == "rolled-back"
                ):  # floor=-1 keeps any fidelity: only a failure
                    key += " [rolled back]"
                models[key] = out
                rows.append((key, out, t.seconds))
        anchor_macs = None
        for key, out, _ in rows:
            if key == "ours hessian + refit":
                anchor_macs = stats(out).macs / base.macs
        if anchor_macs is not None:
            with Timer() as t:
                out, rep = onnxshrink.compress(
                    original,
                    [
                        f"prune:target-macs={anchor_macs:.4f},criterion=hessian,floor=-1,samples={args.samples}"
                    ],
                    data=str(calib),
                    holdout=0,
                )
            rows.append(("ours hessian + refit, global", out, t.seconds))
            models["ours hessian + refit, global"] = out
        import onnxsim

        with Timer() as t:
            sim = onnxsim.apply_structured_pruning(onnx.load(str(folded_path)), sparsity=ratio)
        sim_time = t.seconds
        sim_macs = stats(sim).macs / base.macs
        with Timer() as t:  # ours at exactly onnxsim's MACs, for the equal-MACs comparison
            out, rep = onnxshrink.compress(
                original,
                [
                    f"prune:target-macs={sim_macs:.4f},criterion=hessian,floor=-1,samples={args.samples}"
                ],
                data=str(calib),
                holdout=0,
            )
        rows.append(("ours hessian + refit, global @ onnxsim", out, t.seconds))
        models["ours hessian + refit, global @ onnxsim"] = out
        rows.append(("onnxsim.apply_structured_pruning", sim, sim_time))
        models["onnxsim.apply_structured_pruning"] = sim
        lat = latency_ratios(original, models, x1)
        print(
            f"\nratio {ratio}  (original: {lat['__ms__'][1]:.2f} ms at 1 thread, "
            f"{lat['__ms__'][2]:.2f} ms at 2)"
        )
        print(header)
        for key, out, sec in rows:
            st = stats(out)
            top1, cos = agreement(ref, outputs(out, x_eval))
            print(
                f"{ratio:>5} {key:<38} {st.macs / base.macs:6.3f} {st.params / base.params:6.3f} "
                f"{st.bytes / base.bytes:6.3f} {lat[key][1]:6.3f} {lat[key][2]:6.3f} {top1:6.1%} "
                f"{cos:7.4f} {sec:5.0f}"
            )


if __name__ == "__main__":
    main()

"""Post-training distillation after lossy passes: the same compression with and without
``distill``, fidelity on data never used for calibration.

* MobileNetV2 (ImageNet weights; calibration photos, top-1 agreement and logit cosine on the
  evaluation photos): global pruning to 0.85 of the MACs with and without pruning's own re-fit,
  then ``distill``; ``lowrank`` (``target-macs=0.95``, plain form) then ``distill``.
* The digits CNN (test accuracy on the 400 held-out images): ``prune:ratio=0.6`` likewise.

    python bench/distill.py
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from common import agreement, mobilenet, outputs

import onnxshrink

ROOT = Path(__file__).resolve().parent.parent


def run(model, specs, calib) -> tuple[onnx.ModelProto, object]:
    return onnxshrink.compress(model, specs, data=str(calib), holdout=0, progress=False)


def main() -> None:
    _, folded, calib, evaluation = mobilenet()
    x = np.load(evaluation)["input"]
    original = onnx.load(str(folded))
    ref = outputs(original, x)
    print("MobileNetV2, evaluation photos:")
    print(f"{'pipeline':<58} {'top-1':>6} {'cosine':>7} {'distill changed':>16}")
    for base in (
        ["prune:target-macs=0.85,floor=0"],
        ["prune:target-macs=0.85,refit=false,floor=0"],
        ["lowrank:target-macs=0.95,fused=false,floor=0"],
    ):
        for extra in ([], ["distill"]):
            m, rep = run(original, base + extra, calib)
            top1, cos = agreement(ref, outputs(m, x))
            changed = len(rep.passes[-1].changed) if extra else "-"
            print(f"{' + '.join(base + extra):<58} {top1:6.3f} {cos:7.4f} {changed!s:>16}")
    digits = onnx.load(str(ROOT / "models/fixtures/digits_cnn.onnx"))
    dcal = ROOT / "models/fixtures/digits_calib.npz"
    xt = np.load(ROOT / "models/fixtures/digits_test.npz")["input"]
    labels = np.load(ROOT / "models/fixtures/digits_test_labels.npy")
    dref = outputs(digits, xt)
    print("\ndigits CNN, 400 test images:")
    print(f"{'pipeline':<58} {'acc':>6} {'cosine':>7}")
    for base in (
        ["fold-batchnorm", "prune:ratio=0.6,floor=0"],
        ["fold-batchnorm", "prune:ratio=0.6,refit=false,floor=0"],
    ):
        for extra in ([], ["distill"]):
            m, _ = run(digits, base + extra, dcal)
            out = outputs(m, xt)
            acc = float((out.argmax(1) == labels).mean())
            print(f"{' + '.join(base + extra):<58} {acc:6.4f} {agreement(dref, out)[1]:7.4f}")


if __name__ == "__main__":
    main()

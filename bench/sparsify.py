"""Fine-grained sparsity on MobileNetV2 (ImageNet weights): 50% and 80%, magnitude against
activation-aware (Wanda) scores side by side, and 2:4; bytes ratio of the file, top-1 agreement
and cosine with the original on the evaluation photos, latency ratio (the original in the same
run: stock onnxruntime does not run unstructured sparsity faster).

    python bench/sparsify.py
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
from common import agreement, latency_ratios, mobilenet, outputs

import onnxshrink

SETTINGS = [
    "sparsity=0.5,method=magnitude",
    "sparsity=0.5,method=activation",
    "sparsity=0.8,method=magnitude",
    "sparsity=0.8,method=activation",
    "pattern=2:4,method=activation",
    "sparsity=0.5,method=activation,values=int8",
]


def main() -> None:
    _, folded, calib, evaluation = mobilenet()
    x = np.load(evaluation)["input"]
    ref = outputs(folded, x)
    base = os.path.getsize(folded)
    rows, models = {}, {}
    with tempfile.TemporaryDirectory() as d:
        for spec in SETTINGS:
            out = Path(d) / f"{len(models)}.onnx"
            onnxshrink.compress(
                str(folded), [f"sparsify:{spec},floor=0"], data=str(calib), output=out, holdout=0
            )
            models[spec] = out
            rows[spec] = (os.path.getsize(out) / base, *agreement(ref, outputs(out, x)))
        lat = latency_ratios(folded, models, x[:1], runs=30)
        print("MobileNetV2 sparsify (weights of at least 1024 elements), evaluation photos:")
        print(f"{'setting':<44} {'bytes':>6} {'top-1':>6} {'cosine':>7} {'lat1':>6} {'lat2':>6}")
        for spec, (size, top1, cos) in rows.items():
            print(
                f"{spec:<44} {size:6.3f} {top1:6.3f} {cos:7.4f} {lat[spec][1]:6.3f} "
                f"{lat[spec][2]:6.3f}"
            )


if __name__ == "__main__":
    main()

"""How time and memory grow with model size: ``simplify``, ``prune``, ``quantize`` on a
ResNet-18-style net at 1×, 4× and 16× width (params grow ~ width²).

Each (width, pass) runs in its own process (after ``fold-batchnorm``, 16 calibration images
of 64×64, validation on the same), so the peak resident memory printed is that run's alone;
the model file size and the baseline peak of loading the model alone are shown for scale.

    python bench/scale.py                 # widths 8, 32, 128
    python bench/scale.py --widths 8 32
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

_CHILD = r"""
import json, sys, time
import numpy as np, onnxshrink
model, spec, out = sys.argv[1], sys.argv[2], sys.argv[3]
x = np.random.default_rng(0).standard_normal((16, 3, 64, 64)).astype(np.float32)
t0 = time.perf_counter()
if spec == "load":
    import onnx_ir as ir
    from onnxshrink import io
    io.load(model)
else:
    onnxshrink.compress(
        model, ["fold-batchnorm", spec], data=x, output=out, holdout=0, progress=False
    )
print(json.dumps({"seconds": time.perf_counter() - t0,
                  "peak_mb": int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0])
                             / 1024}))
"""

SPECS = ["load", "simplify", "prune:ratio=0.3", "quantize"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--widths", type=int, nargs="+", default=[8, 32, 128])
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import onnx

    from models import resnet

    print(f"{'width':>5} {'params':>8} {'file MB':>8} {'pass':<16} {'seconds':>8} {'peak MB':>8}")
    with tempfile.TemporaryDirectory() as d:
        for width in args.widths:
            path = Path(d) / f"resnet_w{width}.onnx"
            model = resnet.build(width=width, image=64, classes=100)
            onnx.save(model, path)
            params = sum(int(__import__("numpy").prod(t.dims)) for t in model.graph.initializer)
            for spec in SPECS:
                proc = subprocess.run(
                    [sys.executable, "-c", _CHILD, str(path), spec, str(Path(d) / "out.onnx")],
                    capture_output=True,
                    text=True,
                )
                if proc.returncode != 0:
                    print(f"{width:>5} {spec}: failed: {proc.stderr.strip().splitlines()[-1]}")
                    continue
                r = json.loads(proc.stdout.strip().splitlines()[-1])
                print(
                    f"{width:>5} {params / 1e6:7.2f}M {path.stat().st_size / 2**20:8.1f} "
                    f"{spec:<16} "
                    f"{r['seconds']:8.2f} {r['peak_mb']:8.0f}"
                )


if __name__ == "__main__":
    main()

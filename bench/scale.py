"""How time and memory grow with model size: ``simplify``, ``prune``, ``quantize`` on a
ResNet-18-style net at 1×, 4× and 16× width (params grow ~ width²); with ``--decoder``,
``quantize-weights`` (4-bit) on models/decoder.py's Llama-style decoder (3.2 GB of external
data by default), whose peak must stay within 2 GB of its largest tensor.

Each (width, pass) runs in its own process (after ``fold-batchnorm``, 16 calibration images
of 64×64, validation on the same), so the peak resident memory printed is that run's alone;
the model file size and the baseline peak of loading the model alone are shown for scale.

    python bench/scale.py                 # widths 8, 32, 128
    python bench/scale.py --widths 8 32
    python bench/scale.py --decoder [--layers 13] [--samples 128] [--keep DIR]
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

# random token ids (samples x 64); random weights: with the floor off (the cosine is printed)
# the run measures the pass and its validation; at the default floor the whole pass breaks it
# and partial application re-runs it sparing layers (the "4-bit" column: layers kept 4-bit)
_DECODER = r"""
import json, sys, time
import numpy as np, onnxshrink
model, spec, out, samples = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
ids = np.random.default_rng(0).integers(0, 32000, (samples, 64))
t0 = time.perf_counter()
if spec == "load":
    from onnxshrink import io
    io.load(model)
    fidelity = None
elif spec == "run":  # the output in onnxruntime, one sequence
    import onnxruntime as ort
    ort.InferenceSession(model).run(None, {"input_ids": ids[:1]})
    fidelity = None
else:
    _, report = onnxshrink.compress(model, [spec], data={"input_ids": ids}, output=out,
                                    progress=False)
    rec = report.passes[-1]
    fidelity = rec.fidelity.cosine if rec.fidelity else None
    part = rec.partial or {}
    applied = f"{part['applied']}/{part['layers']}" if part else rec.status
print(json.dumps({"seconds": time.perf_counter() - t0, "cosine": fidelity,
                  "applied": None if spec in ("load", "run") else applied,
                  "peak_mb": int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0])
                             / 1024}))
"""


def decoder(layers: int, samples: int, keep: Path | None) -> None:
    """4-bit weight-only on the Llama-style decoder, each step in its own process."""
    from models import decoder as dec
    from onnxshrink.io import file_bytes

    d = keep or Path(tempfile.mkdtemp())
    src, out = d / "decoder.onnx", d / "decoder_4bit.onnx"
    if not src.exists():
        dec.build(dec.Config(layers=layers), src)
    data_mb = (src.stat().st_size + Path(f"{src}.data").stat().st_size) / 2**20
    cfg = dec.Config(layers=layers)
    largest = 4 * max(cfg.vocab * cfg.hidden, cfg.hidden * cfg.intermediate) / 2**20
    print(f"decoder: {layers} layers, {data_mb:.0f} MB, largest tensor {largest:.0f} MB, "
          f"{samples} samples x 64 tokens")  # fmt: skip
    print(f"{'step':<40} {'seconds':>8} {'peak MB':>8} {'- largest':>9} {'cosine':>7} "
          f"{'MB':>7} {'4-bit':>8}")  # fmt: skip
    for spec, model in (
        ("load", src),
        ("quantize-weights:floor=0", src),
        ("quantize-weights:floor=0,rounding=nearest", src),
        ("run", out),
        ("quantize-weights", src),
        ("quantize-weights:rounding=nearest", src),
    ):
        argv = [sys.executable, "-c", _DECODER, str(model), spec, str(out), str(samples)]
        proc = subprocess.run(argv, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"{spec}: failed: {proc.stderr.strip().splitlines()[-1]}")
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        size = f"{file_bytes(out) / 2**20:.0f}" if spec.startswith("quantize") else ""
        cos = "" if r["cosine"] is None else f"{r['cosine']:.4f}"
        print(
            f"{spec.replace(',', ' '):<40} {r['seconds']:8.1f} "
            f"{r['peak_mb']:8.0f} {r['peak_mb'] - largest:9.0f} {cos:>7} "
            f"{size:>7} {r.get('applied') or '':>8}"
        )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--widths", type=int, nargs="+", default=[8, 32, 128])
    ap.add_argument("--decoder", action="store_true", help="the Llama-style decoder instead")
    ap.add_argument("--layers", type=int, default=13)
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--keep", type=Path, help="build the decoder here (or reuse it)")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    if args.decoder:
        return decoder(args.layers, args.samples, args.keep)
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

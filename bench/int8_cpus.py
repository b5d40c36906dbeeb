"""int8 on every x86 CPU: the same quantized files on this CPU's integer kernels and on an AVX2
CPU without VNNI, side by side with onnxruntime's own answers to u8s8 saturation.

onnxruntime's x86 int8 kernels add pairs of uint8 x int8 products in int16 unless the CPU has
VNNI or AMX; weights whose pairs break |w_a + w_b| <= 128 then give other outputs there. The
AVX2 column runs onnxruntime under QEMU's Haswell CPU (``qemu-x86_64 -cpu Haswell``, Debian
package qemu-user; tests/emulated_cpu.py): MLAS picks exactly the kernels an AVX2-only machine
runs. Latency is this machine's only (emulated time means nothing).

Rows, every quantizer on the same calibration samples:
* ``onnxruntime quantize_static``: QDQ, per-channel int8 weights, uint8 activations (MinMax);
* the same with ``reduce_range=True`` (7-bit weights: safe on every CPU) and with uint8 weights
  (``U8U8``: onnxruntime's 16-bit kernels, never saturate);
* ours, ``quantize`` (``cpu=any``, the default: the pair rule kept) and ``quantize:cpu=vnni``
  (full-range int8 weights, for VNNI/AMX/ARM machines only).

Columns: latency vs fp32 at 1 / 2 threads (this CPU); top-1 agreement with fp32 and logit cosine
(test accuracy for digits) as written, with this CPU's kernels, with the AVX2 kernels; max |Δ|
between this CPU's and the AVX2 kernels' logits; layers breaking the pair rule.

    python bench/int8_cpus.py           # ~20 min on 2 cores
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from common import agreement, cpu_line, latency_ratios, outputs, quantize_models
from quantize import ort_quantize

import onnxshrink
from onnxshrink.analysis.saturation import unsafe_layers
from tests import emulated_cpu

ROWS = (
    ("onnxruntime quantize_static", {}),
    ("onnxruntime, reduce_range", {"reduce_range": True}),
    ("onnxruntime, U8U8", {"u8_weights": True}),
    ("ours quantize (cpu=any)", "quantize"),
    ("ours quantize:cpu=vnni", "quantize:cpu=vnni"),
)


def _avx2(path: Path, x: np.ndarray, batch: int = 60) -> np.ndarray:
    name = onnx.load(str(path), load_external_data=False).graph.input[0].name
    return np.concatenate(
        [emulated_cpu.run(path, {name: x[i : i + batch]})[0] for i in range(0, len(x), batch)]
    )


def run(name: str, src: Path, calib: Path, x: np.ndarray, labels, tmp: Path) -> None:
    x_cal = np.load(calib)["input"]
    files, secs = {}, {}
    for key, how in ROWS:
        t = time.perf_counter()
        if isinstance(how, dict):
            files[key] = ort_quantize(src, x_cal, tmp, **how)
        else:
            files[key] = tmp / f"ours_{how.replace(':', '_').replace('=', '-')}_{src.stem}.onnx"
            _, rep = onnxshrink.compress(
                str(src), [how], data=str(calib), output=files[key], holdout=0
            )
            assert rep.passes[-1].status == "applied", rep.passes[-1].reason
        secs[key] = time.perf_counter() - t
    ref = outputs(src, x)
    lat = latency_ratios(src, files, x[:1])

    def score(out):
        top1, cos = agreement(ref, out)
        return (float((out.argmax(1) == labels).mean()) if labels is not None else top1), cos

    what = "acc" if labels is not None else "top-1"
    print(f"\n{name}  (fp32 {lat['__ms__'][1]:.2f} ms at 1 thread)")
    print(
        f"{'method':<30} {'lat1':>6} {'lat2':>6} | {'written ' + what:>14} {'cos':>7} | "
        f"{'this CPU':>9} {'cos':>7} | {'AVX2':>7} {'cos':>7} | {'max|Δ| CPUs':>11} {'unsafe':>6} "
        f"{'sec':>5}"
    )
    for key, _ in ROWS:
        w, k = outputs(files[key], x), outputs(files[key], x, optimize=True)
        a = _avx2(files[key], x) if emulated_cpu.available() else None
        unsafe = len(unsafe_layers(ir.load(str(files[key]))))
        (ws, wc), (ks, kc) = score(w), score(k)
        avx = (
            f"{score(a)[0]:7.2%} {score(a)[1]:7.4f} | {np.abs(a - k).max():11.3g}"
            if a is not None
            else "n/a"
        )
        print(
            f"{key:<30} {lat[key][1]:6.3f} {lat[key][2]:6.3f} | {ws:14.2%} {wc:7.4f} | {ks:9.2%} "
            f"{kc:7.4f} | "
            f"{avx} {unsafe:6d} {secs[key]:5.0f}",
            flush=True,
        )


def main() -> None:
    print(f"CPU: {cpu_line()}")
    print(
        "AVX2 column: "
        + (
            "onnxruntime under qemu-x86_64 -cpu Haswell"
            if emulated_cpu.available()
            else "qemu-x86_64 not installed (apt-get install qemu-user)"
        )
    )
    with tempfile.TemporaryDirectory(prefix="bench-int8-cpus-") as tmp:
        for title, src, calib, x_eval, labels in quantize_models(Path(tmp)):
            run(title, src, calib, x_eval, labels, Path(tmp))


if __name__ == "__main__":
    main()

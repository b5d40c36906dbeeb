"""int8 quantization, side by side: ours against onnxruntime's and onnxsim's quantizers.

For MobileNetV2 (ImageNet weights), the digits CNN and a ResNet-18-style net (random weights,
fed the same photos): latency relative to fp32 measured in the same run (onnxruntime, full
optimizations, 1 and 2 threads, median of 40 interleaved runs, batch 1), file bytes, and
fidelity -- top-1 agreement and mean logit cosine with fp32 on the evaluation photos (never
the calibration ones), or test accuracy for digits. Every quantizer gets the same calibration
samples:

* ``onnxruntime.quantization.quantize_static``: QDQ, per-channel int8 weights, uint8
  activations, after ``quant_pre_process``, MinMax (its default);
* ``onnxsim.quantize_static``: per-channel, uint8, minmax;
* ours, default options (``quantize``: percentile 99.99 ranges measured in cascade, depthwise
  range balancing, Hessian-aware weight rounding, empirical bias correction, an image stem kept
  float); the same with the stem quantized too (``stem=int8``, as the other quantizers do); with
  the ranges of the float model
  (``cascade-rounds=0``, as onnxruntime calibrates); and with balancing and Hessian rounding
  turned off (nearest rounding + weight bias correction);
* ours with mixed precision (``min-fidelity=0.998``: the most sensitive layers kept float; a
  floor the default does not reach by itself on MobileNetV2's calibration crops);
* ours with cross-layer equalization (ReLU6 -> ReLU where it sits between equalized layers, as
  in the paper), bias correction and mixed precision;
* ``cluster`` (8 bits, Hessian-aware assignment) and with nearest assignment -- storage only,
  float speed;
* every float weight rounded to float16 and back: the noise floor of the evaluation set (how
  many top-1 decisions a relative change of 2^-11 already flips).

``kernels`` and ``k-cos`` are the fidelity and cosine of the same file run with onnxruntime's
optimizations on (integer kernels, what a user's session gives); the other fidelity columns run
the graph as written. ``flips`` counts the crops whose top-1 differs from fp32 with kernels, and
the largest fp32 top-2 logit margin among them: a flip at a small margin is a near-tie.

    python bench/quantize.py                 # ~25 min on 2 cores
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from common import agreement, cpu_line, latency_ratios, outputs, quantize_models

import onnxshrink


def _reader(x: np.ndarray, name: str):
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{name: x[i : i + 1]} for i in range(len(x))])

        def get_next(self):
            return next(self.it, None)

    return Reader()


def ort_quantize(
    src: Path, x_cal: np.ndarray, tmp: Path, *, reduce_range: bool = False, u8_weights: bool = False
) -> Path:
    """onnxruntime's quantize_static: QDQ, per-channel int8 weights, uint8 activations -- or
    7-bit weights (``reduce_range``, its answer to u8s8 saturation) or uint8 weights (U8U8)."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    tag = "_rr" if reduce_range else "_u8u8" if u8_weights else ""
    pre, out = tmp / "ort_pre.onnx", tmp / f"ort{tag}_{src.stem}.onnx"
    quant_pre_process(str(src), str(pre))
    name = onnx.load(str(src)).graph.input[0].name
    quantize_static(
        str(pre),
        str(out),
        _reader(x_cal, name),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        reduce_range=reduce_range,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QUInt8 if u8_weights else QuantType.QInt8,
    )
    return out


def onnxsim_quantize(src: Path, x_cal: np.ndarray, tmp: Path) -> Path:
    import onnxsim

    name = onnx.load(str(src)).graph.input[0].name
    out = tmp / f"onnxsim_{src.stem}.onnx"
    model = onnxsim.quantize_static(
        str(src),
        calibration_data=[{name: x_cal[i : i + 1]} for i in range(len(x_cal))],
        per_channel=True,
        activation_type="uint8",
        method="minmax",
    )
    onnx.save(model, str(out))
    return out


OURS = (  # (row, pipeline, tag)
    ("ours (quantize)", "quantize", "default"),
    ("ours, int8 stem", "quantize:stem=int8", "int8stem"),
    ("ours, float-model ranges", "quantize:cascade-rounds=0", "nocascade"),
    ("ours, nearest rounding, no balance", "quantize:rounding=nearest,balance=off", "plain"),
    ("ours + mixed precision", "quantize:min-fidelity=0.998", "amp"),
    (
        "ours + CLE + mixed precision",
        "equalize:relu6-to-relu=true,floor=0|quantize:min-fidelity=0.998",
        "cle",
    ),
    ("ours cluster bits=8", "cluster", "cluster"),
    ("ours cluster bits=8, nearest", "cluster:rounding=nearest", "cluster-nearest"),
)


def fp16_rounded(src: Path, tmp: Path) -> Path:
    """The fp32 model with every float weight rounded to float16 and back: no method that
    changes weights by that little (relative 2^-11) can be told apart on this evaluation set."""
    from onnx import numpy_helper

    model = onnx.load(str(src))
    for init in model.graph.initializer:
        arr = numpy_helper.to_array(init)
        if arr.dtype == np.float32:
            init.CopyFrom(
                numpy_helper.from_array(arr.astype(np.float16).astype(np.float32), init.name)
            )
    out = tmp / f"fp16_{src.stem}.onnx"
    onnx.save(model, str(out))
    return out


def ours(src: Path, calib: Path, tmp: Path, spec: str, tag: str) -> tuple[Path, str]:
    out = tmp / f"ours_{tag}_{src.stem}.onnx"
    _, rep = onnxshrink.compress(str(src), spec.split("|"), data=str(calib), output=out, holdout=0)
    p = rep.passes[-1]
    note = p.status
    if "mixed_precision" in p.details:
        note += f", {len(p.details['mixed_precision']['float'])} layers float"
    return out, note


def run(
    name: str, src: Path, calib: Path, x_eval: np.ndarray, labels: np.ndarray | None, tmp: Path
) -> None:
    x_cal = np.load(calib)["input"]
    cands: dict[str, Path] = {}
    notes: dict[str, str] = {}
    secs: dict[str, float] = {}
    for key, fn in (
        ("onnxruntime quantize_static", lambda: ort_quantize(src, x_cal, tmp)),
        ("onnxsim.quantize_static", lambda: onnxsim_quantize(src, x_cal, tmp)),
    ):
        t = time.perf_counter()
        try:
            cands[key] = fn()
        except Exception as e:  # an alternative failing is a result too
            notes[key] = f"failed: {str(e).splitlines()[0][:80]}"
        secs[key] = time.perf_counter() - t
    cands["fp16-rounded weights"] = fp16_rounded(src, tmp)  # the evaluation set's noise floor
    for key, spec, tag in OURS:
        t = time.perf_counter()
        cands[key], notes[key] = ours(src, calib, tmp, spec, tag)
        secs[key] = time.perf_counter() - t
    ref = outputs(src, x_eval)
    lat = latency_ratios(src, {k: v for k, v in cands.items()}, x_eval[:1])
    print(
        f"\n{name}  (fp32: {lat['__ms__'][1]:.2f} ms at 1 thread, {lat['__ms__'][2]:.2f} ms at 2; "
        f"{os.path.getsize(src) / 1e6:.2f} MB)"
    )
    fid = "accuracy" if labels is not None else "top-1 agr"
    print(
        f"{'method':<34} {'lat1':>6} {'lat2':>6} {'bytes':>6} {fid:>9} {'cosine':>7} "
        f"{'kernels':>8} "
        f"{'k-cos':>7} {'flips':>12} {'sec':>5}  notes"
    )
    top2 = np.sort(ref, 1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]  # fp32's lead of its top-1 over its runner-up
    base_acc = float((ref.argmax(1) == labels).mean()) if labels is not None else None
    if labels is not None:
        print(f"{'fp32':<34} {1:6.3f} {1:6.3f} {1:6.3f} {base_acc:9.2%} {1:7.4f}")
    for key in (
        "onnxruntime quantize_static",
        "onnxsim.quantize_static",
        "fp16-rounded weights",
        *(k for k, _, _ in OURS),
    ):
        if key not in cands:
            print(f"{key:<34} {notes.get(key, '')}")
            continue
        out = outputs(cands[key], x_eval)
        top1, cos = agreement(ref, out)
        score = float((out.argmax(1) == labels).mean()) if labels is not None else top1
        # what a user's session (integer kernels, optimizations on) gives, as a second opinion
        fast = outputs(cands[key], x_eval, optimize=True)
        k_top1, k_cos = agreement(ref, fast)
        kern = float((fast.argmax(1) == labels).mean()) if labels is not None else k_top1
        flipped = margin[ref.argmax(1) != fast.argmax(1)]
        flips = f"{len(flipped)} max {flipped.max():.2f}" if len(flipped) else "0"
        print(
            f"{key:<34} {lat[key][1]:6.3f} {lat[key][2]:6.3f} "
            f"{os.path.getsize(cands[key]) / os.path.getsize(src):6.3f} "
            f"{score:9.2%} {cos:7.4f} {kern:8.2%} {k_cos:7.4f} {flips:>12} {secs.get(key, 0):5.0f} "
            f" {notes.get(key, '')}"
        )


def main() -> None:
    print(f"CPU: {cpu_line()}")
    with tempfile.TemporaryDirectory(prefix="bench-quantize-") as tmp:
        for title, src, calib, x_eval, labels in quantize_models(Path(tmp)):
            run(title, src, calib, x_eval, labels, Path(tmp))


if __name__ == "__main__":
    main()

"""Low-rank MatMul: plain SVD against activation-aware SVD on a real transformer and on MobileNetV2.

1. all-MiniLM-L6-v2 (real weights; calibration sentences and evaluation sentences from the
   docstrings of different standard-library modules): ``energy`` 0.90 / 0.95 / 0.99 and
   ``rank`` 0.25 / 0.5, each with ``method=svd`` and ``method=activation`` (for ``energy`` also
   activation-aware factors at the ranks SVD chose, ``spectrum=weights``) -- MACs ratio (batch
   1, 64 tokens), bytes ratio, latency ratio (batch of 8 sentences, 1 and 2 threads, the original
   in the same interleaved loop), cosine of the sentence embeddings with the original's on the
   evaluation sentences (mean and worst). onnxruntime's ``quantize_dynamic`` (int8 MatMul) is
   measured in the same run, as the alternative a user would pick.
2. The fused form (model-local ``LowRankMatMul`` functions, inlined by onnxruntime) against the
   plain MatMul pair at the same ranks: latency ratio.
3. MobileNetV2 (ImageNet weights): ``lowrank`` on the 1×1 convs with ``target-macs`` 0.9 / 0.8
   (whole-model MAC budget), top-1 agreement and cosine with the original on the evaluation photos.

    python bench/lowrank.py
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
from common import (
    agreement,
    cosines,
    embeddings,
    latency_ratios,
    mobilenet,
    outputs,
    session,
    stats,
)

import onnxshrink
from onnxshrink import runtime

SETTINGS = ["energy=0.9", "energy=0.95", "energy=0.99", "rank=0.25", "rank=0.5"]


def latencies(
    original, candidates: dict, feed: dict, runs: int = 20
) -> dict[str, dict[int, float]]:
    out: dict[str, dict[int, float]] = {k: {} for k in candidates}
    for threads in (1, 2):
        sess = {"__original__": session(original, threads=threads)}
        sess.update({k: session(m, threads=threads) for k, m in candidates.items()})
        ms = runtime.latency(sess, feed, runs=runs, warmup=3)
        for k in candidates:
            out[k][threads] = ms[k] / ms["__original__"]
        out.setdefault("__ms__", {})[threads] = ms["__original__"]
    return out


def minilm(tmp: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from models import minilm as build

    paths = build.build()
    calib, evaluation = paths["calib"], dict(np.load(paths["eval"]))
    ref = embeddings(paths["model"], evaluation)
    base_bytes = os.path.getsize(paths["model"])
    rows, models = {}, {}
    for setting in SETTINGS:
        methods = ("svd", "activation") + (
            ("activation@svd-ranks",) if setting.startswith("energy") else ()
        )
        for method in methods:
            opts = (
                "method=activation,spectrum=weights"
                if method == "activation@svd-ranks"
                else f"method={method}"
            )
            spec = f"lowrank:{setting},{opts},floor=0"
            out = tmp / f"minilm_{setting}_{method}.onnx"
            _, rep = onnxshrink.compress(
                str(paths["model"]), [spec], data=str(calib), output=out, holdout=0, progress=False
            )
            key = f"{setting} {method}"
            models[key] = out
            rows[key] = (
                rep.after["macs"] / rep.before["macs"],
                os.path.getsize(out) / base_bytes,
                *cosines(ref, embeddings(out, evaluation)),
            )
    plain = tmp / "minilm_rank0.25_plain.onnx"
    onnxshrink.compress(
        str(paths["model"]),
        ["lowrank:rank=0.25,method=activation,fused=false,floor=0"],
        data=str(calib),
        output=plain,
        holdout=0,
        progress=False,
    )
    dyn = tmp / "minilm_dynamic_int8.onnx"
    quantize_dynamic(str(paths["model"]), str(dyn), weight_type=QuantType.QInt8)
    rows["ORT quantize_dynamic int8"] = (
        float("nan"),
        os.path.getsize(dyn) / base_bytes,
        *cosines(ref, embeddings(dyn, evaluation)),
    )
    models["ORT quantize_dynamic int8"] = dyn
    feed = {k: v[:8] for k, v in evaluation.items()}
    lat = latencies(paths["model"], {**models, "rank=0.25 activation, plain pair": plain}, feed)
    print(
        f"all-MiniLM-L6-v2: {stats(paths['model']).params / 1e6:.1f} M params; original "
        f"{lat['__ms__'][1]:.1f} ms (1 thread), {lat['__ms__'][2]:.1f} ms (2 threads) for 8 "
        "sentences × 64 tokens"
    )
    print(
        f"{'setting':<28} {'MACs':>6} {'bytes':>6} {'lat1':>6} {'lat2':>6} {'cos mean':>9} "
        f"{'cos worst':>9}"
    )
    for key, (macs, size, cmean, cmin) in rows.items():
        print(
            f"{key:<28} {macs:6.3f} {size:6.3f} {lat[key][1]:6.3f} {lat[key][2]:6.3f} {cmean:9.4f} "
            f"{cmin:9.4f}"
        )
    for setting in SETTINGS:
        a, s = rows[f"{setting} activation"], rows[f"{setting} svd"]
        if setting.startswith("energy"):  # at the same ranks as SVD (the weights' energy)
            a = rows[f"{setting} activation@svd-ranks"]
        print(
            f"  {setting}: at equal ranks, activation-aware mean cosine {a[2]:.4f} vs SVD "
            f"{s[2]:.4f} "
            f"(MACs {a[0]:.3f} vs {s[0]:.3f})"
        )
    f, p = lat["rank=0.25 activation"], lat["rank=0.25 activation, plain pair"]
    print(
        f"fused function vs plain MatMul pair (rank=0.25, activation): latency ratio {f[1]:.3f} vs "
        f"{p[1]:.3f} "
        f"(1 thread), {f[2]:.3f} vs {p[2]:.3f} (2 threads)"
    )


def mobilenet_1x1(tmp: Path) -> None:
    _, folded, calib, evaluation = mobilenet()
    x = np.load(evaluation)["input"]
    ref = outputs(folded, x)
    base = stats(folded)
    models, rows = {}, {}
    for target in ("0.9", "0.8"):
        for method in ("svd", "activation"):
            key = f"target-macs={target} {method}"
            out = tmp / f"mobilenet_{target}_{method}.onnx"
            onnxshrink.compress(
                str(folded),
                [f"lowrank:target-macs={target},method={method},floor=0"],
                data=str(calib),
                output=out,
                holdout=0,
                progress=False,
            )
            models[key] = out
            rows[key] = (stats(out).macs / base.macs, *agreement(ref, outputs(out, x)))
    lat = latency_ratios(folded, models, x[:1], runs=30)
    print(
        "\nMobileNetV2 (ImageNet weights), lowrank on 1×1 convs and the classifier, evaluation "
        "photos:"
    )
    print(f"{'setting':<28} {'MACs':>6} {'lat1':>6} {'lat2':>6} {'top-1':>6} {'cosine':>7}")
    for key, (macs, top1, cos) in rows.items():
        print(f"{key:<28} {macs:6.3f} {lat[key][1]:6.3f} {lat[key][2]:6.3f} {top1:6.3f} {cos:7.4f}")


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as d:
        minilm(Path(d))
        mobilenet_1x1(Path(d))

"""Transformers: onnxshrink's int8 modes against onnxruntime's quantizers on all-MiniLM-L6-v2.

One run, same data: 256 calibration sentences and 256 evaluation sentences from the docstrings
of *different* standard-library modules (models/minilm.py), 64 tokens each. Every model runs
in an optimized onnxruntime session (the integer kernels a user gets). Columns: latency of a
batch of 8 sentences at 1 and 2 threads as a ratio of fp32's (medians, interleaved), file
bytes as a ratio of fp32's, cosine of the sentence embeddings with fp32's (mean / worst), and
retrieval agreement: each evaluation sentence's nearest neighbour among the others by fp32's
embeddings vs by the candidate's (top-1: the same neighbour; top-5: overlap of the five
nearest).

    python bench/transformers.py
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np
from common import cosines, cpu_line, embeddings, session

import onnxshrink
from onnxshrink import runtime


def neighbours(e: np.ndarray, k: int) -> np.ndarray:
    """Each row's k nearest other rows by cosine similarity, nearest first."""
    e = e / np.linalg.norm(e, axis=1, keepdims=True)
    sim = e @ e.T
    np.fill_diagonal(sim, -np.inf)
    return np.argsort(-sim, axis=1, kind="stable")[:, :k]


def retrieval(ref: np.ndarray, out: np.ndarray, k: int = 5) -> tuple[float, float]:
    """(top-1 agreement, mean top-k overlap) of nearest-neighbour retrieval, ``out`` vs ``ref``."""
    a, b = neighbours(ref, k), neighbours(out, k)
    top1 = float(np.mean(a[:, 0] == b[:, 0]))
    overlap = float(np.mean([len(set(x) & set(y)) / k for x, y in zip(a, b)]))
    return top1, overlap


def ort_models(model: Path, calib: Path, tmp: Path) -> dict[str, tuple[Path, float]]:
    """onnxruntime's quantizers on the same model and data: name -> (file, seconds)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    out = {}
    for label, per_channel in (("default", False), ("per_channel=True", True)):
        path = tmp / f"ort_dynamic_{int(per_channel)}.onnx"
        t = time.perf_counter()
        quantize_dynamic(model, path, weight_type=QuantType.QInt8, per_channel=per_channel)
        out[f"onnxruntime quantize_dynamic ({label})"] = (path, time.perf_counter() - t)

    class Reader(CalibrationDataReader):
        def __init__(self):
            d = dict(np.load(calib))
            n = len(d["input_ids"])
            self.it = iter([{k: v[i : i + 8] for k, v in d.items()} for i in range(0, n, 8)])

        def get_next(self):
            return next(self.it, None)

    path = tmp / "ort_static.onnx"
    t = time.perf_counter()
    quantize_static(
        model,
        path,
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )
    out["onnxruntime quantize_static (QDQ, per-channel)"] = (path, time.perf_counter() - t)
    out.update(ort_4bit(model, calib, tmp))
    return out


def ort_4bit(model: Path, calib: Path, tmp: Path) -> dict[str, tuple[Path, float]]:
    """onnxruntime's MatMulNBitsQuantizer, 4 bits, block 32, asymmetric: RTN, GPTQ (128
    calibration sentences, as ours uses), HQQ."""
    import onnx
    from onnxruntime.quantization import matmul_nbits_quantizer as mq

    d = dict(np.load(calib))
    batches = [{k: v[i : i + 8] for k, v in d.items()} for i in range(0, 128, 8)]

    class Reader:  # GPTQ iterates over it
        def __iter__(self):
            return iter(batches)

    configs = {
        "RTN": lambda: mq.RTNWeightOnlyQuantConfig(),
        "GPTQ": lambda: mq.GPTQWeightOnlyQuantConfig(calibration_data_reader=Reader()),
        "HQQ": lambda: mq.HQQWeightOnlyQuantConfig(block_size=32),
    }
    out = {}
    for name, config in configs.items():
        path = tmp / f"ort_4bit_{name}.onnx"
        t = time.perf_counter()
        q = mq.MatMulNBitsQuantizer(
            onnx.load(model), block_size=32, is_symmetric=False, algo_config=config()
        )
        q.process()
        q.model.save_model_to_file(str(path), use_external_data_format=False)
        out[f"onnxruntime 4-bit {name}, block 32"] = (path, time.perf_counter() - t)
    return out


def ours(model: Path, calib: Path, tmp: Path) -> dict[str, tuple[Path, float]]:
    """Our modes; ``quantize`` is static int8 (the linear scope on an attention model, with and
    without SmoothQuant); ``a + b`` is a pipeline of two passes."""
    out = {}
    for spec in (
        "quantize-dynamic:smooth=off,rounding=nearest",
        "quantize-dynamic:smooth=off",
        "quantize-dynamic:rounding=nearest",
        "quantize-dynamic",
        "quantize-weights:rounding=nearest",
        "quantize-weights",
        "quantize-weights:block=128",
        "quantize-weights:accuracy-level=4",
        "quantize:smooth=off",
        "quantize",
        "lowrank + quantize-dynamic",
    ):
        path = tmp / f"ours_{abs(hash(spec))}.onnx"
        t = time.perf_counter()
        _, rep = onnxshrink.compress(
            str(model),
            spec.split(" + "),
            data=str(calib),
            output=path,
            holdout=0,
            progress=False,
        )
        notes = [f"{r.name}: {r.status}" for r in rep.passes if r.status != "applied"]
        out[f"ours `{spec}`" + (f" ({', '.join(notes)})" if notes else "")] = (
            path,
            time.perf_counter() - t,
        )
    return out


def main() -> None:
    from models import minilm

    paths = minilm.build()
    model, calib = Path(paths["model"]), Path(paths["calib"])
    evaluation = dict(np.load(paths["eval"]))
    print(cpu_line())
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        candidates = {**ort_models(model, calib, tmp), **ours(model, calib, tmp)}
        ref = embeddings(model, evaluation, optimize=True)
        feed = {k: v[:8] for k, v in evaluation.items()}
        ms = {}
        for threads in (1, 2):
            sess = {"fp32": session(model, threads=threads)}
            sess.update({k: session(p, threads=threads) for k, (p, _) in candidates.items()})
            ms[threads] = runtime.latency(sess, feed, runs=40, warmup=5)
        base = os.path.getsize(model)
        print(
            f"all-MiniLM-L6-v2, batch 8 x 64 tokens: fp32 {ms[1]['fp32']:.1f} ms (1 thread), "
            f"{ms[2]['fp32']:.1f} ms (2 threads); {len(ref)} evaluation sentences"
        )
        print(
            f"| {'model':<52} | lat 1 / 2 threads | bytes | cosine mean / worst "
            f"| retrieval top-1 / top-5 | compile s |"
        )
        print("| --- | --- | --- | --- | --- | --- |")
        for key, (path, seconds) in candidates.items():
            emb = embeddings(path, evaluation, optimize=True)
            cm, cw = cosines(ref, emb)
            t1, t5 = retrieval(ref, emb)
            lat1, lat2 = ms[1][key] / ms[1]["fp32"], ms[2][key] / ms[2]["fp32"]
            print(
                f"| {key:<52} | {lat1:.2f} / {lat2:.2f} "
                f"| {os.path.getsize(path) / base:.3f} | {cm:.4f} / {cw:.4f} | {t1:.3f} / {t5:.3f} "
                f"| {seconds:.1f} |"
            )


if __name__ == "__main__":
    main()

"""Memory-bound decoding: one token through a Llama-style decoder, 4-bit weights vs fp32.

Generating text runs the model on one new token at a time, so every weight is read from memory
once per token and barely reused: the regime where 4-bit weights pay. models/decoder.py's
decoder (random weights, no KV cache: a step is the forward pass of one token) at ``--layers``
x ``--hidden``; candidates: fp32, onnxruntime's ``MatMulNBitsQuantizer`` (default, block 32),
ours ``quantize-weights`` (block 32 with and without the embedding table, block 128, and at
accuracy level 4). Columns: latency of one token at 1 and 2 threads as a ratio of fp32's
(medians, interleaved, optimized sessions), file bytes as a ratio of fp32's, and the logits'
agreement with fp32's on 16 random 32-token prompts (top-1 next token, mean cosine; ours
calibrated on 32 other prompts) -- random weights: no task, the figure is agreement only.

    python bench/decode.py [--layers 4] [--hidden 1024]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from common import agreement, cpu_line, session

import onnxshrink
from onnxshrink import runtime


def size(path: Path) -> int:
    """Bytes of the model file and the external data files it names."""
    import onnx

    model = onnx.load(path, load_external_data=False)
    files = {
        e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"
    }
    return path.stat().st_size + sum((path.parent / f).stat().st_size for f in files)


def ort_default(model: Path, out: Path) -> Path:
    import onnx
    from onnxruntime.quantization import matmul_nbits_quantizer as mq

    # the default algorithm: the RTN mode (neural_compressor's code) drops this model's
    # unnamed two-output Split nodes and writes an invalid graph (onnxruntime 1.32)
    q = mq.MatMulNBitsQuantizer(onnx.load(model), block_size=32, is_symmetric=False)
    q.process()
    q.model.save_model_to_file(str(out), use_external_data_format=True)
    return out


def main() -> None:
    from models import decoder

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=1024)
    args = ap.parse_args()
    cfg = decoder.Config(
        layers=args.layers,
        hidden=args.hidden,
        heads=args.hidden // 64,
        intermediate=-(-args.hidden * 11 // 4 // 256) * 256,
        context=64,
    )
    print(cpu_line())
    rng = np.random.default_rng(0)
    prompts = {"input_ids": rng.integers(0, cfg.vocab, (16, 32), dtype=np.int64)}
    calib = {"input_ids": rng.integers(0, cfg.vocab, (32, 32), dtype=np.int64)}  # others
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        fp32 = decoder.build(cfg, tmp / "fp32.onnx")
        t = time.perf_counter()
        rtn = ort_default(fp32, tmp / "rtn.onnx")
        candidates = {"onnxruntime 4-bit (default), block 32": (rtn, time.perf_counter() - t)}
        for spec in (
            "quantize-weights",
            "quantize-weights:embeddings=false",
            "quantize-weights:block=128",
            "quantize-weights:accuracy-level=4",
        ):
            out = tmp / f"ours_{len(candidates)}.onnx"
            t = time.perf_counter()
            onnxshrink.compress(
                str(fp32), [spec], data=calib, output=out, holdout=0, progress=False
            )
            candidates[f"ours `{spec}`"] = (out, time.perf_counter() - t)
        ref = session(fp32, threads=2).run(None, prompts)[0]
        token = {"input_ids": prompts["input_ids"][:1, :1]}
        ms = {}
        for threads in (1, 2):
            sess = {"fp32": session(fp32, threads=threads)}
            sess.update({k: session(p, threads=threads) for k, (p, _) in candidates.items()})
            ms[threads] = runtime.latency(sess, token, runs=40, warmup=5)
        print(
            f"decoder {cfg.layers} x {cfg.hidden} ({size(fp32) / 1e6:.0f} MB fp32), one token: "
            f"fp32 {ms[1]['fp32']:.1f} ms (1 thread), {ms[2]['fp32']:.1f} ms (2 threads)"
        )
        print("| model | latency 1 / 2 threads | bytes | next token top-1 / cosine | compile s |")
        print("| --- | --- | --- | --- | --- |")
        for key, (path, seconds) in candidates.items():
            got = session(path, threads=2).run(None, prompts)[0]
            top1, cos = agreement(ref.reshape(-1, ref.shape[-1]), got.reshape(-1, got.shape[-1]))
            print(
                f"| {key} | {ms[1][key] / ms[1]['fp32']:.2f} / {ms[2][key] / ms[2]['fp32']:.2f} "
                f"| {size(path) / size(fp32):.3f} | {top1:.3f} / {cos:.4f} | {seconds:.1f} |"
            )


if __name__ == "__main__":
    main()

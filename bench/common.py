"""Shared helpers of the benchmarks: reference models, evaluation, side-by-side latency."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from onnxshrink import metrics, runtime  # noqa: E402


def mobilenet() -> tuple[Path, Path, Path, Path]:
    """(BN-kept model, folded model, calibration .npz, evaluation .npz)."""
    from models import mobilenet_v2, photos

    m, p = mobilenet_v2.build(), photos.build()
    return m["bn"], m["folded"], p["calib"], p["eval"]


def session(
    model: onnx.ModelProto | str | Path, *, optimize: bool = True, threads: int | None = None
):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    # several sessions are timed interleaved: idle ones must not spin on the cores
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if optimize
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    src = str(model) if isinstance(model, (str, Path)) else model.SerializeToString()
    return ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])


def outputs(model, x: np.ndarray, batch: int = 30, optimize: bool = False) -> np.ndarray:
    """First output on ``x``, in batches: by default the reference run (optimizations off: QDQ
    computed as written); ``optimize=True`` is what a user's session runs (integer kernels)."""
    s = session(model, optimize=optimize)
    name = s.get_inputs()[0].name
    return np.concatenate(
        [s.run(None, {name: x[i : i + batch]})[0] for i in range(0, len(x), batch)]
    )


def embeddings(model, data: dict[str, np.ndarray], batch: int = 32, optimize=False) -> np.ndarray:
    """A sentence encoder's first output on ``data`` (input_ids, attention_mask), in batches."""
    s = session(model, optimize=optimize)
    n = len(data["input_ids"])
    return np.concatenate(
        [s.run(None, {k: v[i : i + batch] for k, v in data.items()})[0] for i in range(0, n, batch)]
    )


def cosines(ref: np.ndarray, out: np.ndarray) -> tuple[float, float]:
    """(mean, worst) cosine of the rows of ``out`` with those of ``ref``."""
    c = np.sum(ref * out, 1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(out, axis=1) + 1e-30)
    return float(c.mean()), float(c.min())


def agreement(ref: np.ndarray, out: np.ndarray) -> tuple[float, float]:
    """(top-1 agreement, mean cosine) of logits ``out`` with ``ref``."""
    cos = (
        np.sum(ref * out, 1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(out, axis=1) + 1e-30)
    ).mean()
    return float((ref.argmax(1) == out.argmax(1)).mean()), float(cos)


def latency_ratios(
    original, candidates: dict, x1: np.ndarray, runs: int = 40
) -> dict[str, dict[int, float]]:
    """Median latency of each candidate / the original's, 1 and 2 threads, interleaved in one loop
    (sessions without thread spinning, so idle ones do not steal the cores)."""
    out: dict[str, dict[int, float]] = {k: {} for k in candidates}
    for threads in (1, 2):
        sess = {"__original__": session(original, threads=threads)}
        sess.update({k: session(m, threads=threads) for k, m in candidates.items()})
        name = sess["__original__"].get_inputs()[0].name
        ms = runtime.latency(sess, {name: x1}, runs=runs, warmup=5)
        for k in candidates:
            out[k][threads] = ms[k] / ms["__original__"]
        out.setdefault("__ms__", {})[threads] = ms["__original__"]
    return out


def quantize_models(tmp: Path):
    """(title, fp32 model, calibration .npz, evaluation inputs, labels or None) of the three
    models the int8 benches measure: MobileNetV2, the digits CNN (BatchNorm folded first, as
    the default pipeline does), the ResNet-18-style net (random weights, fed the photos)."""
    import onnxshrink
    from models import resnet

    _, folded, calib, evaluation = mobilenet()
    x_eval = np.load(evaluation)["input"]
    yield "MobileNetV2 (ImageNet weights), 180 evaluation crops", folded, calib, x_eval, None
    dig = Path(__file__).resolve().parent.parent / "models" / "fixtures"
    fused = tmp / "digits_cnn.onnx"
    onnxshrink.compress(str(dig / "digits_cnn.onnx"), ["simplify", "fold-batchnorm"], output=fused)
    yield (
        "digits CNN, 400 held-out test digits",
        fused,
        dig / "digits_calib.npz",
        np.load(dig / "digits_test.npz")["input"],
        np.load(dig / "digits_test_labels.npy"),
    )
    res = tmp / "resnet18.onnx"
    onnxshrink.compress(resnet.build(), ["fold-batchnorm"], output=res)
    yield "ResNet-18-style (random weights), 180 evaluation crops", res, calib, x_eval, None


def cpu_line() -> str:
    """This machine's CPU for a bench header: model, int8 flags, onnxruntime's int8 kernel."""
    from onnxshrink.cpu import this_cpu

    return this_cpu().summary()


def stats(model) -> metrics.ModelStats:
    m = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model))
    return metrics.model_stats(ir.from_proto(m))


class Timer:
    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0

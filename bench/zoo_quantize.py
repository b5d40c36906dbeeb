"""`-p quantize` on every zoo model next to onnxruntime's ``quantize_static``, same data.

    python bench/zoo_quantize.py [--models a,b] [--json out.json]

Each model's zoo data (models/zoo.py) is split as ``compress`` splits it: the first 3/4 of the
samples calibrate, the last 1/4 are held out. Ours: ``compress(model, ["quantize"])`` with the
whole file (it calibrates on the first part and validates on the held-out part; the detector is
judged by its task metric, as in the zoo test). onnxruntime: ``quant_pre_process`` (skipped when
it fails) then ``quantize_static`` -- QDQ, per-channel int8 weights, uint8 activations, MinMax --
calibrated on the same first part. Both results are then run in an *optimized* onnxruntime session
(the integer kernels) on the held-out samples against the float model: output cosine mean/worst,
and the task metric where the model has one (nudenet: detection F1). Also the file bytes and the
seconds each took. A tool that fails says so in its row.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models import zoo  # noqa: E402

HOLDOUT = 0.25  # compress()'s default


def _dataset(model: str):
    from onnxshrink import io
    from onnxshrink.data import input_specs, load_data

    specs = input_specs(io.load(str(zoo.path(model))).model)
    return load_data(str(zoo.data(model)), specs).split(HOLDOUT)


def ours(model: str, out: Path) -> dict:
    from onnxshrink import compress

    _, report = compress(
        str(zoo.path(model)),
        ["quantize"],
        data=str(zoo.data(model)),
        output=str(out),
        metric=zoo.ENTRIES_BY_NAME[model].metric,
        holdout=HOLDOUT,
    )
    rec = report.passes[-1]
    note = rec.status
    if rec.status != "applied" and rec.reason:
        note += ": " + rec.reason.splitlines()[0][:140]
    return {"note": note, "applied": rec.status == "applied"}


def ort(model: str, calibration, out: Path) -> dict:
    """quantize_static after quant_pre_process, after it without symbolic shapes, or on the
    model as it is: the first whose result onnxruntime loads (its pre-processing fails or
    yields graphs it cannot load on some exporters' models)."""
    import onnxruntime as ort_
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader:
        def __init__(self):
            self.it = iter(calibration.batches())

        def get_next(self):
            return next(self.it, None)

    src, pre = zoo.path(model), out.with_suffix(".pre.onnx")
    tries = (("", {}), (" (pre-processed without symbolic shapes)", {"skip_symbolic_shape": True}))
    errors = []
    for note, kw in (*tries, (" (not pre-processed: it failed)", None)):
        try:
            if kw is not None:
                quant_pre_process(str(src), str(pre), **kw)
            quantize_static(
                str(pre if kw is not None else src),
                str(out),
                Reader(),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
            )
            ort_.InferenceSession(str(out), providers=["CPUExecutionProvider"])
            return {"note": "applied" + note, "applied": True}
        except Exception as e:
            errors.append(f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:60]}")
    raise RuntimeError("; ".join(errors))


def fidelity(model: str, candidate: Path, held_out) -> dict:
    """The candidate in an optimized session vs the float model, on the held-out samples."""
    from onnxshrink import runtime, task
    from onnxshrink.validate import compare

    ref = runtime.run(runtime.session(str(zoo.path(model))), held_out)
    out = runtime.run(runtime.session(str(candidate), optimize=True), held_out)
    f = compare(ref, out)
    spec = zoo.ENTRIES_BY_NAME[model].metric
    metric = task.score(task.load_metric(spec), ref, out) if spec else None
    return {"cosine": f.cosine, "cosine_min": f.cosine_min, "metric": metric}


def run_model(model: str) -> dict[str, dict]:
    calibration, held_out = _dataset(model)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for tool, fn in (("onnxshrink", ours), ("onnxruntime", ort)):
            out = Path(tmp) / f"{tool}.onnx"
            t0 = time.perf_counter()
            try:
                row = fn(model, out) if tool == "onnxshrink" else fn(model, calibration, out)
                row["seconds"] = time.perf_counter() - t0
                row.update(fidelity(model, out, held_out))
                row["bytes"] = out.stat().st_size / zoo.path(model).stat().st_size
            except Exception as e:
                row = {"note": f"failed: {type(e).__name__}: {(str(e).splitlines() or [''])[0]}"}
            rows[tool] = row
    return rows


def _fmt(row: dict) -> str:
    if "cosine" not in row:
        return row["note"]
    metric = f", F1 {row['metric']:.2f}" if row.get("metric") is not None else ""
    return (
        f"cos {row['cosine']:.4f}/{row['cosine_min']:.4f}{metric}, {row['bytes']:.2f}x bytes, "
        f"{row['seconds']:.0f} s -- {row['note']}"
    )


def main() -> None:
    from onnxshrink import cpu

    logging.getLogger().setLevel(logging.ERROR)  # onnxruntime's quantizer warns per tensor
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default=",".join(zoo.available()))
    ap.add_argument("--json")
    args = ap.parse_args()
    print(f"CPU: {cpu.this_cpu().summary()}")
    results = {}
    for model in args.models.split(","):
        results[model] = run_model(model)
        for tool, row in results[model].items():
            print(f"{model:18s} {tool:12s} {_fmt(row)}")
        sys.stdout.flush()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

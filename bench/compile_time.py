"""Compile time and peak memory of each pass, next to onnxruntime's quantizers and onnxsim.

    python bench/compile_time.py [--models digits,mobilenet,resnet18,minilm] [--passes a,b]
                                 [--target] [--samples N] [--json out.json]
    python bench/compile_time.py --startup

Every (model, tool) runs in its own process, so the peak resident memory is that run's alone
(``VmHWM``; ``ru_maxrss`` would be inherited from this parent); wall seconds are measured
inside it, after the imports. Ours: ``compress`` with the pass at its defaults (``default``:
the default pipeline; ``--target``: also ``--target
speedup=1.5``), the model's calibration data, a 1/4 held out as ``compress`` does; the phases
(:mod:`onnxshrink.timing`: sessions, runs, shape inference, copies, each quantize step, ...)
are printed for each run, the four longest in the table. Anchors, on the same model and data:
onnxruntime ``quant_pre_process`` + ``quantize_static`` (QDQ, per-channel, MinMax) and
``quantize_dynamic``, and ``onnxsim.simplify``. Ratios are to ``quantize_static`` in the same run.
``--samples N``: every tool calibrates on the first N samples of each model's file (the file is
cut to N + N/3 samples, so ``compress``'s 1/4 hold-out leaves N). ``--startup``: wall seconds
of the commands that do no compression (``--help``, ``passes``, ``inspect`` on the digits CNN)
and of the imports under them, median of 5 fresh processes each.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PASSES = ("default", "quantize", "prune", "tucker", "lowrank", "cluster", "sparsify", "distill")
ANCHORS = ("ort-static", "ort-dynamic", "onnxsim")

_CHILD = r"""
import json, sys, time
tool, model, data, out = sys.argv[1:5]
phases = {}
if tool == "ort-static":
    import numpy as np, onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process
    z = dict(np.load(data))  # the samples compress calibrates on: all but the last 1/4
    n = len(next(iter(z.values())))
    calib = [{k: v[i : i + 1] for k, v in z.items()} for i in range(n - n // 4)]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(calib)

        def get_next(self):
            return next(self.it, None)

    pre = out + ".pre.onnx"
    t0 = time.perf_counter()
    try:
        quant_pre_process(model, pre)
    except Exception:
        pre = model
    quantize_static(pre, out, Reader(), quant_format=QuantFormat.QDQ, per_channel=True)
elif tool == "ort-dynamic":
    from onnxruntime.quantization import quantize_dynamic
    t0 = time.perf_counter()
    quantize_dynamic(model, out)
elif tool == "onnxsim":
    import onnx, onnxsim
    t0 = time.perf_counter()
    simplified, ok = onnxsim.simplify(onnx.load(model))
    onnx.save(simplified, out)
else:
    import onnxshrink
    import onnxshrink.api  # imported up front, as the anchors' modules are
    from onnxshrink import timing
    t0 = time.perf_counter()
    if tool.startswith("target:"):
        _, report = onnxshrink.compress(model, data=data, output=out, target=tool[7:],
                                        progress=False)
    else:
        spec = None if tool == "default" else [tool]
        _, report = onnxshrink.compress(model, spec, data=data, output=out, progress=False)
    phases = {k: v for k, v in timing.totals().items()}
    last = report.passes[-1] if report.passes else None
    phases["_status"] = "?" if last is None else "partly" if last.partial else last.status
print(json.dumps({"seconds": time.perf_counter() - t0, "phases": phases,
                  "peak_mb": int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0])
                             / 1024}))
"""


def models(names: list[str], tmp: Path):
    """(name, model path, calibration .npz) per requested model."""
    for name in names:
        if name == "digits":
            fixtures = ROOT / "models" / "fixtures"
            yield name, fixtures / "digits_cnn.onnx", fixtures / "digits_calib.npz"
        elif name == "mobilenet":
            from models import mobilenet_v2, photos

            yield name, mobilenet_v2.build()["bn"], photos.build()["calib"]
        elif name == "resnet18":
            import onnx

            from models import photos, resnet

            path = tmp / "resnet18.onnx"
            onnx.save(resnet.build(), path)
            yield name, path, photos.build()["calib"]
        elif name == "minilm":
            from models import minilm

            paths = minilm.build()
            yield name, paths["model"], paths["calib"]
        else:
            from models import zoo

            yield name, zoo.path(name), zoo.data(name)


def cut(data: Path, samples: int | None, tmp: Path) -> Path:
    """``data`` cut to ``samples`` calibration samples plus the hold-out (a third of them)."""
    if samples is None:
        return data
    import numpy as np

    z = dict(np.load(data))
    out = tmp / f"{data.stem}_{samples}.npz"
    np.savez(out, **{k: v[: samples + round(samples / 3)] for k, v in z.items()})
    return out


def run(tool: str, model: Path, data: Path, tmp: Path) -> dict:
    out = tmp / "out.onnx"
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, tool, str(model), str(data), str(out)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    for f in tmp.glob("out.onnx*"):
        f.unlink()
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1][:120]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


STARTUP = {
    "python (nothing)": [sys.executable, "-c", "pass"],
    "import numpy": [sys.executable, "-c", "import numpy"],
    "import ml_dtypes": [sys.executable, "-c", "import ml_dtypes"],
    "import onnx": [sys.executable, "-c", "import onnx"],
    "import onnx_ir": [sys.executable, "-c", "import onnx_ir"],
    "onnxshrink --help": [sys.executable, "-m", "onnxshrink", "--help"],
    "onnxshrink passes": [sys.executable, "-m", "onnxshrink", "passes"],
    "onnxshrink inspect": [
        sys.executable, "-m", "onnxshrink", "inspect",
        str(ROOT / "models" / "fixtures" / "digits_cnn.onnx"),
    ],
}  # fmt: skip


def startup(repeats: int = 5) -> None:
    """Median wall seconds of each command in STARTUP, each a fresh process."""
    import statistics
    import time
    from importlib.metadata import version

    print(f"ml_dtypes {version('ml_dtypes')}, onnx {version('onnx')}, onnx-ir {version('onnx-ir')}")
    for name, cmd in STARTUP.items():
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, capture_output=True)
            times.append(time.perf_counter() - t0)
        print(f"{name:20} {statistics.median(times):6.2f} s", flush=True)


def main() -> None:
    from bench.common import cpu_line

    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="digits,mobilenet,resnet18,minilm")
    ap.add_argument("--passes", default=",".join(PASSES))
    ap.add_argument("--target", action="store_true", help="also --target speedup=1.5")
    ap.add_argument("--samples", type=int, help="calibrate on the first N samples")
    ap.add_argument("--json")
    ap.add_argument("--startup", action="store_true", help="only the start-up times")
    args = ap.parse_args()
    if args.startup:
        print(cpu_line())
        return startup()
    tools = [*ANCHORS, *args.passes.split(",")] + (["target:speedup=1.5"] if args.target else [])
    print(cpu_line())
    print(f"{'model':10} {'tool':20} {'seconds':>8} {'x static':>8} {'peak MB':>8}  phases")
    results: dict[str, dict[str, dict]] = {}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for name, model, data in models(args.models.split(","), tmp):
            data = cut(Path(data), args.samples, tmp)
            results[name] = {}
            for tool in tools:
                r = results[name][tool] = run(tool, model, data, tmp)
                if "error" in r:
                    print(f"{name:10} {tool:20} failed: {r['error']}", flush=True)
                    continue
                anchor = results[name].get("ort-static", {}).get("seconds")
                ratio = f"{r['seconds'] / anchor:8.1f}" if anchor else f"{'-':>8}"
                phases = r["phases"]
                status = phases.pop("_status", "")
                top = sorted(phases.items(), key=lambda kv: -kv[1][0])[:4]
                shown = ", ".join(f"{k} {s:.1f} s/{c}" for k, (s, c) in top)
                print(
                    f"{name:10} {tool:20} {r['seconds']:8.1f} {ratio} {r['peak_mb']:8.0f}  "
                    f"{status + ': ' if status else ''}{shown}",
                    flush=True,
                )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

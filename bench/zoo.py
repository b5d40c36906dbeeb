"""Every registered pass, with its defaults, on every zoo model (models/zoo.py): what happened.

    python bench/zoo.py [--models a,b] [--passes p,q] [--json out.json]

Prints one line per (model, pass) as it goes -- status, seconds, reason -- then, per pass, on
how many models it applied, degraded (applied to part of the layers), was unchanged, rolled
back or raised, with the most frequent reasons (:func:`models.zoo.table`). A raise is a bug: the
pass manager turns an exception into a rollback, counted here as "raised".
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models import zoo  # noqa: E402


def run_one(model: str, spec: str) -> dict:
    from onnxshrink import compress

    t0 = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            _, report = compress(
                str(zoo.path(model)),
                [spec],
                data=str(zoo.data(model)),
                output=f"{tmp}/o.onnx",
                metric=zoo.ENTRIES_BY_NAME[model].metric,  # the detector: its own detections
            )
    except Exception as e:  # the whole run failed: the user got an error, not a model
        return {"status": "error", "reason": f"{type(e).__name__}: {e}", "seconds": 0.0}
    rec = report.passes[-1]
    return {
        "status": "partly" if rec.partial else rec.status,
        "raised": rec.traceback is not None,
        "reason": (rec.reason or "").splitlines()[0][:160] if rec.reason else "",
        "skipped": [s.reason for s in rec.skipped],
        "seconds": round(time.perf_counter() - t0, 1),
        "cosine": rec.fidelity.cosine if rec.fidelity else None,
    }


def main() -> None:
    from onnxshrink.passes import REGISTRY

    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default=",".join(zoo.available()))
    ap.add_argument("--passes", default=",".join(REGISTRY))
    ap.add_argument("--json")
    args = ap.parse_args()
    results: dict[str, dict[str, dict]] = {}
    for model in args.models.split(","):
        results[model] = {}
        for spec in args.passes.split(","):
            r = run_one(model, spec)
            results[model][spec] = r
            print(f"{model:20s} {spec:15s} {r['status']:12s} {r['seconds']:7.1f}s  {r['reason']}")
            sys.stdout.flush()
    print()
    print(zoo.table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

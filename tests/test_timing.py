"""Compile-time phases (:mod:`onnxshrink.timing`): what bench/compile_time.py breaks a run into."""

from __future__ import annotations

import onnx

import onnxshrink
from onnxshrink import timing


def test_a_quantize_run_is_broken_into_nested_phases(digits_model, digits_calib):
    timing.reset()
    onnxshrink.compress(onnx.load(str(digits_model)), ["quantize"], data=str(digits_calib))
    t = timing.totals()
    steps = {k: v for k, v in t.items() if k.startswith("quantize: ")}
    assert {"quantize: plan", "quantize: calibrate", "quantize: insert-qdq"} <= set(steps)
    # the steps run inside the pass: their times add up to no more than the pass's
    total, calls = t["pass quantize"]
    assert calls == 1 and 0 < sum(s for s, _ in steps.values()) <= total
    # calibration probes and validation run batches; every pass is validated in a session
    assert t["onnxruntime: run"][1] > 10 and t["onnxruntime: open a session"][1] >= 3
    assert t["after each pass: Validate"][1] == 1
    timing.reset()
    assert timing.totals() == {}

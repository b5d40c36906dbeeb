"""prune on whole networks: the digits CNN (real data, accuracy) and a ResNet-18-style net."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import onnxshrink
from models import resnet
from onnxshrink import metrics
from tests.helpers import op_count, ort_run


def _accuracy(model: onnx.ModelProto, x: np.ndarray, y: np.ndarray) -> float:
    return float((ort_run(model, {"input": x})[0].argmax(1) == y).mean())


@pytest.mark.slow
def test_digits_half_the_channels(digits_model, digits_calib, digits_test):
    x, y = digits_test
    model = onnx.load(str(digits_model))
    out, report = onnxshrink.compress(
        model, ["fold-batchnorm", "prune:ratio=0.5"], data=str(digits_calib)
    )
    prune = report.passes[1]
    assert prune.status == "applied", prune.reason
    assert report.after["macs"] <= 0.6 * report.before["macs"]  # >= 40% fewer MACs (measured 74.5%)
    acc = _accuracy(out, x, y)
    assert acc >= 0.97, acc  # the original: 1.0 on the 400 held-out digits
    assert prune.details["refit"] and all(r["rows"] > 0 for r in prune.details["refit"])


@pytest.mark.slow
def test_digits_refit_beats_no_refit(digits_model, digits_calib, digits_test):
    x, y = digits_test
    model = onnx.load(str(digits_model))
    accs = {}
    for refit in ("true", "false"):
        out, rep = onnxshrink.compress(
            model,
            ["fold-batchnorm", f"prune:ratio=0.6,refit={refit},floor=0"],
            data=str(digits_calib),
        )
        ref = ort_run(model, {"input": x})[0]
        got = ort_run(out, {"input": x})[0]
        cos = (
            np.sum(ref * got, 1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(got, axis=1)
        ).mean()
        accs[refit] = (_accuracy(out, x, y), cos)
    assert accs["true"][1] > accs["false"][1]  # fidelity on held-out digits
    assert accs["true"][0] >= accs["false"][0]


def test_resnet18_prunes_through_residual_add_groups(tmp_path):
    model = resnet.build(width=16, image=64, classes=10)
    n_add = op_count(model, "Add")
    out, report = onnxshrink.compress(model, ["prune:ratio=0.5,floor=0,round=8"])
    rec = report.passes[0]
    assert rec.status == "applied", rec.reason
    groups = rec.details["groups"]
    residual = [g for g in groups if len(g["producers"]) > 1]
    # one residual group per stage: the stem/stage convs joined through the Adds
    assert len(residual) == 4 and op_count(out, "Add") == n_add
    assert report.after["macs"] < 0.4 * report.before["macs"]
    x = np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)
    (y,) = ort_run(out, {"input": x})
    assert y.shape == (2, 10) and np.isfinite(y).all()
    st = metrics.model_stats(ir.from_proto(out), with_bytes=False)
    convs = [lay for lay in st.layers if lay.op_type == "Conv"]
    assert all(lay.output_shape[1] % 8 == 0 for lay in convs)  # rounded to multiples of 8

"""distill: raises fidelity after lossy passes, refuses what it cannot fit, never lowers it."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import onnxshrink
from tests.helpers import ort_run


def _accuracy(model, x, labels) -> float:
    logits = np.concatenate(
        [ort_run(model, {"input": x[i : i + 100]})[0] for i in range(0, len(x), 100)]
    )
    return float((logits.argmax(1) == labels).mean())


def _cosine(model, ref_model, x) -> float:
    a = ort_run(model, {"input": x})[0].astype(np.float64)
    b = ort_run(ref_model, {"input": x})[0].astype(np.float64)
    return float(np.mean(np.sum(a * b, 1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)))


def test_distill_after_pruning_raises_fidelity_on_unseen_data(
    digits_model, digits_calib, digits_test
):
    x, labels = digits_test
    original = onnx.load(str(digits_model))
    base = ["fold-batchnorm", "prune:ratio=0.6,refit=false,floor=0"]
    pruned, rep0 = onnxshrink.compress(original, base, data=str(digits_calib), progress=False)
    distilled, rep1 = onnxshrink.compress(
        original, [*base, "distill"], data=str(digits_calib), progress=False
    )
    rec = rep1.passes[-1]
    assert rec.name == "distill" and rec.status == "applied", rec
    cal = rec.details["calibration_cosine"]
    assert cal["after"] > cal["before"]
    assert len(rec.changed) >= 3
    # pruned layers are fitted to the original's kept channels (prune marks them on the node;
    # the marks are for this run only and do not reach the result)
    kept = rec.details["kept_channels"]
    assert len(kept) >= 4
    assert {r["node"] for r in rec.details["layers"] if r["applied"]} & set(kept)
    assert not any(p.key == "onnxshrink.kept_channels" for n in distilled.graph.node
                   for p in n.metadata_props)  # fmt: skip
    # on the 400 test images (never calibrated on)
    c0, c1 = _cosine(pruned, original, x), _cosine(distilled, original, x)
    a0, a1 = _accuracy(pruned, x, labels), _accuracy(distilled, x, labels)
    assert c1 > c0 + 0.01, (c0, c1)
    assert a1 >= a0, (a0, a1)


def test_distill_refuses_quantized_layers_and_random_data(digits_model, digits_calib):
    original = onnx.load(str(digits_model))
    _, rep = onnxshrink.compress(
        original, ["fold-batchnorm", "quantize", "distill"], data=str(digits_calib), progress=False
    )
    rec = rep.passes[-1]
    assert rec.status == "unchanged"
    assert any("run distill before quantize" in s.reason for s in rec.skipped)
    _, rep = onnxshrink.compress(original, ["distill"], data="random:16", progress=False)
    assert rep.passes[0].status == "unchanged"
    assert "random data" in rep.passes[0].skipped[0].reason


@pytest.mark.parametrize("rescale", [[], ["equalize"]])
def test_distill_on_an_unchanged_model_changes_nothing(digits_model, digits_calib, rescale):
    original = onnx.load(str(digits_model))
    out, rep = onnxshrink.compress(
        original, ["fold-batchnorm", *rescale, "distill"], data=str(digits_calib), progress=False
    )
    # the student is the teacher: every layer's held-out error is 0 already, no re-fit beats it,
    # so every layer is kept as it was (skipped with that reason) and the pass changes nothing;
    # equalized layers too: their targets are the original's outputs times their factors
    rec = rep.passes[-1]
    assert rec.status == "unchanged" and rec.changed == []
    layers = rec.details["layers"]
    assert len(layers) == 12 and not any(layer["applied"] for layer in layers)
    assert all(layer["heldout_error_before"] < 1e-6 for layer in layers)
    assert {s.node for s in rec.skipped} == {layer["node"] for layer in layers}
    assert all("did not lower the held-out error" in s.reason for s in rec.skipped)

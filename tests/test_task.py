"""A user's task metric (``--metric`` / ``metric=``): loaded with one-line errors, called on the
two models' joined outputs, and judged instead of the cosine against a pass's floor."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

import onnxshrink
from onnxshrink.errors import OptionError
from onnxshrink.task import joined, load_metric, score
from tests.test_cli import _assert_one_line_error, run_cli
from tests.test_pipeline import NoisePass

METRIC_FILE = '''
import numpy as np

def exact(reference, candidate):
    """1 when every output agrees within 1e-6, else 0: stricter than any cosine floor."""
    return float(all(np.allclose(reference[k], candidate[k], atol=1e-6) for k in reference))

def broken(reference, candidate):
    raise KeyError("logits")
'''


@pytest.mark.parametrize(
    "spec, needle",
    [
        ("no_colon", "expected MODULE:FUNCTION"),
        ("missing.py:f", "no file 'missing.py'"),
        ("json:no_such_function", "'json' has no function 'no_such_function'"),
        ("no_such_module_xyz:f", "cannot import 'no_such_module_xyz'"),
    ],
)
def test_a_bad_metric_spec_is_one_clear_error(spec, needle):
    with pytest.raises(OptionError, match=needle):
        load_metric(spec)


def test_the_metric_sees_outputs_joined_over_batches():
    seen = {}

    def metric(ref, new):
        seen.update(ref=ref, new=new)
        return 0.5

    batches = [{"y": np.ones((2, 3))}, {"y": np.zeros((1, 3))}]
    assert score(metric, batches, batches) == 0.5
    assert seen["ref"]["y"].shape == (3, 3) and joined([{"s": np.array(1.0)}] * 2)["s"].shape == (
        2,
    )
    with pytest.raises(ValueError, match="must be in"):
        score(lambda r, n: 1.5, batches, batches)
    with pytest.raises(ValueError, match="not a number"):
        score(lambda r, n: "good", batches, batches)


def test_the_floor_is_judged_on_the_metric(tmp_path, digits_model, digits_calib):
    """Noise the cosine floor lets through (cosine > 0.99) breaks an exact task metric."""
    (tmp_path / "task_metric.py").write_text(METRIC_FILE)
    model, data = onnx.load(str(digits_model)), str(digits_calib)
    _, plain = onnxshrink.compress(model, [NoisePass(level=0.01, floor=0.9)], data=data)
    assert plain.passes[0].status == "applied" and plain.passes[0].fidelity.metric is None
    exact = load_metric(f"{tmp_path / 'task_metric.py'}:exact")
    _, gated = onnxshrink.compress(
        model, [NoisePass(level=0.01, floor=0.9)], data=data, metric=exact
    )
    rec = gated.passes[0]
    assert rec.status == "rolled-back"
    assert "task metric with the original 0.00000 < 0.9" in rec.reason
    assert gated.fidelity.metric == 1.0  # the input model against itself


def test_cli_metric(tmp_path, digits_model, digits_calib):
    """``--metric MODULE:FUNCTION`` finds a module in the current folder, from the installed
    ``onnxshrink`` command too (which, unlike ``python -m``, does not put it on sys.path)."""
    (tmp_path / "task_metric.py").write_text(METRIC_FILE)
    out = tmp_path / "out.onnx"
    args = ["compress", str(digits_model), "-o", str(out), "--data", str(digits_calib)]
    script = Path(sys.executable).parent / "onnxshrink"
    if script.exists():
        proc = subprocess.run(
            [str(script), *args, "-p", "fold-batchnorm", "--metric", "task_metric:exact"],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            env={**os.environ, "COLUMNS": "120"},
        )
    else:
        proc = run_cli(*args, "-p", "fold-batchnorm", "--metric", "task_metric:exact", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "metric" in proc.stdout and "1.0000" in proc.stdout  # the summary's metric column
    out.unlink()
    bad = run_cli(*args, "--metric", "task_metric:broken", cwd=tmp_path)
    _assert_one_line_error(bad, 2, "--metric failed on the input model's own outputs", "KeyError")
    assert not out.exists()


def test_the_metric_is_judged_in_the_integer_kernels_too(digits_model, digits_calib, monkeypatch):
    """What users run decides: if onnxruntime's optimized session (the integer kernels) lost the
    task while the model as written kept it, the pass is rolled back, saying where."""
    from onnxshrink.instruments import Validate

    def top1(reference, candidate):
        (name,) = reference
        return float(np.mean(reference[name].argmax(-1) == candidate[name].argmax(-1)))

    model, data = onnx.load(str(digits_model)), str(digits_calib)
    _, fine = onnxshrink.compress(model, ["quantize"], data=data, metric=top1)
    assert fine.passes[0].status == "applied", fine.passes[0].reason
    assert fine.passes[0].kernels["metric"] >= 0.95

    run = Validate._run

    def shuffled_in_kernels(self, path, what, *, optimize=False, model=None):
        outputs = run(self, path, what, optimize=optimize, model=model)
        if optimize and "integer kernels" in what:  # the kernels, not the float reference
            outputs = [{k: np.roll(v, 1, axis=-1) for k, v in b.items()} for b in outputs]
        return outputs

    monkeypatch.setattr(Validate, "_run", shuffled_in_kernels)
    _, lost = onnxshrink.compress(model, ["quantize"], data=data, metric=top1)
    rec = lost.passes[0]
    assert rec.status == "rolled-back"
    assert "task metric with the original in onnxruntime's integer kernels" in rec.reason

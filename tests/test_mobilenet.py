"""Acceptance on MobileNetV2 with real ImageNet weights and real photos (built by models/)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from onnxshrink import cli
from tests.helpers import op_count, ort_run


@pytest.mark.slow
def test_simplify_and_fold_batchnorm_are_exact(mobilenet, photos, tmp_path, capsys):
    src = mobilenet["bn"]
    assert op_count(onnx.load(str(src)), "BatchNormalization") == 52
    out = tmp_path / "mnv2.onnx"
    code = cli.main(
        [
            "compress",
            str(src),
            "-o",
            str(out),
            "-p",
            "simplify",
            "-p",
            "fold-batchnorm",
            "--data",
            str(photos["calib"]),
            "-q",
        ]
    )
    assert code == 0, capsys.readouterr().err
    model = onnx.load(str(out))
    assert op_count(model, "BatchNormalization") == 0
    x = np.load(photos["eval"])["input"]  # evaluation photos: never seen by the pipeline
    ref = np.concatenate(
        [ort_run(str(src), {"input": x[i : i + 30]})[0] for i in range(0, len(x), 30)]
    )
    got = np.concatenate(
        [ort_run(str(out), {"input": x[i : i + 30]})[0] for i in range(0, len(x), 30)]
    )
    assert np.abs(got - ref).max() <= 1e-4
    assert (got.argmax(1) == ref.argmax(1)).all()

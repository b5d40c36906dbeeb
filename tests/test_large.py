"""A model with more than 2 GB of weights in external data goes through the default pipeline."""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest

import onnxshrink
from tests.helpers import ort_run, rand

ROWS, COLS = 560_000, 1024  # 2.29 GB of float32: past protobuf's 2 GiB limit


def _model(tmp_path):
    text = f"""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 3, 8, 8] x, int64[N, 2] ids) => (float[N, 4, 8, 8] y, float[N, 2, {COLS}] e) {{
        c = Conv <pads = [1, 1, 1, 1]> (x, W)
        y = BatchNormalization (c, gamma, beta, mean, var)
        e = Gather (table, ids)
    }}"""
    model = onnx.parser.parse_model(text)
    rng = np.random.default_rng(0)
    for name, arr in {
        "W": rand(rng, 4, 3, 3, 3),
        "gamma": rng.uniform(0.5, 1.5, 4).astype(np.float32),
        "beta": rand(rng, 4),
        "mean": rand(rng, 4),
        "var": rng.uniform(0.5, 1.5, 4).astype(np.float32),
    }.items():
        model.graph.initializer.append(onnx.numpy_helper.from_array(arr, name))
    t = onnx.TensorProto(name="table", data_type=onnx.TensorProto.FLOAT, dims=[ROWS, COLS])
    t.data_location = onnx.TensorProto.EXTERNAL
    for k, v in (("location", "big.onnx.data"), ("offset", "0"), ("length", str(ROWS * COLS * 4))):
        t.external_data.add(key=k, value=v)
    model.graph.initializer.append(t)
    with open(tmp_path / "big.onnx.data", "wb") as f:
        f.truncate(ROWS * COLS * 4)  # sparse: takes no disk until written
        f.write(np.arange(2 * COLS, dtype=np.float32).tobytes())
    onnx.save(model, str(tmp_path / "big.onnx"))
    return tmp_path / "big.onnx"


@pytest.mark.slow
def test_over_2gb_external_data(tmp_path):
    free = shutil.disk_usage(tmp_path).free
    if free < 12 * ROWS * COLS:
        pytest.skip(f"needs ~{12 * ROWS * COLS / 1e9:.0f} GB free disk, have {free / 1e9:.0f} GB")
    src = _model(tmp_path)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out, report = onnxshrink.compress(str(src), output=out_dir / "small.onnx", validate_samples=2)
    statuses = {p.name: p for p in report.passes}
    assert statuses["simplify"].status == "unchanged"
    assert "larger than 2 GB" in statuses["simplify"].skipped[0].reason
    assert statuses["fold-batchnorm"].status == "applied"
    assert statuses["fold-batchnorm"].fidelity.max_abs < 1e-4
    (data,) = out_dir.glob("small.onnx.*.data")  # one data file, named for this run
    assert data.stat().st_size >= ROWS * COLS * 4
    proto = onnx.load(str(out), load_external_data=False)
    assert not any(n.op_type == "BatchNormalization" for n in proto.graph.node)
    x = rand(np.random.default_rng(1), 1, 3, 8, 8)
    ids = np.array([[0, 1]], np.int64)
    y, e = ort_run(str(out), {"x": x, "ids": ids})
    y0, e0 = ort_run(str(src), {"x": x, "ids": ids})
    np.testing.assert_allclose(y, y0, atol=1e-4)
    np.testing.assert_array_equal(e, e0)

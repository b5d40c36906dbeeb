"""Sweeps (onnxshrink/sweep.py): a model run segment by segment gives the whole model's values,
and a change made at a stop reaches every later node."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from onnxshrink.data import Dataset, input_specs
from onnxshrink.sweep import Sweep
from tests.helpers import if_model, make_model, ort_run, rand

# a residual: t is read by two later nodes, one after the other's stop
RESIDUAL = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 8] x, float[N, 8] s) => (float[N, 8] y, int64[2] shape) {
    h = MatMul (x, W)
    t = Relu (h)
    u = MatMul (t, V)
    v = Add (u, t)
    w = Mul (v, s)
    y = Tanh (w)
    shape = Shape (y)
}"""


def _residual():
    rng = np.random.default_rng(0)
    model = make_model(RESIDUAL, {"W": rand(rng, 8, 8), "V": rand(rng, 8, 8)})
    feeds = {
        "x": rng.standard_normal((40, 8)).astype(np.float32),
        "s": rng.standard_normal((40, 8)).astype(np.float32),
    }
    m = ir.from_proto(model)
    return model, m, Dataset(feeds, input_specs(m), "test"), feeds


def test_a_sweep_gives_the_values_of_the_whole_model():
    model, m, data, feeds = _residual()
    names = ["h", "t", "u", "v", "y", "shape"]
    full = dict(zip(names, ort_run(_exposing(model, names), feeds)))
    seen = []
    for name, arrays in Sweep(m, ["y", "t", "shape", "x", "v"], data, None):
        seen.append(name)
        if name == "x":
            np.testing.assert_array_equal(np.concatenate(arrays), feeds["x"])
        elif name == "shape":
            assert all(np.array_equal(a, [16, 8]) or np.array_equal(a, [8, 8]) for a in arrays)
        else:
            np.testing.assert_allclose(np.concatenate(arrays), full[name], rtol=1e-6, atol=1e-6)
    assert seen == ["x", "t", "v", "y", "shape"]  # graph order, whatever order they were asked in
    assert data.batch_size() == 16 and len(Sweep(m, ["t", "v", "y"], data, None)) == 3


def test_a_change_at_a_stop_reaches_every_later_reader_and_nothing_else():
    model, m, data, feeds = _residual()
    got = {}
    for name, arrays in Sweep(m, ["t", "y"], data, 24):
        if name == "t":
            arrays[:] = [np.minimum(a, 0.25) for a in arrays]  # both readers of t see this
        got[name] = np.concatenate(arrays)
    x, s = feeds["x"][:24].astype(np.float64), feeds["s"][:24].astype(np.float64)
    w, v = (const.astype(np.float64) for const in _consts(model, "W", "V"))
    t = np.minimum(np.maximum(x @ w, 0), 0.25)
    np.testing.assert_allclose(got["y"], np.tanh((t @ v + t) * s), rtol=1e-5, atol=1e-5)
    assert got["y"].shape == (24, 8)  # the first 24 samples only
    # the dataset's own arrays are not touched by a change to a graph input's values
    before = data.arrays["x"].copy()
    for name, arrays in Sweep(m, ["x"], data, None):
        arrays[0] *= 0
    np.testing.assert_array_equal(data.arrays["x"], before)


def test_a_weight_changed_before_its_node_runs_is_the_one_used():
    _, m, data, _ = _residual()
    v_node = next(n for n in m.graph if n.outputs[0].name == "u")
    for name, arrays in Sweep(m, ["t", "u"], data, None):
        if name == "t":  # the MatMul reading V has not run yet: a new V takes effect
            v_node.inputs[1].const_value = ir.tensor(np.zeros((8, 8), np.float32))
        else:
            assert name == "u" and all(not a.any() for a in arrays)


def test_a_sweep_runs_if_branches_with_their_captured_values(tmp_path):
    from onnxshrink.data import load_data

    model, x = if_model(width=8)  # x: 8 samples [16, 8], each one run of the model
    m = ir.from_proto(model)
    np.savez(tmp_path / "d.npz", x=x, c=np.ones(len(x), bool))
    data = load_data(str(tmp_path / "d.npz"), input_specs(m))
    for name, arrays in Sweep(m, ["y"], data, 3):
        assert len(arrays) == 3
        for sample, got in zip(x, arrays):
            want = ort_run(model, {"x": sample, "c": np.array(True)})[0]
            np.testing.assert_allclose(got, want, rtol=1e-6)


def test_a_watched_tensor_is_yielded_in_order_without_a_cut():
    model, m, data, feeds = _residual()
    names = ["t", "u", "v", "y"]
    full = dict(zip(names, ort_run(_exposing(model, names), feeds)))
    sweep = Sweep(m, ["v"], data, None, watch=["t", "u", "y"])
    assert len(sweep) == 2  # cut after v only; y, the last one watched, ends the sweep
    seen = []
    for name, arrays in sweep:
        seen.append(name)
        want = np.zeros_like(full["y"]) if name == "y" else full[name]
        np.testing.assert_allclose(np.concatenate(arrays), want, rtol=1e-6, atol=1e-6)
        if name == "v":  # a change at a stop still reaches what is watched after it
            arrays[:] = [np.zeros_like(a) for a in arrays]
    assert seen == ["t", "u", "v", "y"]
    with pytest.raises(KeyError, match="nope"):
        Sweep(m, ["v"], data, None, watch=["nope"])


def test_an_unknown_stop_is_named():
    _, m, data, _ = _residual()
    with pytest.raises(KeyError, match="nope"):
        Sweep(m, ["nope"], data, None)


def _exposing(model, names):
    import onnx

    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.output[:]
    out.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names)
    return out


def _consts(model, *names):
    from onnx import numpy_helper

    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    return [inits[n] for n in names]


def test_external_weights_and_a_whole_run_in_segments(tmp_path):
    """Segments read external data where the model's file is; run_in_segments cut after every
    weight gives the outputs of one session over the whole model."""
    import onnx

    from onnxshrink import io, runtime
    from onnxshrink.sweep import run_in_segments

    model, _, _, feeds = _residual()
    onnx.save(model, tmp_path / "m.onnx", save_as_external_data=True, location="w.bin",
              size_threshold=0)  # fmt: skip
    assert (tmp_path / "w.bin").exists()
    m = io.load(tmp_path / "m.onnx").model
    assert isinstance(m.graph.initializers["W"].const_value, ir.ExternalTensor)
    data = Dataset(feeds, input_specs(m), "test")
    whole = runtime.run(runtime.session(tmp_path / "m.onnx"), data)
    for budget in (0, 1 << 30):  # a cut after each MatMul; none
        parts = run_in_segments(m, data, None, budget=budget)
        assert len(parts) == len(whole) == 3
        for a, b in zip(parts, whole):
            assert a.keys() == b.keys()
            np.testing.assert_allclose(a["y"], b["y"], rtol=1e-6, atol=1e-6)
            np.testing.assert_array_equal(a["shape"], b["shape"])


def test_a_batch_run_in_segments_is_stopped_at_its_bound(tmp_path):
    """A Loop of 10^12 steps, run one segment at a time, ends at the batch's bound; once a
    batch's earlier segments have used it up, the next is not started, and the message names
    the whole bound, not what was left of it."""
    import time

    from onnxshrink import io, runtime
    from onnxshrink.sweep import run_in_segments
    from tests.test_hardening import _endless_loop

    m = io.load(_endless_loop(tmp_path / "loop.onnx")).model
    data = Dataset({"x": np.ones((2, 4), np.float32)}, input_specs(m), "test")
    t0 = time.perf_counter()
    with pytest.raises(runtime.RunTimeout, match="longer than 2 s"):
        run_in_segments(m, data, None, budget=0, timeout=2.0)
    assert time.perf_counter() - t0 < 30
    with pytest.raises(runtime.RunTimeout, match="longer than 30 s"):
        runtime.bounded(None, [], {}, 0.0, bound=30.0)  # nothing left: not started

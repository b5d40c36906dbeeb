"""sparsify: masks (unstructured, per output, global, N:M), exact compact storage, Wanda vs
magnitude."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import onnxshrink
from onnxshrink.passes.sparsify import SparsifyPass, encoded_bytes, nm_mask
from tests.helpers import apply, if_model, make_model, ort_run, rand


def test_nm_mask_keeps_two_of_every_four():
    s = np.random.default_rng(0).random((5, 12))
    keep = nm_mask(s, 2, 4)
    assert keep.reshape(5, 3, 4).sum(2).tolist() == [[2, 2, 2]] * 5
    # the kept ones are the two largest of each group
    g = s.reshape(5, 3, 4)
    assert np.all(
        np.sort(g, 2)[:, :, 2:].sum(2) == pytest.approx((g * keep.reshape(5, 3, 4)).sum(2))
    )
    assert nm_mask(np.ones((2, 6)), 2, 4).sum(1).tolist() == [
        4,
        4,
    ]  # a short tail group keeps its share


def _mlp(rng, scale_in=None):
    w1 = rand(rng, 64, 128, scale=0.2)
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 64] x, float[64, 128] W1, float[128] b1, float[48, 128] W2) => (float[N, 48] y) {
        h = MatMul(x, W1)
        hb = Add(h, b1)
        r = Relu(hb)
        y = Gemm <transB = 1> (r, W2)
    }"""
    return make_model(
        text, {"W1": w1, "b1": rand(rng, 128, scale=0.1), "W2": rand(rng, 48, 128, scale=0.2)}
    )


@pytest.mark.parametrize("values", ["float", "int8"])
def test_mask_storage_decodes_to_the_sparse_weights(values):
    rng = np.random.default_rng(1)
    model = _mlp(rng)
    dense, _ = apply(
        SparsifyPass(sparsity=0.7, method="magnitude", storage="dense", min_size=16), model
    )
    packed, modified = apply(
        SparsifyPass(sparsity=0.7, method="magnitude", storage="mask", values=values, min_size=16),
        model,
    )
    assert modified
    assert any(n.op_type == "CumSum" for n in packed.graph.node)
    x = rand(rng, 8, 64)
    ref, got = ort_run(dense, {"x": x})[0], ort_run(packed, {"x": x})[0]
    if values == "float":
        np.testing.assert_array_equal(got, ref)  # lossless beyond the zeros
    else:
        assert np.abs(got - ref).max() < 0.02 * np.abs(ref).max()
    for optimize in (True, False):  # onnxruntime folds the decoder or runs it: same result
        np.testing.assert_allclose(ort_run(packed, {"x": x}, optimize=optimize)[0], got, atol=1e-6)
    dense_w = {i.name: onnx.numpy_helper.to_array(i) for i in dense.graph.initializer}
    w1 = next(v for k, v in dense_w.items() if v.shape == (64, 128))
    assert abs((w1 == 0).mean() - 0.7) < 0.01
    assert packed.ByteSize() < (0.45 if values == "float" else 0.25) * model.ByteSize()


@pytest.mark.parametrize("values", ["float", "int8"])
def test_onnxruntime_folds_the_decoder_at_load(tmp_path, values):
    # an unfolded decoder rebuilds every weight on every run (found: NonZero and DequantizeLinear
    # are not folded; MobileNetV2 ran 7-8× slower)
    import onnxruntime as ort

    packed, _ = apply(
        SparsifyPass(sparsity=0.5, method="magnitude", storage="mask", min_size=16, values=values),
        _mlp(np.random.default_rng(5)),
    )
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "opt.onnx")
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    ort.InferenceSession(packed.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    ops = {n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node}
    assert ops <= {"MatMul", "Add", "Relu", "Gemm"}, ops


def test_encoded_bytes():
    assert encoded_bytes(8000, 4000, "float") == 1000 + 16000
    assert encoded_bytes(8000, 1600, "int8") == 1000 + 1600


def test_scopes_and_patterns():
    rng = np.random.default_rng(2)
    model = _mlp(rng)
    for opts, check in (
        ({"scope": "output"}, lambda w: np.allclose((w == 0).mean(1), 0.5, atol=0.01)),
        ({"scope": "layer"}, lambda w: abs((w == 0).mean() - 0.5) < 0.01),
        ({"pattern": "2:4"}, lambda w: (w.reshape(w.shape[0], -1, 4) == 0).sum(2).min() >= 2),
    ):
        p = SparsifyPass(sparsity=0.5, method="magnitude", storage="dense", min_size=16, **opts)
        out, _ = apply(p, model)
        w2 = next(
            onnx.numpy_helper.to_array(i)
            for i in out.graph.initializer
            if tuple(i.dims) == (48, 128)
        )
        assert check(w2), opts
    p = SparsifyPass(sparsity=0.6, method="magnitude", storage="dense", scope="global", min_size=16)
    out, _ = apply(p, model)
    ws = [onnx.numpy_helper.to_array(i) for i in out.graph.initializer if len(i.dims) == 2]
    assert abs(sum((w == 0).sum() for w in ws) / sum(w.size for w in ws) - 0.6) < 0.01


def test_activation_aware_beats_magnitude_when_inputs_differ_in_scale(tmp_path):
    rng = np.random.default_rng(3)
    model = _mlp(rng)
    scales = np.exp(rng.normal(0, 1.5, 64)).astype(np.float32)  # features on very different scales
    x = rng.standard_normal((300, 64)).astype(np.float32) * scales
    np.savez(tmp_path / "c.npz", x=x[:200])
    ref = ort_run(model, {"x": x[200:]})[0]
    err = {}
    for method in ("magnitude", "activation"):
        out, rep = onnxshrink.compress(
            model,
            [f"sparsify:sparsity=0.5,method={method},min-size=16,floor=0"],
            data=tmp_path / "c.npz",
            holdout=0,
        )
        assert rep.passes[0].details["method"] == method
        err[method] = np.linalg.norm(ort_run(out, {"x": x[200:]})[0] - ref) / np.linalg.norm(ref)
    # measured: 0.269 against 0.380 relative output error on held-out rows
    assert err["activation"] < err["magnitude"], err


def test_refusals():
    rng = np.random.default_rng(4)
    model = _mlp(rng)
    p = SparsifyPass(min_size=100_000)
    _, modified = apply(p, model)
    assert not modified and all("min-size" in s.reason for s in p.skipped)
    with pytest.raises(onnxshrink.errors.OptionError):
        SparsifyPass(pattern="4:2")
    with pytest.raises(onnxshrink.errors.OptionError):
        SparsifyPass(sparsity=1.0)


def test_digits_half_sparse(digits_model, digits_calib, digits_test):
    x, labels = digits_test
    out, rep = onnxshrink.compress(
        onnx.load(str(digits_model)),
        ["fold-batchnorm", "sparsify:sparsity=0.5,floor=0"],
        data=str(digits_calib),
    )
    rec = rep.passes[-1]
    assert rec.status == "applied" and rec.details["method"] == "activation"
    before, after = rec.details["weight_bytes"]
    assert after < 0.56 * before
    assert rep.after["macs"] == rep.before["macs"]  # dense kernels: MACs (and speed) unchanged
    acc = float((ort_run(out, {"input": x})[0].argmax(1) == labels).mean())
    assert acc >= 0.9, acc  # measured 94.25% (magnitude: 90.5%)


def test_two_convs_of_different_kernels_reading_one_tensor(tmp_path):
    # found by tests/test_properties.py: a 3×3 and a 1×1 conv on the same input (a Concat of two
    # branches) shared one norm vector sized for the last of them -> broadcast error
    rng = np.random.default_rng(6)
    model = make_model(
        """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 8, 6, 6] x, float[4, 8, 3, 3] A, float[6, 8, 1, 1] B, float[8, 2, 3,
        3] D) => (float[N, 18, 6, 6] y) {
        a = Conv <pads = [1, 1, 1, 1]> (x, A)
        b = Conv (x, B)
        d = Conv <pads = [1, 1, 1, 1], group = 4> (x, D)
        y = Concat <axis = 1> (a, b, d)
    }""",
        {"A": rand(rng, 4, 8, 3, 3), "B": rand(rng, 6, 8, 1, 1), "D": rand(rng, 8, 2, 3, 3)},
    )
    np.savez(tmp_path / "c.npz", x=rng.standard_normal((16, 8, 6, 6)).astype(np.float32))
    out, rep = onnxshrink.compress(
        model,
        ["sparsify:sparsity=0.5,method=activation,min-size=16,floor=0"],
        data=tmp_path / "c.npz",
        holdout=0,
    )
    rec = rep.passes[0]
    assert rec.status == "applied", rec.reason
    assert sorted(r["sparsity"] for r in rec.details["layers"]) == [0.5, 0.5, 0.5]


@pytest.mark.parametrize("opset", [11, 12])
def test_the_decoder_is_valid_in_the_models_opset(opset):
    """Paddle exports are opset 11-12, where Unsqueeze takes its axes as an attribute."""
    rng = np.random.default_rng(2)
    model = _mlp(rng)
    model.opset_import[0].version = opset
    out, modified = apply(SparsifyPass(sparsity=0.5, storage="mask", min_size=16), model)
    assert modified
    onnx.checker.check_model(out, full_check=True)
    x = rand(rng, 4, 64)
    dense, _ = apply(SparsifyPass(sparsity=0.5, storage="dense", min_size=16), model)
    np.testing.assert_array_equal(ort_run(out, {"x": x})[0], ort_run(dense, {"x": x})[0])


def test_a_model_older_than_opset_11_is_left_alone_with_the_reason():
    text = """
    <ir_version: 5, opset_import: ["" : 10]>
    g (float[N, 64] x, float[64, 128] W1) => (float[N, 128] y) {
        y = MatMul(x, W1)
    }"""
    model = make_model(text, {"W1": rand(np.random.default_rng(3), 64, 128)})
    p = SparsifyPass(sparsity=0.5, storage="mask", min_size=16)
    _, modified = apply(p, model)
    assert not modified and "opset 10" in p.skipped[0].reason


def test_weights_inside_if_branches_are_sparsified(tmp_path):
    """Both branches of an If are sparsified by magnitude (the data's activations inside a body
    cannot be probed), and either branch decodes its weight exactly to the masked one."""
    model, x = if_model()
    np.savez(tmp_path / "d.npz", x=x, c=np.ones(len(x), bool))
    out, report = onnxshrink.compress(model, ["sparsify:floor=0"], data=str(tmp_path / "d.npz"))
    rec = report.passes[0]
    assert rec.status == "applied", rec.reason
    assert sorted(r["node"] for r in rec.details["layers"]) == ["a_mm", "b_mm"]
    assert all(r["sparsity"] == 0.5 and r["form"] == "mask" for r in rec.details["layers"])
    branches = {a.name: a.g for a in model.graph.node[0].attribute}
    for cond, branch in ((True, "then_branch"), (False, "else_branch")):  # the untaken one too
        w = onnx.numpy_helper.to_array(branches[branch].node[0].attribute[0].t)
        kept = np.where(np.abs(w) >= np.median(np.abs(w), axis=0, keepdims=True), w, 0)
        got = ort_run(out, {"x": x[0], "c": np.array(cond)})[0]
        np.testing.assert_allclose(got, x[0] @ kept, rtol=1e-4, atol=1e-4)

"""Hessian-aware (GPTQ) rounding and depthwise range balancing: the math, then in the passes."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir

from onnxshrink import marks
from onnxshrink.analysis.balance import apply_balance, balance_pairs, choose_alpha
from onnxshrink.analysis.rounding import hessian_round, output_error
from onnxshrink.passes.cluster_weights import ClusterWeightsPass
from onnxshrink.passes.quantize import QuantizePass
from tests.helpers import make_model, ort_run, rand
from tests.passes.test_quantize import _cosine, _data, _run


def _correlated(rng, n, d, mean=0.0):
    """Rows with strongly correlated features, as neighbouring pixels and channels are."""
    mix = rng.standard_normal((d, d)) / np.sqrt(d) + np.eye(d)
    return rng.standard_normal((n, d)) @ mix + mean


def _int8_grid(W):
    s = np.abs(W).max(1, keepdims=True) / 127.0  # per output (W is [G, d, o])
    return s, (lambda rows, _src: np.clip(np.round(rows / s[:, 0, :]), -127, 127) * s[:, 0, :])


def _errors(X, W):
    H = (X.T @ X)[None]
    s, project = _int8_grid(W)
    nearest = np.clip(np.round(W / s), -127, 127) * s
    hess = hessian_round(H, W, project, bias=False)
    assert np.allclose(np.round(hess / s) * s, hess)  # every weight on its grid
    return output_error(H, W, nearest), output_error(H, W, hess)


def test_hessian_rounding_lowers_output_error_on_correlated_inputs():
    rng = np.random.default_rng(0)
    W = rng.standard_normal((1, 64, 32))
    e_near, e_hess = _errors(_correlated(rng, 4000, 64), W)
    assert e_hess < e_near, (e_hess, e_near)  # measured 1.7x lower
    # inputs whose energy lies in 8 of 64 directions (as im2col patches mostly do): the rounding
    # errors can be moved into the 56 quiet ones, so the output error falls by far more than d/r
    X = rng.standard_normal((4000, 8)) @ rng.standard_normal((8, 64)) + 0.1 * rng.standard_normal(
        (4000, 64)
    )
    e_near, e_hess = _errors(X, W)
    assert e_hess < e_near / 8, (e_hess, e_near)  # measured ~30x


def test_bias_row_absorbs_the_mean_shift():
    rng = np.random.default_rng(1)
    X = _correlated(rng, 4000, 16, mean=3.0)  # a large input mean: rounding shifts the output mean
    W = np.concatenate([rng.standard_normal((16, 8)), rng.standard_normal((1, 8))])[None]
    Xa = np.concatenate([X, np.ones((len(X), 1))], 1)
    s, project = _int8_grid(W[:, :-1])
    hess = hessian_round((Xa.T @ Xa)[None], W, project, bias=True)
    shift = (Xa @ (hess[0] - W[0])).mean(0)
    nearest = W.copy()
    nearest[0, :-1] = np.clip(np.round(W[0, :-1] / s[0]), -127, 127) * s[0]
    shift_nearest = (Xa @ (nearest[0] - W[0])).mean(0)
    assert np.abs(shift).max() < 0.05 * np.abs(shift_nearest).max()


def test_weights_on_the_grid_and_dead_inputs_stay():
    rng = np.random.default_rng(2)
    X = _correlated(rng, 500, 9)
    X[:, 4] = 0.0  # an input that never fires
    G = 6  # depthwise-like: one small system per group
    W = np.round(rng.standard_normal((G, 9, 1)) * 50) / 50
    s = np.full((G, 1), 1 / 50)
    H = np.broadcast_to(X.T @ X, (G, 9, 9)).copy()
    out = hessian_round(H, W, lambda rows, _src: np.round(rows / s) * s, bias=False)
    np.testing.assert_allclose(out, W, atol=1e-12)


def test_grams_in_small_chunks_equal_one_pass(tmp_path):
    from onnxshrink.analysis.rounding import chunks_needed, iter_grams

    model = ir.from_proto(_block())
    nodes = [n for n in model.graph if n.op_type == "Conv"]
    data = _data(_block(), 24)
    whole = {id(n): h for n, h, _ in iter_grams(model, nodes, data, tmp_path, 24)}
    budget = 9 * 9 * 8 * 32 + 1  # room for the depthwise conv's Grams alone: one layer per pass
    assert chunks_needed(nodes, budget) == 3
    for n, h, rows in iter_grams(model, nodes, data, tmp_path, 24, budget=budget):
        # batches of 16 and 8 samples of 8x8 positions, each sampled down to 64 rows per input
        cap = 64 * (h.shape[-1])
        assert rows == min(16 * 64, cap) + min(8 * 64, cap), (rows, h.shape)
        np.testing.assert_allclose(h, whole[id(n)], rtol=1e-12)
        assert h.shape == (
            (32, 10, 10) if n.attributes.get_int("group", 1) == 32 else (1, h.shape[1], h.shape[1])
        )


# -- in the passes ---------------------------------------------------------------------------
NET = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 8, 8, 8] x, float[32, 8, 1, 1] W1, float[32] b1, float lo, float hi,
   float[32, 1, 3, 3] D, float[32] db, float[16, 32, 1, 1] W2, float[16] b2) => (float[N, 16, 8,
       8] y) {
    e = Conv (x, W1, b1)
    r = Clip (e, lo, hi)
    d = Conv <group = 32, pads = [1, 1, 1, 1]> (r, D, db)
    r2 = Clip (d, lo, hi)
    y = Conv (r2, W2, b2)
}"""


def _block(seed=0):
    """An inverted-residual block whose expand channels differ in range by up to 100x."""
    rng = np.random.default_rng(seed)
    spread = np.geomspace(0.01, 1.0, 32).astype(np.float32)
    rng.shuffle(spread)
    inits = {
        "W1": rand(rng, 32, 8, 1, 1, scale=0.6) * spread[:, None, None, None],
        "b1": rand(rng, 32, scale=0.01),
        "lo": np.array(0, np.float32),
        "hi": np.array(6, np.float32),
        "D": rand(rng, 32, 1, 3, 3, scale=0.5) / spread[:, None, None, None],
        "db": rand(rng, 32, scale=0.1),
        "W2": rand(rng, 16, 32, 1, 1, scale=0.3),
        "b2": rand(rng, 16, scale=0.1),
    }
    return make_model(NET, inits)


def test_balance_is_exact_on_calibration_data():
    model = _block()
    x = _data(model, 32).arrays["x"]
    m = ir.from_proto(model)
    pairs = balance_pairs(m.graph)
    # expand -> depthwise, and depthwise -> pointwise projection
    assert [[u.attributes.get_int("group", 1) for u in p.consumers] for p in pairs] == [[32], [1]]
    assert pairs[0].pointwise == [] and len(pairs[1].pointwise) == 1
    e = ort_run(model, {"x": x})[0]
    r = np.clip(ort_run(_with_output(model, "r"), {"x": x})[1], 0, 6)
    s = apply_balance(m.graph, pairs[0], np.abs(r).max((0, 2, 3)), 0.5)
    assert s.min() >= 1.0 and s.max() > 3.0  # channels 100x apart: the small ones scaled up
    balanced = ir.to_proto(m)
    r2 = np.clip(ort_run(_with_output(balanced, "d"), {"x": x})[1], 0, 6)
    s2 = apply_balance(m.graph, pairs[1], np.abs(r2).max((0, 2, 3)), 0.5)
    assert s2.max() > 1.0
    # each producer records its factors, for the fits that compare it with the original
    np.testing.assert_allclose(marks.channel_scale(pairs[0].producer), s, rtol=1e-7)
    np.testing.assert_allclose(marks.channel_scale(pairs[1].producer), s2, rtol=1e-7)
    np.testing.assert_allclose(ort_run(ir.to_proto(m), {"x": x})[0], e, rtol=1e-4, atol=1e-5)


def test_balance_refuses_what_does_not_commute_with_scaling():
    rng = np.random.default_rng(0)
    inits = onnx_inits(_block())
    inits["lo"] = np.array(0.5, np.float32)  # Clip(0.5, 6): a floor above 0 moves with the scale
    assert balance_pairs(ir.from_proto(make_model(NET, inits)).graph) == []
    plain = NET.replace("<group = 32, pads", "<pads").replace(
        "float[32, 1, 3, 3] D", "float[32, 32, 3, 3] D"
    )
    inits = dict(onnx_inits(_block()), D=rand(rng, 32, 32, 3, 3, scale=0.1))
    pairs = balance_pairs(ir.from_proto(make_model(plain, inits)).graph)
    # a dense 3x3 reader mixes channels over a window: refused; its 1x1 reader is not
    assert [p.consumers[0].inputs[1].name for p in pairs] == ["W2"]


def test_pointwise_readers_get_the_alpha_with_the_least_output_error():
    rng = np.random.default_rng(3)
    spread = np.geomspace(0.01, 1.0, 32).astype(np.float32)  # ranges 100x apart, each channel
    w2 = rand(rng, 16, 32, 1, 1, scale=0.3) / spread[:, None, None]
    inits = dict(onnx_inits(_block()), W2=w2)
    model = ir.from_proto(make_model(NET, inits))  # as strong in the output: balancing pays
    pair = balance_pairs(model.graph)[1]
    x = (rng.random((4096, 32)) * spread).astype(np.float32)
    alpha, errors = choose_alpha(pair, x, x.max(0), 0.5)
    # measured 54x lower at alpha 0.5 (0.016 -> 0.0003)
    assert alpha is not None and errors[f"{alpha:g}"] < 0.1 * errors["none"], errors
    even = rng.random((4096, 32)).astype(np.float32)  # channels alike: nothing to balance
    alpha, errors = choose_alpha(pair, even, even.max(0), 0.5)
    assert alpha is None or errors[f"{alpha:g}"] > 0.9 * errors["none"], errors
    depthwise = balance_pairs(model.graph)[0]  # its readers pay nothing: alpha as given
    assert choose_alpha(depthwise, x, x.max(0), 0.5) == (0.5, {})


def onnx_inits(model):
    return {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}


def _with_output(model, name):
    m = onnx.ModelProto()
    m.CopyFrom(model)
    m.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    return m


def test_balance_and_hessian_rounding_raise_quantized_fidelity():
    model = _block()
    data = _data(model, 128)
    x = _data(model, 64, seed=9).arrays["x"]
    ref = ort_run(model, {"x": x})[0]
    cos = {}
    for label, opts in {
        "plain": {"balance": "off", "rounding": "nearest"},
        "balanced": {"rounding": "nearest"},
        "both": {},
    }.items():
        out, modified = _run(QuantizePass(calibration="minmax", **opts), model, data)
        assert modified
        cos[label] = _cosine(ref, ort_run(out, {"x": x}, optimize=True)[0])
    # the small channels get up to 10x (= sqrt(100)) finer steps after balancing
    assert 1 - cos["balanced"] < 0.5 * (1 - cos["plain"]), (
        cos
    )  # measured 24x lower (1.0e-2 -> 4.3e-4)
    assert cos["both"] >= cos["balanced"] - 1e-5, cos


def _images(model, n, seed):
    """Image-like inputs: smooth in space (4x4 noise upsampled to 8x8) and correlated across
    channels -- the structure that Hessian-aware rounding uses (white noise has none)."""
    mix = np.eye(8) + 0.5 * np.random.default_rng(0).standard_normal((8, 8))  # one distribution
    rng = np.random.default_rng(seed)
    low = rng.standard_normal((n, 8, 4, 4))
    x = np.einsum("dc,nchw->ndhw", mix, low).repeat(2, 2).repeat(2, 3)
    x = x + 0.05 * rng.standard_normal(x.shape)
    d = _data(model, n, seed)
    d.arrays["x"] = x.astype(np.float32)
    return d


def test_cluster_hessian_assignment_beats_nearest():
    model = _block(3)
    data = _images(model, 128, 1)
    x = _images(model, 64, 9).arrays["x"]
    ref = ort_run(model, {"x": x})[0]
    err = {}
    for rounding in ("nearest", "hessian"):
        out, modified = _run(
            ClusterWeightsPass(bits=4, min_size=256, rounding=rounding), model, data
        )
        assert modified
        err[rounding] = 1 - _cosine(ref, ort_run(out, {"x": x})[0])
    assert err["hessian"] < 0.85 * err["nearest"], err  # measured 0.71x (MobileNetV2: 0.48x)


def test_too_few_calibration_rows_fall_back_to_nearest():
    from tests.passes.test_quantize import _net

    model = _net()
    p = QuantizePass()
    _, modified = _run(p, model, _data(model, 6))  # the Gemm sees 6 rows for its 9 inputs
    assert modified
    reasons = p.details["nearest_rounding"]
    assert any("calibration rows" in r for r in reasons.values()), reasons
    assert p.details["rounding"]["layers"] >= 1  # the convs (6 x 64 positions) still get it

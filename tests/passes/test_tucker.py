"""tucker: MAC formula, rank selection, exactness at full rank, refusals, digits accuracy."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import onnxshrink
from onnxshrink.analysis.ranks import energy_rank, evbmf_rank, round_rank
from onnxshrink.passes.tucker_conv import TuckerConvPass, speedup_ranks, tucker_macs
from tests.helpers import apply, make_model, op_count, ort_run, rand


def test_mac_formula_and_speedup_two_at_256_channels():
    # C_in = C_out = 256, 3x3: C·R + R²·9 + R·C per pixel against C²·9
    assert tucker_macs(256, 256, 128, 128, 3) == 256 * 128 + 128 * 128 * 9 + 128 * 256
    assert tucker_macs(64, 64, 32, 32, 3, stride=2) == 4 * 64 * 32 + 32 * 32 * 9 + 32 * 64
    r_in, r_out = speedup_ranks(256, 256, 3, 3, 2.0, 1, 8)
    assert r_in == r_out
    assert abs(r_in - 0.604 * 256) <= 8  # within one rounding step of r ≈ 0.604
    assert tucker_macs(256, 256, r_in, r_out, 3) <= 256 * 256 * 9 / 2  # the budget holds
    assert tucker_macs(256, 256, r_in + 8, r_out + 8, 3) > 256 * 256 * 9 / 2  # and is the largest


def test_rank_helpers():
    s = np.array([10.0, 5.0, 1.0, 0.1])
    assert energy_rank(s, 0.79) == 1 and energy_rank(s, 0.8) == 2 and energy_rank(s, 1.0) == 4
    assert (
        round_rank(154.6, 256, 8) == 152
        and round_rank(3, 8, 8) == 3
        and round_rank(300, 256, 8) == 256
    )
    rng = np.random.default_rng(0)
    low = rng.standard_normal((64, 6)) @ rng.standard_normal(
        (6, 200)
    ) * 3 + 0.1 * rng.standard_normal((64, 200))
    assert 4 <= evbmf_rank(low) <= 8  # the planted rank 6 is found in the noise


def _conv_model(c_in, c_out, k, *, stride=1, dilation=1, pad=1, bias=True, size=10, seed=0):
    rng = np.random.default_rng(seed)
    b = f", float[{c_out}] b" if bias else ""
    text = f"""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2, {c_in}, {size}, {size}] x, float[{c_out}, {c_in}, {k}, {k}] W{b}) => (float[2,
        {c_out}, ?, ?] y) {{
        y = Conv <strides = [{stride}, {stride}], dilations = [{dilation}, {dilation}],
            pads = [{pad}, {pad}, {pad}, {pad}]> (x, W{", b" if bias else ""})
    }}"""
    inits = {"W": rand(rng, c_out, c_in, k, k)}
    if bias:
        inits["b"] = rand(rng, c_out)
    return make_model(text, inits), {"x": rand(rng, 2, c_in, size, size)}


@pytest.mark.parametrize("mode", ["tucker", "spatial"])
@pytest.mark.parametrize(
    "stride,dilation,pad,bias",
    [(1, 1, 1, True), (2, 1, 1, False), (1, 2, 2, True), (2, 1, 0, True)],
)
def test_full_rank_reproduces_the_convolution(mode, stride, dilation, pad, bias):
    model, feeds = _conv_model(16, 24, 3, stride=stride, dilation=dilation, pad=pad, bias=bias)
    import onnx_ir as ir

    # full rank never cuts MACs (the pass would refuse it): call the rewrite directly
    p = TuckerConvPass(mode=mode, rank=1.0, round=0, refit=False, min_channels=1)
    m = ir.from_proto(model)
    node = next(iter(m.graph))
    arr = node.inputs[1].const_value.numpy()
    ranks = (24, 16) if mode == "tucker" else (min(16 * 3, 24 * 3),)
    p._rewrite(m.graph, node, arr, ranks)
    out = ir.to_proto(m)
    onnx.checker.check_model(out, full_check=True)
    assert op_count(out, "Conv") == (3 if mode == "tucker" else 2)
    ref, got = ort_run(model, feeds)[0], ort_run(out, feeds)[0]
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)


def test_speedup_two_decomposes_and_reports_ranks():
    model, feeds = _conv_model(64, 64, 3, size=12)
    p = TuckerConvPass(speedup=2.0, refit=False)
    out, modified = apply(p, model)
    assert modified and op_count(out, "Conv") == 3
    (layer,) = p.details["layers"]
    assert layer["ranks"] == [32, 32]  # r ≈ 0.604·64 = 38.7, rounded down to a multiple of 8
    assert layer["macs_after"] <= layer["macs_before"] / 2
    ref, got = ort_run(model, feeds)[0], ort_run(out, feeds)[0]
    assert got.shape == ref.shape


@pytest.mark.parametrize(
    "text_mod,reason",
    [
        ("group", "grouped or depthwise"),
        ("1x1", "1×1 kernel"),
        ("small", "fewer than 16 channels"),
    ],
)
def test_refusals(text_mod, reason):
    if text_mod == "group":
        text = """<ir_version: 8, opset_import: ["" : 17]>
        g (float[1, 32, 8, 8] x, float[32, 1, 3, 3] W) => (float[1, 32, 6,
            6] y) { y = Conv <group = 32> (x, W) }"""
        inits = {"W": rand(np.random.default_rng(0), 32, 1, 3, 3)}
    elif text_mod == "1x1":
        text = """<ir_version: 8, opset_import: ["" : 17]>
        g (float[1, 32, 8, 8] x, float[32, 32, 1, 1] W) => (float[1, 32, 8, 8] y) {
            y = Conv (x, W)
        }"""
        inits = {"W": rand(np.random.default_rng(0), 32, 32, 1, 1)}
    else:
        text = """<ir_version: 8, opset_import: ["" : 17]>
        g (float[1, 8, 8, 8] x, float[8, 8, 3, 3] W) => (float[1, 8, 6, 6] y) { y = Conv (x, W) }"""
        inits = {"W": rand(np.random.default_rng(0), 8, 8, 3, 3)}
    p = TuckerConvPass()
    _, modified = apply(p, make_model(text, inits))
    assert modified is False and reason in p.skipped[0].reason


def test_refuses_when_macs_would_not_drop():
    model, _ = _conv_model(16, 16, 3)
    p = TuckerConvPass(rank=1.0, round=0)
    _, modified = apply(p, model)
    assert modified is False and "would not cut MACs" in p.skipped[0].reason


def test_vbmf_never_collapses_to_rank_one():
    rng = np.random.default_rng(3)
    text = """<ir_version: 8, opset_import: ["" : 17]>
    g (float[1, 32, 8, 8] x, float[32, 32, 3, 3] W) => (float[1, 32, 6, 6] y) { y = Conv (x, W) }"""
    w = (
        np.outer(rng.standard_normal(32), rng.standard_normal(32 * 9))
        .reshape(32, 32, 3, 3)
        .astype(np.float32)
    )
    w += 0.01 * rand(rng, 32, 32, 3, 3)  # essentially rank one
    p = TuckerConvPass(vbmf=True, refit=False)
    _, modified = apply(p, make_model(text, {"W": w}))
    assert modified
    assert min(p.details["layers"][0]["ranks"]) >= 8  # floor: min-rank 0.1 of 32 -> 4, rounded to 8


def test_bad_options():
    from onnxshrink.errors import OptionError

    with pytest.raises(OptionError, match="one of"):
        TuckerConvPass(rank=0.5, speedup=2.0)
    with pytest.raises(OptionError, match="speedup"):
        TuckerConvPass(speedup=0.5)


@pytest.mark.slow
def test_digits_speedup_two_keeps_accuracy(digits_model, digits_calib, digits_test):
    x, y = digits_test
    model = onnx.load(str(digits_model))
    out, rep = onnxshrink.compress(
        model, ["fold-batchnorm", "tucker:speedup=2"], data=str(digits_calib)
    )
    t = rep.passes[1]
    assert t.status == "applied", t.reason
    assert all(len(layer["ranks"]) == 2 for layer in t.details["layers"])
    acc = (ort_run(out, {"input": x})[0].argmax(1) == y).mean()
    assert acc >= 0.98, acc  # measured 0.9975 (0.5525 without re-fit)
    assert rep.after["macs"] < 0.5 * rep.before["macs"]


def test_ranks_beyond_what_the_core_can_hold_are_cut_without_a_warning(recwarn):
    """R_out <= R_in·kh·kw (and the other way): a 3×1 kernel on 8 channels has at most 24."""
    from onnxshrink.passes.tucker_conv import tucker2

    w = np.random.default_rng(0).standard_normal((96, 8, 3, 1))
    u_out, core, u_in = tucker2(w, 80, 8)
    assert u_out.shape == (96, 24) and core.shape == (24, 8, 3, 1) and u_in.shape == (8, 8)
    assert not [w for w in recwarn if "n_eigenvecs" in str(w.message)]

"""insert-qdq, fold-qdq, quantize: structure onnxruntime fuses, calibration, refusals, accuracy."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import onnxshrink
from onnxshrink.analysis.cascade import cascade_calibrate
from onnxshrink.analysis.qplan import quantize_weight
from onnxshrink.analysis.ranges import (
    RangeStats,
    choose_range,
    clipped_copy,
    grid_bounds,
    percentile_range,
    percentile_tails,
    qparams,
)
from onnxshrink.analysis.saturation import unsafe_layers
from onnxshrink.data import Dataset, input_specs
from onnxshrink.passes.base import PassContext
from onnxshrink.passes.quantize import FoldQDQPass, InsertQDQPass, QuantizePass
from tests import emulated_cpu
from tests.helpers import apply, make_model, op_count, ort_run, rand

NET = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 3, 8, 8] x, float[8, 3, 3, 3] W1, float[8] b1, float[8, 8, 3, 3] W2, float[8] b2,
   float[10, 8] G, float[10] gb, float lo, float hi) => (float[N, 10] y) {
    h = Conv <pads = [1, 1, 1, 1]> (x, W1, b1)
    r = Relu (h)
    k = Conv <pads = [1, 1, 1, 1]> (r, W2, b2)
    c = Clip (k, lo, hi)
    s = Add (c, r)
    m = MaxPool <kernel_shape = [2, 2], strides = [2, 2]> (s)
    p = GlobalAveragePool (m)
    f = Flatten (p)
    y = Gemm <transB = 1> (f, G, gb)
}"""


def _net(seed=0):
    rng = np.random.default_rng(seed)
    inits = {
        "W1": rand(rng, 8, 3, 3, 3, scale=0.5),
        "b1": rand(rng, 8, scale=0.1),
        "W2": rand(rng, 8, 8, 3, 3, scale=0.2),
        "b2": rand(rng, 8, scale=0.1),
        "G": rand(rng, 10, 8),
        "gb": rand(rng, 10),
        "lo": np.array(0, np.float32),
        "hi": np.array(6, np.float32),
    }
    return make_model(NET, inits)


def _data(model, n=64, seed=1, random=False):
    specs = input_specs(ir.from_proto(model))
    rng = np.random.default_rng(seed)
    arrays = {
        s.name: rng.standard_normal((n, *[d or 1 for d in s.dims[1:]])).astype(np.float32)
        for s in specs
    }
    return Dataset(arrays, specs, "test", is_random=random)


def _run(pass_, model, data):
    pass_.context = PassContext(data=data)
    return apply(pass_, model)


def _pair_safe(model: onnx.ModelProto) -> bool:
    """No int8 weight pair breaks |w_a + w_b| <= 128 in the kernels' order: the integer kernels
    give the same results with and without VNNI (:mod:`onnxshrink.analysis.saturation`)."""
    return unsafe_layers(ir.from_proto(model)) == {}


def _cosine(a, b):
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    return float((np.sum(a * b, 1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).mean())


def test_quantize_structure_onnxruntime_fuses():
    model = _net()
    data = _data(model)
    out, modified = _run(
        QuantizePass(stem="int8"), model, data
    )  # every Conv quantized: the stem too
    assert modified
    init = {i.name: i for i in out.graph.initializer}
    producers = {o: n for n in out.graph.node for o in n.output}
    # activations fused: no Relu / Clip left between a Conv and its Q
    assert op_count(out, "Relu") == 0 and op_count(out, "Clip") == 0
    for conv in (n for n in out.graph.node if n.op_type in ("Conv", "Gemm")):
        w_dq = producers[conv.input[1]]
        assert w_dq.op_type == "DequantizeLinear"
        assert init[w_dq.input[0]].data_type == onnx.TensorProto.INT8  # stored pre-quantized
        b_dq = producers[conv.input[2]]
        assert (
            b_dq.op_type == "DequantizeLinear"
            and init[b_dq.input[0]].data_type == onnx.TensorProto.INT32
        )
        assert producers[conv.input[0]].op_type == "DequantizeLinear"
    # no float weight for a quantized op, no QuantizeLinear on a constant
    assert not any(n.op_type == "QuantizeLinear" and n.input[0] in init for n in out.graph.node)
    # no DQ -> Q pair with equal parameters
    for q in (n for n in out.graph.node if n.op_type == "QuantizeLinear"):
        dq = producers.get(q.input[0])
        if dq is not None and dq.op_type == "DequantizeLinear":
            assert dq.input[1:] != q.input[1:]
    # MaxPool shares its input's scale: DQ(s) -> MaxPool -> Q(s)
    mp = next(n for n in out.graph.node if n.op_type == "MaxPool")
    q_after = next(
        n for n in out.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == mp.output[0]
    )
    assert list(producers[mp.input[0]].input[1:]) == list(q_after.input[1:])
    # the Gemm output feeds the graph output only: left float (QGemm with float output)
    assert [o.name for o in out.graph.output] == ["y"]
    assert producers["y"].op_type == "Gemm"
    x = data.arrays["x"][:16]
    ref = ort_run(model, {"x": x})[0]
    for optimize in (False, True):
        got = ort_run(out, {"x": x}, optimize=optimize)[0]
        assert got.shape == ref.shape
        assert _cosine(ref, got) > 0.99  # measured 0.9996


STEM = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, {c}, 8, 8] x, float[8, {c}, 3, 3] W1, float[8, 1, 3, 3] D, float[8, 8, 3, 3] W2,
    float lo, float hi)
  => (float[N, 8, {s}, {s}] y) {{
    h = Conv <pads = [1, 1, 1, 1]> (x, W1)
    r = Clip (h, lo, hi)
    {body}
    y = Conv <pads = [1, 1, 1, 1]> (t, W2)
}}"""
_BODIES = {
    "conv": ("t = Identity (r)", 8),
    "pool": ("t = MaxPool <kernel_shape = [2, 2], strides = [2, 2]> (r)", 4),
    "depthwise": ("t = Conv <pads = [1, 1, 1, 1], group = 8> (r, D)", 8),
}


def _stem_net(channels: int, body: str):
    rng = np.random.default_rng(0)
    text, side = _BODIES[body]
    net = STEM.format(c=channels, s=side, body=text)
    if body == "conv":  # no Identity: the next Conv reads the stem's output itself
        net = net.replace("t = Identity (r)", "").replace("(t, W2)", "(r, W2)")
    inits = {
        "W1": rand(rng, 8, channels, 3, 3, scale=0.5),
        "D": rand(rng, 8, 1, 3, 3, scale=0.5),
        "W2": rand(rng, 8, 8, 3, 3, scale=0.2),
        "lo": np.array(0, np.float32),
        "hi": np.array(6, np.float32),
    }
    if body != "depthwise":
        net = net.replace("float[8, 1, 3, 3] D, ", "")
        del inits["D"]
    return make_model(net, inits)


@pytest.mark.parametrize(
    "channels, body, stem, float_convs",
    [
        (3, "conv", "auto", 1),
        (1, "conv", "auto", 1),
        (3, "depthwise", "auto", 2),  # image stems: float
        (8, "conv", "auto", 0),  # 8 channels: int8 is as fast
        (3, "pool", "auto", 0),
        (3, "pool", "float", 1),  # a MaxPool after a float stem runs slowly on uint8
        (3, "depthwise", "int8", 0),
    ],
)
def test_stem_stays_float_where_onnxruntime_int8_is_slower(channels, body, stem, float_convs):
    model = _stem_net(channels, body)
    data = _data(model)
    p = QuantizePass(stem=stem)
    out, modified = _run(p, model, data)
    assert modified
    producers = {o: n for n in out.graph.node for o in n.output}
    init = {i.name for i in out.graph.initializer}
    convs = [n for n in out.graph.node if n.op_type == "Conv"]
    floats = [c for c in convs if c.input[1] in init]  # a float weight, no DQ in front
    assert len(floats) == float_convs
    assert p.details.get("float_stem", []) == [c.name for c in floats]
    for c in convs:
        if c not in floats:  # the others are quantized as usual
            assert producers[c.input[1]].op_type == "DequantizeLinear"
            assert producers[c.input[0]].op_type == "DequantizeLinear"
    if float_convs:
        assert floats[0].input[0] == "x"  # the image is not rounded, nor the stem's weights
        assert not any(n.op_type == "QuantizeLinear" and n.input[0] == "x" for n in out.graph.node)
        w1 = next(i for i in out.graph.initializer if i.name == floats[0].input[1])
        np.testing.assert_array_equal(
            onnx.numpy_helper.to_array(w1),
            next(onnx.numpy_helper.to_array(i) for i in model.graph.initializer if i.name == "W1"),
        )
    assert _pair_safe(out)
    x = data.arrays["x"][:16]
    ref = ort_run(model, {"x": x})[0]
    written = ort_run(out, {"x": x})[0]
    session = ort_run(out, {"x": x}, optimize=True)[0]
    assert _cosine(ref, written) > 0.995  # measured >= 0.9995
    # what is float stays float in a session (the stem reads the graph input, not a DQ)
    np.testing.assert_allclose(session, written, atol=2e-2 * np.abs(written).max())


PREPROCESSED = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 8, 8, 3] x, float[1, 3, 1, 1] mean, float[1, 3, 1, 1] inv_std, float[8, 3, 3, 3] W1,
   float[8, 8, 3, 3] W2) => (float[N, 8, 8, 8] y{extra_out}) {{
    t = Transpose <perm = [0, 3, 1, 2]> (x)
    c = Sub (t, mean)
    n = Mul (c, inv_std)
    h = Conv <pads = [1, 1, 1, 1]> (n, W1)
    r = Relu (h)
    y = Conv <pads = [1, 1, 1, 1]> (r, W2)
}}"""


@pytest.mark.parametrize(
    "stem, extra_out, float_stem",
    [
        ("auto", "", True),  # NHWC image, normalised in the graph: still an image stem
        ("int8", "", False),
        (
            "auto",
            ", float[N, 3, 8, 8] c",
            False,
        ),  # the chain's tensor is also an output: not a stem
    ],
)
def test_stem_found_behind_in_graph_preprocessing(stem, extra_out, float_stem):
    rng = np.random.default_rng(3)
    model = make_model(
        PREPROCESSED.format(extra_out=extra_out),
        {
            "mean": np.array([0.4, 0.5, 0.6], np.float32).reshape(1, 3, 1, 1),
            "inv_std": np.array([4.0, 4.5, 5.0], np.float32).reshape(1, 3, 1, 1),
            "W1": rand(rng, 8, 3, 3, 3, scale=0.5),
            "W2": rand(rng, 8, 8, 3, 3, scale=0.2),
        },
    )
    data = _data(model)
    data.arrays["x"] = np.abs(data.arrays["x"]) * 0.3  # image-like values in [0, 1]
    p = QuantizePass(stem=stem)
    out, modified = _run(p, model, data)
    assert modified
    producers = {o: n for n in out.graph.node for o in n.output}
    conv1 = next(n for n in out.graph.node if n.op_type == "Conv" and n.output[0] == "h")
    mul = next(n for n in out.graph.node if n.op_type == "Mul")
    if float_stem:
        assert p.details["float_stem"] == [mul.name, conv1.name]
        assert conv1.input[0] == "n" and conv1.input[1] == "W1"  # float image, float weights
        assert mul.input[0] == "c"  # the normalisation reads float: nothing before it is rounded
        assert not any(
            n.op_type == "QuantizeLinear" and n.input[0] in ("x", "t", "c", "n")
            for n in out.graph.node
        )
    else:
        assert "float_stem" not in p.details
        assert producers[conv1.input[0]].op_type == "DequantizeLinear"
        assert producers[conv1.input[1]].op_type == "DequantizeLinear"
    assert _pair_safe(out)
    x = data.arrays["x"][:16]
    ref = ort_run(model, {"x": x})[0]
    written = ort_run(out, {"x": x})[0]
    assert _cosine(ref, written) > 0.995
    np.testing.assert_allclose(
        ort_run(out, {"x": x}, optimize=True)[0], written, atol=2e-2 * np.abs(written).max()
    )


def test_insert_then_fold_equals_quantize():
    model = _net(2)
    data = _data(model)
    inserted, _ = _run(InsertQDQPass(), model, data)
    init = {i.name for i in inserted.graph.initializer}
    assert any(n.op_type == "QuantizeLinear" and n.input[0] in init for n in inserted.graph.node)
    folded, modified = apply(FoldQDQPass(), inserted)
    assert modified
    x = data.arrays["x"][:8]
    a, b = ort_run(inserted, {"x": x})[0], ort_run(folded, {"x": x})[0]
    assert _cosine(a, b) > 0.9999
    q, _ = _run(QuantizePass(), model, data)
    np.testing.assert_allclose(ort_run(q, {"x": x})[0], b, atol=1e-5)
    _, again = apply(FoldQDQPass(), folded)
    assert again is False


def test_fold_removes_equal_dq_q_pairs():
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[1, 4] x, float s, uint8 z, float s2) => (float[1, 4] y, float[1, 4] w) {
        a = QuantizeLinear (x, s, z)
        b = DequantizeLinear (a, s, z)
        c = QuantizeLinear (b, s, z)
        y = DequantizeLinear (c, s, z)
        d = QuantizeLinear (b, s2, z)
        w = DequantizeLinear (d, s2, z)
    }"""
    model = make_model(
        text,
        {
            "s": np.array(0.1, np.float32),
            "z": np.array(128, np.uint8),
            "s2": np.array(0.2, np.float32),
        },
    )
    p = FoldQDQPass()
    out, modified = apply(p, model)
    assert modified and op_count(out, "QuantizeLinear") == 2  # the requantizing pair stays
    x = np.array([[0.3, -1.0, 2.5, 0.0]], np.float32)
    for r, g in zip(ort_run(model, {"x": x}), ort_run(out, {"x": x})):
        np.testing.assert_array_equal(r, g)


def test_graph_output_from_conv_keeps_its_name():
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[1, 3, 6, 6] x, float[4, 3, 3, 3] W) => (float[1, 4, 4, 4] y) {
        y = Conv (x, W)
    }"""
    model = make_model(text, {"W": rand(np.random.default_rng(3), 4, 3, 3, 3)})
    out, _ = _run(QuantizePass(), model, _data(model, 16))
    assert [o.name for o in out.graph.output] == ["y"]
    assert next(n for n in out.graph.node if "y" in n.output).op_type == "DequantizeLinear"


def test_activation_that_is_a_graph_output_is_not_fused():
    """Conv -> Relu -> graph output: the Relu stays (float, after the Conv's DQ), the Conv is
    quantized (the pass used to raise: the fused Relu's output could not be replaced)."""
    rng = np.random.default_rng(5)
    model = make_model(
        """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 8, 4, 4] x, float[8, 8, 1, 1] W) => (float[N, 8, 4, 4] z) {
    y = Conv (x, W)
    z = Relu (y)
}""",
        {"W": rand(rng, 8, 8, 1, 1)},
    )
    data = _data(model)
    out, modified = _run(QuantizePass(), model, data)
    assert modified and op_count(out, "Relu") == 1 and [o.name for o in out.graph.output] == ["z"]
    producers = {o: n for n in out.graph.node for o in n.output}
    assert (
        producers["z"].op_type == "Relu"
        and producers[producers["z"].input[0]].op_type == "DequantizeLinear"
    )
    x = data.arrays["x"][:16]
    assert _cosine(ort_run(model, {"x": x})[0], ort_run(out, {"x": x}, optimize=True)[0]) > 0.999


def test_exclude_keeps_float():
    model = _net(4)
    model.graph.node[0].name = "first"
    out, _ = _run(QuantizePass(skip_=("first",), exclude_types=("Gemm",)), model, _data(model))
    producers = {o: n for n in out.graph.node for o in n.output}
    first = next(n for n in out.graph.node if n.name == "first")
    assert producers.get(first.input[1]) is None  # float initializer weight
    gemm = next(n for n in out.graph.node if n.op_type == "Gemm")
    assert producers.get(gemm.input[1]) is None


def test_excluded_layers_stay_float_in_an_onnxruntime_session():
    """onnxruntime's WeightBiasQuantization quantizes (per tensor) the float weight of a Conv /
    Gemm that reads a per-tensor DQ; the excluded layers must read a per-channel DQ instead."""
    model = _net(4)
    model.graph.node[2].name = "second"  # k = Conv(r): r is quantized (it also feeds the Add)
    data = _data(model)
    p = QuantizePass(skip_=("second",), exclude_types=("Gemm",))
    out, _ = _run(p, model, data)
    init = {i.name: onnx.numpy_helper.to_array(i) for i in out.graph.initializer}
    producers = {o: n for n in out.graph.node for o in n.output}
    for node in (n for n in out.graph.node if n.name == "second" or n.op_type == "Gemm"):
        dq = producers[node.input[0]]
        assert dq.op_type == "DequantizeLinear" and init[dq.input[1]].shape == (8,)
        assert len(set(init[dq.input[1]].tolist())) == 1  # one scale, repeated per channel
    assert _pair_safe(out)
    x = data.arrays["x"][:16]
    written = ort_run(out, {"x": x})[0]
    session = ort_run(out, {"x": x}, optimize=True)[0]
    # as written and in a default session: the same float layers (up to kernel rounding)
    np.testing.assert_allclose(session, written, rtol=0, atol=1e-4 * np.abs(written).max())
    _, again = apply(FoldQDQPass(), out)
    assert again is False


def test_refusals_old_opset_and_already_quantized():
    text = """
    <ir_version: 4, opset_import: ["" : 6]>
    g (float[1, 3, 6, 6] x, float[4, 3, 3, 3] W) => (float[1, 4, 4, 4] y) {
        y = Conv (x, W)
    }"""
    model = make_model(text, {"W": rand(np.random.default_rng(5), 4, 3, 3, 3)})
    p = QuantizePass()  # opsets 7-12 are converted to 13; older ones the converter cannot take
    _, modified = _run(p, model, _data(model, 8))
    assert not modified and "opset 6" in p.skipped[0].reason
    q, _ = _run(QuantizePass(), _net(), _data(_net()))
    p = QuantizePass()
    _, modified = _run(p, q, _data(q))
    assert not modified and "already quantized" in p.skipped[0].reason


def test_bias_correction_reduces_output_bias():
    model = _net(6)
    data = _data(model, 128)
    x = _data(model, 64, seed=9).arrays["x"]
    ref = ort_run(model, {"x": x})[0]
    errs = {}
    for mode in ("off", "weights"):
        out, _ = _run(
            QuantizePass(bias_correction=mode, calibration="minmax", rounding="nearest"),
            model,
            data,
        )
        errs[mode] = np.abs((ort_run(out, {"x": x})[0] - ref).mean(0)).mean()
    assert errs["weights"] < errs["off"]


def test_mixed_precision_keeps_sensitive_layers_float(digits_model, digits_calib):
    model = onnx.load(str(digits_model))
    out, rep = onnxshrink.compress(
        model,
        ["fold-batchnorm", "quantize:min-fidelity=0.99999,max-float=2"],
        data=str(digits_calib),
    )
    q = rep.passes[1]
    assert q.status == "applied", q.reason
    mp = q.details["mixed_precision"]
    assert 1 <= len(mp["float"]) <= 2
    # the most sensitive layers, in order; the target met, or max-float layers spent on it
    assert mp["float"] == list(mp["sensitivity"])[: len(mp["float"])]
    assert mp["fidelity"] >= 0.99999 or len(mp["float"]) == 2
    assert mp["fidelity"] > q.details["fidelity_all_quantized"]
    # and the file keeps them float: their weights are not dequantized int8
    producers = {o: n.op_type for n in out.graph.node for o in n.output}
    layers = {n.name: n for n in out.graph.node}
    for name in mp["float"]:
        assert producers.get(layers[name].input[1]) != "DequantizeLinear", name
    assert all(
        any(s.node == name and "mixed precision" in s.reason for s in q.skipped)
        for name in mp["float"]
    )


def test_digits_accuracy_within_half_a_point(digits_model, digits_calib, digits_test):
    x, y = digits_test
    model = onnx.load(str(digits_model))
    out, rep = onnxshrink.compress(model, ["fold-batchnorm", "quantize"], data=str(digits_calib))
    assert rep.passes[1].status == "applied"
    base = (ort_run(model, {"input": x})[0].argmax(1) == y).mean()
    acc = (ort_run(out, {"input": x}, optimize=True)[0].argmax(1) == y).mean()
    assert acc >= base - 0.005, (acc, base)
    assert rep.after["bytes"] < 0.4 * rep.before["bytes"]


def test_quantize_folds_batchnorm_first_and_insert_qdq_alone_does_not(digits_model, digits_calib):
    model = onnx.load(str(digits_model))
    assert op_count(model, "BatchNormalization") == 11
    alone, rep = onnxshrink.compress(model, ["quantize"], data=str(digits_calib))
    q = rep.passes[0]
    assert q.status == "applied", q.reason
    assert op_count(alone, "BatchNormalization") == 0 and q.details["batchnorm_folded"] == 11
    assert sum("<- " in c for c in q.changed) == 11
    assert not any("BatchNormalization" in s.reason for s in q.skipped)
    # the same file as folding first by hand: every Conv reads pre-quantized weights
    both, _ = onnxshrink.compress(model, ["fold-batchnorm", "quantize"], data=str(digits_calib))
    x = np.load(str(digits_calib))["input"][:32]
    np.testing.assert_array_equal(ort_run(alone, {"input": x})[0], ort_run(both, {"input": x})[0])
    # insert-qdq alone leaves them float between DQ and Q, and says how to fix it
    _, rep = onnxshrink.compress(model, ["insert-qdq"], data=str(digits_calib))
    bn_skips = [s for s in rep.passes[0].skipped if "BatchNormalization" in s.reason]
    assert len(bn_skips) == 11 and "run fold-batchnorm first" in bn_skips[0].reason


def test_quantize_names_why_a_batchnorm_stays_float():
    model = make_model(
        """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 4, 6, 6] x, float[4, 4, 3, 3] W, float[4] s, float[4] b, float[4] m, float[4] v)
    => (float[N, 4, 6, 6] y) {
    h = Conv <pads = [1, 1, 1, 1]> (x, W)
    r = Relu (h)
    y = BatchNormalization (r, s, b, m, v)
}""",
        {
            "W": rand(np.random.default_rng(0), 4, 4, 3, 3),
            "s": np.full(4, 1.5, np.float32),
            "b": np.zeros(4, np.float32),
            "m": np.zeros(4, np.float32),
            "v": np.ones(4, np.float32),
        },
    )
    q = QuantizePass(stem="int8")
    out, modified = _run(q, model, _data(model))
    assert modified and op_count(out, "BatchNormalization") == 1  # after a Relu: not foldable
    [reason] = [s.reason for s in q.skipped if "BatchNormalization" in s.reason]
    assert "cannot be folded (input comes from Relu" in reason, reason
    assert "batchnorm_folded" not in q.details


# -- calibration and parameters ------------------------------------------------------------
def _stats(x):
    st = RangeStats()
    st.update_range(x)
    st.start_histogram()
    st.update_histogram(x)
    return st


def test_ranges_clip_outliers_but_not_the_body():
    rng = np.random.default_rng(0)
    relu = np.abs(rng.standard_normal(100_000))
    relu[-10:] = 40.0  # rare outliers
    relu[:50_000] = 0.0  # half exact zeros, as after a ReLU
    st = _stats(relu)
    lo, hi = choose_range(st, "minmax")
    assert (lo, hi) == (0.0, 40.0)
    for method in ("percentile", "entropy", "mse"):
        lo, hi = choose_range(st, method)
        assert lo == 0.0 and 2.5 < hi < 40.0, (method, hi)  # body (|N(0,1)|) kept, outliers clipped


def test_qparams_make_zero_exact():
    for lo, hi in ((-1.3, 2.7), (0.0, 6.0), (0.5, 3.0), (-4.0, -1.0)):
        scale, zp = qparams(lo, hi, "uint8")
        assert float(np.clip(np.round(0.0 / scale) + zp, 0, 255) - zp) * scale == 0.0
        assert scale > 0 and zp.dtype == np.uint8


def test_weight_quantization_per_channel():
    w = (
        np.stack([np.linspace(-1, 1, 27), np.linspace(-100, 100, 27)])
        .reshape(2, 3, 3, 3)
        .astype(np.float32)
    )
    scale, q = quantize_weight(w, 0)
    np.testing.assert_allclose(scale, [1 / 127, 100 / 127], rtol=1e-6)
    assert q.dtype == np.int8 and q.min() >= -127
    np.testing.assert_allclose(q * scale.reshape(-1, 1, 1, 1), w, atol=100 / 127 / 2 + 1e-6)


@pytest.mark.slow
def test_mobilenet_quantized_file_and_structure(mobilenet, photos):
    out, rep = onnxshrink.compress(
        str(mobilenet["folded"]),
        ["quantize"],
        data=str(photos["calib"]),
        output=mobilenet["folded"].parent.parent / "test_mnv2_int8.onnx",
    )
    try:
        q = rep.passes[0]
        assert q.status == "applied", q.reason
        assert rep.after["bytes"] <= 0.30 * rep.before["bytes"]  # measured 0.281
        proto = onnx.load(str(out))
        init = {i.name for i in proto.graph.initializer}
        assert not any(
            n.op_type == "QuantizeLinear" and n.input[0] in init for n in proto.graph.node
        )
        stem = q.details["float_stem"]  # the first Conv and the depthwise one after it
        assert len(stem) == 2 and stem[0] == "/features/features.0/features.0.0/Conv"
        producers = {o: n for n in proto.graph.node for o in n.output}
        for conv in (n for n in proto.graph.node if n.op_type == "Conv"):
            assert (conv.input[1] in init) == (conv.name in stem)  # float weight only in the stem
        # ReLU6 fused everywhere but after the two float stem convs
        clips = [n for n in proto.graph.node if n.op_type == "Clip"]
        assert sorted(producers[c.input[0]].name for c in clips) == sorted(stem)
        assert _pair_safe(proto)
        # fidelity on the evaluation photos (never calibrated on), in an onnxruntime session:
        # all 180 crops, measured cosine 0.9979 (0.9967 with stem=int8, 0.9955 before empirical
        # bias correction)
        x = np.load(photos["eval"])["input"]
        ref = ort_run(onnx.load(str(mobilenet["folded"])), {"input": x})[0]
        got = ort_run(proto, {"input": x}, optimize=True)[0]
        assert _cosine(ref, got) > 0.997
    finally:
        out.unlink(missing_ok=True)


# -- cascade calibration -------------------------------------------------------------------
SPREAD = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 64] x, float[64, 64] W) => (float[N, 64] z) {
    r = Relu (x)
    z = MatMul (r, W)
}"""


def _spread_model_and_data(n=512, outliers=0.005, seed=0):
    """z = row mean of ReLU(x): one outlier of r reaches all 64 outputs of its row, so rare
    outliers of r (clipped by r's percentile) are common in z."""
    rng = np.random.default_rng(seed)
    model = make_model(SPREAD, {"W": np.full((64, 64), 1 / 64, np.float32)})
    x = np.abs(rng.standard_normal((n, 64))).astype(np.float32)
    x[rng.random(x.shape) < outliers] = 100.0
    return model, Dataset({"x": x}, input_specs(ir.from_proto(model)), "test")


def test_clipped_copy_clips_what_readers_see_not_the_tensor(tmp_path):
    model = make_model("""
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 4] x) => (float[N, 4] r, float[N, 4] y) {
    r = Relu (x)
    y = Neg (r)
}""")
    clipped = ir.to_proto(clipped_copy(ir.from_proto(model), {"x": (-1.0, 1.0), "r": (0.0, 0.5)}))
    onnx.checker.check_model(clipped, full_check=True)
    x = np.array([[-3.0, -0.5, 0.7, 3.0]], np.float32)
    r, y = ort_run(clipped, {"x": x})
    np.testing.assert_array_equal(
        r, np.array([[0.0, 0.0, 0.7, 1.0]], np.float32)
    )  # r: ReLU of the clipped input, not clipped itself
    np.testing.assert_array_equal(
        y, np.array([[0.0, 0.0, -0.5, -0.5]], np.float32)
    )  # its reader sees Clip(r, 0, 0.5)
    assert op_count(model, "Clip") == 0  # the input model is untouched


def test_cascade_ranges_are_those_of_the_clipped_model(tmp_path):
    model, data = _spread_model_and_data()
    m = ir.from_proto(model)

    def saturation(ranges):  # r is quantized with its own range; z is read by nobody
        return {"r": grid_bounds(*ranges["r"])}

    one = cascade_calibrate(m, saturation, ["r", "z"], data, 512, "percentile", 99.0, rounds=0)
    found = cascade_calibrate(m, saturation, ["r", "z"], data, 512, "percentile", 99.0, rounds=6)
    x = data.arrays["x"].astype(np.float64)
    r = np.maximum(x, 0)
    np.testing.assert_allclose(
        one.ranges["z"][1], np.percentile(r.mean(1), 99), rtol=0.02
    )  # the float model's
    lo, hi = grid_bounds(*one.ranges["r"])
    expected = np.percentile(np.clip(r, lo, hi).mean(1), 99)  # z as the quantized model computes it
    np.testing.assert_allclose(found.ranges["z"][1], expected, rtol=0.02)
    assert found.ranges["z"][1] < 0.5 * one.ranges["z"][1]  # the outliers no longer widen z
    assert found.ranges["r"] == one.ranges["r"]  # nothing upstream of r: its range stays
    assert found.changes == []  # r's grid depends on r alone: one sweep is the fixed point
    # r's outliers (0.5% of its values, beyond its 99th percentile) are what its grid clips
    assert set(found.clipped) == {"r"} and 0.004 < found.clipped["r"] < 0.02, found.clipped
    assert one.clipped == {}  # rounds=0: nothing saturated


def test_cascade_with_nothing_clipped_stops_after_one_round(tmp_path):
    model, data = _spread_model_and_data(outliers=0.0)
    m = ir.from_proto(model)
    found = cascade_calibrate(
        m,
        lambda ranges: {"r": grid_bounds(*ranges["r"])},
        ["r", "z"],
        data,
        512,
        "minmax",
        99.99,
        rounds=6,
        shared_downstream=True,  # a second sweep is made, and finds nothing moved
    )
    assert len(found.changes) == 1 and found.changes[0] <= 1e-6 and not found.clipped


def test_cascade_lowers_the_quantization_error_where_outliers_spread():
    # x's percentile clips its outliers (rarer than 1 in 10^4); in the float model they reach a
    # whole row of z, widening z's range unless it is measured with x saturated
    rng = np.random.default_rng(0)
    model = make_model(
        """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 64] x, float[64, 64] I, float[64, 64] W, float[64, 8] V) => (float[N, 8] y) {
    h = MatMul (x, I)
    r = Relu (h)
    z = MatMul (r, W)
    y = MatMul (z, V)
}""",
        {
            "I": np.eye(64, dtype=np.float32),
            "W": np.full((64, 64), 1 / 64, np.float32),
            "V": rand(rng, 64, 8),
        },
    )
    x = np.abs(rng.standard_normal((2048, 64))).astype(np.float32)
    x[rng.random(x.shape) < 5e-5] = 100.0
    data = Dataset({"x": x}, input_specs(ir.from_proto(model)), "test")
    clean = np.abs(np.random.default_rng(9).standard_normal((256, 64))).astype(np.float32)
    ref = ort_run(model, {"x": clean})[0]
    err = {}
    for rounds in (0, 6):
        pass_ = QuantizePass(cascade_rounds=rounds, samples=2048)
        out, _ = _run(pass_, model, data)
        got = ort_run(out, {"x": clean})[0]
        err[rounds] = float(np.sum((got - ref) ** 2) / np.sum(ref**2))  # relative squared error
        if rounds:
            assert pass_.details["cascade"]["clipped"] >= 1
    assert err[6] < 0.5 * err[0], err  # measured 5.5e-6 vs 1.4e-5


@pytest.mark.parametrize("p", [99.99, 99.0, 60.0, 100.0])
def test_percentile_ranges_are_exact_order_statistics(p):
    rng = np.random.default_rng(3)
    arrays = [rng.standard_t(3, (7, 5, 31)).astype(np.float32) for _ in range(3)]
    values = np.sort(np.concatenate([a.ravel() for a in arrays]))
    n = len(values)
    lo, hi = percentile_range(arrays, p)
    assert hi == values[int(np.ceil(p / 100 * n)) - 1]
    assert lo == values[max(1, int(np.ceil((1 - p / 100) * n))) - 1]
    relu = [np.maximum(a, 0) for a in arrays]
    assert percentile_range(relu, p)[0] == 0.0  # a non-negative tensor keeps 0 as its low end


@pytest.mark.parametrize("p", [99.99, 99.0, 60.0])
def test_the_percentile_tails_count_what_a_grid_clips(p):
    rng = np.random.default_rng(4)
    signed = [rng.standard_t(3, (7, 5, 31)).astype(np.float32) for _ in range(3)]
    for arrays in (signed, [np.maximum(a, 0) for a in signed]):
        values = np.concatenate([a.ravel() for a in arrays])
        t = percentile_tails(arrays, p)
        # grids wider and narrower than the range, on both sides of the partition thresholds
        for lo, hi in [(t.lo, t.hi), (t.lo - 1, t.hi + 1), (t.lo * 0.5, t.hi * 0.5), (0.0, 0.1)]:
            want = int(np.count_nonzero((values < lo) | (values > hi)))
            assert t.beyond(arrays, lo, hi) == want, (lo, hi)


@pytest.mark.parametrize("method", ["minmax", "percentile", "entropy", "mse"])
def test_nearly_constant_tensor_calibrates(method):
    # found by tests/test_properties.py: an SE gate's sigmoid on tiny maps gave a float32 tensor
    # of range ~1e-8 around 0.5, and numpy's float32 bin edges collapsed ("Too many bins")
    x = (0.5 + 1e-8 * np.random.default_rng(0).standard_normal(4096)).astype(np.float32)
    st = _stats(x)
    lo, hi = choose_range(st, method)
    assert np.isfinite([lo, hi]).all() and lo <= 0.5 + 1e-4 and hi >= 0.5 - 1e-4


def test_quantize_net_with_constant_activation():
    # the same through the pass: a Conv with zero weights makes a constant map
    model = _net()
    inits = {i.name: i for i in model.graph.initializer}
    zero = onnx.numpy_helper.from_array(np.zeros((8, 8, 3, 3), np.float32), "W2")
    inits["W2"].CopyFrom(zero)
    out, modified = _run(QuantizePass(), model, _data(model))
    assert modified
    x = rand(np.random.default_rng(3), 4, 3, 8, 8)
    assert _cosine(ort_run(model, {"x": x})[0], ort_run(out, {"x": x})[0]) > 0.99


def test_quantization_shift_is_the_mean_clipping_and_rounding_error(tmp_path):
    from onnxshrink.analysis.bias import quantization_shift

    model = _net()
    data = _data(model, 16)
    # uint8, scale 0.01, zero point 50: range [-0.5, 2.05] -- the standard-normal input clips below
    shift = quantization_shift(
        ir.from_proto(model), {"x": (np.float32(0.01), np.uint8(50))}, "uint8", data, tmp_path, 16
    )
    x = data.arrays["x"].astype(np.float64)
    expected = ((np.clip(np.rint(x / 0.01) + 50, 0, 255) - 50) * 0.01 - x).mean((0, 2, 3))
    np.testing.assert_allclose(shift["x"], expected, atol=1e-6)
    assert expected.min() > 0.1  # clipping at -0.5 dominates: a real shift, not rounding noise


def test_full_bias_correction_applies_the_input_shift():
    model = _net(6)
    data = _data(model, 64)
    outs = {}
    for mode in ("weights", "full"):
        # percentile 99: the ranges clip, so E[Q(x) − x] is far from zero
        p = QuantizePass(bias_correction=mode, percentile=99.0, rounding="nearest")
        out, modified = _run(p, model, data)
        assert modified
        outs[mode] = ort_run(out, {"x": data.arrays["x"][:8]})[0]
    assert np.abs(outs["full"] - outs["weights"]).max() > 1e-4  # the extra term changed the biases


CHAIN = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 4, 8, 8] x, float[16, 4, 3, 3] W1, float[16] b1, float[16, 16, 1, 1] W2, float[16] b2,
   float[8, 16, 1, 1] W3, float[8] b3) => (float[N, 8, 4, 4] y) {
    h1 = Conv <pads = [1, 1, 1, 1]> (x, W1, b1)
    r1 = Relu (h1)
    h2 = Conv (r1, W2, b2)
    r2 = Relu (h2)
    h3 = Conv (r2, W3, b3)
    y = MaxPool <kernel_shape = [2, 2], strides = [2, 2]> (h3)
}"""


@pytest.mark.parametrize("seed", [0, 1])
def test_empirical_bias_correction_removes_the_mean_shift_rounding_noise_causes(seed):
    """One wide channel sets r1's uint8 step, so the other channels carry rounding noise of the
    order of their values; through r2 = Relu(h2) that noise has a positive mean
    (E[relu(h + n)] > relu(h)) which the analytic correction, (Q(W) − W)·E[x], cannot see.
    Measured on held-out inputs: per-channel mean error of y 0.29 → 0.11 (seed 0), 0.49 → 0.11.
    Balancing is off: it would give r1's narrow channels finer steps, the noise this builds."""
    rng = np.random.default_rng(seed)
    W1 = rand(rng, 16, 4, 3, 3, scale=0.3)
    W1[0] *= 60
    W2 = rand(rng, 16, 16, 1, 1, scale=1.0)
    W2[:, 0] = 0
    model = make_model(
        CHAIN,
        {
            "W1": W1,
            "b1": rand(rng, 16, scale=0.1),
            "W2": W2,
            "b2": rand(rng, 16, scale=0.1),
            "W3": np.abs(rand(rng, 8, 16, 1, 1, scale=0.5)),
            "b3": rand(rng, 8, scale=0.1),
        },
    )
    data = _data(model, 64)
    x = _data(model, 64, seed=9).arrays["x"]
    ref = ort_run(model, {"x": x})[0]
    errors = {}
    for mode in ("weights", "empirical"):
        p = QuantizePass(bias_correction=mode, balance="off")
        out, _ = _run(p, model, data)
        got = ort_run(out, {"x": x}, optimize=True)[0]
        errors[mode] = (
            np.abs((got - ref).mean((0, 2, 3))).mean(),
            np.sum((got - ref) ** 2) / np.sum(ref**2),
        )
    assert p.details["empirical_bias"]["layers"] == 3
    assert errors["empirical"][0] < 0.5 * errors["weights"][0]
    assert errors["empirical"][1] < errors["weights"][1]
    # the default with real data
    default = QuantizePass()
    _run(default, model, data)
    assert "empirical_bias" in default.details


# -- int8 on every x86 CPU (the pair rule) ---------------------------------------------------
@pytest.mark.parametrize("cpu", ["any", "vnni", "auto"])
def test_cpu_option_decides_the_pair_rule(cpu, digits_model, digits_calib, monkeypatch):
    """``cpu=any`` keeps every weight pair within |w_a + w_b| <= 128; ``vnni`` does not (the
    digits CNN's full-range weights break it in 9 layers); ``auto`` follows this machine --
    here made to look like an AVX2 CPU without VNNI."""
    from onnxshrink import cpu as cpu_module
    from onnxshrink.cpu import CPU

    monkeypatch.setattr(
        cpu_module, "this_cpu", lambda: CPU("test AVX2", "x86_64", frozenset({"avx2"}))
    )
    out, rep = onnxshrink.compress(
        onnx.load(str(digits_model)), [f"quantize:cpu={cpu}"], data=str(digits_calib)
    )
    q = rep.passes[0]
    assert q.status == "applied", q.reason
    assert q.details["int8_cpu"]["pair_rule"] == (cpu != "vnni")
    unsafe = unsafe_layers(ir.from_proto(out))
    assert (unsafe == {}) == (cpu != "vnni"), unsafe
    saturates = [w for w in rep.warnings if "|w_a + w_b| > 128" in w]
    assert len(saturates) == (cpu == "vnni")  # the report says the file is for VNNI CPUs only
    if cpu == "vnni":
        assert len(unsafe) == 9  # every quantized Conv/Gemm of the net at full range
    else:  # the grid is chosen so that few weights must move
        assert q.details["int8_cpu"]["weights_moved"] < 200  # measured 50 of 110K


def test_pair_rule_costs_less_than_a_bit_of_weight_precision(digits_model):
    """The safe scale (max(max|w| / 127, largest pair sum / 128) per channel) against the full
    range and against 7-bit weights (onnxruntime's reduce_range) on the digits CNN's convs."""
    from onnxshrink.analysis.saturation import make_safe, weight_pairs
    from onnxshrink.irtools import const_array

    model = ir.from_proto(onnx.load(str(digits_model)))
    err = {"full": 0.0, "safe": 0.0, "7-bit": 0.0}
    for node in (
        n for n in model.graph if n.op_type == "Conv" and n.attributes.get_int("group", 1) == 1
    ):
        w = const_array(node.inputs[1]).astype(np.float64)
        idx = weight_pairs(node, w.shape)
        amax = np.abs(w).reshape(len(w), -1).max(1)[:, None, None, None]
        for name, scale in (("full", amax / 127), ("7-bit", amax / 63)):
            err[name] += float(np.square(np.clip(np.round(w / scale), -127, 127) * scale - w).sum())
        s, q = quantize_weight(w, 0, pairs=idx)
        s = s.astype(np.float64).reshape(-1, 1, 1, 1)
        q, _ = make_safe(q, w / s, idx)
        err["safe"] += float(np.square(q * s - w).sum())
    assert err["full"] < err["safe"] < 0.5 * err["7-bit"], err


@emulated_cpu.needs_qemu
@pytest.mark.parametrize("cpu", ["any", "vnni"])
def test_avx2_and_this_cpu_give_the_same_int8_outputs(cpu, digits_model, digits_calib, digits_test):
    """The same int8 file on this CPU and on an emulated AVX2 CPU without VNNI: identical with
    ``cpu=any`` weights; ``cpu=vnni`` weights saturate the AVX2 kernels (the negative control)."""
    x = digits_test[0][:64]
    out, _ = onnxshrink.compress(
        onnx.load(str(digits_model)), [f"quantize:cpu={cpu}"], data=str(digits_calib)
    )
    native = ort_run(out, {"input": x}, optimize=True)[0]
    avx2 = emulated_cpu.run(out, {"input": x})[0]
    written = ort_run(out, {"input": x})[0]
    if cpu == "any":
        np.testing.assert_allclose(avx2, native, rtol=0, atol=1e-6 * np.abs(native).max())
        assert 1 - _cosine(written, avx2) < 1e-5
    else:  # saturated pair sums: 1 − cosine 4e-5 (measured), max |Δ| 0.7 on logits of ~20
        assert np.abs(avx2 - written).max() > 0.1 and 1 - _cosine(written, avx2) > 1e-5


DECODE_TAIL = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 3, 8, 8] x, float[8, 3, 3, 3] W1, float[8] b1, int64 two, int64[1] axis)
    => (float[N, 8, 8, 8] y) {
    h = Conv <pads = [1, 1, 1, 1]> (x, W1, b1)
    r = Relu (h)
    shape = Shape (x)
    side = Gather <axis = 0> (shape, axis)
    stride = Mul (side, two)
    f = Cast <to = 1> (stride)
    y = Mul (r, f)
}"""


def test_integer_shape_arithmetic_is_left_alone_with_a_reason():
    """A detector's decode tail multiplies int64 shape values (YOLOv8's Gather -> Mul): the
    calibration probes and the QDQ insertion touch float32 tensors only, and say so."""
    rng = np.random.default_rng(0)
    inits = {
        "W1": rand(rng, 8, 3, 3, 3, scale=0.5),
        "b1": rand(rng, 8, scale=0.1),
        "two": np.array(2, np.int64),
        "axis": np.array([2], np.int64),
    }
    model = make_model(DECODE_TAIL, inits)
    p = QuantizePass(stem="int8")  # its one conv is a stem: quantized, or nothing would be
    out, modified = _run(p, model, _data(model))
    assert modified and op_count(out, "QuantizeLinear") > 0
    reasons = {s.node: s.reason for s in p.skipped}
    int_mul = next(n.name for n in out.graph.node if n.op_type == "Mul" and "stride" in n.output)
    assert "int64 tensor" in reasons[int_mul], reasons
    x = _data(model).arrays["x"][:4]
    assert _cosine(ort_run(model, {"x": x})[0], ort_run(out, {"x": x}, optimize=True)[0]) > 0.99


def test_an_opset_12_model_is_converted_and_quantized():
    """Paddle exports are opset 11-12; per-channel QDQ needs 13: the model is converted first."""
    model = _net(4)
    model.opset_import[0].version = 12
    p = QuantizePass()
    out, modified = _run(p, model, _data(model))
    assert modified and out.opset_import[0].version == 13
    assert op_count(out, "DequantizeLinear") > 0 and "model: opset 12 -> 13" in p.changed[0]
    x = _data(model).arrays["x"][:16]
    assert _cosine(ort_run(model, {"x": x})[0], ort_run(out, {"x": x}, optimize=True)[0]) > 0.99


def test_activations_alone_are_not_quantized():
    """A model whose weighted layers are already integer (or all kept float) gains nothing from
    int8 activations: the pass leaves it unchanged and says why."""
    model = _net(4)
    p = QuantizePass(exclude_types=("Conv", "Gemm"))
    out, modified = _run(p, model, _data(model))
    assert not modified and op_count(out, "QuantizeLinear") == 0
    assert any("no Conv, Gemm or MatMul with float weights" in s.reason for s in p.skipped)


def test_an_opset_12_model_with_nothing_to_quantize_keeps_its_opset():
    model = _net(4)
    model.opset_import[0].version = 12
    p = QuantizePass(exclude_types=("Conv", "Gemm", "MaxPool", "Add", "GlobalAveragePool"))
    out, modified = _run(p, model, _data(model))
    assert not modified and out.opset_import[0].version == 12 and not p.changed


def test_a_concat_of_boxes_and_scores_stays_float():
    """A detector's tail: box coordinates in pixels (0-320) joined to class scores (0-1). One
    int8 scale would give the scores 256/320 of a level; the Concat stays float, each input on
    its own scale, and the scores keep their resolution."""
    text = """<ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 3, 8, 8] x, float[4, 3, 1, 1] Wb, float[4, 3, 1, 1] Wc, float scale)
      => (float[N, 8, 8, 8] y) {
        b = Conv (x, Wb)
        boxes = Mul (b, scale)
        c = Conv (x, Wc)
        scores = Sigmoid (c)
        y = Concat <axis = 1> (boxes, scores)
    }"""
    rng = np.random.default_rng(7)
    model = make_model(
        text,
        {"Wb": rand(rng, 4, 3, 1, 1), "Wc": rand(rng, 4, 3, 1, 1), "scale": np.float32(100.0)},
    )
    data = _data(model)
    p = QuantizePass(stem="int8")
    out, modified = _run(p, model, data)
    assert modified
    assert any("left float" in s.reason for s in p.skipped), p.skipped
    concat = next(n for n in out.graph.node if n.op_type == "Concat")
    readers = [n.op_type for n in out.graph.node if concat.output[0] in n.input]
    assert "QuantizeLinear" not in readers
    x = data.arrays["x"][:8]
    ref, got = ort_run(model, {"x": x})[0], ort_run(out, {"x": x}, optimize=True)[0]
    score_err = np.abs(got[:, 4:] - ref[:, 4:]).max()
    assert score_err < 0.02, score_err  # a shared 0-320 scale: errors up to 0.6


def test_a_normalisers_variance_stays_float():
    """A LayerNorm decomposed as exporters write it (magika: E[x²] − E[x]², Max 0, + ε, Sqrt,
    Reciprocal) over channels that nearly agree: the variance is tiny beside the squares it is
    the difference of. On int8 grids it cancels to 0 and 1/√ε blows the output up; the
    statistic's Adds and Muls stay float, with the reason, and the normalised output holds."""
    text = """<ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 3, 8, 8] x, float[8, 3, 1, 1] W1, float[4, 8, 1, 1] W2, float zero, float eps)
      => (float[N, 4, 8, 8] y) {
        h = Conv (x, W1)
        mean = ReduceMean <axes = [1]> (h)
        sq = Mul (h, h)
        m2 = ReduceMean <axes = [1]> (sq)
        msq = Mul (mean, mean)
        d = Sub (m2, msq)
        var = Max (d, zero)
        ve = Add (var, eps)
        sd = Sqrt (ve)
        inv = Reciprocal (sd)
        c = Sub (h, mean)
        n = Mul (c, inv)
        y = Conv (n, W2)
    }"""
    rng = np.random.default_rng(11)
    w1 = (np.ones((8, 3, 1, 1)) + 0.2 * rng.standard_normal((8, 3, 1, 1))).astype(np.float32)
    inits = {"W1": w1, "W2": rand(rng, 4, 8, 1, 1), "zero": np.float32(0), "eps": np.float32(1e-6)}
    model = make_model(text, inits)
    data = _data(model)
    p = QuantizePass(stem="int8")
    out, modified = _run(p, model, data)
    assert modified and op_count(out, "QuantizeLinear") > 0
    reasons = {s.node: s.reason for s in p.skipped if "denominator" in s.reason}
    names = {n.output[0]: n.name for n in out.graph.node}
    assert {names[v] for v in ("msq", "ve")} <= set(reasons), reasons
    assert names["sq"] in reasons and names["n"] not in reasons  # the normalised output: int8
    x = data.arrays["x"][:16]
    ref, got = ort_run(model, {"x": x})[0], ort_run(out, {"x": x}, optimize=True)[0]
    assert _cosine(ref, got) > 0.99, _cosine(ref, got)  # 0.868 with the statistic in int8

"""quantize's linear scope on attention models: MatMul/Gemm inputs and weights int8, the rest
float, SmoothQuant on the inputs."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx import numpy_helper

from onnxshrink.analysis.saturation import unsafe_layers
from onnxshrink.passes.base import PassContext
from onnxshrink.passes.quantize import QuantizePass
from tests.helpers import apply, make_model, op_count, ort_run, rand
from tests.passes.test_quantize_dynamic import H, _block, _data, _fused_ops, smoothing_errors


def _quantize(model, data, **opts):
    p = QuantizePass(**opts)
    p.bind(PassContext(data=data))
    out, modified = apply(p, model)
    return out, modified, p


def _readers(model: onnx.ModelProto, name: str) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if name in n.input]


def test_block_linear_scope_rounds_only_what_the_matmuls_read(tmp_path):
    model = _block()
    data, _ = _data(model)
    out, modified, p = _quantize(model, data)
    assert modified and p.details["scope"] == "linear (attention model)"
    assert {s.reason for s in p.skipped} == {"MatMul of two activations (attention) left float"}
    dqs = [n for n in out.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dqs) == 5 + 3  # five weights; ln (shared by q, k, v), a, g0
    for dq in dqs:  # every dequantized tensor is read by quantized MatMuls alone
        assert {r.op_type for r in _readers(out, dq.output[0])} == {"MatMul"}
    weight_axes = [a.i for dq in dqs for a in dq.attribute if a.name == "axis"]
    assert weight_axes == [1] * 5  # per output column
    ops = _fused_ops(out, tmp_path)
    assert ops.get("MatMulIntegerToFloat", 0) == 5
    assert ops.get("MatMul", 0) + ops.get("FusedMatMul", 0) == 2  # attention: float
    assert unsafe_layers(ir.from_proto(out)) == {}


def test_matmul_within_its_rounding_bound_and_residual_exact():
    """y = LN(x)·W + LN(x): |ŷ − y| ≤ (s_x/2)·Σ_k|W_kn| + (s_w,n/2)·Σ_k|x̂_k| per element (the
    calibration rows, minmax: nothing clipped); z = LN(x) + 1 reads the float LayerNorm."""
    rng = np.random.default_rng(4)
    text = f"""<ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 8, {H}] x) => (float[N, 8, {H}] y, float[N, 8, {H}] z) {{
        a = LayerNormalization <axis = -1> (x, gamma, beta)
        y = MatMul (a, w)
        one = Constant <value = float {{1.0}}> ()
        z = Add (a, one)
    }}"""
    inits = {
        "gamma": rand(rng, H, scale=1.0),
        "beta": rand(rng, H, scale=0.1),
        "w": rand(rng, H, H, scale=H**-0.5),
    }
    model = make_model(text, inits)
    data, x = _data(model, n=32)
    out, _, p = _quantize(
        model, data, rounding="nearest", bias_correction="off", smooth="off", calibration="minmax"
    )
    assert p.details["scope"] == "linear (attention model)"
    got = {i.name: numpy_helper.to_array(i) for i in out.graph.initializer}
    dqs = [n for n in out.graph.node if n.op_type == "DequantizeLinear"]
    dq_x, dq_w = sorted(dqs, key=lambda n: len(n.attribute))
    s_x, s_w = float(got[dq_x.input[1]]), got[dq_w.input[1]].astype(np.float64)
    w = inits["w"].astype(np.float64)
    (y, z), (ry, rz) = ort_run(out, {"x": x}, optimize=True), ort_run(model, {"x": x})
    norm = make_model(text.replace("y = MatMul (a, w)", "y = Identity (a)"), inits)
    a = ort_run(norm, {"x": x})[0]
    bound = s_x / 2 * np.abs(w).sum(0) + s_w / 2 * (np.abs(a) + s_x / 2).sum(-1, keepdims=True)
    err = np.abs(y.astype(np.float64) - ry)
    assert 0 < err.max() and np.all(err <= bound + 1e-5), (err / bound).max()
    np.testing.assert_array_equal(z, rz)


def test_smoothing_lowers_the_static_error_where_channels_are_outliers():
    errs, p = smoothing_errors(_quantize)
    assert set(p.details["smoothing"]) == {"a", "c"}
    assert errs["auto"] < 0.5 * errs["off"], errs


def test_scope_all_keeps_the_cnn_rule_on_an_attention_model():
    model = _block()
    data, _ = _data(model)
    out, modified, p = _quantize(model, data, scope="all", floor=None)
    assert modified and "scope" not in p.details and "smoothing" not in p.details
    assert not any("attention" in s.reason for s in p.skipped)
    assert op_count(out, "QuantizeLinear") > 8  # Adds, Muls and attention MatMuls too


def test_token_table_becomes_8_bit_rows_in_the_linear_scope():
    from onnxshrink.data import Dataset, input_specs

    rng = np.random.default_rng(5)
    text = f"""<ir_version: 8, opset_import: ["" : 17]>
    g (int64[N, 8] ids) => (float[N, 8, {H}] y) {{
        e = Gather (table, ids)
        a = LayerNormalization <axis = -1> (e, gamma, beta)
        y = MatMul (a, w)
    }}"""
    table = rand(rng, 100, H)
    inits = {
        "table": table,
        "gamma": rand(rng, H),
        "beta": rand(rng, H, scale=0.1),
        "w": rand(rng, H, H, scale=H**-0.5),
    }
    model = make_model(text, inits)
    ids = rng.integers(0, 100, (32, 8))
    data = Dataset({"ids": ids}, input_specs(ir.from_proto(model)), "test", is_random=False)
    out, _, p = _quantize(model, data)
    assert p.details["embeddings_int8"] == 1 and op_count(out, "GatherBlockQuantized") == 1
    got = ort_run(out, {"ids": ids}, optimize=True)[0]
    ref = ort_run(model, {"ids": ids})[0]
    cos = np.sum(got * ref) / (np.linalg.norm(got) * np.linalg.norm(ref))
    assert 0.999 < cos < 1.0, cos
    kept, _, p_off = _quantize(model, data, embeddings=False)
    assert "embeddings_int8" not in p_off.details and op_count(kept, "Gather") == 1


def test_mixed_precision_keeps_the_linear_scope(tmp_path):
    model = _block(outlier=8.0)
    data, x = _data(model)
    out, modified, p = _quantize(model, data, min_fidelity=0.99999, max_float=2)
    kept = [s.node for s in p.skipped if s.reason.startswith("kept float by mixed precision")]
    assert modified and len(kept) == 2 and p.details["scope"] == "linear (attention model)"
    assert _fused_ops(out, tmp_path).get("MatMulIntegerToFloat", 0) == 5 - len(kept)
    got, ref = ort_run(out, {"x": x}, optimize=True)[0], ort_run(model, {"x": x})[0]
    assert np.sum(got * ref) / (np.linalg.norm(got) * np.linalg.norm(ref)) > 0.999

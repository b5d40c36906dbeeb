"""quantize-dynamic: int8 MatMul/Gemm with activations quantized at run time."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

from onnxshrink.analysis.saturation import unsafe_layers
from onnxshrink.data import Dataset, input_specs
from onnxshrink.passes.base import PassContext
from onnxshrink.passes.quantize_dynamic import QuantizeDynamicPass
from tests.helpers import apply, make_model, op_count, ort_run, rand, shared_rows

H, F = 32, 64  # hidden width, feed-forward width

BLOCK = f"""
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 8, {H}] x) => (float[N, 8, {H}] y) {{
    ln = LayerNormalization <axis = -1> (x, gamma, beta)
    q0 = MatMul (ln, wq)
    q = Add (q0, bq)
    k = MatMul (ln, wk)
    kt = Transpose <perm = [0, 2, 1]> (k)
    s = MatMul (q, kt)
    p = Softmax <axis = -1> (s)
    v = MatMul (ln, wv)
    a = MatMul (p, v)
    h0 = MatMul (a, w1)
    h1 = Add (h0, b1)
    c = Constant <value = float {{0.70710678}}> ()
    e0 = Mul (h1, c)
    e1 = Erf (e0)
    one = Constant <value = float {{1.0}}> ()
    e2 = Add (e1, one)
    half = Constant <value = float {{0.5}}> ()
    e3 = Mul (h1, e2)
    g0 = Mul (e3, half)
    o0 = MatMul (g0, w2)
    o1 = Add (o0, b2)
    y = Add (o1, x)
}}
"""


def _block(seed: int = 0, outlier: float = 1.0) -> onnx.ModelProto:
    """A transformer block: LayerNorm -> Q/K/V MatMuls -> attention (two activations: float)
    -> MatMul -> exact GELU -> MatMul, residual; ``outlier`` scales one LayerNorm channel."""
    rng = np.random.default_rng(seed)
    gamma = np.ones(H, np.float32)
    gamma[3] = outlier
    inits = {
        "gamma": gamma,
        "beta": rand(rng, H, scale=0.1),
        "wq": rand(rng, H, H, scale=H**-0.5),
        "bq": rand(rng, H, scale=0.1),
        "wk": rand(rng, H, H, scale=H**-0.5),
        "wv": rand(rng, H, H, scale=H**-0.5),
        "w1": rand(rng, H, F, scale=H**-0.5),
        "b1": rand(rng, F, scale=0.1),
        "w2": rand(rng, F, H, scale=F**-0.5),
        "b2": rand(rng, H, scale=0.1),
    }
    return make_model(BLOCK, inits)


def _data(model, n=64, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 8, H)).astype(np.float32)
    return Dataset({"x": x}, input_specs(ir.from_proto(model)), "test", is_random=False), x


def _quantize(model, data=None, **opts):
    p = QuantizeDynamicPass(**opts)
    p.bind(PassContext(data=data))
    out, modified = apply(p, model)
    return out, modified, p


def _integer_reference(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """The quantized model in onnx's reference evaluator: DynamicQuantizeLinear as the standard
    defines it, MatMulInteger in exact int32 (what any CPU gives when no pair saturates)."""
    from onnx.reference import ReferenceEvaluator

    return ReferenceEvaluator(model).run(None, {model.graph.input[0].name: x})[0]


def _fused_ops(model: onnx.ModelProto, tmp_path) -> dict[str, int]:
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    counts: dict[str, int] = {}
    for n in onnx.load(opts.optimized_model_filepath).graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return counts


def test_block_weights_int8_attention_float_and_onnxruntime_fuses(tmp_path):
    model = _block()
    data, _ = _data(model)
    out, modified, p = _quantize(model, data)
    assert modified
    assert op_count(out, "MatMulInteger") == 5  # q, k, v, the two FFN matrices
    assert op_count(out, "MatMul") == 2  # q·kᵀ and p·v: two activations
    assert op_count(out, "DynamicQuantizeLinear") == 3  # ln (shared by q, k, v), a, g0
    assert {s.reason for s in p.skipped} == {"two activations (e.g. attention scores): left float"}
    ops = _fused_ops(out, tmp_path)
    assert "MatMulInteger" not in ops
    assert ops.get("DynamicQuantizeMatMul", 0) + ops.get("MatMulIntegerToFloat", 0) == 5
    assert unsafe_layers(ir.from_proto(out)) == {}


@pytest.mark.parametrize("rounding", ["nearest", "hessian"])
def test_onnxruntime_gives_the_integer_reference_in_an_optimized_session(rounding):
    # the pair rule holds, so the u8s8 kernels (saturating without VNNI) give exact int32 sums
    model = _block(outlier=6.0)
    data, _ = _data(model)
    out, _, _ = _quantize(model, data, rounding=rounding)
    x = np.random.default_rng(9).standard_normal((4, 8, H)).astype(np.float32)
    ref = _integer_reference(out, x)
    for optimize in (False, True):
        got = ort_run(out, {"x": x}, optimize=optimize)[0]
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-4 * np.abs(ref).max())
    float_out = ort_run(model, {"x": x})[0]
    err = np.linalg.norm(ref - float_out) / np.linalg.norm(float_out)
    # quantized, and close: the outlier channel widens the per-tensor activation grid six-fold
    # (relative error measured 0.046 nearest / 0.049 Hessian on Zen 3)
    assert 1e-4 < err < 0.1, err


def test_without_the_pair_rule_pairs_break_it_and_with_it_none_do():
    rng = np.random.default_rng(0)
    w = rng.uniform(0.5, 1.0, (H, H)).astype(np.float32)  # same-sign neighbours: sums up to 2·max
    model = make_model(
        f"""<ir_version: 8, opset_import: ["" : 17]>
        g (float[N, {H}] x) => (float[N, {H}] y) {{ y = MatMul (x, w) }}""",
        {"w": w},
    )
    vnni, _, _ = _quantize(model, cpu="vnni")
    safe, _, p = _quantize(model, cpu="any")
    assert sum(unsafe_layers(ir.from_proto(vnni)).values()) > 100
    assert unsafe_layers(ir.from_proto(safe)) == {}
    assert p.details["int8_cpu"]["pair_rule"]


def _on_the_grid(n: int, seed: int) -> np.ndarray:
    """Rows of 64 strongly correlated inputs on uint8's grid (0 and 255 in the first row):
    DynamicQuantizeLinear represents them exactly, so only the weights' rounding shows."""
    x = np.round(shared_rows(n, 64, seed, level=(40, 215), noise=8))
    x[0, :2] = 0, 255
    return np.clip(x, 0, 255).astype(np.float32)


def test_hessian_rounding_moves_the_output_far_less_than_nearest():
    rng = np.random.default_rng(0)
    model = make_model(
        """<ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 64] x) => (float[N, 32] y) { y = MatMul (x, w) }""",
        {"w": rand(rng, 64, 32)},
    )
    specs = input_specs(ir.from_proto(model))
    data = Dataset({"x": _on_the_grid(512, 1)}, specs, "test", is_random=False)
    x = _on_the_grid(256, 2)
    ref = ort_run(model, {"x": x})[0]
    errs = {}
    for rounding in ("nearest", "hessian"):
        out, _, p = _quantize(model, data, rounding=rounding, smooth="off", samples=512)
        got = ort_run(out, {"x": x}, optimize=True)[0]
        np.testing.assert_allclose(got, _integer_reference(out, x), rtol=1e-5, atol=1e-3)
        errs[rounding] = float(np.mean((got - ref) ** 2))
    # the shared component of the rows makes nearest rounding's errors add up; GPTQ cancels them
    # (measured: 75.5 -> 1.5 on Zen 3)
    assert errs["hessian"] < 0.1 * errs["nearest"], (errs, p.details)


@pytest.mark.parametrize("trans_b,alpha,beta", [(0, 1.0, 1.0), (1, 0.5, 2.0), (1, 1.0, 0.0)])
def test_gemm_forms_match_the_float_layer(trans_b, alpha, beta):
    rng = np.random.default_rng(trans_b)
    b = rand(rng, 24, 16) if trans_b else rand(rng, 16, 24)
    model = make_model(
        f"""<ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 16] x) => (float[N, 24] y) {{
            y = Gemm <transB = {trans_b}, alpha = {alpha}, beta = {beta}> (x, b, c)
        }}""",
        {"b": b, "c": rand(rng, 24)},
    )
    out, modified, _ = _quantize(model)
    assert modified and op_count(out, "Gemm") == 0
    x = rand(rng, 32, 16)
    ref, got = ort_run(model, {"x": x})[0], ort_run(out, {"x": x}, optimize=True)[0]
    assert np.abs(got - ref).max() < 0.03 * np.abs(ref).max()
    np.testing.assert_allclose(got, _integer_reference(out, x), atol=1e-4 * np.abs(ref).max())


def test_refusals_name_the_reason():
    rng = np.random.default_rng(0)
    w = rand(rng, 16, 16)
    model = make_model(
        """<ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 16] x, float[N, 16] c) => (float[N, 16] y, float[2, N, 16] z) {
            a = MatMul (x, w)
            b = MatMul (a, w)
            t = Gemm <transA = 1> (x, v1)
            u = Gemm (t, v2, c)
            y = Add (b, u)
            x2 = Unsqueeze (x, ax)
            x3 = Concat <axis = 0> (x2, x2)
            z = MatMul (x3, w3)
        }""",
        {
            "w": w,
            "v1": rand(rng, 16, 16),
            "v2": rand(rng, 16, 16),
            "w3": rand(rng, 2, 16, 16),
            "ax": np.array([0]),
        },
    )
    out, modified, p = _quantize(model)
    reasons = sorted(s.reason for s in p.skipped)
    assert not modified, reasons
    assert reasons == [
        "Gemm with a non-constant C is left float",
        "Gemm with transA=1 is left float",
        "a 3-D weight (a per-column MatMulInteger takes 2-D)",
        "weight is shared with another node",
        "weight is shared with another node",
    ]


def test_an_already_quantized_model_is_refused():
    model = _block()
    once, _, _ = _quantize(model)
    _, modified, p = _quantize(once)
    assert not modified
    assert [s.reason for s in p.skipped] == ["the model is already quantized (has MatMulInteger)"]


def test_embedding_tables_become_8_bit_gathers_within_half_a_step():
    rng = np.random.default_rng(3)
    table, narrow = rand(rng, 300, 64), rand(rng, 100, 24)
    model = make_model(
        """<ir_version: 8, opset_import: ["" : 17]>
        g (int64[N, 5] ids) => (float[N, 5, 64] y, float[N, 5, 24] z) {
            y = Gather (table, ids)
            z = Gather (narrow, ids)
        }""",
        {"table": table, "narrow": narrow},
    )
    out, modified, p = _quantize(model)
    assert modified and op_count(out, "GatherBlockQuantized") == 1
    assert [s.reason for s in p.skipped] == ["row width 24 is not a multiple of 16"]
    ids = rng.integers(0, 100, (7, 5))
    got = ort_run(out, {"ids": ids}, optimize=True)
    ref = ort_run(model, {"ids": ids})
    step = (table.max(1) - np.minimum(table.min(1), 0)).max() / 255  # the widest row's step
    assert 0 < np.abs(got[0] - ref[0]).max() <= step / 2 + 1e-6
    np.testing.assert_array_equal(got[1], ref[1])
    off, _, _ = _quantize(model, embeddings=False)
    assert op_count(off, "GatherBlockQuantized") == 0


def _outlier_block():
    """LayerNorm (two channels 20x) → MatMul, the LayerNorm also read by a residual Add (so
    smoothing needs a Mul), and LayerNorm → MatMul read by nothing else (folded into γ/β)."""
    rng = np.random.default_rng(7)
    gamma = np.ones(H, np.float32)
    gamma[[2, 9]] = 20.0
    text = f"""<ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 8, {H}] x) => (float[N, 8, {H}] y, float[N, 8, {H}] z) {{
        a = LayerNormalization <axis = -1> (x, gamma, beta)
        b = MatMul (a, w1)
        y = Add (b, a)
        c = LayerNormalization <axis = -1> (x, gamma2, beta2)
        z = MatMul (c, w2)
    }}"""
    inits = {
        "gamma": gamma,
        "beta": rand(rng, H, scale=0.1),
        "w1": rand(rng, H, H, scale=H**-0.5),
        "gamma2": gamma.copy(),
        "beta2": rand(rng, H, scale=0.1),
        "w2": rand(rng, H, H, scale=H**-0.5),
    }
    return make_model(text, inits)


def test_smoothing_is_exact_in_float_by_mul_or_folded_into_the_layernorm():
    from onnxshrink.passes.quantize_smooth import _apply

    model = _outlier_block()
    m = ir.from_proto(model)
    mm = {n.name or n.outputs[0].name: n for n in m.graph if n.op_type == "MatMul"}
    s = np.random.default_rng(1).uniform(0.2, 5.0, H)
    hows = [_apply(m.graph, n.inputs[0], [n], s) for n in mm.values()]
    assert hows == ["a Mul in front of its readers", "folded into its LayerNormalization"]
    out = ir.to_proto(m)
    onnx.checker.check_model(out)
    x = np.random.default_rng(2).standard_normal((4, 8, H)).astype(np.float32)
    for got, ref in zip(ort_run(out, {"x": x}), ort_run(model, {"x": x})):
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


def smoothing_errors(quantize) -> tuple[dict[str, float], object]:
    """Squared output error on unseen rows of :func:`_outlier_block` quantized by ``quantize``
    (``_quantize``'s signature) with smoothing off and auto; the pass of the second."""
    model = _outlier_block()
    data, _ = _data(model, n=64)
    x = np.random.default_rng(3).standard_normal((32, 8, H)).astype(np.float32)
    ref = ort_run(model, {"x": x})
    errs = {}
    for smooth in ("off", "auto"):
        out, _, p = quantize(model, data, smooth=smooth, rounding="nearest")
        got = ort_run(out, {"x": x}, optimize=True)
        errs[smooth] = sum(float(np.mean((g - r) ** 2)) for g, r in zip(got, ref))
    return errs, p


def test_smoothing_lowers_the_error_where_channels_are_outliers():
    errs, p = smoothing_errors(_quantize)
    assert set(p.details["smoothing"]) == {"a", "c"}  # both inputs, each its own α
    assert errs["auto"] < 0.5 * errs["off"], errs

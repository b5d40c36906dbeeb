"""quantize-weights: 4/8-bit weight-only MatMul (MatMulNBits) and embedding tables."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from onnxshrink.analysis import nbits
from onnxshrink.data import Dataset, input_specs
from onnxshrink.passes.base import PassContext
from onnxshrink.passes.quantize_weights import QuantizeWeightsPass
from tests.helpers import apply, make_model, op_count, ort_run, rand, shared_rows


def _quantize(model, data=None, **opts):
    p = QuantizeWeightsPass(**opts)
    p.bind(PassContext(data=data))
    out, modified = apply(p, model)
    return out, modified, p


def _matmul(k: int, n: int, seed: int = 0) -> tuple[onnx.ModelProto, np.ndarray]:
    w = rand(np.random.default_rng(seed), k, n)
    text = f"""<ir_version: 8, opset_import: ["" : 17]>
    g (float[N, {k}] x) => (float[N, {n}] y) {{ y = MatMul (x, w) }}"""
    return make_model(text, {"w": w}), w


@pytest.mark.parametrize("bits,block,k", [(4, 32, 96), (4, 128, 70), (8, 16, 48)])
def test_onnxruntime_computes_the_nearest_codes_on_the_written_grid(bits, block, k):
    model, w = _matmul(k, 24, seed=k)
    out, modified, p = _quantize(model, bits=bits, block=block)
    assert modified and op_count(out, "MatMulNBits") == 1 and op_count(out, "MatMul") == 0
    init = {i.name: onnx.numpy_helper.to_array(i) for i in out.graph.initializer}
    b = next(v for name, v in init.items() if name.endswith("weight_quantized"))
    s = next(v for name, v in init.items() if name.endswith("weight_scale"))
    z = next(v for name, v in init.items() if name.endswith("weight_zero_point"))
    blocks = -(-k // block)
    codes = nbits.unpack_codes(b.reshape(24, -1), bits, blocks * block)
    zps = nbits.unpack_codes(z.reshape(24, -1), bits, blocks)
    deq = nbits.dequantized(codes, s, zps, block, k)
    np.testing.assert_array_equal(codes, nbits.nearest_codes(w, s, zps, bits, block))
    assert np.abs(deq - w).mean() < 0.3 * np.repeat(s, block, 1).mean()  # clipping is rare
    x = rand(np.random.default_rng(1), 5, k)
    got = ort_run(out, {"x": x}, optimize=True)[0]
    np.testing.assert_allclose(got, x @ deq, rtol=1e-4, atol=1e-4)
    w_bytes = p.details["weight_only"]
    packed = 24 * (blocks * block * bits // 8 + blocks * 4 + -(-blocks * bits // 8))
    assert (w_bytes["bytes_before"], w_bytes["bytes_after"]) == (k * 24 * 4, packed)


@pytest.mark.parametrize("bits,block,k", [(4, 32, 96), (8, 16, 48)])
def test_symmetric_codes_use_the_default_zero_point_onnxruntime_reads(bits, block, k):
    model, w = _matmul(k, 24, seed=k)
    out, modified, p = _quantize(model, bits=bits, block=block, symmetric=True)
    assert modified and len(out.graph.node[0].input) == 3  # no zero points stored
    init = {i.name: onnx.numpy_helper.to_array(i) for i in out.graph.initializer}
    b = next(v for name, v in init.items() if name.endswith("weight_quantized"))
    s = next(v for name, v in init.items() if name.endswith("weight_scale"))
    mid = np.full(s.shape, 2 ** (bits - 1), np.uint8)
    codes = nbits.unpack_codes(b.reshape(24, -1), bits, k)
    deq = nbits.dequantized(codes, s, mid, block, k)
    amax = np.abs(w).reshape(k // block, block, 24).max(1).T  # [N, blocks]
    assert np.all(s <= amax / (2 ** (bits - 1) - 1) + 1e-7)  # at most the full range
    assert np.abs(deq - w).max() <= np.repeat(s, block, 1).T.max() * 2 ** (bits - 1)
    x = rand(np.random.default_rng(1), 5, k)
    got = ort_run(out, {"x": x}, optimize=True)[0]
    np.testing.assert_allclose(got, x @ deq, rtol=1e-4, atol=1e-4)
    asym, _, _ = _quantize(model, bits=bits, block=block)
    err = {
        "symmetric": np.abs(got - x @ w).mean(),
        "asymmetric": np.abs(ort_run(asym, {"x": x}, optimize=True)[0] - x @ w).mean(),
    }
    assert err["asymmetric"] < err["symmetric"] < 3 * err["asymmetric"], err


def test_hessian_rounding_lowers_the_output_error_on_unseen_rows():
    model, _ = _matmul(64, 32)
    specs = input_specs(ir.from_proto(model))
    data = Dataset({"x": shared_rows(1024, 64, 1)}, specs, "test", is_random=False)
    x = shared_rows(256, 64, 2)
    ref = ort_run(model, {"x": x})[0]
    errs = {}
    for rounding in ("nearest", "hessian"):
        out, _, p = _quantize(model, data, rounding=rounding, samples=1024)
        errs[rounding] = float(np.mean((ort_run(out, {"x": x}, optimize=True)[0] - ref) ** 2))
    assert p.details["rounding"] != {"nearest": 1}
    assert errs["hessian"] < 0.5 * errs["nearest"], errs


def test_a_wide_layer_is_chosen_and_rounded_in_column_chunks_with_the_same_result(monkeypatch):
    from onnxshrink.passes import quantize_weights

    model, _ = _matmul(64, 96)
    specs = input_specs(ir.from_proto(model))
    data = Dataset({"x": shared_rows(1024, 64, 1)}, specs, "test", is_random=False)
    whole, _, p1 = _quantize(model, data, rounding="hessian", samples=1024)
    monkeypatch.setattr(quantize_weights, "COLUMN_CHUNK", 64 * 40)  # 40, 40 and 16 columns
    chunked, _, p2 = _quantize(model, data, rounding="hessian", samples=1024)
    assert p1.details["rounding"] == p2.details["rounding"] != {"nearest": 1}
    assert whole.graph.initializer == chunked.graph.initializer


def test_embeddings_in_4_bits_and_refusals():
    rng = np.random.default_rng(3)
    model = make_model(
        """<ir_version: 8, opset_import: ["" : 17]>
        g (int64[N, 5] ids, float[64, M] h) => (float[N, 5, 64] e, float[M, 64] y) {
            e = Gather (table, ids)
            y = Gemm <transA = 1> (h, v)
        }""",
        {"table": rand(rng, 300, 64), "v": rand(rng, 64, 64)},
    )
    out, modified, p = _quantize(model)
    assert modified and op_count(out, "GatherBlockQuantized") == 1
    assert [s.reason for s in p.skipped] == ["Gemm with transA=1 is left float"]
    ids = rng.integers(0, 300, (3, 5))
    h = rand(rng, 64, 2)
    got, ref = ort_run(out, {"ids": ids, "h": h}), ort_run(model, {"ids": ids, "h": h})
    err = np.abs(got[0] - ref[0]).max()
    assert 0 < err < 0.2 * np.abs(ref[0]).max()  # 4 bits: 15 steps over each block's range
    np.testing.assert_array_equal(got[1], ref[1])


def test_a_decoder_in_external_data_one_segment_at_a_time(tmp_path, monkeypatch):
    """models/decoder.py's Llama-style decoder (weights in external data) through compress, with
    the large-model path forced: the original's reference comes from segment sessions, Grams
    from one sweep; every weight and the embedding become block-quantized."""
    import onnxshrink
    from models import decoder
    from onnxshrink import instruments

    cfg = decoder.Config(layers=2, hidden=128, heads=4, intermediate=256, vocab=512, context=64)
    src = decoder.build(cfg, tmp_path / "d.onnx")
    monkeypatch.setattr(instruments, "LARGE_MODEL", 0)
    ids = np.random.default_rng(0).integers(0, cfg.vocab, (32, 24))
    out, report = onnxshrink.compress(
        src, ["quantize-weights"], data={"input_ids": ids}, output=tmp_path / "q.onnx",
        progress=False,
    )  # fmt: skip
    (rec,) = report.passes
    assert rec.status == "applied", rec.reason
    assert rec.details["rounding"], rec.details  # rounding chosen on Grams from the sweep
    proto = onnx.load(str(out))
    assert op_count(proto, "MatMulNBits") == 7 * cfg.layers + 1
    assert op_count(proto, "GatherBlockQuantized") == 1
    test = np.random.default_rng(1).integers(0, cfg.vocab, (2, 24))
    (y,) = ort_run(str(out), {"input_ids": test})
    (y0,) = ort_run(str(src), {"input_ids": test})
    cos = np.sum(y * y0, -1) / np.linalg.norm(y, axis=-1) / np.linalg.norm(y0, axis=-1)
    assert cos.min() > 0.9, cos.min()
    assert rec.fidelity.cosine > 0.9


@pytest.mark.parametrize("rounding,alpha,beta", [("nearest", 0.5, 2.0), ("hessian", 1.0, 1.0)])
def test_a_gemm_becomes_matmulnbits_and_its_bias(rounding, alpha, beta):
    """Y = α·X·Bᵀ + β·C: MatMulNBits over the codes of α·Bᵀ, then Add(β·C); the output keeps
    its name, and onnxruntime computes X·dequantized + β·C. Hessian-aware rounding uses the
    Gram of X alone (the sweep's Gemm Grams carry a bias row)."""
    rng = np.random.default_rng(5)
    b, c = rand(rng, 24, 64), rand(rng, 24)
    model = make_model(
        f"""<ir_version: 8, opset_import: ["" : 17]>
        g (float[M, 64] x) => (float[M, 24] y) {{
            y = Gemm <transB = 1, alpha = {alpha}, beta = {beta}> (x, b, c)
        }}""",
        {"b": b, "c": c},
    )
    specs = input_specs(ir.from_proto(model))
    data = Dataset({"x": shared_rows(512, 64, 1)}, specs, "test", is_random=False)
    out, modified, p = _quantize(model, data, rounding=rounding, samples=512)
    assert modified and op_count(out, "MatMulNBits") == 1 and op_count(out, "Gemm") == 0
    assert op_count(out, "Add") == 1 and [o.name for o in out.graph.output] == ["y"]
    if rounding == "hessian":
        assert sum(p.details["rounding"].values()) == 1
    init = {i.name: onnx.numpy_helper.to_array(i) for i in out.graph.initializer}
    q = next(v for name, v in init.items() if name.endswith("weight_quantized"))
    s = next(v for name, v in init.items() if name.endswith("weight_scale"))
    z = next(v for name, v in init.items() if name.endswith("weight_zero_point"))
    codes = nbits.unpack_codes(q.reshape(24, -1), 4, 64)
    deq = nbits.dequantized(codes, s, nbits.unpack_codes(z.reshape(24, -1), 4, 2), 32, 64)
    w = alpha * b.T
    assert np.abs(deq - w).max() < np.repeat(s, 32, 1).max()  # the grid is of α·Bᵀ
    x = shared_rows(64, 64, 2)
    got = ort_run(out, {"x": x}, optimize=True)[0]
    np.testing.assert_allclose(got, x @ deq + beta * c, rtol=1e-4, atol=1e-4)
    ref = ort_run(model, {"x": x})[0]
    cos = np.sum(got * ref) / np.linalg.norm(got) / np.linalg.norm(ref)
    assert cos > 0.99


def test_accuracy_level_4_is_written_and_onnxruntime_stays_close():
    from onnxshrink.errors import OptionError

    model, w = _matmul(128, 32, seed=3)
    x = rand(np.random.default_rng(1), 8, 128)
    exact, _, _ = _quantize(model)
    fast, _, _ = _quantize(model, accuracy_level=4)
    attrs = {a.name: a.i for a in fast.graph.node[0].attribute}
    assert attrs["accuracy_level"] == 4
    ref = ort_run(exact, {"x": x}, optimize=True)[0]  # same weights, float activations
    got = ort_run(fast, {"x": x}, optimize=True)[0]
    rel = np.abs(got - ref).max() / np.abs(ref).max()
    assert rel < 0.02, rel  # int8 activations per block: ~1/254 of each block's range
    with pytest.raises(OptionError, match="accuracy-level"):
        QuantizeWeightsPass(accuracy_level=5)

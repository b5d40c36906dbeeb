"""MatMulNBits' weight layout: packing, and onnxruntime computing what we mean by it."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from onnxshrink.analysis.blockquant import block_quantize, dequantize
from onnxshrink.analysis.nbits import pack, pack_codes, unpack_codes
from tests.helpers import ort_run


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_codes_round_trip(bits):
    codes = np.random.default_rng(bits).integers(0, 2**bits, (3, 64)).astype(np.uint8)
    packed = pack_codes(codes, bits)
    assert packed.shape == (3, 64 * bits // 8)
    np.testing.assert_array_equal(unpack_codes(packed, bits, 64), codes)
    if bits == 4:  # low nibble first
        assert packed[0, 0] == codes[0, 0] | (codes[0, 1] << 4)


@pytest.mark.parametrize("bits,block,k", [(4, 32, 96), (4, 128, 200), (8, 32, 70), (4, 64, 64)])
def test_onnxruntime_computes_the_dequantized_weight(bits, block, k):
    rng = np.random.default_rng(k)
    n = 24
    w = rng.standard_normal((k, n)).astype(np.float32)
    b, scales, zp = pack(w, bits, block)
    node = h.make_node(
        "MatMulNBits",
        ["x", "B", "scales", "zp"],
        ["y"],
        domain="com.microsoft",
        K=k,
        N=n,
        bits=bits,
        block_size=block,
    )
    graph = h.make_graph(
        [node],
        "g",
        [h.make_tensor_value_info("x", T.FLOAT, [None, k])],
        [h.make_tensor_value_info("y", T.FLOAT, [None, n])],
        [nh.from_array(b, "B"), nh.from_array(scales, "scales"), nh.from_array(zp, "zp")],
    )
    model = h.make_model(
        graph, opset_imports=[h.make_opsetid("", 21), h.make_opsetid("com.microsoft", 1)]
    )
    x = rng.standard_normal((5, k)).astype(np.float32)
    got = ort_run(model, {"x": x}, optimize=True)[0]
    blocks = -(-k // block)
    wt = np.zeros((n, blocks * block), np.float32)
    wt[:, :k] = w.T
    deq = dequantize(*block_quantize(wt, bits, block), block)[:, :k]
    np.testing.assert_allclose(got, x @ deq.T, rtol=1e-4, atol=1e-4)
    step = scales.max()
    assert np.abs(deq.T - w).max() <= step / 2 * (1 + 1e-5)
    onnx.checker.check_model(model)

"""Block-wise asymmetric quantization (GatherBlockQuantized's layout)."""

from __future__ import annotations

import numpy as np
import pytest

from onnxshrink.analysis.blockquant import block_quantize, block_size, dequantize


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("shift", [0.0, 3.0])  # blocks spanning zero, and all-positive ones
def test_every_value_within_half_a_step_and_zero_exact(bits, shift):
    rng = np.random.default_rng(bits)
    w = (rng.standard_normal((6, 128)) + shift).astype(np.float32)
    w[0, :32] = 0.0  # an all-zero block
    w[1, 5] = 0.0
    q, s, z = block_quantize(w, bits, 32)
    assert q.max() <= 2**bits - 1 and s.shape == z.shape == (6, 4)
    back = dequantize(q, s, z, 32)
    step = np.repeat(s, 32, axis=1)
    assert np.all(np.abs(back - w) <= step / 2 * (1 + 1e-5))
    assert np.all(back[0, :32] == 0) and back[1, 5] == 0
    assert np.abs(back - w).max() > 0  # it was rounded


def test_block_size_is_the_largest_that_divides():
    assert [block_size(d) for d in (384, 96, 48, 24)] == [128, 32, 16, None]

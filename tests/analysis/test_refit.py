"""Least-squares re-fitting of a layer to the original's outputs (onnxshrink.analysis.refit)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxshrink.analysis.refit import MAX_FAN_IN, refit_layers, refit_supported
from onnxshrink.data import Dataset, input_specs
from tests.helpers import make_model

TOKENS = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 64, 32] x, float[32, 16] W) => (float[N, 64, 16] y) {
    y = MatMul (x, W)
}"""


def test_a_batched_matmul_is_fitted_per_position(tmp_path):
    """x [N, 64, 32] @ W [32, 16]: one row per token (32 inputs), not one per sample (2048,
    which is how a jax2tf classifier's Einsum once asked for a 2 TiB system)."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((32, 16)).astype(np.float32)
    teacher = ir.from_proto(make_model(TOKENS, {"W": w}))
    noisy = (w + 0.3 * rng.standard_normal(w.shape)).astype(np.float32)
    student = ir.from_proto(make_model(TOKENS, {"W": noisy}))
    x = rng.standard_normal((24, 64, 32)).astype(np.float32)
    data = Dataset({"x": x}, input_specs(teacher), "test")
    node = next(iter(student.graph))
    (rec,) = refit_layers(student, teacher, [node], {}, data, tmp_path, samples=24, ridge=1e-6)
    assert rec["applied"] and rec["heldout_error_after"] < 1e-3 * rec["heldout_error_before"]
    fitted = node.inputs[1].const_value.numpy()
    np.testing.assert_allclose(fitted, w, atol=1e-3)


def test_a_layer_too_wide_to_fit_says_why():
    wide = MAX_FAN_IN + 1
    text = TOKENS.replace("32", str(wide))
    model = ir.from_proto(make_model(text, {"W": np.zeros((wide, 16), np.float32)}))
    reason = refit_supported(next(iter(model.graph)))
    assert reason is not None and f"{wide} inputs per output" in reason

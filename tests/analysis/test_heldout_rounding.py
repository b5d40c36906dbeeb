"""Hessian-aware rounding with its damping chosen on held-out rows."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxshrink.analysis.heldout_rounding import choose_rounding
from onnxshrink.analysis.qplan import quantize_weight
from tests.helpers import shared_rows


def _node(w: np.ndarray) -> ir.Node:
    x = ir.val("x", ir.DataType.FLOAT)
    return ir.node("MatMul", [x, ir.val("w", const_value=ir.tensor(w))], name="mm")


def _gram(rows: np.ndarray) -> np.ndarray:
    return (rows.T @ rows)[None].astype(np.float64)


def test_gptq_is_chosen_where_held_out_rows_look_like_the_fitted_ones():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((32, 8)).astype(np.float32)
    fit, held = shared_rows(2000, 32, 10), shared_rows(500, 32, 11)  # one shared component
    scale, q = quantize_weight(w, 1)
    _, _, _, record = choose_rounding(_node(w), _gram(fit), _gram(held), scale, 1, q, safe=False)
    errors = record["held_out_error"]
    assert record["chosen"] != "nearest"
    assert errors[record["chosen"]] < 0.5 * errors["nearest"], errors


def test_nearest_is_kept_where_the_fitted_rows_missed_what_held_out_rows_excite():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((32, 8)).astype(np.float32)
    basis = rng.standard_normal((4, 32))
    fit = rng.standard_normal((2000, 4)) @ basis  # four directions of thirty-two
    held = rng.standard_normal((500, 32))  # all of them
    scale, q = quantize_weight(w, 1)
    q_out, b, _, record = choose_rounding(
        _node(w), _gram(fit), _gram(held), scale, 1, q, safe=False
    )
    errors = record["held_out_error"]
    assert errors[record["chosen"]] == min(errors.values())
    assert record["chosen"] == "nearest", errors
    np.testing.assert_array_equal(q_out, q)
    assert b is None

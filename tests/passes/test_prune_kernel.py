"""prune-kernel: kernel shapes and pad arithmetic, exact on zero taps, refusals, digits accuracy."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import onnxshrink
from onnxshrink.passes.prune_kernel import PruneKernelPass, kernel_shape, progressions
from tests.helpers import apply, make_model, ort_run, rand


def test_progressions_and_shape_choice():
    assert progressions(3) == [(0, 1, 2), (0, 1), (0, 2), (1, 2), (0,), (1,), (2,)]
    energy = np.array([[1.0, 1, 1], [5, 5, 5], [9, 9, 9]])  # the top row is weakest
    rows, cols, gh, gw = kernel_shape(energy, 6, [1, 1], [1, 1, 1, 1])
    assert (rows, cols, gh, gw) == ((1, 2), (0, 1, 2), (1, 0, 1), (1, 1, 1))
    energy = np.array([[9.0, 9, 9], [1, 1, 1], [9, 9, 9]])  # the middle row: dilation 2, same pads
    rows, cols, gh, _ = kernel_shape(energy, 6, [1, 1], [1, 1, 1, 1])
    assert rows == (0, 2) and gh == (2, 1, 1)
    # unpadded: dropping an edge row would shift the output; the middle (dilated) one still works
    assert kernel_shape(np.array([[1.0, 2, 1], [5, 6, 5], [9, 10, 9]]), 6, [1, 1], [0, 0, 0, 0])[
        0
    ] == (0, 2)
    assert (
        kernel_shape(np.ones((3, 3)), 1, [1, 1], [0, 0, 0, 0]) is None
    )  # one tap: pads must shrink


def _conv(
    zero_row=None,
    zero_col=None,
    *,
    stride=1,
    dilation=1,
    pads=(1, 1, 1, 1),
    group=1,
    size=11,
    seed=0,
):
    rng = np.random.default_rng(seed)
    c_in, c_out = 8, (12 if group == 1 else 8)
    w = rand(rng, c_out, c_in // group, 3, 3)
    if zero_row is not None:
        w[:, :, zero_row, :] = 0
    if zero_col is not None:
        w[:, :, :, zero_col] = 0
    p = ", ".join(map(str, pads))
    model = make_model(
        f"""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2, {c_in}, {size}, {size}] x, float[{c_out}, {c_in // group}, 3, 3] W,
        float[{c_out}] b) => (float[2, {c_out}, ?, ?] y) {{
        y = Conv <kernel_shape = [3, 3], strides = [{stride}, {stride}], dilations = [{dilation},
            {dilation}], pads = [{p}], group = {group}> (x, W, b)
    }}""",
        {"W": w, "b": rand(rng, c_out)},
    )
    return model, {"x": rand(rng, 2, c_in, size, size)}


@pytest.mark.parametrize(
    "zero_row,zero_col", [(0, None), (1, None), (2, None), (None, 0), (None, 2), (0, 2)]
)
@pytest.mark.parametrize("stride,dilation", [(1, 1), (2, 1), (1, 2), (2, 2)])
def test_dropping_zero_taps_is_exact(zero_row, zero_col, stride, dilation):
    pads = (dilation,) * 4
    model, feeds = _conv(zero_row, zero_col, stride=stride, dilation=dilation, pads=pads)
    ref = ort_run(model, feeds)[0]
    ratio = 0.5 if zero_row is not None and zero_col is not None else 0.3
    p = PruneKernelPass(ratio=ratio, refit=False)
    out, modified = apply(p, model)
    assert modified
    w = next(i for i in out.graph.initializer if i.name.endswith("kernel_pruned"))
    assert w.dims[2] * w.dims[3] <= (1 - ratio) * 9
    got = ort_run(out, feeds)[0]
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, atol=1e-5)
    assert p.details["layers"][0]["energy_kept"] == pytest.approx(1.0)


@pytest.mark.parametrize("pads", [(2, 1, 0, 1), (0, 2, 1, 0), (1, 0, 2, 2)])
def test_asymmetric_pads_keep_shape_and_alignment(pads):
    for zero_row in (0, 2):
        model, feeds = _conv(zero_row, None, pads=pads)
        ref = ort_run(model, feeds)[0]
        p = PruneKernelPass(ratio=0.3, refit=False)
        out, modified = apply(p, model)
        if not modified:  # the only zero row cannot be dropped here: refused with the reason
            assert "non-negative" in p.skipped[0].reason or p.details == {}
            continue
        got = ort_run(out, feeds)[0]
        assert got.shape == ref.shape
        kept = p.details["layers"][0]
        if kept["energy_kept"] > 1 - 1e-9:
            np.testing.assert_allclose(got, ref, atol=1e-5)


def test_depthwise_and_refusals():
    model, feeds = _conv(1, None, group=8)
    out, modified = apply(PruneKernelPass(ratio=0.3, refit=False), model)
    assert modified
    np.testing.assert_allclose(ort_run(out, feeds)[0], ort_run(model, feeds)[0], atol=1e-5)
    model, _ = _conv(pads=(0, 0, 0, 0))
    p = PruneKernelPass(ratio=0.9, refit=False)
    _, modified = apply(p, model)
    assert not modified and "non-negative" in p.skipped[0].reason
    one = make_model(
        """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[1, 4, 5, 5] x, float[4, 4, 1, 1] W) => (float[1, 4, 5, 5] y) { y = Conv (x, W) }""",
        {"W": rand(np.random.default_rng(0), 4, 4, 1, 1)},
    )
    p = PruneKernelPass()
    _, modified = apply(p, one)
    assert not modified and "1×1" in p.skipped[0].reason


def test_digits_every_3x3_conv_loses_a_quarter_of_its_taps(digits_model, digits_calib, digits_test):
    x, labels = digits_test
    original = onnx.load(str(digits_model))
    out, rep = onnxshrink.compress(
        original,
        ["fold-batchnorm", "prune-kernel:ratio=0.25"],
        data=str(digits_calib),
        progress=False,
    )
    rec = rep.passes[-1]
    assert rec.status == "applied", rec
    n3 = sum(
        1 for i in original.graph.initializer if len(i.dims) == 4 and tuple(i.dims[2:]) == (3, 3)
    )
    assert len(rec.details["layers"]) == n3  # every 3×3 conv changed
    for layer in rec.details["layers"]:
        h, w = map(int, layer["kernel"].split("-> ")[1].split("×"))
        assert h * w <= 0.75 * 9
    assert rep.after["macs"] < 0.8 * rep.before["macs"]
    acc = float((ort_run(out, {"input": x})[0].argmax(1) == labels).mean())
    assert acc >= 0.98, acc
    assert [o.name for o in out.graph.output] == ["logits"]


def test_depthwise_layers_are_refitted_per_group(tmp_path):
    # grouped / depthwise convs are re-fitted as one small system per group
    model, _ = _conv(group=8, size=9, seed=3)
    rng = np.random.default_rng(4)
    base = rng.standard_normal((32, 2, 8, 1, 1)).astype(np.float32)
    x = (base + 0.3 * rng.standard_normal((32, 2, 8, 9, 9))).astype(
        np.float32
    )  # spatially smooth inputs
    np.savez(tmp_path / "c.npz", x=x)  # the model's batch is fixed at 2: 32 samples of [2, 8, 9, 9]
    out, rep = onnxshrink.compress(
        model, ["prune-kernel:ratio=0.5,floor=0"], data=tmp_path / "c.npz", holdout=0
    )
    rec = rep.passes[0]
    assert rec.status == "applied"
    assert not any("re-fitted" in s.reason for s in rec.skipped)
    (fit,) = rec.details["refit"]
    assert fit["applied"] and fit["heldout_error_after"] < 0.5 * fit["heldout_error_before"], fit
    no_refit, _ = onnxshrink.compress(
        model, ["prune-kernel:ratio=0.5,refit=false,floor=0"], data=tmp_path / "c.npz", holdout=0
    )
    ref = ort_run(model, {"x": x[0]})[0]
    err = lambda m: np.linalg.norm(ort_run(m, {"x": x[0]})[0] - ref)  # noqa: E731
    assert err(out) < err(no_refit)

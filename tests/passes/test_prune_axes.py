"""prune through ops that move, window or read the channel axis (analysis/channel_axes.py).

As in test_prune_channels.py: channels 2 and 10 of a 16-channel conv are dead (zero filters),
their consumers' columns quiet, so ``criterion=l1`` removes exactly them and the pruned model
must agree with the original to 1e-5; each test also checks the rewritten shapes or bounds.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.helpers import make_model, rand
from tests.passes.test_prune_channels import OPSET, _dead, _frozen, _prune, _quiet

DEAD = [2, 10]


def _inits(rng, w2_shape: tuple[int, ...], quiet: list[int], axis: int = 1, **more) -> dict:
    w2 = _quiet(rand(rng, *w2_shape), quiet, axis) if quiet else rand(rng, *w2_shape)
    return {"W1": _dead(rand(rng, 16, 3, 3, 3), DEAD), "W2": w2, **more}


def _ints(out, name_part: str) -> list[int]:
    from onnx import numpy_helper

    (init,) = [i for i in out.graph.initializer if name_part in i.name]
    return numpy_helper.to_array(init).reshape(-1).tolist()


def _dims(out) -> list[list[int]]:
    return sorted(list(i.dims) for i in out.graph.initializer if len(i.dims) >= 2)


_INT64_MAX = np.iinfo(np.int64).max  # "to the end", as exporters write it


@pytest.mark.parametrize(
    "axis, start, end, read, quiet, bounds",
    [
        (1, 4, _INT64_MAX, 12, [6], ([3], [14])),  # channels 4.. of 16: channel 2 was before
        (-2, 1, 4, 16, DEAD, None),  # rows 1-3: the channels pass as they are
    ],
)
def test_slice_takes_a_window_of_the_channels_or_passes_them(axis, start, end, read, quiet, bounds):
    rng = np.random.default_rng(40)
    text = (
        OPSET
        + f"""
    g (float[1, 3, 6, 6] x, float[16, 3, 3, 3] W1, float[4, {read}, 1, 1] W2, int64[1] s,
       int64[1] e, int64[1] a) => (float[1, 4, {6 if axis == 1 else 3}, 6] y) {{
        h = Conv <pads = [1, 1, 1, 1]> (x, W1)
        r = Relu (h)
        t = Slice (r, s, e, a)
        y = Conv (t, W2)
    }}"""
    )
    cut = {"s": np.array([start]), "e": np.array([end]), "a": np.array([axis])}
    inits = _inits(rng, (4, read, 1, 1), quiet, **cut)
    out, _ = _prune(make_model(text, inits), {"x": rand(rng, 1, 3, 6, 6)}, ratio=0.125)
    assert _dims(out) == [[4, read - 1 if bounds else read - 2, 1, 1], [14, 3, 3, 3]]
    if bounds:
        assert (_ints(out, "starts"), _ints(out, "ends")) == bounds


@pytest.mark.parametrize(
    "moves",
    [
        "u = Transpose <perm = [0, 2, 3, 1]> (r)\n        t = Transpose <perm = [0, 3, 1, 2]> (u)",
        "u = Unsqueeze (r, zero)\n        t = Squeeze (u, zero)",
        "u = Softmax <axis = 3> (r)\n        t = Identity (u)",
    ],
)
def test_transpose_squeeze_and_softmax_over_other_axes_follow_the_channel_axis(moves):
    rng = np.random.default_rng(42)
    text = (
        OPSET
        + f"""
    g (float[1, 3, 6, 6] x, float[16, 3, 3, 3] W1, float[4, 16, 1, 1] W2, int64[1] zero)
      => (float[1, 4, 6, 6] y) {{
        h = Conv <pads = [1, 1, 1, 1]> (x, W1)
        r = Relu (h)
        {moves}
        y = Conv (t, W2)
    }}"""
    )
    inits = _inits(rng, (4, 16, 1, 1), [], zero=np.array([0]))
    inits["W2"] = _dead(inits["W2"], DEAD, axis=1)  # a softmax of zeros is not zero: no reads
    out, _ = _prune(make_model(text, inits), {"x": rand(rng, 1, 3, 6, 6)}, ratio=0.125)
    assert _dims(out) == [[4, 14, 1, 1], [14, 3, 3, 3]]


def test_reduce_without_keepdims_moves_the_channel_axis_and_over_channels_freezes():
    rng = np.random.default_rng(43)
    text = (
        OPSET
        + """
    g (float[2, 3, 6, 6] x, float[16, 3, 3, 3] W1, float[16, 5] W2) => (float[2, 5] y) {
        h = Conv <pads = [1, 1, 1, 1]> (x, W1)
        r = Relu (h)
        t = ReduceMax <axes = [2, 3], keepdims = 0> (r)
        y = MatMul (t, W2)
    }"""
    )
    inits = _inits(rng, (16, 5), DEAD, axis=0)
    out, _ = _prune(make_model(text, inits), {"x": rand(rng, 2, 3, 6, 6)}, ratio=0.125)
    assert _dims(out) == [[14, 3, 3, 3], [14, 5]]
    over_channels = (
        OPSET
        + """
    g (float[2, 3, 6, 6] x, float[16, 3, 3, 3] W1, float[4, 1, 1, 1] W2) => (float[2, 4, 6, 6] y) {
        h = Conv <pads = [1, 1, 1, 1]> (x, W1)
        r = Relu (h)
        t = ReduceMax <axes = [1]> (r)
        y = Conv (t, W2)
    }"""
    )
    _frozen(over_channels, _inits(rng, (4, 1, 1, 1), []), "reduces over the channel axis")


@pytest.mark.parametrize("shape", [[1, 16, 36], [1, -1, 36], [0, 0, 36]])
def test_reshape_that_keeps_the_channel_axis_rewrites_its_count(shape):
    rng = np.random.default_rng(44)
    text = (
        OPSET
        + """
    g (float[1, 3, 6, 6] x, float[16, 3, 3, 3] W1, float[4, 16, 1] W2, int64[3] shape)
      => (float[1, 4, 36] y) {
        h = Conv <pads = [1, 1, 1, 1]> (x, W1)
        r = Relu (h)
        t = Reshape (r, shape)
        y = Conv (t, W2)
    }"""
    )
    inits = _inits(rng, (4, 16, 1), DEAD, shape=np.array(shape, np.int64))
    out, _ = _prune(make_model(text, inits), {"x": rand(rng, 1, 3, 6, 6)}, ratio=0.125)
    assert _dims(out) == [[4, 14, 1], [14, 3, 3, 3]]
    if shape[1] == 16:
        assert _ints(out, "pruned.shape") == [1, 14, 36]


@pytest.mark.parametrize("width", [-1, 144])
def test_flatten_built_from_shape_at_run_time(width):
    """Paddle's and torch's ``x.view(x.size(0), -1)``: Shape → Gather → Concat → Reshape; a
    channel count written in the Concat (144 = 16·3·3) is rewritten there."""
    rng = np.random.default_rng(45)
    text = (
        OPSET
        + """
    g (float[N, 3, 6, 6] x, float[16, 3, 3, 3] W1, float[144, 5] W2, int64[1] rest)
      => (float[N, 5] y) {
        h = Conv <pads = [1, 1, 1, 1], strides = [2, 2]> (x, W1)
        r = Relu (h)
        s = Shape (r)
        n = Slice (s, zero, one)
        shape = Concat <axis = 0> (n, rest)
        t = Reshape (r, shape)
        y = MatMul (t, W2)
    }"""
    ).replace("int64[1] rest)", "int64[1] rest, int64[1] zero, int64[1] one)")
    w2 = _quiet(rand(rng, 144, 5), [c * 9 + k for c in DEAD for k in range(9)], 0)
    inits = {
        "W1": _dead(rand(rng, 16, 3, 3, 3), DEAD),
        "W2": w2,
        "rest": np.array([width], np.int64),
        "zero": np.array([0], np.int64),
        "one": np.array([1], np.int64),
    }
    out, _ = _prune(make_model(text, inits), {"x": rand(rng, 3, 3, 6, 6)}, ratio=0.125)
    assert _dims(out) == [[14, 3, 3, 3], [126, 5]]
    if width > 0:
        assert _ints(out, "pruned.shape") == [126]


def test_shape_that_reads_the_channel_count_freezes():
    rng = np.random.default_rng(46)
    text = (
        OPSET
        + """
    g (float[1, 3, 6, 6] x, float[16, 3, 3, 3] W1, float[4, 16, 1, 1] W2, int64[1] at)
      => (float[1, 4, 6, 6] y, int64[1] k) {
        h = Conv <pads = [1, 1, 1, 1]> (x, W1)
        r = Relu (h)
        y = Conv (r, W2)
        s = Shape (r)
        k = Gather (s, at)
    }"""
    )
    inits = _inits(rng, (4, 16, 1, 1), DEAD, at=np.array([1], np.int64))
    _frozen(text, inits, "reads the channel count")
    inits["at"] = np.array([-1], np.int64)  # the width: pruning goes on
    out, _ = _prune(make_model(text, inits), {"x": rand(rng, 1, 3, 6, 6)}, ratio=0.125)
    assert _dims(out) == [[4, 14, 1, 1], [14, 3, 3, 3]]


def test_a_csp_block_splits_the_group_it_adds_half_of():
    """YOLOv8's C2f: a conv's output is Split in two and a bottleneck's output is added to the
    second half. The halves become groups of their own, the second coupled to the bottleneck."""
    rng = np.random.default_rng(47)
    text = (
        OPSET
        + """
    g (float[1, 3, 6, 6] x, float[16, 3, 1, 1] W1, int64[2] halves, float[8, 8, 3, 3] W2,
       float[8, 8, 3, 3] W3, float[4, 24, 1, 1] W4) => (float[1, 4, 6, 6] y) {
        h = Conv (x, W1)
        r = Relu (h)
        a, b = Split <axis = 1> (r, halves)
        m1 = Conv <pads = [1, 1, 1, 1]> (b, W2)
        m2 = Relu (m1)
        m = Conv <pads = [1, 1, 1, 1]> (m2, W3)
        s = Add (b, m)
        c = Concat <axis = 1> (a, b, s)
        y = Conv (c, W4)
    }"""
    )
    inits = {
        "W1": _dead(rand(rng, 16, 3, 1, 1), DEAD),  # channel 2 of each half
        "halves": np.array([8, 8], np.int64),
        "W2": _quiet(_dead(rand(rng, 8, 8, 3, 3), [5]), [2], 1),
        "W3": _quiet(_dead(rand(rng, 8, 8, 3, 3), [2]), [5], 1),
        "W4": _quiet(rand(rng, 4, 24, 1, 1), [2, 10, 18], 1),
    }
    out, p = _prune(make_model(text, inits), {"x": rand(rng, 1, 3, 6, 6)}, ratio=0.125)
    assert _dims(out) == [[4, 21, 1, 1], [7, 7, 3, 3], [7, 7, 3, 3], [14, 3, 1, 1]]
    assert _ints(out, "pruned.split") == [7, 7]
    assert len(p.details["groups"]) == 3  # first half; second half + bottleneck; its inside

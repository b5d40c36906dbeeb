"""Marks between passes: composed, read by the pass after, and only the lasting ones saved."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir

import onnxshrink
from onnxshrink import marks


def test_kept_channels_compose_over_repeated_pruning():
    node = ir.node("Conv", [])
    assert marks.kept_channels(node) is None
    marks.keep_channels(node, np.array([0, 2, 3, 5]))  # 6 -> 4 channels
    marks.keep_channels(node, np.array([1, 3]))  # 4 -> 2: channels 2 and 5 of the original
    assert marks.kept_channels(node).tolist() == [2, 5]


def test_channel_scales_compose_and_follow_pruning():
    node = ir.node("Conv", [])
    assert marks.channel_scale(node) is None
    marks.scale_channels(node, np.array([1.0, 2.0, 4.0, 0.5]))
    marks.scale_channels(node, np.array([3.0, 1.0, 0.25, 2.0]))  # a second rescaling
    assert marks.channel_scale(node).tolist() == [3.0, 2.0, 1.0, 1.0]
    marks.keep_channels(node, np.array([1, 3]))  # pruned afterwards: the kept channels' factors
    assert marks.channel_scale(node).tolist() == [2.0, 1.0]
    assert marks.kept_channels(node).tolist() == [1, 3]


def test_the_scaled_channels_are_nchws_for_a_convolution_the_last_axis_otherwise():
    assert marks.channel_axis(ir.node("Conv", [])) == 1
    assert marks.channel_axis(ir.node("ConvTranspose", [])) == 1
    for op in ("Gemm", "MatMul", "LayerNormalization"):
        assert marks.channel_axis(ir.node(op, [])) == -1


def test_run_only_marks_do_not_reach_the_file_lasting_ones_do(tmp_path, digits_model, digits_calib):
    out = tmp_path / "p.onnx"
    _, report = onnxshrink.compress(
        digits_model, ["prune:ratio=0.3", "lowrank:fused=false,rank=0.5,min-size=8,floor=0"],
        data=digits_calib, output=out,
    )  # fmt: skip
    assert [p.status for p in report.passes] == ["applied", "applied"]
    keys = [p.key for n in onnx.load(out).graph.node for p in n.metadata_props]
    assert marks.KEPT_CHANNELS not in keys  # prune -> distill, this run only
    assert keys.count(marks.LOWRANK_FACTOR) >= 2  # never factorised again, in a later run too

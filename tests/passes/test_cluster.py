"""cluster: k-means codebooks decoded by Gather; storage shrinks, outputs stay close."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import onnxshrink
from onnxshrink.passes.cluster_weights import ClusterWeightsPass, kmeans_1d
from tests.helpers import apply, if_model, make_model, op_count, ort_run, rand


def test_kmeans_exact_when_few_values():
    v = np.array([3.0, 1.0, 1.0, 2.0, 3.0, 2.0])
    c, i = kmeans_1d(v, 4)
    np.testing.assert_array_equal(c[i], v)


def test_kmeans_reduces_error_with_more_centroids():
    v = np.random.default_rng(0).standard_normal(20_000)
    errs = []
    for k in (4, 16, 256):
        c, i = kmeans_1d(v, k)
        errs.append(np.mean((c[i] - v) ** 2))
        assert len(c) <= k
    assert errs[0] > errs[1] > errs[2]
    step = (v.max() - v.min()) / 255  # a uniform 256-level quantizer over the same range
    assert errs[2] < step**2 / 12


@pytest.mark.parametrize("per_channel", [True, False])
def test_cluster_conv_and_gemm(per_channel):
    rng = np.random.default_rng(1)
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2, 16, 6, 6] x, float[32, 16, 3, 3] W, float[32] b, float[10, 32] G) => (float[2,
        10] y) {
        h = Conv <pads = [1, 1, 1, 1]> (x, W, b)
        r = Relu (h)
        p = GlobalAveragePool (r)
        f = Flatten (p)
        y = Gemm <transB = 1> (f, G)
    }"""
    w = rand(rng, 32, 16, 3, 3) * np.logspace(-2, 0, 32, dtype=np.float32).reshape(-1, 1, 1, 1)
    model = make_model(text, {"W": w, "b": rand(rng, 32), "G": rand(rng, 10, 32)})
    p = ClusterWeightsPass(min_size=64, per_channel=per_channel)
    out, modified = apply(p, model)
    assert modified and op_count(out, "Gather") == 2
    init = {i.name: i for i in out.graph.initializer}
    assert any(
        i.data_type == onnx.TensorProto.UINT8 and list(i.dims) == [32, 16, 3, 3]
        for i in init.values()
    )
    x = rand(rng, 2, 16, 6, 6)
    ref, got = ort_run(model, {"x": x})[0], ort_run(out, {"x": x})[0]
    assert np.abs(got - ref).max() < 0.05 * np.abs(ref).max()
    # one byte per weight + at most 256 float centroids per tensor (+ one float scale per channel)
    assert p.details["weight_bytes"]["before"] == (4608 + 320) * 4
    assert (
        p.details["weight_bytes"]["after"] <= 4608 + 320 + 2 * 256 * 4 + (32 + 10) * 4 * per_channel
    )


def test_bits_option_validated():
    from onnxshrink.errors import OptionError

    with pytest.raises(OptionError, match="bits"):
        ClusterWeightsPass(bits=9)


@pytest.mark.slow
def test_mobilenet_cluster_file_size(mobilenet, photos, tmp_path):
    out, rep = onnxshrink.compress(
        str(mobilenet["folded"]),
        ["cluster"],
        data=str(photos["calib"]),
        output=tmp_path / "clustered.onnx",
    )
    assert rep.passes[0].status == "applied", rep.passes[0].reason
    assert rep.after["bytes"] <= 0.30 * rep.before["bytes"]  # measured 0.269


def test_min_fidelity_keeps_the_most_damaging_layers(digits_model, digits_calib):
    model = onnx.load(str(digits_model))
    out, rep = onnxshrink.compress(
        model,
        ["fold-batchnorm", "cluster:bits=4,min-fidelity=0.9999,floor=0"],
        data=str(digits_calib),
    )
    c = rep.passes[1]
    assert c.status == "applied", c.reason
    kept = c.details["min_fidelity"]["kept_float"]
    assert kept and all(
        any(s.node == k and "min-fidelity" in s.reason for s in c.skipped) for k in kept
    )
    assert c.details["fidelity_all_clustered"] < 0.9999
    # the target is met, and the file holds what the details say: the kept layers read float
    # weights, every other clustered layer a decoded codebook
    assert c.details["min_fidelity"]["fidelity"] >= 0.9999
    # (weights under min-size=1024 elements are never clustered)
    sizes = {i.name: int(np.prod(i.dims)) for i in out.graph.initializer}
    weighted = [n for n in out.graph.node if n.op_type in ("Conv", "Gemm") and len(n.input) > 1]
    small = {n.name for n in weighted if sizes.get(n.input[1], 1 << 30) < 1024}
    float_w = {n.name for n in weighted if n.input[1] in sizes} - small
    assert float_w == set(kept)
    assert len(c.changed) == len(weighted) - len(small) - len(kept)


def test_weights_inside_if_branches_are_clustered(tmp_path):
    """silero-vad keeps all its compute inside If branches (weights in Constant nodes): both
    branches' weights become codebooks, and either branch still computes what it did."""
    model, x = if_model()
    np.savez(tmp_path / "d.npz", x=x, c=np.ones(len(x), bool))
    out, report = onnxshrink.compress(model, ["cluster"], data=str(tmp_path / "d.npz"))
    rec = report.passes[0]
    assert rec.status == "applied", rec.reason
    assert rec.details["in_subgraphs"] == 2
    assert sorted(c.split(":")[0] for c in rec.changed) == ["a_mm", "b_mm"]
    for cond in (True, False):  # the branch the data never took too
        feed = {"x": x[0], "c": np.array(cond)}
        ref, got = ort_run(model, feed)[0], ort_run(out, feed)[0]
        assert 0 < np.abs(got - ref).max() < 0.05 * np.abs(ref).max()

"""Unusual but valid inputs through the CLI: custom ops, subgraphs, dynamic dims, old and new
opsets, fp16 weights, Constant-node weights; determinism; memory that does not grow with the
number of calibration samples.

Every case asserts the exit code, that the input file is unchanged, and either one clear error
line or a valid output that onnxruntime runs (where it can) with the original's output names.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.helpers import ort_run
from tests.test_cli import run_cli


def _conv_bn_relu(rng, c_in, c_out, x, prefix, dtype=np.float32):
    w = (rng.standard_normal((c_out, c_in, 3, 3)) * np.sqrt(2 / (9 * c_in))).astype(dtype)
    inits = [
        numpy_helper.from_array(w, f"{prefix}W"),
        numpy_helper.from_array((1 + 0.1 * rng.standard_normal(c_out)).astype(dtype), f"{prefix}g"),
        numpy_helper.from_array((0.1 * rng.standard_normal(c_out)).astype(dtype), f"{prefix}b"),
        numpy_helper.from_array((0.1 * rng.standard_normal(c_out)).astype(dtype), f"{prefix}m"),
        numpy_helper.from_array((0.5 + rng.random(c_out)).astype(dtype), f"{prefix}v"),
    ]
    nodes = [
        helper.make_node(
            "Conv", [x, f"{prefix}W"], [f"{prefix}c"], pads=[1, 1, 1, 1], name=f"{prefix}conv"
        ),
        helper.make_node(
            "BatchNormalization",
            [f"{prefix}c", f"{prefix}g", f"{prefix}b", f"{prefix}m", f"{prefix}v"],
            [f"{prefix}n"],
            name=f"{prefix}bn",
        ),
        helper.make_node("Relu", [f"{prefix}n"], [f"{prefix}r"], name=f"{prefix}relu"),
    ]
    return nodes, inits, f"{prefix}r"


def _cnn(
    opset=17,
    dims=("N", 3, 16, 16),
    dtype=TensorProto.FLOAT,
    np_dtype=np.float32,
    middle=None,
    ir_version=None,
):
    """Conv-BN-ReLU ×2 -> GlobalAveragePool -> Flatten -> Gemm; ``middle(x) -> (nodes, out)`` is
    spliced between the two conv blocks."""
    rng = np.random.default_rng(0)
    n1, i1, x = _conv_bn_relu(rng, 3, 16, "input", "a", np_dtype)
    extra_nodes, extra_inits = [], []
    if middle is not None:
        extra_nodes, x, extra_inits = middle(x)
    n2, i2, x = _conv_bn_relu(rng, 16, 16, x, "b", np_dtype)
    head = [
        helper.make_node("GlobalAveragePool", [x], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fcW", "fcB"], ["logits"], transB=1, name="fc"),
    ]
    inits = (
        i1
        + i2
        + extra_inits
        + [
            numpy_helper.from_array((rng.standard_normal((10, 16)) * 0.25).astype(np_dtype), "fcW"),
            numpy_helper.from_array(np.zeros(10, np_dtype), "fcB"),
        ]
    )
    graph = helper.make_graph(
        n1 + extra_nodes + n2 + head,
        "cnn",
        [helper.make_tensor_value_info("input", dtype, list(dims))],
        [helper.make_tensor_value_info("logits", dtype, [dims[0], 10])],
        inits,
    )
    opsets = [helper.make_opsetid("", opset)]
    if middle is not None and any(n.domain == "com.example" for n in extra_nodes):
        opsets.append(helper.make_opsetid("com.example", 1))
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = ir_version or {11: 6, 13: 7, 17: 8, 21: 10}[opset]
    return model


def _save(tmp_path: Path, model: onnx.ModelProto, name="model.onnx") -> Path:
    p = tmp_path / name
    onnx.save(model, p)
    return p


def _data(tmp_path: Path, shape=(24, 3, 16, 16), dtype=np.float32) -> Path:
    p = tmp_path / "calib.npz"
    np.savez(p, input=np.random.default_rng(1).standard_normal(shape).astype(dtype))
    return p


def _compress(tmp_path, model_path, *args, data=None):
    before = model_path.read_bytes()
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    cmd = ["compress", str(model_path), "-o", str(out), "--report", str(report), *args]
    if data is not None:
        cmd += ["--data", str(data)]
    proc = run_cli(*cmd)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert model_path.read_bytes() == before
    rep = json.loads(report.read_text()) if report.exists() else None
    return proc, out, rep


def _status(rep, name):
    return [p["status"] for p in rep["passes"] if p["name"] == name]


def test_custom_domain_op_exact_passes_still_apply(tmp_path):
    def swish(x):
        return (
            [helper.make_node("Swish", [x], ["sw"], domain="com.example", name="custom_swish")],
            "sw",
            [],
        )

    path = _save(tmp_path, _cnn(middle=swish))
    proc, out, rep = _compress(
        tmp_path, path, "-p", "fold-batchnorm", "-p", "prune:ratio=0.5", "-p", "quantize"
    )
    assert proc.returncode == 0, proc.stderr
    assert _status(rep, "fold-batchnorm") == ["applied"]
    assert _status(rep, "prune")[0] in ("rolled-back", "unchanged")
    assert _status(rep, "quantize") == ["rolled-back"]
    assert any("custom op com.example.Swish" in w for w in rep["warnings"])
    saved = onnx.load(out)
    onnx.checker.check_model(saved)
    assert not any(n.op_type == "BatchNormalization" for n in saved.graph.node)
    assert any(n.domain == "com.example" for n in saved.graph.node)  # the custom op is kept as is


def test_broken_model_without_custom_ops_is_still_an_error(tmp_path):
    model = _cnn()
    model.graph.node[0].attribute.append(
        helper.make_attribute("group", 5)
    )  # 3 input channels / 5 groups
    path = _save(tmp_path, model)
    proc, out, _ = _compress(tmp_path, path)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith("error: ")
    assert not out.exists()


def _if_middle(x):
    """y = If(mean(x) > 0) then Relu(x) else Neg(x) -- subgraphs reading an outer tensor."""
    then_g = helper.make_graph(
        [helper.make_node("Relu", [x], ["t_out"])],
        "then",
        [],
        [helper.make_tensor_value_info("t_out", TensorProto.FLOAT, None)],
    )
    else_g = helper.make_graph(
        [helper.make_node("Neg", [x], ["e_out"])],
        "else",
        [],
        [helper.make_tensor_value_info("e_out", TensorProto.FLOAT, None)],
    )
    nodes = [
        helper.make_node("ReduceMean", [x], ["mean"], keepdims=0, name="mean"),
        helper.make_node("Greater", ["mean", "zero"], ["cond"], name="greater"),
        helper.make_node(
            "If", ["cond"], ["branch"], then_branch=then_g, else_branch=else_g, name="if"
        ),
    ]
    return nodes, "branch", [numpy_helper.from_array(np.array(0, np.float32), "zero")]


def _loop_middle(x):
    """y = x scaled by 0.5 three times in a Loop."""
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("Mul", ["acc_in", "half"], ["acc_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("acc_in", TensorProto.FLOAT, None),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, None),
        ],
    )
    nodes = [helper.make_node("Loop", ["trips", "", x], ["looped"], body=body, name="loop")]
    return (
        nodes,
        "looped",
        [
            numpy_helper.from_array(np.array(3, np.int64), "trips"),
            numpy_helper.from_array(np.array(0.5, np.float32), "half"),
        ],
    )


@pytest.mark.parametrize("middle", [_if_middle, _loop_middle], ids=["If", "Loop"])
def test_subgraphs_are_left_intact_and_the_rest_compresses(tmp_path, middle):
    model = _cnn(middle=middle)
    path = _save(tmp_path, model)
    data = _data(tmp_path)
    proc, out, rep = _compress(
        tmp_path,
        path,
        "-p",
        "simplify",
        "-p",
        "fold-batchnorm",
        "-p",
        "prune:ratio=0.25",
        "-p",
        "quantize",
        data=data,
    )
    assert proc.returncode == 0, proc.stderr
    assert _status(rep, "fold-batchnorm") == ["applied"]
    saved = onnx.load(out)
    onnx.checker.check_model(saved, full_check=True)
    x = np.load(data)["input"][:4]
    ref, got = ort_run(model, {"input": x})[0], ort_run(saved, {"input": x})[0]
    assert got.shape == ref.shape
    assert rep["fidelity"]["cosine"] >= 0.9


def test_dynamic_batch_and_spatial_dims(tmp_path):
    model = _cnn(dims=("N", 3, "H", "W"))
    path = _save(tmp_path, model)
    data = _data(tmp_path, (16, 3, 20, 24))
    proc, out, rep = _compress(
        tmp_path,
        path,
        "-p",
        "fold-batchnorm",
        "-p",
        "prune:ratio=0.25",
        "-p",
        "quantize",
        data=data,
    )
    assert proc.returncode == 0, proc.stderr
    saved = onnx.load(out)
    dims = saved.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["N", 3, "H", "W"]  # still dynamic
    for shape in ((1, 3, 16, 16), (3, 3, 33, 17)):  # runs at sizes never calibrated
        x = np.random.default_rng(2).standard_normal(shape).astype(np.float32)
        assert ort_run(saved, {"input": x})[0].shape == (shape[0], 10)
    # random data cannot know H and W: one clear line
    proc, _, _ = _compress(tmp_path, path, "-p", "fold-batchnorm", data="random:8")
    assert (
        proc.returncode == 2
        and "dynamic" in proc.stderr
        and len(proc.stderr.strip().splitlines()) == 1
    )


@pytest.mark.parametrize("opset", [11, 21])
def test_old_and_new_opsets(tmp_path, opset):
    model = _cnn(opset=opset)
    onnx.checker.check_model(model, full_check=True)
    path = _save(tmp_path, model)
    data = _data(tmp_path)
    proc, out, rep = _compress(
        tmp_path,
        path,
        "-p",
        "simplify",
        "-p",
        "fold-batchnorm",
        "-p",
        "prune:ratio=0.25",
        "-p",
        "quantize",
        data=data,
    )
    assert proc.returncode == 0, proc.stderr
    assert _status(rep, "fold-batchnorm") == ["applied"]
    saved = onnx.load(out)
    onnx.checker.check_model(saved, full_check=True)
    if _status(rep, "quantize") == ["rolled-back"]:  # must say why
        assert next(p for p in rep["passes"] if p["name"] == "quantize")["reason"]
    x = np.load(data)["input"][:4]
    assert ort_run(saved, {"input": x})[0].shape == (4, 10)


def test_fp16_model(tmp_path):
    model = _cnn(dtype=TensorProto.FLOAT16, np_dtype=np.float16)
    path = _save(tmp_path, model)
    data = _data(tmp_path, dtype=np.float16)
    proc, out, rep = _compress(
        tmp_path, path, "-p", "fold-batchnorm", "-p", "prune:ratio=0.5", "-p", "quantize", data=data
    )
    assert proc.returncode == 0, proc.stderr
    assert _status(rep, "fold-batchnorm") == ["applied"]
    assert _status(rep, "prune") == ["applied"]
    quantize = next(p for p in rep["passes"] if p["name"] == "quantize")
    assert quantize["status"] == "unchanged" and "float16 model" in quantize["skipped"][0]["reason"]
    saved = onnx.load(out)
    assert all(
        i.data_type
        in (
            TensorProto.FLOAT16,
            TensorProto.INT64,
            TensorProto.INT8,
            TensorProto.UINT8,
            TensorProto.INT32,
        )
        for i in saved.graph.initializer
    )
    x = np.load(data)["input"][:4]
    ref, got = ort_run(model, {"input": x})[0], ort_run(saved, {"input": x})[0]
    assert got.dtype == np.float16 and got.shape == ref.shape


def test_constant_node_weights_through_the_cli(tmp_path):
    model = _cnn()
    for init in list(model.graph.initializer):  # every weight as a Constant node, as Paddle exports
        model.graph.node.insert(
            0, helper.make_node("Constant", [], [init.name], value=init, name=f"const_{init.name}")
        )
    del model.graph.initializer[:]
    path = _save(tmp_path, model)
    data = _data(tmp_path)
    proc, out, rep = _compress(
        tmp_path, path, "-p", "fold-batchnorm", "-p", "prune:ratio=0.5", data=data
    )
    assert proc.returncode == 0, proc.stderr
    assert _status(rep, "fold-batchnorm") == ["applied"] and _status(rep, "prune") == ["applied"]
    assert any("Constant-node weights" in n for n in rep["notes"])


@pytest.mark.slow
def test_output_is_byte_identical_across_runs(tmp_path, digits_model, digits_calib):
    outs = []
    for i in range(2):
        out = tmp_path / f"run{i}.onnx"
        proc = run_cli(
            "compress",
            str(digits_model),
            "-o",
            str(out),
            "--data",
            str(digits_calib),
            "-p",
            "fold-batchnorm",
            "-p",
            "prune:ratio=0.3",
            "-p",
            "tucker:rank=0.5",
            "-p",
            "quantize:min-fidelity=0.999",
            "-p",
            "cluster:bits=6",
        )
        assert proc.returncode == 0, proc.stderr
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]


_RSS_SCRIPT = """
import sys, numpy as np, onnxshrink
n = int(sys.argv[1])
x = np.random.default_rng(0).uniform(-0.5, 0.5, (n, 1, 32, 32)).astype(np.float32)
spec = f"quantize:samples={n},calibration=entropy"
onnxshrink.compress(sys.argv[2], ["fold-batchnorm", spec], data=x, output=sys.argv[3],
                    progress=False)
# VmHWM, not ru_maxrss: a child inherits its parent's ru_maxrss across exec
print(int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) // 1024)
"""


@pytest.mark.slow
def test_calibration_memory_grows_by_the_live_tensors_only(tmp_path, digits_model):
    """Calibration sweeps the model one segment at a time over all samples (onnxshrink.sweep),
    so each extra sample costs its widest live set -- at a stop inside a residual block, the
    block's input, the stop's tensor and the next tensor being computed: 3 of the largest
    activation -- and nothing more (no per-layer activations kept)."""
    inferred = onnx.shape_inference.infer_shapes(onnx.load(digits_model))
    largest = max(
        4 * np.prod([d.dim_value for d in vi.type.tensor_type.shape.dim[1:]])
        for vi in inferred.graph.value_info
    )
    peaks = {}
    for n in (100, 1000):
        proc = subprocess.run(
            [
                sys.executable,
                "-c",
                _RSS_SCRIPT,
                str(n),
                str(digits_model),
                str(tmp_path / f"{n}.onnx"),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        peaks[n] = int(proc.stdout.strip().splitlines()[-1])
    # digits: largest activation 64 KB per sample, so 900 more samples may cost 169 MB; all
    # activations kept (1 MB per sample across the net) would cost 900 MB
    assert peaks[1000] - peaks[100] < 900 * 3 * largest / 2**20, (peaks, largest)

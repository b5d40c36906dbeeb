"""Test helpers: tiny models from ONNX text with seeded weights, onnxruntime reference runs."""

from __future__ import annotations

import os

import numpy as np
import onnx
import onnx.parser
import onnx_ir as ir

from onnxshrink.passes.base import ShrinkPass


def make_model(
    text: str, inits: dict[str, np.ndarray] | None = None, check: bool = True
) -> onnx.ModelProto:
    """Parses ``text``; every name in ``inits`` declared as a graph input becomes an initializer."""
    model = onnx.parser.parse_model(text)
    inits = inits or {}
    graph = model.graph
    keep = [i for i in graph.input if i.name not in inits]
    del graph.input[:]
    graph.input.extend(keep)
    for name, arr in inits.items():
        graph.initializer.append(onnx.numpy_helper.from_array(np.asarray(arr), name))
    if check:
        onnx.checker.check_model(model, full_check=True)
    return model


def rand(rng: np.random.Generator, *shape: int, scale: float = 1.0) -> np.ndarray:
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def ort_run(
    model: onnx.ModelProto | str, feeds: dict[str, np.ndarray], *, optimize: bool = False
) -> list[np.ndarray]:
    """The model's outputs in onnxruntime, as written (optimizations off) or in an optimized
    session -- integer kernels; with ``ONNXSHRINK_TEST_CPU=Haswell`` those run on an emulated
    CPU without VNNI (:mod:`tests.emulated_cpu`), whatever this machine has."""
    import onnxruntime as ort

    if optimize and (cpu := os.environ.get("ONNXSHRINK_TEST_CPU")):
        from tests import emulated_cpu

        return emulated_cpu.run(model, feeds, cpu=cpu)

    opts = ort.SessionOptions()
    opts.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if optimize
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    data = model if isinstance(model, str) else model.SerializeToString()
    sess = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def apply(pass_: ShrinkPass, model: onnx.ModelProto) -> tuple[onnx.ModelProto, bool]:
    """Runs one pass directly (no pipeline) plus clean-up; returns the checked result."""
    from onnxshrink.pipeline import cleanup

    m = ir.from_proto(model)
    result = pass_(m)
    cleanup(result.model)
    out = ir.to_proto(result.model)
    onnx.checker.check_model(out, full_check=True)
    return out, result.modified


def op_count(model: onnx.ModelProto, op: str) -> int:
    return sum(1 for n in model.graph.node if n.op_type == op)


def if_model(width: int = 64) -> tuple[onnx.ModelProto, np.ndarray]:
    """y = If(c, x @ A, x @ B) with A, B in Constant nodes inside the branches (as silero-vad
    keeps its weights), and 8 samples of x, each [16, width]."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)

    def branch(name: str) -> onnx.GraphProto:
        w = numpy_helper.from_array(rng.normal(0, 0.1, (width, width)).astype(np.float32))
        const = helper.make_node("Constant", [], [f"{name}_w"], value=w, name=f"{name}_c")
        mm = helper.make_node("MatMul", ["x", f"{name}_w"], [f"{name}_out"], name=f"{name}_mm")
        out = helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, [None, width])
        return helper.make_graph([const, mm], name, [], [out])

    graph = helper.make_graph(
        [helper.make_node("If", ["c"], ["y"], then_branch=branch("a"), else_branch=branch("b"))],
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, width]),
            helper.make_tensor_value_info("c", TensorProto.BOOL, []),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, width])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return model, rng.normal(0, 1, (8, 16, width)).astype(np.float32)


def shared_rows(n: int, k: int, seed: int, *, level=(2.0, 6.0), noise=0.3) -> np.ndarray:
    """``n`` rows of ``k`` inputs sharing one component (a level drawn per row, plus small
    independent noise): nearest rounding's errors add up along it, so Hessian-aware rounding
    has much to win."""
    rng = np.random.default_rng(seed)
    return (rng.uniform(*level, (n, 1)) + noise * rng.standard_normal((n, k))).astype(np.float32)

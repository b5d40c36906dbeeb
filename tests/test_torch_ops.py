"""reconstruct's per-op table: every entry computes what onnxruntime computes, to 1e-5."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

torch = pytest.importorskip("torch")

from onnxshrink.reconstruct.torch_ops import OPS, Unsupported, run_node  # noqa: E402

RNG = np.random.default_rng(0)
X4 = (2, 6, 9, 9)


def _case(op, shapes, consts=None, opset=17, **attrs):
    """(op, input shapes, constant inputs by index, opset, attributes)."""
    return pytest.param(op, shapes, consts or {}, opset, attrs, id=f"{op}-{len(attrs)}-{shapes}")


def _w(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


CASES = [
    _case("Conv", [X4], {1: _w(8, 6, 3, 3), 2: _w(8)}, pads=[1, 1, 1, 1]),
    _case("Conv", [X4], {1: _w(8, 6, 3, 3)}, pads=[0, 1, 2, 1], strides=[2, 2]),
    _case(
        "Conv", [X4], {1: _w(6, 1, 3, 3), 2: _w(6)}, group=6, dilations=[2, 2], pads=[2, 2, 2, 2]
    ),
    _case("Conv", [(2, 6, 11)], {1: _w(4, 3, 3), 2: _w(4)}, group=2, strides=[2]),
    _case("Gemm", [(3, 5)], {1: _w(5, 4), 2: _w(4)}),
    _case("Gemm", [(5, 3)], {1: _w(4, 5), 2: _w(1, 4)}, transA=1, transB=1, alpha=0.5, beta=2.0),
    _case("MatMul", [(2, 3, 5)], {1: _w(5, 4)}),
    _case("Add", [X4], {1: _w(6, 1, 1)}),
    _case("Sub", [X4, X4]),
    _case("Mul", [X4], {1: _w(1, 6, 1, 1)}),
    _case("Div", [X4], {1: np.abs(_w(9)) + 0.5}),
    *(_case(op, [X4]) for op in ("Relu", "Sigmoid", "Tanh", "Erf", "HardSwish", "Identity")),
    _case("Sqrt", [X4], positive=True),
    _case("HardSigmoid", [X4], alpha=0.3, beta=0.4),
    _case("Gelu", [X4], opset=20),
    _case("Gelu", [X4], opset=20, approximate="tanh"),
    _case("Clip", [X4], {1: np.float32(0), 2: np.float32(6)}),
    _case("Clip", [X4], {1: np.float32(-0.5)}),
    _case(
        "BatchNormalization",
        [X4],
        {1: _w(6), 2: _w(6), 3: _w(6), 4: np.abs(_w(6)) + 0.1},
        epsilon=1e-3,
    ),
    _case("LayerNormalization", [(2, 5, 8)], {1: _w(8), 2: _w(8)}, epsilon=1e-6),
    _case("MaxPool", [X4], kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[2, 2]),
    _case("AveragePool", [X4], kernel_shape=[3, 3], pads=[1, 0, 1, 0], strides=[2, 1]),
    _case("AveragePool", [X4], kernel_shape=[2, 2], pads=[1, 1, 1, 1], count_include_pad=1),
    _case("GlobalAveragePool", [X4]),
    _case("GlobalMaxPool", [X4]),
    _case("ReduceMean", [X4], opset=13, axes=[2, 3], keepdims=0),
    _case("ReduceMean", [X4], {1: np.array([-1], np.int64)}, opset=18),
    _case("Flatten", [X4]),
    _case("Flatten", [X4], axis=2),
    _case("Reshape", [X4], {1: np.array([0, -1, 9], np.int64)}),
    _case("Transpose", [X4], perm=[0, 2, 3, 1]),
    _case("Concat", [X4, X4], axis=1),
    _case("Softmax", [(2, 5, 8)], opset=13, axis=1),
    _case("Softmax", [(2, 3, 4, 5)], opset=11, axis=-2),  # before 13: coerced to 2-D
    _case("Softmax", [(2, 5, 8)], opset=11),  # ... and axis 1 by default
    _case("ConvTranspose", [X4], {1: _w(6, 4, 2, 2), 2: _w(4)}, strides=[2, 2]),
    _case(
        "ConvTranspose",
        [X4],
        {1: _w(6, 2, 3, 3)},
        group=3,
        strides=[2, 2],
        pads=[1, 0, 0, 1],
        output_padding=[1, 1],
        dilations=[1, 2],
    ),  # fmt: skip
    _case("Pow", [X4], {1: np.float32(2.0)}),
    _case("Pow", [X4], {1: np.float32(0.5)}, positive=True),
    _case("Max", [X4, X4, (9,)]),
    _case("Min", [X4, (6, 1, 1)]),
    *(_case(op, [X4]) for op in ("Neg", "Abs", "Exp", "Softplus", "LeakyRelu")),
    *(_case(op, [X4], positive=True) for op in ("Log", "Reciprocal")),
    _case("LeakyRelu", [X4], alpha=0.2),
    _case("PRelu", [X4], {1: _w(6, 1, 1)}),
    _case("ReduceSum", [X4], {1: np.array([1, -1], np.int64)}, opset=13, keepdims=0),
    _case("ReduceSum", [X4], opset=13),  # no axes: all of them
    _case("ReduceMax", [X4], opset=13, axes=[1]),
    _case("ReduceMax", [X4], {1: np.array([2, 3], np.int64)}, opset=18),
    _case("Split", [X4], {1: np.array([2, 4], np.int64)}, opset=13, axis=1, outs=2),
    _case("Split", [X4], opset=13, axis=-1, outs=3),
    _case("Split", [X4], opset=18, axis=2, num_outputs=2, outs=2),  # 9 = 5 + 4
    _case("Split", [X4], opset=11, axis=1, split=[1, 5], outs=2),
    _case(
        "Slice",
        [X4],
        {
            1: np.array([1, -4], np.int64),
            2: np.array([2**62, 100], np.int64),
            3: np.array([1, 3], np.int64),
            4: np.array([2, 1], np.int64),
        },
    ),
    _case("Slice", [X4], {1: np.array([0], np.int64), 2: np.array([-1], np.int64)}),
    _case("Squeeze", [(2, 1, 9, 1)], {1: np.array([1, -1], np.int64)}, opset=13),
    _case("Squeeze", [(2, 1, 9, 1)], opset=11, axes=[3]),
    _case("Unsqueeze", [X4], {1: np.array([0, -1], np.int64)}, opset=13),
    _case("Unsqueeze", [(2, 9)], opset=11, axes=[1, 3]),
    _case(
        "Resize",
        [X4],
        {1: np.zeros(0, np.float32), 2: np.array([1, 1, 2, 1.5], np.float32)},
        opset=11,
        mode="nearest",
        coordinate_transformation_mode="asymmetric",
        nearest_mode="floor",
    ),  # fmt: skip -- the form torch and paddle export
    _case(
        "Resize",
        [X4],
        {1: np.zeros(0, np.float32), 2: np.zeros(0, np.float32), 3: np.array([2, 6, 5, 13])},
        mode="nearest",
        coordinate_transformation_mode="half_pixel",
        nearest_mode="round_prefer_ceil",
    ),  # fmt: skip
    *(
        _case(
            "Resize",
            [X4],
            {1: np.zeros(0, np.float32), 2: np.array([1, 1, 1.5, 2], np.float32)},
            mode="linear",
            coordinate_transformation_mode=coord,
        )  # fmt: skip
        for coord in ("half_pixel", "pytorch_half_pixel", "align_corners")
    ),
    _case("Pad", [X4], {1: np.array([0, 0, 1, 2, 0, 0, 3, 0], np.int64), 2: np.float32(-1)}),
    *(
        _case("Pad", [X4], {1: np.array([0, 0, 1, 2, 0, 0, 2, 1], np.int64)}, mode=mode)
        for mode in ("reflect", "edge")
    ),
    _case("Shape", [X4], out=TensorProto.INT64),
    _case("Shape", [X4], opset=15, start=1, end=-1, out=TensorProto.INT64),
    _case("Gather", [X4], {1: np.array([[2, -1]], np.int64)}, axis=1),
    _case("Gather", [X4], {1: np.int64(3)}, axis=-1),
    _case("Cast", [X4], to=TensorProto.INT64, out=TensorProto.INT64),
    _case(
        "ConstantOfShape",
        [],
        {0: np.array([2, 3], np.int64)},
        value=numpy_helper.from_array(np.array([1.5], np.float32)),
    ),
    _case("Expand", [(6, 1, 9)], {1: np.array([2, 1, 4, 1], np.int64)}),
    _case(
        "Range",
        [],
        {0: np.int64(2), 1: np.int64(11), 2: np.int64(3)},
        out=TensorProto.INT64,
    ),
    _case("Equal", [], {0: np.arange(6), 1: np.array([0, 2, 2, 3, 0, 5])}, out=TensorProto.BOOL),
    _case("Where", [X4, X4], {0: RNG.random(X4) > 0.5}),
    _case("QuantizeLinear", [X4], {1: np.float32(0.02), 2: np.uint8(128)}, out=TensorProto.UINT8),
    _case("QuantizeLinear", [X4], {1: np.float32(0.005), 2: np.int8(3)}, out=TensorProto.INT8),
    _case("QuantizeLinear", [X4], {1: np.float32(0.01)}, out=TensorProto.UINT8),  # no zero point
    _case(
        "DequantizeLinear",
        [],
        {
            0: RNG.integers(-128, 128, (6, 3, 3, 3)).astype(np.int8),
            1: np.abs(_w(6)) / 100,
            2: np.zeros(6, np.int8),
        },
        axis=0,
    ),
    _case(
        "DequantizeLinear",
        [],
        {0: RNG.integers(0, 256, X4).astype(np.uint8), 1: np.float32(0.03), 2: np.uint8(120)},
    ),
    _case(
        "DequantizeLinear",
        [],
        {
            0: RNG.integers(-9999, 9999, 6).astype(np.int32),
            1: np.abs(_w(6)) / 1e4,
            2: np.zeros(6, np.int32),
        },
        axis=0,
    ),
]


def _model(op, shapes, consts, opset, attrs, out=TensorProto.FLOAT, outs=1):
    names = [f"in{i}" for i in range(len(shapes) + len(consts))]
    inits = [numpy_helper.from_array(np.asarray(v), names[i]) for i, v in consts.items()]
    fed = [n for i, n in enumerate(names) if i not in consts]
    ys = [f"y{i}" for i in range(outs)]
    node = helper.make_node(op, names, ys, **attrs)
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in zip(fed, shapes)],
        [helper.make_tensor_value_info(y, out, None) for y in ys],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model, fed


@pytest.mark.parametrize("layout", ["nchw", "channels-last"])  # reconstruct feeds the latter
@pytest.mark.parametrize("op, shapes, consts, opset, attrs", CASES)
def test_op_matches_onnxruntime(op, shapes, consts, opset, attrs, layout):
    attrs = dict(attrs)  # the case's own is shared by both layouts
    positive = attrs.pop("positive", False)
    out, outs = attrs.pop("out", TensorProto.FLOAT), attrs.pop("outs", 1)
    model, fed = _model(op, shapes, consts, opset, attrs, out, outs)
    feed = {n: _w(*s) for n, s in zip(fed, shapes)}
    if positive:
        feed = {n: np.abs(v) + 0.01 for n, v in feed.items()}
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    want = ort.InferenceSession(model.SerializeToString(), opts).run(None, feed)
    node = next(iter(ir.from_proto(model).graph))
    args = [
        torch.from_numpy(feed[v.name])
        if v.name in feed
        else torch.from_numpy(np.array(v.const_value.numpy()))
        for v in node.inputs
    ]
    if layout == "channels-last":  # a fed image batch in the layout fit_block gives it
        fed_names = set(feed)
        args = [
            a.contiguous(memory_format=torch.channels_last)
            if v.name in fed_names and a.ndim == 4
            else a
            for v, a in zip(node.inputs, args)
        ]
    got = [t.detach().numpy() for t in run_node(node, args)]
    assert [g.shape for g in got] == [w.shape for w in want]
    for g, w in zip(got, want):
        assert g.dtype == w.dtype or op == "QuantizeLinear"  # codes as floats, by design
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("zero_point", [np.uint8(128), np.int8(3)])
def test_quantize_linear_saturates_infinities_as_onnxruntime_does(zero_point):
    """A LayerNorm's Reciprocal of a variance rounded to 0 feeds inf to the QuantizeLinear
    after it (magika's, quantized): onnxruntime saturates it, inf − inf would be NaN."""
    out = TensorProto.UINT8 if zero_point.dtype == np.uint8 else TensorProto.INT8
    x = np.array([[np.inf, -np.inf, 0.5, 2.5, -1e30, 1e30]], np.float32)
    model, _ = _model("QuantizeLinear", [x.shape], {1: np.float32(0.5), 2: zero_point}, 17, {}, out)
    want = ort.InferenceSession(model.SerializeToString()).run(None, {"in0": x})[0]
    node = next(iter(ir.from_proto(model).graph))
    args = [torch.from_numpy(x), torch.tensor(0.5), torch.from_numpy(np.array(zero_point))]
    np.testing.assert_array_equal(run_node(node, args)[0].numpy(), want.astype(np.float32))


def test_every_op_in_the_table_is_tested():
    tested = {c.values[0] for c in CASES} | {"Constant"}  # Constant: test below
    assert set(OPS) == tested


def test_constant_node():
    node = ir.node("Constant", [], {"value": ir.tensor(np.arange(3, dtype=np.int64))})
    assert run_node(node, [])[0].tolist() == [0, 1, 2]


@pytest.mark.parametrize(
    "op, attrs, why",
    [
        ("Conv", {"auto_pad": "SAME_UPPER"}, "auto_pad"),
        ("GridSample", {}, "no PyTorch form"),
        ("Resize", {"mode": "cubic"}, "Resize cubic"),
        ("MaxPool", {"kernel_shape": [2, 2], "ceil_mode": 1}, "ceil_mode"),
    ],
)
def test_unsupported_forms_raise_with_a_reason(op, attrs, why):
    args = [torch.zeros(X4)] if op == "MaxPool" else [torch.zeros(X4), torch.zeros(8, 6, 3, 3)]
    node = ir.node(op, [ir.val(f"in{i}") for i in range(len(args))], attrs)
    with pytest.raises(Unsupported, match=why):
        run_node(node, args)

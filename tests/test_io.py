"""io: load from every kind, Constant weights lifted, external data, atomic save."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from onnxshrink import atomic, io
from onnxshrink.errors import ModelError, OutputError
from tests.helpers import make_model, ort_run, rand

_CONST_MODEL = """
<ir_version: 8, opset_import: ["" : 13]>
g (float[1, 3, 4, 4] x) => (float[1, 2, 4, 4] y) {
    W = Constant <value = float[2, 3, 1, 1] {1, 2, 3, 4, 5, 6}> ()
    b = Constant <value = float[2] {0.5, -0.5}> ()
    y = Conv (x, W, b)
}"""


def test_constant_weights_become_initializers():
    loaded = io.load(make_model(_CONST_MODEL))
    assert loaded.lifted_constants == 2
    graph = loaded.model.graph
    assert [n.op_type for n in graph] == ["Conv"]
    assert set(graph.initializers) == {"W", "b"}
    out = ir.to_proto(loaded.model)
    x = rand(np.random.default_rng(0), 1, 3, 4, 4)
    np.testing.assert_allclose(
        ort_run(out, {"x": x})[0], ort_run(make_model(_CONST_MODEL), {"x": x})[0]
    )


def test_load_kinds_are_private_copies(digits_model):
    proto = onnx.load(str(digits_model))
    before = proto.SerializeToString()
    m = io.load(proto).model
    m.graph.remove(list(m.graph)[-1])
    assert proto.SerializeToString() == before

    original = ir.from_proto(proto)
    copy = io.load(original).model
    assert copy is not original and len(copy.graph) == len(original.graph)

    from_path = io.load(digits_model)
    assert from_path.kind == "path" and from_path.path == digits_model
    assert digits_model.resolve() in from_path.protected_paths


def test_load_rejects_garbage(tmp_path):
    p = tmp_path / "x.onnx"
    p.write_bytes(b"\x08\x07garbage")
    with pytest.raises(ModelError, match="not an ONNX model"):
        io.load(p)
    with pytest.raises(ModelError, match="is a folder"):
        io.load(tmp_path)


def _big_external_model(tmp_path, *, n_rows: int, cols: int = 4):
    """A model whose table lives in external data as a sparse file (fast to make, any size)."""
    text = f"""
    <ir_version: 8, opset_import: ["" : 17]>
    g (int64[N, 2] ids) => (float[N, 2, {cols}] y) {{
        y = Gather (table, ids)
    }}"""
    model = onnx.parser.parse_model(text.replace("(table, ids)", "(table, ids)"))
    t = onnx.TensorProto(name="table", data_type=onnx.TensorProto.FLOAT, dims=[n_rows, cols])
    t.data_location = onnx.TensorProto.EXTERNAL
    for k, v in (("location", "model.data"), ("offset", "0"), ("length", str(n_rows * cols * 4))):
        t.external_data.add(key=k, value=v)
    model.graph.initializer.append(t)
    path = tmp_path / "model.onnx"
    with open(tmp_path / "model.data", "wb") as f:
        f.truncate(n_rows * cols * 4)
        f.seek(0)
        f.write(np.arange(cols * 8, dtype=np.float32).tobytes())  # rows 0..7 hold data
    onnx.save(model, str(path))
    return path


def test_external_data_round_trip(tmp_path):
    path = _big_external_model(tmp_path, n_rows=1000)
    loaded = io.load(path)
    assert isinstance(loaded.model.graph.initializers["table"].const_value, ir.ExternalTensor)
    assert (tmp_path / "model.data").resolve() in loaded.protected_paths
    out = tmp_path / "out" / "copy.onnx"
    out.parent.mkdir()
    atomic.save(loaded.model, out, protect=loaded.protected_paths)
    assert len(list(out.parent.glob("copy.onnx.*.data"))) == 1  # kept external, next to the model
    ids = np.array([[0, 7]], np.int64)
    np.testing.assert_array_equal(
        ort_run(str(out), {"ids": ids})[0], ort_run(str(path), {"ids": ids})[0]
    )
    # refuses to overwrite the input's external data
    with pytest.raises(OutputError, match="overwrite"):
        atomic.save(loaded.model, tmp_path / "model.onnx", protect=loaded.protected_paths)


def test_missing_external_data(tmp_path):
    path = _big_external_model(tmp_path, n_rows=100)
    (tmp_path / "model.data").unlink()
    with pytest.raises(ModelError):
        io.load(path)


def test_atomic_save_leaves_nothing_on_failure(tmp_path, monkeypatch, digits_model):
    model = io.load(digits_model).model
    target = tmp_path / "out.onnx"
    target.write_bytes(b"previous content")

    def fail(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ir, "save", fail)
    with pytest.raises(OutputError, match="No space left"):
        atomic.save(model, target)
    assert target.read_bytes() == b"previous content"  # the old file is intact
    assert [p.name for p in tmp_path.iterdir()] == ["out.onnx"]  # no temp files left


_LOAD_PEAK = r"""
import sys
import onnx, onnx_ir
from onnxshrink import io
def peak():  # VmHWM, not ru_maxrss: a child inherits its parent's ru_maxrss across exec
    status = open("/proc/self/status").read()
    return int(status.split("VmHWM:")[1].split()[0])
before = peak()
io.load(sys.argv[1])
print(peak() - before)
"""


def test_loading_costs_about_twice_the_file(tmp_path):
    """The checker and the Python parse each hold the file's bytes and one parsed copy; run one
    after the other they peak at ~2x the file (they overlapped before: 3x)."""
    import subprocess
    import sys

    model = onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[1, 2048] x) => (float[1, 4096] y) { y = MatMul (x, W) }""")
    w = np.random.default_rng(0).standard_normal((2048, 4096)).astype(np.float32)
    model.graph.initializer.append(onnx.numpy_helper.from_array(w, "W"))
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    run = subprocess.run([sys.executable, "-c", _LOAD_PEAK, str(path)], capture_output=True)
    assert run.returncode == 0, run.stderr.decode()
    cost = int(run.stdout) * 1024 / path.stat().st_size
    assert 1.0 < cost < 2.3, cost


def test_spilled_weights_come_back_bit_for_bit(tmp_path):
    """A model waiting on disk (:func:`io.spill`) holds no in-memory tensor; read back, every
    tensor (4-bit packed ones too) has its bytes, and external ones were never touched."""
    import ml_dtypes

    arrays = {
        "f": (np.arange(6, dtype=np.float32).reshape(2, 3), None),
        "i4": (np.array([1, -2, 3, -8, 7], dtype=ml_dtypes.int4), ir.DataType.INT4),
        "u4": (np.array([1, 2, 15], dtype=ml_dtypes.uint4), ir.DataType.UINT4),
    }
    graph = ir.Graph([], [], nodes=[], name="g")
    for name, (arr, dtype) in arrays.items():
        graph.register_initializer(
            ir.Value(name=name, const_value=ir.Tensor(arr, dtype=dtype, name=name))
        )
    ext = _big_external_model(tmp_path, n_rows=8)
    table = io.load(ext).model.graph.initializers["table"]
    graph.register_initializer(ir.Value(name="table", const_value=table.const_value))
    model = ir.Model(graph, ir_version=10)
    before = {k: v.const_value.tobytes() for k, v in graph.initializers.items()}
    spilled = io.spill(model, tmp_path / "w.bin")
    assert {v.name for v, _ in spilled} == set(arrays)
    assert all(isinstance(v.const_value, ir.ExternalTensor) for v in graph.initializers.values())
    io.unspill(spilled)
    (tmp_path / "w.bin").unlink()
    assert {k: v.const_value.tobytes() for k, v in graph.initializers.items()} == before
    assert graph.initializers["table"].const_value.path.endswith("model.data")

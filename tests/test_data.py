"""--data: every accepted form, and clear refusals."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from onnxshrink.data import ImageOptions, input_specs, load_data
from onnxshrink.errors import DataError
from tests.helpers import make_model


def _specs_text(decl: str) -> str:
    return f"""
    <ir_version: 8, opset_import: ["" : 17]>
    g ({decl}) => (float[1] y) {{
        y = Constant <value = float[1] {{1}}> ()
    }}"""


def _specs(decl: str):
    return input_specs(ir.from_proto(make_model(_specs_text(decl), check=False)))


def test_npz_and_batching(tmp_path):
    specs = _specs("float[N, 3, 8, 8] x")
    p = tmp_path / "d.npz"
    np.savez(p, x=np.ones((40, 3, 8, 8), np.float64))  # float64 is cast to the model's float32
    ds = load_data(str(p), specs)
    assert ds.n_samples == 40 and ds.arrays["x"].dtype == np.float32
    batches = list(ds.batches())
    assert [b["x"].shape[0] for b in batches] == [16, 16, 8]  # dynamic batch: up to 16 per run
    assert sum(b["x"].shape[0] for b in ds.batches(limit=20)) == 20


def test_fixed_batch_runs_one_sample_at_a_time(tmp_path):
    specs = _specs("float[1, 4] x")
    p = tmp_path / "d.npy"
    np.save(p, np.zeros((5, 4), np.float32))
    ds = load_data(str(p), specs)
    assert [b["x"].shape for b in ds.batches()] == [(1, 4)] * 5


def test_samples_as_whole_inputs():
    specs = _specs("float[2, 4] x")  # a fixed batch of 2: each sample is a [2, 4] input
    ds = load_data({"x": np.zeros((3, 2, 4), np.float32)}, specs)
    assert ds.per_sample_batch and [b["x"].shape for b in ds.batches()] == [(2, 4)] * 3
    with pytest.raises(DataError, match="fixed batch of 2"):
        load_data({"x": np.zeros((3, 4), np.float32)}, specs)


def test_multi_input_npz(tmp_path):
    specs = _specs("int64[N, 16] ids, int64[N, 16] mask")
    p = tmp_path / "d.npz"
    np.savez(p, ids=np.zeros((4, 16), np.int64), mask=np.ones((4, 16), np.int64))
    assert load_data(str(p), specs).n_samples == 4
    np.savez(p, ids=np.zeros((4, 16), np.int64), mask=np.ones((3, 16), np.int64))
    with pytest.raises(DataError, match="different sample counts"):
        load_data(str(p), specs)
    with pytest.raises(DataError, match="a .npy holds one array"):
        np.save(tmp_path / "one.npy", np.zeros((4, 16), np.int64))
        load_data(str(tmp_path / "one.npy"), specs)


def test_random_is_seeded_and_refuses_unknowable_dims():
    specs = _specs("float[N, 3, 8, 8] x")
    a, b = load_data("random:3", specs), load_data("random:3", specs)
    assert a.is_random and a.n_samples == 3
    np.testing.assert_array_equal(a.arrays["x"], b.arrays["x"])
    with pytest.raises(DataError, match="dynamic dimension 'H'"):
        load_data("random:2", _specs("float[N, 3, H, W] x"))
    with pytest.raises(DataError, match="N >= 1"):
        load_data("random:0", specs)


def test_dynamic_spatial_dims_resolved_from_data():
    specs = _specs("float[N, 3, H, W] x")
    ds = load_data({"x": np.zeros((2, 3, 20, 30), np.float32)}, specs)
    assert ds.input_shapes() == {"x": (1, 3, 20, 30)}


def test_unknown_format_and_missing(tmp_path):
    specs = _specs("float[N, 3] x")
    with pytest.raises(DataError, match="no such file"):
        load_data(str(tmp_path / "nope.npz"), specs)
    (tmp_path / "d.csv").write_text("1,2,3\n")
    with pytest.raises(DataError, match="unknown format"):
        load_data(str(tmp_path / "d.csv"), specs)
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="cannot read .npz"):
        load_data(str(tmp_path / "bad.npz"), specs)


def test_image_folder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (40 + i * 10, 60, 3), dtype=np.uint8)).save(
            tmp_path / f"{i}.png"
        )
    (tmp_path / "notes.txt").write_text("ignored")
    specs = _specs("float[N, 3, 32, 32] x")
    ds = load_data(
        str(tmp_path), specs, images=ImageOptions(mean="0.5,0.5,0.5", std="0.25,0.25,0.25")
    )
    x = ds.arrays["x"]
    assert x.shape == (3, 3, 32, 32) and x.dtype == np.float32
    assert -2.0 - 1e-6 <= x.min() and x.max() <= 2.0 + 1e-6  # (v - 0.5) / 0.25 for v in [0, 1]
    nhwc = load_data(str(tmp_path), _specs("float[N, 24, 24, 3] x"))
    assert nhwc.arrays["x"].shape == (3, 24, 24, 3)
    with pytest.raises(DataError, match="no images"):
        empty = tmp_path / "empty"
        empty.mkdir()
        load_data(str(empty), specs)


def test_an_image_folder_for_a_one_channel_model_needs_no_options(tmp_path):
    """Defaults fit the model's channels (they were three values, refused for one channel);
    a wrong count or an empty folder each get their own message."""
    from PIL import Image

    for i in range(2):
        Image.fromarray(np.full((20, 20, 3), 60 * i, np.uint8)).save(tmp_path / f"{i}.png")
    specs = _specs("float[N, 1, 16, 16] x")
    x = load_data(str(tmp_path), specs).arrays["x"]
    assert x.shape == (2, 1, 16, 16) and x[1].max() == pytest.approx(60 / 255)
    with pytest.raises(DataError, match="3 values for input 'x', which has 1 channel; give 1"):
        load_data(str(tmp_path), specs, images=ImageOptions(mean="0.4,0.4,0.4"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images in the folder"):
        load_data(str(tmp_path / "empty"), specs)


def test_a_scalar_input_per_sample_reaches_onnxruntime_as_an_array(tmp_path):
    """A voice-activity model's ``sr`` (rank-0 int64) beside a whole input per sample: each
    batch gives onnxruntime a 0-d array, never a numpy scalar (which it cannot take)."""
    specs = _specs("float[1, 512] x, int64 sr")
    p = tmp_path / "d.npz"
    np.savez(p, x=np.zeros((3, 1, 512), np.float32), sr=np.full(3, 16000, np.int64))
    ds = load_data(str(p), specs)
    feeds = list(ds.batches())
    assert len(feeds) == 3
    assert all(type(f["sr"]) is np.ndarray and f["sr"].shape == () for f in feeds)
    assert feeds[0]["sr"] == 16000 and feeds[0]["x"].shape == (1, 512)


def test_a_dimension_written_as_minus_one_is_dynamic(tmp_path):
    """Paddle exports write dynamic axes as -1 (ppocr's classifier: [-1, 3, ?, ?])."""
    model = ir.from_proto(make_model(_specs_text("float[N, 3, 4, 4] x"), check=False))
    model.graph.inputs[0].shape = ir.Shape([-1, 3, -1, -1])
    (spec,) = input_specs(model)
    assert spec.dims == (None, 3, None, None)
    p = tmp_path / "d.npy"
    np.save(p, np.zeros((5, 3, 4, 4), np.float32))
    assert [b["x"].shape for b in load_data(str(p), [spec]).batches()] == [(5, 3, 4, 4)]

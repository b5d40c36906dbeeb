"""The pipeline: validation instrument, rollback, strict mode, API return kinds, no mutation."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import onnxshrink
from onnxshrink.errors import ValidationError
from onnxshrink.passes import REGISTRY
from onnxshrink.passes.base import ShrinkPass
from tests.helpers import ort_run


def _first_conv_weight(model: ir.Model) -> ir.Value:
    conv = next(n for n in model.graph if n.op_type == "Conv")
    return conv.inputs[1]


@dataclasses.dataclass
class CorruptPass(ShrinkPass):
    """Test only: claims to be exact but flips the sign of the first Conv's weights."""

    name: ClassVar[str] = "test-corrupt"

    def call(self, model):
        w = _first_conv_weight(model)
        w.const_value = ir.tensor(-w.const_value.numpy(), name=w.name)
        self.change(w.name)
        return ir.passes.PassResult(model, modified=True)


@dataclasses.dataclass
class BreakPass(ShrinkPass):
    """Test only: leaves an invalid graph (a Conv weight of the wrong rank)."""

    name: ClassVar[str] = "test-break"

    def call(self, model):
        w = _first_conv_weight(model)
        w.const_value = ir.tensor(np.zeros((3,), np.float32), name=w.name)
        w.shape = ir.Shape([3])
        return ir.passes.PassResult(model, modified=True)


@dataclasses.dataclass
class CrashPass(ShrinkPass):
    """Test only: raises halfway through a rewrite."""

    name: ClassVar[str] = "test-crash"

    def call(self, model):
        model.graph.remove(next(iter(model.graph)))
        raise RuntimeError("boom")


@dataclasses.dataclass
class NoisePass(ShrinkPass):
    """Test only: a lossy pass adding relative noise ``level`` to the first Conv's weights."""

    name: ClassVar[str] = "test-noise"
    lossy: ClassVar[bool] = True
    level: float = 0.01
    floor: float | None = None

    def call(self, model):
        w = _first_conv_weight(model)
        arr = w.const_value.numpy()
        noise = np.random.default_rng(0).standard_normal(arr.shape).astype(np.float32)
        w.const_value = ir.tensor(arr + self.level * np.abs(arr).mean() * noise, name=w.name)
        return ir.passes.PassResult(model, modified=True)


@pytest.fixture
def model(digits_model):
    return onnx.load(str(digits_model))


def test_corrupting_exact_pass_is_rolled_back(model, digits_calib):
    out, report = onnxshrink.compress(model, ["fold-batchnorm", CorruptPass()], data=str(digits_calib))
    fold, corrupt = report.passes
    assert fold.status == "applied"
    assert corrupt.status == "rolled-back"
    assert "exact pass changed the outputs" in corrupt.reason
    # the result is the model after fold-batchnorm: same outputs as the original
    x = np.load(digits_calib)["input"][:8]
    np.testing.assert_allclose(ort_run(out, {"input": x})[0], ort_run(model, {"input": x})[0], atol=1e-4)
    assert not any(n.op_type == "BatchNormalization" for n in out.graph.node)


def test_invalid_graph_is_rolled_back(model):
    out, report = onnxshrink.compress(model, [BreakPass()])
    (rec,) = report.passes
    assert rec.status == "rolled-back"
    assert rec.reason  # checker / shape inference / onnxruntime said why
    assert len(out.graph.node) == len(model.graph.node)


def test_crashing_pass_is_rolled_back_and_the_model_kept(model):
    out, report = onnxshrink.compress(model, [CrashPass(), "fold-batchnorm"])
    crash, fold = report.passes
    assert crash.status == "rolled-back"
    assert "RuntimeError: boom" in crash.reason
    assert fold.status == "applied"
    onnx.checker.check_model(out, full_check=True)


def test_strict_turns_rollback_into_error(model):
    with pytest.raises(ValidationError, match="test-corrupt"):
        onnxshrink.compress(model, [CorruptPass()], strict=True)


def test_lossy_pass_floor(model, digits_calib):
    _, ok = onnxshrink.compress(model, [NoisePass(level=0.01)], data=str(digits_calib))
    assert ok.passes[0].status == "applied"
    assert 0.99 < ok.passes[0].fidelity.cosine < 1.0
    _, bad = onnxshrink.compress(model, [NoisePass(level=3.0)], data=str(digits_calib))
    assert bad.passes[0].status == "rolled-back"
    assert "below the floor" in bad.passes[0].reason
    _, low = onnxshrink.compress(model, [NoisePass(level=3.0, floor=0.1)], data=str(digits_calib))
    assert low.passes[0].status == "applied"


def test_unchanged_pass_and_report_json(model):
    out, report = onnxshrink.compress(model, ["fold-batchnorm", "fold-batchnorm"])
    assert [p.status for p in report.passes] == ["applied", "unchanged"]
    d = report.to_dict()
    assert set(d["before"]) >= {"params", "macs", "bytes"} and set(d["after"]) >= {"params", "macs", "bytes"}
    p = d["passes"][0]
    assert set(p) >= {"name", "options", "status", "seconds", "changed", "skipped", "fidelity"}
    assert set(p["fidelity"]) >= {"cosine", "max_abs", "top1_agreement"}
    assert d["after"]["params"] < d["before"]["params"]  # BN parameters are gone
    assert d["after"]["macs"] == d["before"]["macs"]
    assert report.warnings and "random" in report.warnings[0]


def test_api_returns_the_kind_given_and_never_mutates(model, digits_model, tmp_path):
    before = model.SerializeToString()
    out, _ = onnxshrink.compress(model)
    assert isinstance(out, onnx.ModelProto)
    assert model.SerializeToString() == before

    m = ir.from_proto(model)
    n_nodes = len(m.graph)
    out_ir, _ = onnxshrink.compress(m)
    assert isinstance(out_ir, ir.Model) and out_ir is not m
    assert len(m.graph) == n_nodes
    assert any(n.op_type == "BatchNormalization" for n in m.graph)

    file_bytes = digits_model.read_bytes()
    path, report = onnxshrink.compress(str(digits_model), output=tmp_path / "out.onnx")
    assert path == tmp_path / "out.onnx" and path.exists()
    assert digits_model.read_bytes() == file_bytes
    assert report.output == str(path)
    assert report.after["bytes"] == path.stat().st_size


def test_registry_names_match_design():
    assert {"simplify", "fold-batchnorm"} <= set(REGISTRY)

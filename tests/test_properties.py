"""Property tests: every pass and a few pipelines on generated CNNs (tests/strategies.py).

For any generated network and any pass: ``compress`` does not raise; the result passes the
checker (full) and runs in onnxruntime with the original's output names, dtypes and shapes;
an exact pass is never rolled back and its outputs stay within 1e-4 (relative to the output
scale); a lossy pass that was applied meets its fidelity floor (re-measured here, independently
of the pipeline's own check), and a rolled-back pass says why.

Profiles: the default (``ci``, 6 examples per pass, derandomized so CI is reproducible) and
``long`` (``pytest tests/test_properties.py --hypothesis-profile=long``, 200 examples each).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import event, given
from hypothesis import strategies as st

import onnxshrink
from onnxshrink.passes import REGISTRY, make_pass
from tests.helpers import ort_run
from tests.strategies import Net, cnn_models, transformer_models

# one spec per registered pass, with options that let it act on small generated nets
PASS_SPECS = {
    "simplify": "simplify",
    "fold-batchnorm": "fold-batchnorm",
    "prune": "prune:ratio=0.3,min-channels=1,round=0",
    "prune-kernel": "prune-kernel:ratio=0.3",
    "tucker": "tucker:rank=0.5,min-channels=2,round=0",
    "lowrank": "lowrank:rank=0.5,min-size=2,round=0",
    "equalize": "equalize",
    "quantize": "quantize",
    "quantize-dynamic": "quantize-dynamic",
    "quantize-weights": "quantize-weights",
    "insert-qdq": "insert-qdq",
    "fold-qdq": "fold-qdq",
    "cluster": "cluster:bits=4,min-size=16",
    "distill": "distill",
    "sparsify": "sparsify:sparsity=0.5,min-size=16,floor=0",
    "reconstruct": "reconstruct:iterations=20,batch=4",  # needs torch: skipped without it
}
PIPELINES = {
    "default": ["simplify", "fold-batchnorm"],
    "prune+quantize": ["fold-batchnorm", "prune:ratio=0.2,min-channels=1,round=0", "quantize"],
    "equalize+quantize": ["fold-batchnorm", "equalize", "quantize"],
    "decompose+cluster": [
        "fold-batchnorm",
        "tucker:rank=0.5,min-channels=2,round=0",
        "lowrank:rank=0.5,min-size=2,round=0,fused=false",
        "distill",
        "cluster:bits=6,min-size=16",
    ],
    "prune+reconstruct": [
        "fold-batchnorm",
        "prune:ratio=0.3,min-channels=1,round=0",
        "reconstruct:iterations=20,batch=4",
    ],
}


def _needs(specs: list[str]) -> None:
    if any(s.startswith("reconstruct") for s in specs):
        pytest.importorskip("torch")


def test_every_registered_pass_is_covered():
    assert set(PASS_SPECS) == set(REGISTRY)


def _feeds(net: Net) -> tuple[list[dict[str, np.ndarray]], dict[str, np.ndarray]]:
    """Six batches of two samples, and the same as ``--data`` (stacked per batch for a fixed
    batch of 2, concatenated for a dynamic batch)."""
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal(net.input_shape).astype(np.float32) for _ in range(6)]
    fixed = net.model.graph.input[0].type.tensor_type.shape.dim[0].HasField("dim_value")
    data = np.stack(batches) if fixed else np.concatenate(batches)
    return [{"input": b} for b in batches], {"input": data}


def _cosine(ref: np.ndarray, out: np.ndarray) -> float:
    r, o = (
        ref.reshape(len(ref), -1).astype(np.float64),
        out.reshape(len(out), -1).astype(np.float64),
    )
    num = np.sum(r * o, 1)
    den = np.linalg.norm(r, axis=1) * np.linalg.norm(o, axis=1)
    cos = np.where(
        den > 0,
        num / np.maximum(den, 1e-300),
        np.where(np.linalg.norm(r - o, axis=1) == 0, 1.0, 0.0),
    )
    return float(cos.mean())


def _check(net: Net, specs: list[str]) -> list[str]:
    feeds, data = _feeds(net)
    result, report = onnxshrink.compress(
        net.model, passes=specs, data=data, holdout=0, progress=False
    )
    onnx.checker.check_model(result, full_check=True)
    ref = np.concatenate([ort_run(net.model, f)[0] for f in feeds])
    got = np.concatenate([ort_run(result, f)[0] for f in feeds])
    assert [o.name for o in result.graph.output] == [o.name for o in net.model.graph.output]
    assert [o.type.tensor_type.elem_type for o in result.graph.output] == [
        o.type.tensor_type.elem_type for o in net.model.graph.output
    ]
    assert got.shape == ref.shape and got.dtype == ref.dtype
    exact_only = True
    for rec, spec in zip(report.passes, specs):
        p = make_pass(spec)
        event(f"{p.name}: {rec.status}")
        assert rec.status in ("applied", "unchanged", "rolled-back"), rec
        if rec.status == "rolled-back":
            assert rec.reason, rec
            assert not rec.reason.startswith("pass raised"), f"{p.name} crashed: {rec.reason}"
        if not p.lossy:
            assert rec.status != "rolled-back", f"exact pass {p.name} rolled back: {rec.reason}"
        elif rec.status == "applied":
            exact_only = False
    if exact_only:
        assert np.abs(got - ref).max() <= 1e-4 * max(1.0, float(np.abs(ref).max())), (
            report.to_json()
        )
    if len(specs) == 1 and report.passes[0].status == "applied":
        p = make_pass(specs[0])
        if p.lossy and p.compare_to == "original":
            floor = p.floor if getattr(p, "floor", None) is not None else 0.99
            assert _cosine(ref, got) >= floor - 1e-3, (report.passes[0].fidelity, _cosine(ref, got))
    return [rec.status for rec in report.passes]


# lossy passes that act on a float CNN alone; the others need something before them (fold-qdq a
# QDQ model, distill a compressed one) and are checked for validity only
_ACTS_ALONE = {
    "prune",
    "prune-kernel",
    "tucker",
    "lowrank",
    "equalize",
    "quantize",
    "quantize-dynamic",
    "insert-qdq",
    "cluster",
    "sparsify",
}


@pytest.mark.parametrize("name", sorted(PASS_SPECS))
def test_pass_keeps_generated_models_valid(name):
    _needs([PASS_SPECS[name]])
    statuses: list[str] = []

    @given(net=cnn_models())
    def each(net):
        statuses.extend(_check(net, [PASS_SPECS[name]]))

    each()
    if name in _ACTS_ALONE:  # a lossy pass that never applies would pass every check above
        assert statuses.count("applied") >= len(statuses) / 3, statuses


# the transformer modes: every spec on generated encoder layers (attention, GELU, LayerNorm)
TRANSFORMER_SPECS = [
    "quantize-dynamic",
    "quantize-dynamic:rounding=nearest,cpu=vnni",
    "quantize-dynamic:weights=mse",
    "quantize-weights",
    "quantize-weights:bits=8,block=16,rounding=nearest",
    "quantize",
    "quantize:smooth=off,calibration=percentile,cpu=vnni",
]


@pytest.mark.parametrize("spec", TRANSFORMER_SPECS)
def test_transformer_layers_stay_valid(spec):
    statuses: list[str] = []

    @given(net=transformer_models())
    def each(net):
        statuses.extend(_check(net, [spec]))

    each()
    assert statuses.count("applied") >= len(statuses) / 3, statuses


@pytest.mark.parametrize("name", sorted(PIPELINES))
@given(net=cnn_models())
def test_pipeline_keeps_generated_models_valid(name, net):
    _needs(PIPELINES[name])
    _check(net, PIPELINES[name])


# -- names are the model author's: arbitrary Unicode through the CLI ------------------------
_NASTY = [
    "[/]",
    "[bold]",
    "[/x]",
    "$\\frac{$",
    "\x1b[31m",
    "\x1b]0;t\x07",
    "\n",
    "\r",
    ":thumbs_up:",
    "\u202e",
    "\\",
    "%s",
    "{}",
    "<script>",
    "\ufeff",
    "\x00",
]


def _named_model(names: list[str], bad_utf8: bool) -> bytes:
    """Conv -> Relu -> GlobalAveragePool -> Flatten -> Gemm with every name from ``names``;
    ``bad_utf8``: the first node name made invalid UTF-8 in the serialized bytes."""
    from onnx import TensorProto as T
    from onnx import helper as h
    from onnx import numpy_helper as nh

    rng = np.random.default_rng(0)
    x, w, c, r, p, f, g, gb, y = names[:9]
    nodes = [
        h.make_node("Conv", [x, w], [c], name=names[9], pads=[1, 1, 1, 1]),
        h.make_node("Relu", [c], [r], name=names[10]),
        h.make_node("GlobalAveragePool", [r], [p], name=names[11]),
        h.make_node("Flatten", [p], [f], name=names[12]),
        h.make_node(
            "Gemm", [f, g, gb], [y], name="MARKERNODE" if bad_utf8 else names[13], transB=1
        ),
    ]
    inits = [
        nh.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), w),
        nh.from_array(rng.standard_normal((5, 4)).astype(np.float32), g),
        nh.from_array(rng.standard_normal(5).astype(np.float32), gb),
    ]
    graph = h.make_graph(
        nodes,
        "g",
        [h.make_tensor_value_info(x, T.FLOAT, ["N", 3, 8, 8])],
        [h.make_tensor_value_info(y, T.FLOAT, ["N", 5])],
        inits,
    )
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    model.ir_version = 8
    data = model.SerializeToString()
    return data.replace(b"MARKERNODE", b"MARK\xff\xfeNODE") if bad_utf8 else data


@given(data=st.data())
def test_names_from_arbitrary_unicode_never_crash_the_cli(data, tmp_path_factory):
    """compress (with --report-html), inspect: exit 0 or 2, never 3, at most one stderr line."""
    import contextlib
    import io

    from onnxshrink import cli

    name = st.one_of(
        st.text(min_size=1, max_size=10),
        st.sampled_from(_NASTY),
        st.lists(st.sampled_from(_NASTY), min_size=2, max_size=4).map("".join),
    )
    names = data.draw(st.lists(name, min_size=14, max_size=14, unique=True))
    bad_utf8 = data.draw(st.booleans())
    folder = tmp_path_factory.mktemp("names")
    path = folder / "m.onnx"
    path.write_bytes(_named_model(names, bad_utf8))
    before = path.read_bytes()
    runs = [
        [
            "compress",
            str(path),
            "-o",
            str(folder / "o.onnx"),
            "--report-html",
            str(folder / "r.html"),
        ],
        ["inspect", str(path), "--all"],
    ]
    for args in runs:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli.main(args)
        event(f"{args[0]} exit {code}")
        lines = err.getvalue().strip().splitlines()
        assert code in (0, 2), (args[0], code, err.getvalue()[-500:])
        assert len(lines) <= 1, err.getvalue()[-500:]
        assert "\x1b" not in out.getvalue() + err.getvalue()
    assert path.read_bytes() == before

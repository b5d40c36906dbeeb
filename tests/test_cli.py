"""The CLI as a user meets it: exit codes, one-line errors, input untouched, no partial files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxshrink import cli
from onnxshrink.passes import REGISTRY
from tests.test_pipeline import CorruptPass


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "onnxshrink", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, "COLUMNS": "120"},
    )


def _assert_one_line_error(proc: subprocess.CompletedProcess, code: int, *needles: str) -> None:
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.fixture
def user_model(tmp_path, digits_model) -> Path:
    p = tmp_path / "model.onnx"
    p.write_bytes(digits_model.read_bytes())
    return p


@pytest.mark.parametrize(
    "content,needle",
    [
        (b"", "empty file"),
        (np.random.default_rng(0).bytes(4096), "not an ONNX model"),
        (b"this is a text file, not a model\n" * 10, "not an ONNX model"),
    ],
    ids=["empty", "random-bytes", "text"],
)
def test_not_onnx(tmp_path, content, needle):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(content)
    out = tmp_path / "out.onnx"
    proc = run_cli("compress", str(bad), "-o", str(out))
    _assert_one_line_error(proc, 2, needle)
    assert bad.read_bytes() == content
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["bad.onnx"]


def test_truncated_protobuf(tmp_path, digits_model):
    data = digits_model.read_bytes()
    bad = tmp_path / "truncated.onnx"
    bad.write_bytes(data[: len(data) // 2])
    proc = run_cli("compress", str(bad), "-o", str(tmp_path / "out.onnx"))
    _assert_one_line_error(proc, 2, "truncated.onnx")
    assert bad.read_bytes() == data[: len(data) // 2]
    assert not (tmp_path / "out.onnx").exists()


def test_missing_file(tmp_path):
    proc = run_cli("compress", str(tmp_path / "nope.onnx"), "-o", str(tmp_path / "out.onnx"))
    _assert_one_line_error(proc, 2, "no such file")


def test_unknown_pass(user_model, tmp_path):
    before = user_model.read_bytes()
    proc = run_cli("compress", str(user_model), "-o", str(tmp_path / "o.onnx"), "-p", "shrinkify")
    _assert_one_line_error(proc, 2, "unknown pass 'shrinkify'")
    assert user_model.read_bytes() == before
    assert not (tmp_path / "o.onnx").exists()


@pytest.mark.parametrize(
    "spec,needle",
    [
        ("fold-batchnorm:ratio=0.3", "has no option 'ratio'"),
        ("fold-batchnorm:=3", "empty option name"),
        ("simplify:x", "expected KEY=VALUE"),
    ],
)
def test_bad_option(user_model, tmp_path, spec, needle):
    before = user_model.read_bytes()
    proc = run_cli("compress", str(user_model), "-o", str(tmp_path / "o.onnx"), "-p", spec)
    _assert_one_line_error(proc, 2, needle)
    assert user_model.read_bytes() == before


def test_output_equal_to_input(user_model):
    before = user_model.read_bytes()
    proc = run_cli("compress", str(user_model), "-o", str(user_model))
    _assert_one_line_error(proc, 2, "would overwrite the input model")
    assert user_model.read_bytes() == before


def test_output_folder_missing(user_model, tmp_path):
    proc = run_cli("compress", str(user_model), "-o", str(tmp_path / "no" / "such" / "out.onnx"))
    _assert_one_line_error(proc, 2, "does not exist")


def test_output_folder_read_only(user_model, tmp_path):
    if os.geteuid() == 0:  # root ignores permission bits: use a folder nobody can create files in
        proc = run_cli("compress", str(user_model), "-o", "/proc/out.onnx")
        _assert_one_line_error(proc, 2, "not writable")
        return
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        proc = run_cli("compress", str(user_model), "-o", str(ro / "out.onnx"))
        _assert_one_line_error(proc, 2, "not writable")
    finally:
        ro.chmod(0o700)


def test_bad_usage_is_one_line(tmp_path):
    proc = run_cli("compress")
    _assert_one_line_error(proc, 2, "required")
    proc = run_cli("frobnicate")
    _assert_one_line_error(proc, 2, "invalid choice")


@pytest.mark.parametrize(
    "make_data,needle",
    [
        (
            lambda d: np.savez(d, wrong=np.zeros((4, 1, 32, 32), np.float32)),
            "missing input(s) input",
        ),
        (
            lambda d: np.savez(d, input=np.zeros((4, 3, 32, 32), np.float32)),
            "got shape [4, 3, 32, 32]",
        ),
        (lambda d: np.savez(d, input=np.zeros((4, 1, 32, 32), np.int32)), "dtype int32"),
        (lambda d: np.savez(d, input=np.full((4, 1, 32, 32), np.nan, np.float32)), "NaN/Inf"),
        (lambda d: np.savez(d, input=np.zeros((0, 1, 32, 32), np.float32)), "zero samples"),
    ],
    ids=["names", "shape", "dtype", "nan", "empty"],
)
def test_bad_data(user_model, tmp_path, make_data, needle):
    data = tmp_path / "data.npz"
    make_data(data)
    before = user_model.read_bytes()
    out = tmp_path / "o.onnx"
    proc = run_cli("compress", str(user_model), "-o", str(out), "--data", str(data))
    _assert_one_line_error(proc, 2, needle)
    assert user_model.read_bytes() == before
    assert not out.exists()


def test_compress_end_to_end(user_model, tmp_path, digits_calib):
    out, rep = tmp_path / "small.onnx", tmp_path / "report.json"
    proc = run_cli(
        "compress",
        str(user_model),
        "-o",
        str(out),
        "--data",
        str(digits_calib),
        "--report",
        str(rep),
    )
    assert proc.returncode == 0, proc.stderr
    assert "fold-batchnorm" in proc.stdout and "applied" in proc.stdout
    report = json.loads(rep.read_text())
    assert [p["name"] for p in report["passes"]] == ["simplify", "fold-batchnorm"]
    assert report["fidelity"]["max_abs"] < 1e-4
    model = onnx.load(str(out))
    assert not any(n.op_type == "BatchNormalization" for n in model.graph.node)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "report.json", "small.onnx"]


def test_summary_says_why_nodes_were_skipped(user_model, tmp_path, digits_calib):
    """Without --verbose, each pass's most frequent skip reasons are shown with a node count."""
    out = tmp_path / "q.onnx"
    args = (
        "compress",
        str(user_model),
        "-o",
        str(out),
        "-p",
        "insert-qdq",
        "--data",
        str(digits_calib),
    )
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr
    flat = " ".join(proc.stdout.split())  # rich wraps long lines
    assert (
        "insert-qdq skipped 11 nodes: BatchNormalization stays float between DQ and Q: "
        "run fold-batchnorm first"
    ) in flat
    verbose = " ".join(run_cli(*args, "--verbose").stdout.split())
    assert verbose.count("insert-qdq skipped /") == 11


def test_strict_exit_code_1(user_model, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(REGISTRY, "test-corrupt", CorruptPass)
    out = tmp_path / "o.onnx"
    before = user_model.read_bytes()
    code = cli.main(
        ["compress", str(user_model), "-o", str(out), "-p", "test-corrupt", "--strict", "-q"]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert len(err) == 1 and "failed validation" in err[0]
    assert not out.exists()
    assert user_model.read_bytes() == before
    # without --strict: rolled back, reported, exit 0, model written
    code = cli.main(["compress", str(user_model), "-o", str(out), "-p", "test-corrupt"])
    stdout = capsys.readouterr().out
    assert code == 0 and out.exists()
    assert "rolled-back" in stdout and "rolled back test-corrupt" in stdout


def test_inspect_json(digits_model):
    proc = run_cli("inspect", str(digits_model), "--json")
    assert proc.returncode == 0, proc.stderr
    d = json.loads(proc.stdout)
    assert d["macs"] == 12_579_456 and d["params"] > 100_000
    assert d["bytes"] == digits_model.stat().st_size
    assert sum(1 for lay in d["layers"] if lay["op_type"] == "Conv") == 11


def test_inspect_table_and_passes(digits_model):
    proc = run_cli("inspect", str(digits_model))
    assert proc.returncode == 0 and "total" in proc.stdout and "12.58M MACs" in proc.stdout
    proc = run_cli("passes")
    assert proc.returncode == 0 and "fold-batchnorm" in proc.stdout and "simplify" in proc.stdout


def test_compare(user_model, tmp_path, digits_test):
    out = tmp_path / "small.onnx"
    assert run_cli("compress", str(user_model), "-o", str(out), "-q").returncode == 0
    data = tmp_path / "test.npz"
    np.savez(data, input=digits_test[0][:64])
    proc = run_cli(
        "compare", str(user_model), str(out), "--data", str(data), "--json", "--runs", "5"
    )
    assert proc.returncode == 0, proc.stderr
    d = json.loads(proc.stdout)
    assert d["fidelity"]["top1_agreement"] == 1.0 and d["fidelity"]["max_abs"] < 1e-4
    assert d["latency_ms"]["a"] > 0 and d["latency_ms"]["b"] > 0


def test_help_is_fast_and_imports_nothing_heavy():
    code = (
        "import sys, onnxshrink.cli as c; c._parser(); "
        "print(','.join(m for m in ('onnx', 'onnxruntime', 'onnxsim', 'tensorly', 'numpy') if m in "
        "sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == ""


def test_compare_layers_shows_where_a_quantized_model_drifts(user_model, tmp_path, digits_calib):
    out = tmp_path / "q.onnx"
    assert (
        run_cli(
            "compress",
            str(user_model),
            "-o",
            str(out),
            "-p",
            "fold-batchnorm",
            "-p",
            "quantize",
            "--data",
            str(digits_calib),
            "-q",
        ).returncode
        == 0
    )
    proc = run_cli(
        "compare",
        str(user_model),
        str(out),
        "--data",
        str(digits_calib),
        "--layers",
        "--json",
        "--runs",
        "3",
    )
    assert proc.returncode == 0, proc.stderr
    layers = json.loads(proc.stdout)["layers"]
    assert len(layers) >= 10  # conv outputs keep their names through folding and quantization
    assert all(0.9 < lay["cosine"] <= 1.0 + 1e-9 for lay in layers)
    assert any(lay["cosine"] < 0.99999 for lay in layers)  # quantization error is visible per layer
    proc = run_cli(
        "compare", str(user_model), str(out), "--data", str(digits_calib), "--layers", "--runs", "3"
    )
    assert "worst:" in proc.stdout


def test_holdout_option(user_model, tmp_path, digits_calib):
    out, rep = tmp_path / "o.onnx", tmp_path / "r.json"
    proc = run_cli(
        "compress",
        str(user_model),
        "-o",
        str(out),
        "--data",
        str(digits_calib),
        "--report",
        str(rep),
        "-q",
    )
    assert proc.returncode == 0
    assert "150 calibration + 50 held-out validation samples" in json.loads(rep.read_text())["data"]
    proc = run_cli(
        "compress",
        str(user_model),
        "-o",
        str(out),
        "--data",
        str(digits_calib),
        "--report",
        str(rep),
        "-q",
        "--holdout",
        "0",
    )
    assert "calibration = validation" in json.loads(rep.read_text())["data"]
    proc = run_cli("compress", str(user_model), "-o", str(out), "--holdout", "1.5")
    _assert_one_line_error(proc, 2, "holdout")


def test_inspect_takes_dynamic_dims_from_data(tmp_path):
    from tests.helpers import make_model, rand

    model = make_model(
        """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, S, 16] x, float[16, 32] W) => (float[N, S, 32] y) { y = MatMul(x, W) }""",
        {"W": rand(np.random.default_rng(0), 16, 32)},
    )
    path = tmp_path / "seq.onnx"
    onnx.save(model, path)
    np.savez(tmp_path / "d.npz", x=np.zeros((3, 10, 16), np.float32))
    proc = run_cli("inspect", str(path), "--json")
    assert json.loads(proc.stdout)["macs_unknown"]  # the sequence length is unknown
    proc = run_cli("inspect", str(path), "--json", "--data", str(tmp_path / "d.npz"))
    info = json.loads(proc.stdout)
    assert info["macs"] == 10 * 16 * 32 and not info["macs_unknown"]  # one sample of 10 tokens


@pytest.mark.parametrize("cpu", ["any", "vnni"])
def test_inspect_and_compare_say_whether_int8_weights_saturate(
    cpu, user_model, tmp_path, digits_calib, monkeypatch
):
    """``inspect`` names the layers whose int8 weights break the pair rule; ``compare`` measures
    B with its integer kernels too, names this CPU, and warns on one that saturates (made to look
    like an AVX2 CPU without VNNI here)."""
    from onnxshrink import cpu as cpu_module
    from onnxshrink.compare import compare_models
    from onnxshrink.cpu import CPU

    out = tmp_path / "q.onnx"
    assert (
        run_cli(
            "compress",
            str(user_model),
            "-o",
            str(out),
            "-p",
            f"quantize:cpu={cpu}",
            "--data",
            str(digits_calib),
            "-q",
        ).returncode
        == 0
    )
    proc = run_cli("inspect", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    int8 = json.loads(proc.stdout)["int8"]
    assert int8["layers"] == 11  # the 10 Convs after the float stem, and the Gemm
    assert len(int8["unsafe_layers"]) == (9 if cpu == "vnni" else 0)
    assert "pair rule" in run_cli("inspect", str(out)).stdout or cpu == "any"
    monkeypatch.setattr(
        cpu_module, "this_cpu", lambda: CPU("test AVX2", "x86_64", frozenset({"avx2"}))
    )
    r = compare_models(str(user_model), str(out), data=str(digits_calib), runs=3)
    assert r["cpu"]["int8_kernel"] == "AVX2 (no VNNI)" and r["fidelity_kernels"]["cosine"] > 0.9999
    assert len(r["warnings"]) == (1 if cpu == "vnni" else 0)
    assert all("9 layers have int8 weight pairs that saturate" in w for w in r["warnings"])


def test_pass_descriptions_are_whole_sentences():
    proc = run_cli("passes", "--json")
    assert proc.returncode == 0, proc.stderr
    for r in json.loads(proc.stdout):
        assert r["description"].endswith(".") and "\n" not in r["description"], (
            r
        )  # quantize's stopped at "into"


def test_passes_lists_the_registry_without_importing_a_pass():
    """``onnxshrink passes`` reads onnxshrink/catalog.json (importing the passes took 2-7 s: onnx_ir
    pulls in sympy); the file must be what the registry says (``python -m onnxshrink.catalog``
    rewrites it)."""
    from onnxshrink import catalog

    assert catalog.load() == catalog.rows(), "stale: run python -m onnxshrink.catalog"
    code = (
        "import sys\nfrom onnxshrink import cli\nrc = cli.main(['passes', '--json'])\n"
        "print(rc, sorted(m for m in ('onnx', 'onnx_ir', 'onnxruntime', 'numpy') "
        "if m in sys.modules), file=sys.stderr)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.stderr.strip() == "0 []", proc.stderr
    listed = json.loads(proc.stdout)
    assert [r["name"] for r in listed] == [r["name"] for r in catalog.rows()]
    assert any(o["name"] == "floor" for r in listed for o in r["options"])

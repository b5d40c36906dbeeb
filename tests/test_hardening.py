"""Hostile and careless input through the CLI, as a user (or an attacker) meets it: nothing the
command writes may replace what it reads, names are text, bad input is one line and exit 2."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import onnx
import pytest

from tests.test_cli import _assert_one_line_error
from tests.test_cli import run_cli as _run_cli

_WRITES = {"-o", "--output", "--report", "--report-html"}


def _inputs(args) -> dict[Path, bytes]:
    """The files a command reads (every existing file argument that is not a place it writes)."""
    skip = {args[i + 1] for i, a in enumerate(args[:-1]) if a in _WRITES}
    return {Path(a): Path(a).read_bytes() for a in args if a not in skip and Path(a).is_file()}


def run_cli(*args):
    """The CLI in a subprocess; every input file's bytes are checked unchanged after it."""
    before = _inputs(args)
    proc = _run_cli(*args)
    assert {p: p.read_bytes() for p in before} == before, "an input file was modified"
    return proc


def cli_main(args):
    """The CLI in this process (for monkeypatched failures); inputs checked unchanged."""
    from onnxshrink import cli

    before = _inputs(args)
    code = cli.main(args)
    assert {p: p.read_bytes() for p in before} == before, "an input file was modified"
    return code


@pytest.fixture
def user_model(tmp_path, digits_model) -> Path:
    p = tmp_path / "model.onnx"
    p.write_bytes(digits_model.read_bytes())
    return p


@pytest.fixture
def external_model(tmp_path, digits_model) -> Path:
    """The digits CNN saved with its weights in ``weights.bin`` beside it."""
    folder = tmp_path / "ext"
    folder.mkdir()
    m = onnx.load(str(digits_model))
    onnx.save(
        m,
        str(folder / "model.onnx"),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="weights.bin",
        size_threshold=0,
    )
    return folder / "model.onnx"


def _snapshot(*paths: Path) -> dict[Path, bytes | None]:
    return {p: p.read_bytes() if p.is_file() else None for p in paths}


# -- 1. every file the command writes is checked before anything is written ----------------
@pytest.mark.parametrize("report_at", ["input", "input-data", "output", "other-report"])
def test_reports_never_replace_the_input_or_the_output(report_at, external_model, tmp_path):
    out = tmp_path / "out.onnx"
    data = external_model.parent / "weights.bin"
    html = tmp_path / "r.html"
    target = {"input": external_model, "input-data": data, "output": out, "other-report": html}[
        report_at
    ]
    before = _snapshot(external_model, data, out, html)
    proc = run_cli(
        "compress",
        str(external_model),
        "-o",
        str(out),
        "--report",
        str(target),
        "--report-html",
        str(html),
        "-q",
    )
    _assert_one_line_error(proc, 2, "would overwrite")
    assert _snapshot(external_model, data, out, html) == before  # nothing written, nothing replaced


def test_report_into_a_missing_folder_is_refused_before_the_model_is_written(user_model, tmp_path):
    out = tmp_path / "out.onnx"
    proc = run_cli(
        "compress", str(user_model), "-o", str(out), "--report", str(tmp_path / "no" / "r.json")
    )
    _assert_one_line_error(proc, 2, "does not exist")
    assert not out.exists()


def test_output_data_that_is_a_folder_is_refused(user_model, tmp_path):
    out = tmp_path / "out.onnx"
    (tmp_path / "out.onnx.data").mkdir()
    proc = run_cli("compress", str(user_model), "-o", str(out), "-q")
    _assert_one_line_error(proc, 2, "is a folder")
    assert not out.exists()


def test_reports_get_the_permissions_the_umask_gives(user_model, tmp_path):
    out, rep = tmp_path / "out.onnx", tmp_path / "r.json"
    old = os.umask(0o022)
    try:
        proc = run_cli("compress", str(user_model), "-o", str(out), "--report", str(rep), "-q")
    finally:
        os.umask(old)
    assert proc.returncode == 0, proc.stderr
    assert stat.S_IMODE(rep.stat().st_mode) == stat.S_IMODE(out.stat().st_mode) == 0o644


# -- 3. names are text ----------------------------------------------------------------------
_HOSTILE = [
    "conv[/x]",
    "[bold]b\x1b[31mred\x1b]0;title\x07",
    "conv$\\frac{$",
    "two\nlines\u202egnp.exe",
]


def _hostile_model(digits_model: Path, folder: Path) -> Path:
    m = onnx.load(str(digits_model))
    for node, name in zip((n for n in m.graph.node if n.op_type == "Conv"), _HOSTILE):
        node.name = name
    folder.mkdir(parents=True)
    path = folder / "m[bold].onnx"
    onnx.save(m, str(path))
    return path


def _no_raw_controls(proc) -> None:
    for stream in (proc.stdout, proc.stderr):
        assert "\x1b" not in stream and "\x07" not in stream and "\u202e" not in stream


def test_names_and_paths_are_printed_as_literal_text(digits_model, digits_calib, tmp_path):
    path = _hostile_model(digits_model, tmp_path / "[/]dir")
    before = path.read_bytes()
    proc = run_cli("inspect", str(path), "--all")
    assert proc.returncode == 0, proc.stderr
    _no_raw_controls(proc)
    assert "conv[/x]" in proc.stdout and "[bold]b\\x1b[31mred\\x1b]0;title\\x07" in proc.stdout
    assert "two\\nlines\\u202egnp.exe" in proc.stdout and "m[bold].onnx" in proc.stdout
    out, html = tmp_path / "[/]dir" / "o[b].onnx", tmp_path / "[/]dir" / "r$\\frac{$.html"
    proc = run_cli(
        "compress",
        str(path),
        "-o",
        str(out),
        "-p",
        "quantize",
        "--data",
        str(digits_calib),
        "--report-html",
        str(html),
        "--verbose",
    )
    assert proc.returncode == 0, proc.stderr[-500:]
    _no_raw_controls(proc)
    assert f"wrote {out}" in proc.stdout and "m[bold].onnx" in proc.stdout
    assert "conv[/x]" in proc.stdout  # the float stem, named in the skip list
    assert "<img alt='layers'" in html.read_text()  # the plot of the layers, names and all, drawn
    assert path.read_bytes() == before


def test_an_input_name_cannot_add_lines_to_an_error(digits_model, tmp_path):
    m = onnx.load(str(digits_model))
    evil = "input\nerror: all is fine\x1b[2J"
    for n in m.graph.node:
        n.input[:] = [evil if i == "input" else i for i in n.input]
    m.graph.input[0].name = evil
    path = tmp_path / "m.onnx"
    onnx.save(m, str(path))
    np.savez(tmp_path / "d.npz", image=np.zeros((4, 1, 8, 8), np.float32))  # no array for the input
    proc = run_cli(
        "compress", str(path), "-o", str(tmp_path / "o.onnx"), "--data", str(tmp_path / "d.npz")
    )
    _assert_one_line_error(proc, 2, "input\\nerror: all is fine\\x1b[2J")
    _no_raw_controls(proc)


# -- 4. bad input is exit 2 and one line, never an internal error ---------------------------
def _tiny(
    tmp_path: Path, body: str = "y = Relu (x)", dims: str = "N, 4", name: str = "m.onnx"
) -> Path:
    from tests.helpers import make_model

    m = make_model(
        f"""<ir_version: 8, opset_import: ["" : 17]>
g (float[{dims}] x) => (float[{dims}] y) {{ {body} }}""",
        check=False,
    )
    path = tmp_path / name
    onnx.save(m, str(path))
    return path


def test_outputs_outside_the_models_domain_on_the_data_are_a_data_problem(tmp_path):
    path = _tiny(tmp_path, "y = Log (x)")
    proc = run_cli("compress", str(path), "-o", str(tmp_path / "o.onnx"))  # random:8 has negatives
    _assert_one_line_error(proc, 2, "NaN or Inf", "give --data")


def test_names_that_are_not_utf8_are_refused(tmp_path):
    path = _tiny(tmp_path)
    m = onnx.load(str(path))
    m.graph.node[0].name = "RELUNODE"
    path.write_bytes(m.SerializeToString().replace(b"RELUNODE", b"RELU\xff\xfeDE"))
    for args in (
        ["compress", str(path), "-o", str(tmp_path / "o.onnx")],
        ["inspect", str(path), "--all"],
    ):
        _assert_one_line_error(run_cli(*args), 2, "not valid UTF-8")


@pytest.mark.parametrize("dim", [-5, 2**62])
def test_input_dims_random_data_cannot_fill(dim, tmp_path):
    path = _tiny(tmp_path)
    m = onnx.load(str(path))
    m.graph.input[0].type.tensor_type.shape.dim[1].dim_value = dim
    onnx.save(m, str(path))
    _assert_one_line_error(
        run_cli("compress", str(path), "-o", str(tmp_path / "o.onnx")), 2, "random data"
    )


@pytest.mark.parametrize("n", ["10000000", "99999999999999999999"])
def test_random_data_is_capped(n, tmp_path):
    path = _tiny(tmp_path)
    proc = run_cli("compress", str(path), "-o", str(tmp_path / "o.onnx"), "--data", f"random:{n}")
    _assert_one_line_error(proc, 2, "at most random:4096")


def test_compare_runs_must_be_positive(tmp_path):
    path = _tiny(tmp_path)
    _assert_one_line_error(run_cli("compare", str(path), str(path), "--runs", "0"), 2, "--runs")


def test_a_report_that_cannot_be_written_is_one_line(user_model, tmp_path, monkeypatch, capsys):
    import errno

    from onnxshrink import atomic as shrink_io

    def full(*_a, **_k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    real = shrink_io.atomic_text
    monkeypatch.setattr(shrink_io.os, "fdopen", full)  # the report's write fails, not the model's
    code = cli_main(
        [
            "compress",
            str(user_model),
            "-o",
            str(tmp_path / "o.onnx"),
            "--report",
            str(tmp_path / "r.json"),
            "-q",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "No space left on device" in err[0], err
    assert real is shrink_io.atomic_text and not list(
        tmp_path.glob(".r.json*")
    )  # no temporary left


def test_pillow_decompression_bomb_warning_stays_off_stderr(tmp_path, monkeypatch, recwarn):
    from PIL import Image

    from onnxshrink.data import input_specs, load_data
    from tests.helpers import make_model

    folder = tmp_path / "img"
    folder.mkdir()
    Image.new("RGB", (64, 48), (200, 10, 10)).save(folder / "a.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)  # 3,072 pixels: "a bomb" (warning, < 2x)
    import onnx_ir as ir

    m = make_model("""<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 3, 16, 16] x) => (float[N, 3, 16, 16] y) { y = Relu (x) }""")
    data = load_data(str(folder), input_specs(ir.from_proto(m)))
    assert data.n_samples == 1
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]


# -- 5. memory bounded by what is used --------------------------------------------------------
def _npz_claiming(path: Path, key: str, shape: tuple[int, ...]) -> None:
    """A .npz whose ``key`` header claims ``shape`` (float32) with almost no data behind it."""
    import io
    import zipfile

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": "<f4", "fortran_order": False, "shape": shape}
    )
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr(f"{key}.npy", buf.getvalue() + b"\0" * 64)


@pytest.mark.parametrize(
    "shape, needle", [((30_000_000, 1, 32, 32), "GiB of arrays"), ((3, 8, 8), "got shape")]
)
def test_npz_headers_are_checked_before_decompressing(shape, needle, user_model, tmp_path):
    data = tmp_path / "bomb.npz"
    _npz_claiming(data, "input", shape)
    proc = run_cli("compress", str(user_model), "-o", str(tmp_path / "o.onnx"), "--data", str(data))
    _assert_one_line_error(proc, 2, needle)


def test_image_folder_reads_a_bounded_number_of_regular_files(tmp_path):
    from PIL import Image

    from onnxshrink.images import MAX_IMAGES

    folder = tmp_path / "img"
    folder.mkdir()
    for i in range(MAX_IMAGES + 40):
        Image.new("RGB", (20, 20), (i % 256, 0, 0)).save(folder / f"{i:05d}.png")
    os.mkfifo(folder / "a.png")  # reading it would block forever
    path = _tiny(tmp_path, dims="N, 3, 16, 16")
    proc = run_cli(
        "compress",
        str(path),
        "-o",
        str(tmp_path / "o.onnx"),
        "--data",
        str(folder),
        "--report",
        str(tmp_path / "r.json"),
        "-q",
    )
    assert proc.returncode == 0, proc.stderr
    import json

    notes = json.loads((tmp_path / "r.json").read_text())["notes"]
    assert any(f"{MAX_IMAGES} of its {MAX_IMAGES + 40} images used" in n for n in notes), notes


# -- 8. small breakages ------------------------------------------------------------------------
def test_a_closed_pipe_ends_quietly(digits_model):
    import subprocess
    import sys

    for args in (["inspect", str(digits_model), "--json"], ["passes", "--json"]):
        p = subprocess.Popen(
            [sys.executable, "-m", "onnxshrink", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        p.stdout.close()  # like `| head -0`: the reader is gone before the first line
        err = p.stderr.read().decode()
        assert p.wait(timeout=120) == 0 and err == "", err


def test_a_single_spec_string_is_one_pass(digits_model):
    import onnxshrink

    _, rep = onnxshrink.compress(onnx.load(str(digits_model)), "fold-batchnorm")
    assert [p.name for p in rep.passes] == ["fold-batchnorm"]


def test_data_of_another_float_width_is_converted_and_noted(user_model, tmp_path, digits_calib):
    x = np.load(digits_calib)["input"].astype(np.float64)
    np.save(tmp_path / "x.npy", x)
    proc = run_cli(
        "compress",
        str(user_model),
        "-o",
        str(tmp_path / "o.onnx"),
        "--data",
        str(tmp_path / "x.npy"),
        "--report",
        str(tmp_path / "r.json"),
        "-q",
    )
    assert proc.returncode == 0, proc.stderr
    import json

    notes = json.loads((tmp_path / "r.json").read_text())["notes"]
    assert any("given as float64, converted to float32" in n for n in notes), notes
    np.save(tmp_path / "i.npy", x.astype(np.int64))
    proc = run_cli(
        "compress",
        str(user_model),
        "-o",
        str(tmp_path / "o.onnx"),
        "--data",
        str(tmp_path / "i.npy"),
    )
    _assert_one_line_error(proc, 2, "got dtype int64")


# -- 6. nothing torn, nothing left behind ---------------------------------------------------
def test_leftovers_of_a_killed_run_are_removed_by_the_next(user_model, tmp_path):
    out = tmp_path / "o.onnx"
    dead = tmp_path / ".o.onnx.99999999.abc.tmp"  # no such process
    dead.mkdir()
    (dead / "o.onnx.data").write_bytes(b"\0" * 1024)
    alive = tmp_path / f".o.onnx.{os.getpid()}.def.tmp"  # a run still writing: left alone
    alive.mkdir()
    proc = run_cli("compress", str(user_model), "-o", str(out), "-q")
    assert proc.returncode == 0, proc.stderr
    assert not dead.exists() and alive.exists() and out.exists()


# -- 9. messages ----------------------------------------------------------------------------
def test_verbose_shows_where_a_pass_raised_and_reasons_are_whole(
    user_model, tmp_path, monkeypatch, capsys
):
    import dataclasses
    from typing import ClassVar

    from onnxshrink.passes import REGISTRY
    from onnxshrink.passes.base import ShrinkPass

    @dataclasses.dataclass
    class Raises(ShrinkPass):
        name: ClassVar[str] = "test-raises"

        def call(self, model):
            raise RuntimeError("the first line ends here:\n  and the part that says what to do")

    monkeypatch.setitem(REGISTRY, "test-raises", Raises)
    code = cli_main(
        [
            "compress",
            str(user_model),
            "-o",
            str(tmp_path / "o.onnx"),
            "-p",
            "test-raises",
            "--verbose",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "the first line ends here: and the part that says what to do" in out
    assert "Traceback (most recent call last)" in out and "in call" in out


def test_a_model_no_pass_changed_is_written_byte_identical(tmp_path):
    path = _tiny(tmp_path)
    out = tmp_path / "o.onnx"
    proc = run_cli(
        "compress", str(path), "-o", str(out), "--report", str(tmp_path / "r.json"), "-q"
    )
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes() == path.read_bytes()
    import json

    assert "the output is a copy of the input" in " ".join(
        json.loads((tmp_path / "r.json").read_text())["notes"]
    )


def test_a_rolled_back_rewrite_of_every_external_weight_still_writes_the_data(tmp_path):
    """The input is judged 'split in files' as it was loaded, not after a pass rewrote its only
    weight in place and was rolled back: a copy of the .onnx alone would miss its data file."""
    from onnx import TensorProto as T
    from onnx import helper as h

    import onnxshrink
    from tests.helpers import ort_run

    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    w = np.random.default_rng(0).standard_normal((128, 128)).astype(np.float32)
    graph = h.make_graph(
        [h.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
        [h.make_tensor_value_info("x", T.FLOAT, ["n", 128])],
        [h.make_tensor_value_info("y", T.FLOAT, ["n", 128])],
        [onnx.numpy_helper.from_array(w, "w")],
    )  # fmt: skip
    path, out = tmp_path / "in" / "m.onnx", tmp_path / "out" / "o.onnx"
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 21)])
    onnx.save(model, str(path), save_as_external_data=True, location="m.bin", size_threshold=0)
    _, report = onnxshrink.compress(
        path, ["quantize-weights:floor=0.999999"], data="random:16", output=out
    )
    assert report.passes[0].status == "rolled-back"  # 4-bit keeps cosine ~0.997 here
    x = np.ones((1, 128), np.float32)
    np.testing.assert_allclose(ort_run(str(out), {"x": x})[0], x @ w, rtol=1e-5, atol=1e-4)


# -- 7. nothing hangs ------------------------------------------------------------------------
def _endless_loop(path: Path) -> Path:
    from onnx import TensorProto as T
    from onnx import helper as h

    body = h.make_graph(
        [
            h.make_node("Add", ["x_in", "one"], ["x_out"]),
            h.make_node("Identity", ["cond_in"], ["cond_out"]),
        ],
        "body",
        [
            h.make_tensor_value_info("i", T.INT64, []),
            h.make_tensor_value_info("cond_in", T.BOOL, []),
            h.make_tensor_value_info("x_in", T.FLOAT, [None, 4]),
        ],
        [
            h.make_tensor_value_info("cond_out", T.BOOL, []),
            h.make_tensor_value_info("x_out", T.FLOAT, [None, 4]),
        ],
        [h.make_tensor("one", T.FLOAT, [], [1.0])],
    )
    g = h.make_graph(
        [h.make_node("Loop", ["M", "", "x"], ["y"], body=body, name="loop")],
        "g",
        [h.make_tensor_value_info("x", T.FLOAT, [None, 4])],
        [h.make_tensor_value_info("y", T.FLOAT, [None, 4])],
        [h.make_tensor("M", T.INT64, [], [10**12])],
    )
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 13)])
    m.ir_version = 8
    onnx.save(m, str(path))
    return path


@pytest.mark.parametrize("segments", [False, True], ids=["one-session", "in-segments"])
def test_a_validation_run_that_never_ends_is_stopped(tmp_path, monkeypatch, capsys, segments):
    """In one session, and one segment at a time as a model over 1 GiB runs: the bound holds
    for the whole batch through all its segments."""
    import time

    from onnxshrink import instruments

    path = _endless_loop(tmp_path / "loop.onnx")
    monkeypatch.setattr(instruments, "ORIGINAL_BOUND", 2.0)  # 600 s by default
    if segments:
        monkeypatch.setattr(instruments, "LARGE_MODEL", -1)  # every model is "large"
    t0 = time.perf_counter()
    code = cli_main(["compress", str(path), "-o", str(tmp_path / "o.onnx"), "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        code == 2 and len(err) == 1 and "did not finish a validation batch within 2 s" in err[0]
    ), err
    assert time.perf_counter() - t0 < 60 and not (tmp_path / "o.onnx").exists()


# -- 2. constant-folding bombs --------------------------------------------------------------
def _tiled(tmp_path: Path, reps: int) -> Path:
    """A 4 KB model: a constant of 1,000 floats tiled ``reps`` times, read by a Gather."""
    from onnx import TensorProto as T
    from onnx import helper as h
    from onnx import numpy_helper as nh

    g = h.make_graph(
        [
            h.make_node("Tile", ["C", "R"], ["T"], name="tile"),
            h.make_node("Gather", ["T", "idx"], ["y"]),
        ],
        "g",
        [h.make_tensor_value_info("idx", T.INT64, ["N"])],
        [h.make_tensor_value_info("y", T.FLOAT, ["N"])],
        [
            nh.from_array(np.arange(1000, dtype=np.float32), "C"),
            nh.from_array(np.array([reps], np.int64), "R"),
        ],
    )
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    m.ir_version = 8
    path = tmp_path / f"tiled{reps}.onnx"
    onnx.save(m, str(path))
    return path


@pytest.mark.parametrize("reps", [10_000, 100_000])
def test_a_constant_folding_bomb_is_not_folded(reps, tmp_path):
    import json
    import time

    path = _tiled(tmp_path, reps)
    out = tmp_path / "o.onnx"
    t0 = time.perf_counter()
    proc = run_cli(
        "compress", str(path), "-o", str(out), "--report", str(tmp_path / "r.json"), "-q"
    )
    assert proc.returncode == 0, proc.stderr
    assert (
        time.perf_counter() - t0 < 60 and out.stat().st_size < 10_000
    )  # was 40 MB / 697 s and SIGSEGV
    simplify = json.loads((tmp_path / "r.json").read_text())["passes"][0]
    assert simplify["status"] == "unchanged"
    assert f"tile makes a constant of {reps * 1000:,} elements" in simplify["skipped"][0]["reason"]


def test_a_simplify_that_grows_the_model_is_discarded(tmp_path):
    """1,000 tiles (4 MB): below the bomb bound, above what a simplification may add."""
    import json

    path = _tiled(tmp_path, 1_000)
    proc = run_cli(
        "compress",
        str(path),
        "-o",
        str(tmp_path / "o.onnx"),
        "--report",
        str(tmp_path / "r.json"),
        "-q",
    )
    assert proc.returncode == 0, proc.stderr
    simplify = json.loads((tmp_path / "r.json").read_text())["passes"][0]
    assert simplify["status"] == "unchanged", simplify
    assert (
        "constant folding grew the model's tensors from 4,008 to 4,000,000 bytes"
        in simplify["skipped"][0]["reason"]
    )


def test_a_crash_inside_onnxsim_rolls_the_pass_back(user_model, tmp_path, monkeypatch):
    """onnxsim's worker dies by SIGSEGV while it works on the request (as onnxsim did on 10^5
    tiles): here a stand-in worker that reads the request and crashes."""
    import subprocess
    import sys

    import onnxshrink
    from onnxshrink import sandbox

    crash = "import os, signal, sys; sys.stdin.readline(); os.kill(os.getpid(), signal.SIGSEGV)"
    fake = subprocess.Popen(
        [sys.executable, "-c", crash], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    monkeypatch.setattr(sandbox, "_WORKER", fake)
    out, rep = onnxshrink.compress(
        str(user_model), ["simplify", "fold-batchnorm"], output=tmp_path / "o.onnx"
    )
    assert rep.passes[0].status == "rolled-back" and "onnxsim crashed" in rep.passes[0].reason, (
        rep.passes[0]
    )
    assert rep.passes[1].status == "applied" and out.exists()  # the compiler went on


def test_a_model_and_its_data_are_replaced_as_a_pair(external_model, tmp_path, monkeypatch, capsys):
    """A run killed between moving the new data in and the new model: the old model still reads
    its own data (it used to read the new weights); the next run removes the orphan."""
    from onnxshrink import atomic as shrink_io
    from tests.helpers import ort_run

    out = tmp_path / "out.onnx"
    x = np.random.default_rng(0).standard_normal((4, 1, 32, 32)).astype(np.float32)
    assert (
        cli_main(["compress", str(external_model), "-o", str(out), "-p", "fold-batchnorm", "-q"])
        == 0
    )
    first = ort_run(str(out), {"input": x})[0]
    (old_data,) = tmp_path.glob("out.onnx.*.data")
    real, calls = os.replace, []

    def killed_before_the_model(src, dst):
        calls.append(dst)
        if str(dst) == str(out):
            raise OSError(5, "killed")  # the data is in place, the model is not
        return real(src, dst)

    monkeypatch.setattr(shrink_io.os, "replace", killed_before_the_model)
    code = cli_main(
        ["compress", str(external_model), "-o", str(out), "-p", "prune:ratio=0.5", "-q"]
    )
    monkeypatch.setattr(shrink_io.os, "replace", real)
    assert (
        code == 2 and [Path(c).name for c in calls if Path(c).parent == tmp_path][-1] == "out.onnx"
    )
    np.testing.assert_array_equal(ort_run(str(out), {"input": x})[0], first)  # the old pair, whole
    assert len(list(tmp_path.glob("out.onnx.*.data"))) == 2  # the new run's data, orphaned
    assert (
        cli_main(["compress", str(external_model), "-o", str(out), "-p", "prune:ratio=0.5", "-q"])
        == 0
    )
    (data,) = tmp_path.glob("out.onnx.*.data")  # only the data the new model names
    assert data != old_data and not np.array_equal(ort_run(str(out), {"input": x})[0], first)
    capsys.readouterr()

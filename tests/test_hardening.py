"""Hostile and careless input through the CLI, as a user (or an attacker) meets it: nothing the
command writes may replace what it reads, names are text, bad input is one line and exit 2."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import onnx
import pytest

from tests.test_cli import _assert_one_line_error, run_cli


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
    onnx.save(m, str(folder / "model.onnx"), save_as_external_data=True,
              all_tensors_to_one_file=True, location="weights.bin", size_threshold=0)
    return folder / "model.onnx"


def _snapshot(*paths: Path) -> dict[Path, bytes | None]:
    return {p: p.read_bytes() if p.is_file() else None for p in paths}


# -- 1. every file the command writes is checked before anything is written ----------------
@pytest.mark.parametrize("report_at", ["input", "input-data", "output", "other-report"])
def test_reports_never_replace_the_input_or_the_output(report_at, external_model, tmp_path):
    out = tmp_path / "out.onnx"
    data = external_model.parent / "weights.bin"
    html = tmp_path / "r.html"
    target = {"input": external_model, "input-data": data, "output": out,
              "other-report": html}[report_at]
    before = _snapshot(external_model, data, out, html)
    proc = run_cli("compress", str(external_model), "-o", str(out), "--report", str(target),
                   "--report-html", str(html), "-q")
    _assert_one_line_error(proc, 2, "would overwrite")
    assert _snapshot(external_model, data, out, html) == before  # nothing written, nothing replaced


def test_report_into_a_missing_folder_is_refused_before_the_model_is_written(user_model, tmp_path):
    out = tmp_path / "out.onnx"
    proc = run_cli("compress", str(user_model), "-o", str(out),
                   "--report", str(tmp_path / "no" / "r.json"))
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
_HOSTILE = ["conv[/x]", "[bold]b\x1b[31mred\x1b]0;title\x07", "conv$\\frac{$", "two\nlines\u202egnp.exe"]


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
    proc = run_cli("compress", str(path), "-o", str(out), "-p", "quantize", "--data", str(digits_calib),
                   "--report-html", str(html), "--verbose")
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
    proc = run_cli("compress", str(path), "-o", str(tmp_path / "o.onnx"), "--data", str(tmp_path / "d.npz"))
    _assert_one_line_error(proc, 2, "input\\nerror: all is fine\\x1b[2J")
    _no_raw_controls(proc)

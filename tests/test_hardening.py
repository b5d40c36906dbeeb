"""Hostile and careless input through the CLI, as a user (or an attacker) meets it: nothing the
command writes may replace what it reads, names are text, bad input is one line and exit 2."""

from __future__ import annotations

import os
import stat
from pathlib import Path

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


"""The README's two set-up commands stay true: CI runs exactly the second one."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = text.split("```bash", 1)[1].split("```", 1)[0]
    return [line.strip() for line in block.strip().splitlines()]


def test_two_commands_and_ci_runs_the_test_one():
    install_and_run, test = _commands()
    assert "onnxshrink compress models/fixtures/" in install_and_run
    assert "pytest" in test
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test in [line.strip() for line in ci]


def test_default_model_is_committed():
    install_and_run, _ = _commands()
    for word in install_and_run.split():
        if word.startswith("models/fixtures/"):
            assert (ROOT / word).exists(), word

"""The module layers hold: passes measure through onnxshrink.search, modules stay small."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "onnxshrink"


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


def test_no_pass_imports_validate_or_runtime():
    banned = {"onnxshrink.validate", "onnxshrink.runtime"}
    offenders = {
        str(p.relative_to(PACKAGE)): sorted(_imports(p) & banned)
        for p in (PACKAGE / "passes").rglob("*.py")
        if _imports(p) & banned
    }
    assert offenders == {}


def test_quantization_steps_are_small_modules():
    sizes = {
        p.name: len(p.read_text().splitlines())
        for p in (PACKAGE / "passes" / "quantize").glob("*.py")
    }
    assert len(sizes) >= 8 and max(sizes.values()) <= 250, sizes

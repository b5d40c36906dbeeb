"""The pass catalog: every pass's name, kind, description and options, for ``onnxshrink passes``.

Listing passes from their classes imports onnx_ir (sympy, ml_dtypes: about 2 s); the list is
kept in ``catalog.json`` beside this module instead, so ``onnxshrink passes`` starts like
``--help``. :func:`rows` builds it from the registry; a test keeps the file equal to it, and
``python -m onnxshrink.catalog`` rewrites the file after a pass or an option changes.
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["CATALOG", "load", "rows"]

CATALOG = Path(__file__).with_name("catalog.json")


def rows() -> list[dict]:
    """One row per registered pass, from the classes (imports every pass)."""
    from onnxshrink.passes import DEFAULT_PIPELINE, REGISTRY
    from onnxshrink.passes.base import option_fields

    out = []
    for name, cls in REGISTRY.items():
        opts = []
        for f in option_fields(cls):
            default = f.default if f.default is not f.default_factory else None  # type: ignore[comparison-overlap]
            opts.append(
                {
                    "name": f.name.rstrip("_").replace("_", "-"),
                    "type": str(f.type),
                    "default": default,
                }
            )
        out.append(
            {
                "name": name,
                "kind": "lossy" if cls.lossy else "exact",
                "data": cls.needs_data,
                "default": name in DEFAULT_PIPELINE,
                "description": cls.describe(),
                "options": opts,
            }
        )
    return json.loads(json.dumps(out, default=str))  # as the file holds them


def load() -> list[dict]:
    """The rows as ``catalog.json`` holds them (no pass imported)."""
    return json.loads(CATALOG.read_text(encoding="utf-8"))


if __name__ == "__main__":
    CATALOG.write_text(json.dumps(rows(), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {CATALOG}")

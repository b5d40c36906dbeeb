"""The lossy passes write the bytes recorded in tests/golden.json (see tests/golden.py)."""

from __future__ import annotations

import json

import pytest

from tests import golden


@pytest.mark.slow
def test_outputs_match_the_recorded_bytes():
    table = json.loads(golden.HASHES.read_text())
    key = golden.machine_key()
    if key not in table:
        pytest.skip(
            f"no golden outputs recorded for this kind of machine ({key}; recorded: "
            f"{', '.join(sorted(table))}): see tests/golden.py"
        )
    expected = table[key]
    assert set(expected) == {f"{m}/{c}" for m in ("digits", "resnet") for c, _ in golden.CASES}
    assert all(v.endswith(" applied") for v in expected.values())  # every case does something
    found = golden.outputs()
    assert {k: v for k, v in found.items() if v != expected[k]} == {}

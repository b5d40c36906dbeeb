"""Per-layer results a pass reuses when it is re-run on the same model: partial application's tries.

Partial application (:mod:`onnxshrink.degrade`) re-runs a pass up to ``TRIES`` times, each time
sparing another set of layers; every layer it does compress gets the same result each time (the
same weight, the same calibration statistics from the same model before the pass). A pass that
stores a layer's arrays here gets them back on a re-run instead of computing them again: on a
decoder with Hessian-aware rounding that is minutes per try. The arrays wait on disk in the
run's workdir (not another set of weights in memory). The key is the pass's name, its options
but ``skip``, and the layer; the pipeline clears the memo after each pass, so no result outlives
the model it was computed on.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["Memo", "known", "recall", "remember"]


class Memo:
    """Arrays and a small note per key, the arrays in ``folder``."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._index: dict[str, tuple[Path, Any]] = {}

    def get(self, key: str) -> tuple[list[np.ndarray], Any] | None:
        if (found := self._index.get(key)) is None:
            return None
        path, note = found
        with np.load(path) as z:
            return [z[f"a{i}"] for i in range(len(z.files))], note

    def put(self, key: str, arrays: list[np.ndarray], note: Any = None) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{len(self._index)}.npz"
        np.savez(path, **{f"a{i}": a for i, a in enumerate(arrays)})
        self._index[key] = (path, note)

    def __contains__(self, key: str) -> bool:
        return key in self._index

    def clear(self) -> None:
        self._index.clear()
        shutil.rmtree(self.folder, ignore_errors=True)


def _key(p, layer: str) -> str:
    options = {k: v for k, v in p.options().items() if k != "skip"}
    return json.dumps([p.name, options, layer], sort_keys=True, default=str)


def _memo(p) -> Memo | None:
    return p.context.memo


def recall(p, layer: str) -> tuple[list[np.ndarray], Any] | None:
    """What pass ``p`` stored for ``layer`` earlier on this model, or None."""
    memo = _memo(p)
    return memo.get(_key(p, layer)) if memo is not None else None


def known(p, layer: str) -> bool:
    """Whether :func:`recall` has ``layer``'s result (without reading it)."""
    memo = _memo(p)
    return memo is not None and _key(p, layer) in memo


def remember(p, layer: str, arrays: list[np.ndarray], note: Any = None) -> None:
    """Stores ``layer``'s result of pass ``p`` for its re-runs (nothing without a memo)."""
    if (memo := _memo(p)) is not None:
        memo.put(_key(p, layer), arrays, note)

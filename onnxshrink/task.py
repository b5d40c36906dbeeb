"""A user's task metric: how well a candidate model's outputs serve the task, in [0, 1].

``metric(reference, candidate) -> float``: both are ``{output name: array}`` on the same
validation samples (batches joined along axis 0), the reference from the original model (or the
model before a pass); 1 means as good as the reference. Given (``--metric module:function`` or a
callable), it replaces the cosine wherever a floor is judged: each lossy pass's floor, partial
application (:mod:`onnxshrink.degrade`) and ``--target``'s drop = 1 − metric. ``module`` may be
an importable module or a ``.py`` file path.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from onnxshrink.errors import OptionError, first_line

__all__ = ["Metric", "joined", "load_metric", "score"]

Metric = Callable[[dict, dict], float]


def load_metric(spec: str | Metric) -> Metric:
    """The callable ``spec`` names (``module:function`` or ``path.py:function``); a callable as
    is. One-line :class:`OptionError` for anything else."""
    if callable(spec):
        return spec
    where, _, name = str(spec).rpartition(":")
    if not where or not name:
        raise OptionError(f"--metric: expected MODULE:FUNCTION or FILE.py:FUNCTION, got '{spec}'")
    try:
        if where.endswith(".py"):
            if not Path(where).is_file():
                raise OptionError(f"--metric: no file '{where}'")
            loader = importlib.util.spec_from_file_location(Path(where).stem, where)
            module = importlib.util.module_from_spec(loader)
            loader.loader.exec_module(module)
        else:  # the user's module, beside them: the current folder first, as `python -m` does
            if os.getcwd() not in sys.path:
                sys.path.insert(0, os.getcwd())
            module = importlib.import_module(where)
    except OptionError:
        raise
    except Exception as e:  # the user's module failed to import: say how, in one line
        raise OptionError(f"--metric: cannot import '{where}': {first_line(e)}") from e
    fn = getattr(module, name, None)
    if not callable(fn):
        raise OptionError(f"--metric: '{where}' has no function '{name}'")
    return fn


def joined(outputs: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Per-batch outputs as one array per output (joined along axis 0; rank-0 ones stacked)."""
    if not outputs:
        return {}
    out = {}
    for name in outputs[0]:
        parts = [np.asarray(b[name]) for b in outputs]
        out[name] = np.concatenate(parts) if parts[0].ndim else np.stack(parts)
    return out


def score(metric: Metric, reference: list[dict], candidate: list[dict]) -> float:
    """``metric`` on two models' per-batch outputs; a ValueError names a result not in [0, 1]."""
    value = metric(joined(reference), joined(candidate))
    try:
        value = float(value)
    except (TypeError, ValueError) as e:
        raise ValueError(f"the task metric returned {type(value).__name__}, not a number") from e
    if not math.isfinite(value) or not -1e-9 <= value <= 1.0 + 1e-9:
        raise ValueError(f"the task metric returned {value}: it must be in [0, 1] (1: as good)")
    return min(max(value, 0.0), 1.0)

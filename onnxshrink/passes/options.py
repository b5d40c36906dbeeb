"""Options several passes share, declared once with their ranges and checked in one place.

A pass declares a shared option with a factory below and its own default (``floor: float |
None = options.floor(0.9)``); :meth:`ShrinkPass.__post_init__` calls :func:`check`, which tests
every declared range and the pass's ``one_of`` group (at most one of them set). The groups:

* layer selection -- ``skip`` / ``only``: node names (``exclude``, the old name, reads as skip);
* re-fit -- ``refit`` (None: with real data), ``ridge`` ≥ 0, ``samples`` ≥ 1;
* rank choice -- ``rank`` and ``energy`` in (0, 1], ``speedup`` > 1, ``target-macs`` in (0, 1);
* fidelity -- ``floor`` in [0, 1] (None: no floor), ``min-fidelity`` in (0, 1];
* training -- :func:`positive` (> 0: a step size, seconds), :func:`count` (iterations, batch).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from onnxshrink.errors import OptionError

__all__ = [
    "ALIASES",
    "check",
    "count",
    "floor",
    "layers",
    "positive",
    "ridge",
    "samples",
    "share",
    "speedup",
]

ALIASES = {"exclude": "skip"}  # old option name -> its name now


def _ranged(default: Any, test: Callable[[Any], bool], rule: str) -> Any:
    """A field whose value, when not None, must pass ``test`` (``rule`` says how)."""
    return dataclasses.field(default=default, metadata={"test": test, "rule": rule})


def layers() -> Any:
    """Node names (``skip``, ``only``)."""
    return dataclasses.field(default=())


def floor(default: float | None) -> Any:
    return _ranged(default, lambda v: 0.0 <= v <= 1.0, "in [0, 1]")


def ridge(default: float = 1e-3) -> Any:
    return _ranged(default, lambda v: v >= 0.0, ">= 0")


def samples(default: int = 128, least: int = 1) -> Any:
    return _ranged(default, lambda v: v >= least, f">= {least}")


def share(default: float | None = None, *, closed: bool = True) -> Any:
    """A share of something: in (0, 1] (``closed``) or (0, 1)."""
    if closed:
        return _ranged(default, lambda v: 0.0 < v <= 1.0, "in (0, 1]")
    return _ranged(default, lambda v: 0.0 < v < 1.0, "in (0, 1)")


def speedup(default: float | None = None) -> Any:
    return _ranged(default, lambda v: v > 1.0, "> 1")


def positive(default: float | None) -> Any:
    """A float > 0 (a step size, seconds)."""
    return _ranged(default, lambda v: v > 0.0, "> 0")


def count(default: int, least: int = 1) -> Any:
    """An int >= ``least`` (iterations, a batch size)."""
    return _ranged(default, lambda v: v >= least, f">= {least}")


def check(p: Any) -> None:
    """Raises :class:`OptionError` for the first option of ``p`` out of its range, or when more
    than one of ``p.one_of`` is set."""
    for f in dataclasses.fields(p):
        value, test = getattr(p, f.name), f.metadata.get("test")
        if test is not None and value is not None and not test(value):
            key = f.name.rstrip("_").replace("_", "-")
            raise OptionError(f"pass '{p.name}': {key} must be {f.metadata['rule']}, got {value}")
    chosen = [k for k in p.one_of if getattr(p, k) not in (None, False)]
    if len(chosen) > 1:
        keys = ", ".join(k.replace("_", "-") for k in p.one_of)
        raise OptionError(f"pass '{p.name}': give one of {keys}")

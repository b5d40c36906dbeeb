"""Where compile time goes: named phases, timed across a run.

``with phase("shape inference"):`` adds the block's wall time (and one call) to that phase's
total. Phases nest: a session opened inside a calibration step counts in both, so totals are
read per phase, not summed. :func:`totals` and :func:`reset` are for ``bench/compile_time.py``
(one run per process); the cost when nobody reads them is two ``perf_counter`` calls a block.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Iterator

__all__ = ["phase", "reset", "timed", "totals"]

_totals: dict[str, list[float]] = {}  # phase -> [seconds, calls]


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    """Times the block as part of phase ``name``."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        entry = _totals.setdefault(name, [0.0, 0])
        entry[0] += time.perf_counter() - t0
        entry[1] += 1


def timed(name: str):
    """Decorator: every call of the function is timed as part of phase ``name``."""

    def wrap(fn):
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            with phase(name):
                return fn(*args, **kwargs)

        return inner

    return wrap


def totals() -> dict[str, tuple[float, int]]:
    """Phase -> (seconds, calls) since the last :func:`reset`."""
    return {name: (seconds, int(calls)) for name, (seconds, calls) in _totals.items()}


def reset() -> None:
    _totals.clear()

"""Which layers to spare (leave uncompressed) so a model reaches a fidelity floor.

Greedy on a sensitivity order: the most sensitive layer is spared first, the whole model is
re-measured after each, and the search stops at the first set that reaches the floor (or after
``limit`` layers). With f(S) the fidelity with the layers S spared: S_0 = ∅,
S_k = S_{k-1} ∪ {order[k]}, stop at the first k with f(S_k) ≥ floor.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

__all__ = ["spare_until"]


def spare_until(
    order: Sequence[str],
    fidelity: Callable[[set[str]], float],
    floor: float,
    limit: int | None = None,
) -> tuple[list[str], float | None]:
    """(the layers spared, in order; the fidelity with them spared -- None when none was tried)."""
    spared: list[str] = []
    current = None
    for name in order[:limit]:
        spared.append(name)
        current = fidelity(set(spared))
        if current >= floor:
            break
    return spared, current


def fewest(most: int, holds: Callable[[int], bool], first: int, tries: int) -> int | None:
    """The smallest k in 1..most found with ``holds(k)`` within ``tries`` calls, from ``first``.

    ``holds`` is taken as monotone (sparing more layers never lowers fidelity) and false at 0
    (the full pass failed): a failing k doubles (a passing one bisects) the interval (lo, hi].
    None when no call held.
    """
    lo, hi, k = 0, None, min(max(first, 1), most)
    for _ in range(tries):
        if holds(k):
            hi = k
        else:
            lo = k
        if hi is None:
            if lo >= most:
                break
            k = min(most, 2 * k)
        else:
            if hi - lo <= 1:
                break
            k = (lo + hi) // 2
    return hi

"""Spending a budget across layers: the greedy that takes the least damage per unit saved.

Each item (a layer, a channel group, a layer under one method) offers levels of compression in
order, each with a cumulative saving s_i (MACs, bytes, ms, channels) and cost c_i (drop, energy
lost). From an item's current level i the step goes to the level j > i on the lower convex hull
of its points (the origin first), i.e. the least (c_j − c_i) / (s_j − s_i); across items the
cheapest step is taken until Σ saving ≥ need. Items sharing a ``group`` (one layer's methods)
exclude each other: once one is chosen the others are no longer offered. With ``finish``, the
last step is the least damaging one that alone completes the need, so a big step that is cheap
per unit does not overshoot when a small one suffices. A level that saves no more than an
earlier one is never taken.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
from collections.abc import Hashable, Sequence

__all__ = ["Curve", "allocate"]


@dataclasses.dataclass
class Curve:
    """One item's levels, in order: cumulative ``savings`` and ``costs`` (same length)."""

    key: Hashable
    savings: Sequence[float]
    costs: Sequence[float]
    group: Hashable = None  # items of one group exclude each other (None: its own group)


def _hull(curve: Curve) -> list[int]:
    """Indices of the levels on the lower convex hull of (saving, cost), origin excluded."""
    pts: list[tuple[float, float, int]] = [(0.0, 0.0, -1)]
    for i, (s, c) in enumerate(zip(curve.savings, curve.costs)):
        if s <= pts[-1][0]:  # saves no more than a level before it
            continue
        while len(pts) >= 2:
            (s0, c0, _), (s1, c1, _) = pts[-2], pts[-1]
            above, chord = (c1 - c0) * (s - s0), (c - c0) * (s1 - s0)
            # the middle point above the chord (strictly: equal steps stay separate steps)
            if above > chord + 1e-12 * (abs(above) + abs(chord)):
                pts.pop()
            else:
                break
        pts.append((s, c, i))
    return [i for _, _, i in pts[1:]]


def allocate(
    curves: Sequence[Curve], need: float, *, finish: bool = False
) -> tuple[dict[Hashable, int], float]:
    """(the chosen level index per item key, the total saving); nothing when ``need`` ≤ 0."""
    hulls = [_hull(c) for c in curves]
    pos = [-1] * len(curves)  # position on the hull (-1: not chosen)
    taken: dict[Hashable, int] = {}  # group -> the item chosen in it

    def group(k: int) -> Hashable:
        return curves[k].group if curves[k].group is not None else ("item", k)

    def step(k: int) -> tuple[float, float] | None:
        """(Δsaving, Δcost) of item k's next step, None if it has none."""
        p = pos[k] + 1
        if p >= len(hulls[k]) or taken.get(group(k), k) != k:
            return None
        j, i = hulls[k][p], (hulls[k][pos[k]] if pos[k] >= 0 else None)
        s0, c0 = (curves[k].savings[i], curves[k].costs[i]) if i is not None else (0.0, 0.0)
        return curves[k].savings[j] - s0, curves[k].costs[j] - c0

    heap = []
    for k in range(len(curves)):
        if (d := step(k)) is not None:
            heapq.heappush(heap, (d[1] / d[0], k, pos[k]))
    saved = 0.0
    while saved < need and heap:
        k = None
        if finish:  # the least damaging step that alone completes the need, if any
            best = math.inf
            for kk in range(len(curves)):
                d = step(kk)
                if d is not None and d[0] >= need - saved and d[1] < best:
                    k, best = kk, d[1]
        while k is None and heap:
            _, kk, at = heapq.heappop(heap)
            if at == pos[kk] and step(kk) is not None:  # not stale
                k = kk
        if k is None:
            break
        d = step(k)
        saved += d[0]
        pos[k] += 1
        taken[group(k)] = k
        if (nxt := step(k)) is not None:
            heapq.heappush(heap, (nxt[1] / nxt[0], k, pos[k]))
    chosen = {curves[k].key: hulls[k][p] for k, p in enumerate(pos) if p >= 0}
    return chosen, saved

"""The search layer's budget allocation (:func:`onnxshrink.search.allocate`)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from onnxshrink.search import Curve, allocate
from onnxshrink.search.allocate import _hull


def test_hull_skips_levels_above_the_chord_and_levels_that_save_nothing_more():
    c = Curve("a", [1, 2, 3, 3, 4], [0.1, 0.5, 0.6, 0.0, 2.0])
    assert _hull(c) == [0, 2, 4]  # level 1 lies above the chord 0 -> 2; level 3 saves no more
    equal_steps = Curve("u", [1, 2, 3], [0.25, 0.5, 0.75])
    assert _hull(equal_steps) == [0, 1, 2]  # collinear steps stay separate: no overshoot


def test_groups_exclude_each_other_and_finish_takes_the_least_damaging_sufficient_step():
    a, b = Curve("a", [1, 2, 3], [0.1, 0.3, 0.9], "L"), Curve("b", [2, 4], [0.1, 1.0], "L")
    assert allocate([a, b], 3) == ({"b": 1}, 4.0)  # b cheaper per unit; a then not offered
    big, small = Curve("x", [10], [0.5]), Curve("y", [1, 2], [0.01, 0.3])
    assert allocate([big, small], 1.5) == ({"x": 0, "y": 0}, 11.0)
    assert allocate([big, small], 1.5, finish=True) == ({"x": 0}, 10.0)
    assert allocate([big, small], 0) == ({}, 0.0)


def test_greedy_is_optimal_on_convex_unit_step_curves():
    """With convex costs in unit steps, the k cheapest marginal steps are the best way to save k
    units: the allocation's cost equals the brute-force minimum for every k."""
    rng = np.random.default_rng(0)
    for _ in range(20):
        curves = [Curve(i, np.arange(1, 5.0), np.cumsum(np.sort(rng.random(4)))) for i in range(3)]
        for need in range(1, 13):
            chosen, saved = allocate(curves, need)
            assert saved == need
            cost = sum(curves[k].costs[i] for k, i in chosen.items())
            best = min(
                sum(c.costs[n - 1] for c, n in zip(curves, ns) if n)
                for ns in itertools.product(range(5), repeat=3)
                if sum(ns) == need
            )
            assert cost == pytest.approx(best)

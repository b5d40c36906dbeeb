"""The sensitivity candidates measured by two worker processes (:mod:`onnxshrink.target.pool`):
the same figures as measured here, cached under the caller's key, in order, and measured here
when a worker dies."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from onnxshrink import io
from onnxshrink.data import input_specs, load_data
from onnxshrink.target import pool
from onnxshrink.target.candidates import Sensitivity, candidates, node_times
from onnxshrink.target.kinds import Target

FOREVER = 1e12


@pytest.fixture
def setup(digits_model, digits_calib, tmp_path):
    model = io.load(str(digits_model)).model
    data = load_data(str(digits_calib), input_specs(model))
    path = tmp_path / "base.onnx"
    io.write(model, path)
    times, _ = node_times(path, data)
    todo = candidates(model, Target.parse("macs=0.5"))[:12]
    assert len(todo) >= pool.MIN_POOLED + 3

    def sens(cache):
        return Sensitivity(model, data, tmp_path, 16, data.input_shapes(), times, cache)

    return sens, todo, path


def test_two_workers_measure_what_one_process_does(setup, tmp_path, monkeypatch):
    sens, todo, path = setup
    here = pool.measure_all(sens(None), todo, path, time.monotonic() + FOREVER, lambda: None, 1)
    ticks, in_this_process = [], []
    measure = Sensitivity.measure
    monkeypatch.setattr(
        Sensitivity, "measure", lambda s, c: in_this_process.append(c) or measure(s, c)
    )
    cached = sens(tmp_path / "cache")
    two = pool.measure_all(
        cached, todo, path, time.monotonic() + FOREVER, lambda: ticks.append(1), 2
    )
    assert [c.label for c in two] == [c.label for c in here] == [c.label for c in todo]
    assert len(ticks) == len(todo)
    assert not in_this_process  # the workers measured every one
    for a, b in zip(here, two):
        assert a.applied == b.applied and a.macs_saved == b.macs_saved
        assert abs(a.drop - b.drop) < 1e-6
    assert any(c.drop > 1e-4 for c in two)  # real measurements, not zeros
    # the workers cached under the caller's key: a second call finds every one
    assert all(cached.cached(c) is not None for c in todo)


def test_a_dead_worker_leaves_its_candidates_to_this_process(setup, monkeypatch):
    sens, todo, path = setup
    real = subprocess.Popen

    def dying(cmd, **kw):  # a worker that exits at once
        return real([sys.executable, "-c", "pass"], **kw)

    monkeypatch.setattr(pool.subprocess, "Popen", dying)
    got = pool.measure_all(sens(None), todo, path, time.monotonic() + FOREVER, lambda: None, 2)
    assert [c.label for c in got] == [c.label for c in todo]
    assert any(c.drop > 1e-4 for c in got)


def test_past_the_stop_time_only_cached_candidates_are_read(setup, tmp_path):
    sens, todo, path = setup
    cache = tmp_path / "cache"
    first = sens(cache)
    pool.measure_all(first, todo[:3], path, time.monotonic() + FOREVER, lambda: None, 1)
    got = pool.measure_all(sens(cache), todo, path, time.monotonic() - 1, lambda: None, 2)
    assert [c.label for c in got] == [c.label for c in todo[:3]]

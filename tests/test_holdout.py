"""Held-out samples: the tail (whole groups when the data names them) or a spread share."""

from __future__ import annotations

import numpy as np
import pytest

import onnxshrink
from onnxshrink import holdout
from onnxshrink.data import load_data
from onnxshrink.errors import DataError
from tests.test_data import _specs


def test_without_groups_the_tail_and_the_spread_hold_out_single_samples():
    assert np.flatnonzero(holdout.tail(20, 0.25)).tolist() == [15, 16, 17, 18, 19]
    assert np.flatnonzero(holdout.spread(20, 0.25)).tolist() == [0, 5, 10, 14, 19]
    one = np.zeros(20, int)  # one group alone cannot be split: samples one by one
    assert np.flatnonzero(holdout.tail(20, 0.25, one)).tolist() == [15, 16, 17, 18, 19]
    assert holdout.tail(2, 0.99).sum() == 1 and holdout.spread(2, 0.01).sum() == 1


def test_the_tail_takes_whole_groups_from_the_end_while_the_count_gets_nearer():
    groups = np.arange(40) // 7  # six groups of 7, the last of 5
    held = holdout.tail(40, 0.25, groups)  # 10 wanted: 5 + 7 is nearer than 5 or 19
    assert np.flatnonzero(held).tolist() == list(range(28, 40))
    assert np.flatnonzero(holdout.tail(40, 0.1, groups)).tolist() == list(range(35, 40))
    # labels need not be contiguous: the group whose last sample comes last goes first
    mixed = np.array(["a", "b", "a", "b", "c", "c"])
    assert np.flatnonzero(holdout.tail(6, 0.34, mixed)).tolist() == [4, 5]
    # one group is always left to fit, however large the share
    assert np.flatnonzero(holdout.tail(10, 0.95, np.array([0] + [1] * 9))).tolist() == list(
        range(1, 10)
    )


def test_groups_in_a_data_file_are_checked_and_kept_through_subsets(tmp_path):
    specs = _specs("float[N, 3] x")
    p = tmp_path / "d.npz"
    np.savez(p, x=np.ones((12, 3), np.float32), groups=np.arange(12) // 4)
    ds = load_data(str(p), specs)
    assert ds.n_groups() == 3 and "3 groups" in ds.notes[-1]
    fit, val = ds.split(0.25)
    assert val.groups.tolist() == [2, 2, 2, 2] and fit.n_groups() == 2
    moved, k = ds.spread(0.3)  # early stopping: single samples, every group on both sides
    assert k == 4 and moved.groups[-4:].tolist() == [0, 1, 1, 2]
    for bad, needle in (
        (np.arange(11), "one integer or string label per sample \\(12\\)"),
        (np.ones((12, 2), int), "shape \\[12, 2\\]"),
        (np.linspace(0, 1, 12), "got float64"),
    ):
        np.savez(p, x=np.ones((12, 3), np.float32), groups=bad)
        with pytest.raises(DataError, match=needle):
            load_data(str(p), specs)
    # a model input named "groups" is that input, not a grouping
    both = _specs("float[N, 3] x, float[N, 2] groups")
    np.savez(p, x=np.ones((12, 3), np.float32), groups=np.ones((12, 2), np.float32))
    assert load_data(str(p), both).groups is None


def test_compress_validates_on_whole_groups(digits_model, digits_calib, tmp_path):
    with np.load(digits_calib) as z:
        x = z["input"][:40]
    data = tmp_path / "grouped.npz"
    np.savez(data, input=x, groups=np.arange(40) // 7)
    _, rep = onnxshrink.compress(
        digits_model, ["fold-batchnorm"], data=str(data), output=tmp_path / "o.onnx"
    )
    assert rep.data.endswith("28 calibration + 12 held-out validation samples (4 + 2 whole groups)")
    _, rep = onnxshrink.compress(
        digits_model, ["fold-batchnorm"], data={"input": x}, output=tmp_path / "p.onnx"
    )
    assert rep.data.endswith("30 calibration + 10 held-out validation samples")

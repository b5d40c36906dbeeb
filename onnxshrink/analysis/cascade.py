"""Cascade calibration: each activation range measured on the tensor the quantized model
computes -- the float model with every upstream quantized tensor saturated where its grid ends.

One sweep (:class:`onnxshrink.sweep.Sweep`) visits the range sources in graph order: a
source's range is chosen from its values on all samples (:func:`choose_range`), then its values
are clipped to the grid ``saturation(ranges)`` gives it before any reader sees them. Outliers
that an upstream range already clips (those that grow along a residual stream) then no longer
widen the ranges downstream. When a grid depends only on ranges upstream of its tensor, that
one sweep is the fixed point of re-measuring on the clipped model; a grid shared with a tensor
downstream (a Concat's inputs take the joined range) is settled by further sweeps, each
clipping with the previous sweep's ranges where the current one has not measured yet, until no
range end moves by more than ``tol`` of its width (at most ``rounds`` sweeps).

Taps take what later steps need from the same sweep, a tensor's batches as the quantized model
computes them, before (``saturated=False``) or after its own clipping: per-channel moments
(:class:`MomentTap`), a layer's input Gram matrix (Hessian-aware rounding). A tap that
``edits`` goes first and may change the values and the model downstream (range balancing).
When there are several sweeps, a tap keeps what the last one showed it.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from onnxshrink.analysis.ranges import (
    SETTLED,
    RangeStats,
    Tails,
    choose_range,
    percentile_tails,
)

__all__ = ["Cascade", "MomentTap", "Tap", "cascade_calibrate"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Cascade:
    """What :func:`cascade_calibrate` found: ranges, and how the sweeps went."""

    ranges: dict[str, tuple[float, float]]
    changes: list[float]  # per further sweep: the largest move of a range end / its width
    clipped: dict[str, float]  # tensor -> share of its values beyond its grid (last sweep)


class Tap:
    """Sees the batches of tensors ``names`` in a sweep; ``start`` forgets an earlier sweep."""

    names: frozenset[str] = frozenset()
    saturated: bool = False
    edits: bool = False

    def start(self) -> None:
        pass

    def see(self, name: str, arrays: list[np.ndarray]) -> None:
        raise NotImplementedError


class MomentTap(Tap):
    """Per-channel (axis 1) mean and mean x² of each tensor in ``names``."""

    def __init__(self, names, saturated: bool) -> None:
        self.names, self.saturated = frozenset(names), saturated
        self.start()

    def start(self) -> None:
        from onnxshrink.calibrate import ChannelMoments

        self.moments = {n: ChannelMoments(1, absolute=False) for n in self.names}

    def see(self, name: str, arrays: list[np.ndarray]) -> None:
        for a in arrays:
            self.moments[name].update(a)


def _stats(arrays: list[np.ndarray], method: str) -> RangeStats:
    st = RangeStats()
    for a in arrays:
        st.update_range(a)
    if method != "minmax":
        st.start_histogram()
        for a in arrays:
            st.update_histogram(a)
    return st


def _clip(arrays: list[np.ndarray], lo: float, hi: float, tails: Tails | None = None) -> float:
    """Clips float ``arrays`` in place to [lo, hi]; the share of values that were beyond
    (counted in the percentile's ``tails`` where they hold them all: no pass over the arrays,
    and none at all when nothing is beyond)."""
    if any(a.dtype.kind != "f" for a in arrays):
        return 0.0
    if tails is not None:
        beyond = tails.beyond(arrays, lo, hi)
    else:
        beyond = sum(int(np.count_nonzero(a < lo)) + int(np.count_nonzero(a > hi)) for a in arrays)
    if beyond:
        for i, a in enumerate(arrays):
            arrays[i] = np.clip(a, lo, hi, out=a if a.flags.writeable else None)
    return beyond / max(sum(a.size for a in arrays), 1)


def _moved(old: tuple[float, float], new: tuple[float, float]) -> float:
    width = max(old[1] - old[0], 1e-12)
    return max(abs(new[0] - old[0]), abs(new[1] - old[1])) / width


def cascade_calibrate(
    model,
    saturation,
    sources: list[str],
    data,
    samples: int,
    method: str,
    percentile: float,
    rounds: int,
    *,
    shared_downstream: bool = False,
    taps: tuple[Tap, ...] = (),
    tol: float = SETTLED,
    progress=None,
) -> Cascade:
    """Ranges of ``sources`` as the quantized model computes them, up to its rounding.

    ``saturation(ranges)`` maps tensor -> the (lo, hi) its grid clips it to, from the ranges
    known so far. ``rounds=0``: no clipping, the float model's ranges (what onnxruntime's
    calibrators measure). ``shared_downstream``: some grid depends on a range measured later
    (further sweeps settle it). ``progress`` advances by samples, ``samples`` per sweep."""
    from onnxshrink.sweep import Sweep

    sources_set = set(sources)
    # what only observing taps look at needs no cut: nothing changes it before they see it
    stops = sources_set.union(*(t.names for t in taps if t.edits))
    watch = set().union(*(t.names for t in taps)) - stops
    taps = tuple(sorted(taps, key=lambda t: not t.edits))  # an edit goes before what observes
    previous: dict[str, tuple[float, float]] = {}
    changes: list[float] = []
    clipped: dict[str, float] = {}
    for _ in range(rounds if rounds and shared_downstream else 1):
        ranges: dict[str, tuple[float, float]] = {}
        clipped = {}
        for tap in taps:
            tap.start()
        for name, arrays in Sweep(
            model, sorted(stops), data, samples, watch=sorted(watch), progress=progress
        ):
            _show(taps, name, arrays, saturated=False)
            if name in sources_set:
                tails = percentile_tails(arrays, percentile) if method == "percentile" else None
                ranges[name] = (
                    (tails.lo, tails.hi)
                    if tails is not None
                    else choose_range(_stats(arrays, method), method, percentile)
                )
                bound = saturation({**previous, **ranges}).get(name) if rounds else None
                if bound is not None and (share := _clip(arrays, *bound, tails)) > 0:
                    clipped[name] = share
            _show(taps, name, arrays, saturated=True)
        if previous:
            changes.append(max((_moved(previous[s], ranges[s]) for s in ranges), default=0.0))
        previous = ranges
        if changes and changes[-1] <= tol:
            break
    return Cascade(previous, changes, clipped)


def _show(taps, name: str, arrays: list[np.ndarray], saturated: bool) -> None:
    for tap in taps:
        if tap.saturated == saturated and name in tap.names:
            tap.see(name, arrays)

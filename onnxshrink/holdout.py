"""Which samples are held out from fitting: the tail, or a share spread over the data; whole
groups at the tail when the data names them.

Samples of one group (crops of one photo, frames of one clip, utterances of one speaker) are
near copies of each other: with one fitted and its neighbour held out, the held-out error says
little about inputs not seen. So when a data file gives ``groups`` (one label per sample),
:func:`tail` -- ``compress``'s validation -- holds out whole groups from the end (the group
whose last sample comes last first) while that brings the count nearer the share asked for,
and always leaves one group to fit.

:func:`spread` -- a pass's own early stopping -- holds out single samples evenly spaced through
the data even then, so that every group has some on both sides: held out by whole photos,
``reconstruct``'s choice of blocks followed the one photo held out and undid fits that helped
on others (docs/benchmarks.md, "Groups").
"""

from __future__ import annotations

import numpy as np

__all__ = ["held_count", "spread", "tail"]


def held_count(n: int, share: float) -> int:
    """How many of ``n`` items a ``share`` holds out: at least one on each side."""
    return min(n - 1, max(1, round(n * share)))


def tail(n: int, share: float, groups: np.ndarray | None = None) -> np.ndarray:
    """A mask of the samples held out at the end: the last ``share`` of them, or whole groups
    (with fewer than two groups, single samples)."""
    if groups is None or len(np.unique(groups)) < 2:
        mask = np.zeros(n, bool)
        mask[n - held_count(n, share) :] = True
        return mask
    want = n * share
    labels, last = np.unique(groups[::-1], return_index=True)  # last: distance from the end
    sizes = dict(zip(*np.unique(groups, return_counts=True)))
    taken, total = [], 0
    for label in labels[np.argsort(last, kind="stable")][:-1]:  # one group always left to fit
        if taken and abs(total + sizes[label] - want) >= abs(total - want):
            break
        taken.append(label)
        total += sizes[label]
    return np.isin(groups, taken)


def spread(n: int, share: float) -> np.ndarray:
    """A mask of ``share`` of the samples, evenly spaced through them."""
    mask = np.zeros(n, bool)
    mask[np.linspace(0, n - 1, held_count(n, share)).round().astype(int)] = True
    return mask

"""How important each channel of a group is: one score per group channel, summed over members.

With a group's members (see :mod:`onnxshrink.analysis.channels`) -- producer weights sliced on
their output axis, consumer weights on their input axis, BatchNorm scales, and the activations
the consumers read -- the criteria are:

* ``l1`` / ``l2``: Σ over weight members of Σ|w| (resp. Σw²) of the channel's slice
  (Torch-Pruning's group magnitude);
* ``bn``: Σ |γ| over the group's BatchNorm layers (network slimming); groups without one fall
  back to ``l1``;
* ``activation``: Σ over consumer inputs of mean |x_c| on the calibration data;
* ``hessian``: second order, in the spirit of Optimal Brain Damage. For a consumer computing
  y = W x, the layer Hessian of the squared output error is H = 2·E[x xᵀ]; keeping only its
  diagonal, removing input channel c costs ½·Σ_j w_jᵀ H_jj w_j = Σ_o Σ_k W[o, c, k]²·E[x_c²]
  -- the output energy the channel carries. Summed over the group's consumers.

A flattened channel (``repeat`` > 1, before a Gemm) sums its features.
"""

from __future__ import annotations

import logging

import numpy as np

from onnxshrink.analysis.channels import Group, Member
from onnxshrink.calibrate import ChannelMoments
from onnxshrink.irtools import const_array

__all__ = ["CRITERIA", "group_scores", "weight_norms"]

logger = logging.getLogger(__name__)

CRITERIA = ("l1", "l2", "bn", "activation", "hessian")


def weight_norms(arr: np.ndarray, axis: int, power: int) -> np.ndarray:
    """Σ|w|^power over every axis but ``axis``: one value per index of ``axis``."""
    a = np.abs(np.moveaxis(np.asarray(arr, np.float64), axis, 0)).reshape(arr.shape[axis], -1)
    return (a**power).sum(1)


def _to_group(m: Member, per_tensor_channel: np.ndarray, size: int) -> np.ndarray:
    """Adds a tensor-channel vector into the group's channel space through the segment."""
    out = np.zeros(size)
    s = m.segment
    block = per_tensor_channel[s.offset : s.offset + s.length * s.repeat]
    out[s.start : s.start + s.length] = block.reshape(s.length, s.repeat).sum(1)
    return out


def group_scores(
    group: Group, criterion: str, moments: dict[str, ChannelMoments] | None = None
) -> tuple[np.ndarray, str]:
    """Scores for the group's channels and the criterion actually used (after fallbacks)."""
    size = group.size
    score = np.zeros(size)
    used = criterion
    if criterion == "bn":
        bns = [m for m in group.members if m.kind == "bn"]
        if not bns:
            criterion = used = "l1"
        for m in bns:
            score += _to_group(m, np.abs(const_array(m.value).astype(np.float64)), size)
    if criterion in ("activation", "hessian") and not moments:
        criterion = used = "l1"
    if criterion == "activation":
        acts = [m for m in group.members if m.kind == "act" and m.value.name in moments]
        if not acts:
            criterion = used = "l1"
        for m in acts:
            score += _to_group(m, moments[m.value.name].mean_abs, size)
    if criterion == "hessian":
        ins = [m for m in group.members if m.kind == "in"]
        acts = {id(m.node): m for m in group.members if m.kind == "act"}
        done = 0
        for m in ins:
            act = acts.get(id(m.node))
            if act is None or act.value.name not in moments:
                continue
            w2 = weight_norms(const_array(m.value), m.axis, 2)
            score += _to_group(m, w2 * moments[act.value.name].mean_sq, size)
            done += 1
        if not done:
            criterion = used = "l1"
            score[:] = 0
    if criterion in ("l1", "l2"):
        power = 1 if criterion == "l1" else 2
        for m in group.members:
            if m.kind in ("in", "out"):
                score += _to_group(m, weight_norms(const_array(m.value), m.axis, power), size)
    return score, used

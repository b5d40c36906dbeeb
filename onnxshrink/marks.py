"""Marks passes leave on nodes (node metadata) for the passes after them; which reach the file.

* ``onnxshrink.kept_channels`` (prune -> distill): on each pruned weight layer, the indices of
  the original output channels it still has, composed over repeated pruning, so ``distill`` can
  fit it to the original layer's kept channels. Meaningful only against this run's original
  model: :func:`strip` removes it from the result.
* ``onnxshrink.lowrank`` (lowrank -> lowrank): on each plain low-rank factor, so it is never
  factorised again, in this run or a later one: it stays in the file.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

__all__ = ["KEPT_CHANNELS", "LOWRANK_FACTOR", "is_factor", "keep_channels", "kept_channels"]

KEPT_CHANNELS = "onnxshrink.kept_channels"
LOWRANK_FACTOR = "onnxshrink.lowrank"
_RUN_ONLY = (KEPT_CHANNELS,)


def kept_channels(node: ir.Node) -> np.ndarray | None:
    """The original output channels ``node`` still has, or None if it was never pruned."""
    kept = node.metadata_props.get(KEPT_CHANNELS)
    return None if not kept else np.array([int(i) for i in kept.split(",")])


def keep_channels(node: ir.Node, kept: np.ndarray) -> None:
    """Records that ``node`` keeps output channels ``kept`` of its current ones (composed with
    what an earlier pruning kept)."""
    if (prior := kept_channels(node)) is not None:
        kept = prior[kept]
    node.metadata_props[KEPT_CHANNELS] = ",".join(map(str, np.asarray(kept).tolist()))


def mark_factor(node: ir.Node) -> None:
    node.metadata_props[LOWRANK_FACTOR] = "factor"


def is_factor(node: ir.Node) -> bool:
    return LOWRANK_FACTOR in node.metadata_props


def strip(model: ir.Model) -> int:
    """Removes the marks meant for this run only from every node; returns how many."""
    n = 0
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        for key in _RUN_ONLY:
            if node.metadata_props.pop(key, None) is not None:
                n += 1
    return n

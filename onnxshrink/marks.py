"""Marks passes leave on nodes (node metadata) for the passes after them; which reach the file.

* ``onnxshrink.kept_channels`` (prune -> distill): on each pruned weight layer, the indices of
  the original output channels it still has, composed over repeated pruning, so ``distill`` can
  fit it to the original layer's kept channels. Meaningful only against this run's original
  model: :func:`strip` removes it from the result.
* ``onnxshrink.channel_scale`` (balance, equalize, smoothing -> distill, reconstruct): on a node
  whose output channels were rescaled by a rewrite exact in float (its readers divide them
  back), the factors s_c: its output is s_c times the original's in channel c (of
  :func:`channel_axis`), composed over rescalings and pruning. A fit against the original
  must compare s_c·y, or it undoes the rescaling its readers still assume. Run-only too.
* ``onnxshrink.lowrank`` (lowrank -> lowrank): on each plain low-rank factor, so it is never
  factorised again, in this run or a later one: it stays in the file.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

__all__ = [
    "CHANNEL_SCALE",
    "KEPT_CHANNELS",
    "LOWRANK_FACTOR",
    "channel_axis",
    "channel_scale",
    "is_factor",
    "keep_channels",
    "kept_channels",
    "scale_channels",
]

KEPT_CHANNELS = "onnxshrink.kept_channels"
LOWRANK_FACTOR = "onnxshrink.lowrank"
CHANNEL_SCALE = "onnxshrink.channel_scale"
_RUN_ONLY = (KEPT_CHANNELS, CHANNEL_SCALE)


def kept_channels(node: ir.Node) -> np.ndarray | None:
    """The original output channels ``node`` still has, or None if it was never pruned."""
    kept = node.metadata_props.get(KEPT_CHANNELS)
    return None if not kept else np.array([int(i) for i in kept.split(",")])


def keep_channels(node: ir.Node, kept: np.ndarray) -> None:
    """Records that ``node`` keeps output channels ``kept`` of its current ones (composed with
    what an earlier pruning kept)."""
    if (scale := channel_scale(node)) is not None:
        node.metadata_props[CHANNEL_SCALE] = _floats(scale[kept])
    if (prior := kept_channels(node)) is not None:
        kept = prior[kept]
    node.metadata_props[KEPT_CHANNELS] = ",".join(map(str, np.asarray(kept).tolist()))


def channel_scale(node: ir.Node) -> np.ndarray | None:
    """s_c: ``node``'s output channel c is s_c times the original's; None if never rescaled."""
    scale = node.metadata_props.get(CHANNEL_SCALE)
    return None if not scale else np.array([float(x) for x in scale.split(",")])


def channel_axis(node: ir.Node) -> int:
    """The axis of ``node``'s output channels that ``channel_scale`` counts: NCHW's for a
    convolution, the last otherwise (Gemm, MatMul, LayerNormalization)."""
    return 1 if node.op_type in ("Conv", "ConvTranspose") else -1


def scale_channels(node: ir.Node, s: np.ndarray) -> None:
    """Records that ``node``'s output channel c was multiplied by ``s[c]`` (composed with what
    an earlier rescaling recorded)."""
    if (prior := channel_scale(node)) is not None:
        s = prior * s
    node.metadata_props[CHANNEL_SCALE] = _floats(s)


def _floats(values: np.ndarray) -> str:
    return ",".join(f"{float(x):.9g}" for x in np.ravel(values))


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

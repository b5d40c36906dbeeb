"""Structured filter pruning: removes whole channels, and every weight downstream that read them.

Four separate pieces (as in Torch-Pruning's DepGraph):

1. *what is coupled* -- :mod:`onnxshrink.analysis.channels` builds channel groups (Conv
   filters, the BN / activation / pooling / depthwise ops they flow through, residual Add groups,
   Concat offsets, Flatten -> Gemm rows) and freezes what it cannot follow, with a reason;
2. *how important* -- :mod:`onnxshrink.analysis.importance`: l1, l2, bn, activation or hessian
   scores per group channel, summed over the group's members;
3. *how much* -- this module: ``ratio`` of each prunable group's channels; or, with
   ``global=true`` or ``target-macs=<f>``, across all groups, the channels with the least damage
   per MAC saved (:mod:`onnxshrink.search`) until ``ratio`` of all prunable channels go, or the
   model keeps ``f`` of its MACs; kept counts rounded to ``round``, never all of a group;
4. *how to cut one op* -- :mod:`onnxshrink.analysis.cut`, a per-op table.

Then, with real calibration data (``refit``, on by default when data is given), every layer
whose inputs lost channels is re-fitted by ridge least squares to reproduce the model's
pre-pruning outputs of that layer (:mod:`onnxshrink.analysis.refit`).

``criterion=auto`` uses the strongest criterion the data allows: ``hessian`` with real data,
``l1`` with random data or none.

BatchNormalization is folded into its Conv/Gemm first (exact; ``fold-batchnorm``), except
with ``criterion=bn``: exporters share BN parameters through Identity nodes, which froze groups.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import ClassVar, Literal

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import ShapeInferencePass

from onnxshrink import marks
from onnxshrink.analysis import channels as ch
from onnxshrink.analysis.cut import cut_model
from onnxshrink.analysis.importance import group_scores
from onnxshrink.calibrate import ChannelMoments, Probe, batch_samples
from onnxshrink.errors import OptionError
from onnxshrink.irtools import const_array
from onnxshrink.passes import options
from onnxshrink.passes.base import ShrinkPass

__all__ = ["PruneChannelsPass", "keep_count"]

logger = logging.getLogger(__name__)


def keep_count(size: int, ratio: float, round_to: int, min_channels: int) -> int:
    """Channels kept in a group of ``size`` when pruning ``ratio`` of them.

    >>> keep_count(64, 0.3, 8, 8)   # 64 - floor(19.2) = 45 -> nearest multiple of 8
    48
    >>> keep_count(12, 0.5, 8, 8)   # small groups are not rounded; min-channels caps at the size
    8
    """
    return _round_keep(size, size - math.floor(size * ratio + 1e-9), round_to, min_channels)


def _round_keep(size: int, keep: int, round_to: int, min_channels: int) -> int:
    """``keep`` to the nearest multiple of ``round_to`` (groups of 16 or more), within floors."""
    if round_to > 1 and size >= 16:
        keep = max(round_to, int(round(keep / round_to)) * round_to)
    return int(min(size, max(keep, min(min_channels, size), 1)))


@dataclasses.dataclass
class PruneChannelsPass(ShrinkPass):
    """Structured channel pruning with downstream removal, importance criteria and LS re-fit."""

    name: ClassVar[str] = "prune"
    lossy: ClassVar[bool] = True

    ratio: float = 0.3
    criterion: Literal["auto", "l1", "l2", "bn", "activation", "hessian"] = "auto"
    global_: bool = False
    round: int = 8
    min_channels: int = 8
    skip_: tuple[str, ...] = options.layers()  # CLI name: skip
    only: tuple[str, ...] = options.layers()  # producer names: prune only their groups
    refit: bool | None = None
    ridge: float = options.ridge(1e-3)
    samples: int = options.samples(128)
    target_macs: float | None = options.share(closed=False)
    floor: float | None = options.floor(0.9)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.ratio < 1.0:
            raise OptionError(f"pass 'prune': ratio must be in [0, 1), got {self.ratio}")
        if self.round < 0 or self.min_channels < 1:
            raise OptionError("pass 'prune': round >= 0, min-channels >= 1")

    # -- the pass ---------------------------------------------------------------------------
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        folded = False
        if self.criterion != "bn":  # the bn criterion reads the scales folding would remove
            folded, _ = self.fold_batchnorm(model)  # exporters share BN parameters: unfreezes
        ShapeInferencePass(check_type=False, strict_mode=False, data_prop=True)(model)
        cg = ch.analyze(model)
        groups = self._prunable(cg)
        data = self.context.data
        real = self.has_real_data
        criterion = self.criterion if self.criterion != "auto" else ("hessian" if real else "l1")
        with self.scratch() as workdir:
            needs_stats = criterion in ("activation", "hessian") and data is not None
            moments = self._moments(model, groups, data, workdir) if needs_stats else None
            plan = self._plan(model, groups, criterion, moments)
            if not plan:
                return ir.passes.PassResult(model, modified=folded)
            refit = self.refit if self.refit is not None else real
            teacher = model.clone() if refit else None
            removed = cg.removed_channels({gid: idx for gid, (idx, _, _) in plan.items()})
            cut_model(model, removed, cg.info)
            _mark_kept(removed)
            self._record(cg, plan)
            if refit and teacher is not None:
                consumers = {id(n): n for gid in plan for n in cg.groups[gid].consumers}
                if results := self.refit_nodes(
                    model, teacher, list(consumers.values()), data, workdir, removed
                ):
                    self.details["refit"] = results
        return ir.passes.PassResult(model, modified=True)

    # -- pieces -----------------------------------------------------------------------------
    def _prunable(self, cg: ch.ChannelGraph) -> list[ch.Group]:
        skip, only = set(self.skip_), set(self.only)
        out = []
        for g in cg.roots():
            if only and not only & {p.name for p in g.producers}:
                continue  # not asked for (``only``): not a refusal, nothing to report
            if g.frozen is None and skip & {p.name for p in g.producers}:
                g.frozen = "listed in skip"
            if g.frozen is not None:
                self.skip(g.producers[0], f"group {g.name} ({g.size} channels) frozen: {g.frozen}")
                continue
            if g.size <= min(self.min_channels, g.size) or g.size < 2:
                self.skip(g.producers[0], f"group {g.name} has only {g.size} channels")
                continue
            out.append(g)
        return out

    def _moments(self, model, groups, data, workdir) -> dict[str, ChannelMoments]:
        acts = {m.value.name: m.axis for g in groups for m in g.members if m.kind == "act"}
        if not acts:
            return {}
        moments = {name: ChannelMoments(axis) for name, axis in acts.items()}
        task = self.task("prune: activation statistics", min(self.samples, data.n_samples))
        with Probe(model, list(acts), workdir) as probe:
            for batch in probe.run(data, self.samples):
                for name, arr in batch.items():
                    moments[name].update(arr)
                task(batch_samples(batch))
        task.done()
        return moments

    def _plan(self, model, groups, criterion, moments) -> dict[int, tuple[np.ndarray, str, int]]:
        """group id -> (group channels to remove, criterion used, size)."""
        scored = [(g, *group_scores(g, criterion, moments)) for g in groups]
        if self.global_ or self.target_macs is not None:
            counts = self._global_counts(model, scored)
        else:
            counts = {
                g.id: g.size - keep_count(g.size, self.ratio, self.round, self.min_channels)
                for g, _, _ in scored
            }
        plan = {}
        for g, score, used in scored:
            n = counts[g.id]
            if n <= 0:
                continue
            order = np.argsort(score, kind="stable")
            plan[g.id] = (np.sort(order[:n]), used, g.size)
        return plan

    def _global_counts(self, model, scored) -> dict[int, int]:
        """Channels to remove per group, cheapest damage per MAC saved first
        (:func:`onnxshrink.search.allocate`).

        A channel's damage is its share of its group's total score (the relative output energy
        its consumers lose, for ``hessian``); the MACs it saves are its producers' MACs per
        output channel plus its consumers' per input channel (depthwise filters included). The
        budget is ``target-macs`` (fraction of the model's MACs to keep) when given, else
        ``ratio`` of all prunable channels.
        """
        from onnxshrink.metrics import macs_by_node
        from onnxshrink.search import Curve, allocate

        macs = macs_by_node(model)
        curves, sizes = [], {}
        for g, score, _ in scored:
            per_channel = max(_macs_per_channel(g, macs), 1.0)
            share = score / score.sum() if score.sum() > 0 else np.full(g.size, 1.0 / g.size)
            removable = g.size - max(min(self.min_channels, g.size), 1)
            damage = np.cumsum(np.sort(share))[:removable]
            k = np.arange(1, removable + 1, dtype=np.float64)
            if self.target_macs is None:  # a budget of channels, spent by damage per MAC
                curves.append(Curve(g.id, k, damage / per_channel))
            else:
                curves.append(Curve(g.id, k * per_channel, damage))
            sizes[g.id] = g.size

        def counts(need: float) -> dict[int, int]:
            chosen, _ = allocate(curves, need)
            removed = {gid: chosen[gid] + 1 if gid in chosen else 0 for gid in sizes}
            return {
                gid: sizes[gid]
                - _round_keep(sizes[gid], sizes[gid] - r, self.round, self.min_channels)
                for gid, r in removed.items()
            }

        if self.target_macs is None:
            return counts(math.floor(self.ratio * sum(sizes.values())))
        # per-channel savings double-count a layer whose input and output channels are both cut,
        # and rounding keeps channels: ask for the shortfall again until the budget holds
        groups = [g for g, _, _ in scored]
        total = sum(macs.values())
        need, plan = total * (1.0 - self.target_macs), {}
        for _ in range(8):
            plan = counts(need)
            short = _macs_after(groups, macs, plan) - total * self.target_macs
            if short <= 0:
                break
            need += short
        return plan

    def _record(self, cg, plan) -> None:
        rows = []
        for gid, (idx, used, size) in plan.items():
            g = cg.groups[gid]
            rows.append(
                {
                    "group": g.name,
                    "channels": f"{size} -> {size - len(idx)}",
                    "criterion": used,
                    "producers": [p.name for p in g.producers],
                }
            )
            self.change(
                f"{g.name}: {size} -> {size - len(idx)} channels ({used})", g.producers[0].name
            )
        self.details["groups"] = rows


def _mark_kept(removed: dict[ir.Value, np.ndarray]) -> None:
    """Records on each pruned weight layer which of its original output channels it kept (as
    indices into the original model's, composed over repeated pruning), so ``distill`` can
    match its output to the original layer's kept channels."""
    for value, rem in removed.items():
        node = value.producer()
        if (
            node is None
            or node.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul")
            or not len(rem)
        ):
            continue
        w = const_array(node.inputs[1])
        if w is None:
            continue
        now = (
            w.shape[1]
            if node.op_type == "ConvTranspose"
            or (node.op_type == "MatMul")
            or (node.op_type == "Gemm" and not node.attributes.get_int("transB", 0))
            else w.shape[0]
        )
        marks.keep_channels(node, np.setdiff1d(np.arange(now + len(rem)), rem))


def _macs_per_channel(g: ch.Group, macs: dict[int, int]) -> float:
    """MACs saved by removing one channel of ``g``."""
    total = 0.0
    for m in g.members:
        if m.kind not in ("in", "out"):
            continue
        shape = const_array(m.value).shape
        total += macs.get(id(m.node), 0) / shape[m.axis] * m.segment.repeat
    return total


def _macs_after(groups: list[ch.Group], macs: dict[int, int], removed: dict[int, int]) -> float:
    """The model's MACs with ``removed[g.id]`` channels cut from each group: a weight layer's
    MACs scale with the share of its input channels kept times the share of its outputs kept."""
    cut: dict[tuple[int, str], float] = {}
    size: dict[tuple[int, str], int] = {}
    for g in groups:
        for m in g.members:
            if m.kind in ("in", "out"):
                key = (id(m.node), m.kind)
                cut[key] = cut.get(key, 0.0) + removed.get(g.id, 0) * m.segment.repeat
                size[key] = const_array(m.value).shape[m.axis]
    kept: dict[int, float] = {}
    for (node, kind), n in cut.items():
        kept[node] = kept.get(node, 1.0) * max(0.0, 1.0 - n / size[(node, kind)])
    return sum(macs.values()) - sum(macs.get(node, 0) * (1.0 - k) for node, k in kept.items())

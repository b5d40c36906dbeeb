"""The registry of passes: CLI name -> class. Explicit, so the order and the names are visible."""

from __future__ import annotations

from onnxshrink.errors import OptionError
from onnxshrink.passes.base import PassContext, ShrinkPass, parse_spec
from onnxshrink.passes.cluster_weights import ClusterWeightsPass
from onnxshrink.passes.distill import DistillPass
from onnxshrink.passes.equalize import EqualizePass
from onnxshrink.passes.fold_batchnorm import FoldBatchNormPass
from onnxshrink.passes.low_rank_matmul import LowRankMatMulPass
from onnxshrink.passes.prune_channels import PruneChannelsPass
from onnxshrink.passes.prune_kernel import PruneKernelPass
from onnxshrink.passes.quantize import FoldQDQPass, InsertQDQPass, QuantizePass
from onnxshrink.passes.quantize_dynamic import QuantizeDynamicPass
from onnxshrink.passes.quantize_weights import QuantizeWeightsPass
from onnxshrink.passes.reconstruct import ReconstructPass
from onnxshrink.passes.simplify import SimplifyPass
from onnxshrink.passes.sparsify import SparsifyPass
from onnxshrink.passes.tucker_conv import TuckerConvPass

__all__ = ["REGISTRY", "DEFAULT_PIPELINE", "PassContext", "ShrinkPass", "make_pass", "parse_spec"]

REGISTRY: dict[str, type[ShrinkPass]] = {
    cls.name: cls
    for cls in (
        SimplifyPass,
        FoldBatchNormPass,
        PruneChannelsPass,
        PruneKernelPass,
        SparsifyPass,
        TuckerConvPass,
        LowRankMatMulPass,
        EqualizePass,
        QuantizePass,
        QuantizeDynamicPass,
        QuantizeWeightsPass,
        InsertQDQPass,
        FoldQDQPass,
        ClusterWeightsPass,
        DistillPass,
        ReconstructPass,
    )
}

# What `compress` runs with no -p: the exact passes (lossy ones join as they land).
DEFAULT_PIPELINE: tuple[str, ...] = ("simplify", "fold-batchnorm")


def make_pass(spec: str | ShrinkPass) -> ShrinkPass:
    """A pass from ``NAME[:KEY=VALUE,...]`` (or an instance, returned as is)."""
    if isinstance(spec, ShrinkPass):
        return spec
    name, options = parse_spec(spec)
    cls = REGISTRY.get(name)
    if cls is None:
        raise OptionError(f"unknown pass '{name}' (known: {', '.join(REGISTRY)})")
    return cls.from_options(options)

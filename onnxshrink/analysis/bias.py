"""Bias correction: put back the output mean that a weight approximation moves.

A layer y = W x + b whose weights become Ŵ (rounded, clustered, ...) outputs on average
E[ŷ] − E[y] = (Ŵ − W)·E[x] per output channel -- for a Conv, Σ_{c,k} (Ŵ − W)[o, c, k]·E[x_c]
(group by group; zero padding at the borders is ignored). Subtracting it from the bias removes
the systematic part of the error (Nagel et al. 2019, "Data-Free Quantization", empirical form
with E[x] measured on calibration data).

Empirical, sequential (:func:`empirical_correction`): the mean shift of a quantized model's
layer output is not only its own weights' doing. Upstream rounding noise, passed through a ReLU
(E[relu(y + n)] > relu(y) for zero-mean noise n) or a saturating grid, moves the mean of every
later layer's input, and the analytic form above never sees it. So the layers are visited in
graph order and each one's per-channel output mean is measured on the quantized model itself --
every earlier layer already corrected -- and compared with a reference model; the bias absorbs
the difference (Finkelstein et al. 2019, "Fighting Quantization Bias With Bias"; Nagel et al.
2019 §4.2). Correcting all layers at once from one measurement diverges: a layer would also
cancel the part of its shift that its corrected predecessors no longer cause.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx_ir as ir

from onnxshrink.irtools import const_array, set_const_input, weight_users_outside

__all__ = [
    "apply_to_mean",
    "empirical_correction",
    "input_means",
    "input_moments",
    "quantization_shift",
    "subtract_from_bias",
]

logger = logging.getLogger(__name__)


def input_moments(
    model: ir.Model, names: list[str], data, workdir: Path, samples: int, progress=None
):
    """Per-channel (axis 1) mean and mean x² of the tensors ``names`` on the calibration data."""
    from onnxshrink.calibrate import ChannelMoments, Probe, batch_samples

    moments = {n: ChannelMoments(1, absolute=False) for n in names}
    with Probe(model, names, workdir) as probe:
        for batch in probe.run(data, samples):
            for n, arr in batch.items():
                moments[n].update(arr)
            if progress is not None:
                progress(batch_samples(batch))
    return moments


def input_means(
    model: ir.Model, names: list[str], data, workdir: Path, samples: int, progress=None
) -> dict[str, np.ndarray]:
    """Per-channel (axis 1) mean of the tensors ``names`` on the calibration data."""
    return {
        n: m.mean for n, m in input_moments(model, names, data, workdir, samples, progress).items()
    }


def apply_to_mean(node: ir.Node, w: np.ndarray, x_mean: np.ndarray) -> np.ndarray:
    """The layer's weights applied to a constant input ``x_mean``: one value per output."""
    x_mean = np.asarray(x_mean, np.float64)
    if node.op_type == "Conv":
        group = node.attributes.get_int("group", 1)
        o, cg = w.shape[:2]
        ww = w.reshape(group, o // group, cg, -1).sum(3)
        return np.einsum("gjc,gc->gj", ww, x_mean.reshape(group, cg)).reshape(o)
    alpha = node.attributes.get_float("alpha", 1.0) if node.op_type == "Gemm" else 1.0
    trans_b = node.attributes.get_int("transB", 0) if node.op_type == "Gemm" else 0
    return alpha * ((w @ x_mean) if trans_b else (x_mean @ w))


def subtract_from_bias(
    graph: ir.Graph, node: ir.Node, shift: np.ndarray, what: str = "bias_corrected"
) -> bool:
    """b ← b − shift for a Conv or Gemm (a bias is added if it had none). False if not possible."""
    n_out = len(shift)
    if node.op_type == "Gemm" and node.attributes.get_int("transA", 0):
        return False
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        b = const_array(node.inputs[2])
        if b is None or weight_users_outside(node.inputs[2], node):
            return False
        b = np.asarray(b, np.float64)
        if node.op_type == "Gemm":
            if b.size not in (1, n_out):
                return False
            b = np.broadcast_to(b.reshape(-1) * node.attributes.get_float("beta", 1.0), (n_out,))
            node.attributes["beta"] = ir.AttrFloat32("beta", 1.0)
        new_b = b.reshape(-1) - shift
    else:
        new_b = -shift
    dtype = (
        const_array(node.inputs[1]).dtype if const_array(node.inputs[1]) is not None else np.float32
    )
    set_const_input(
        graph,
        node,
        2,
        new_b.astype(dtype if np.issubdtype(dtype, np.floating) else np.float32),
        what,
    )
    return True


def quantization_shift(
    model: ir.Model,
    qparams: dict,
    activations: str,
    data,
    workdir: Path,
    samples: int,
    progress=None,
) -> dict[str, np.ndarray]:
    """Per-channel mean of Q(x) − x for each tensor x named in ``qparams`` (its (scale, zero
    point)) on the calibration data: clipping to a calibrated range and rounding shift a
    tensor's mean, and the layer reading it sees that shift times its weights."""
    from onnxshrink.calibrate import Probe, batch_samples

    lo, hi = (0, 255) if activations == "uint8" else (-128, 127)
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = dict.fromkeys(qparams, 0)
    with Probe(model, list(qparams), workdir) as probe:
        for batch in probe.run(data, samples):
            for f, x in batch.items():
                scale, zp = qparams[f]
                xq = (np.clip(np.rint(x / scale) + int(zp), lo, hi) - int(zp)) * float(scale)
                err = np.moveaxis(xq.astype(np.float64) - x, 1, -1).reshape(-1, x.shape[1])
                sums[f] = err.sum(0) + sums.get(f, 0.0)
                counts[f] += err.shape[0]
            if progress is not None:
                progress(batch_samples(batch))
    return {f: sums[f] / max(counts[f], 1) for f in sums}


def empirical_correction(
    model: ir.Model, want: dict, nodes: list[ir.Node], data, samples: int, progress=None
) -> dict[str, float]:
    """Corrects the bias of each of ``nodes`` (Conv / Gemm of ``model``, in graph order) so its
    output's per-channel mean on the calibration data equals ``want[output]`` (the
    :class:`~onnxshrink.calibrate.ChannelMoments` of the same tensor in a reference model),
    one node after the other: one sweep over ``model``
    (:class:`onnxshrink.sweep.Sweep`) stops at each output, moves the bias and the output's
    values by the same shift -- exactly what the new bias computes -- so every later
    measurement sees the earlier corrections. Returns node name -> largest |shift| / the
    reference output's standard deviation, for the nodes corrected."""
    from onnxshrink.calibrate import ChannelMoments
    from onnxshrink.sweep import Sweep

    names = [n.outputs[0].name for n in nodes]
    node_of = dict(zip(names, nodes))
    moved: dict[str, float] = {}
    for name, arrays in Sweep(model, names, data, samples, progress=progress):
        got = ChannelMoments(1, absolute=False)
        for a in arrays:
            got.update(a)
        shift = got.mean - want[name].mean
        if subtract_from_bias(model.graph, node_of[name], shift, "bias_empirical"):
            for a in arrays:  # onnxruntime's outputs: writable
                a -= shift.reshape((-1,) + (1,) * (a.ndim - 2)).astype(a.dtype)
            std = np.sqrt(np.maximum(want[name].mean_sq - want[name].mean ** 2, 1e-24))
            moved[node_of[name].name] = float(np.max(np.abs(shift) / std))
    return moved

"""Inserts int8 QuantizeLinear/DequantizeLinear pairs, calibrated on data, so onnxruntime runs
the model on its integer kernels.

The rule, op by op (:func:`onnxshrink.analysis.qplan.plan_quantization`):

* *compute* ops -- Conv, ConvTranspose, Gemm, MatMul, Add, Mul, AveragePool,
  GlobalAveragePool, Concat -- read dequantized inputs and have their output quantized;
  constant weights are quantized per output channel, symmetric int8 (scale = max|w| / 127;
  ``weights=mse`` searches the clipping that minimises ‖W − Q(W)‖²), a Gemm/MatMul whose
  output feeds no quantized op keeps a float output (onnxruntime's QGemm /
  MatMulIntegerToFloat);
* *scale-preserving* ops -- MaxPool, Resize, Reshape, Flatten, Transpose, Squeeze,
  Unsqueeze -- take their input's scale, so onnxruntime drops the DQ -> op -> Q around them;
  Concat gets one scale for its inputs and output (the union range);
* Relu and Clip(min = 0) right after a compute op with no other reader are *fused*: removed,
  their output range used for the compute op's output (the uint8 saturation at zero point 0
  is the ReLU), so no Q/DQ is left between a Conv and its activation;
* everything else stays float between a DQ and a Q.

Activation ranges come from :mod:`onnxshrink.analysis.ranges` (``calibration=minmax |
percentile | entropy | mse``, default ``percentile`` at 99.99, the usual choice that keeps one
outlier in 10⁴ from setting a tensor's scale), measured *in cascade* (``cascade-rounds``, up
to 6; 0 = the float model's ranges, as onnxruntime's calibrators): re-measured on the float
model saturated where the quantized tensors' grids end, until no range end moves by more than
1% of its width -- a tensor's range is then that of what the quantized model feeds it, not of
outliers that an upstream range already clips (MobileNetV2: 4 rounds, 1 − cosine 7.4e-3 →
4.5e-3 on the evaluation crops, top-1 agreement 90.0% → 94.4%). Activations are uint8
(``activations=uint8``, the fast choice on x86 with onnxruntime: measured 0.56× the fp32
latency on MobileNetV2 against 0.86× with int8) or int8.

Bias correction (``bias-correction``; ``auto`` = ``empirical`` with real data, ``off``
without): weight rounding shifts each output channel's mean by Σ_{c,k} (Q(W) − W)[o, c, k] ·
E[x_c]; ``weights`` corrects the bias by that shift, with E[x] the layer input's per-channel mean
on the calibration data (Nagel et al. 2019). ``empirical`` then also visits every Conv / Gemm in
graph order and moves its bias so that its output's per-channel mean *in the quantized model*
(earlier layers already corrected) equals that of the float model saturated at the quantized
grids (:func:`onnxshrink.analysis.bias.empirical_correction`): upstream rounding noise passed
through a ReLU has a positive mean that no per-layer formula sees, and it builds up with depth.
Against the *saturated* model, not the float one: the clipping the cascade chose stays (matched
to the float model's means instead, it brought the outliers' mean back into every pixel and
wrecked MobileNetV2). MobileNetV2: 1 − cosine 4.5e-3 → 3.4e-3 on the evaluation crops, +18 s (one
probe per layer, cut down to the graph up to it). ``full`` corrects Q(W)·E[Q(x) − x] instead,
the shift from quantizing the layer's input alone (clipping mostly) -- measured to help with
``minmax`` and ``mse`` ranges and to hurt with ``percentile``.

Rounding (``rounding``; ``auto`` = ``hessian`` with real data, ``nearest`` without): each
weight is rounded to its per-channel int8 grid, either to the nearest point or Hessian-aware
(GPTQ, :mod:`onnxshrink.analysis.rounding`): inputs rounded one by one, each error pushed onto
the inputs not yet rounded so the *layer output* on the calibration data moves least; the bias
is re-solved in the same system (this replaces ``weights`` bias correction for those layers).
On MobileNetV2 it cuts the output error of weight quantization about 3× (1 − cosine 8.1e-4 →
2.8e-4, activations float).

Range balancing (``balance``; ``auto`` = on with real data): every activation tensor that only
depthwise Convs read has its channels scaled by (R/m_c)^α in the producer and divided back in
the depthwise filters (:mod:`onnxshrink.analysis.balance`) -- exact on the calibration data,
per-channel activation steps in effect. MobileNetV2 (bench/quantize.py): top-1 agreement 84.4%
with neither balancing nor Hessian rounding, 90.0% with both. A float (excluded) producer or
reader is balanced too: what matters is that the tensor between them is quantized.

The stem (``stem``; :func:`onnxshrink.analysis.qplan.stem_layers`): a Conv reading the model's
input with at most 4 channels (an image), and the depthwise Convs that alone read its output,
stay float by default (``auto``; ``float`` keeps any Conv on a graph input float, ``int8``
none). "Reading the input" includes in-graph preprocessing by constants (Transpose, Cast, Sub,
Div, Mul, Add), which then stays float too: MobileNetV2 exported with its normalisation inside
(NHWC image -> Transpose -> Sub -> Mul) ran at 0.85× fp32 with that int8 stem and quantized Mul,
0.52× with them float (1 thread), 1 − cosine 3.7e-3 → 2.1e-3. onnxruntime's QLinearConv is
slow at so few input channels -- a lone 3×3 Conv on a 224×224 RGB image took 2.8× its float
time, 4.5× on one channel, 0.9× with 8 -- and the stem's input and output are the tensors whose
rounding costs most: MobileNetV2's first feature map alone 0.8e-3 of its 3.3e-3 of 1 − cosine.
Kept float there: 1 − cosine 3.3e-3 → 2.1e-3 and 6-12% less latency (three runs). A stem read
by a MaxPool stays int8 (after a float producer onnxruntime moves the QuantizeLinear above the
MaxPool and runs it on uint8 NCHW, 28× slower than its NHWC form on ResNet-18's stem).

Every CPU (``cpu``; :mod:`onnxshrink.analysis.saturation`): x86 CPUs without VNNI add the
products of each weight pair (2j, 2j+1) of the reduction axis in int16, so ``cpu=any`` (default)
keeps |w_a + w_b| <= 128 for every pair -- each channel's scale at least its largest pair sum /
128, rounding within the rule -- and the file computes the same integers everywhere (MobileNetV2:
1 − cosine 2.1e-3 → 2.3e-3); ``vnni`` keeps full-range weights; ``auto`` follows this machine.

The weights are left as float -> QuantizeLinear -> DequantizeLinear (bias in float): the
``fold-qdq`` pass stores them pre-quantized; ``quantize`` runs both.

Refused (reason in the report): opset < 13 (per-channel QDQ needs it); a weight shared with
another node; ops listed in ``exclude`` / ``exclude-types``.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import ClassVar, Literal

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import NameFixPass

from onnxshrink import cpu as host
from onnxshrink.analysis.bias import apply_to_mean, quantization_shift, subtract_from_bias
from onnxshrink.analysis.channels import const_array
from onnxshrink.analysis.cut import insert_after_value, set_const_input, unique_name
from onnxshrink.analysis.qdq import shield_float_layer
from onnxshrink.analysis.qplan import (
    COMPUTE_OPS,
    WEIGHTED_OPS,
    QuantPlan,
    plan_quantization,
    quantize_weight,
    stem_layers,
    weight_axis,
    weight_scale,
)
from onnxshrink.analysis.ranges import (
    SETTLED,
    cascade_calibrate,
    clipped_copy,
    grid_bounds,
    qparams,
)
from onnxshrink.analysis.rounding import chunks_needed, round_int8, steerable, usable_grams
from onnxshrink.analysis.saturation import make_safe, weight_pairs
from onnxshrink.calibrate import all_values
from onnxshrink.errors import OptionError
from onnxshrink.passes.base import ShrinkPass

__all__ = ["InsertQDQPass", "QuantPlan", "QuantizePass", "plan_quantization", "quantize_weight",
           "weight_scale"]

logger = logging.getLogger(__name__)


def _scalar_init(graph: ir.Graph, base: str, arr) -> ir.Value:
    v = ir.val(unique_name(graph, base), const_value=ir.tensor(np.asarray(arr)))
    graph.register_initializer(v)
    return v


@dataclasses.dataclass
class InsertQDQPass(ShrinkPass):
    """Calibrated int8 QDQ insertion: per-channel weights, uint8/int8 activations, bias correction."""

    name: ClassVar[str] = "insert-qdq"
    lossy: ClassVar[bool] = True

    activations: Literal["uint8", "int8"] = "uint8"
    calibration: Literal["minmax", "percentile", "entropy", "mse"] = "percentile"
    percentile: float = 99.99
    cascade_rounds: int = 6
    weights: Literal["minmax", "mse"] = "minmax"
    bias_correction: Literal["auto", "off", "weights", "full", "empirical"] = "auto"
    rounding: Literal["auto", "nearest", "hessian"] = "auto"
    balance: Literal["auto", "on", "off"] = "auto"
    balance_alpha: float = 0.5
    stem: Literal["auto", "float", "int8"] = "auto"
    cpu: Literal["any", "vnni", "auto"] = "any"
    exclude: tuple[str, ...] = ()
    exclude_types: tuple[str, ...] = ()
    samples: int = 128
    min_fidelity: float | None = None
    max_float: int = 8
    floor: float | None = 0.95

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 50.0 < self.percentile <= 100.0:
            raise OptionError(f"pass '{self.name}': percentile must be in (50, 100], got {self.percentile}")
        if self.samples < 1:
            raise OptionError(f"pass '{self.name}': samples must be >= 1")
        if self.cascade_rounds < 0:
            raise OptionError(f"pass '{self.name}': cascade-rounds must be >= 0, "
                              f"got {self.cascade_rounds}")
        if not 0.0 < self.balance_alpha <= 1.0:
            raise OptionError(f"pass '{self.name}': balance-alpha must be in (0, 1], got {self.balance_alpha}")
        self._presets: dict[str, tuple] = {}

    def _model_refusal(self, model: ir.Model) -> str | None:
        """Why the whole model cannot be quantized, or None."""
        opset = model.graph.opset_imports.get("", 0)
        if opset < 13:
            return f"opset {opset} < 13: per-channel QDQ needs opset 13 or later"
        if any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph):
            return "the model is already quantized (has QuantizeLinear/DequantizeLinear)"
        coarse = {v.type.dtype.name for v in [*model.graph.inputs, *model.graph.initializers.values()]
                  if v.type is not None and v.type.dtype in (ir.DataType.FLOAT16, ir.DataType.BFLOAT16)}
        if coarse:
            kinds = "/".join(sorted(coarse)).lower()
            return (f"{kinds} model: int8 QDQ is implemented for float32 models "
                    "(convert to float32 first)")
        return None

    def _float_batchnorm(self, bn: ir.Node) -> str:
        return "BatchNormalization stays float between DQ and Q: run fold-batchnorm first"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if reason := self._model_refusal(model):
            self.skip("model", reason)
            return ir.passes.PassResult(model, modified=False)
        NameFixPass()(model)  # every node named: exclusions and the report refer to names
        for bn in (n for n in model.graph if n.op_type == "BatchNormalization"):
            self.skip(bn, self._float_batchnorm(bn))
        exclude = set(self.exclude)
        plan, refused = plan_quantization(model, exclude, set(self.exclude_types))
        for node, reason in refused:
            self.skip(node, reason)
        stem = [] if self.stem == "int8" else [n.name for n in stem_layers(plan, rule=self.stem == "auto")]
        if stem:
            for name in stem:
                self.skip(name, f"stem kept float (stem={self.stem}): onnxruntime's int8 kernels are slower "
                                f"on an image's few channels, and the image is not rounded")
            self.details["float_stem"] = stem
            exclude |= set(stem)
            plan, _ = plan_quantization(model, exclude, set(self.exclude_types))
        if not plan.nodes:
            return ir.passes.PassResult(model, modified=False)
        data = self.context.data
        if data is None:
            raise OptionError(f"pass '{self.name}' needs calibration data")
        mode = self.bias_correction if self.bias_correction != "auto" else ("empirical" if self.has_real_data else "off")
        rounding = self.rounding if self.rounding != "auto" else ("hessian" if self.has_real_data else "nearest")
        self._presets = {}
        self._safe = self.cpu == "any" or (self.cpu == "auto" and host.this_cpu().int8 != "exact")
        self._moved: dict[str, int] = {}
        with self.scratch() as workdir:
            if self.balance == "on" or (self.balance == "auto" and self.has_real_data):
                self._balance(model, plan, data, workdir)
            ranges, means = self._calibrate(model, plan, data, workdir)
            means = means if mode != "off" else None
            if rounding == "hessian":
                self._presets = self._hessian_rounding(model, plan, data, workdir)
            if self.min_fidelity is not None:
                kept = self._mixed_precision(model, plan, exclude, ranges, means, data, workdir)
                for name in kept:
                    self.skip(name, "kept float by mixed precision (most sensitive layers)")
                exclude |= set(kept)
                plan, _ = plan_quantization(model, exclude, set(self.exclude_types))
            deltas = self._input_errors(model, plan, ranges, data, workdir) if mode == "full" else None
            reference = clipped_copy(model, self._saturation(plan, ranges)) if mode == "empirical" else None
            self._rewrite(model, plan, ranges, means, deltas)
            if reference is not None:
                self._empirical_bias(model, reference, data, workdir)
        return ir.passes.PassResult(model, modified=True)

    # -- mixed precision ----------------------------------------------------------------------
    def _variant(self, model, exclude, ranges, means) -> ir.Model:
        clone = model.clone()
        plan, _ = plan_quantization(clone, exclude, set(self.exclude_types))
        self._rewrite(clone, plan, ranges, means, record=False)
        from onnxshrink.passes.fold_qdq import FoldQDQPass

        FoldQDQPass().call(clone)
        return clone

    def _fidelity(self, model, reference, data, n, workdir) -> float:
        from onnxshrink import io, runtime
        from onnxshrink.validate import compare

        path = workdir / "mixed-precision.onnx"
        io.write(model, path)
        try:
            outputs = runtime.run(runtime.session(path, optimize=True), data, limit=n)
        finally:
            for f in workdir.glob("mixed-precision.onnx*"):
                f.unlink()
        return compare(reference, outputs).cosine

    def _mixed_precision(self, model, plan, exclude, ranges, means, data, workdir) -> list[str]:
        """Names of the layers to keep float so the model's cosine reaches ``min-fidelity``.

        Sensitivity of a layer = the cosine gained when only it is left float (all others
        quantized), measured with onnxruntime on the first 32 calibration samples; the most
        sensitive are left float one by one, re-measuring, until the floor holds (or
        ``max-float`` layers are float).
        """
        from onnxshrink import io, runtime

        n = min(32, data.n_samples)
        path = workdir / "mixed-precision-float.onnx"
        io.write(model, path)
        reference = runtime.run(runtime.session(path), data, limit=n)
        base_excl = set(exclude)
        full = self._fidelity(self._variant(model, base_excl, ranges, means), reference, data, n, workdir)
        self.details["fidelity_all_quantized"] = round(full, 6)
        if full >= self.min_fidelity:
            return []
        candidates = [node.name for node in plan.nodes if node.op_type in COMPUTE_OPS]
        task = self.task(f"{self.name}: layer sensitivity", len(candidates))
        gains = {}
        for name in candidates:
            f = self._fidelity(self._variant(model, base_excl | {name}, ranges, means), reference, data, n, workdir)
            gains[name] = f - full
            task(1)
        task.done()
        order = sorted(gains, key=gains.get, reverse=True)
        kept: list[str] = []
        current = full
        for name in order[: self.max_float]:
            kept.append(name)
            current = self._fidelity(self._variant(model, base_excl | set(kept), ranges, means),
                                     reference, data, n, workdir)
            if current >= self.min_fidelity:
                break
        self.details["mixed_precision"] = {"float": kept, "fidelity": round(current, 6),
                                           "sensitivity": {k: round(gains[k], 6) for k in order[:10]}}
        return kept

    # -- calibration --------------------------------------------------------------------------
    def _calibrate(self, model, plan: QuantPlan, data, workdir):
        """(range per calibrated tensor, per-channel mean of every Conv/Gemm input), measured
        in cascade (:func:`onnxshrink.analysis.ranges.cascade_calibrate`)."""
        sources = sorted(set(plan.tensors.values()))
        mean_names = sorted({n.inputs[0].name for n in plan.nodes if n.op_type in ("Conv", "Gemm")})
        n = min(self.samples, data.n_samples)
        passes = 1 if self.calibration == "minmax" else 2
        task = self.task(f"{self.name}: calibration", n * (passes + self.cascade_rounds))
        found = cascade_calibrate(model, lambda ranges: self._saturation(plan, ranges), sources,
                                  mean_names, data, workdir, n, self.calibration, self.percentile,
                                  self.cascade_rounds, progress=task)
        task.done()
        if self.cascade_rounds:
            narrowed = sorted(found.shrunk.items(), key=lambda kv: kv[1])
            self.details["cascade"] = {"rounds": len(found.changes),
                                       "largest_move": [round(c, 4) for c in found.changes],
                                       "narrowed": len(narrowed),
                                       "narrowest": {k: round(v, 3) for k, v in narrowed[:5]}}
            if found.changes and found.changes[-1] > SETTLED:
                self.details["cascade"]["note"] = (f"ranges still moved {found.changes[-1]:.1%} in the last "
                                                   f"round (cascade-rounds={self.cascade_rounds})")
        return found.ranges, found.means

    def _saturation(self, plan: QuantPlan, ranges) -> dict[str, tuple[float, float]]:
        """Float-model tensor -> the interval the quantized model clips it to: each quantized
        tensor's grid, on the tensor its range comes from (a fused ReLU's output, say)."""
        bounds: dict[str, tuple[float, float]] = {}
        for t, (lo, hi) in plan.params(dict(ranges)).items():
            lo, hi = grid_bounds(lo, hi, self.activations)
            src = plan.tensors[t]
            if src in bounds:  # two quantized tensors on one source: the narrower grid clips
                lo, hi = max(lo, bounds[src][0]), min(hi, bounds[src][1])
            bounds[src] = (lo, hi)
        return bounds

    # -- range balancing ----------------------------------------------------------------------
    def _balance(self, model, plan: QuantPlan, data, workdir) -> None:
        """Scales the channels of every quantized tensor that only depthwise Convs read so they
        use more of the per-tensor range (:mod:`onnxshrink.analysis.balance`; exact on the
        calibration data)."""
        from onnxshrink.analysis.balance import apply_balance, balance_pairs, channel_max

        sources = set(plan.tensors.values())
        pairs = [p for p in balance_pairs(model.graph) if p.tensor.name in sources]
        if not pairs:
            return
        n = min(self.samples, data.n_samples)
        task = self.task(f"{self.name}: channel ranges", n)
        maxes = channel_max(model, [p.tensor.name for p in pairs], data, workdir, n, progress=task)
        task.done()
        gains = []
        for p in pairs:
            m = maxes[p.tensor.name]
            s = apply_balance(model.graph, p, m, self.balance_alpha)
            gains.append(float(np.mean(s)))
            self.change(f"balanced {p.tensor.name} ({len(m)} channels, scale x{s.min():.2g}..x{s.max():.2g}) "
                        f"between {p.producer.name} and {', '.join(u.name for u in p.consumers)}")
        self.details["balanced"] = {"tensors": len(pairs), "mean_scale": round(float(np.mean(gains)), 3)}

    # -- Hessian-aware rounding ---------------------------------------------------------------
    def _hessian_rounding(self, model, plan: QuantPlan, data, workdir) -> dict[str, tuple]:
        """Per weighted layer: (scale, int8 weights, new bias or None), rounded GPTQ-style."""
        refused: dict[str, str] = {}
        nodes = steerable([node for node in plan.nodes if node.op_type in WEIGHTED_OPS and len(node.inputs) > 1
                           and const_array(node.inputs[1]) is not None], refused)
        presets = {}
        errors = []
        if nodes:
            n = min(self.samples, data.n_samples)
            task = self.task(f"{self.name}: Hessian-aware rounding", n * chunks_needed(nodes))
            for node, H in usable_grams(model, nodes, data, workdir, n, refused, progress=task):
                presets[node.name] = self._round_layer(node, H)
                errors.append(presets[node.name][3])
            task.done()
        if refused:
            self.details["nearest_rounding"] = refused
        if errors:
            self.details["rounding"] = {"layers": len(errors),
                                        "output_error_nearest": round(float(np.mean([e[0] for e in errors])), 8),
                                        "output_error_hessian": round(float(np.mean([e[1] for e in errors])), 8)}
        return presets

    def _round_layer(self, node: ir.Node, H: np.ndarray) -> tuple:
        """(scale, int8 weights, bias or None, (error nearest, error Hessian)) of one layer."""
        axis = weight_axis(node)
        w = const_array(node.inputs[1])
        scale = weight_scale(w, axis, self.weights, self._pairs(node, w))
        q, b, errs, moved = round_int8(node, H, scale, axis, safe=self._safe)
        if moved:
            self._moved[node.name] = moved
        return scale, q, b, errs

    # -- rewrite ------------------------------------------------------------------------------
    def _rewrite(self, model, plan: QuantPlan, ranges, means, deltas=None, record: bool = True) -> None:
        graph = model.graph
        values = {v.name: v for v in all_values(graph)}
        params = plan.params(ranges)
        qp = {t: qparams(*params[t], self.activations) for t in plan.tensors}
        for node, act in plan.fused:
            out = node.outputs[0]
            act.outputs[0].replace_all_uses_with(out, replace_graph_outputs=False)
            graph.remove(act, safe=True)
            if record:
                self.change(f"fused {act.op_type} into {node.name or node.op_type}")
        for node in plan.nodes:
            if node.op_type in WEIGHTED_OPS and len(node.inputs) > 1 and const_array(node.inputs[1]) is not None:
                float_in = plan.inputs.get(node.name, (None, None))[0]
                mu = means.get(float_in) if means is not None else None
                delta = deltas.get(float_in) if deltas is not None else None
                self._quantize_weights(graph, node, mu, delta, record)
        shared: dict[tuple[float, int], tuple[ir.Value, ir.Value]] = {}
        for t in plan.tensors:
            self._insert(graph, values[t], *qp[t], shared)
        for node in list(graph):  # layers left float must stay float in onnxruntime too
            what, refusal = shield_float_layer(graph, node)
            if record and what:
                self.change(what)
            elif record and refusal:
                self.skip(node, refusal)
        if record:
            self.details["tensors"] = len(plan.tensors)
            self.details["nodes"] = len(plan.nodes)
            self.details["int8_cpu"] = {"cpu": self.cpu, "pair_rule": self._safe,
                                        "layers_moved": len(self._moved),
                                        "weights_moved": sum(self._moved.values())}

    def _empirical_bias(self, model, reference, data, workdir) -> None:
        """Sequential empirical bias correction of every Conv / Gemm with a constant bias against
        the float model saturated at the quantized grids (:func:`onnxshrink.analysis.bias.empirical_correction`):
        the clipping the ranges chose stays, the mean shift that rounding adds goes."""
        from onnxshrink.analysis.bias import empirical_correction

        known = {v.name for v in all_values(reference.graph)}
        nodes = [n for n in model.graph if n.op_type in ("Conv", "Gemm") and n.outputs[0].name in known
                 and not (n.op_type == "Gemm" and n.attributes.get_int("transA", 0))]
        if not nodes:
            return
        n = min(self.samples, data.n_samples)
        task = self.task(f"{self.name}: empirical bias correction", n * (len(nodes) + 1))
        moved = empirical_correction(model, reference, nodes, data, workdir, n, progress=task)
        task.done()
        if moved:
            shifts = sorted(moved.values())
            self.details["empirical_bias"] = {"layers": len(moved), "median_shift": round(shifts[len(shifts) // 2], 4),
                                              "largest_shift": round(shifts[-1], 4)}

    def _input_errors(self, model, plan: QuantPlan, ranges, data, workdir) -> dict[str, np.ndarray]:
        """Per-channel mean of Q(x) − x for each Conv/Gemm input x, on the calibration data:
        the part of the output bias error that weight rounding does not explain."""
        params = plan.params(dict(ranges))
        pairs = {f: q for f, q in plan.inputs.values() if q in params}
        if not pairs:
            return {}
        qp = {f: qparams(*params[q], self.activations) for f, q in pairs.items()}
        n = min(self.samples, data.n_samples)
        task = self.task(f"{self.name}: bias correction", n)
        shifts = quantization_shift(model, qp, self.activations, data, workdir, n, progress=task)
        task.done()
        return shifts

    def _quantize_weights(self, graph, node, mu, delta, record: bool = True) -> None:
        w = const_array(node.inputs[1])
        axis = weight_axis(node)
        preset = self._presets.get(node.name)
        if preset is not None:
            scale, q, b, _ = preset
            shape = [1] * w.ndim
            if axis is not None:
                shape[axis] = -1
            deq = self._pair_safe(graph, node, q, np.reshape(scale, shape), w, record)
            zp = np.zeros(len(scale), np.int8) if axis is not None else np.array(0, np.int8)
            # the weight is stored on its grid: QuantizeLinear gives back exactly q
            set_const_input(graph, node, 1, deq.astype(w.dtype), "weight_rounded")
            if b is not None:
                set_const_input(graph, node, 2, np.asarray(b).astype(w.dtype), "bias_rounded")
                if node.op_type == "Gemm":
                    node.attributes["alpha"] = ir.AttrFloat32("alpha", 1.0)
                    node.attributes["beta"] = ir.AttrFloat32("beta", 1.0)
            if delta is not None:
                subtract_from_bias(graph, node, apply_to_mean(node, deq, delta))
            mu = None  # the bias was re-solved with the weights
        elif axis is None:
            scale = weight_scale(w, None, pairs=self._pairs(node, w))
            q = np.clip(np.round(w / scale), -127, 127).astype(np.int8)
            zp = np.array(0, np.int8)
            deq = self._pair_safe(graph, node, q, float(scale), w, record)
        else:
            scale, q = quantize_weight(w, axis, self.weights, self._pairs(node, w))
            zp = np.zeros(len(scale), np.int8)
            shape = [1] * w.ndim
            shape[axis] = -1
            deq = self._pair_safe(graph, node, q, scale.reshape(shape), w, record)
        base = node.name or node.op_type
        s_val = _scalar_init(graph, f"{base}.weight_scale", scale)
        z_val = _scalar_init(graph, f"{base}.weight_zero_point", zp)
        attrs = {} if axis is None else {"axis": axis}
        q_node = ir.node("QuantizeLinear", [node.inputs[1], s_val, z_val], attributes=attrs,
                         name=unique_name(graph, f"{base}.weight_q"))
        dq_node = ir.node("DequantizeLinear", [q_node.outputs[0], s_val, z_val], attributes=attrs,
                          name=unique_name(graph, f"{base}.weight_dq"))
        q_node.outputs[0].name = unique_name(graph, f"{base}.weight_quantized")
        dq_node.outputs[0].name = unique_name(graph, f"{base}.weight_dequantized")
        graph.insert_before(node, [q_node, dq_node])
        node.replace_input_with(1, dq_node.outputs[0])
        if mu is not None and node.op_type in ("Conv", "Gemm"):
            self._correct_bias(graph, node, w, deq, mu, delta)
        if record:
            how = ", Hessian-aware rounding" if preset is not None else ""
            self.change(f"{base}: weights int8 {'per-channel' if axis is not None else 'per-tensor'}{how}")

    def _pairs(self, node, w):
        """The weight pairs an integer kernel adds in int16 (None: no rule, ``cpu=vnni``)."""
        return weight_pairs(node, w.shape) if self._safe else None

    def _pair_safe(self, graph, node, q, scale, w, record: bool) -> np.ndarray:
        """The dequantized weight q * scale, with every pair of the integer kernel's reduction
        axis within the pair rule first (``cpu=any``; :mod:`onnxshrink.analysis.saturation`); a
        weight that moved is stored on its grid (QuantizeLinear gives back exactly q)."""
        moved = 0
        if self._safe:
            q, moved = make_safe(q, w / scale, weight_pairs(node, np.shape(q)))
        deq = np.asarray(q, np.float64) * scale
        if moved:
            set_const_input(graph, node, 1, deq.astype(w.dtype), "weight_rounded")
            if record:
                self._moved[node.name] = self._moved.get(node.name, 0) + moved
        return deq

    def _correct_bias(self, graph, node, w, deq, mu, delta=None) -> None:
        """b -= (Q(W) − W)·E[x] + Q(W)·E[Q(x) − x]: the output mean shift that weight rounding and
        input quantization cause, per output channel (E[W_q x_q] − E[W x], expanded)."""
        shift = apply_to_mean(node, deq - w.astype(np.float64), mu)
        if delta is not None:
            shift = shift + apply_to_mean(node, deq, delta)
        subtract_from_bias(graph, node, shift)

    def _insert(self, graph, value: ir.Value, scale, zp, shared: dict) -> None:
        """Q -> DQ after ``value``; tensors with equal parameters share one scale/zero point
        initializer pair (so a scale-preserving op visibly reads and writes the same scale)."""
        base = value.name
        key = (float(scale), int(zp))
        if key not in shared:
            shared[key] = (_scalar_init(graph, f"{base}.scale", scale),
                           _scalar_init(graph, f"{base}.zero_point", zp))
        s_val, z_val = shared[key]
        q_node = ir.node("QuantizeLinear", [value, s_val, z_val], name=unique_name(graph, f"{base}.q"))
        dq_node = ir.node("DequantizeLinear", [q_node.outputs[0], s_val, z_val], name=unique_name(graph, f"{base}.dq"))
        q_node.outputs[0].name = unique_name(graph, f"{base}.quantized")
        dq = dq_node.outputs[0]
        dq.name = unique_name(graph, f"{base}.dequantized")
        if value.dtype is not None:
            dq.dtype = value.dtype
        insert_after_value(graph, value, [q_node, dq_node], dq)
        if value.is_graph_output():  # the dequantized tensor takes the output's name and type
            dq.type, dq.shape = value.type, value.shape
            idx = [i for i, o in enumerate(graph.outputs) if o is value]
            name = value.name
            value.name = unique_name(graph, f"{name}.float")
            dq.name = name
            for i in idx:
                graph.outputs[i] = dq


@dataclasses.dataclass
class QuantizePass(InsertQDQPass):
    """int8 quantization: BatchNormalization folded, calibrated QDQ insertion, then folding into
    the lean QDQ form.

    A BatchNormalization left in the graph would stay float between a DQ and a Q (onnxruntime
    then runs float kernels and requantizes around it: the digits CNN quantized without folding
    ran at 1.04-1.3x its fp32 latency, 0.61x with it), so ``quantize`` folds every BatchNorm it
    can into its Conv/ConvTranspose/Gemm first (exact, as the ``fold-batchnorm`` pass);
    ``insert-qdq`` alone does not.
    """

    name: ClassVar[str] = "quantize"

    def __post_init__(self) -> None:
        super().__post_init__()
        self._unfoldable: dict[str, str] = {}

    def _float_batchnorm(self, bn: ir.Node) -> str:
        why = self._unfoldable.get(bn.name, "")
        return f"BatchNormalization stays float between DQ and Q: it cannot be folded ({why})"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        from onnxshrink.passes.fold_qdq import FoldQDQPass

        folded_bn = False
        if self._model_refusal(model) is None:
            NameFixPass()(model)  # the skips of both steps name the same nodes
            folded_bn, self._unfoldable = self.fold_batchnorm(model)
        result = super().call(model)
        if not result.modified:
            return ir.passes.PassResult(model, modified=folded_bn)
        fold = FoldQDQPass()
        fold.bind(self.context)
        fold.call(model)
        self.details["folded"] = len(fold.changed)
        return ir.passes.PassResult(model, modified=True)

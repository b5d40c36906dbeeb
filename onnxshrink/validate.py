"""Validation: is the model after a pass still a valid model that agrees with the original?

For each candidate model (saved by path to a scratch folder, so external data and > 2 GB work):

1. ``onnx.checker.check_model`` on the file;
2. shape inference on the file (strict, unless the original itself fails strict inference);
3. output names and element types unchanged, static output dims unchanged;
4. an onnxruntime session opened by path with graph optimizations *disabled*, run on the
   validation data; each output's shape equal to the reference run's;
5. agreement (:class:`Fidelity`) with the model before the pass and with the original.

An exact pass must stay within ``max|Δ| <= EXACT_TOL * max(1, max|ref|)`` of the model before
it; a lossy pass must keep the cosine with the original at or above its fidelity floor.

A model with quantized activations also runs in an *optimized* session -- onnxruntime's integer
kernels, what users run -- and must agree with its run as written within rounding
(:func:`kernels_agree`): requantizing in the kernels moves values by one step where the float
simulation rounds the other way, a share of the quantization error itself, while saturating
kernels add an error of their own (the figures: docs/benchmarks.md, int8 on CPUs).
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from pathlib import Path

import numpy as np
import onnx

from onnxshrink import runtime
from onnxshrink.calibrate import batch_samples
from onnxshrink.errors import first_line
from onnxshrink.report import Fidelity

__all__ = [
    "BelowFloor",
    "EXACT_TOL",
    "INTEGER_OPS",
    "KERNEL_SHARE",
    "Invalid",
    "check_file",
    "compare",
    "exact_ok",
    "kernel_verdict",
    "kernels_agree",
    "uses_integer_kernels",
]

logger = logging.getLogger(__name__)

EXACT_TOL = 1e-4
NEGLIGIBLE = 1e-3  # a sample output this small next to the median is judged at the median
# integer kernels may add up to this share of the quantization error (1 − cosine with the
# original, as written), and 1e-5 at least, before they count as diverging
KERNEL_SHARE, KERNEL_FLOOR = 0.5, 1e-5
# ops after which onnxruntime runs integer kernels (a QuantizeLinear: activations quantized)
INTEGER_OPS = {
    "QuantizeLinear",
    "QLinearConv",
    "QLinearMatMul",
    "MatMulInteger",
    "ConvInteger",
    "QGemm",
    "DynamicQuantizeLinear",
    "DynamicQuantizeMatMul",
    "MatMulIntegerToFloat",
}


class Invalid(Exception):
    """The candidate model is broken; the message says how (one line)."""


class BelowFloor(Invalid):
    """A lossy pass's fidelity fell below its floor: ``drop`` = (1 − what the floor judges,
    1 − floor); ``cosine``: the outputs' cosine (what the floor judges, unless that is a task
    metric: it moves in steps on a few samples)."""

    def __init__(self, message: str, drop: tuple[float, float], cosine: float) -> None:
        super().__init__(message)
        self.drop, self.cosine = drop, cosine


@dataclasses.dataclass(frozen=True)
class Signature:
    """Names, element types and static dims of a model's outputs."""

    outputs: tuple[tuple[str, int, tuple[int | None, ...]], ...]

    @staticmethod
    def of(proto: onnx.ModelProto) -> Signature:
        outs = []
        for o in proto.graph.output:
            t = o.type.tensor_type
            dims = tuple(d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim)
            outs.append((o.name, t.elem_type, dims))
        return Signature(tuple(outs))

    def differs(self, other: Signature) -> str | None:
        if [o[0] for o in self.outputs] != [o[0] for o in other.outputs]:
            before, after = [o[0] for o in other.outputs], [o[0] for o in self.outputs]
            return f"output names changed: {before} -> {after}"
        for (name, t1, d1), (_, t2, d2) in zip(self.outputs, other.outputs):
            if t1 != t2:
                return f"output '{name}' changed element type"
            if len(d1) != len(d2) or any(
                a is not None and b is not None and a != b for a, b in zip(d1, d2)
            ):
                return f"output '{name}' changed shape {list(d2)} -> {list(d1)}"
        return None


def check_file(path: Path, *, strict_inference: bool = True) -> Signature:
    """Checker and shape inference on a saved model; raises :class:`Invalid`."""
    try:
        onnx.checker.check_model(str(path))
    except Exception as e:
        raise Invalid(f"onnx.checker: {first_line(e)}") from e
    with tempfile.TemporaryDirectory(prefix="onnxshrink-infer-") as tmp:
        out = Path(tmp) / "inferred.onnx"
        try:
            onnx.shape_inference.infer_shapes_path(
                str(path), str(out), check_type=True, strict_mode=strict_inference
            )
        except Exception as e:
            raise Invalid(f"shape inference: {first_line(e)}") from e
    return Signature.of(onnx.load(str(path), load_external_data=False))


def strict_inference_ok(path: Path) -> bool:
    try:
        check_file(path, strict_inference=True)
        return True
    except Invalid:
        return False


def _row_stats(r: np.ndarray, o: np.ndarray) -> np.ndarray:
    """[samples, 5] of one batch of an output: ‖r‖², ‖o‖², r·o, ‖o − r‖², max |o − r| per
    sample, in float64 one sample at a time (whole float64 copies of a decoder's logits --
    16 × 64 × 32000 -- cost 0.5 GB a side)."""
    ref_rows, out_rows = _rows(r), _rows(o)
    out = np.empty((len(ref_rows), 5))
    for i, (a, b) in enumerate(zip(ref_rows, out_rows)):
        a, b = a.astype(np.float64), b.astype(np.float64)
        d = b - a
        out[i] = a @ a, b @ b, a @ b, d @ d, np.abs(d).max(initial=0.0)
    return out


def _cosines(stats: list[np.ndarray]) -> np.ndarray:
    """Per-sample cosines of one output over all batches (see :func:`compare`) from their
    :func:`_row_stats`; batches may differ in width (a variable-length output)."""
    rr, oo, ro, err = np.concatenate(stats)[:, :4].T
    nr, no = np.sqrt(rr), np.sqrt(oo)
    typical = float(np.median(nr))
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.nan_to_num(np.where((nr == 0) & (no == 0), 1.0, ro / (nr * no)), nan=0.0)
    small = nr < NEGLIGIBLE * typical
    cos[small] = np.clip(1.0 - err[small] / (2.0 * typical**2), -1.0, 1.0)
    return cos


def _rows(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim == 0:
        return a.reshape(1, 1)
    return a.reshape(a.shape[0], -1) if a.ndim >= 2 else a.reshape(1, -1)


def compare(ref: runtime.Outputs, out: runtime.Outputs) -> Fidelity:
    """Agreement of ``out`` with ``ref`` (same data, same batches).

    Per sample and output, the cosine of the flattened outputs -- except where the reference
    is negligible (norm below NEGLIGIBLE of the output's median sample norm: a text detector's
    map of a page without text), whose cosine is noise: there the error is judged at the
    median norm m, 1 − ‖o − r‖²/(2m²), what a typical sample's cosine would be with it.
    """
    cosines: list[np.ndarray] = []
    max_abs, ref_max = 0.0, 0.0
    agree, total = 0, 0
    rows: dict[str, list[np.ndarray]] = {}
    for rb, ob in zip(ref, out):
        for name, r in rb.items():
            o = ob[name]
            if r.shape != o.shape:
                raise Invalid(
                    f"output '{name}' has shape {list(o.shape)}, expected {list(r.shape)}"
                )
            if not np.issubdtype(r.dtype, np.number) or r.dtype == np.bool_:
                mismatch = float(np.mean(r != o)) if r.size else 0.0
                max_abs = max(max_abs, mismatch)
                cosines.append(np.array([1.0 - mismatch]))
                continue
            if not np.isfinite(o).all():
                raise Invalid(f"output '{name}' has NaN or Inf values")
            stats = _row_stats(r, o)
            max_abs = max(max_abs, float(stats[:, 4].max(initial=0.0)))
            ref_max = max(ref_max, float(np.abs(r).max(initial=0.0)))
            rows.setdefault(name, []).append(stats)
            if r.ndim == 2 and r.shape[-1] >= 2 and np.issubdtype(r.dtype, np.floating):
                agree += int((r.argmax(-1) == o.argmax(-1)).sum())
                total += r.shape[0]
    cosines += [_cosines(stats) for stats in rows.values()]
    cos_all = np.concatenate(cosines) if cosines else np.ones(1)
    return Fidelity(
        cosine=float(np.clip(cos_all.mean(), -1, 1)),
        cosine_min=float(np.clip(cos_all.min(), -1, 1)),
        max_abs=max_abs,
        rel_max_abs=max_abs / ref_max if ref_max > 0 else max_abs,
        top1_agreement=agree / total if total else None,
        samples=sum(batch_samples(b) for b in ref),
    )


def exact_ok(f: Fidelity, ref: runtime.Outputs) -> bool:
    """max |Δ| within EXACT_TOL of the output scale -- or, for outputs of a coarser float type
    (float16: one rounding step is 9.8e-4 of the value), within 4 of its rounding steps."""
    arrays = [
        np.asarray(v)
        for b in ref
        for v in b.values()
        if np.issubdtype(np.asarray(v).dtype, np.number)
    ]
    ref_max = max(
        (float(np.abs(a.astype(np.float64)).max(initial=0.0)) for a in arrays), default=0.0
    )
    tol = max(
        [EXACT_TOL]
        + [4 * float(np.finfo(a.dtype).eps) for a in arrays if np.issubdtype(a.dtype, np.floating)]
    )
    return f.max_abs <= tol * max(1.0, ref_max)


def uses_integer_kernels(model) -> bool:
    """Whether onnxruntime runs integer kernels for ``model`` (an ``onnx_ir`` model)."""
    import onnx_ir as ir

    return any(n.op_type in INTEGER_OPS for n in ir.traversal.RecursiveGraphIterator(model.graph))


def kernels_agree(
    written: Fidelity, total: Fidelity, inherited: float = 0.0, kernels: Fidelity | None = None
) -> bool:
    """Do the integer kernels' outputs agree with the model as written within rounding?

    ``written`` compares the optimized run with the run as written, ``total`` the run as written
    with the original: the kernels may add at most ``KERNEL_SHARE`` of the quantization error's
    1 − cosine (and ``KERNEL_FLOOR``) -- one rounding the other way now and then, not an error of
    their own -- or half again the gap the model before the pass had (``inherited``: an int8
    input that already saturates here is not the pass's doing). An int8 model is chaotic: a
    requantization that rounds the other way changes what every layer after it rounds, so the
    two runs can part by nearly the whole quantization error with neither the worse. Hence
    also: ``kernels``, the optimized run against the original, no further from it than
    1 + ``KERNEL_SHARE`` times the run as written (saturation is several times further).
    """
    gap = 1.0 - written.cosine
    if gap <= max(KERNEL_SHARE * (1.0 - total.cosine), KERNEL_FLOOR, 1.5 * inherited):
        return True
    return kernels is not None and (1.0 - kernels.cosine) <= (1.0 + KERNEL_SHARE) * max(
        1.0 - total.cosine, KERNEL_FLOOR
    )


def kernel_verdict(
    written: Fidelity,
    total: Fidelity,
    cpu,
    unsafe: dict[str, int],
    for_vnni: bool,
    inherited: float = 0.0,
    kernels: Fidelity | None = None,
) -> tuple[str | None, str | None]:
    """(why the pass fails, or None; a warning, or None) from the kernels' agreement with the
    model as written (``written``), its error (``total``), this ``cpu``
    (:class:`onnxshrink.cpu.CPU`) and the layers whose weights break the pair rule. A pass told
    the model is for VNNI CPUs (``for_vnni``) on a CPU that saturates is validated as written,
    with a warning: this machine cannot run what the model is for. ``inherited``, ``kernels``:
    as for :func:`kernels_agree`."""
    if kernels_agree(written, total, inherited, kernels):
        return None, None
    gap = (
        f"an optimized session is at 1 − cosine {1 - written.cosine:.2e} from the model "
        f"as written, which is at {1 - total.cosine:.2e} from the original"
    )
    if kernels is not None:
        gap += f" (the optimized session: {1 - kernels.cosine:.2e})"
    if cpu.int8 != "exact" and unsafe:
        if for_vnni:
            return None, (
                f"cpu=vnni weights saturate this CPU's int8 kernels "
                f"({cpu.int8_kernel}) in {len(unsafe)} layers ({gap}); validated as "
                "written: run the model on VNNI/AMX or ARM CPUs, or quantize with "
                "cpu=any"
            )
        why = (
            f"integer kernels saturate on this CPU ({cpu.int8_kernel}): {len(unsafe)} layers "
            f"have int8 weight pairs with |w_a + w_b| > 128 ({gap}); quantize with cpu=any"
        )
        return why, None
    return f"onnxruntime's integer kernels disagree with the model as written: {gap}", None

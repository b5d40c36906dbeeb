"""int8 weights that onnxruntime's x86 kernels cannot saturate, on any CPU (the pair rule).

Without VNNI (:mod:`onnxshrink.cpu`) MLAS multiplies uint8 activations by int8 weights with
``vpmaddubsw``, adding the two products of each pair (2j, 2j+1) of the reduction axis in int16
with saturation. With x in [0, 255]^2 the pair's sum spans 255 * [min(0, a, b, a + b),
max(0, a, b, a + b)]: it fits int16 for every input iff |a + b| <= 128 (pairs of opposite signs
never saturate). VNNI, AMX and ARM accumulate in int32; weights that keep the rule give the
same integer results on every CPU.

The pairs run along the reduction axis in the order MLAS packs it: a Conv's weight is reordered
OIHW -> HWIO per group, k = tap * C_in/group + c, so the pairs cross taps when C_in/group is
odd; a Gemm/MatMul's K axis as is. Depthwise convs (one input and one output channel per
group) run a 16-bit kernel and cannot saturate. Measured on onnxruntime 1.32 under QEMU's
Haswell CPU: exactly these pairs saturate (tests/analysis/test_saturation.py).

Two steps keep the cost low. The scale: per output channel, s = max(max|w| / 127,
max|w_a + w_b| / 128) -- the finest grid on which the unrounded pairs keep the rule (a channel
loses at most one bit, only as much as its largest pair needs; moving pairs at the full-range
scale instead costs up to 99 grid steps per pair). The rounding: a pair that rounding pushes to
+-129.. goes back to +-128, split so the squared rounding error grows least (:func:`make_safe`),
or Hessian-aware rounding rounds the second weight of each pair within the rule
(:func:`onnxshrink.analysis.rounding.round_int8`).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxshrink.irtools import const_array

__all__ = [
    "LIMIT",
    "bad_pairs",
    "input_partners",
    "int8_layers",
    "make_safe",
    "pair_bounds",
    "pair_scale",
    "pairs",
    "unsafe_layers",
    "vnni_only",
    "weight_pairs",
]

LIMIT = 128  # |a + b| <= LIMIT: 255 * 128 = 32640 fits int16


def _conv_order(shape: tuple[int, ...], group: int) -> np.ndarray | None:
    """Flat indices of a Conv weight [O, C/g, *k] as [O, K] rows in MLAS's order (None:
    depthwise)."""
    o, cg = shape[0], shape[1]
    taps = int(np.prod(shape[2:], dtype=np.int64))
    if cg == 1 and o // max(group, 1) == 1:
        return None
    return np.arange(o * cg * taps).reshape(o, cg, taps).transpose(0, 2, 1).reshape(o, taps * cg)


def _kernel_rows(
    op_type: str, shape: tuple[int, ...], group: int, trans_b: int
) -> np.ndarray | None:
    """Flat indices of the weight as [outputs, K]: each output's reduction in the order MLAS
    packs it (None: no saturating kernel for this op or layout)."""
    shape = tuple(int(d) for d in shape)
    if op_type in ("Conv", "QLinearConv") and len(shape) >= 3:
        return _conv_order(shape, group)
    if op_type in ("Gemm", "QGemm") and len(shape) == 2:
        idx = np.arange(shape[0] * shape[1]).reshape(shape)
        return idx if trans_b else idx.T
    if op_type in ("MatMul", "MatMulInteger", "QLinearMatMul") and len(shape) >= 2:
        k, n = shape[-2], shape[-1]
        return np.arange(int(np.prod(shape))).reshape(-1, k, n).transpose(0, 2, 1).reshape(-1, k)
    return None


def pairs(op_type: str, shape: tuple[int, ...], *, group: int = 1, trans_b: int = 0):
    """(ia, ib): flat indices into the weight of every pair MLAS adds in int16, or None when the
    op's integer kernel cannot saturate (depthwise) or is not one of Conv/Gemm/MatMul."""
    rows = _kernel_rows(op_type, shape, group, trans_b)
    if rows is None:
        return None
    even = rows.shape[1] // 2 * 2
    return rows[:, 0:even:2].ravel(), rows[:, 1:even:2].ravel()


def weight_pairs(node: ir.Node, shape: tuple[int, ...]):
    """:func:`pairs` for the weight of ``node`` (its attributes give group and transB)."""
    return pairs(
        node.op_type,
        shape,
        group=node.attributes.get_int("group", 1),
        trans_b=node.attributes.get_int("transB", 0),
    )


def pair_scale(w: np.ndarray, idx, axis: int | None) -> np.ndarray | float:
    """max |w_a + w_b| / LIMIT over the pairs of each output channel along ``axis`` (one value
    for the tensor when ``axis`` is None): the smallest scale at which no pair breaks the rule
    before rounding. Zeros where a channel has no pair (or ``idx`` is None)."""
    w = np.asarray(w, np.float64)
    n = 1 if axis is None else w.shape[axis]
    out = np.zeros(n)
    if idx is not None and len(idx[0]):
        flat = w.ravel()
        sums = np.abs(flat[idx[0]] + flat[idx[1]]) / LIMIT
        chan = (
            np.zeros(len(sums), np.int64)
            if axis is None
            else np.unravel_index(idx[0], w.shape)[axis]
        )
        np.maximum.at(out, chan, sums)
    return float(out[0]) if axis is None else out


def bad_pairs(q: np.ndarray, idx) -> int:
    """How many pairs of the int8 weight ``q`` break the rule (0 when ``idx`` is None)."""
    if idx is None:
        return 0
    flat = np.asarray(q, np.int32).ravel()
    return int(np.count_nonzero(np.abs(flat[idx[0]] + flat[idx[1]]) > LIMIT))


def make_safe(q: np.ndarray, target: np.ndarray, idx) -> tuple[np.ndarray, int]:
    """``q`` (int8 grid values) with every bad pair's sum moved back to +-LIMIT, and how many
    weights changed. ``target`` holds the unrounded values (w / scale): of the pair's excess
    e = |a + b| - LIMIT, a takes d_a = round((e + r_a - r_b) / 2), clipped to [0, e], where r is
    how far each was rounded away from zero -- the split with the least squared error."""
    q = np.array(q, np.int32)
    if idx is None:
        return q.astype(np.int8), 0
    flat, t = q.reshape(-1), np.asarray(target, np.float64).reshape(-1)
    ia, ib = idx
    a, b = flat[ia], flat[ib]
    s = a + b
    bad = np.abs(s) > LIMIT
    if not bad.any():
        return q.astype(np.int8), 0
    ia, ib, a, b, s = ia[bad], ib[bad], a[bad], b[bad], s[bad]
    sign = np.sign(s)
    e = np.abs(s) - LIMIT
    ra, rb = sign * (a - t[ia]), sign * (b - t[ib])
    da = np.clip(
        np.round((e + ra - rb) / 2), np.maximum(0, e - np.abs(b)), np.minimum(e, np.abs(a))
    ).astype(np.int32)
    flat[ia] = a - sign * da
    flat[ib] = b - sign * (e - da)
    changed = int(np.count_nonzero(da) + np.count_nonzero(e - da))
    return q.astype(np.int8), changed


def input_partners(node: ir.Node, shape: tuple[int, ...]) -> np.ndarray | None:
    """For each input row of the per-group system of
    :func:`onnxshrink.analysis.refit.current_solution` (a Conv's row c * taps + t; a
    Gemm's/MatMul's row k), the row it is paired with in MLAS's order, or -1 (the odd last one);
    None when the layer cannot saturate. The first output's reduction (:func:`_kernel_rows`)
    gives the pairs: every output is paired alike."""
    trans_b = node.attributes.get_int("transB", 0)
    if node.op_type not in ("Conv", "Gemm", "MatMul"):
        return None
    rows = _kernel_rows(node.op_type, shape, node.attributes.get_int("group", 1), trans_b)
    if rows is None:
        return None
    first = rows[0]  # flat weight indices; the system's rows for a Conv and a [N, K] Gemm
    if node.op_type != "Conv" and not (node.op_type == "Gemm" and trans_b):
        first = first // int(shape[-1])  # a [K, N] weight: row k starts at k * N
    partner = np.full(len(first), -1)
    even = len(first) // 2 * 2
    partner[first[0:even:2]], partner[first[1:even:2]] = first[1:even:2], first[0:even:2]
    return partner


def pair_bounds(partner_q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The int8 interval a weight may take beside an already rounded partner ``partner_q``."""
    return np.maximum(-127, -LIMIT - partner_q), np.minimum(127, LIMIT - partner_q)


# ConvInteger is not here: onnxruntime runs it on kernels that do not saturate (measured)
_WEIGHT_INPUT = {
    "Conv": 1,
    "Gemm": 1,
    "MatMul": 1,
    "MatMulInteger": 1,
    "QLinearConv": 3,
    "QLinearMatMul": 3,
    "QGemm": 3,
}


def _int8_weight(node: ir.Node) -> np.ndarray | None:
    """The int8 constant an integer kernel of ``node`` would multiply by, or None."""
    i = _WEIGHT_INPUT.get(node.op_type)
    if i is None or len(node.inputs) <= i or node.inputs[i] is None:
        return None
    w = node.inputs[i]
    if node.op_type in ("Conv", "Gemm", "MatMul"):
        dq = w.producer()
        x = node.inputs[0].producer() if node.inputs[0] is not None else None
        if (
            dq is None
            or dq.op_type != "DequantizeLinear"
            or x is None
            or x.op_type != "DequantizeLinear"
        ):
            return None  # float weight or float input: onnxruntime runs it in float
        w = dq.inputs[0]
    arr = const_array(w)
    return arr if arr is not None and arr.dtype == np.int8 else None


def int8_layers(model: ir.Model) -> list[str]:
    """Names of the layers whose integer kernels multiply by int8 weights."""
    return [
        n.name or n.op_type
        for n in ir.traversal.RecursiveGraphIterator(model.graph)
        if _int8_weight(n) is not None
    ]


def unsafe_layers(model: ir.Model) -> dict[str, int]:
    """Node name -> bad pairs, for every layer whose int8 weights break the rule (the layers
    whose integer kernels give other results on CPUs without VNNI)."""
    out: dict[str, int] = {}
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        q = _int8_weight(node)
        if q is None:
            continue
        op = {
            "QLinearConv": "Conv",
            "MatMulInteger": "MatMul",
            "QLinearMatMul": "MatMul",
            "QGemm": "Gemm",
        }.get(node.op_type, node.op_type)
        idx = pairs(
            op,
            q.shape,
            group=node.attributes.get_int("group", 1),
            trans_b=node.attributes.get_int("transB", 0),
        )
        if n := bad_pairs(q, idx):
            out[node.name or node.op_type] = n
    return out


def vnni_only(model: ir.Model) -> str | None:
    """A warning for a report when ``model``'s int8 weights break the pair rule, else None."""
    if unsafe := unsafe_layers(model):
        return (
            f"{len(unsafe)} layers have int8 weight pairs with |w_a + w_b| > 128: on x86 CPUs "
            "without VNNI (AVX2, AVX-512 without VNNI) their integer kernels saturate and give "
            "other outputs (quantize with cpu=any for a model that is right on every CPU)"
        )
    return None

"""The weight layout of onnxruntime's ``MatMulNBits`` (com.microsoft): Y = A · dequant(B)ᵀ.

A MatMul weight W [K, N] is quantized per column n in blocks of ``block`` rows of K (the last
block padded with zeros): codes c ∈ [0, 2^bits − 1] with w ≈ s·(c − z)
(:func:`onnxshrink.analysis.blockquant.block_quantize` on Wᵀ). The op reads B as uint8
[N, ⌈K / block⌉, block · bits / 8] with the codes packed low bits first along K, scales
[N, ⌈K / block⌉] float, zero points packed the same way per column, ⌈blocks · bits / 8⌉ bytes
each (absent: 2^(bits − 1)). The grid of each block (:func:`block_grid`) is chosen by a weighted
error over a few clipping shares; the codes on it are rounded to nearest or Hessian-aware
(:func:`gptq_codes`).
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "CLIPS",
    "block_grid",
    "dequantized",
    "gptq_codes",
    "nearest_codes",
    "pack",
    "pack_codes",
    "unpack_codes",
]


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Codes [.., L] (each < 2^bits, L · bits a multiple of 8) packed low bits first into
    uint8 [.., L · bits / 8]."""
    c = np.asarray(codes, np.uint8)
    if bits == 8:
        return c.copy()
    per = 8 // bits
    c = c.reshape(*c.shape[:-1], -1, per).astype(np.uint16)
    shifts = (np.arange(per) * bits).astype(np.uint16)
    return np.bitwise_or.reduce(c << shifts, axis=-1).astype(np.uint8)


def unpack_codes(packed: np.ndarray, bits: int, length: int) -> np.ndarray:
    """The inverse of :func:`pack_codes`, cut to ``length`` codes."""
    p = np.asarray(packed, np.uint8)
    if bits == 8:
        return p[..., :length].copy()
    per = 8 // bits
    shifts = (np.arange(per) * bits).astype(np.uint8)
    c = (p[..., None] >> shifts) & ((1 << bits) - 1)
    return c.reshape(*p.shape[:-1], -1)[..., :length].astype(np.uint8)


def pack(w: np.ndarray, bits: int, block: int, codes=None, scales=None, zero_points=None):
    """(B, scales, zero points) of the MatMul weight ``w`` [K, N] for MatMulNBits; ``codes``
    [N, K'] (K' = K padded to blocks), ``scales`` and ``zero_points`` [N, K' / block] when
    already chosen (Hessian-aware rounding), else rounded to nearest."""
    from onnxshrink.analysis.blockquant import block_quantize

    k, n = w.shape
    blocks = -(-k // block)
    if codes is None:
        wt = np.zeros((n, blocks * block), np.float32)
        wt[:, :k] = np.asarray(w, np.float32).T
        codes, scales, zero_points = block_quantize(wt, bits, block)
    b = pack_codes(codes, bits).reshape(n, blocks, block * bits // 8)
    zp_bytes = -(-blocks * bits // 8)
    zp = np.zeros((n, zp_bytes * 8 // bits), np.uint8)
    zp[:, :blocks] = zero_points
    return b, np.asarray(scales, np.float32), pack_codes(zp, bits)


CLIPS = np.linspace(1.0, 0.7, 7)  # shares of each block's range tried by :func:`block_grid`


def _pad(w: np.ndarray, block: int) -> np.ndarray:
    """``w`` [K, N] as [N, K'] with K' = K padded with zeros to whole blocks."""
    k, n = w.shape
    out = np.zeros((n, -(-k // block) * block), np.float64)
    out[:, :k] = np.asarray(w, np.float64).T
    return out


def _grid(lo, hi, top):
    scale = np.where(hi > lo, (hi - lo) / top, 1.0)
    zp = np.clip(np.round(-lo / scale), 0, top)
    return scale, zp


def _by_columns(fn, w: np.ndarray, *per_column) -> tuple | np.ndarray:
    """``fn(w[:, cols], *(a[cols] ...))`` over chunks of ``w``'s columns, joined on axis 0:
    every function here treats each output column on its own, so its temporaries need not
    span an embedding-sized matrix (float64 copies of a 32000 x 2048 head: 0.5 GB each)."""
    from onnxshrink.analysis.blockquant import chunks

    parts = [fn(w[:, c], *(a[c] for a in per_column)) for c in chunks(w.shape[1], w.shape[0])]
    if isinstance(parts[0], tuple):
        return tuple(np.concatenate(p) for p in zip(*parts))
    return np.concatenate(parts)


def block_grid(
    w: np.ndarray, bits: int, block: int, h: np.ndarray | None = None, symmetric: bool = False
):
    """(scales, zero points) [N, blocks] of ``w`` [K, N]: per block, the range [lo, hi] ∋ 0
    shrunk by the share of :data:`CLIPS` that minimises Σ h_k (w_k − ŵ_k)² -- ``h`` the
    input's second moments (diag H, activation-aware: an input that is large costs more), or
    1 without data. ``symmetric``: z = 2^(bits−1) (MatMulNBits' default zero point) and
    s = r·max|w| / d, d ∈ {2^(bits−1) − 1, 2^(bits−1)}, by the same criterion."""
    return _by_columns(lambda part: _block_grid(part, bits, block, h, symmetric), w)


def _candidates(lo0, hi0, bits: int, symmetric: bool):
    """(scale, zero point) pairs tried per block: the range shrunk by each of :data:`CLIPS`."""
    top, mid = 2**bits - 1, 2 ** (bits - 1)
    amax = np.maximum(-lo0, hi0)
    for r in CLIPS:
        if not symmetric:
            yield _grid(lo0 * r, hi0 * r, top)
            continue
        for d in (mid - 1, mid):
            yield np.where(amax > 0, amax * r / d, 1.0), np.full(amax.shape, float(mid))


def _block_grid(w: np.ndarray, bits: int, block: int, h: np.ndarray | None, symmetric: bool):
    wt = _pad(w, block)
    n, kp = wt.shape
    b = wt.reshape(n, kp // block, block)
    hk = np.ones(kp) if h is None else np.concatenate([h, np.zeros(kp - len(h))])
    hb = hk.reshape(1, kp // block, block)
    lo0, hi0 = np.minimum(b.min(-1), 0.0), np.maximum(b.max(-1), 0.0)
    top = 2**bits - 1
    best, best_err = None, np.full(lo0.shape, np.inf)
    for scale, zp in _candidates(lo0, hi0, bits, symmetric):
        q = np.clip(np.round(b / scale[..., None]) + zp[..., None], 0, top)
        err = np.sum(hb * (b - (q - zp[..., None]) * scale[..., None]) ** 2, -1)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best = (
            (scale, zp)
            if best is None
            else tuple(np.where(better, x, y) for x, y in zip((scale, zp), best))
        )
    return best[0].astype(np.float32), best[1].astype(np.uint8)


def nearest_codes(w: np.ndarray, scales, zps, bits: int, block: int) -> np.ndarray:
    """Codes [N, K'] of ``w`` [K, N] rounded to nearest on the grid."""
    return _by_columns(
        lambda part, s, z: _nearest_codes(part, s, z, bits, block),
        w,
        np.asarray(scales),
        np.asarray(zps),
    )


def _nearest_codes(w: np.ndarray, scales, zps, bits: int, block: int) -> np.ndarray:
    wt = _pad(w, block)
    s = np.repeat(np.asarray(scales, np.float64), block, 1)
    z = np.repeat(np.asarray(zps, np.float64), block, 1)
    return np.clip(np.round(wt / s) + z, 0, 2**bits - 1).astype(np.uint8)


def dequantized(codes, scales, zps, block: int, k: int) -> np.ndarray:
    """ŵ [K, N] from codes [N, K']."""
    s = np.repeat(np.asarray(scales, np.float64), block, 1)
    z = np.repeat(np.asarray(zps, np.float64), block, 1)
    return ((codes.astype(np.float64) - z) * s)[:, :k].T


def gptq_codes(H, w, scales, zps, bits: int, block: int, damp: float) -> np.ndarray:
    """Codes [N, K'] of ``w`` [K, N] rounded Hessian-aware (GPTQ on ``H`` [1, K, K]) onto the
    fixed per-block grid (:func:`onnxshrink.analysis.rounding.hessian_round`)."""
    from onnxshrink.analysis.rounding import hessian_round

    k, n = w.shape
    codes = nearest_codes(w, scales, zps, bits, block)
    s, z, top = np.asarray(scales, np.float64), np.asarray(zps, np.float64), 2**bits - 1

    def project(rows, src):
        i = int(src[0])
        c = np.clip(np.round(rows[0] / s[:, i // block]) + z[:, i // block], 0, top)
        codes[:, i] = c
        return ((c - z[:, i // block]) * s[:, i // block])[None]

    hessian_round(H, np.asarray(w, np.float64)[None], project, bias=False, damp=damp)
    return codes

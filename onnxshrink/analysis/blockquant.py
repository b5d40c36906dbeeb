"""Block-wise asymmetric quantization of a weight, as onnxruntime's block-quantized ops read it.

A row of a weight is cut into blocks of ``block`` values along its last axis; each block gets
its own scale s and zero point z on a ``bits``-bit unsigned grid: with lo = min(0, min x) and
hi = max(0, max x) over the block, s = (hi − lo) / (2^bits − 1), z = round(−lo / s), and
q = clip(round(x / s) + z, 0, 2^bits − 1), so x ≈ s·(q − z) with 0 exact and every error at
most s / 2. This is the layout of ``GatherBlockQuantized`` (com.microsoft): data [.., D] as
uint8 (8 bits) or uint4, scales and zero points [.., D / block].
"""

from __future__ import annotations

import numpy as np

__all__ = ["CHUNK", "block_quantize", "block_size", "chunks", "dequantize"]


def block_size(width: int, sizes: tuple[int, ...] = (128, 64, 32, 16)) -> int | None:
    """The largest of ``sizes`` that divides ``width`` (None: none does)."""
    return next((b for b in sizes if width % b == 0), None)


CHUNK = 1 << 21  # values per chunk: float64 temporaries of 16 MB, not of a whole table


def chunks(count: int, width: int, budget: int = CHUNK) -> list[slice]:
    """Slices cutting ``count`` rows (or columns) of ``width`` values each into chunks of at
    most ``budget`` values (one row at least)."""
    step = max(1, budget // max(1, width))
    return [slice(i, i + step) for i in range(0, count, step)]


def block_quantize(
    w: np.ndarray, bits: int, block: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(q uint8 [.., D], scales float32 [.., D / block], zero points uint8 [.., D / block])."""
    w = np.asarray(w, np.float32)
    if w.ndim == 2 and w.size > CHUNK:  # rows in chunks
        parts = [block_quantize(w[c], bits, block) for c in chunks(len(w), w.shape[1])]
        return tuple(np.concatenate(p) for p in zip(*parts))
    *lead, d = w.shape
    b = w.reshape(*lead, d // block, block).astype(np.float64)
    lo = np.minimum(b.min(-1), 0.0)
    hi = np.maximum(b.max(-1), 0.0)
    top = 2**bits - 1
    scale = (hi - lo) / top
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    zp = np.clip(np.round(-lo / scale), 0, top)
    q = np.clip(np.round(b / scale[..., None]) + zp[..., None], 0, top)
    return q.reshape(w.shape).astype(np.uint8), scale, zp.astype(np.uint8)


def dequantize(q: np.ndarray, scale: np.ndarray, zp: np.ndarray, block: int) -> np.ndarray:
    """s·(q − z), blocks along the last axis: what the op computes."""
    *lead, d = q.shape
    b = q.reshape(*lead, d // block, block).astype(np.float32) - zp[..., None]
    return (b * scale[..., None]).reshape(q.shape)

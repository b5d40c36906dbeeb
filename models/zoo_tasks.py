"""Task metrics for zoo models, with each package's own post-processing (``--metric``).

``nudenet_f1``: the YOLOv8 detector's detections as nudenet itself decodes them (score ≥ 0.2,
OpenCV NMS), matched to the reference's per sample (same class, IoU ≥ 0.5, greedily by IoU);
F1 = 2·matched / (reference detections + candidate detections), over all samples; 1 when
neither model detects anything. Raw-output cosine hides lost detections (box coordinates, in
pixels, outweigh the class scores); this does not.

    onnxshrink compress 320n.onnx -o small.onnx -p prune --data d.npz \
        --metric models/zoo_tasks.py:nudenet_f1
"""

from __future__ import annotations

import numpy as np

__all__ = ["detections", "nudenet_f1"]

SIZE = 320  # the detector's input side (nudenet's 320n model)


def detections(output: np.ndarray) -> list[list[dict]]:
    """nudenet's detections per sample of the raw output ``[N, 84, boxes]`` (or ``[84, boxes]``
    for one), in the model's pixel coordinates."""
    from nudenet.nudenet import _postprocess

    out = output if output.ndim == 3 else output[None]
    return [_postprocess([s[None]], 0, 0, 1, 1, SIZE, SIZE, SIZE, SIZE) for s in out]


def _iou(a: list[int], b: list[int]) -> float:
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    w = max(0, min(ax + aw, bx + bw) - max(ax, bx))
    h = max(0, min(ay + ah, by + bh) - max(ay, by))
    union = aw * ah + bw * bh - w * h
    return w * h / union if union > 0 else 0.0


def _matched(ref: list[dict], new: list[dict], least: float = 0.5) -> int:
    pairs = sorted(
        (
            (_iou(r["box"], n["box"]), i, j)
            for i, r in enumerate(ref)
            for j, n in enumerate(new)
            if r["class"] == n["class"]
        ),
        reverse=True,
    )
    used_r, used_n = set(), set()
    for iou, i, j in pairs:
        if iou >= least and i not in used_r and j not in used_n:
            used_r.add(i)
            used_n.add(j)
    return len(used_r)


def nudenet_f1(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray]) -> float:
    """Detection F1 of ``candidate`` against ``reference`` (see the module docstring)."""
    (name,) = reference  # the detector has one output
    ref, new = detections(reference[name]), detections(candidate[name])
    matched = sum(_matched(r, n) for r, n in zip(ref, new))
    total = sum(map(len, ref)) + sum(map(len, new))
    return 1.0 if total == 0 else 2.0 * matched / total

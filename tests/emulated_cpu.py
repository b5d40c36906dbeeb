"""onnxruntime on an emulated CPU without VNNI: its real AVX2 int8 kernels, on any x86 machine.

onnxruntime has no switch that turns VNNI dispatch off (MLAS reads CPUID once at start-up), so
the AVX2 kernels -- whose u8 x s8 pair sums saturate -- run only on a CPU without VNNI. QEMU's
user-mode emulator (Debian package ``qemu-user``) runs this same Python and onnxruntime with the
CPUID of a Haswell (AVX2, no AVX-512, no VNNI): MLAS then picks exactly the kernels an AVX2-only
machine runs. About 10-30x slower than native: for small models and few samples.

``ONNXSHRINK_TEST_CPU=Haswell pytest ...`` makes :func:`tests.helpers.ort_run` run every
optimized session this way, so the whole suite's integer-kernel checks run as on AVX2.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx

__all__ = ["QEMU", "available", "needs_qemu", "run"]

QEMU = shutil.which("qemu-x86_64")
CPU_MODEL = "Haswell"  # AVX2 + FMA, no AVX-512, no VNNI

_SCRIPT = """
import sys, numpy as np, onnxruntime as ort
model, feeds, out, optimize = sys.argv[1:5]
opts = ort.SessionOptions()
opts.log_severity_level = 4
opts.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize == "1"
                                 else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
s = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
with np.load(feeds) as z:
    f = {k: z[k] for k in z.files}
np.savez(out, *s.run(None, f))
"""


def available() -> bool:
    """QEMU's x86-64 user-mode emulator is installed and this is an x86-64 machine."""
    import platform

    return QEMU is not None and platform.machine().lower() in ("x86_64", "amd64")


def _needs_qemu():
    import pytest

    # locally skipped without QEMU; in CI (.ci/run installs it) a missing QEMU fails loudly
    return pytest.mark.skipif(
        not available() and not os.environ.get("CI"),
        reason="qemu-x86_64 not installed (Debian package qemu-user)",
    )


def run(
    model: onnx.ModelProto | str | os.PathLike,
    feeds: dict[str, np.ndarray],
    *,
    optimize: bool = True,
    cpu: str = CPU_MODEL,
    timeout: float = 600,
) -> list[np.ndarray]:
    """The model's outputs on ``feeds`` in an onnxruntime session on the emulated ``cpu``."""
    if not available():
        raise RuntimeError("qemu-x86_64 is not installed (Debian package qemu-user)")
    with tempfile.TemporaryDirectory(prefix="onnxshrink-qemu-") as tmp:
        tmp = Path(tmp)
        if isinstance(model, onnx.ModelProto):
            path = tmp / "model.onnx"
            onnx.save(model, str(path))
        else:
            path = Path(model)
        np.savez(tmp / "feeds.npz", **feeds)
        cmd = [
            QEMU,
            "-cpu",
            cpu,
            sys.executable,
            "-c",
            _SCRIPT,
            str(path),
            str(tmp / "feeds.npz"),
            str(tmp / "out.npz"),
            "1" if optimize else "0",
        ]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            errors = [
                line
                for line in done.stderr.splitlines()
                if not line.startswith("qemu-x86_64: warning")
            ]
            raise RuntimeError(f"onnxruntime under qemu ({cpu}) failed: {' | '.join(errors[-3:])}")
        with np.load(tmp / "out.npz") as z:
            return [z[f"arr_{i}"] for i in range(len(z.files))]


needs_qemu = _needs_qemu()

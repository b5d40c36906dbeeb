"""This machine's CPU, as onnxruntime's int8 kernels see it: do u8 x s8 products saturate?

MLAS (onnxruntime's CPU kernels) picks its u8s8 GEMM and convolution kernels at start-up from
CPUID (``platform.cpp``): with AVX2, AVX-512 (BW) or SSE4.1 alone they use ``(v)pmaddubsw``,
which adds each adjacent pair of uint8 x int8 products in int16 *with saturation*; with
AVX-VNNI or AVX512-VNNI (``vpdpbusd``) and with AMX they accumulate in int32, exactly. A model
whose int8 weights break the pair rule (:mod:`onnxshrink.analysis.saturation`) gives other
outputs on the first kind of CPU. ARM's kernels (NEON, dot product, i8mm) widen first: exact.

Features come from CPUID as numpy's runtime dispatch reads it -- what this process sees, under
an emulator too (QEMU, Rosetta) -- plus AVX-VNNI and AMX from ``/proc/cpuinfo`` (numpy does not
report them), trusted only where both sources agree on AVX2 and AVX-512.
"""

from __future__ import annotations

import dataclasses
import functools
import platform
from pathlib import Path
from typing import Literal

__all__ = ["CPU", "INT8_FLAGS", "detect", "this_cpu"]

# the flags that decide onnxruntime's int8 kernel, in the order they are shown
INT8_FLAGS = ("sse4_1", "avx2", "avx512bw", "avx_vnni", "avx512_vnni", "amx_int8")

Int8Kind = Literal["exact", "saturating", "unknown"]


@dataclasses.dataclass(frozen=True)
class CPU:
    """A CPU's model name, architecture and flags, and what that means for int8 kernels."""

    model: str
    arch: str
    flags: frozenset[str] = frozenset()
    known: bool = True  # False: the flags could not be read

    @property
    def x86(self) -> bool:
        return self.arch.lower() in ("x86_64", "amd64", "i386", "i686", "x86")

    @property
    def int8(self) -> Int8Kind:
        """``saturating`` where MLAS's u8s8 kernels add product pairs in int16, else ``exact``."""
        if not self.x86:
            return "exact"
        if not self.known:
            return "unknown"
        f = self.flags
        if "amx_int8" in f or "avx512_vnni" in f:
            return "exact"
        if {"avx512f", "avx512bw", "avx512dq", "avx512vl"} <= f:
            return "saturating"  # MLAS prefers its AVX-512 kernel (vpmaddubsw) over AVX-VNNI
        if "avx_vnni" in f:
            return "exact"
        if "avx2" in f:
            return "saturating"
        return "exact"  # SSE2 kernels widen to int16 before multiplying (Linux builds)

    @property
    def int8_kernel(self) -> str:
        """The kernel family, in words: ``"AVX512-VNNI"``, ``"AVX2 (no VNNI)"``, ..."""
        f = self.flags
        if not self.x86:
            return f"{self.arch} (int32 accumulation)"
        if not self.known:
            return "unknown x86 CPU"
        if "amx_int8" in f:
            return "AMX"
        if "avx512_vnni" in f:
            return "AVX512-VNNI"
        if {"avx512f", "avx512bw", "avx512dq", "avx512vl"} <= f:
            return "AVX-512 (no VNNI)"
        if "avx_vnni" in f:
            return "AVX-VNNI"
        if "avx2" in f:
            return "AVX2 (no VNNI)"
        return "SSE"

    def summary(self) -> str:
        """One line for reports: model, int8 flags, and whether int8 kernels saturate here."""
        flags = " ".join(x for x in INT8_FLAGS if x in self.flags) or "none of " + "/".join(
            INT8_FLAGS
        )
        verdict = {
            "exact": "exact",
            "saturating": "u8s8 pair sums saturate in int16",
            "unknown": "unknown",
        }[self.int8]
        return f"{self.model} ({flags}): int8 kernels {self.int8_kernel}, {verdict}"

    def to_dict(self) -> dict[str, object]:
        return {
            "model": self.model,
            "arch": self.arch,
            "int8_flags": [x for x in INT8_FLAGS if x in self.flags],
            "int8_kernel": self.int8_kernel,
            "int8": self.int8,
        }


# numpy's runtime CPU features -> /proc/cpuinfo flag names
_NUMPY_FLAGS = {
    "SSE41": "sse4_1",
    "AVX2": "avx2",
    "AVX512F": "avx512f",
    "AVX512BW": "avx512bw",
    "AVX512DQ": "avx512dq",
    "AVX512VL": "avx512vl",
    "AVX512VNNI": "avx512_vnni",
}


def _cpuinfo(text: str) -> tuple[str, frozenset[str]]:
    model, flags = "", frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "cpu model") and not model:
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = frozenset(value.split())
    return model, flags


def _numpy_flags() -> frozenset[str] | None:
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as features
    except ImportError:  # numpy < 2
        try:
            from numpy.core._multiarray_umath import __cpu_features__ as features
        except ImportError:
            return None
    return frozenset(name for key, name in _NUMPY_FLAGS.items() if features.get(key))


def detect(cpuinfo: str, seen: frozenset[str] | None, arch: str) -> CPU:
    """The CPU from ``/proc/cpuinfo``'s text and the flags this process sees (``seen``, from
    CPUID; None if unknown). Where they disagree the process runs on an emulated CPU: only what
    it sees counts."""
    model, flags = _cpuinfo(cpuinfo)
    if seen is None:
        return CPU(model or arch, arch, flags, known=bool(flags))
    checked = {"avx2", "avx512f"}
    if flags and (flags & checked) == (seen & checked):
        return CPU(model or arch, arch, seen | (flags & {"avx_vnni", "amx_int8", "amx_tile"}))
    return CPU(f"{model or arch} (emulated CPU features)", arch, seen)


@functools.cache
def this_cpu() -> CPU:
    """The CPU this process runs on (read once)."""
    arch = platform.machine() or "unknown"
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        text = ""
    seen = _numpy_flags() if arch.lower() in ("x86_64", "amd64") else None
    if not text and seen is None:
        return CPU(platform.processor() or arch, arch, known=False)
    return detect(text, seen, arch)

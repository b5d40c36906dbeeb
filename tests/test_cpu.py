"""CPU detection: which of onnxruntime's int8 kernels this machine runs; do they saturate?"""

from __future__ import annotations

import pytest

from onnxshrink.cpu import CPU, detect, this_cpu

# /proc/cpuinfo flag sets of real CPUs (the int8-relevant part)
ZEN2 = "fpu sse sse2 ssse3 sse4_1 sse4_2 avx f16c fma avx2 bmi2"  # AMD EPYC 7002: AVX2 only
ZEN4 = ZEN2 + " avx512f avx512dq avx512bw avx512vl avx512_vnni avx512_bf16"
SKX = ZEN2 + " avx512f avx512dq avx512bw avx512vl avx512cd"  # Skylake-SP: AVX-512, no VNNI
ADL = ZEN2 + " avx_vnni"  # Alder Lake: AVX-VNNI without AVX-512
SPR = ZEN4 + " avx_vnni amx_tile amx_int8 amx_bf16"  # Sapphire Rapids


def _info(flags: str, model: str = "Test CPU") -> str:
    cpu0 = f"processor\t: 0\nmodel name\t: {model}\nflags\t\t: {flags}\n"
    return f"{cpu0}\nprocessor\t: 1\nflags\t\t: {flags}\n"


@pytest.mark.parametrize(
    "flags, kind, kernel",
    [
        (ZEN2, "saturating", "AVX2 (no VNNI)"),
        (SKX, "saturating", "AVX-512 (no VNNI)"),
        (ADL, "exact", "AVX-VNNI"),
        (ZEN4, "exact", "AVX512-VNNI"),
        (SPR, "exact", "AMX"),
        ("fpu sse sse2 sse4_1", "exact", "SSE"),
    ],
)
def test_int8_kernel_follows_mlas_dispatch(flags, kind, kernel):
    cpu = detect(_info(flags), None, "x86_64")
    assert (cpu.int8, cpu.int8_kernel) == (kind, kernel)
    assert cpu.model == "Test CPU" and kernel in cpu.summary()


def test_what_the_process_sees_wins_over_the_host():
    """Under an emulator (QEMU, Rosetta) /proc/cpuinfo describes the host; CPUID, as numpy's
    dispatch reads it, what onnxruntime will see."""
    seen = frozenset({"sse4_1", "avx2"})
    cpu = detect(_info(SPR, "Xeon"), seen, "x86_64")
    assert cpu.int8 == "saturating" and "amx_int8" not in cpu.flags and "emulated" in cpu.model
    same = detect(
        _info(SPR, "Xeon"),
        frozenset({"sse4_1", "avx2", "avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_vnni"}),
        "x86_64",
    )
    assert same.int8_kernel == "AMX" and same.model == "Xeon"  # agreeing sources: AMX from cpuinfo


def test_arm_and_unknown():
    assert CPU("Neoverse", "aarch64").int8 == "exact"
    assert CPU("?", "x86_64", known=False).int8 == "unknown"


def test_this_cpu_is_consistent():
    cpu = this_cpu()
    assert cpu.int8 in ("exact", "saturating", "unknown")
    assert set(cpu.to_dict()) == {"model", "arch", "int8_flags", "int8_kernel", "int8"}

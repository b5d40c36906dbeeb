"""What ``--target`` asks for: one small class per kind, parsed from ``kind=value``.

A kind says what is needed (the saving, in its unit, that takes the model the search starts
from down to the target, from the :class:`Budget`), what a candidate saves in that unit, how much
an attempt saved, when an attempt meets the target and which of two attempts is better. MACs and
bytes are shares of the *original* model's (before any ``-p`` pass); latency is timed against
the original in optimized sessions, and a candidate's saving is in profiled milliseconds.
"""

from __future__ import annotations

import dataclasses
import re
from typing import ClassVar

from onnxshrink.errors import OptionError

__all__ = ["Budget", "Target", "KINDS"]


@dataclasses.dataclass
class Budget:
    """The original model's totals and the search's starting model's, to convert between a
    target and savings (MACs, bytes, profiled ms)."""

    orig_macs: float
    orig_bytes: float
    base_macs: float
    base_bytes: float
    base_ms_profiled: float
    orig_ms: float = 0.0  # measured, optimized sessions
    base_ms: float = 0.0

    def ms_saving(self, ms: float) -> float:
        """Profiled ms saved when the measured latency goes from ``base_ms`` to ``ms``."""
        return self.base_ms_profiled * (1.0 - ms / max(self.base_ms, 1e-9))


@dataclasses.dataclass
class Target:
    """A target: ``Target.parse("speedup=2")`` gives the kind's class with its value."""

    value: float
    kind: ClassVar[str] = ""
    timed: ClassVar[bool] = False  # needs latency measurements
    with_int8: ClassVar[bool] = True  # int8 of the whole model is a candidate
    saving_field: ClassVar[str] = "ms_saved"  # what a Candidate saves, in this kind's unit
    rule: ClassVar[str] = ""

    @staticmethod
    def parse(text: str) -> Target:
        m = re.fullmatch(r"\s*([a-z-]+)\s*=\s*([0-9.eE+-]+)\s*", text or "")
        if not m or m.group(1) not in KINDS:
            raise OptionError(
                f"--target: expected one of {', '.join(k + '=<x>' for k in KINDS)}; got '{text}'"
            )
        try:
            value = float(m.group(2))
        except ValueError as e:
            raise OptionError(f"--target: '{m.group(2)}' is not a number") from e
        cls = KINDS[m.group(1)]
        if not cls.valid(value):
            raise OptionError(f"--target {cls.kind}={value:g}: {cls.rule}")
        return cls(value)

    @staticmethod
    def valid(value: float) -> bool:
        return 0.0 < value < 1.0

    def saving(self, candidate) -> float:
        return getattr(candidate, self.saving_field)

    def need(self, budget: Budget) -> float:
        raise NotImplementedError

    def saved(self, budget: Budget, reached: dict[str, float]) -> float:
        raise NotImplementedError

    def met(self, reached: dict[str, float]) -> bool:
        return reached[self.kind] <= self.value

    def better(self, a: dict[str, float], b: dict[str, float]) -> bool:
        return a[self.kind] < b[self.kind]

    def __str__(self) -> str:
        return f"{self.kind}={self.value:g}"


class Macs(Target):
    kind, with_int8, saving_field = "macs", False, "macs_saved"
    rule = "macs is the share of the original's MACs to keep, in (0, 1)"

    def need(self, budget: Budget) -> float:
        return max(budget.base_macs - self.value * budget.orig_macs, 0.0)

    def saved(self, budget: Budget, reached: dict[str, float]) -> float:
        return budget.base_macs - reached["macs"] * budget.orig_macs


class Size(Target):
    kind, saving_field = "size", "bytes_saved"
    rule = "size is the share of the original's bytes to keep, in (0, 1)"

    def need(self, budget: Budget) -> float:
        return max(budget.base_bytes - self.value * budget.orig_bytes, 0.0)

    def saved(self, budget: Budget, reached: dict[str, float]) -> float:
        return budget.base_bytes - reached["size"] * budget.orig_bytes


class Speedup(Target):
    kind, timed = "speedup", True
    rule = "speedup is the original's latency over the result's, > 1"

    @staticmethod
    def valid(value: float) -> bool:
        return value > 1.0

    def want_ms(self, budget: Budget) -> float:
        return budget.orig_ms / self.value

    def need(self, budget: Budget) -> float:
        return max(budget.ms_saving(self.want_ms(budget)), 0.0)

    def saved(self, budget: Budget, reached: dict[str, float]) -> float:
        return budget.ms_saving(reached["latency-ms"])

    def met(self, reached: dict[str, float]) -> bool:
        return reached["speedup"] >= self.value

    def better(self, a: dict[str, float], b: dict[str, float]) -> bool:
        return a["speedup"] > b["speedup"]


class LatencyMs(Speedup):
    kind = "latency-ms"
    rule = "latency-ms is the result's latency in milliseconds, > 0"

    @staticmethod
    def valid(value: float) -> bool:
        return value > 0.0

    def want_ms(self, budget: Budget) -> float:
        return self.value

    def met(self, reached: dict[str, float]) -> bool:
        return reached["latency-ms"] <= self.value


KINDS: dict[str, type[Target]] = {k.kind: k for k in (Speedup, Macs, Size, LatencyMs)}

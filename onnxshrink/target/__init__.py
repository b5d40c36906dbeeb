"""Compress to a target (``--target speedup=2``): measured sensitivity, a budget allocated
across passes and layers, verified and backed off until the fidelity budget holds."""

from onnxshrink.target.candidates import Candidate
from onnxshrink.target.kinds import KINDS, Target
from onnxshrink.target.loop import Runner, allocate, search

__all__ = ["KINDS", "Candidate", "Runner", "Target", "allocate", "search"]

"""Errors that reach the user as one line on stderr and an exit code.

Every failure caused by the user's input (model file, data, options, paths) raises a subclass of
:class:`OnnxShrinkError`; the CLI prints ``error: <message>`` and exits with ``exit_code``.
Anything else escaping a command is a bug in onnxshrink and is reported as such.
"""

from __future__ import annotations

__all__ = [
    "OnnxShrinkError",
    "ModelError",
    "DataError",
    "OptionError",
    "OutputError",
    "ValidationError",
    "first_line",
    "one_line",
]


def first_line(exc: BaseException, limit: int = 300, empty: str | None = None) -> str:
    """The first line of an exception's message, cut at ``limit`` characters; for an empty
    message, ``empty`` (default: the exception's type name)."""
    lines = str(exc).strip().splitlines()
    return lines[0][:limit] if lines else (type(exc).__name__ if empty is None else empty)


def one_line(exc: BaseException, limit: int = 600) -> str:
    """The whole message of an exception on one line (whitespace runs collapsed), cut at
    ``limit`` characters with an ellipsis: onnxsim's and onnxruntime's messages continue past
    their first line ("... input 'x' of node:" + the node)."""
    text = " ".join(str(exc).split())
    if not text:
        return type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


class OnnxShrinkError(Exception):
    """Base class: a one-line message for the user and the exit code to use."""

    exit_code = 2


class ModelError(OnnxShrinkError):
    """The model file is missing, not ONNX, truncated, invalid or not runnable."""


class DataError(OnnxShrinkError):
    """The calibration / validation data does not fit the model."""


class OptionError(OnnxShrinkError):
    """An unknown pass, an unknown option or a bad option value."""


class OutputError(OnnxShrinkError):
    """The output path cannot be written (missing folder, read-only, same as the input)."""


class ValidationError(OnnxShrinkError):
    """A pass failed validation and ``strict`` was asked for."""

    exit_code = 1

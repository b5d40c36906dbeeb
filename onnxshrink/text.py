"""Text that comes from a model or a command line, shown as literal text.

Node, tensor and file names are the model author's (or the caller's) choice: printed as they are
they can be terminal escapes (ANSI/OSC), extra lines of the author's wording, bidirectional
overrides, rich markup (``[bold]``, ``[/x]``) or matplotlib mathtext (``$\\frac{$``).
:func:`printable` escapes every control, format, surrogate and unassigned character
(``\\n``, ``\\x1b``, ``\\u202e``); :func:`literal` also escapes rich markup, for consoles.
"""

from __future__ import annotations

import unicodedata

__all__ = ["literal", "printable"]

_SHOWN = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def printable(text: object) -> str:
    """``text`` with every character a terminal could act on written as an escape."""
    out = []
    for ch in str(text):
        if unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co", "Cn"):
            out.append(
                _SHOWN.get(ch)
                or (
                    f"\\x{ord(ch):02x}"
                    if ord(ch) < 0x100
                    else f"\\u{ord(ch):04x}"
                    if ord(ch) < 0x10000
                    else f"\\U{ord(ch):08x}"
                )
            )
        else:
            out.append(ch)
    return "".join(out)


def literal(text: object) -> str:
    """:func:`printable`, with rich markup escaped: safe inside ``console.print`` and tables."""
    from rich.markup import escape

    return escape(printable(text))

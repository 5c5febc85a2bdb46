"""Reading JSON that someone else may have written (a bucket's objects, a store's key slots, lock files), and
printing text someone else wrote.

json.loads raises RecursionError, not ValueError, on deeply nested arrays ([[[[...): a crafted object
must end as the one-line "damaged" its caller says for any other bad JSON, never as a traceback.
"""
from __future__ import annotations

import json
import unicodedata


def parse_json(raw: bytes | str):
    """json.loads, raising ValueError for anything that is not sound JSON (nesting too deep included)."""
    try:
        return json.loads(raw)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def shown(text: str | bytes, limit: int | None = 500) -> str:
    """Text someone else wrote (a guest's output, a reason libvirt or a guest gave) made safe to print on one
    line: control and format characters (escape sequences, newlines, bidi overrides) escaped; cut to `limit`
    characters with "..." if longer."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    out = []
    for ch in text:
        if unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn"):
            out.append({"\n": "\\n", "\r": "\\r", "\t": "\\t"}.get(ch) or
                       (f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}" if ord(ch) < 0x10000
                        else f"\\U{ord(ch):08x}"))
        else:
            out.append(ch)
    result = "".join(out)
    if limit is not None and len(result) > limit:
        result = result[:max(limit - 3, 0)] + "..."
    return result

"""Reading JSON that someone else may have written (a bucket's objects, a store's key slots, lock files), and
printing text someone else wrote.

json.loads raises RecursionError, not ValueError, on deeply nested arrays ([[[[...): a crafted object
must end as the one-line "damaged" its caller says for any other bad JSON, never as a traceback.
"""
from __future__ import annotations

import json


def parse_json(raw: bytes | str):
    """json.loads, raising ValueError for anything that is not sound JSON (nesting too deep included)."""
    try:
        return json.loads(raw)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def shown(text: str, limit: int = 500) -> str:
    """Text someone else wrote (a guest's output, a reason it gave), safe to print on a terminal: control
    characters escaped (no escape sequence reaches it), cut at limit characters."""
    escaped = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text[:limit])
    return escaped + ("..." if len(text) > limit else "")

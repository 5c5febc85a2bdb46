"""Reading JSON that someone else may have written (a bucket's objects, a store's key slots, lock files).

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

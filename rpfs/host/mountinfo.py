"""What is mounted where, read from /proc/self/mountinfo (the one parser; paths unescaped)."""
from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Mount:
    mountpoint: str
    fstype: str
    source: str
    device: str = ""     # "major:minor"


def read_mountinfo() -> list[Mount]:
    mounts = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            mounts.append(Mount(_unescape(fields[4]), _unescape(fields[sep + 1]), _unescape(fields[sep + 2]),
                                fields[2]))
    return mounts


def fstype_at(path: str) -> str | None:
    """The type of the topmost filesystem mounted exactly at path, or None."""
    found = [m.fstype for m in read_mountinfo() if m.mountpoint == path]
    return found[-1] if found else None


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as \\ooo octal."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)

"""Telling a process from a later one that reuses its pid: its start time, from /proc/PID/stat."""
from __future__ import annotations


def start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot ("" if there is no such process)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""

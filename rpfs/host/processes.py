"""Telling a process from a later one that reuses its pid (its start time, from /proc/PID/stat), and this
machine and boot from another."""
from __future__ import annotations

import socket


def start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot ("" if there is no such process)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def machine_id() -> str:
    """This machine and boot: two machines with one hostname, or a reboot, never pass for the same."""
    parts = []
    for path in ("/etc/machine-id", "/proc/sys/kernel/random/boot_id"):
        try:
            with open(path) as f:
                parts.append(f.read().strip())
        except OSError:
            parts.append("")
    return "-".join(parts) if any(parts) else socket.gethostname()

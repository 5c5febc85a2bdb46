"""Running system tools (mount, umount, losetup, blkid, fusermount3): failures become one-line RpfsErrors."""
from __future__ import annotations

import subprocess

from rpfs.errors import RpfsError

TOOL_TIMEOUT = 120


def run_tool(cmd: list[str], timeout: float | None = TOOL_TIMEOUT) -> str:
    """Run a tool; its failure becomes an RpfsError carrying the tool's own error line. timeout=None for a
    tool whose work grows with a disk (qemu-img convert)."""
    proc = run_tool_raw(cmd, timeout)
    if proc.returncode != 0:
        raise RpfsError(error_line(proc.stderr) or f"{cmd[0]} failed with exit code {proc.returncode}")
    return proc.stdout


def run_tool_raw(cmd: list[str], timeout: float | None = TOOL_TIMEOUT) -> subprocess.CompletedProcess[str]:
    """Run a tool and return its result whatever its exit code; a missing tool or a hang is an RpfsError.
    Under umask 077: what a tool creates (qemu-img's overlay) is root's alone from its first byte."""
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL, errors="replace", umask=0o077)
    except FileNotFoundError:
        raise RpfsError(f"{cmd[0]} not found (run tools/setup)") from None
    except subprocess.TimeoutExpired:
        raise RpfsError(f"{cmd[0]} did not finish within {timeout}s") from None


def error_line(text: str) -> str:
    """The message line of a tool's stderr (mount adds a 'dmesg(1) may have more' hint after it)."""
    return next((line.strip() for line in text.splitlines() if line.strip()), "")

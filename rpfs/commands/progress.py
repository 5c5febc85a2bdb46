"""A one-line progress bar on stderr, drawn only when stderr is a terminal."""
from __future__ import annotations

import sys
import time


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


class ProgressBar:
    """Use as `with ProgressBar(label, quiet=args.json) as bar:` and pass bar as a progress callback."""

    def __init__(self, label: str, quiet: bool = False, stream=sys.stderr):
        self.label, self.stream = label, stream
        self.enabled = stream.isatty() and not quiet
        self.started = time.monotonic()
        self._last_draw = 0.0

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if not self.enabled or (now - self._last_draw < 0.2 and done < total):
            return
        self._last_draw = now
        fraction = done / total if total else 1.0
        width = 30
        filled = int(fraction * width)
        rate = done / (now - self.started) if now > self.started else 0
        self.stream.write(f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] {fraction:6.1%} "
                          f"{human_bytes(done)}/{human_bytes(total)} {human_bytes(rate)}/s ")
        self.stream.flush()

    def __enter__(self) -> "ProgressBar":
        return self

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self.stream.write("\r\033[K")
            self.stream.flush()

"""What every command's parser shares: the parser class that ends a bad argument in one line, and the
argument types of more than one command."""
from __future__ import annotations

import argparse

from rpfs.errors import EXIT_USAGE


class Parser(argparse.ArgumentParser):
    def error(self, message: str):
        self.exit(EXIT_USAGE, f"rpfs: {message} (see rpfs --help)\n")


def octal_mode(text: str) -> int:
    try:
        value = int(text, 8)
    except ValueError:
        value = -1
    if not 0 <= value <= 0o777:
        raise argparse.ArgumentTypeError(f"{text!r} is not a file mode in octal, 0-777 (e.g. 640)")
    return value


def rate(text: str) -> float:
    value = float(text)
    if not 0 <= value < float("inf"):   # also refuses nan
        raise argparse.ArgumentTypeError(f"{text!r} is not a rate in MiB/s (0: no limit)")
    return value

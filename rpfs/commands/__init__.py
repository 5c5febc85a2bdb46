"""One module per group of `rpfs` subcommands; each command is a small function taking the parsed args.

User mistakes raise RpfsError and end as one line on stderr (rpfs/cli.py); only bugs print a traceback.
"""
from __future__ import annotations

import json
import sys

from rpfs.store.store import Store


def print_json(data) -> None:
    json.dump(data, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


def open_store(args, readonly: bool = False) -> Store:
    return Store.open(args.store, readonly=readonly)

"""Packs: entries (blobs and block map pieces, as stored) streamed into objects of about PACK_BYTES, each
uploaded in parts (s3.py) and indexed once whole. Push uploads new entries this way, gc the entries it
keeps of half-empty packs (repacking).
"""
from __future__ import annotations

import secrets
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Iterator

from rpfs.vault.locks import VaultLock
from rpfs.vault.vault import Vault

PACKS_IN_FLIGHT = 2     # a pack's last parts go up while the next one is read: memory about twice s3.py's
PACK_BYTES = 128 << 20   # a pack's size: a vault of a few TB is tens of thousands of objects, not millions


def upload_packs(vault: Vault, entries: Iterator[tuple[bytes, bytes, bytes]], pack_bytes: int,
                 lock: VaultLock) -> Iterator["PackStream"]:
    """Stream (kind, id, bytes as stored) entries into packs; yields each pack once it is whole and indexed.
    The next pack starts as soon as the one before has been read whole, while its last parts still go up:
    waiting for each pack to finish made 32 MiB packs half as fast as one big one. The lock is refreshed
    after each pack (gc.py: a lock nobody refreshes for an hour is taken for dead)."""
    def send(pack: str, stream: PackStream) -> PackStream:
        vault.objects.put_pack(pack, stream)
        lock.refresh()   # a push a gc took for dead indexes nothing more: gc may be deleting its packs
        vault.add_index(pack, stream.index)
        return stream

    try:
        with ThreadPoolExecutor(PACKS_IN_FLIGHT, thread_name_prefix="rpfs-pack") as pool:
            sending: list[Future] = []
            while (first := next(entries, None)) is not None:
                stream = PackStream(first, entries, pack_bytes)
                sending.append(pool.submit(send, secrets.token_hex(16), stream))
                while not stream.read_whole.wait(0.05):   # the entries are read by one pack at a time
                    if sending[-1].done():
                        sending[-1].result()   # its upload failed before reading it all: raises
                while len(sending) >= PACKS_IN_FLIGHT:
                    yield sending.pop(0).result()
                lock.refresh()
            for future in sending:
                yield future.result()
    finally:   # no upload runs now: stop the entries' own threads (push reads the store on them) here
        close = getattr(entries, "close", None)
        if close is not None:
            close()


class PackStream:
    """A pack as a stream (what boto3's upload reads, a part at a time): entries pulled one by one until the
    pack holds `limit` bytes; the index of what it holds (kind, id, offset, length) grows as they are read.
    read() joins whole entries into a part: each byte is copied once on its way (copies were a fifth of
    a push's CPU)."""

    def __init__(self, first: tuple[bytes, bytes, bytes], rest: Iterator[tuple[bytes, bytes, bytes]], limit: int):
        self._first, self._rest, self._limit = first, rest, limit
        self._left = memoryview(b"")   # of the entry read last, what no part took yet
        self.index: list[tuple[bytes, bytes, int, int]] = []
        self.size = 0
        self.read_whole = threading.Event()   # set at its end: the next pack may take the entries

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def read(self, amount: int = -1) -> bytes:
        parts, wanted = [], amount if amount >= 0 else 1 << 62
        while wanted > 0 and (self._left or self._next_entry()):
            taken = self._left[:wanted]
            parts.append(taken)
            self._left = self._left[len(taken):]
            wanted -= len(taken)
        return b"".join(parts)

    def _next_entry(self) -> bool:
        """Take the next entry into the pack; False at the pack's end (its size reached, or no entries left)."""
        entry = None
        if self.size < self._limit:
            entry, self._first = (self._first, None) if self._first is not None else (next(self._rest, None), None)
        if entry is None:
            self.read_whole.set()
            return False
        kind, entry_id, data = entry
        self.index.append((kind, entry_id, self.size, len(data)))
        self.size += len(data)
        self._left = memoryview(data)
        return True

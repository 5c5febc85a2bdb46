"""Reading a vault's blobs in runs: one ranged GET for a blob and the entries after it in its pack.

A push sends each point's blobs in disk order, so a reader going through a disk (a restore, the mount's
read-ahead, an instant restore's copy, verify) asks for a pack's entries one after another. Fetching each
alone costs a request apiece (about 3 ms of CPU in boto3, and a round trip); a run of up to RUN_BYTES costs
one. Entries are views of the run's buffer, not copies (copying 1 MiB costs more than decoding it: fresh
pages); a waiting view keeps its whole buffer, so the bound counts whole buffers. A run takes entries of
the kind asked for only (keys are (kind, id)): the pieces at a pack's end are never read this way.
Entries fetched before they are asked for wait in a bounded cache (an entry nobody asks for is
dropped, oldest first); a reader asking for an entry that is on its way waits for that GET instead of
starting its own. Only whole-entry reads go by runs: a random read of a few frames fetches just those.
"""
from __future__ import annotations

import bisect
import threading
from collections import OrderedDict
from concurrent.futures import Future
from typing import Callable, Hashable

RUN_BYTES = 8 << 20
WAITING_BYTES = 128 << 20   # entries fetched ahead and not yet asked for, at most


class RunReader:
    """Entries of packs by runs. read_pack(pack, offset, length) does the ranged GET (raises if it fails);
    index() is the vault's index now: key -> location (pack, offset, length)."""

    def __init__(self, read_pack: Callable[[str, int, int], bytes], index: Callable[[], dict],
                 run_bytes: int = RUN_BYTES, waiting_bytes: int = WAITING_BYTES):
        self._read_pack, self._index = read_pack, index
        self._run_bytes, self._waiting_bytes = run_bytes, waiting_bytes
        self._lock = threading.Lock()
        self._waiting: OrderedDict[Hashable, bytes] = OrderedDict()   # fetched, not yet asked for
        self._waiting_total = 0                                        # bytes of the buffers they keep
        self._buffers: dict[int, list[int]] = {}                       # id of a buffer -> [views waiting, size]
        self._coming: dict[Hashable, Future] = {}                     # on their way, in someone's run
        self._layout: tuple[tuple[int, int], dict[str, list[tuple[int, int, Hashable]]]] = ((0, -1), {})

    def read(self, key: Hashable, location) -> bytes:
        """The entry's bytes as stored in its pack (location: its pack, offset and length)."""
        run = None
        with self._lock:
            data = self._take(key)
            if data is not None:
                return data
            coming = self._coming.get(key)
            if coming is None:
                run, coming = self._plan(key, location), Future()
                for entry_key, _offset, _length in run:
                    self._coming[entry_key] = coming
        if run is None:
            return self._wait_for(key, location, coming)
        return self._fetch(key, location, run, coming)

    def _take(self, key: Hashable) -> bytes | None:
        """Under the lock: an entry fetched ahead, now asked for."""
        data = self._waiting.pop(key, None)
        if data is not None:
            self._let_go(data)
        return data

    def _let_go(self, view: memoryview) -> None:
        """Under the lock: a view leaves the cache; its buffer stops counting once no view of it waits."""
        counted = self._buffers[id(view.obj)]
        counted[0] -= 1
        if counted[0] == 0:
            del self._buffers[id(view.obj)]
            self._waiting_total -= counted[1]

    def _wait_for(self, key: Hashable, location, coming: Future) -> bytes:
        """Another reader's run brings the entry: take it once there (or fetch it alone if that GET failed
        or the entry was dropped meanwhile)."""
        if coming.exception() is None:
            with self._lock:
                data = self._take(key)
            if data is not None:
                return data
        return self._read_pack(location.pack, location.offset, location.length)

    def _fetch(self, key: Hashable, location, run: list[tuple[Hashable, int, int]], coming: Future) -> bytes:
        start = run[0][1]
        end = run[-1][1] + run[-1][2]
        try:
            raw = memoryview(self._read_pack(location.pack, start, end - start))
        except BaseException as e:
            with self._lock:
                for entry_key, _offset, _length in run:
                    self._coming.pop(entry_key, None)
            coming.set_exception(e)
            raise
        with self._lock:
            for entry_key, offset, length in run:
                self._coming.pop(entry_key, None)
                if entry_key != key:
                    self._keep(entry_key, raw[offset - start:offset - start + length])
        coming.set_result(None)
        return raw[location.offset - start:location.offset - start + location.length]

    def _keep(self, key: Hashable, view: memoryview) -> None:
        """Under the lock: an entry fetched ahead, the oldest dropped beyond waiting_bytes."""
        counted = self._buffers.setdefault(id(view.obj), [0, len(view.obj)])
        if counted[0] == 0:
            self._waiting_total += counted[1]
        counted[0] += 1
        self._waiting[key] = view
        while self._waiting_total > self._waiting_bytes:
            _key, old = self._waiting.popitem(last=False)
            self._let_go(old)

    def _plan(self, key: Hashable, location) -> list[tuple[Hashable, int, int]]:
        """Under the lock: the entry and those right after it in its pack that nobody has fetched or is
        fetching, up to run_bytes (the entry alone if it is not in the index: a condemned pack's)."""
        entries = self._entries(location.pack)
        at = bisect.bisect_left(entries, (location.offset,))
        if at == len(entries) or entries[at][2] != key:
            return [(key, location.offset, location.length)]
        run = [(key, location.offset, location.length)]
        size, end = location.length, location.offset + location.length
        for offset, length, entry_key in entries[at + 1:]:
            if offset != end or size + length > self._run_bytes or entry_key in self._coming \
                    or entry_key in self._waiting or entry_key[0] != key[0]:
                break
            run.append((entry_key, offset, length))
            size, end = size + length, end + length
        return run

    def _entries(self, pack: str) -> list[tuple[int, int, Hashable]]:
        """A pack's entries by offset, from the index (regrouped whenever the index changed)."""
        index = self._index()
        version, by_pack = self._layout
        if version != (id(index), len(index)):
            by_pack = {}
            for entry_key, where in list(index.items()):   # a copy: a push may add entries meanwhile
                by_pack.setdefault(where.pack, []).append((where.offset, where.length, entry_key))
            for entries in by_pack.values():
                entries.sort(key=lambda entry: entry[0])
            self._layout = ((id(index), len(index)), by_pack)
        return by_pack.get(pack, [])

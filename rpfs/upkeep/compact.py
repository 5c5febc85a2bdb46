"""compact: rewrite the store's LMDB file without its free pages, and swap it in."""
from __future__ import annotations

import os

from rpfs.errors import RpfsError
from rpfs.host.access import PRIVATE_FILE, check_own_entry
from rpfs.host.files import fsync_folder
from rpfs.store.store import WRITER_WAIT_SECONDS, Store


def compact(store: Store) -> tuple[int, int]:
    """Write a compacted copy of the LMDB file and swap it in; refused while anyone else has it open.

    Every Store handle holds STORE/open.lock shared; compact holds it exclusive for the whole copy and
    swap, so nothing can open the store and write into the file being replaced."""
    with store.writer_lock("compact", wait_seconds=WRITER_WAIT_SECONDS):
        if not store.exclusive_open():
            raise RpfsError(f"store {store.path} is open in another process (a mount, a backup?); close it first")
        before = (store.path / "data.mdb").stat().st_size
        work = store.path / "compact.tmp"
        check_own_entry(work, f"store {store.path}", folder=True)   # its leftovers are removed, by name
        work.mkdir(mode=0o700, exist_ok=True)
        for leftover in work.glob("*"):   # a compact that was killed: nobody else has the store open
            leftover.unlink()
        try:
            store.copy_compacted(work)
            with open(work / "data.mdb", "rb") as f:
                os.fchmod(f.fileno(), PRIVATE_FILE)   # LMDB makes its copy 0644
                os.fsync(f.fileno())
            os.replace(work / "data.mdb", store.path / "data.mdb")
            (store.path / "lock.mdb").unlink(missing_ok=True)   # its transaction ids were the old file's
            fsync_folder(store.path)
        finally:
            for leftover in work.glob("*"):
                leftover.unlink()
            work.rmdir()
        return before, (store.path / "data.mdb").stat().st_size

"""A local copy of a vault's index objects: opening a vault of thousands of packs reads only the indexes it
has not seen before (one GET each), not all of them again.

An index never changes once written (gc deletes it, or puts the same bytes back), so a copy is good for
as long as the vault lists its index. Copies are kept sealed as in the vault and opened (authenticated)
on every use: a damaged or changed copy fails and is fetched again. Writing one is best effort (a
read-only or full /var/cache only costs GETs). RPFS_CACHE overrides the folder (default /var/cache/rpfs).
The folders are used only while each is a real folder of this user's (never a link someone planted), and
only names a push gives packs are ever read, written or removed there.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat
from pathlib import Path

from rpfs.errors import RpfsError
from rpfs.host.access import make_private_folder
from rpfs.host.files import write_whole
from rpfs.vault.config import VaultConfig

DEFAULT_CACHE = "/var/cache/rpfs"
PACK_NAME = re.compile(r"[0-9a-f]{32}")   # what a push names its packs; anything else is not cached


class IndexCache:
    def __init__(self, config: VaultConfig):
        where = hashlib.sha256(f"{config.endpoint}\0{config.bucket}\0{config.prefix}".encode()).hexdigest()[:24]
        self.folder = Path(os.environ.get("RPFS_CACHE") or DEFAULT_CACHE) / "vault-index" / where
        self._made = False

    def _ours(self) -> bool:
        """The folder and the two above it are real folders of this user's."""
        for folder in (self.folder, self.folder.parent, self.folder.parent.parent):
            try:
                st = os.lstat(folder)
            except OSError:
                return False
            if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
                return False
        return True

    def get(self, pack: str) -> bytes | None:
        if not PACK_NAME.fullmatch(pack) or not self._ours():
            return None
        try:
            fd = os.open(self.folder / pack, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            with os.fdopen(fd, "rb") as f:
                return f.read()
        except OSError:
            return None

    def put(self, pack: str, sealed: bytes) -> None:
        if not PACK_NAME.fullmatch(pack):
            return
        try:
            if not self._made:
                if any(os.path.islink(f) for f in (self.folder, self.folder.parent, self.folder.parent.parent)):
                    return
                make_private_folder(self.folder, "index cache")
                self._made = True
            if self._ours():
                write_whole(self.folder / pack, sealed)
        except (OSError, RpfsError):   # a cache in a place another user could change is not written
            pass

    def keep_only(self, packs: set[str]) -> None:
        """Forget the copies of indexes the vault no longer lists (their packs are gone, or condemned)."""
        try:
            names = os.listdir(self.folder) if self._ours() else []
        except OSError:
            return
        for name in names:
            if PACK_NAME.fullmatch(name) and name not in packs:
                try:
                    os.unlink(self.folder / name)
                except OSError:
                    pass

    def drop(self) -> None:
        """Remove every copy (the vault's name is forgotten)."""
        if self._ours():
            shutil.rmtree(self.folder, ignore_errors=True)   # rmtree does not follow links inside

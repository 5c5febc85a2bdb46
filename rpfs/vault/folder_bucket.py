"""A folder standing in for an S3 bucket (endpoint file:///path): for tests and local experiments.

The same calls as s3.Bucket. The bucket is the folder <path>/<bucket>; an object is a file under it,
each '/' of its name a folder. Every write goes to a part file beside its object (.<name>.part-<random>),
renamed into place once whole, so an object exists only complete, as in S3; a writer killed meanwhile
leaves the part file, which unfinished_uploads lists (as S3 lists a multipart upload never completed)
and abort_upload removes. Files are 0600 (made O_EXCL|O_NOFOLLOW) and folders 0700, and a link is
never read or written as an object. Nothing is fsynced: a power cut may lose the last writes (kill -9 loses nothing).
"""
from __future__ import annotations

import os
import secrets
import stat
from datetime import datetime, timezone
from pathlib import Path
from typing import BinaryIO, Iterator
from urllib.parse import urlparse

from rpfs.errors import RpfsError

PART = ".part-"            # a part file is .<object's last name part>.part-<random>
CHUNK_BYTES = 8 << 20      # read from a stream at a time


class FolderBucket:
    """One folder (and key prefix) used as a bucket. Thread-safe: every call stands alone."""

    def __init__(self, label: str, endpoint: str, bucket: str, prefix: str = ""):
        self.label, self.endpoint, self.name = label, endpoint, bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.root = Path(urlparse(endpoint).path) / bucket

    def key(self, name: str) -> str:
        return self.prefix + name

    def get(self, name: str, start: int = 0, length: int | None = None) -> bytes | None:
        """An object's bytes, or length bytes from start; None if there is no such object."""
        try:
            fd = os.open(self._path(name), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            self._require_bucket()
            return None
        except OSError as e:
            raise self._error(f"read {name}", e) from None
        try:
            if length is None:
                with os.fdopen(fd, "rb") as f:
                    fd = -1
                    return f.read()
            data = os.pread(fd, length, start)
        finally:
            if fd >= 0:
                os.close(fd)
        if len(data) != length:
            raise RpfsError(f"{self.label}: {name} is shorter than its index says ({len(data)} of {length} bytes"
                            f" at {start})")
        return data

    def put(self, name: str, data: bytes) -> None:
        self.put_stream(name, _Bytes(data))

    def put_stream(self, name: str, stream: BinaryIO) -> None:
        """Write a stream as one object: it exists only once complete."""
        path = self._path(name)
        self._make_folders(path.parent)
        part = path.with_name(f".{path.name}{PART}{secrets.token_hex(8)}")
        try:
            fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise self._error(f"write {name}", e) from None
        try:
            with os.fdopen(fd, "wb") as f:
                while chunk := stream.read(CHUNK_BYTES):
                    f.write(chunk)
            os.rename(part, path)
        except BaseException as e:
            try:
                os.unlink(part)
            except OSError:
                pass
            if isinstance(e, OSError):
                raise self._error(f"write {name}", e) from None
            raise

    def delete(self, name: str) -> None:
        try:
            os.unlink(self._path(name))
        except FileNotFoundError:
            pass
        except OSError as e:
            raise self._error(f"delete {name}", e) from None

    def names(self, under: str) -> Iterator[tuple[str, int]]:
        """(name, size) of every object whose name starts with `under`, in key order."""
        for name, size, _modified in self.listing(under):
            yield name, size

    def listing(self, under: str) -> Iterator[tuple[str, int, datetime]]:
        """(name, size, last modified) of every object whose name starts with `under`, in key order."""
        for name, st in self._files(under, parts=False):
            yield name, st.st_size, datetime.fromtimestamp(st.st_mtime, timezone.utc)

    def unfinished_uploads(self, under: str) -> list[tuple[str, str]]:
        """(name, part file) of the writes under `under` started and never completed (a killed writer's)."""
        found = []
        for part, _st in self._files(under, parts=True):
            found.append((_target(part), part))
        return found

    def abort_upload(self, name: str, upload_id: str) -> None:
        """Remove a part file unfinished_uploads listed (gone meanwhile: nothing to do)."""
        if _target(upload_id) != name:
            raise RpfsError(f"{self.label}: {upload_id!r} is no unfinished upload of {name}")
        try:
            os.unlink(self.root.joinpath(*self.key(upload_id).split("/")))
        except FileNotFoundError:
            pass
        except OSError as e:
            raise self._error(f"abort the upload of {name}", e) from None

    def ensure_bucket(self) -> None:
        """Make the bucket's folder unless it exists (its parent must)."""
        if not self.root.parent.is_dir():
            raise RpfsError(f"{self._where()}: folder {self.root.parent} does not exist")
        self._make_folders(self.root)

    # -- the folder --------------------------------------------------------------------------------
    def _path(self, name: str) -> Path:
        key = self.key(name)
        parts = key.split("/")
        if not key or any(part in ("", ".", "..") or part.startswith(".") for part in parts):
            raise RpfsError(f"{self.label}: {name!r} is no object name a folder bucket can hold")
        return self.root.joinpath(*parts)

    def _files(self, under: str, parts: bool) -> list[tuple[str, os.stat_result]]:
        """(name, stat) of the objects (or, parts, the part files) whose key starts with `under`, sorted."""
        self._require_bucket()
        key = self.key(under)
        folder = self.root.joinpath(*key.split("/")[:-1])
        found = []
        for top, folders, files in os.walk(folder):   # os.walk follows no link to a folder
            for file in files:
                path = os.path.join(top, file)
                if file.startswith(".") != parts or (parts and PART not in file):
                    continue
                name = os.path.relpath(path, self.root).replace(os.sep, "/")
                if name.startswith(key) if not parts else _target(name).startswith(key):
                    st = os.lstat(path)
                    if stat.S_ISREG(st.st_mode):
                        found.append((name[len(self.prefix):], st))
        return sorted(found, key=lambda item: item[0])

    def _make_folders(self, folder: Path) -> None:
        """folder and those above it up to the bucket's parent, 0700 each; a link or a file there is refused."""
        missing = []
        while folder != self.root.parent and not folder.is_dir():
            missing.append(folder)
            folder = folder.parent
        for below in [folder] + missing[::-1]:
            try:
                os.mkdir(below, 0o700)
            except FileExistsError:
                if not stat.S_ISDIR(os.lstat(below).st_mode) and below != self.root.parent:
                    raise RpfsError(f"{self._where()}: {below} is not a folder") from None
            except OSError as e:
                raise self._error(f"make folder {below}", e) from None

    def _require_bucket(self) -> None:
        if not self.root.is_dir():
            raise RpfsError(f"{self._where()}: the bucket does not exist")

    def _where(self) -> str:
        return f"{self.label} ({self.endpoint}, bucket {self.name})"

    def _error(self, what: str, error: OSError) -> RpfsError:
        return RpfsError(f"{self._where()}: cannot {what}: {error.strerror or error}")


def _target(part_name: str) -> str:
    """The object name a part file becomes."""
    folder, _slash, last = part_name.rpartition("/")
    return (folder + "/" if folder else "") + last[1:last.rindex(PART)]


class _Bytes:
    """bytes read as a stream, a chunk at a time."""

    def __init__(self, data: bytes):
        self._data, self._at = memoryview(data), 0

    def read(self, amount: int = -1) -> bytes:
        end = len(self._data) if amount < 0 else self._at + amount
        chunk = bytes(self._data[self._at:end])
        self._at += len(chunk)
        return chunk

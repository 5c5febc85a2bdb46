"""Disk images of a shut-off domain, exported read-only over NBD: their bytes as the guest sees them.

One qemu-storage-daemon serves every image of the domain on one unix socket, an export per disk (named by
the disk), raw or qcow2 with its backing chain (the format is the one libvirt's XML gives: never probed,
a raw image may hold what looks like a qcow2 header). It was chosen over one qemu-nbd per image by
measurement (docs/design/nbd.md): one process and one socket for any number of disks.

The server never outlives rpfs: the kernel kills it when the thread that started it dies (PR_SET_PDEATHSIG,
kill -9 of rpfs included), and its folder in the run dir (nbd/<token>/, 0700: the socket, the server's
log, and `owner`, the pid and start time of the rpfs that made it) goes on the way out, or with the next
export once its owner is gone. Enter exported() on a thread that lives as
long as the export is read (the main thread).
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Iterator

from rpfs.errors import RpfsError
from rpfs.host import run_dir
from rpfs.host.libc import die_with_parent
from rpfs.host.processes import start_time
from rpfs.host.tools import error_line
from rpfs.vm.nbd import NbdConnection

FORMATS = ("raw", "qcow2")
START_SECONDS = 30.0            # the server listens within this, or the export fails
STOP_SECONDS = 10.0             # SIGTERM, then SIGKILL after this
SOCKET_PATH_MAX = 107           # sun_path holds 108 bytes with its NUL


@contextlib.contextmanager
def exported(images: dict[str, tuple[Path, str]], bitmaps: dict[str, str] | None = None
             ) -> Iterator[tuple[Path, dict[str, str]]]:
    """Export images ({disk name: (image path, "raw" or "qcow2")}) read-only; yields (socket path, {disk
    name: export name}). bitmaps ({disk name: bitmap name}) exports a persistent qcow2 bitmap too, as the
    meta context "qemu:dirty-bitmap:<bitmap name>" of that disk's export."""
    bitmaps = bitmaps or {}
    for name, (path, image_format) in images.items():
        if image_format not in FORMATS:
            raise RpfsError(f"disk {name}: cannot read a {image_format!r} image (only raw and qcow2)")
        if name in bitmaps and image_format != "qcow2":
            raise RpfsError(f"disk {name}: only a qcow2 image has persistent bitmaps")
        if not Path(path).exists():
            raise RpfsError(f"disk {name}: {path} does not exist")
    unknown = set(bitmaps) - set(images)
    if unknown:
        raise RpfsError(f"a bitmap for disk {sorted(unknown)[0]}, which is not exported")
    _remove_orphans()
    folder = run_dir.make_folder(_exports_folder() / secrets.token_hex(4))
    server = None
    try:
        run_dir.write_file(folder / "owner", f"{os.getpid()} {start_time(os.getpid())}\n")
        socket_path = folder / "sock"
        if len(os.fsencode(socket_path)) > SOCKET_PATH_MAX:
            raise RpfsError(f"the run dir {run_dir.root()} is too deep for a unix socket: move it (RPFS_RUN_DIR)")
        exports = {name: name for name in images}
        log = os.open(folder / "server.log", os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                      0o600)
        try:
            server = _start(_command(images, bitmaps, socket_path), log)
        finally:
            os.close(log)
        _wait_listening(server, socket_path, folder / "server.log", list(images.items()))
        yield socket_path, exports
    finally:
        if server is not None:
            _stop(server)
        shutil.rmtree(folder, ignore_errors=True)


def _command(images: dict[str, tuple[Path, str]], bitmaps: dict[str, str], socket_path: Path) -> list[str]:
    """JSON arguments: a path is never parsed as key=value options (a comma in a file name)."""
    command = ["qemu-storage-daemon"]
    for n, (name, (path, image_format)) in enumerate(images.items()):
        command += ["--blockdev", json.dumps({
            "driver": image_format, "node-name": f"disk{n}", "read-only": True,
            "file": {"driver": "file", "filename": os.path.abspath(path), "read-only": True}})]
    command += ["--nbd-server", json.dumps({"addr": {"type": "unix", "path": str(socket_path)}})]
    for n, name in enumerate(images):
        export = {"type": "nbd", "id": f"export{n}", "node-name": f"disk{n}", "name": name, "writable": False}
        if name in bitmaps:
            export["bitmaps"] = [bitmaps[name]]
        command += ["--export", json.dumps(export)]
    return command


def _start(command: list[str], log: int) -> subprocess.Popen:
    parent = os.getpid()
    try:
        return subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd="/",
                                umask=0o077, preexec_fn=lambda: die_with_parent(parent))
    except FileNotFoundError:
        raise RpfsError("qemu-storage-daemon not found (run tools/setup)") from None


def _wait_listening(server: subprocess.Popen, socket_path: Path, log: Path,
                    images: list[tuple[str, tuple[Path, str]]]) -> None:
    """Bounded: every export answers an NBD handshake, or the server has exited (its error line), or time
    is up. The socket alone says nothing: the server listens before it has added the exports, and may yet
    fail on one of them."""
    deadline = time.monotonic() + START_SECONDS
    delay = 0.005
    while True:
        if server.poll() is not None:
            raise RpfsError(_failure(error_line(log.read_text(errors="replace")[-4096:]), server.returncode,
                                     images))
        if socket_path.exists():
            try:
                for name, _image in images:
                    NbdConnection.open(socket_path, name, timeout=max(1.0, deadline - time.monotonic())).close()
                return
            except RpfsError:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    server.wait(1)   # it may be on its way out: then its error line says why
        if time.monotonic() > deadline:
            raise RpfsError(f"qemu-storage-daemon did not serve the disks within {START_SECONDS:.0f}s")
        time.sleep(delay)
        delay = min(delay * 2, 0.2)


def _failure(line: str, code: int, images: list[tuple[str, tuple[Path, str]]]) -> str:
    """The server's error line, said of the disk it is about ("--blockdev {...}: why" names a node)."""
    match = re.match(r"qemu-storage-daemon: --(?:blockdev|export) (\{.*\}): (.*)", line)
    if match is None:
        return f"qemu-storage-daemon could not export the disks: {line or f'exit code {code}'}"
    try:
        name, (path, _format) = images[int(json.loads(match[1])["node-name"].removeprefix("disk"))]
    except (ValueError, KeyError, IndexError, TypeError):
        return f"qemu-storage-daemon could not export the disks: {match[2]}"
    why = match[2] + (" (is a running qemu using it?)" if "lock" in match[2] else "")
    return f"disk {name}: cannot export {path}: {why}"


def _stop(server: subprocess.Popen) -> None:
    if server.poll() is None:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(STOP_SECONDS)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def _exports_folder() -> Path:
    return run_dir.root() / "nbd"


def orphans() -> list[Path]:
    """Export folders whose rpfs died (kill -9): their server died with it, the folder stayed."""
    folder = _exports_folder()
    if not folder.is_dir():
        return []
    found = []
    for entry in sorted(folder.iterdir()):
        try:
            pid_text, started = (entry / "owner").read_text().split()
            pid = int(pid_text)
        except (OSError, ValueError):
            # No owner yet (just made) or a damaged one: left alone unless a minute old.
            with contextlib.suppress(OSError):
                if time.time() - entry.lstat().st_mtime < 60:
                    continue
            pid, started = 0, ""
        if (pid == 0 or start_time(pid) != started) and entry.is_dir() and not entry.is_symlink():
            found.append(entry)
    return found


def remove_orphan(path: Path) -> None:
    """Remove one folder orphans() named (rmtree works by descriptors: never through a link)."""
    shutil.rmtree(path, ignore_errors=True)


def _remove_orphans() -> None:
    for entry in orphans():
        remove_orphan(entry)

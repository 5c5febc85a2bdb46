"""Running a FUSE filesystem (the store tree, an instant restore's image): in the foreground, or as a
background daemon.

`rpfs mount` starts a fresh Python process (`python -I -m rpfs`, host/python_child.py; not a fork: LMDB
environments and trio must not cross a fork) with --foreground and a pipe; it returns once the daemon
writes "ready" (mounted) or an error line. A pid file per mountpoint in the run dir (run_dir.py) lets
`rpfs umount` wait for the daemon to end.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pyfuse3
import trio

from rpfs.errors import RpfsError
from rpfs.host.access import check_trusted_place
from rpfs.host.disk_use import users_under
from rpfs.host.libc import few_malloc_arenas
from rpfs.host.mountinfo import fstype_at, read_mountinfo
from rpfs.host.python_child import start_python
from rpfs.host.tools import error_line, run_tool_raw
from rpfs.host import run_dir

FSTYPE = "fuse.rpfs"
READY = b"ready\n"


def _canonical(mountpoint: Path) -> Path:
    """One spelling of a mountpoint for pid files and the mount table (realpath never stats a dead mount)."""
    return Path(os.path.realpath(mountpoint))


def check_mountpoint(mountpoint: Path) -> Path:
    """The mountpoint, refused if another user could have put it there: mount(2) follows a link, so one
    planted at the mountpoint would have root mount over any folder (/etc) the planter chose."""
    check_trusted_place(mountpoint, "mountpoint")
    mountpoint = _canonical(mountpoint)
    if not mountpoint.exists():
        raise RpfsError(f"mountpoint {mountpoint} does not exist (create it with mkdir)")
    if not mountpoint.is_dir():
        raise RpfsError(f"mountpoint {mountpoint} is not a directory")
    if fstype_at(str(mountpoint)) is not None:
        raise RpfsError(f"mountpoint {mountpoint} is busy: something is already mounted there")
    return mountpoint


@dataclass
class Filesystem:
    """What a daemon serves: FUSE operations, mount options, and what to close and run beside them."""
    ops: pyfuse3.Operations
    options: set[str]
    close: Callable[[], None]
    background: Callable[[threading.Event], None] | None = None   # runs on a thread until the event
    start_tasks: Callable[[trio.Nursery], None] | None = None      # gets the FUSE loop's nursery


def serve(open_filesystem: Callable[[], Filesystem], mountpoint: Path, ready_fd: int | None = None,
          debug: bool = False, log_file: Path | None = None) -> None:
    """Mount and serve until unmounted or signalled; writes READY (or the error) to ready_fd."""
    few_malloc_arenas()
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, filename=log_file,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    log = logging.getLogger("rpfs.mount")
    pid_path = run_dir.daemon_files(mountpoint)[0]
    fs = None
    wrote_pid = False
    try:
        try:
            fs = open_filesystem()
        except OSError as e:   # the system said no: one line for the user, as everywhere else
            where = f": {e.filename}" if e.filename else ""
            raise RpfsError(f"cannot serve {mountpoint}: {e.strerror or e}{where}") from None
        # Only once it has what it serves (an instant restore's partial file is flocked): a second
        # daemon started for the same image fails above and never touches the first one's pid file.
        try:
            run_dir.write_file(pid_path, f"{os.getpid()}\n")
            wrote_pid = True
        except OSError as e:
            raise RpfsError(f"cannot write the pid file {pid_path}: {e.strerror}") from None
        # No allow_other unless the filesystem asks for it (store_mount --allow-group): the kernel then
        # refuses every user but the one who mounted, root. default_permissions is pyfuse3's default.
        options = set(pyfuse3.default_options) | fs.options | {"fsname=rpfs", "subtype=rpfs"}
        try:
            pyfuse3.init(fs.ops, str(mountpoint), options)
        except RuntimeError as e:
            raise RpfsError(f"cannot mount at {mountpoint}: {e}") from None
    except RpfsError as e:
        if wrote_pid:
            pid_path.unlink(missing_ok=True)
        if fs is not None:
            fs.close()
        _tell(ready_fd, e.message.encode() + b"\n")
        raise
    log.info("mounted at %s", mountpoint)
    _tell(ready_fd, READY)
    stop = threading.Event()
    worker = None
    if fs.background is not None:
        worker = threading.Thread(target=_log_failure(fs.background, log), args=(stop,), name="rpfs-background")
        worker.start()
    try:
        trio.run(_main_loop, fs.start_tasks)
    finally:
        stop.set()
        if worker is not None:
            worker.join()
        pyfuse3.close(unmount=True)
        fs.close()
        pid_path.unlink(missing_ok=True)
        log.info("unmounted %s", mountpoint)
        _remove_log_unless_it_has_news(log_file)


def _tell(ready_fd: int | None, answer: bytes) -> None:
    """Answer the process that started us; if it died meanwhile (kill -9), serve on all the same."""
    if ready_fd is None:
        return
    try:
        os.write(ready_fd, answer)
    except BrokenPipeError:
        pass
    finally:
        os.close(ready_fd)


def _log_failure(work: Callable[[threading.Event], None], log: logging.Logger) -> Callable[[threading.Event], None]:
    def run(stop: threading.Event) -> None:
        try:
            work(stop)
        except Exception:
            log.exception("background work failed")
    return run


def _raise_read_ahead(mountpoint: Path, block_size: int) -> None:
    """The kernel reads ahead only 128 KiB on a FUSE mount; a whole block at a time means fewer, larger
    requests for sequential readers. Best effort (needs root). Call it once the daemon has answered a
    request: the kernel sets the read-ahead when the daemon answers FUSE's INIT."""
    devices = [m.device for m in read_mountinfo() if m.mountpoint == str(mountpoint)]
    if not devices:
        return
    try:
        Path(f"/sys/class/bdi/{devices[-1]}/read_ahead_kb").write_text(str(max(block_size >> 10, 128)))
    except OSError:
        pass


async def _main_loop(start_tasks: Callable[[trio.Nursery], None] | None) -> None:
    """Serve FUSE requests; SIGTERM/SIGINT end the loop so the finally clause unmounts."""
    async with trio.open_nursery() as nursery:
        if start_tasks is not None:
            start_tasks(nursery)

        async def stop_on_signal():
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
                async for _ in signals:
                    pyfuse3.terminate()
                    return
        nursery.start_soon(stop_on_signal)
        await pyfuse3.main(min_tasks=4, max_tasks=64)
        nursery.cancel_scope.cancel()


def start_daemon(argv: list[str], mountpoint: Path, block_size: int, master_key: bytes | None = None) -> int:
    """Run `rpfs ARGV --ready-fd N --log-file F` in the background; return its pid once it has mounted.

    An encrypted store's master key goes down a pipe (--key-fd), never on a command line or in the
    environment, where other processes could see it."""
    log_file = run_dir.daemon_files(mountpoint)[1]
    log_fd = run_dir.open_log(log_file)
    read_end, write_end = os.pipe()
    arguments = [*argv, "--ready-fd", str(write_end), "--log-file", str(log_file)]
    passed = [write_end]
    if master_key is not None:
        key_read, key_write = os.pipe()
        os.write(key_write, master_key)   # far below a pipe's buffer: never blocks
        os.close(key_write)
        passed.append(key_read)
        arguments += ["--key-fd", str(key_read)]
    try:
        daemon = start_python("rpfs", arguments, stdin=subprocess.DEVNULL, stdout=log_fd, stderr=log_fd,
                              pass_fds=passed, start_new_session=True)
    except BaseException:
        os.close(read_end)
        raise
    finally:
        os.close(log_fd)
        for fd in passed:
            os.close(fd)
    try:
        with os.fdopen(read_end, "rb") as ready:
            answer = ready.readline()
        if answer == READY:
            os.stat(mountpoint)   # answered only after FUSE's INIT handshake
            _raise_read_ahead(mountpoint, block_size)
            return daemon.pid
    except BaseException:  # Ctrl-C while waiting: the daemon must not mount behind the user's back
        daemon.terminate()
        daemon.wait(timeout=10)
        raise
    daemon.wait(timeout=10)
    reason = answer.decode(errors="replace").strip() or f"the mount daemon exited (see {log_file})"
    raise RpfsError(reason)


def _remove_log_unless_it_has_news(log_file: Path | None) -> None:
    """A daemon's log is kept only if something went wrong: /run/rpfs does not fill up with logs."""
    if log_file is None:
        return
    try:
        text = log_file.read_text(errors="replace")
    except OSError:
        return
    if not any(word in text for word in ("WARNING", "ERROR", "Traceback")):
        log_file.unlink(missing_ok=True)


def unmount(mountpoint: Path, timeout: float = 10.0) -> None:
    """Unmount an rpfs mount, also one whose daemon died, and wait for the daemon to end."""
    mountpoint = _canonical(mountpoint)
    fstype = fstype_at(str(mountpoint))
    if fstype is None:
        raise RpfsError(f"{mountpoint} is not mounted")
    if fstype != FSTYPE:
        raise RpfsError(f"{mountpoint} is not an rpfs mount (it is {fstype})")
    done = run_tool_raw(["fusermount3", "-u", str(mountpoint)])
    if done.returncode != 0:
        message = error_line(done.stderr) or "fusermount3 failed"
        if "busy" in message.lower():
            users = users_under(str(mountpoint))
            raise RpfsError(f"{mountpoint} is busy: {'used by ' + ', '.join(users) if users else 'in use'}"
                            " (stop those processes, rpfs detach what you attached from it, then retry)")
        # A dead daemon leaves an unreachable mount that fusermount may refuse: detach it lazily.
        if run_tool_raw(["umount", "-l", str(mountpoint)]).returncode != 0:
            raise RpfsError(f"cannot unmount {mountpoint}: {message}")
    _wait_for_daemon(run_dir.daemon_files(mountpoint)[0], mountpoint, timeout)


def daemon_pid(mountpoint: Path) -> int | None:
    """The pid of the rpfs daemon serving mountpoint, if it runs (a reused pid is not mistaken for it)."""
    try:
        pid = int(run_dir.daemon_files(mountpoint)[0].read_text())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return None
    return pid if b"rpfs" in cmdline and os.fsencode(mountpoint) in cmdline else None


def forget_ended(mountpoint: Path) -> None:
    """Remove the pid file of mountpoint's daemon if that daemon no longer runs (it was killed)."""
    if daemon_pid(mountpoint) is None:
        run_dir.daemon_files(mountpoint)[0].unlink(missing_ok=True)


def _wait_for_daemon(pid_path: Path, mountpoint: Path, timeout: float) -> None:
    """Wait for the daemon to end, and end it if it hangs; a pid reused by another process is left alone."""
    pid = daemon_pid(mountpoint)
    if pid is None:
        pid_path.unlink(missing_ok=True)
        return
    deadline = time.monotonic() + timeout
    sent_term = False
    while _alive(pid):
        if time.monotonic() > deadline:
            if sent_term:
                os.kill(pid, signal.SIGKILL)
                break
            os.kill(pid, signal.SIGTERM)
            sent_term, deadline = True, time.monotonic() + timeout
        time.sleep(0.05)
    pid_path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie of ours counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1][0] != "Z"
    except OSError:
        return False

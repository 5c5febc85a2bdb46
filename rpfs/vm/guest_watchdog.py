"""The guest freeze watchdog: `python -I -m rpfs.vm.guest_watchdog URI UUID MAX_SECONDS`, and
`watched_freeze()`, the one way rpfs freezes a guest.

qemu-ga on Linux never thaws by itself: a guest that rpfs froze and left frozen is an outage (Azure's
Linux extension and oVirt have both left guests so). So the freeze follows the host freeze's pattern
(rpfs/backup/freeze_watchdog.py): a separate process, in its own session, with its own libvirt
connection and a pipe on stdin that the backup holds, is armed before the freeze. It prints "armed",
then reads "frozen" (the window of MAX_SECONDS starts now), "thawed" (the backup thawed the guest and
the agent said so), or the end of stdin (the backup died, even by kill -9, or could not thaw). When the
window runs out it says "timed out" and thaws, again every RECHECK_SECONDS until told or orphaned; on
the end of stdin it thaws and asks the agent until the agent says "thawed" (a freeze that timed out in
libvirt may still land in the guest later; a hung agent may come back), for at most ENSURE_SECONDS or
until the domain stops, and says "thawed" or "not thawed". Then it exits.

A lock per domain (run dir freeze/guest-<hash>.lock), taken before the watchdog starts and held by it
until it exits, keeps a freeze from starting while the watchdog of an earlier one still thaws: that
watchdog must not undo the new freeze.
"""
from __future__ import annotations

import fcntl
import os
import select
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import libvirt

from rpfs.errors import RpfsError
from rpfs.host import run_dir
from rpfs.host.python_child import start_python
from rpfs.vm import guest_agent
from rpfs.vm.guest_agent import GuestAgentError

FREEZE_CALL_SECONDS = 60    # how long the agent's freeze (its hook, then sync and FIFREEZE) may take
ENSURE_SECONDS = 3600       # how long an orphaned watchdog goes on trying to thaw a guest that does not answer
RECHECK_SECONDS = 1.0       # after stepping in: thaw again at this pace until told "thawed"
LOCK_WAIT_SECONDS = 10      # a freeze waits this long for the watchdog of an earlier one to finish


@dataclass
class GuestFreeze:
    """What a watched freeze did, for the recovery point."""
    filesystems: int = 0              # frozen by the agent
    frozen: bool = False              # the agent said it froze at least one filesystem
    reason: str = ""                  # why not frozen (one line)
    seconds: float = 0.0              # from the freeze command sent to the thaw answered (an upper bound)
    thawed: bool | None = None        # confirmed thawed at the end (None: the watchdog goes on trying)
    watchdog_stepped_in: bool = False
    ran_out: bool = False             # the window ran out before the thaw: the snapshot may be unfrozen
    thaw_error: str = ""


@contextmanager
def watched_freeze(domain: libvirt.virDomain, max_seconds: float,
                   freeze_timeout: float = FREEZE_CALL_SECONDS,
                   agent_timeout: float = guest_agent.AGENT_TIMEOUT_SECONDS) -> Iterator[GuestFreeze]:
    """Freeze the guest for the length of a with-block, watched; thaw when the block ends (also by an
    exception). A freeze that fails does not raise: the window says why (frozen False), the block runs
    unfrozen, and the watchdog still sees the guest thawed in case the freeze lands late."""
    window = GuestFreeze()
    try:
        lock = _guest_lock(domain.UUIDString())
    except RpfsError as e:
        window.reason = e.message
        window.thawed = True
        yield window
        return
    try:
        watchdog = start_python("rpfs.vm.guest_watchdog",
                                [domain.connect().getURI(), domain.UUIDString(), repr(float(max_seconds))],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0,
                                start_new_session=True, pass_fds=(lock,))   # it holds the lock until it exits
    finally:
        os.close(lock)
    try:
        if _line(watchdog, 30) != "armed":
            raise RpfsError("the guest freeze watchdog did not start")
        started = time.monotonic()
        try:
            window.filesystems = guest_agent.freeze(domain, freeze_timeout)
        except GuestAgentError as e:
            window.reason = f"the guest freeze failed: {e.message}"
        else:
            window.frozen = window.filesystems > 0
            if not window.frozen:
                window.reason = "the guest agent froze no filesystem"
            _send(watchdog, b"frozen\n")      # the window starts now
        try:
            yield window
        finally:
            try:
                guest_agent.thaw(domain, agent_timeout)   # at once: the snapshot exists (or failed)
                thawed_here = not guest_agent.frozen(domain, agent_timeout)
            except GuestAgentError as e:
                window.thaw_error, thawed_here = e.message, False
            window.seconds = round(time.monotonic() - started, 3)
            if thawed_here:
                _send(watchdog, b"thawed\n")
            _close(watchdog)                     # otherwise the end of stdin: the watchdog makes sure
            said = _lines(watchdog, 30 if thawed_here else agent_timeout)
            window.ran_out = "timed out" in said
            window.watchdog_stepped_in = bool({"timed out", "thawed", "not thawed"} & set(said))
            window.thawed = True if thawed_here or "thawed" in said else False if "not thawed" in said else None
            if window.ran_out and window.frozen:
                window.reason = (f"the freeze window of {max_seconds:g} s ran out before the thaw;"
                                 " the watchdog thawed the guest")
    finally:
        _close(watchdog)
        if window.thawed:
            try:
                watchdog.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass   # it is in its own session and holds the domain's lock; it ends by itself


def _guest_lock(uuid: str) -> int:
    """The domain's freeze lock, flocked; refused (one line) while an earlier watchdog still runs."""
    try:
        fd = run_dir.open_guest_freeze_lock(uuid)
    except OSError as e:
        raise RpfsError(f"cannot open the guest freeze lock {e.filename}: {e.strerror}") from None
    deadline = time.monotonic() + LOCK_WAIT_SECONDS
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() > deadline:
                os.close(fd)
                raise RpfsError("the guest was not frozen: the freeze watchdog of an earlier backup still"
                                " makes sure it is thawed") from None
            time.sleep(0.05)


def _send(watchdog: subprocess.Popen, line: bytes) -> None:
    try:
        watchdog.stdin.write(line)
    except (BrokenPipeError, ValueError):
        pass   # it left already (it says why in its last line)


def _close(watchdog: subprocess.Popen) -> None:
    try:
        watchdog.stdin.close()
    except BrokenPipeError:
        pass


def _lines(watchdog: subprocess.Popen, timeout: float) -> list[str]:
    """What the watchdog says until it exits, waiting at most timeout seconds (its stdout is unbuffered)."""
    deadline, got = time.monotonic() + timeout, b""
    fd = watchdog.stdout.fileno()
    while True:
        ready, _, _ = select.select([fd], [], [], max(deadline - time.monotonic(), 0))
        if not ready:
            break
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        got += chunk
    return got.decode(errors="replace").splitlines()


def _line(watchdog: subprocess.Popen, timeout: float) -> str | None:
    """One line from the watchdog, waiting at most timeout seconds."""
    deadline, got = time.monotonic() + timeout, b""
    fd = watchdog.stdout.fileno()
    while not got.endswith(b"\n"):
        ready, _, _ = select.select([fd], [], [], max(deadline - time.monotonic(), 0))
        if not ready:
            return None
        byte = os.read(fd, 1)
        if not byte:
            break
        got += byte
    return got.decode(errors="replace").rstrip("\n") or None


class _Guest:
    """The watchdog's own libvirt connection to the domain, opened again if libvirtd restarted."""

    def __init__(self, uri: str, uuid: str) -> None:
        self.uri, self.uuid, self.domain = uri, uuid, None

    def get(self) -> libvirt.virDomain | None:
        if self.domain is None:
            try:
                self.domain = libvirt.open(self.uri).lookupByUUIDString(self.uuid)
            except libvirt.libvirtError:
                return None
        return self.domain

    def running(self) -> bool | None:
        """False only when libvirt says the domain is shut off or gone; None when it cannot be asked."""
        domain = self.get()
        if domain is None:
            return None
        try:
            return bool(domain.isActive())
        except libvirt.libvirtError as e:
            self.domain = None
            return False if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN else None

    def thaw_once(self, timeout: float) -> bool:
        """Thaw, then ask: True if the agent says the guest is thawed."""
        domain = self.get()
        if domain is None:
            return False
        try:
            guest_agent.thaw(domain, timeout)
            return not guest_agent.frozen(domain, timeout)
        except GuestAgentError:
            return False
        except libvirt.libvirtError:
            self.domain = None
            return False

    def ensure_thawed(self, seconds: float) -> bool:
        """Thaw until the agent says thawed, the domain stops, or seconds pass."""
        deadline, pause = time.monotonic() + seconds, 0.5
        while True:
            if self.thaw_once(guest_agent.AGENT_TIMEOUT_SECONDS) or self.running() is False:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(pause)
            pause = min(pause * 2, 10.0)


def main() -> int:
    uri, uuid, max_seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
    signal.signal(signal.SIGINT, signal.SIG_IGN)     # Ctrl-C aimed at the backup must not stop us
    guest = _Guest(uri, uuid)

    def thaw_and_exit(signum, frame):                # systemd stopping the service kills us too
        guest.ensure_thawed(3 * guest_agent.AGENT_TIMEOUT_SECONDS)
        raise SystemExit(1)
    signal.signal(signal.SIGTERM, thaw_and_exit)
    signal.signal(signal.SIGHUP, thaw_and_exit)
    if guest.get() is None:
        _say("cannot reach the domain")
        return 1
    _say("armed")
    deadline = time.monotonic() + FREEZE_CALL_SECONDS + max_seconds
    stepped_in = False
    while True:
        wait = RECHECK_SECONDS if stepped_in else max(deadline - time.monotonic(), 0)
        ready, _, _ = select.select([sys.stdin], [], [], wait)
        if ready:
            line = sys.stdin.readline()
            if line == "frozen\n" and not stepped_in:
                deadline = time.monotonic() + max_seconds
            elif line == "thawed\n":
                break
            elif line == "":   # the backup died or could not thaw: thaw until the agent says so
                _say("thawed" if guest.ensure_thawed(ENSURE_SECONDS) else "not thawed")
                break
            continue
        if not stepped_in and time.monotonic() >= deadline:
            stepped_in = True                        # thaw now, and again until told or orphaned
            _say("timed out")
        if stepped_in:
            guest.thaw_once(guest_agent.AGENT_TIMEOUT_SECONDS)
    return 0


def _say(line: str) -> None:
    try:
        print(line, flush=True)
    except OSError:   # the backup is gone: say nothing more (nor at exit, as Python's docs advise)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


if __name__ == "__main__":
    raise SystemExit(main())

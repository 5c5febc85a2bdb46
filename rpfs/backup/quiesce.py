"""Quiescing a VM for its snapshot: pre-scripts, filesystem freeze, post-scripts, from a TOML config.

    [pre]                       # optional; [post] takes the same keys
    path = "/etc/rpfs/web01-pre.sh"
    args = ["--checkpoint"]
    timeout_seconds = 60
    retries = 1                 # extra attempts after a failure
    continue_on_failure = false # false: a failing pre-script stops the backup
    [freeze]
    mountpoints = ["/srv/data"]
    max_seconds = 10            # the watchdog thaws after this long, whatever happens
    [guest.pre]                 # a libvirt domain's guest, through its agent; [guest.post] the same
    path = "/usr/local/sbin/db-checkpoint"   # inside the guest (guest-exec)
    args = ["--quiet"]
    timeout_seconds = 60        # then it is given up on (the agent cannot stop it: it goes on in the guest)
    retries = 0
    continue_on_failure = false
    [guest.freeze]
    max_seconds = 10            # the guest's watchdog thaws after this long (backup/guest_consistency.py)

Scripts run as root, so they and the config must be owned by root and writable by nobody else, and so
must every folder on their way (host/access.py, as OpenSSH's StrictModes); a script runs through the
descriptor that was checked, so replacing the file after the check runs nothing else.
The freeze is watched by a separate process (rpfs.backup.freeze_watchdog) that thaws the filesystems when
the window runs out or the moment this process dies, even by kill -9: a frozen production filesystem
is an outage.
"""
from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import tempfile
import time
import tomllib
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

from rpfs.backup.freeze_watchdog import FREEZE_CALL_SECONDS
from rpfs.errors import RpfsError
from rpfs.host import run_dir
from rpfs.host.access import open_trusted
from rpfs.host.python_child import start_python

SCRIPT_KEYS = {"path", "args", "timeout_seconds", "retries", "continue_on_failure"}
FREEZE_KEYS = {"mountpoints", "max_seconds"}
GUEST_KEYS = {"pre", "post", "freeze"}
GUEST_FREEZE_KEYS = {"max_seconds"}


@dataclass
class Script:
    path: str
    args: list[str] = field(default_factory=list)
    timeout_seconds: float = 60.0
    retries: int = 0
    continue_on_failure: bool = False


@dataclass
class ConsistencyConfig:
    pre: Script | None = None
    post: Script | None = None
    freeze: list[str] = field(default_factory=list)
    freeze_max_seconds: float = 10.0
    guest_pre: Script | None = None     # run in a libvirt domain's guest (path inside the guest)
    guest_post: Script | None = None
    guest_freeze_max_seconds: float = 10.0


@dataclass
class ScriptResult:
    script: str
    ok: bool
    attempts: int
    exit_code: int | None
    seconds: float
    message: str = ""


def load_config(path: Path) -> ConsistencyConfig:
    fd = open_trusted(path, "consistency config")   # read from what was checked
    try:
        with os.fdopen(fd, "rb") as f:
            text = f.read().decode()
        raw = tomllib.loads(text)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise RpfsError(f"{path}: {e}") from None
    unknown = set(raw) - {"pre", "post", "freeze", "guest"}
    if unknown:
        raise RpfsError(f"{path}: unknown section(s) {', '.join(sorted(unknown))} (known: pre, post, freeze, guest)")
    config = ConsistencyConfig()
    for section in ("pre", "post"):
        if section in raw:
            setattr(config, section, _script(path, section, raw[section]))
    freeze = raw.get("freeze", {})
    _check_keys(path, "freeze", freeze, FREEZE_KEYS)
    mountpoints = freeze.get("mountpoints", [])
    if not isinstance(mountpoints, list) or not all(isinstance(m, str) for m in mountpoints):
        raise RpfsError(f"{path}: [freeze] mountpoints must be a list of paths")
    max_seconds = freeze.get("max_seconds", config.freeze_max_seconds)
    if not isinstance(max_seconds, (int, float)) or isinstance(max_seconds, bool):
        raise RpfsError(f"{path}: [freeze] max_seconds must be a number of seconds")
    config.freeze, config.freeze_max_seconds = mountpoints, float(max_seconds)
    if config.freeze_max_seconds <= 0:
        raise RpfsError(f"{path}: freeze.max_seconds must be positive")
    for mountpoint in config.freeze:
        if not os.path.ismount(mountpoint):
            raise RpfsError(f"{path}: {mountpoint} (freeze.mountpoints) is not a mounted filesystem")
    _guest(path, raw.get("guest", {}), config)
    return config


def _guest(path: Path, guest: dict, config: ConsistencyConfig) -> None:
    """[guest.pre], [guest.post], [guest.freeze]: the guest's side, its scripts' paths inside the guest."""
    _check_keys(path, "guest", guest, GUEST_KEYS)
    for phase in ("pre", "post"):
        if phase in guest:
            setattr(config, f"guest_{phase}", _script(path, f"guest.{phase}", guest[phase], on_host=False))
    freeze = guest.get("freeze", {})
    _check_keys(path, "guest.freeze", freeze, GUEST_FREEZE_KEYS)
    max_seconds = freeze.get("max_seconds", config.guest_freeze_max_seconds)
    if not isinstance(max_seconds, (int, float)) or isinstance(max_seconds, bool) or not 0 < max_seconds <= 3600:
        raise RpfsError(f"{path}: [guest.freeze] max_seconds must be a number of seconds (above 0, at most 3600)")
    config.guest_freeze_max_seconds = float(max_seconds)


def _check_keys(path: Path, section: str, table: dict, known: set[str]) -> None:
    if not isinstance(table, dict):
        raise RpfsError(f"{path}: [{section}] must be a table")
    unknown = set(table) - known
    if unknown:
        raise RpfsError(f"{path}: unknown key(s) in [{section}]: {', '.join(sorted(unknown))}"
                        f" (known: {', '.join(sorted(known))})")


def _script(path: Path, section: str, table: dict, on_host: bool = True) -> Script:
    _check_keys(path, section, table, SCRIPT_KEYS)
    if "path" not in table:
        raise RpfsError(f"{path}: [{section}] needs a path")
    types = {"path": str, "args": list, "timeout_seconds": (int, float), "retries": int, "continue_on_failure": bool}
    for key, value in table.items():
        if not isinstance(value, types[key]) or isinstance(value, bool) != (types[key] is bool):
            raise RpfsError(f"{path}: [{section}] {key} has the wrong type ({type(value).__name__})")
    if not all(isinstance(a, str) for a in table.get("args", [])):
        raise RpfsError(f"{path}: [{section}] args must be a list of strings")
    script = Script(**table)
    if script.timeout_seconds <= 0 or script.retries < 0:
        raise RpfsError(f"{path}: [{section}] timeout_seconds must be positive and retries not negative")
    if not on_host:   # a path in the guest: nothing to check here, the guest's agent runs it
        if not script.path or "\0" in script.path or any("\0" in a for a in script.args):
            raise RpfsError(f"{path}: [{section}] path and args must be non-empty text without NUL")
        return script
    os.close(_open_script(script, section))   # refused now, before anything is quiesced
    return script


def _open_script(script: Script, phase: str) -> int:
    """The script, opened and checked (host/access.py): it is run through this descriptor."""
    fd = open_trusted(Path(script.path), f"{phase}-script")
    if not os.fstat(fd).st_mode & 0o111:
        os.close(fd)
        raise RpfsError(f"{phase}-script {script.path} is not executable")
    return fd


def run_script(script: Script, phase: str) -> ScriptResult:
    """Run a script with its timeout and retries; a script that hangs is killed with its children."""
    started = time.monotonic()
    result = ScriptResult(script=script.path, ok=False, attempts=0, exit_code=None, seconds=0.0)
    for attempt in range(script.retries + 1):
        result.attempts = attempt + 1
        try:
            fd = _open_script(script, phase)   # checked again now: it is what runs
        except RpfsError as e:
            result.message = e.message
            break
        # Output goes to a file, not a pipe: a helper the script leaves running must not hang us.
        with tempfile.TemporaryFile() as output_file:
            try:
                # Run through the descriptor (an interpreter reads the script from /proc/self/fd/N too).
                proc = subprocess.Popen([script.path, *script.args], executable=f"/proc/self/fd/{fd}",
                                        pass_fds=(fd,), stdin=subprocess.DEVNULL, stdout=output_file,
                                        stderr=subprocess.STDOUT, start_new_session=True,
                                        env={**os.environ, "RPFS_PHASE": phase})
            except OSError as e:
                result.message = f"cannot run it: {e.strerror}"
                continue
            finally:
                os.close(fd)
            try:
                proc.wait(timeout=script.timeout_seconds)
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                result.message = f"timed out after {script.timeout_seconds:g} s"
                continue
            except BaseException:
                _kill_group(proc)
                raise
            output_file.seek(0)
            output = output_file.read()[-4096:]
        result.exit_code = proc.returncode
        if proc.returncode == 0:
            result.ok, result.message = True, ""
            break
        last = output.decode(errors="replace").strip().splitlines()[-1:] or [""]
        result.message = f"exit code {proc.returncode}{': ' + last[0] if last[0] else ''}"
    result.seconds = round(time.monotonic() - started, 3)
    return result


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


@contextmanager
def frozen(mountpoints: list[str], max_seconds: float) -> Iterator["FreezeWindow"]:
    """Freeze filesystems for the length of a with-block, watched by a watchdog process.

    The watchdog thaws when told to, when max_seconds run out, or when its stdin closes because this
    process died. The block's window records whether the watchdog had to step in.
    """
    window = FreezeWindow(mountpoints)
    if not mountpoints:
        yield window
        return
    locks = _freeze_locks(mountpoints, FREEZE_CALL_SECONDS + max_seconds)
    try:
        watchdog = start_python("rpfs.backup.freeze_watchdog",
                                [str(max_seconds), *(os.path.abspath(m) for m in mountpoints)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                start_new_session=True, pass_fds=locks)   # it holds them until it exits
    finally:
        for fd in locks:
            os.close(fd)
    try:
        if watchdog.stdout.readline() != b"armed\n":
            raise RpfsError("the freeze watchdog did not start")
        started = time.monotonic()
        frozen_now = []
        try:
            for mountpoint in mountpoints:
                _fsfreeze("-f", mountpoint)
                frozen_now.append(mountpoint)
            started = time.monotonic()
            watchdog.stdin.write(b"frozen\n")   # the watchdog's window starts now
            watchdog.stdin.flush()
            yield window
        finally:
            for mountpoint in frozen_now:
                _fsfreeze("-u", mountpoint, missing_ok=True)
            window.seconds = round(time.monotonic() - started, 3)
            try:
                watchdog.stdin.write(b"thawed\n")
                watchdog.stdin.flush()
            except BrokenPipeError:
                pass   # the watchdog timed out, thawed and left already
            window.watchdog_stepped_in = watchdog.stdout.readline() == b"timed out\n"
    finally:
        try:
            watchdog.stdin.close()
        except BrokenPipeError:
            pass
        watchdog.wait(timeout=30)


def _freeze_locks(mountpoints: list[str], wait_seconds: float) -> list[int]:
    """An exclusive flock on each mountpoint's lock file in the run dir, which the watchdog inherits and
    holds until it exits: a freeze starts only once the watchdog of an earlier one has gone, so that
    one's last thaws (it goes on thawing a while after its backup died) never undo this freeze. (A lock
    on the mountpoint's own folder would keep the filesystem busy for umount meanwhile.)"""
    deadline, fds = time.monotonic() + wait_seconds, []
    try:
        for mountpoint in sorted({os.path.realpath(m) for m in mountpoints}):   # one order: no deadlock
            fds.append(run_dir.open_freeze_lock(mountpoint))
            while True:
                try:
                    fcntl.flock(fds[-1], fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise RpfsError(f"{mountpoint} is being frozen for another backup (its freeze watchdog"
                                        " still runs); try again later") from None
                    time.sleep(0.05)
    except OSError as e:
        for fd in fds:
            os.close(fd)
        raise RpfsError(f"cannot open the freeze lock {e.filename}: {e.strerror}") from None
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return fds


@dataclass
class FreezeWindow:
    mountpoints: list[str]
    seconds: float = 0.0
    watchdog_stepped_in: bool = False

    def record(self) -> dict:
        return asdict(self)


def _fsfreeze(flag: str, mountpoint: str, missing_ok: bool = False) -> None:
    try:
        done = subprocess.run(["fsfreeze", flag, mountpoint], capture_output=True, text=True,
                              timeout=FREEZE_CALL_SECONDS)
    except subprocess.TimeoutExpired:
        raise RpfsError(f"fsfreeze {flag} {mountpoint} did not finish within {FREEZE_CALL_SECONDS} s") from None
    if done.returncode != 0 and not (missing_ok and "Invalid argument" in done.stderr):
        what = "freeze" if flag == "-f" else "thaw"
        raise RpfsError(f"cannot {what} {mountpoint}: {done.stderr.strip() or done.returncode}")

"""What rpfs's processes let others see of their secrets: no passphrase in /proc/PID/environ, and no core
dump from a process that holds a master key (the CLI that unlocks, the daemons, their reader processes)."""
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cli_helpers import REPO, force_unmount, is_mounted, rpfs
from test_encryption import env_with

PASSPHRASE = "no one may read this passphrase in /proc"
PR_GET_DUMPABLE = 3
MiB = 1 << 20


@pytest.fixture
def cores_allowed():
    """Processes may start here with a soft core limit of 0 already: raise it to the hard limit for what
    the test starts, so that only rpfs itself can make it 0 again."""
    before = resource.getrlimit(resource.RLIMIT_CORE)
    resource.setrlimit(resource.RLIMIT_CORE, (before[1], before[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_CORE, before)


def core_limit(pid: int) -> str:
    """The soft limit on core file size of a process, as /proc/PID/limits shows it."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max core file size"):
            return line.split()[4]
    raise AssertionError(f"no core file size in /proc/{pid}/limits")


def children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except (OSError, ValueError):
            continue
        if entry.isdigit() and int(stat.rsplit(") ", 1)[1].split()[1]) == pid:
            found.append(int(entry))
    return found


def wait_until(ready, process: subprocess.Popen, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while not (found := ready()):
        assert process.poll() is None, process.stderr.read()
        assert time.monotonic() < deadline, "the mount did not come up"
        time.sleep(0.05)
    return found


def backed_up(tmp_path: Path, env: dict) -> Path:
    disk = tmp_path / "d.img"
    disk.write_bytes(os.urandom(3 * MiB))
    store = tmp_path / "store"
    rpfs("init", store=store, env=env)
    rpfs("backup", "vm", f"--disk=d={disk}", store=store, env=env)
    return store


def test_a_passphrase_is_not_in_proc_environ_and_a_process_holding_the_key_dumps_no_core(tmp_path, kernel,
                                                                                         cores_allowed):
    """A mount in the foreground, unlocked with RPFS_PASSPHRASE, stays up to be looked at."""
    env = env_with(RPFS_PASSPHRASE=PASSPHRASE)   # no key file: the passphrase alone
    store = backed_up(tmp_path, env)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    process = subprocess.Popen([sys.executable, "-m", "rpfs", "--store", str(store), "mount", str(mnt),
                                "--foreground"], env=env, cwd=REPO, stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: is_mounted(mnt), process)
        environ = Path(f"/proc/{process.pid}/environ").read_bytes()
        assert b"\0RPFS_PASSPHRASE=\0" in environ   # where it was: its value overwritten
        assert PASSPHRASE.encode() not in environ
        assert core_limit(process.pid) == "0"
        readers = wait_until(lambda: children(process.pid), process)
        assert all(core_limit(reader) == "0" for reader in readers)
    finally:
        if is_mounted(mnt) and rpfs("umount", str(mnt), check=False).returncode != 0:
            force_unmount(mnt)
        try:
            process.wait(timeout=30)
        finally:
            if process.poll() is None:
                process.kill()


def test_the_mount_daemon_and_its_readers_dump_no_core(tmp_path, kernel, cores_allowed):
    """The daemon `rpfs mount` starts, given the master key down a pipe, and its reader processes."""
    store = backed_up(tmp_path, dict(os.environ))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    pid = json.loads(rpfs("mount", str(mnt), "--json", store=store).stdout)["pid"]
    try:
        assert core_limit(pid) == "0"
        readers = children(pid)
        assert readers and all(core_limit(reader) == "0" for reader in readers)
    finally:
        if is_mounted(mnt) and rpfs("umount", str(mnt), check=False).returncode != 0:
            force_unmount(mnt)


def test_no_core_dumps_makes_the_process_not_dumpable(cores_allowed):
    """What /proc does not show of another process: prctl(PR_GET_DUMPABLE), asked by the process itself."""
    script = ("import ctypes, resource, sys; from rpfs.host.libc import no_core_dumps\n"
              "dumpable = lambda: ctypes.CDLL(None).prctl(int(sys.argv[1]), 0, 0, 0, 0)\n"
              "before = dumpable(); no_core_dumps()\n"
              "print(before, dumpable(), *resource.getrlimit(resource.RLIMIT_CORE))")
    done = subprocess.run([sys.executable, "-c", script, str(PR_GET_DUMPABLE)], cwd=REPO, capture_output=True,
                          text=True, check=True)
    hard = resource.getrlimit(resource.RLIMIT_CORE)[1]
    assert done.stdout.split() == ["1", "0", "0", str(hard)]   # the hard limit is kept: scripts may raise it

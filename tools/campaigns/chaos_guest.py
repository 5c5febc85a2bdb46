"""The crash campaign's guest (tools/chaos): one libvirt domain of the test guest (tools/guest), started once for
the whole campaign and destroyed at its end whatever happens, that `rpfs backup --libvirt` backs up while the
campaign kills it.

Its only disk vda is a small qcow2 with ext4, mounted on /data in the guest; the campaign writes files there
through the agent (guest-exec) between backups.
"""
from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "services"))
import guest_domain  # noqa: E402

URI = guest_domain.URI
DISK_BYTES = 64 << 20
AGENT_SECONDS = 300        # from start to the agent's first answer (TCG, a busy host)


GuestError = guest_domain.GuestError   # the guest could not be started or did not answer


def libvirt_answers() -> str | None:
    """None when libvirtd answers at URI, else why not (one line)."""
    try:
        import libvirt
    except ImportError as e:
        return f"no libvirt-python: {e}"
    libvirt.registerErrorHandler(lambda _context, _error: None, None)
    try:
        libvirt.open(URI).close()
    except libvirt.libvirtError as e:
        return f"libvirtd does not answer at {URI}: {e.get_error_message()}"
    return None


class CampaignGuest:
    """rpfs-test-chaos-<pid>: defined and started by start(), destroyed, undefined and its folder removed by close()."""

    def __init__(self) -> None:
        self.name = f"{guest_domain.PREFIX}chaos-{os.getpid()}"
        self.folder = guest_domain.IMAGES / self.name
        self.conn = None
        self.domain = None
        self.files = 0

    def start(self) -> float:
        """Define and start the domain; seconds until its agent answered."""
        files = guest_domain.guest_files()
        self.conn = guest_domain.open_connection()
        self.domain, self.folder, _ = guest_domain.define_guest(self.conn, self.name, files, disk_bytes=DISK_BYTES)
        started = time.monotonic()
        self.domain.create()
        guest_domain.wait_for_agent(self.domain, AGENT_SECONDS)
        code, _, err = self.exec("grep -q ' /data ext4 ' /proc/mounts")
        if code:
            raise GuestError(f"{self.name}: /data is not mounted in the guest: {err.strip()}")
        return time.monotonic() - started

    def close(self) -> None:
        if self.conn is None:
            return
        try:
            guest_domain.remove_domain(self.conn, self.name)
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.conn.close()
            self.conn = None

    @property
    def uuid(self) -> str:
        return self.domain.UUIDString()

    def agent(self, command: str, arguments: dict | None = None, timeout: int = 10) -> object:
        return guest_domain.agent(self.domain, command, arguments, timeout)

    def exec(self, cmd: str, timeout: float = 60) -> tuple[int, str, str]:
        """`/bin/sh -c cmd` in the guest; (exit code, stdout, stderr)."""
        return guest_domain.guest_exec(self.domain, cmd, timeout)

    def write(self, rng) -> None:
        """What the guest's applications do between backups: a new file of random bytes, an old one removed,
        some left in the page cache (not synced: the freeze must flush them)."""
        self.files += 1
        kib = rng.randint(16, 2048)
        cmd = (f"dd if=/dev/urandom of=/data/f{self.files % 8}.bin bs=1024 count={kib} 2>/dev/null"
               f" && echo {self.files} >> /data/log")
        code, _, err = self.exec(cmd)
        if code:
            raise GuestError(f"{self.name}: a write in the guest failed: {err.strip()}")

    def thawed(self, seconds: float) -> bool:
        """Is the guest thawed, within `seconds` (a killed backup's watchdog thaws it)?"""
        deadline = time.monotonic() + seconds
        while True:
            try:
                if self.agent("guest-fsfreeze-status") == "thawed":
                    return True
            except Exception:   # noqa: BLE001 - the agent busy with a freeze: asked again
                pass
            if time.monotonic() > deadline:
                return False
            time.sleep(0.2)

    def job_running(self) -> bool:
        """Is a job (a backup's) on the domain? (jobStats fails while a backup job starts: that is a job.)"""
        import libvirt
        try:
            return self.domain.jobStats(0).get("type", libvirt.VIR_DOMAIN_JOB_NONE) != libvirt.VIR_DOMAIN_JOB_NONE
        except libvirt.libvirtError:
            return True

"""Test guests on the real libvirtd: a tiny Debian kernel + busybox/qemu-ga initramfs (tools/guest), TCG.

`make_guest(suffix)` defines and starts a domain rpfs-test-<pid>-<suffix> whose only disk vda is a qcow2 data
disk with ext4 (mounted on /data in the guest), and whose agent runs with the freeze hook (each freeze and thaw
appends a line to /data/hook.log). Leaving the context destroys and undefines the domain and removes its folder,
whatever happened. The `guest` fixture (tests/conftest.py) is one such guest shared by a test session: with
2 cores, one guest at a time.
"""
from __future__ import annotations

import base64
import contextlib
import importlib.util
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from conftest import skip_or_fail_in_ci

REPO = Path(__file__).resolve().parent.parent


def _tool_module(name: str, path: Path):
    """A standard-library module of tools/ loaded from its file (tools/ is no package the tests import)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


guest_domain = _tool_module("guest_domain", REPO / "tools" / "services" / "guest_domain.py")
IMAGES = guest_domain.IMAGES
URI = "qemu:///system"
DATA_DISK_BYTES = 256 << 20
_counter = itertools.count(1)


def libvirt_conn():
    """An open connection to qemu:///system. Outside CI a libvirtd that does not answer skips the test with
    the reason; in CI (CI=true) it fails it."""
    try:
        import libvirt
    except ImportError as error:
        skip_or_fail_in_ci(f"needs libvirt-python (run tools/setup): {error}")
    if os.geteuid() != 0:
        skip_or_fail_in_ci("needs root (libvirt's qemu:///system)")
    libvirt.registerErrorHandler(lambda _context, _error: None, None)  # errors are raised; no stderr lines
    try:
        return libvirt.open(URI)
    except libvirt.libvirtError as error:
        skip_or_fail_in_ci(f"libvirtd does not answer at {URI} (tools/libvirt start): {error}")


def guest_files() -> Path:
    """The cache folder of the test guest (vmlinuz, initrd.img), built on first use (tools/guest build)."""
    done = subprocess.run([str(REPO / "tools/guest"), "build"], capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        pytest.fail(f"tools/guest build failed: {done.stderr.strip()}")
    return Path(done.stdout.strip())


def make_data_disk(path: Path, size: int = DATA_DISK_BYTES) -> Path:
    """A qcow2 file of `size` virtual bytes holding an empty ext4."""
    return guest_domain.make_data_disk(path, size)


image_format = guest_domain.image_format
domain_xml = guest_domain.domain_xml
remove_domain = guest_domain.remove_domain


@dataclass
class Guest:
    """A running (or defined) test domain and the folder beside it that libvirt's qemu can reach."""
    name: str
    domain: "libvirt.virDomain"  # noqa: F821 (libvirt is imported lazily so collection works without it)
    data_disk: Path
    folder: Path
    start_seconds: float | None = None   # how long domain.create() took
    agent_seconds: float | None = None   # from start to the agent's first answer (the session guest)

    @property
    def console_log(self) -> Path:
        return self.folder / "console.log"

    def agent(self, command: str, arguments: dict | None = None, timeout: int = 10) -> object:
        """One guest agent command; its "return" value (libvirt raises on an agent error or timeout)."""
        import libvirt_qemu
        request = {"execute": command, **({"arguments": arguments} if arguments is not None else {})}
        answer = libvirt_qemu.qemuAgentCommand(self.domain, json.dumps(request), timeout, 0)
        return json.loads(answer)["return"]

    def wait_for_agent(self, timeout: float = 180) -> float:
        """Seconds until the agent answered guest-ping (bounded retries); fails the test after `timeout`."""
        import libvirt
        start = time.monotonic()
        deadline = start + timeout
        delay = 0.2
        while True:
            try:
                self.agent("guest-ping", timeout=5)
                return time.monotonic() - start
            except libvirt.libvirtError as error:
                if time.monotonic() > deadline:
                    tail = self.console_log.read_text(errors="replace")[-2000:] if self.console_log.exists() \
                        else "(no console log)"
                    pytest.fail(f"{self.name}: agent did not answer within {timeout:.0f} s: {error}\n"
                                f"console:\n{tail}")
                time.sleep(delay)
                delay = min(delay * 2, 2.0)

    def exec(self, cmd: str, timeout: float = 60) -> tuple[int, str, str]:
        """Run `/bin/sh -c cmd` in the guest through guest-exec; (exitcode, stdout, stderr)."""
        pid = self.agent("guest-exec", {"path": "/bin/sh", "arg": ["-c", cmd], "capture-output": True})["pid"]
        deadline = time.monotonic() + timeout
        delay = 0.05
        while True:
            status = self.agent("guest-exec-status", {"pid": pid})
            if status["exited"]:
                out = base64.b64decode(status.get("out-data", "")).decode(errors="replace")
                err = base64.b64decode(status.get("err-data", "")).decode(errors="replace")
                return status.get("exitcode", -status.get("signal", 0) or -1), out, err
            if time.monotonic() > deadline:
                pytest.fail(f"{self.name}: {cmd!r} did not finish within {timeout:.0f} s")
            time.sleep(delay)
            delay = min(delay * 2, 0.5)


@contextlib.contextmanager
def make_guest(name_suffix: str | int, data_disk: Path | None = None, start: bool = True) -> Iterator[Guest]:
    """A test domain rpfs-test-<pid>-<suffix> booting the test guest; `data_disk` (qcow2 or raw, as the file
    says) is its vda, else a new 256 MiB qcow2 with ext4 in its folder. Destroyed, undefined and its folder
    removed on leaving, also on failure. start=False leaves it defined and shut off."""
    conn = libvirt_conn()
    files = guest_files()
    # `timeout` or a CI runner ends a run with SIGTERM: turn it into an exception so the finally below runs
    previous = signal.signal(signal.SIGTERM, _terminated) if threading.current_thread() is threading.main_thread() \
        else None
    name = f"rpfs-test-{os.getpid()}-{name_suffix}"
    folder = IMAGES / name
    remove_domain(conn, name)
    shutil.rmtree(folder, ignore_errors=True)
    try:
        IMAGES.mkdir(parents=True, exist_ok=True)
        folder.mkdir(mode=0o711)   # libvirt's qemu (libvirt-qemu) must reach the files; others may not list
        for part in ("vmlinuz", "initrd.img"):   # copies: libvirt relabels the files a domain boots from
            shutil.copyfile(files / part, folder / part)
        disk = data_disk if data_disk is not None else make_data_disk(folder / "data.qcow2")
        domain = conn.defineXML(domain_xml(name, folder, disk, image_format(disk)))
        guest = Guest(name=name, domain=domain, data_disk=disk, folder=folder)
        if start:
            started = time.monotonic()
            domain.create()
            guest.start_seconds = time.monotonic() - started
        yield guest
    finally:
        remove_domain(conn, name)
        shutil.rmtree(folder, ignore_errors=True)
        conn.close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _terminated(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def session_guest() -> Iterator[Guest]:
    """The session's shared guest, started and its agent answering."""
    with make_guest(next(_counter)) as guest:
        seconds = guest.wait_for_agent()
        print(f"\n{guest.name}: agent answered {seconds:.1f} s after start", file=sys.stderr)
        guest.agent_seconds = seconds
        yield guest

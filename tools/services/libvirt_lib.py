"""The parts of tools/libvirt that wait, look at processes or list domains.

    python3 tools/services/libvirt_lib.py probe                      # exit 0 when libvirtd answers
    python3 tools/services/libvirt_lib.py wait --timeout S           # retry the probe until it answers
    python3 tools/services/libvirt_lib.py remove-test-domains        # destroy + undefine every rpfs-test-*
    python3 tools/services/libvirt_lib.py stop-daemons --timeout S   # SIGTERM libvirtd, then virtlogd

Standard library only (the system python3, before any venv exists): it asks `virsh`, not libvirt-python.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

URI = "qemu:///system"
TEST_PREFIX = "rpfs-test-"
# libvirtd first: it talks to virtlogd while it shuts down.
DAEMONS = ("libvirtd", "virtlogd")


def virsh(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(["virsh", "-c", URI, *args], capture_output=True, text=True, timeout=timeout)


def probe() -> str | None:
    """None when libvirtd answers `virsh version`, else why not (one line)."""
    try:
        done = virsh("version", timeout=20)
    except subprocess.TimeoutExpired:
        return "virsh version did not answer within 20 s"
    if done.returncode == 0:
        return None
    lines = done.stderr.strip().splitlines()
    return lines[0] if lines else f"virsh exited {done.returncode}"


def wait(timeout: float) -> int:
    deadline = time.monotonic() + timeout
    delay = 0.1
    while True:
        reason = probe()
        if reason is None:
            return 0
        if not pids("libvirtd"):
            print(f"libvirt: libvirtd is not running: {reason}", file=sys.stderr)
            return 1
        if time.monotonic() > deadline:
            print(f"libvirt: no answer at {URI} within {timeout:.0f} s: {reason}", file=sys.stderr)
            return 1
        time.sleep(delay)
        delay = min(delay * 2, 2.0)


def remove_test_domains() -> int:
    """Only domains named rpfs-test-*: the tests' leftovers, never a user's domain."""
    listed = virsh("list", "--all", "--name")
    if listed.returncode != 0:
        print(f"libvirt: virsh list failed: {listed.stderr.strip()}", file=sys.stderr)
        return 1
    for name in listed.stdout.split():
        if not name.startswith(TEST_PREFIX):
            continue
        virsh("destroy", name)
        done = virsh("undefine", name, "--managed-save", "--snapshots-metadata", "--checkpoints-metadata",
                     "--nvram")
        print(f"libvirt: removed {name}" if done.returncode == 0 else
              f"libvirt: undefine {name} failed: {done.stderr.strip()}", file=sys.stderr)
    return 0


def alive(pid: int) -> bool:
    """A zombie counts as dead: pid 1 here reaps orphans only every second or two."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(") ", 1)[1].split()[0] != "Z"


def pids(name: str) -> list[int]:
    """Pids of processes whose executable's name is exactly `name`."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if (proc / "comm").read_text().strip() == name and alive(int(proc.name)):
                    found.append(int(proc.name))
            except OSError:
                continue
    return found


def stop_daemons(timeout: float) -> int:
    status = 0
    for name in DAEMONS:
        running = pids(name)
        for pid in running:
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while any(alive(pid) for pid in running):
            if time.monotonic() > deadline:
                print(f"libvirt: {name} ignored SIGTERM for {timeout:.0f} s, killing it", file=sys.stderr)
                for pid in running:
                    if alive(pid):
                        os.kill(pid, signal.SIGKILL)
                deadline = time.monotonic() + timeout
                status = 1
            time.sleep(0.05)
        Path(f"/run/{name}.pid").unlink(missing_ok=True)
    return status


def main() -> int:
    parser = argparse.ArgumentParser(prog="libvirt_lib.py")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("probe")
    commands.add_parser("remove-test-domains")
    for name in ("wait", "stop-daemons"):
        commands.add_parser(name).add_argument("--timeout", type=float, required=True)
    args = parser.parse_args()
    if args.command == "probe":
        reason = probe()
        if reason is not None:
            print(f"libvirt: {URI}: {reason}", file=sys.stderr)
        return 0 if reason is None else 1
    if args.command == "wait":
        return wait(args.timeout)
    if args.command == "remove-test-domains":
        return remove_test_domains()
    return stop_daemons(args.timeout)


if __name__ == "__main__":
    sys.exit(main())

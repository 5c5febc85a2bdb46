"""The freeze watchdog: `python -m rpfs.backup.freeze_watchdog MAX_SECONDS MOUNTPOINT...`.

Started before a freeze, in its own session, with a pipe on stdin. It prints "armed", then thaws every
mountpoint when MAX_SECONDS pass, or as soon as stdin reports "thawed" or closes (the backup died, even
by kill -9). It answers "timed out" if it had to thaw on its own, else "ok".
"""
import select
import signal
import subprocess
import sys
import time


def thaw(mountpoints: list[str]) -> None:
    """Thaw every mountpoint (harmless if not frozen); retried briefly, in case a freeze started by a
    backup that just died lands after our first attempt."""
    for attempt in range(3):
        for mountpoint in mountpoints:
            subprocess.run(["fsfreeze", "-u", mountpoint], capture_output=True, timeout=30)
        if attempt < 2:
            time.sleep(0.5)


def main() -> int:
    max_seconds, mountpoints = float(sys.argv[1]), sys.argv[2:]
    signal.signal(signal.SIGINT, signal.SIG_IGN)     # Ctrl-C aimed at the backup must not stop us

    def thaw_and_exit(signum, frame):                # systemd stopping the service kills us too
        thaw(mountpoints)
        raise SystemExit(1)
    signal.signal(signal.SIGTERM, thaw_and_exit)
    signal.signal(signal.SIGHUP, thaw_and_exit)
    print("armed", flush=True)
    deadline = time.monotonic() + max_seconds
    timed_out = answered = False
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            timed_out = True
            break
        ready, _, _ = select.select([sys.stdin], [], [], left)
        if ready:
            answered = sys.stdin.readline() == "thawed\n"   # "" when the backup died: thaw either way
            break
    if timed_out or not answered:
        thaw(mountpoints)
    else:
        for mountpoint in mountpoints:
            subprocess.run(["fsfreeze", "-u", mountpoint], capture_output=True, timeout=30)
    try:
        print("timed out" if timed_out else "ok", flush=True)
    except BrokenPipeError:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The freeze watchdog: `python -m rpfs.freeze_watchdog MAX_SECONDS MOUNTPOINT...`.

Started before a freeze, in its own session, with a pipe on stdin. It prints "armed", then thaws every
mountpoint when MAX_SECONDS pass, or as soon as stdin reports "thawed" or closes (the backup died, even
by kill -9). It answers "timed out" if it had to thaw on its own, else "ok".
"""
import select
import signal
import subprocess
import sys
import time


def main() -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)     # Ctrl-C aimed at the backup must not stop us
    max_seconds, mountpoints = float(sys.argv[1]), sys.argv[2:]
    print("armed", flush=True)
    deadline = time.monotonic() + max_seconds
    timed_out = False
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            timed_out = True
            break
        ready, _, _ = select.select([sys.stdin], [], [], left)
        if ready:
            sys.stdin.readline()   # "thawed", or "" when the backup died: thaw either way
            break
    for mountpoint in mountpoints:   # thawing a filesystem that is not frozen is harmless
        subprocess.run(["fsfreeze", "-u", mountpoint], capture_output=True)
    try:
        print("timed out" if timed_out else "ok", flush=True)
    except BrokenPipeError:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The freeze watchdog: `python -I -m rpfs.backup.freeze_watchdog MAX_SECONDS MOUNTPOINT...`.

Started before a freeze, in its own session, with a pipe on stdin. It prints "armed", then reads:
"frozen" (every filesystem is frozen: the window of MAX_SECONDS starts now), "thawed" (done), or the
end of stdin (the backup died, even by kill -9). It thaws every mountpoint when the window runs out,
or at once when the backup dies. The window counts from "frozen", not from arming: `fsfreeze -f` syncs
first and may take long. Before "frozen" it waits at most FREEZE_CALL_SECONDS more than the window.
After stepping in it keeps thawing until told "thawed" or stdin ends, so a freeze that lands late is
thawed too. It answers "timed out" if it had to thaw on its own, else "ok".
"""
import select
import signal
import subprocess
import sys
import time

FREEZE_CALL_SECONDS = 60   # how long `fsfreeze -f` may take (quiesce.py gives it as long)
THAW_SECONDS = 30


def thaw(mountpoints: list[str]) -> None:
    """Thaw every mountpoint (harmless if not frozen); one that hangs does not keep the others frozen."""
    for mountpoint in mountpoints:
        try:
            subprocess.run(["fsfreeze", "-u", mountpoint], capture_output=True, timeout=THAW_SECONDS)
        except subprocess.TimeoutExpired:
            continue


def main() -> int:
    max_seconds, mountpoints = float(sys.argv[1]), sys.argv[2:]
    signal.signal(signal.SIGINT, signal.SIG_IGN)     # Ctrl-C aimed at the backup must not stop us

    def thaw_and_exit(signum, frame):                # systemd stopping the service kills us too
        thaw(mountpoints)
        raise SystemExit(1)
    signal.signal(signal.SIGTERM, thaw_and_exit)
    signal.signal(signal.SIGHUP, thaw_and_exit)
    print("armed", flush=True)
    deadline = time.monotonic() + FREEZE_CALL_SECONDS + max_seconds
    timed_out = False
    while True:
        wait = max(deadline - time.monotonic(), 0) if not timed_out else 0.5
        ready, _, _ = select.select([sys.stdin], [], [], wait)
        if ready:
            line = sys.stdin.readline()
            if line == "frozen\n" and not timed_out:
                deadline = time.monotonic() + max_seconds
                continue
            if line == "thawed\n":
                break
            if line == "":   # the backup died: thaw, and again in case its last `fsfreeze -f` lands late
                for _ in range(3):
                    thaw(mountpoints)
                    time.sleep(0.5)
                break
            continue
        if time.monotonic() >= deadline or timed_out:
            timed_out = True                         # thaw now, and again until told or orphaned
            thaw(mountpoints)
    if not timed_out:
        thaw(mountpoints)   # harmless: the backup has thawed already; covers a thaw it could not do
    try:
        print("timed out" if timed_out else "ok", flush=True)
    except BrokenPipeError:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

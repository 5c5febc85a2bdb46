"""Running the real `rpfs` CLI from tests, and cleaning up its mounts whatever happens."""
from __future__ import annotations

import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def rpfs(*args: str, store: Path | None = None, check: bool = True, timeout: float = 300,
         env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "rpfs"]
    if store is not None:
        cmd += ["--store", str(store)]
    env = {k: v for k, v in (os.environ if env is None else env).items() if k != "RPFS_STORE"}
    done = subprocess.run(cmd + list(args), capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=REPO, **kwargs)
    if check and done.returncode != 0:
        raise AssertionError(f"rpfs {' '.join(args)} failed ({done.returncode}): {done.stderr}")
    return done


def session_keys():
    """The key the tests' stores are made with (conftest: RPFS_KEY_FILE)."""
    from rpfs.store.key_slots import KeyChoice
    return KeyChoice(key_file=os.environ["RPFS_KEY_FILE"])


def open_store(path: Path, readonly: bool = False):
    """Store.open with the tests' key, for a store made by `rpfs init` (encrypted) or Store.init (not)."""
    from rpfs.store.store import Store
    with Store.open(path, readonly=True, unlock=False) as found:   # a key given to a plain store is refused
        encrypted = found.encrypted
    return Store.open(path, readonly=readonly, keys=session_keys() if encrypted else None)


PREVIOUS_RELEASE = "0351bf2"   # the last commit before format 3: it makes stores of format 2
FORMAT_3_RELEASE = "e0736c4"   # the last commit before format 4: stores of format 3 (blobs not in frames)
FORMAT_4_RELEASE = "bbf5837"   # the last commit before format 5: stores of format 4 (no blob size records)
FORMAT_5_RELEASE = "2dd800b"   # the last commit before format 6: stores of format 5 (no blob with a key of its own)


def previous_release(tmp_path: Path, commit: str = PREVIOUS_RELEASE) -> Path:
    """That release's rpfs package, unpacked from git history into tmp_path (for stores of older formats)."""
    from conftest import skip_or_fail_in_ci
    old = tmp_path / f"rpfs-{commit}"
    old.mkdir()
    archive = subprocess.run(["git", "archive", commit, "rpfs"], cwd=REPO, capture_output=True)
    if archive.returncode != 0:
        skip_or_fail_in_ci(f"this checkout has no commit {commit} to take an earlier release from")
    subprocess.run(["tar", "-x", "-C", str(old)], input=archive.stdout, check=True)
    return old


def previous_rpfs(old: Path, store: Path, *args: str, keep_key: bool = False) -> subprocess.CompletedProcess:
    """Run that release's rpfs on store (without the session's key file unless keep_key)."""
    env = {k: v for k, v in os.environ.items() if k not in (() if keep_key else ("RPFS_KEY_FILE",)) + ("RPFS_STORE",)}
    return subprocess.run([sys.executable, "-m", "rpfs", "--store", str(store), *args], cwd=old, check=True,
                          capture_output=True, env={**env, "PYTHONPATH": str(old)})


def is_mounted(path: Path) -> bool:
    target = os.path.realpath(path)
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == target for line in f)


def force_unmount(path: Path) -> None:
    """Last-resort cleanup for a test that failed half-way."""
    if is_mounted(path):
        subprocess.run(["fusermount3", "-u", "-z", str(path)], capture_output=True)
    if is_mounted(path):
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


@contextmanager
def mounted(store: Path, mountpoint: Path, *extra: str):
    """`rpfs mount` for the duration of a with-block; always unmounted afterwards."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    rpfs("mount", str(mountpoint), *extra, store=store)
    try:
        yield mountpoint
    finally:
        if is_mounted(mountpoint):
            done = rpfs("umount", str(mountpoint), check=False)
            if done.returncode != 0:
                force_unmount(mountpoint)


@contextmanager
def writer_lock_held(store: Path, what: str):
    """Another process holding the store's writer lock as `what` (e.g. "backup of vm1")."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from rpfs.store.store import Store\n"
         "with Store.open(sys.argv[1], unlock=False) as s, s.writer_lock(sys.argv[2]):\n"
         "    print('locked', flush=True); sys.stdin.read()", str(store), what],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert holder.stdout.readline() == "locked\n"
        yield
    finally:
        holder.communicate("", timeout=30)

"""Shared test plumbing: kernel capability checks that fail (not skip) in CI."""
import os
import shutil
import tempfile

import pytest

_SESSION_FOLDERS: list[str] = []   # made for this run, removed at its end (pytest_unconfigure)


def _session_folder(variable: str, prefix: str, file: str = "") -> None:
    """Set variable to a new private folder (or a file in one) unless the caller set it."""
    if variable not in os.environ:
        _SESSION_FOLDERS.append(tempfile.mkdtemp(prefix=prefix))
        os.environ[variable] = os.path.join(_SESSION_FOLDERS[-1], file) if file else _SESSION_FOLDERS[-1]


# Mount daemons started by the tests keep their pid files and logs here, not in /run/rpfs; each test
# gets a run dir of its own below its tmp_path (private_run_dir), this one is for what runs outside tests.
_session_folder("RPFS_RUN_DIR", "rpfs-test-run-")
_session_folder("RPFS_CACHE", "rpfs-test-cache-")     # vaults' index copies
_session_folder("RPFS_CONFIG", "rpfs-test-config-")   # not /etc/rpfs
# Stores made by `rpfs init` are encrypted, as a user's are: every test runs on the encrypted format with
# this key file (made by the first init), unless it asks for --encryption none or another key.
_session_folder("RPFS_KEY_FILE", "rpfs-test-key-", "key")


def pytest_unconfigure(config):
    """The run's own folders go with it (each run left four in /tmp); never one with a mount below it."""
    with open("/proc/self/mountinfo") as mounts:
        mountpoints = [line.split()[4] for line in mounts]
    for folder in _SESSION_FOLDERS:
        if not any(m == folder or m.startswith(folder + "/") for m in mountpoints):
            shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(autouse=True)
def private_run_dir(tmp_path, monkeypatch):
    """The run dir below tmp_path: what a test's daemons leave there (mounts above all) is inside what
    the leak checks look at, and no test sees another's records."""
    monkeypatch.setenv("RPFS_RUN_DIR", str(tmp_path / "run"))


def _kernel_problem() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    if not os.path.exists("/dev/fuse"):
        return "needs /dev/fuse"
    if not os.path.exists("/dev/loop-control"):
        return "needs loop devices (/dev/loop-control)"
    for tool in ("losetup", "mount", "umount", "fusermount3", "sfdisk", "mkfs.ext4", "mkfs.xfs"):
        if shutil.which(tool) is None:
            return f"needs {tool} (run tools/setup)"
    return None


def skip_or_fail_in_ci(problem: str) -> None:
    """Skip locally; in CI (CI=true) a missing capability is a failure, never a silent skip."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"test cannot run in CI: {problem}")
    pytest.skip(problem)


def require_kernel() -> None:
    """For tests that need root, FUSE and loop devices."""
    problem = _kernel_problem()
    if problem is not None:
        skip_or_fail_in_ci(problem)


def require_tool(tool: str) -> None:
    if shutil.which(tool) is None:
        skip_or_fail_in_ci(f"needs {tool} (run tools/setup)")


@pytest.fixture
def kernel():
    """Request this fixture in every test that touches FUSE, loop devices or mount."""
    require_kernel()


@pytest.fixture
def area(kernel, tmp_path):
    from diskimages import leftover_kernel_state, release_kernel_state
    """tmp_path for a kernel test; afterwards nothing may remain mounted or looped from it."""
    try:
        yield tmp_path
        assert leftover_kernel_state(tmp_path) == ([], []), "attach/detach leaked kernel state"
    finally:
        release_kernel_state(tmp_path)


@pytest.fixture
def store_path(tmp_path):
    """The folder of a new store made by `rpfs init` (encrypted, with the tests' key file)."""
    from cli_helpers import rpfs
    rpfs("init", store=tmp_path / "store")
    return tmp_path / "store"


@pytest.fixture
def opened_store(tmp_path):
    """A new unencrypted store, made and opened in this process (rpfs.store.store.Store)."""
    from rpfs.store.store import Store
    with Store.init(tmp_path / "store") as store:
        yield store


@pytest.fixture(scope="session")
def guest():
    """The session's test guest (tests/vm_helpers.py): a running libvirt domain whose agent answers, with a
    qcow2 data disk (ext4) on /data; destroyed and undefined at the end of the session. In CI a libvirtd that
    does not answer fails the test, never skips it."""
    from vm_helpers import session_guest
    with session_guest() as running:
        yield running

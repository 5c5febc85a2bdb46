"""Shared test plumbing: kernel capability checks that fail (not skip) in CI."""
import os
import shutil

import pytest


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


def require_kernel() -> None:
    """Skip a kernel test where root/FUSE/loop are missing; in CI (CI=true) fail instead of skipping."""
    problem = _kernel_problem()
    if problem is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"kernel test cannot run in CI: {problem}")
    pytest.skip(problem)


@pytest.fixture
def kernel():
    """Request this fixture in every test that touches FUSE, loop devices or mount."""
    require_kernel()

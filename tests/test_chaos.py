"""The crash campaign (tools/chaos) as part of the suite: at least 200 kills and 20 damaged stores in CI,
fewer locally. It needs root, loop devices, FUSE and XFS (its VM's disk lives on a loop-mounted XFS),
Ceph's gateway for its vault steps (tools/ceph: started by the campaign if it is not running), and libvirt
for its VM steps (one test guest for the whole run)."""
import json
import os
import subprocess
import sys

import pytest
from cli_helpers import REPO

pytestmark = pytest.mark.usefixtures("kernel")
KILLS = int(os.environ.get("RPFS_CHAOS_KILLS", "200" if os.environ.get("CI") == "true" else "30"))


@pytest.mark.timeout(2400)
def test_nothing_is_lost_when_writing_commands_are_killed(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "tools" / "chaos"), "--kills", str(KILLS), "--seed", "1",
                           "--bit-rot", str(max(KILLS // 10, 3)), "--vault", "--dir", str(tmp_path), "--json"],
                          capture_output=True, text=True, timeout=2300)
    assert done.stdout, f"tools/chaos printed no report: {done.stderr[-3000:]}"
    report = json.loads(done.stdout)
    assert report["failures"] == [], report["failures"]
    assert done.returncode == 0 and sum(report["kills"].values()) >= KILLS, done.stderr
    assert report["instant_writes"]["found"] == report["instant_writes"]["acknowledged"]
    if KILLS >= 100:   # enough steps for each vault step, and each catalog step, to be killed at least once
        assert all(report["kills"].get(step, 0) > 0 for step in ("vault push", "vault gc", "catalog",
                                                                 "backup (catalog)", "restore-files")), report["kills"]
    if os.environ.get("CI") == "true":   # the VM steps ran (tools/chaos fails in CI when libvirt does not start)
        assert "skipped" not in report["vm"] and report["vm"]["points_checked"] > 0, report["vm"]
    if KILLS >= 100:
        assert report["kills"].get("backup (libvirt)", 0) + report["kills"].get("backup (libvirt, guest scripts)", 0) \
            > 0, report["kills"]
    assert not any(bad in outcome for outcome in report["bit_rot"] for bad in ("WRONG", "died", "MISSED"))

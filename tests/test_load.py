"""The load campaign (tools/load) as part of the suite: 8 fio readers for 120 s in CI, 4 for about 20 s
locally (RPFS_LOAD_SECONDS sets the time), verifying every byte they read while backups, prune and gc run."""
import json
import os
import signal
import subprocess
import sys

import pytest
from cli_helpers import REPO
from conftest import require_tool

CI = os.environ.get("CI") == "true"
SECONDS = int(os.environ.get("RPFS_LOAD_SECONDS", "120" if CI else "20"))
READERS = 8 if CI else 4
SIZE = [] if CI else ["--disk-mib", "128"]   # still twice the cache: reads decode blocks


@pytest.mark.timeout(SECONDS + 600)
def test_readers_get_every_byte_right_while_backups_prune_and_gc_run(area):
    require_tool("fio")
    load = subprocess.Popen([sys.executable, str(REPO / "tools" / "load"), "--seconds", str(SECONDS), "--readers",
                             str(READERS), "--seed", "1", *SIZE, "--dir", str(area), "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = load.communicate(timeout=SECONDS + 540)
    except subprocess.TimeoutExpired:
        load.send_signal(signal.SIGINT)   # the tool cleans up its loop devices and mount on Ctrl-C
        out, err = load.communicate(timeout=60)
        pytest.fail(f"tools/load hung; it said: {err[-2000:]}")
    finally:
        if load.poll() is None:
            load.kill()
            load.wait()
    report = json.loads(out)
    assert report["failures"] == [], report["failures"]
    assert load.returncode == 0, err
    assert len(report["readers"]) == READERS
    for reader in report["readers"]:
        assert reader["direct_io"] and reader["bytes_read"] > 0, reader
        assert reader["verify_errors"] == reader["read_errors"] == 0, reader
    runs = report["upkeep"]["runs"]
    assert runs.get("backup ok") and runs.get("prune ok") and runs.get("gc ok"), runs
    assert not any(outcome.endswith("failed") for outcome in runs), runs
    assert report["upkeep"]["points_pruned"] > 0 and report["upkeep"]["prunes_keeping_readers"] > 0
    memory = report["memory"]
    assert memory["peak_rss_anon_mib"] <= memory["bound_mib"], memory
    assert report["images_matching_sources"] == len(report["sources"]) > 0 and report["check_clean"]

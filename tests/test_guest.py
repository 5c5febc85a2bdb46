"""The test guest itself (tools/guest, tests/vm_helpers.py): it boots on the real libvirtd, its agent answers,
guest-exec reaches the data disk, and a freeze runs the guest's own fsfreeze hook. Every VM test stands on this."""
import time

from vm_helpers import libvirt_conn


def test_libvirt_answers():
    conn = libvirt_conn()
    try:
        assert conn.getLibVersion() >= 9_000_000
    finally:
        conn.close()


def test_guest_boots_and_agent_answers(guest):
    assert guest.name.startswith("rpfs-test-")
    assert guest.domain.isActive()
    print(f"agent answered {guest.agent_seconds:.1f} s after start")
    assert guest.agent("guest-ping") == {}


def test_exec_writes_and_reads_the_data_disk(guest):
    code, out, err = guest.exec("echo written-in-guest > /data/probe && sync && cat /data/probe")
    assert (code, out, err) == (0, "written-in-guest\n", "")
    code, out, _ = guest.exec("grep ' /data ' /proc/mounts")
    assert code == 0 and out.startswith("/dev/vda /data ext4 ")
    assert guest.exec("exit 3")[0] == 3


def test_freeze_runs_the_guest_hook(guest):
    guest.exec("rm -f /data/hook.log")
    started = time.monotonic()
    frozen = guest.domain.fsFreeze()
    try:
        froze = time.monotonic() - started
        assert frozen >= 1
        assert guest.agent("guest-fsfreeze-status") == "frozen"
    finally:
        guest.domain.fsThaw()
    thawed = time.monotonic() - started
    print(f"fsFreeze {froze:.2f} s, freeze+thaw {thawed:.2f} s")
    assert guest.agent("guest-fsfreeze-status") == "thawed"
    code, out, _ = guest.exec("cat /data/hook.log")
    assert code == 0
    assert [line.split()[0] for line in out.splitlines()] == ["freeze", "thaw"]

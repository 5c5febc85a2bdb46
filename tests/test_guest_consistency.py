"""Consistency inside a running guest, on the real test guest (libvirtd, TCG qemu, the guest's own qemu-ga and
freeze hook): guest pre-script -> freeze -> snapshot -> thaw -> post-script; a write not synced in the guest is
on the disk image taken while frozen; an agent that is missing, not connected or hung ends as `crash` with the
reason, in bounded time; kill -9 of the process that froze the guest is undone by the watchdog; what the guest
prints is escaped and cut. Plus fast tests of the strict parsing (agent answers, the TOML keys).

Run them under `flock /tmp/rpfs-libvirt.lock` (one guest on this machine at a time)."""
import fcntl
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import libvirt
import pytest
from vm_helpers import libvirt_conn, remove_domain

from rpfs.backup.guest_consistency import guest_consistent, run_guest_script
from rpfs.backup.quiesce import ConsistencyConfig, Script, load_config
from rpfs.errors import RpfsError
from rpfs.host import run_dir
from rpfs.vm import guest_agent
from rpfs.host.untrusted import shown
from rpfs.vm.guest_agent import BadAgentAnswer

pytestmark = pytest.mark.timeout(300)


def wait_until(condition, timeout: float, what: str, pause: float = 0.2):
    """Bounded retries: the condition's value once true, else the test fails saying what did not happen."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen within {timeout:g} s")
        time.sleep(pause)
        pause = min(pause * 2, 2.0)


def hook_lines(guest) -> list[str]:
    code, out, _ = guest.exec("cat /data/hook.log 2>/dev/null; true")
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def copy_disk(guest, target: Path) -> Path:
    """The data disk's bytes as the guest sees them right now, read beside the running qemu (-U)."""
    subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", str(guest.data_disk), str(target)], check=True,
                   capture_output=True, timeout=120)
    return target


def debugfs_cat(image: Path, name: str) -> str:
    done = subprocess.run(["debugfs", "-R", f"cat {name}", str(image)], capture_output=True, text=True, timeout=60)
    return done.stdout


def watchdog_gone(domain) -> bool:
    """The domain's freeze lock (in this test's run dir) is free: no watchdog of a freeze still runs."""
    fd = run_dir.open_guest_freeze_lock(domain.UUIDString())
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


# --- fast: what comes from the guest is parsed strictly and shown escaped --------------------------------------

def test_shown_escapes_control_characters_and_cuts():
    assert shown(b"ok\x1b[31mred\x07\nnext\r\t") == "ok\\x1b[31mred\\x07\\nnext\\r\\t"
    assert shown("rtl\u202eevil\u2028x") == "rtl\\u202eevil\\u2028x"   # bidi override, line separator
    assert shown(b"\xff\xfe") == "\ufffd\ufffd"                           # not UTF-8: replaced, never raised
    assert shown("a" * 50, limit=10) == "aaaaaaa..."


def test_exec_status_is_parsed_strictly():
    good = {"exited": True, "exitcode": 0, "out-data": "aGVsbG8=", "err-data": ""}
    assert guest_agent._exited(good, 64).stdout == b"hello"
    cut = guest_agent._exited({**good, "out-data": "YWJjZGVm"}, 4)           # abcdef: its last 4 bytes kept
    assert (cut.stdout, cut.truncated) == (b"cdef", True)
    for bad in ({**good, "out-data": "not base64!"}, {**good, "out-data": 5}, {**good, "exitcode": "0"},
                {**good, "exitcode": True}, {**good, "signal": -1}, {**good, "out-truncated": "yes"}):
        with pytest.raises(BadAgentAnswer):
            guest_agent._exited(bad, 64)


def test_guest_keys_in_the_consistency_toml(tmp_path):
    config_file = tmp_path / "vm.toml"
    config_file.write_text(textwrap.dedent("""\
        [guest.pre]
        path = "/usr/local/sbin/db-checkpoint"
        args = ["--quiet"]
        timeout_seconds = 30
        retries = 1
        continue_on_failure = true
        [guest.post]
        path = "/usr/local/sbin/db-resume"
        [guest.freeze]
        max_seconds = 4
        """))
    config = load_config(config_file)
    assert config.guest_pre == Script("/usr/local/sbin/db-checkpoint", ["--quiet"], 30, 1, True)
    assert config.guest_post.path == "/usr/local/sbin/db-resume" and config.guest_freeze_max_seconds == 4.0
    for text, message in (("[guest.freeze]\nmax_second = 4\n", "unknown key(s) in [guest.freeze]: max_second"),
                          ("[guest.thaw]\nx = 1\n", "unknown key(s) in [guest]: thaw"),
                          ("[guest.pre]\npath = \"/x\"\nuser = \"root\"\n", "unknown key(s) in [guest.pre]: user"),
                          ("[guest.pre]\nargs = []\n", "[guest.pre] needs a path"),
                          ("[guest.freeze]\nmax_seconds = 0\n", "[guest.freeze] max_seconds must be")):
        config_file.write_text(text)
        with pytest.raises(RpfsError, match=".*") as refused:
            load_config(config_file)
        assert message in refused.value.message and "\n" not in refused.value.message


# --- the real guest ---------------------------------------------------------------------------------------------

def test_freeze_and_thaw_run_the_guests_hook(guest):
    before = hook_lines(guest)
    frozen_during, record = guest_consistent(guest.domain, None, lambda: guest_agent.frozen(guest.domain))
    assert frozen_during is True and guest_agent.frozen(guest.domain) is False
    assert record.consistency == "file-system" and record.reason == "no guest pre- and post-script configured"
    assert record.filesystems_frozen == 1 and 0 < record.frozen_seconds < 10
    assert record.thawed is True and record.watchdog_stepped_in is False
    assert hook_lines(guest)[len(before):] == ["freeze", "thaw"]
    print(f"guest frozen {record.frozen_seconds:.3f} s (freeze sent to thaw answered)")


def test_a_write_not_synced_in_the_guest_is_on_the_disk_taken_frozen(guest, tmp_path):
    token = f"unsynced-{time.time_ns()}"
    guest.exec(f"echo {token} > /data/unsynced")          # no sync: it sits in the guest's page cache
    image, record = guest_consistent(guest.domain, None, lambda: copy_disk(guest, tmp_path / "frozen.raw"))
    assert record.consistency == "file-system"
    assert debugfs_cat(image, "/unsynced").strip() == token
    fsck = subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, text=True, timeout=120)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    header = subprocess.run(["dumpe2fs", "-h", str(image)], capture_output=True, text=True, timeout=60).stdout
    assert "needs_recovery" not in header   # no journal to replay: the freeze left the filesystem clean


def test_guest_scripts_run_in_order_around_the_freeze(guest, tmp_path):
    guest.exec("rm -f /data/hook.log")
    config = ConsistencyConfig(
        guest_pre=Script("/bin/sh", ["-c", "echo pre >> /data/hook.log; echo pre-ran"], timeout_seconds=20),
        guest_post=Script("/bin/sh", ["-c", "echo post >> /data/hook.log"], timeout_seconds=20))
    image, record = guest_consistent(guest.domain, config, lambda: copy_disk(guest, tmp_path / "frozen.raw"))
    assert record.consistency == "application" and record.reason == ""
    assert record.pre.ok and record.pre.exit_code == 0 and record.pre.stdout == "pre-ran\\n"
    assert record.post.ok and record.post.attempts == 1
    assert hook_lines(guest) == ["pre", "freeze", "thaw", "post"]
    in_point = [line.split()[0] for line in debugfs_cat(image, "/hook.log").splitlines() if line.strip()]
    assert in_point == ["pre", "freeze"]   # the snapshot was taken frozen, after the pre-script


def test_a_failing_pre_script_stops_the_backup_after_the_post_script(guest):
    guest.exec("rm -f /data/post-ran")
    config = ConsistencyConfig(guest_pre=Script("/bin/sh", ["-c", "echo 'no space\x1b[2J' >&2; exit 7"]),
                               guest_post=Script("/bin/sh", ["-c", "touch /data/post-ran"]))
    snapshots = []
    with pytest.raises(RpfsError) as refused:
        guest_consistent(guest.domain, config, lambda: snapshots.append(1))
    message = refused.value.message
    assert "guest pre-script /bin/sh failed (exit code 7: no space\\x1b[2J)" in message and "\n" not in message
    assert snapshots == [] and guest.exec("test -e /data/post-ran")[0] == 0
    assert guest_agent.frozen(guest.domain) is False


def test_a_pre_script_that_hangs_times_out_and_the_backup_goes_on(guest):
    config = ConsistencyConfig(guest_pre=Script("/bin/sleep", ["100"], timeout_seconds=3, continue_on_failure=True),
                               guest_post=Script("/bin/true"))
    started = time.monotonic()
    taken, record = guest_consistent(guest.domain, config, lambda: "snapshot")
    assert taken == "snapshot" and time.monotonic() - started < 20
    assert record.pre.timed_out and not record.pre.ok and "timed out after 3 s" in record.pre.message
    assert record.consistency == "file-system" and "the guest pre-script failed (timed out" in record.reason


def test_guest_output_is_cut_and_escaped(guest):
    big = guest_agent.run(guest.domain, "/bin/sh",
                          ["-c", r"printf '\033]0;title\007\033[31mred\n'; head -c 200000 /dev/zero | tr '\0' a"],
                          timeout_seconds=30)
    assert big.exitcode == 0 and big.truncated and len(big.stdout) == guest_agent.MAX_OUTPUT_BYTES
    assert big.stdout == b"a" * guest_agent.MAX_OUTPUT_BYTES       # the end kept
    small = guest_agent.run(guest.domain, "/bin/sh", ["-c", r"printf '\033]0;title\007\033[31mred\n'"], 30)
    assert shown(small.stdout) == "\\x1b]0;title\\x07\\x1b[31mred\\n"
    with pytest.raises(BadAgentAnswer, match="larger than 1048576 bytes"):   # its base64 answer: refused
        guest_agent.run(guest.domain, "/bin/sh", ["-c", "head -c 2000000 /dev/zero"], timeout_seconds=60)
    result = run_guest_script(guest.domain, Script("/bin/sh", ["-c", r"printf 'x\033[2J\n'; exit 3"]))
    assert result.message == "exit code 3: x\\x1b[2J" and result.stdout == "x\\x1b[2J\\n"


BIOS_ONLY = """<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>32</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <on_reboot>destroy</on_reboot>
  <devices>{channel}<memballoon model='none'/></devices>
</domain>"""
AGENT_CHANNEL = "<channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>"


def test_no_agent_or_an_agent_not_connected_is_crash_with_the_reason():
    """Running domains with nothing to boot (no disk, no kernel: SeaBIOS idles, no guest OS runs): one without
    the agent's channel in its XML, one with it and no agent behind it. The snapshot is taken anyway, as
    crash, with the reason, in bounded time."""
    connection = libvirt_conn()
    name = f"rpfs-test-{os.getpid()}-no-agent"
    try:
        for channel, reason in (("", "the domain has no guest agent (no org.qemu.guest_agent.0 channel"),
                                (AGENT_CHANNEL, "the guest agent did not answer within 3 s")):
            domain = connection.defineXML(BIOS_ONLY.format(name=name, channel=channel))
            domain.create()
            try:
                started = time.monotonic()
                taken, record = guest_consistent(domain, None, lambda: "snapshot", agent_timeout=3)
                assert taken == "snapshot" and time.monotonic() - started < 15
                assert record.consistency == "crash" and record.reason.startswith(reason), record.reason
                assert record.filesystems_frozen == 0
                domain.suspend()
                _, record = guest_consistent(domain, None, lambda: "snapshot", agent_timeout=3)
                assert (record.consistency, record.reason) == ("crash", "the domain is not running (paused)")
            finally:
                remove_domain(connection, name)
    finally:
        remove_domain(connection, name)
        connection.close()


def test_an_agent_that_hangs_mid_backup_is_crash_in_bounded_time_and_the_guest_ends_thawed(guest, tmp_path):
    """The pre-script stops qemu-ga (SIGSTOP) and leaves a helper that resumes it RESUME s later: the script's
    status, the freeze, the thaw and the post-script find no agent; the backup goes on, crash, in bounded time;
    once the agent is back the watchdog makes sure the guest is thawed."""
    resume = 45
    stop_agent = (f"(sleep {resume}; kill -CONT $(pidof qemu-ga)) </dev/null >/dev/null 2>&1 &"
                  " kill -STOP $(pidof qemu-ga)")
    config = ConsistencyConfig(guest_pre=Script("/bin/sh", ["-c", stop_agent], timeout_seconds=20,
                                                continue_on_failure=True),
                               guest_post=Script("/bin/true"))
    started = time.monotonic()
    try:
        taken, record = guest_consistent(guest.domain, config, lambda: "snapshot", agent_timeout=3)
        seconds = time.monotonic() - started
        print(f"backup with a hung agent: {seconds:.1f} s")
        assert taken == "snapshot" and seconds < resume - 5, seconds
        assert record.consistency == "crash" and record.reason.startswith("the guest freeze failed: the guest agent"
                                                                          " did not answer"), record.reason
        assert not record.pre.ok and "did not answer" in record.pre.message
        assert all("\n" not in line for line in (record.reason, record.pre.message, *record.problems))
    finally:
        guest.wait_for_agent(timeout=resume + 60)
    wait_until(lambda: guest_agent.frozen(guest.domain) is False, 30, "the guest thawed")
    wait_until(lambda: watchdog_gone(guest.domain), 60, "the watchdog's exit")


CHILD = """
import sys, time, libvirt
from rpfs.backup.guest_consistency import guest_consistent
from rpfs.backup.quiesce import ConsistencyConfig
domain = libvirt.open("qemu:///system").lookupByName(sys.argv[1])
def snapshot():
    open(sys.argv[2], "w").write("frozen")
    time.sleep(600)
guest_consistent(domain, ConsistencyConfig(guest_freeze_max_seconds=float(sys.argv[3])), snapshot)
"""


def test_kill_9_of_the_process_that_froze_the_guest_is_undone_by_the_watchdog(guest, tmp_path):
    marker = tmp_path / "frozen"
    child = subprocess.Popen([sys.executable, "-c", CHILD, guest.name, str(marker), "600"])
    try:
        wait_until(marker.exists, 60, "the freeze")
        assert guest_agent.frozen(guest.domain) is True
        child.kill()
        child.wait()
        killed = time.monotonic()
        wait_until(lambda: guest_agent.frozen(guest.domain) is False, 30, "the watchdog's thaw")
        print(f"thawed {time.monotonic() - killed:.2f} s after kill -9")
        wait_until(lambda: watchdog_gone(guest.domain), 30, "the watchdog's exit")
    finally:
        if child.poll() is None:
            child.kill()
        guest_agent.thaw(guest.domain)


def test_the_watchdog_thaws_when_the_window_runs_out(guest):
    def slow_snapshot():   # a snapshot that outlasts the window: it waits for the watchdog's thaw
        wait_until(lambda: guest_agent.frozen(guest.domain) is False, 30, "the watchdog's thaw")
        return "late"
    config = ConsistencyConfig(guest_freeze_max_seconds=1)
    started = time.monotonic()
    taken, record = guest_consistent(guest.domain, config, slow_snapshot)
    assert taken == "late" and time.monotonic() - started < 20
    assert record.consistency == "crash" and record.watchdog_stepped_in
    assert record.reason == "the freeze window of 1 s ran out before the thaw; the watchdog thawed the guest"
    assert guest_agent.frozen(guest.domain) is False


def test_take_snapshot_raising_thaws_first_then_raises(guest):
    def failing_snapshot():
        assert guest_agent.frozen(guest.domain) is True
        raise RpfsError("backup-begin failed")
    with pytest.raises(RpfsError, match="backup-begin failed"):
        guest_consistent(guest.domain, None, failing_snapshot)
    assert guest_agent.frozen(guest.domain) is False

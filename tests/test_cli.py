"""The CLI as users run it: one clear line per mistake, nothing changed, and safe interruption."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cli_helpers import REPO, rpfs, writer_lock_held
from diskimages import random_disk
from test_backup import write_image

MiB = 1 << 20


def assert_one_line_error(done: subprocess.CompletedProcess, message: str) -> None:
    assert done.returncode != 0, done
    assert done.stderr.startswith("rpfs: ") and done.stderr.count("\n") == 1, done.stderr
    assert message in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_store_from_environment(tmp_path):
    env = {**os.environ, "RPFS_STORE": str(tmp_path / "envstore")}
    cmd = [sys.executable, "-m", "rpfs"]
    subprocess.run(cmd + ["init"], env=env, check=True, cwd=REPO, capture_output=True)
    done = subprocess.run(cmd + ["list", "--json"], env=env, cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0 and json.loads(done.stdout) == []


def test_backup_and_list_json(store_path, tmp_path):
    img = write_image(tmp_path / "d.img", 21, 3 * MiB + 5)
    summary = json.loads(rpfs("backup", "web01", f"--disk=os={img}", "--json", store=store_path).stdout)
    assert summary["bytes_read"] == 3 * MiB + 5 and summary["recovery_point"]["consistency"] == "crash"
    listed = json.loads(rpfs("list", "web01", "--json", store=store_path).stdout)
    assert [p["id"] for p in listed] == [summary["point_id"]]
    assert listed[0]["disks"][0]["size"] == 3 * MiB + 5
    assert "web01" in rpfs("list", store=store_path).stdout


@pytest.mark.parametrize("args, message", [
    (["list"], "does not exist"),
    (["backup", "vm", "--disk", "d=/etc/hostname"], "does not exist"),
])
def test_missing_store(tmp_path, args, message):
    assert_one_line_error(rpfs(*args, store=tmp_path / "nope", check=False), message)


def test_no_store_given():
    assert_one_line_error(rpfs("list", check=False), "no store given")


def test_uninitialised_store(tmp_path):
    assert_one_line_error(rpfs("list", store=tmp_path, check=False), "not an rpfs store")


def test_init_twice(store_path):
    assert_one_line_error(rpfs("init", store=store_path, check=False), "already holds a store")


def test_bad_block_size(tmp_path):
    assert_one_line_error(rpfs("init", "--block-size", "3000", store=tmp_path / "s", check=False),
                          "power of two")
    assert not (tmp_path / "s").exists()


def test_bad_disks_change_nothing(store_path, tmp_path):
    unreadable = tmp_path / "dir"
    unreadable.mkdir()
    for args, message in [
        (["backup", "vm", "--disk", f"d={tmp_path}/missing.img"], "does not exist"),
        (["backup", "vm", "--disk", f"d={unreadable}"], "not an image file"),
        (["backup", "vm", "--disk", "nonsense"], "NAME=PATH"),
        (["backup", "vm"], "--disk NAME=PATH (repeat for each), or --libvirt DOMAIN"),
        (["backup", "../vm", "--disk", "d=/etc/hostname"], "invalid VM name"),
        (["list", "nosuchvm"], "unknown VM"),
    ]:
        assert_one_line_error(rpfs(*args, store=store_path, check=False), message)
    assert json.loads(rpfs("list", "--json", store=store_path).stdout) == []


def test_second_writer_is_refused(store_path, tmp_path):
    img = write_image(tmp_path / "d.img", 22, MiB)
    with writer_lock_held(store_path, "backup of vm9"):
        assert_one_line_error(rpfs("backup", "vm", f"--disk=d={img}", store=store_path, check=False),
                              "busy: backup of vm9")


def _start_backup(store: Path, img: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "rpfs", "--store", str(store), "backup", "vm",
                             f"--disk=d={img}"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for_committed_blocks(store: Path, proc: subprocess.Popen, min_bytes: int) -> None:
    """Wait until the backup has committed some blocks (the store file grew), bounded in time."""
    deadline = time.monotonic() + 60
    while (store / "data.mdb").stat().st_size < min_bytes:
        assert proc.poll() is None, "backup finished before it could be interrupted"
        assert time.monotonic() < deadline, "backup made no progress"
        time.sleep(0.01)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("how", [signal.SIGINT, signal.SIGKILL])
def test_interrupted_backup_leaves_no_recovery_point(store_path, tmp_path, how):
    img = random_disk(tmp_path / "big.img", 600)
    proc = _start_backup(store_path, img)
    try:
        _wait_for_committed_blocks(store_path, proc, 70 * MiB)
        proc.send_signal(how)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0
    if how == signal.SIGINT:
        assert "interrupted; no recovery point was created" in err and "Traceback" not in err
    assert json.loads(rpfs("list", "--json", store=store_path).stdout) == []
    summary = json.loads(rpfs("backup", "vm", f"--disk=d={img}", "--json", store=store_path).stdout)
    assert summary["deduplicated_bytes"] >= 64 * MiB  # the blocks committed before the interruption are reused
    assert len(json.loads(rpfs("list", "--json", store=store_path).stdout)) == 1


@pytest.mark.timeout(120)
def test_full_disk_is_a_clear_error_and_changes_nothing(tmp_path, kernel):
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(small)], check=True)
    try:
        store = small / "store"
        rpfs("init", store=store)
        little = tmp_path / "little.img"
        little.write_bytes(os.urandom(3 * MiB))
        big = tmp_path / "big.img"
        big.write_bytes(os.urandom(40 * MiB))
        rpfs("backup", "vm", f"--disk=d={little}", store=store)
        before = rpfs("list", "--json", store=store).stdout
        assert_one_line_error(rpfs("backup", "vm", f"--disk=d={big}", store=store, check=False), "is full")
        assert rpfs("list", "--json", store=store).stdout == before
        rpfs("backup", "vm2", f"--disk=d={little}", store=store)  # the store still works
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_names_with_a_trailing_newline_are_refused(tmp_path):
    store = tmp_path / "store"
    rpfs("init", store=store)
    image = tmp_path / "d.img"
    image.write_bytes(b"x" * 4096)
    for args in (["backup", "vm\n", f"--disk=d={image}"], ["backup", "vm", f"--disk=d\n={image}"],
                 ["policy", "create", "p\n", "--daily", "02:00"], ["policy", "create", "p", "--daily", "02:00\n"]):
        done = rpfs(*args, store=store, check=False)
        assert done.returncode != 0 and done.stderr.startswith("rpfs: ") and "Traceback" not in done.stderr, args
    assert json.loads(rpfs("list", "--json", store=store).stdout) == []


def test_an_interrupt_after_the_commit_says_the_point_exists(store_path, tmp_path, monkeypatch, capsys):
    import rpfs.backup.pipeline as pipeline
    from rpfs.cli import main

    def interrupted(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(pipeline, "_keep_or_delete_snapshots", interrupted)
    disk = random_disk(tmp_path / "d.img", 1)
    assert main(["--store", str(store_path), "backup", "vm", f"--disk=d={disk}"]) == 130
    [point] = json.loads(rpfs("list", "--json", store=store_path).stdout)
    created = f"recovery point vm/{point['id']} was created before the interrupt"
    assert capsys.readouterr().err == f"rpfs: interrupted; {created}\n"


def _commands(parser, path=()):
    """(command words, its parser) for every command and subcommand users can run."""
    import argparse
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            shown = {choice.dest for choice in action._choices_actions}
            for name, sub in action.choices.items():
                if name in shown:
                    yield from _commands(sub, path + (name,))


def test_every_command_s_help_explains_every_argument():
    """What an admin reads first: `rpfs COMMAND --help` says what each argument is, positionals too."""
    import argparse

    from rpfs.cli import build_parser
    commands = list(_commands(build_parser()))
    assert len(commands) > 40 and ("instant-daemon",) not in [path for path, _ in commands]   # internal
    for path, parser in commands:
        shown = rpfs(*path, "--help").stdout
        for action in parser._actions:
            if action.help is None and not isinstance(action, argparse._SubParsersAction):
                raise AssertionError(f"rpfs {' '.join(path)}: {action.dest} has no help")
            if action.help not in (None, "==SUPPRESS=="):
                assert " ".join(action.help.split()) in " ".join(shown.split()), (path, action.dest)
    assert "instant-daemon" not in rpfs("--help").stdout
    usage = rpfs("backup", "--help").stdout.split("\n\n")[0]
    assert "[--disk NAME=PATH]" in usage and "[--libvirt DOMAIN]" in usage   # one or the other, each shown


def test_version_and_a_reader_that_stops_early(store_path, tmp_path):
    """`rpfs list | head -1` ends quietly (status 141, as if by SIGPIPE), never with "rpfs: Broken pipe"."""
    assert rpfs("--version").stdout.strip().startswith("rpfs ")
    write_image(tmp_path / "d.img", 1, 4 * MiB)
    rpfs("backup", "web", "--disk", f"os={tmp_path / 'd.img'}", store=store_path)
    reader = subprocess.Popen([sys.executable, "-m", "rpfs", "--store", str(store_path), "list"], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    reader.stdout.close()   # before it writes a line: its output meets a closed pipe
    assert reader.wait(timeout=30) == 141 and reader.stderr.read() == b""


def test_a_refused_command_leaves_jobs_unchanged(store_path, tmp_path):
    """A typo, an existing target, an unknown VM: nothing happened, so nothing is recorded as a job."""
    write_image(tmp_path / "d.img", 2, 4 * MiB)
    rpfs("backup", "web", "--disk", f"os={tmp_path / 'd.img'}", store=store_path)
    before = json.loads(rpfs("jobs", "--json", store=store_path).stdout)["jobs"]
    (tmp_path / "there.img").write_bytes(b"x")
    for args in (["restore", "web", "--disk", "os", "--to", str(tmp_path / "there.img")],
                 ["restore", "nosuch", "--disk", "os", "--to", str(tmp_path / "new.img")],
                 ["restore", "web", "--disk", "nosuch", "--to", str(tmp_path / "new.img")],
                 ["verify", "nosuch"],
                 ["backup", "web", "--disk", f"os={tmp_path / 'missing.img'}"]):
        assert rpfs(*args, store=store_path, check=False).returncode != 0, args
    assert json.loads(rpfs("jobs", "--json", store=store_path).stdout)["jobs"] == before
    rpfs("restore", "web", "--disk", "os", "--to", str(tmp_path / "new.img"), store=store_path)
    after = json.loads(rpfs("jobs", "--json", store=store_path).stdout)["jobs"]
    assert [j["kind"] for j in after if j not in before] == ["restore"]


def test_one_unit_everywhere_and_raw_or_stored_said(store_path, tmp_path):
    """The backup summary, list, restore and jobs speak MiB and MiB/s, and say raw or stored; a rate counts
    what was read, not holes; a restore's job says what it restored."""
    disk = tmp_path / "d.img"
    with open(disk, "wb") as f:
        f.truncate(64 * MiB)
        f.write(os.urandom(4 * MiB))
    said = rpfs("backup", "web", "--disk", f"os={disk}", store=store_path).stdout
    assert "MiB/s" in said and "MB/s" not in said and "raw: new 4.0 MiB" in said and "holes 60.0 MiB" in said
    assert "read 4.0 MiB from the disk(s)" in said and "stored: " in said
    summary = json.loads(rpfs("backup", "web", "--disk", f"os={disk}", "--json", store=store_path).stdout)
    assert "mib_per_second" in summary and "mb_per_second" not in summary
    assert "new stored" in rpfs("list", store=store_path).stdout
    restored = rpfs("restore", "web", "--disk", "os", "--to", str(tmp_path / "r.img"), store=store_path).stdout
    assert "MiB/s of image; raw: 4.0 MiB data, 60.0 MiB holes" in restored
    jobs = rpfs("jobs", store=store_path).stdout
    assert "restored 4.0 MiB of data (raw)" in jobs and "read 4.0 MiB from the disks, stored" in jobs

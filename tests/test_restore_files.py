"""restore_files (rpfs/catalog/restore_files.py) on a real ext4 filesystem mounted read-only, as a guest
left it: links out of it, odd names, privileges, sparse files; nothing may land outside TO, and a killed
restore leaves whole entries only and loses none it replaces."""
from __future__ import annotations

import json
import os
import random
import signal
import socket
import stat
import struct
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from cli_helpers import mounted, open_store, rpfs
from diskimages import MiB, make_whole_disk_ext4

from rpfs.catalog.restore_files import STAGING, RestoreOptions, Skipped, restore_files
from rpfs.errors import EXIT_CORRUPT, RpfsError

pytestmark = pytest.mark.timeout(180)

OWNER, GROUP = 1234, 2345
OLD = 1_000_000_000_123_456_789    # an mtime with nanoseconds
ODD_NAMES = ["new\nline", "\x1b[31mred\x1b[0m", "...", "..a", "-rf", " space ", os.fsdecode(b"caf\xe9")]
CAPABILITY = struct.pack("<IIIII", 0x02000001, 1 << 13, 0, 0, 0)   # v2, effective, cap_net_raw


def populate(root: Path) -> None:
    """The guest's filesystem: every kind of entry, odd names, privileges and links that lead out."""
    rng = random.Random(26)
    (root / "plain.txt").write_bytes(rng.randbytes(300_000))
    with open(root / "sparse.bin", "wb") as f:   # 64 MiB, two data extents
        f.truncate(64 * MiB)
        f.seek(1 * MiB)
        f.write(rng.randbytes(64 * 1024))
        f.seek(40 * MiB)
        f.write(rng.randbytes(128 * 1024))
    os.symlink("plain.txt", root / "link")
    os.symlink("/", root / "root_link")
    os.symlink("/root", root / "www")                    # a folder on the way that is a link
    os.symlink("../../../../../../tmp", root / "climb")
    private = root / "private"
    private.mkdir()
    (private / "inner.txt").write_bytes(b"inner\n")
    os.chown(private / "inner.txt", OWNER, GROUP)
    os.chown(private, OWNER, GROUP)
    os.chmod(private, 0o750)
    acl = root / "acl.txt"
    acl.write_bytes(b"with attributes\n")
    os.setxattr(acl, "user.comment", b"guest's note")
    os.setxattr(acl, "trusted.rpfs", b"\x00\x01binary")
    subprocess.run(["setfacl", "-m", f"u:{OWNER}:r", str(acl)], check=True)
    (root / "acldir").mkdir()
    subprocess.run(["setfacl", "-d", "-m", f"u:{OWNER}:rwx", str(root / "acldir")], check=True)
    (root / "acldir" / "in.txt").write_bytes(b"x")
    for name, mode in (("suid", 0o4755), ("sgid", 0o2755)):
        (root / name).write_bytes(b"#!/bin/sh\n")
        os.chmod(root / name, mode)
    (root / "sgid_dir").mkdir()
    os.chmod(root / "sgid_dir", 0o2775)
    (root / "cap").write_bytes(b"capable\n")
    os.setxattr(root / "cap", "security.capability", CAPABILITY)
    os.mkfifo(root / "fifo", 0o640)
    os.mknod(root / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mknod(root / "disk", stat.S_IFBLK | 0o660, os.makedev(7, 0))
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(root / "sock"))
    odd = root / "odd"
    odd.mkdir()
    for name in ODD_NAMES:
        (odd / name).write_bytes(os.fsencode(name))
    (root / "hard1").write_bytes(b"hard")
    os.link(root / "hard1", root / "hard2")
    (root / STAGING).mkdir()                              # rpfs's own staging name, planted by the guest
    deep = root / "deep" / "a" / "b"
    deep.mkdir(parents=True)
    (deep / "leaf.txt").write_bytes(b"leaf")
    for path in sorted(root.rglob("*"), key=lambda p: -len(p.parts)):   # times last, deepest first
        if path.name != "lost+found":
            os.utime(path, ns=(OLD + 7, OLD + len(path.name)), follow_symlinks=False)
    os.utime(root, ns=(OLD, OLD))


@contextmanager
def mounted_ro(image: Path, mountpoint: Path):
    mountpoint.mkdir()
    subprocess.run(["mount", "-o", "ro,loop,noload", str(image), str(mountpoint)], check=True)
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", str(mountpoint)], check=True)
        mountpoint.rmdir()


@pytest.fixture(scope="module")
def guest_fs(tmp_path_factory):
    """The guest's ext4, populated through a read-write mount, then mounted read-only (noload) as an
    attach mounts a point's filesystem."""
    from conftest import require_kernel, require_tool
    require_kernel()
    require_tool("setfacl")
    tmp = tmp_path_factory.mktemp("guest")
    image = make_whole_disk_ext4(tmp / "guest.img", {}, size=128 * MiB)
    rw = tmp / "rw"
    rw.mkdir()
    subprocess.run(["mount", "-o", "loop", str(image), str(rw)], check=True)
    try:
        populate(rw)
    finally:
        subprocess.run(["umount", str(rw)], check=True)
    with mounted_ro(image, tmp / "ro") as root:
        yield root


def tree(root: Path) -> dict[str, tuple]:
    """Every entry below root: its type and metadata (stat first: reading would change atimes; no link is
    followed, which would too)."""
    found = {}
    folders = [root]
    while folders:
        for entry in os.scandir(folders.pop()):
            path = Path(entry.path)
            st = os.lstat(path)
            xattrs = {n: os.getxattr(path, n, follow_symlinks=False)
                      for n in sorted(os.listxattr(path, follow_symlinks=False))}
            found["/" + str(path.relative_to(root))] = (
                stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns,
                st.st_atime_ns, st.st_rdev, xattrs)
            if stat.S_ISDIR(st.st_mode):
                folders.append(path)
    return found


def content(root: Path, rel: str) -> bytes | str:
    path = root / rel.lstrip("/")
    if path.is_symlink():
        return os.readlink(path)
    if path.is_file():
        return path.read_bytes()
    return b""


def listing(folder: Path) -> list[tuple]:
    """What a folder holds, to show nothing was written next to TO."""
    return sorted((str(p), os.lstat(p).st_mtime_ns, os.lstat(p).st_size) for p in folder.rglob("*"))


def dest(tmp_path: Path) -> Path:
    return tmp_path / "out" / "to"


def test_everything_restores_with_its_metadata(guest_fs, tmp_path):
    to = dest(tmp_path)
    seen = []
    summary = restore_files(guest_fs, ["/"], to, RestoreOptions(devices=True, setuid=True),
                            progress=lambda done, total: seen.append((done, total)))
    source, restored = tree(guest_fs), tree(to)
    del source[f"/{STAGING}"], source["/sock"]
    assert restored == source                                  # mode, owner, ns times, xattrs and ACLs
    assert stat.S_IMODE(os.stat(to).st_mode) == 0o700
    for rel in source:
        assert content(to, rel) == content(guest_fs, rel), rel
    assert os.readlink(to / "root_link") == "/" and os.readlink(to / "climb") == "../../../../../../tmp"
    assert (to / "sparse.bin").stat().st_blocks * 512 <= 512 * 1024          # sparse stays sparse
    assert (to / "sparse.bin").stat().st_size == 64 * MiB
    assert os.getxattr(to / "acl.txt", "system.posix_acl_access")
    assert os.getxattr(to / "acldir", "system.posix_acl_default")
    assert os.getxattr(to / "cap", "security.capability") == CAPABILITY
    assert stat.S_ISFIFO(os.lstat(to / "fifo").st_mode) and stat.S_ISBLK(os.lstat(to / "disk").st_mode)
    assert os.stat(to / "hard1").st_ino != os.stat(to / "hard2").st_ino    # separate files
    assert sorted(os.listdir(to / "odd")) == sorted(ODD_NAMES)
    assert summary.skipped == [Skipped(f"/{STAGING}", "the name of rpfs's staging folder (not restored)"),
                               Skipped("/sock", "socket (not restored: a program makes its own)")]
    assert summary.cleared == [] and summary.other == 3 and summary.links == 4
    assert summary.bytes == sum(os.lstat(guest_fs / r.lstrip("/")).st_size for r, m in source.items()
                                if stat.S_ISREG(m[0]))
    assert seen[-1] == (summary.bytes, summary.bytes)
    assert sorted(os.listdir(tmp_path / "out")) == ["to"]       # nothing beside TO, no staging left


def test_devices_and_privileges_only_when_asked(guest_fs, tmp_path):
    to = dest(tmp_path)
    summary = restore_files(guest_fs, ["/"], to, RestoreOptions())
    assert not os.path.lexists(to / "null") and not os.path.lexists(to / "disk")
    assert Skipped("/null", "device file (add --devices)") in summary.skipped
    assert Skipped("/disk", "device file (add --devices)") in summary.skipped
    assert stat.S_IMODE(os.stat(to / "suid").st_mode) == 0o755
    assert stat.S_IMODE(os.stat(to / "sgid").st_mode) == 0o755
    assert stat.S_IMODE(os.stat(to / "sgid_dir").st_mode) == 0o2775   # a folder's set-group-id is no privilege
    assert "security.capability" not in os.listxattr(to / "cap")
    assert summary.cleared == ["/cap", "/sgid", "/suid"]
    assert stat.S_ISFIFO(os.lstat(to / "fifo").st_mode)


def test_named_paths_keep_their_place_and_their_folders(guest_fs, tmp_path):
    """Also into a TO whose default ACL and set-group-id bit would give what is made in it an ACL and its
    group: the restored entries have their source's, and only those."""
    to = dest(tmp_path)
    to.mkdir(parents=True, mode=0o700)
    os.chmod(to, 0o2700)
    subprocess.run(["setfacl", "-d", "-m", "u:4321:rwx", str(to)], check=True)
    summary = restore_files(guest_fs, ["/private/inner.txt", "/deep/a/b", "/deep/a/b/leaf.txt", "/odd/new\nline",
                                       "/link"], to, RestoreOptions())
    restored, source = tree(to), tree(guest_fs)   # before anything reads a folder (its atime)
    for folder in ("/private", "/deep", "/deep/a", "/deep/a/b", "/odd"):   # the folders on the way: the source's
        assert restored[folder] == source[folder], folder
    assert sorted(restored) == ["/deep", "/deep/a", "/deep/a/b", "/deep/a/b/leaf.txt", "/link", "/odd",
                                "/odd/new\nline", "/private", "/private/inner.txt"]
    assert os.readlink(to / "link") == "plain.txt"
    assert (summary.files, summary.folders, summary.links) == (3, 1, 1)


def test_refusals_write_nothing(guest_fs, tmp_path):
    out = tmp_path / "out"
    out.mkdir(mode=0o700)
    (out / "to").mkdir(mode=0o700)
    (out / "to" / "mine").write_bytes(b"the user's")
    before = listing(out)
    cases = [
        (["/www/index.html"], "refusing /www/index.html: /www is a symbolic link in the point (to /root)"),
        (["/root_link/etc/passwd"], "refusing /root_link/etc/passwd: /root_link is a symbolic link in the point"),
        (["/private/../../etc"], "refusing /private/../../etc: `..` in a path"),
        (["etc/hosts"], "etc/hosts: a path inside the point starts with /"),
        (["/no/such"], "/no/such not found in the point"),
        (["/plain.txt/x"], "/plain.txt/x not found in the point (/plain.txt is not a folder)"),
        ([f"/{STAGING}/tree/x"], f"refusing /{STAGING}/tree/x: /{STAGING} is the name of rpfs's staging folder"),
        ([f"/./{STAGING}"], f"refusing /./{STAGING}: /{STAGING} is the name of rpfs's staging folder"),
        (["/odd/new\nline/x"], "/odd/new\\nline/x not found in the point (/odd/new\\nline is not a folder)"),
        (["/plain.txt"], f"{out / 'to'} is not empty (it holds mine): restore into an empty or new folder,"
                         " or add --force"),
    ]
    cases.append((["/plain.txt"], f"cannot make the restore folder {guest_fs / 'new'}: Read-only file system"))
    for paths, message in cases:
        with pytest.raises(RpfsError) as refused:
            restore_files(guest_fs, paths, guest_fs / "new" if "Read-only" in message else out / "to",
                          RestoreOptions())
        assert refused.value.message.startswith(message), refused.value.message
        assert "\n" not in refused.value.message
    assert listing(out) == before


def test_force_replaces_what_is_at_the_same_paths_without_following_links(guest_fs, tmp_path):
    out = tmp_path / "out"
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "inner.txt").write_bytes(b"not to be touched")
    to = out / "to"
    to.mkdir(parents=True, mode=0o700)
    os.symlink(outside, to / "private")              # a link where a restored folder goes
    os.symlink(outside / "inner.txt", to / "plain.txt")
    (to / "keep.txt").write_bytes(b"left alone")
    (to / "deep").mkdir()
    (to / "deep" / "mine.txt").write_bytes(b"mine")
    before = listing(outside)
    restore_files(guest_fs, ["/private/inner.txt", "/plain.txt", "/deep/a"], to, RestoreOptions(force=True))
    assert listing(outside) == before and (outside / "inner.txt").read_bytes() == b"not to be touched"
    assert (to / "private" / "inner.txt").read_bytes() == b"inner\n" and not (to / "private").is_symlink()
    assert (to / "plain.txt").read_bytes() == (guest_fs / "plain.txt").read_bytes()
    assert (to / "keep.txt").read_bytes() == b"left alone"
    assert sorted(os.listdir(to / "deep")) == ["a", "mine.txt"]       # a folder on the way is entered
    assert sorted(os.listdir(to)) == ["deep", "keep.txt", "plain.txt", "private"]


def test_restoring_links_out_of_the_guest_twice_writes_nothing_outside(guest_fs, tmp_path):
    """The second restore, with --force, replaces the restored links `root_link -> /` and `climb ->
    ../../../tmp` and the folders beside them; nothing is resolved through them."""
    to = dest(tmp_path)
    top = sorted(os.listdir("/"))
    restore_files(guest_fs, ["/"], to, RestoreOptions())
    restore_files(guest_fs, ["/"], to, RestoreOptions(force=True))
    restore_files(guest_fs, ["/root_link", "/private/inner.txt"], to, RestoreOptions(force=True))
    assert sorted(os.listdir("/")) == top
    assert os.readlink(to / "root_link") == "/" and os.readlink(to / "climb") == "../../../../../../tmp"
    assert sorted(os.listdir(tmp_path / "out")) == ["to"]


def test_a_staging_folder_in_an_untrusted_place_is_refused(guest_fs, tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    with pytest.raises(RpfsError) as refused:
        restore_files(guest_fs, ["/plain.txt"], shared / "to", RestoreOptions())
    assert "refusing restore folder" in refused.value.message and not (shared / "to").exists()


CHILD = """
import json, os, sys, time
from pathlib import Path
from rpfs.catalog.restore_files import RECORD, RestoreOptions, restore_files
root, to, marker, phase, paths, force = sys.argv[1:]
def pause():
    Path(marker).touch()
    time.sleep(600)
progress = None
if phase == "copying":
    def progress(done, total):
        if done > total // 2:
            pause()
elif phase.startswith("moving"):   # moving:N pauses after the Nth rename
    real, moves = os.rename, []
    def rename(*args, **kwargs):
        real(*args, **kwargs)
        moves.append(args)
        if len(moves) == int(phase.partition(":")[2] or 3):
            pause()
    os.rename = rename
elif phase == "finishing":         # after the record is removed, before the staging folder is
    real_unlink = os.unlink
    def unlink(path, *args, **kwargs):
        real_unlink(path, *args, **kwargs)
        if path == RECORD:
            pause()
    os.unlink = unlink
restore_files(Path(root), json.loads(paths), Path(to), RestoreOptions(force=force == "force", devices=True,
              setuid=True), progress)
"""


def kill_in(phase: str, guest_fs: Path, to: Path, marker: Path, paths: tuple[str, ...] = ("/",),
            force: bool = False) -> None:
    """restore_files of paths (with devices and setuid) in a child, killed with SIGKILL at its pause point."""
    marker.unlink(missing_ok=True)
    child = subprocess.Popen([sys.executable, "-I", "-c", CHILD, str(guest_fs), str(to), str(marker), phase,
                              json.dumps(list(paths)), "force" if force else "-"])
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert child.poll() is None, "the restore ended before its pause point"
            assert time.monotonic() < deadline, "the restore never reached its pause point"
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


@pytest.mark.parametrize("kills", [["copying"], ["moving"], ["moving", "copying", "moving"]])
def test_kill_9_leaves_nothing_half_done_and_the_same_command_finishes(guest_fs, tmp_path, kills):
    """However often it is killed, copying or renaming into place: what is visible in TO is whole, and the
    same command again finishes (another is refused)."""
    to = dest(tmp_path)
    source = tree(guest_fs)
    checked = set()   # reading an entry changes its atime: each is checked once, as the kill left it
    for phase in kills:
        kill_in(phase, guest_fs, to, tmp_path / "paused")
        visible = sorted(set(os.listdir(to)) - {STAGING})
        assert STAGING in os.listdir(to)
        if kills == ["copying"]:
            assert visible == []
        assert {f"/{name}" for name in visible} <= set(source)   # (one renamed aside may be missing a moment)
        killed = tree(to)
        for rel, meta in killed.items():           # what is visible is whole
            if not rel.startswith(f"/{STAGING}") and rel not in checked:
                assert meta == source[rel] and content(to, rel) == content(guest_fs, rel), rel
                checked.add(rel)
        if visible:   # what the killed job moved in, or its unfinished renames: a reason to refuse another job...
            with pytest.raises(RpfsError, match="is not empty|holds an unfinished restore-files of /: run that"):
                restore_files(guest_fs, ["/plain.txt"], to, RestoreOptions())
    summary = restore_files(guest_fs, ["/"], to, RestoreOptions(devices=True, setuid=True))   # ...the same finishes
    restored = tree(to)
    del source[f"/{STAGING}"], source["/sock"]
    assert restored == source and not summary.cleared
    assert all(content(to, rel) == content(guest_fs, rel) for rel in source)
    assert os.listdir(to) != [] and STAGING not in os.listdir(to)


def test_a_kill_between_the_two_renames_never_loses_what_was_there(guest_fs, tmp_path):
    """--force over the user's own entries, killed after /plain.txt was renamed aside and before the new
    one came in (and after /deep/a was replaced): another job is refused, the same job put the user's
    /plain.txt back first even when it is killed (or fails) again before its renames, never over the new
    /deep/a; then the staging folder no longer holds anything to put back, and another job may drop it."""
    to = dest(tmp_path)
    to.mkdir(parents=True, mode=0o700)
    (to / "plain.txt").write_bytes(b"the user's")
    (to / "deep" / "a").mkdir(parents=True)
    (to / "deep" / "a" / "old.txt").write_bytes(b"old")
    (to / "deep" / "mine.txt").write_bytes(b"mine")
    job = ("/plain.txt", "/deep/a")
    kill_in("moving:3", guest_fs, to, tmp_path / "paused", job, force=True)   # deep/a aside, in; plain.txt aside
    assert not (to / "plain.txt").exists() and (to / "deep" / "a" / "b" / "leaf.txt").read_bytes() == b"leaf"
    with pytest.raises(RpfsError) as refused:
        restore_files(guest_fs, ["/link"], to, RestoreOptions(force=True))
    assert refused.value.message == (f"{to} holds an unfinished restore-files of /deep/a and 1 more: run that same"
                                     f" command again to finish it, or remove {to / STAGING} by hand after checking it")
    kill_in("copying", guest_fs, to, tmp_path / "paused", job, force=True)
    assert (to / "plain.txt").read_bytes() == b"the user's"          # put back, never lost
    assert sorted(os.listdir(to / "deep" / "a")) == ["b"]             # the new one stays: nothing put back over it
    restore_files(guest_fs, ["/link"], to, RestoreOptions(force=True))   # nothing renamed yet: its staging goes
    assert sorted(os.listdir(to)) == ["deep", "link", "plain.txt"]
    assert (to / "plain.txt").read_bytes() == b"the user's" and (to / "deep" / "mine.txt").read_bytes() == b"mine"
    restore_files(guest_fs, list(job), to, RestoreOptions(force=True))
    assert (to / "plain.txt").read_bytes() == (guest_fs / "plain.txt").read_bytes()
    assert sorted(os.listdir(to)) == ["deep", "link", "plain.txt"]


def test_a_kill_after_the_record_went_leaves_a_finished_job(guest_fs, tmp_path):
    """Killed between removing its record and its staging folder: the job is done; the empty staging
    folder is removed by the next run and is no reason to refuse (the restored file is, as after any
    finished job, unless --force)."""
    to = dest(tmp_path)
    kill_in("finishing", guest_fs, to, tmp_path / "paused", ("/plain.txt",))
    assert sorted(os.listdir(to)) == [STAGING, "plain.txt"] and os.listdir(to / STAGING) == []
    with pytest.raises(RpfsError, match=r"is not empty \(it holds plain.txt\)"):
        restore_files(guest_fs, ["/plain.txt"], to, RestoreOptions())
    assert os.listdir(to) == ["plain.txt"]
    (to / "plain.txt").unlink()
    (to / STAGING).mkdir()
    restore_files(guest_fs, ["/link"], to, RestoreOptions())            # only an empty staging folder: empty
    assert os.listdir(to) == ["link"]


def test_skipped_and_cleared_hold_exact_paths(tmp_path):
    """The summary (and so --json) holds the paths as they are; only printing escapes them."""
    source = tmp_path / "source"
    source.mkdir()
    odd = "so\nck\x1b[31m"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(source / odd))
    (source / "su\tid").write_bytes(b"#!/bin/sh\n")
    os.chmod(source / "su\tid", 0o4755)
    summary = restore_files(source, ["/"], tmp_path / "to", RestoreOptions())
    assert summary.skipped == [Skipped(f"/{odd}", "socket (not restored: a program makes its own)")]
    assert summary.cleared == ["/su\tid"]
    from dataclasses import asdict
    assert json.loads(json.dumps(asdict(summary)))["skipped"] == [{"path": f"/{odd}",
                                                                    "why": "socket (not restored: a program makes its own)"}]


def test_a_read_error_fails_the_restore_naming_the_file(tmp_path, kernel):
    """A damaged block of a point reads as EIO through the store mount: the restore fails with one line
    naming the file, and nothing is renamed into TO."""
    data = random.Random(5).randbytes(6 * MiB)
    image = make_whole_disk_ext4(tmp_path / "d.img", {"big.bin": data, "small.txt": b"fine\n"})
    where = image.read_bytes().find(data[:4096])
    store = tmp_path / "store"
    rpfs("init", store=store)
    rpfs("backup", "vm", f"--disk=d={image}", store=store)
    with open_store(store) as opened:
        point = opened.point("vm")
        block_size = point.disk("d").block_size
        index = where // block_size + 2                # a block inside big.bin's data
        digest = opened.block_digest(opened.map_key("vm", point.id, "d"), index)
        stored = bytearray(opened.get_blob(digest))
        stored[-1] ^= 0xFF
        opened.write(lambda txn: txn.put(digest, bytes(stored), db=opened.db("blocks")))
    with mounted(store, tmp_path / "mnt") as mnt, mounted_ro(mnt / "vm" / "latest" / "d.img", tmp_path / "fs") as fs:
        to = dest(tmp_path)
        with pytest.raises(RpfsError) as failed:
            restore_files(fs, ["/"], to, RestoreOptions())
        assert failed.value.message == "cannot read /big.bin in the point: Input/output error"
        assert failed.value.exit_code == EXIT_CORRUPT
        assert os.listdir(to) == [STAGING]            # the staging folder stays, nothing is in place
        restore_files(fs, ["/small.txt"], to, RestoreOptions())   # the next run removes it
        assert os.listdir(to) == ["small.txt"]


def test_a_second_restore_into_the_same_folder_waits_its_turn(guest_fs, tmp_path):
    import fcntl
    to = dest(tmp_path)
    to.mkdir(parents=True, mode=0o700)
    fd = os.open(to, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(RpfsError, match="another restore-files is writing into"):
            restore_files(guest_fs, ["/plain.txt"], to, RestoreOptions())
    finally:
        os.close(fd)
    assert os.listdir(to) == []


def test_folders_nested_too_deep_are_one_line(tmp_path):
    """The copy recurses, two descriptors per level: MAX_DEPTH levels restore, one more is refused in a line."""
    from rpfs.catalog.restore_files import MAX_DEPTH
    source = tmp_path / "source"
    for depth, name in ((MAX_DEPTH, "ok"), (MAX_DEPTH + 2, "too")):
        leaf = source / name / "/".join(["d"] * depth)
        leaf.mkdir(parents=True)
        (leaf / "leaf.txt").write_bytes(b"deep")
    summary = restore_files(source, ["/ok"], tmp_path / "ok", RestoreOptions())
    assert summary.folders == MAX_DEPTH + 1
    assert (tmp_path / "ok" / "ok" / "/".join(["d"] * MAX_DEPTH) / "leaf.txt").read_bytes() == b"deep"
    with pytest.raises(RpfsError) as refused:
        restore_files(source, ["/too"], tmp_path / "too", RestoreOptions())
    assert refused.value.message.startswith(f"cannot restore /too/{'d/' * MAX_DEPTH}d: folders nested more than")
    assert not (tmp_path / "too").exists() or os.listdir(tmp_path / "too") == []


def test_a_name_holding_a_slash_in_a_damaged_filesystem_goes_nowhere(tmp_path, kernel):
    """A directory entry patched to `../../../etc` (metadata checksums off, so the kernel reads it): the
    kernel refuses to list the folder, and the restore fails naming it; nothing is written. (Were a name
    with `/` ever listed, restore_files would refuse it too: _entries.)"""
    source = tmp_path / "src"
    (source / "d").mkdir(parents=True)
    (source / "d" / "rpfsEVILname").write_bytes(b"planted")
    image = tmp_path / "bad.img"
    with open(image, "wb") as f:
        f.truncate(32 * MiB)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-O", "^metadata_csum", "-d", str(source), str(image)], check=True)
    raw = bytearray(image.read_bytes())
    at = raw.find(b"rpfsEVILname")
    assert at > 0 and raw.find(b"rpfsEVILname", at + 1) < 0
    raw[at:at + 12] = b"../../../etc"
    image.write_bytes(bytes(raw))
    out = tmp_path / "out"
    out.mkdir(mode=0o700)
    before = listing(tmp_path / "src")
    with mounted_ro(image, tmp_path / "fs") as fs:
        with pytest.raises(RpfsError) as failed:
            restore_files(fs, ["/"], out / "to", RestoreOptions())
    assert failed.value.message in ("cannot read /d in the point: Input/output error",   # verify_dirent_name
                                    "cannot read /d in the point: Structure needs cleaning")
    assert os.listdir(out) == []   # found by the first walk, before anything is written
    assert listing(tmp_path / "src") == before

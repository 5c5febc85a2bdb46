"""Access control on the real kernel: another user (nobody) reads, opens and locks nothing rpfs keeps, and
gets EACCES from every image of a mount; --allow-group lets one group read; root never follows a link
another user planted, and runs only scripts that root alone can change, through what it checked."""
import grp
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from cli_helpers import REPO, mounted, rpfs
from conftest import require_tool, skip_or_fail_in_ci
from diskimages import leftover_kernel_state, make_whole_disk_ext4, random_files, release_kernel_state
from test_backup import write_image

from rpfs.backup import quiesce, snapshot
from rpfs.errors import RpfsError

pytestmark = [pytest.mark.timeout(240), pytest.mark.usefixtures("kernel")]
MiB = 1 << 20

TRY_OPEN = """
import errno, fcntl, os, sys
for path in sys.argv[1:]:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        print(errno.errorcode[e.errno]); continue
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        print("locked")
    except OSError:
        print("opened")
"""
HASH = "import hashlib, sys; print(hashlib.sha256(open(sys.argv[1], 'rb').read()).hexdigest())"


def as_nobody(*cmd: str, group: str = "nogroup") -> subprocess.CompletedProcess:
    """cmd run as nobody, with only `group` (nobody's own, nogroup, unless told)."""
    require_tool("setpriv")
    env = {"PATH": os.environ["PATH"], "HOME": "/", "RPFS_RUN_DIR": os.environ["RPFS_RUN_DIR"]}
    return subprocess.run(["setpriv", "--reuid=nobody", f"--regid={group}", "--clear-groups", *cmd],
                          capture_output=True, text=True, timeout=60, cwd=REPO, env=env)


@pytest.fixture(autouse=True)
def nobody_runs_rpfs(kernel):
    """Every test here runs this Python (and rpfs) as nobody: it must be able to."""
    done = as_nobody(sys.executable, "-c", "import rpfs.cli")
    if done.returncode != 0:
        skip_or_fail_in_ci(f"nobody cannot run {sys.executable} with rpfs: {done.stderr.strip()[-200:]}")


def opened_as_nobody(paths, group: str = "nogroup") -> dict[str, str]:
    """path -> what nobody got: an errno name, "opened" (but not locked) or "locked"."""
    done = as_nobody(sys.executable, "-c", TRY_OPEN, *map(str, paths), group=group)
    assert done.returncode == 0, done.stderr
    return dict(zip(map(str, paths), done.stdout.split()))


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def modes_below(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): mode(p) for p in sorted(folder.rglob("*"))}


def mount_options(mountpoint: Path) -> set[str]:
    with open("/proc/self/mounts") as f:
        found = [line.split()[3] for line in f if line.split()[1] == os.path.realpath(mountpoint)]
    return set(found[-1].split(","))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def open_area():
    """A folder anyone may pass through (tmp_path is below pytest's 0700 folder, which would keep nobody out
    whatever rpfs does): only rpfs's own modes stand between nobody and what it makes here."""
    area = Path(tempfile.mkdtemp(prefix="rpfs-access-"))
    area.chmod(0o755)
    try:
        yield area
        assert leftover_kernel_state(area) == ([], []), "a mount or loop device was left behind"
    finally:
        release_kernel_state(area)
        shutil.rmtree(area, ignore_errors=True)


@pytest.fixture
def backed_up(tmp_path):
    """A store with one recovery point of a 3 MiB disk; (store, disk image)."""
    image = write_image(tmp_path / "d.img", 7, 3 * MiB + 100)
    store = tmp_path / "store"
    rpfs("init", store=store)
    rpfs("backup", "vm", f"--disk=d={image}", store=store)
    return store, image


@pytest.fixture
def group_name():
    """A temporary group, removed afterwards."""
    require_tool("groupadd")
    name = f"rpfs-test-{os.getpid()}"
    subprocess.run(["groupadd", name], check=True, capture_output=True)
    try:
        yield name
    finally:
        subprocess.run(["groupdel", name], check=False, capture_output=True)


# -- the store -------------------------------------------------------------------------------------
def test_another_user_can_read_open_or_lock_nothing_in_the_store(open_area, tmp_path):
    image = write_image(tmp_path / "d.img", 7, 3 * MiB + 100)
    store = open_area / "store"
    rpfs("init", store=store)
    rpfs("backup", "vm", f"--disk=d={image}", store=store)
    rpfs("restore", "vm", "--disk", "d", "--to", str(tmp_path / "r.img"), store=store)   # leases/ and its gate
    assert mode(store) == 0o700
    inside = modes_below(store)
    assert {"data.mdb", "lock.mdb", "writer.lock", "open.lock", "leases", "leases/gate"} <= set(inside)
    assert {name: m for name, m in inside.items() if m != (0o700 if (store / name).is_dir() else 0o600)} == {}

    assert as_nobody("stat", str(store)).returncode == 0   # nobody reaches the folder: its mode keeps them out
    files = [store / name for name in ("data.mdb", "lock.mdb", "writer.lock", "open.lock", "leases/gate")]
    assert set(opened_as_nobody(files).values()) == {"EACCES"}
    done = as_nobody("ls", str(store))
    assert done.returncode != 0 and "Permission denied" in done.stderr
    done = as_nobody("cat", str(store / "data.mdb"))
    assert done.returncode != 0 and "Permission denied" in done.stderr

    store.chmod(0o755)   # even in a folder someone opened up, the files are root's alone
    try:
        assert set(opened_as_nobody(files).values()) == {"EACCES"}
    finally:
        store.chmod(0o700)

    done = as_nobody(sys.executable, "-m", "rpfs", "--store", str(store), "list")
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr == f"rpfs: cannot open store {store}: permission denied (it is root's, mode 0700)\n"
    done = as_nobody(sys.executable, "-m", "rpfs", "--store", str(store), "mount", str(open_area))
    assert done.returncode == 1 and done.stderr.count("\n") == 1 and "permission denied" in done.stderr


def test_a_store_out_of_reach_is_one_line_too(backed_up):
    store, _ = backed_up   # below pytest's 0700 folder
    done = as_nobody(sys.executable, "-m", "rpfs", "--store", str(store), "list", "--json")
    assert done.returncode == 1 and done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert f"cannot open store {store}: permission denied (" in done.stderr and "root's, mode 0700)" in done.stderr


def test_an_older_store_is_tightened_by_the_next_writing_command(backed_up):
    store, _ = backed_up
    for path in [store, *store.rglob("*")]:   # as an rpfs before access control left it
        path.chmod(0o755 if path.is_dir() else 0o644)
    rpfs("list", store=store)   # read-only: it changes nothing
    assert mode(store / "data.mdb") == 0o644
    rpfs("gc", store=store)
    assert mode(store) == 0o700
    assert {n: m for n, m in modes_below(store).items() if m != (0o700 if (store / n).is_dir() else 0o600)} == {}
    rpfs("compact", store=store)   # LMDB writes its compacted copy 0644: swapped in 0600
    assert {n: m for n, m in modes_below(store).items() if m != (0o700 if (store / n).is_dir() else 0o600)} == {}


# -- the mount, the run dir, instant restores, attach -----------------------------------------------
def test_the_mount_is_root_only(open_area, backed_up, tmp_path):
    store, image = backed_up
    with mounted(store, open_area / "mnt") as mnt:
        disk = mnt / "vm" / "latest" / "d.img"
        assert sha256(disk) == sha256(image)   # root reads
        assert "allow_other" not in mount_options(mnt)   # the kernel lets only root in, whatever the modes
        assert mode(disk) == 0o440 and mode(mnt / "vm") == 0o550 and os.stat(disk).st_gid == 0
        point = os.readlink(mnt / "vm" / "latest")
        assert opened_as_nobody([disk, mnt / "vm" / point / "d.img", mnt / "vm" / point / "info.json"]) == \
            {str(disk): "EACCES", str(mnt / "vm" / point / "d.img"): "EACCES",
             str(mnt / "vm" / point / "info.json"): "EACCES"}
        for cmd in (["cat", str(disk)], ["ls", str(mnt)]):
            done = as_nobody(*cmd)
            assert done.returncode != 0 and "Permission denied" in done.stderr, cmd
        run = Path(os.environ["RPFS_RUN_DIR"])
        assert mode(run) == 0o700 and [p.name for p in run.glob("mount-*.pid")]
        assert {n: m for n, m in modes_below(run).items() if m != (0o700 if (run / n).is_dir() else 0o600)} == {}


def test_allow_group_lets_its_members_read_and_nobody_else(open_area, backed_up, group_name):
    store, image = backed_up
    done = rpfs("mount", str(open_area), "--allow-group", "no-such-group-here", store=store, check=False)
    assert done.returncode == 1 and done.stderr == "rpfs: unknown group 'no-such-group-here' (create it with" \
        " groupadd, or give an existing one)\n"
    with mounted(store, open_area / "mnt", "--allow-group", group_name) as mnt:
        disk = mnt / "vm" / "latest" / "d.img"
        gid = grp.getgrnam(group_name).gr_gid
        assert {"allow_other", "default_permissions"} <= mount_options(mnt)   # the modes decide
        assert (mode(disk), os.stat(disk).st_gid) == (0o440, gid)
        assert (mode(mnt), os.stat(mnt).st_gid, mode(mnt / "vm")) == (0o550, gid, 0o550)
        member = as_nobody(sys.executable, "-c", HASH, str(disk), group=group_name)
        assert member.returncode == 0 and member.stdout.strip() == sha256(image), member.stderr
        assert opened_as_nobody([disk]) == {str(disk): "EACCES"}
        done = as_nobody("cat", str(disk))
        assert done.returncode != 0 and "Permission denied" in done.stderr
        done = as_nobody("ls", str(mnt / "vm"))
        assert done.returncode != 0 and "Permission denied" in done.stderr


def test_the_instant_restore_image_is_root_only(open_area, backed_up, monkeypatch):
    store, image = backed_up
    run = open_area / "run"
    monkeypatch.setenv("RPFS_RUN_DIR", str(run))   # reachable: only rpfs's modes keep nobody out
    target = open_area / "restored.img"
    job = json.loads(rpfs("instant-restore", "vm", "--disk", "d", "--to", str(target), "--copy-mbps", "0.2",
                          "--json", store=store).stdout)   # slow: the copy is still under way below
    try:
        served = Path(job["image"])
        assert mode(served) == 0o600 and mode(served.parent) == 0o700
        assert mode(run) == 0o700 and mode(run / "instant") == 0o700
        assert {n: m for n, m in modes_below(run).items() if m != (0o700 if (run / n).is_dir() else 0o600)} == {}
        assert mode(target.with_name(target.name + ".rpfs-partial")) == 0o600
        assert mode(target.with_name(target.name + ".rpfs-instant")) == 0o600
        assert opened_as_nobody([served]) == {str(served): "EACCES"}
        assert "allow_other" not in mount_options(served.parent)
        for folder in (run, run / "instant"):   # opened up by hand: the mount itself still refuses (no allow_other)
            folder.chmod(0o755)
        done = as_nobody("cat", str(served))
        assert done.returncode != 0 and "Permission denied" in done.stderr
    finally:
        rpfs("instant-stop", str(target), "--discard", store=store, check=False)


def test_attach_folders_are_root_only(open_area, tmp_path):
    image = make_whole_disk_ext4(tmp_path / "fs.img", random_files(5, count=3))
    made, given = open_area / "new" / "dest", open_area / "given"
    given.mkdir(mode=0o755)
    for dest in (made, given):
        rpfs("attach", str(image), str(dest))
        try:
            assert mode(dest) == 0o700 and (dest / "disk").is_mount()
            done = as_nobody("ls", str(dest / "disk"))
            assert done.returncode != 0 and "Permission denied" in done.stderr
        finally:
            rpfs("detach", str(dest), check=False)
    assert mode(open_area / "new") == 0o700   # made by attach too


# -- links planted where root writes -------------------------------------------------------------------
def test_links_at_the_partial_state_and_target_paths_are_refused(backed_up, tmp_path):
    store, _ = backed_up
    victim = tmp_path / "victim"
    victim.write_bytes(b"not yours")
    target = tmp_path / "restored.img"
    partial, state = target.with_name(target.name + ".rpfs-partial"), target.with_name(target.name + ".rpfs-instant")
    for link, restore in [(partial, "restore"), (state, "restore"), (target, "restore"),
                          (state, "instant-restore"), (partial, "instant-restore")]:
        for points_to in (victim, tmp_path / "nothing-here"):   # a dangling link too
            link.symlink_to(points_to)
            try:
                done = rpfs(restore, "vm", "--disk", "d", "--to", str(target), store=store, check=False)
                assert done.returncode == 1 and done.stderr.count("\n") == 1, (link, done.stderr)
                assert "is a symbolic link" in done.stderr, done.stderr
                assert victim.read_bytes() == b"not yours" and not (tmp_path / "nothing-here").exists()
                assert link.is_symlink() and os.readlink(link) == str(points_to)
                assert [p.name for p in tmp_path.glob("restored.img*")] == [link.name]
            finally:
                link.unlink()


def test_a_snapshot_folder_someone_else_could_write_is_refused(backed_up, tmp_path):
    store, image = backed_up
    top = image.parent / snapshot.SNAPSHOT_DIR
    victim = tmp_path / "victim"
    victim.mkdir()
    cases = [("a link", lambda: top.symlink_to(victim)),
             ("nobody's", lambda: (top.mkdir(mode=0o700), os.chown(top, 65534, 65534))),
             ("writable by others", lambda: (top.mkdir(), top.chmod(0o777))),
             ("group-writable", lambda: (top.mkdir(), top.chmod(0o770)))]
    for what, plant in cases:
        plant()
        try:
            done = rpfs("backup", "vm", f"--disk=d={image}", store=store, check=False)
            assert done.returncode == 1 and done.stderr.count("\n") == 1, (what, done.stderr)
            assert str(top) in done.stderr and "nobody else can write" in done.stderr, (what, done.stderr)
            assert list(victim.iterdir()) == []
        finally:
            top.unlink() if top.is_symlink() else shutil.rmtree(top)
    assert len(json.loads(rpfs("list", "--json", store=store).stdout)) == 1   # nothing was backed up
    top.mkdir(mode=0o755)   # root's, and nobody else writes: fine (an older rpfs made it so)
    rpfs("backup", "vm", f"--disk=d={image}", store=store)


def test_links_below_the_snapshot_folder_are_not_followed(tmp_path, monkeypatch):
    image = write_image(tmp_path / "d.img", 8, MiB)
    victim = tmp_path / "victim"
    victim.mkdir()
    target = snapshot.snapshot_path(image, "vm", "2030-01-01T000000Z", "d")
    target.parent.mkdir(parents=True)
    for planted in (victim / "d.img", victim / "missing.img"):
        (victim / "d.img").write_bytes(b"not yours")
        target.symlink_to(planted)
        with pytest.raises(RpfsError, match="cannot create the snapshot .*: File exists"):
            snapshot.take({"d": image}, "vm", "2030-01-01T000000Z")
        assert (victim / "d.img").read_bytes() == b"not yours" and not (victim / "missing.img").exists()
        target.unlink()
    shutil.rmtree(target.parent.parent)
    target.parent.parent.symlink_to(victim)   # .rpfs-snapshots/vm -> elsewhere
    with pytest.raises(RpfsError, match="cannot create the snapshot"):
        snapshot.take({"d": image}, "vm", "2030-01-01T000000Z")
    snapshot.delete([target])   # nor deleted through it
    assert sorted(p.name for p in victim.iterdir()) == ["d.img"]
    target.parent.parent.unlink()
    (image.parent / snapshot.SNAPSHOT_DIR).rmdir()

    seen = {}

    def fake_clone(source, fd, follow=True):   # where FICLONE would run: what mode has the clone then?
        seen["mode"] = stat.S_IMODE(os.fstat(fd).st_mode)
    monkeypatch.setattr(snapshot, "clone_into", fake_clone)
    made = snapshot.take({"d": image}, "vm", "2030-01-01T000000Z")
    assert seen["mode"] == 0o600 and mode(made["d"]) == 0o400
    assert mode(target.parent) == mode(target.parent.parent) == mode(target.parent.parent.parent) == 0o700
    snapshot.delete(made.values())
    assert not (image.parent / snapshot.SNAPSHOT_DIR).exists()


# -- scripts root runs ------------------------------------------------------------------------------------
def root_file(path: Path, text: str, file_mode: int) -> Path:
    path.write_text(text)
    os.chown(path, 0, 0)
    path.chmod(file_mode)
    return path


def test_scripts_and_configs_others_could_change_are_refused(backed_up, tmp_path):
    store, image = backed_up
    scripts = tmp_path / "scripts"
    scripts.mkdir(mode=0o700)
    pre = root_file(scripts / "pre.sh", f"#!/bin/sh\ntouch {tmp_path}/pre-ran\n", 0o700)
    cfg = root_file(tmp_path / "c.toml", f'[pre]\npath = "{pre}"\n', 0o600)
    others_link = tmp_path / "link.sh"
    others_link.symlink_to(pre)
    os.lchown(others_link, 65534, 65534)
    cases = [(0o777, 0, cfg, f"{scripts} is writable by anyone (mode 0777)"),   # as check_trusted_place says
             (0o770, 0, cfg, f"{scripts} is writable by group root (mode 0770)"),
             (0o700, 65534, cfg, f"{scripts} is writable by nobody (uid 65534), its owner"),
             (0o700, 0, root_file(tmp_path / "l.toml", f'[pre]\npath = "{others_link}"\n', 0o600),
              f"{others_link} is a symbolic link owned by nobody (uid 65534)")]
    for folder_mode, owner, config, why in cases:
        scripts.chmod(folder_mode)
        os.chown(scripts, owner, owner)
        done = rpfs("backup", "vm", f"--disk=d={image}", "--consistency-config", str(config), store=store, check=False)
        assert done.returncode == 1 and done.stderr.count("\n") == 1 and why in done.stderr, done.stderr
        assert "refusing" in done.stderr and not (tmp_path / "pre-ran").exists()
    os.chown(scripts, 0, 0)
    scripts.chmod(0o700)
    open_configs = tmp_path / "configs"
    open_configs.mkdir()
    open_configs.chmod(0o777)
    in_the_open = root_file(open_configs / "c.toml", f'[pre]\npath = "{pre}"\n', 0o600)
    done = rpfs("backup", "vm", f"--disk=d={image}", "--consistency-config", str(in_the_open), store=store,
                check=False)
    assert done.returncode == 1
    assert f"refusing consistency config {in_the_open}: {open_configs} is writable by anyone" in done.stderr
    assert len(json.loads(rpfs("list", "--json", store=store).stdout)) == 1   # nothing was backed up

    sticky = tmp_path / "sticky"   # like /tmp: writable by all, but nobody else can rename root's entries
    sticky.mkdir()
    sticky.chmod(0o1777)
    shutil.move(scripts, sticky / "scripts")
    cfg = root_file(tmp_path / "c.toml", f'[pre]\npath = "{sticky}/scripts/pre.sh"\n', 0o600)
    rpfs("backup", "vm", f"--disk=d={image}", "--consistency-config", str(cfg), store=store)
    assert (tmp_path / "pre-ran").exists()


def test_a_script_runs_through_the_descriptor_that_was_checked(tmp_path, monkeypatch):
    script = root_file(tmp_path / "pre.sh", f"#!/bin/sh\necho checked > {tmp_path}/ran\n", 0o700)
    checked = quiesce.open_trusted

    def check_then_swap(path, what):   # someone replaces the file right after the check
        fd = checked(path, what)
        swapped = root_file(tmp_path / "swapped.sh", f"#!/bin/sh\necho swapped > {tmp_path}/ran\n", 0o700)
        os.replace(swapped, path)
        return fd
    monkeypatch.setattr(quiesce, "open_trusted", check_then_swap)
    result = quiesce.run_script(quiesce.Script(str(script), timeout_seconds=30), "pre")
    assert result.ok, result
    assert (tmp_path / "ran").read_text() == "checked\n"



def test_what_a_tool_creates_is_roots_alone_from_the_start(tmp_path):
    """rpfs overlay has qemu-img create the qcow2: under root's usual umask it was 0644 until chmodded."""
    from rpfs.host.tools import run_tool
    run_tool(["touch", str(tmp_path / "made-by-a-tool")])
    assert mode(tmp_path / "made-by-a-tool") == 0o600


# -- places root makes, tightens, writes or mounts over ------------------------------------------------
@pytest.fixture
def shared_folders(open_area):
    """(a folder anyone may write, a sticky one like /tmp, a folder of root's that a link may point at)."""
    shared, sticky, victim = open_area / "shared", open_area / "sticky", open_area / "victim"
    for folder, folder_mode in ((shared, 0o777), (sticky, 0o1777), (victim, 0o755)):
        folder.mkdir()
        folder.chmod(folder_mode)
    (victim / "keep").write_text("root's")
    return shared, sticky, victim


def planted_link(link: Path, points_to: Path) -> Path:
    """A link nobody makes, as any user could in a folder they may write."""
    done = as_nobody("ln", "-s", str(points_to), str(link))
    assert done.returncode == 0, done.stderr
    assert link.is_symlink() and link.lstat().st_uid == 65534
    return link


def refused(done: subprocess.CompletedProcess, *why: str) -> None:
    assert done.returncode == 1 and done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.startswith("rpfs: refusing "), done.stderr
    assert all(part in done.stderr for part in why), done.stderr


def test_init_through_a_link_nobody_planted_is_refused(shared_folders):
    shared, sticky, victim = shared_folders
    for folder, why in ((sticky, "is a symbolic link"), (shared, f"{shared} is writable by anyone (mode 0777)")):
        link = planted_link(folder / "store", victim)
        refused(rpfs("init", store=link, check=False), f"refusing store {link}:", why)
        assert mode(victim) == 0o755 and sorted(p.name for p in victim.iterdir()) == ["keep"]
        link.unlink()
        assert not as_nobody("mkdir", str(link)).returncode   # a folder of nobody's where root's store would go
        refused(rpfs("init", store=link, check=False), f"refusing store {link}:")
        assert list(link.iterdir()) == []


def test_a_store_in_a_folder_another_user_can_write_is_refused(shared_folders, tmp_path):
    shared, sticky, _ = shared_folders
    store = shared / "store"
    refused(rpfs("init", store=store, check=False), f"refusing store {store}: {shared} is writable by anyone")
    assert not store.exists()
    theirs = shared.parent / "theirs"
    theirs.mkdir(mode=0o755)
    os.chown(theirs, 65534, 65534)
    refused(rpfs("init", store=theirs / "store", check=False),
            f"{theirs} is writable by nobody (uid 65534), its owner")
    assert list(theirs.iterdir()) == []
    rpfs("init", store=tmp_path / "store")
    (tmp_path / "store").rename(store)   # a store someone moved there: nobody could swap it, so not even read
    refused(rpfs("list", store=store, check=False), f"refusing store {store}:")


def test_a_sticky_folder_with_roots_own_entry_is_fine(shared_folders, tmp_path):
    _, sticky, _ = shared_folders   # like /tmp: nobody else may rename or remove what root makes in it
    image = write_image(tmp_path / "d.img", 7, MiB)
    store = sticky / "store"
    rpfs("init", store=store)
    rpfs("backup", "vm", f"--disk=d={image}", store=store)
    rpfs("restore", "vm", "--to", str(sticky / "restored"), store=store)
    assert sha256(sticky / "restored" / "d.img") == sha256(image)
    (sticky / "restored" / "d.img").unlink()
    os.chown(sticky / "restored", 65534, 65534)   # the same name, nobody's: refused
    refused(rpfs("restore", "vm", "--to", str(sticky / "restored"), store=store, check=False),
            f"{sticky}/restored is owned by nobody (uid 65534), in {sticky}, which others can write")
    assert list((sticky / "restored").iterdir()) == []


def test_attach_to_a_link_nobody_planted_is_refused(shared_folders, backed_up, tmp_path):
    shared, sticky, victim = shared_folders
    store, _ = backed_up
    image = make_whole_disk_ext4(tmp_path / "fs.img", random_files(5, count=3))
    empty = victim / "empty"   # attach takes an empty folder: it would be made 0700 and mounted in
    empty.mkdir(mode=0o755)
    link = planted_link(sticky / "dest", empty)
    for source, extra in ((str(image), {}), ("vm", {"store": store})):   # an image; a whole VM of the store
        refused(rpfs("attach", source, str(link), check=False, **extra),
                f"refusing attach destination {link}: it is a symbolic link")
        assert mode(empty) == 0o755 and list(empty.iterdir()) == []
        assert leftover_kernel_state(victim) == ([], [])
    refused(rpfs("attach", str(image), str(shared / "dest"), check=False), f"{shared} is writable by anyone")
    assert list(shared.iterdir()) == []


def test_restores_mounts_and_overlays_in_a_folder_another_user_can_write_are_refused(shared_folders, backed_up):
    shared, _, _ = shared_folders
    store, _ = backed_up
    why = f"{shared} is writable by anyone (mode 0777)"
    refused(rpfs("restore", "vm", "--to", str(shared / "restored"), store=store, check=False),
            f"refusing restore folder {shared}/restored: {why}")
    refused(rpfs("restore", "vm", "--disk", "d", "--to", str(shared / "d.img"), store=store, check=False),
            f"refusing restore target {shared}/d.img: {why}")
    refused(rpfs("instant-restore", "vm", "--disk", "d", "--to", str(shared / "d.img"), store=store, check=False),
            f"refusing instant restore target {shared}/d.img: {why}")
    refused(rpfs("overlay", "vm", "--disk", "d", "--mount", str(shared), "--to", str(shared / "d.qcow2"),
                 store=store, check=False), f"refusing overlay {shared}/d.qcow2: {why}")
    (shared / "mnt").mkdir()
    refused(rpfs("mount", str(shared / "mnt"), store=store, check=False),
            f"refusing mountpoint {shared}/mnt: {why}")
    assert [p.name for p in shared.iterdir()] == ["mnt"] and not (shared / "mnt").is_mount()


def test_links_of_roots_on_the_way_are_followed_and_group_writable_folders_refused(tmp_path):
    from rpfs.host.access import check_trusted_place
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "via").symlink_to(real)   # as /var/run -> /run
    check_trusted_place(tmp_path / "via" / "store", "store")
    check_trusted_place(tmp_path / "via" / ".." / "via" / "store", "store")
    check_trusted_place(tmp_path / "via", "store", private=True)   # root's, in a folder only root can change
    real.chmod(0o777)   # and where it leads is checked as the place itself
    with pytest.raises(RpfsError, match=r"^refusing store .*/via: .*/real is writable by anyone \(mode 0777\);"
                                        r" root writes in it, so it must be root's and writable by root only$"):
        check_trusted_place(tmp_path / "via", "store", private=True)
    real.chmod(0o755)
    os.lchown(tmp_path / "via", 65534, 65534)
    with pytest.raises(RpfsError, match=r"/via: it is a symbolic link owned by nobody \(uid 65534\)"):
        check_trusted_place(tmp_path / "via", "store")
    with pytest.raises(RpfsError, match=r"/via is a symbolic link owned by nobody \(uid 65534\)"):
        check_trusted_place(tmp_path / "via" / "store", "store")
    real.chmod(0o2775)
    os.chown(real, 0, grp.getgrnam("nogroup").gr_gid)
    with pytest.raises(RpfsError, match=r"/real is writable by group nogroup \(mode 2775\)"):
        check_trusted_place(real / "store", "store")
    for default in ("/run/rpfs", "/etc/rpfs", "/var/cache/rpfs/vault-index/0123"):   # rpfs's own places
        check_trusted_place(Path(default), "default")


# -- places root writes in: root's alone, and no link at what LMDB opens ---------------------------------
def test_a_store_folder_of_someone_elses_or_that_others_can_write_is_refused(shared_folders, backed_up):
    _, _, victim = shared_folders   # victim: root's, 0755, in a folder only root can change
    theirs = victim / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, 65534, 65534)   # nobody's own empty folder: they could plant lock.mdb in it at any time
    refused(rpfs("init", store=theirs, check=False), f"refusing store {theirs}: it is owned by nobody (uid 65534)")
    assert list(theirs.iterdir()) == [] and mode(theirs) == 0o700
    open_to_all = victim / "open"
    open_to_all.mkdir()
    open_to_all.chmod(0o777)   # root's, but anyone may make names in it (sticky or not)
    for folder_mode in (0o777, 0o1777, 0o770):
        open_to_all.chmod(folder_mode)
        refused(rpfs("init", store=open_to_all, check=False), f"refusing store {open_to_all}: it is writable by",
                f"(mode {folder_mode:04o}); root writes in it, so it must be root's and writable by root only")
        assert list(open_to_all.iterdir()) == []
    store, _ = backed_up
    for change, why in ((lambda: os.chown(store, 65534, 65534), "it is owned by nobody (uid 65534)"),
                        (lambda: store.chmod(0o777), "it is writable by anyone (mode 0777)")):
        change()
        for command in ("list", "verify"):   # readers too: LMDB writes lock.mdb
            refused(rpfs(command, store=store, check=False), f"refusing store {store}: {why}")
        os.chown(store, 0, 0)
        store.chmod(0o755)   # root's, and nobody else writes: fine (as an older rpfs made it)
        rpfs("list", store=store)


def test_a_link_at_the_stores_lmdb_files_is_never_written_through(backed_up, tmp_path):
    store, image = backed_up
    victim = tmp_path / "shadow"
    victim.write_bytes(b"root:secret\n")
    lock = store / "lock.mdb"
    lock.unlink()
    lock.symlink_to(victim)   # root's own link, in root's own 0700 store: still never followed
    for command in (["list"], ["verify"], ["backup", "vm", f"--disk=d={image}"]):
        refused(rpfs(*command, store=store, check=False),
                f"refusing store {store}: {lock} is a symbolic link; root opens it by name, so it must be a"
                " regular file of root's")
        assert victim.read_bytes() == b"root:secret\n"
    lock.unlink()
    new = tmp_path / "new"
    new.mkdir(mode=0o700)
    for name in ("data.mdb", "lock.mdb"):
        (new / name).symlink_to(victim)
        refused(rpfs("init", store=new, check=False), f"refusing store {new}: {new / name} is a symbolic link")
        assert victim.read_bytes() == b"root:secret\n"
        (new / name).unlink()
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "precious").write_text("mine")
    (store / "compact.tmp").symlink_to(kept)   # compact empties its work folder, by name
    refused(rpfs("compact", store=store, check=False), f"{store}/compact.tmp is a symbolic link")
    assert (kept / "precious").read_text() == "mine"
    (store / "compact.tmp").unlink()
    rpfs("compact", store=store)
    assert len(json.loads(rpfs("list", "--json", store=store).stdout)) == 1


def test_attach_to_a_folder_of_someone_elses_or_that_others_can_write_is_refused(shared_folders, backed_up, tmp_path):
    _, _, victim = shared_folders
    store, _ = backed_up
    image = make_whole_disk_ext4(tmp_path / "fs.img", random_files(5, count=3))
    dest = victim / "dest"   # nobody could swap dest/disk for a link between its mkdir and the mount
    dest.mkdir(mode=0o755)
    for change, why in ((lambda: os.chown(dest, 65534, 65534), "it is owned by nobody (uid 65534)"),
                        (lambda: dest.chmod(0o1777), "it is writable by anyone (mode 1777)")):
        change()
        for source, extra in ((str(image), {}), ("vm", {"store": store})):   # an image; a whole VM of the store
            refused(rpfs("attach", source, str(dest), check=False, **extra),
                    f"refusing attach destination {dest}: {why}")
            assert list(dest.iterdir()) == [] and leftover_kernel_state(victim) == ([], [])
        refused(rpfs("restore", "vm", "--to", str(dest), store=store, check=False),   # a full restore too
                f"refusing restore folder {dest}: {why}")
        assert list(dest.iterdir()) == []
        os.chown(dest, 0, 0)
        dest.chmod(0o755)


def test_dot_dot_is_taken_from_where_a_link_leads_not_from_its_spelling(shared_folders):
    shared, sticky, victim = shared_folders
    (victim / "sub").mkdir()
    evil = planted_link(sticky / "evil", victim / "sub")   # sticky/evil/.. is victim, not sticky
    store = Path(f"{evil}/../store")
    refused(rpfs("init", store=store, check=False),
            f"refusing store {store}: {evil} is a symbolic link owned by nobody")
    assert sorted(p.name for p in victim.iterdir()) == ["keep", "sub"] and not (sticky / "store").exists()


def test_a_link_of_roots_to_the_store_in_a_folder_only_root_can_change_is_followed(shared_folders, tmp_path):
    _, sticky, _ = shared_folders
    image = write_image(tmp_path / "d.img", 7, MiB)
    real = tmp_path / "data" / "rpfs"
    link = tmp_path / "srv-rpfs"   # as /srv/rpfs -> /data/rpfs
    link.symlink_to(real)
    rpfs("init", store=link)
    assert mode(real) == 0o700 and (real / "data.mdb").exists() and link.is_symlink()
    rpfs("backup", "vm", f"--disk=d={image}", store=link)
    assert len(json.loads(rpfs("list", "--json", store=link).stdout)) == 1
    os.lchown(link, 65534, 65534)   # the same link, another user's: refused
    refused(rpfs("list", store=link, check=False), f"refusing store {link}: it is a symbolic link owned by nobody")
    in_the_open = sticky / "store"   # root's link, but in a folder anyone may write: give the real path
    in_the_open.symlink_to(real)
    refused(rpfs("list", store=in_the_open, check=False),
            f"refusing store {in_the_open}: it is a symbolic link in {sticky}, which others can write")

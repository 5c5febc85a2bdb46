"""Root runs rpfs from a folder another user may write (a shared folder, /tmp): nothing planted there is
imported, by the CLI or by any Python process it starts (daemons, store readers, the freeze watchdog).

A module named after each third-party import of rpfs (and rpfs itself) is planted in a folder that user
nobody owns; importing one leaves a marker in a folder only root may write. Each command runs from that
folder through the `rpfs` console script, as a user runs it."""
import json
import os
import pwd
import subprocess
import sys
from pathlib import Path

import pytest
from cli_helpers import force_unmount, is_mounted, rpfs
from conftest import skip_or_fail_in_ci
from diskimages import make_whole_disk_ext4, random_files, read_tree
from test_consistency import config, vm_on_xfs  # noqa: F401 (a fixture)
from test_vault import _vault_of_one_backup, ceph, vault_env  # noqa: F401 (fixtures)

PLANTED = ("lmdb", "trio", "zstandard", "cryptography", "blake3", "boto3", "pyfuse3", "rpfs")
CLI = Path(sys.executable).with_name("rpfs")   # the venv's console script
MiB = 1 << 20


@pytest.fixture
def planted(tmp_path) -> tuple[Path, Path]:
    """(the folder nobody owns, holding the planted modules; the root-only folder of their markers)."""
    if not CLI.exists():
        skip_or_fail_in_ci(f"no rpfs console script beside {sys.executable} (run tools/setup)")
    markers = tmp_path / "markers"
    markers.mkdir(mode=0o700)
    folder = tmp_path / "shared"
    folder.mkdir()
    nobody = pwd.getpwnam("nobody")
    for name in PLANTED:
        module = folder / f"{name}.py"
        module.write_text(f"open({str(markers / name)!r}, 'w').close()\n"
                          f"raise ImportError('the planted {name}.py was imported')\n")
        os.chown(module, nobody.pw_uid, nobody.pw_gid)
    os.chown(folder, nobody.pw_uid, nobody.pw_gid)
    folder.chmod(0o755)
    return folder, markers


def run_in(folder: Path, *args: str, store: Path | None = None) -> subprocess.CompletedProcess:
    """`rpfs ARGS` run from folder; it must succeed."""
    cmd = [str(CLI), *(["--store", str(store)] if store else []), *args]
    env = {k: v for k, v in os.environ.items() if k != "RPFS_STORE"}
    done = subprocess.run(cmd, cwd=folder, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"rpfs {' '.join(args)} failed ({done.returncode}): {done.stderr}"
    return done


def imported(markers: Path) -> list[str]:
    return sorted(os.listdir(markers))


def test_verify_mount_and_attach_from_a_planted_folder(planted, area):
    folder, markers = planted
    files = random_files(22, count=4)
    store = area / "store"
    rpfs("init", store=store)
    rpfs("backup", "vm", f"--disk=d={make_whole_disk_ext4(area / 'd.img', files)}", store=store)
    run_in(folder, "verify", store=store)        # its reads go through reader processes
    assert imported(markers) == []
    mnt, dest = area / "mnt", area / "dest"
    mnt.mkdir()
    run_in(folder, "mount", str(mnt), store=store)   # the daemon, then its readers
    try:
        run_in(folder, "attach", str(mnt / "vm" / "latest" / "d.img"), str(dest))
        try:
            assert read_tree(dest / "disk") == files
        finally:
            run_in(folder, "detach", str(dest))
    finally:
        if is_mounted(mnt):
            done = rpfs("umount", str(mnt), check=False)
            if done.returncode != 0:
                force_unmount(mnt)
    run_in(folder, "attach", "vm", str(dest), store=store)   # VM form: a store mount of its own
    try:
        assert read_tree(dest / "d" / "disk") == files
    finally:
        run_in(folder, "detach", str(dest))
    assert imported(markers) == []


def test_instant_restore_from_a_planted_folder(planted, area):
    folder, markers = planted
    disk = area / "d.img"
    disk.write_bytes(os.urandom(4 * MiB))
    store = area / "store"
    rpfs("init", store=store)
    rpfs("backup", "vm", f"--disk=d={disk}", store=store)
    target = area / "restored.img"
    try:
        job = json.loads(run_in(folder, "instant-restore", "vm", "--disk", "d", "--to", str(target), "--json",
                                store=store).stdout)
        assert Path(job["image"]).read_bytes() == disk.read_bytes()
    finally:
        rpfs("instant-stop", str(target), check=False)
    assert imported(markers) == []


def test_frozen_backup_from_a_planted_folder(planted, vm_on_xfs, tmp_path):  # noqa: F811
    folder, markers = planted
    store, disk, guest = vm_on_xfs
    cfg = config(tmp_path, f'[freeze]\nmountpoints = ["{guest}"]\nmax_seconds = 20\n')
    out = json.loads(run_in(folder, "backup", "web01", f"--disk=os={disk}", "--consistency-config", str(cfg),
                            "--json", store=store).stdout)   # the freeze watchdog is a Python process too
    assert out["recovery_point"]["consistency"] == "file-system"
    assert imported(markers) == []


def test_vault_push_and_mount_from_a_planted_folder(planted, vault_env, area):  # noqa: F811
    """Needs the Ceph gateway (tools/ceph): run under flock /tmp/rpfs-ceph.lock, as tests/test_vault.py."""
    folder, markers = planted
    store, disk = _vault_of_one_backup(vault_env, area, seed=7, push=False)
    run_in(folder, "vault", "push", "offsite", store=store)
    mnt = area / "mnt"
    mnt.mkdir()
    run_in(folder, "--vault", "offsite", "mount", str(mnt))   # a daemon reading from the vault
    try:
        assert (mnt / "web" / "latest" / "os.img").read_bytes() == disk.read_bytes()
    finally:
        if is_mounted(mnt):
            done = rpfs("umount", str(mnt), check=False)
            if done.returncode != 0:
                force_unmount(mnt)
    assert imported(markers) == []


def test_the_timer_runs_rpfs_isolated_from_its_folder(planted, tmp_path):
    folder, _ = planted
    store = tmp_path / "store"
    rpfs("init", store=store)
    units = run_in(folder, "schedule", "--print", store=store).stdout
    interpreter = CLI.read_text().splitlines()[0].removeprefix("#!")   # the console script's
    assert f"ExecStart={interpreter} -I -m rpfs --store {store} --key-file {os.environ['RPFS_KEY_FILE']} run\n" \
        in units
    assert "WorkingDirectory=/\n" in units

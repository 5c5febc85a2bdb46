"""The vault against a real Ceph RADOS Gateway on 127.0.0.1 (tools/ceph): push, list, restore, disaster
recovery, an interrupted push, damage and another format version."""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import pytest
from cli_helpers import REPO, rpfs
from conftest import skip_or_fail_in_ci

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="session")
def ceph():
    """The gateway's environment (endpoint, credentials); Ceph is started if it is not running, and then
    stopped again at the end of the session."""
    if os.geteuid() != 0:
        skip_or_fail_in_ci("the vault tests need root (they start Ceph)")
    tool = REPO / "tools" / "ceph"
    running = subprocess.run([tool, "status"], capture_output=True).returncode == 0
    if not running:
        started = subprocess.run([tool, "start"], capture_output=True, text=True, timeout=600)
        if started.returncode != 0:
            skip_or_fail_in_ci(f"tools/ceph start failed: {started.stderr[-2000:]}")
    lines = subprocess.run([tool, "env"], capture_output=True, text=True, check=True).stdout.splitlines()
    env = dict(line.removeprefix("export ").split("=", 1) for line in lines if line.startswith("export "))
    try:
        yield {k: v.strip('"') for k, v in env.items()}
    finally:
        if not running:
            subprocess.run([tool, "stop"], capture_output=True, timeout=120)


@pytest.fixture
def vault_env(ceph, tmp_path, monkeypatch):
    """A bucket of the test's own (emptied and removed afterwards) and a vault list in tmp_path."""
    for name, value in ceph.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("RPFS_CONFIG", str(tmp_path / "etc"))
    bucket = f"rpfs-test-{uuid.uuid4().hex[:12]}"
    try:
        yield {"endpoint": ceph["RPFS_S3_ENDPOINT"], "bucket": bucket}
    finally:
        remove_bucket(ceph["RPFS_S3_ENDPOINT"], bucket)


def remove_bucket(endpoint: str, bucket: str) -> None:
    """Empty a test's bucket and remove it (nothing if it is gone)."""
    s3 = _client(endpoint)
    try:
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            for item in page.get("Contents", []):
                s3.delete_object(Bucket=bucket, Key=item["Key"])
        s3.delete_bucket(Bucket=bucket)
    except s3.exceptions.NoSuchBucket:
        pass


def _client(endpoint: str):
    """A client of its own session: the credentials are read anew (boto3's default session keeps the first
    it read, so after tools/ceph rebuilt the cluster every later test failed on a key that no longer is)."""
    import boto3
    import botocore.config
    config = botocore.config.Config(s3={"addressing_style": "path"}, request_checksum_calculation="when_required",
                                    response_checksum_validation="when_required")
    return boto3.session.Session().client("s3", endpoint_url=endpoint, region_name="us-east-1", config=config)


def _objects(env: dict, prefix: str = "") -> dict[str, int]:
    s3 = _client(env["endpoint"])
    found = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=env["bucket"], Prefix=prefix):
        found.update({item["Key"]: item["Size"] for item in page.get("Contents", [])})
    return found


def _image(path: Path, seed: int, size_mib: int = 24) -> Path:
    """An image of random data with holes: 1 MiB of random bytes every other MiB."""
    import random
    rng = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size_mib << 20)
        for mib in range(0, size_mib, 2):
            f.seek(mib << 20)
            f.write(rng.randbytes(1 << 20))
    return path


def _change(path: Path, seed: int, mib: list[int]) -> None:
    import random
    rng = random.Random(seed)
    with open(path, "r+b") as f:
        for at in mib:
            f.seek(at << 20)
            f.write(rng.randbytes(1 << 20))


def _add(bucket: dict, store: Path | None = None, name: str = "offsite", *extra: str, **kwargs):
    return rpfs("vault", "add", name, "--endpoint", bucket["endpoint"], "--bucket", bucket["bucket"], *extra,
                store=store, **kwargs)


def _vault_of_one_backup(bucket: dict, tmp_path: Path, seed: int, push: bool = True, **image) -> tuple[Path, Path]:
    """A store with one backup of VM web (disk os: an image of seed), its vault `offsite`, pushed if push."""
    store, disk = tmp_path / "store", _image(tmp_path / "os.img", seed, **image)
    rpfs("init", store=store)
    rpfs("backup", "web", "--disk", f"os={disk}", store=store)
    _add(bucket, store)
    if push:
        rpfs("vault", "push", "offsite", store=store)
    return store, disk


@contextmanager
def _pushing(store: Path, *args: str):
    """`rpfs vault push offsite ARGS` running in the background; killed afterwards whatever happens."""
    env = {k: v for k, v in os.environ.items() if k != "RPFS_STORE"}
    process = subprocess.Popen([sys.executable, "-m", "rpfs", "--store", str(store), "vault", "push", "offsite",
                                *args], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        yield process
    finally:
        process.kill()
        process.wait()


def _wait_until(ready, process: subprocess.Popen, timeout: float = 60):
    """Poll ready() until it returns something true (returned); the push must still run meanwhile."""
    deadline = time.monotonic() + timeout
    while not (found := ready()):
        assert process.poll() is None, process.stderr.read()
        assert time.monotonic() < deadline, "the push made no progress"
        time.sleep(0.05)
    return found


def test_push_list_and_restore_from_the_vault_alone(vault_env, tmp_path):
    store, disk = tmp_path / "store", _image(tmp_path / "os.img", 1)
    rpfs("init", store=store)
    rpfs("backup", "web", "--disk", f"os={disk}", store=store)
    first_copy = disk.read_bytes()
    _add(vault_env, store)
    pushed = json.loads(rpfs("vault", "push", "offsite", "--json", store=store).stdout)
    assert len(pushed["pushed"]) == 1 and pushed["blobs"] == 12 and pushed["packs"] == 1

    _change(disk, 2, [0, 6])   # two stored blocks change: only they go up with the second point
    rpfs("backup", "web", "--disk", f"os={disk}", store=store)
    again = json.loads(rpfs("vault", "push", "offsite", "--json", store=store).stdout)
    assert len(again["pushed"]) == 1 and len(again["already"]) == 1
    assert again["blobs"] == 2 and again["pieces"] == 1
    newest = json.loads(rpfs("list", "web", "--json", store=store).stdout)[-1]
    new_stored = sum(d["new_stored_bytes"] for d in newest["disks"])
    assert new_stored <= again["uploaded_bytes"] <= new_stored * 1.1 + (64 << 10)

    listed = json.loads(rpfs("--vault", "offsite", "list", "--json", store=store).stdout)
    assert [p["where"] for p in listed] == ["both", "both"]
    local = json.loads(rpfs("list", "--json", store=store).stdout)
    assert [p["where"] for p in local] == ["local", "local"]

    # Nothing local is needed any more: no store at all, the vault and the key only.
    first, second = (p["id"] for p in listed)
    (store / "data.mdb").unlink()
    listed = json.loads(rpfs("--vault", "offsite", "list", "--json").stdout)
    assert [(p["id"], p["where"]) for p in listed] == [(first, "vault"), (second, "vault")]
    rpfs("--vault", "offsite", "restore", "web", first, "--disk", "os", "--to", str(tmp_path / "first.img"))
    rpfs("--vault", "offsite", "restore", "web", "--to", str(tmp_path / "latest"))
    assert (tmp_path / "first.img").read_bytes() == first_copy
    assert (tmp_path / "latest" / "os.img").read_bytes() == disk.read_bytes()
    assert os.stat(tmp_path / "first.img").st_blocks * 512 < 14 << 20   # holes stay holes


def test_disaster_recovery_on_a_new_machine_with_the_key_alone(vault_env, tmp_path, monkeypatch):
    store, disk = tmp_path / "store", _image(tmp_path / "os.img", 3)
    rpfs("init", store=store)
    rpfs("backup", "db", "--disk", f"os={disk}", store=store)
    _add(vault_env, store)
    rpfs("vault", "push", "offsite", store=store)
    key = Path(os.environ["RPFS_KEY_FILE"])

    monkeypatch.setenv("RPFS_CONFIG", str(tmp_path / "new-machine"))
    monkeypatch.delenv("RPFS_KEY_FILE")
    added = _add(vault_env).stdout
    assert "holding the vault of store id" in added
    no_key = rpfs("--vault", "offsite", "list", check=False)
    assert no_key.returncode == 1 and "give --key-file" in no_key.stderr and "Traceback" not in no_key.stderr
    wrong = tmp_path / "wrong.key"   # another store's key file
    rpfs("init", "--key-file", str(wrong), store=tmp_path / "other")
    refused = rpfs("--vault", "offsite", "--key-file", str(wrong), "list", check=False)
    assert refused.returncode == 1 and "opens no key slot" in refused.stderr
    rpfs("--vault", "offsite", "--key-file", str(key), "restore", "db", "--disk", "os", "--to",
         str(tmp_path / "back.img"))
    assert (tmp_path / "back.img").read_bytes() == disk.read_bytes()

    s3 = _client(vault_env["endpoint"])   # someone replaces the vault: refused, not read
    record = json.loads(s3.get_object(Bucket=vault_env["bucket"], Key="rpfs-vault.json")["Body"].read())
    s3.put_object(Bucket=vault_env["bucket"], Key="rpfs-vault.json",
                  Body=json.dumps({**record, "store_id": "00" * 16}).encode())
    replaced = rpfs("--vault", "offsite", "--key-file", str(key), "list", check=False)
    assert replaced.returncode == 1 and "now holds another vault" in replaced.stderr


def test_disaster_recovery_with_the_passphrase_or_the_recovery_private_key(vault_env, tmp_path, monkeypatch):
    """The key file is lost with the machine: the vault's copy of the key slots opens with the store's
    passphrase, or with the recovery private key kept offline."""
    private, public = tmp_path / "recovery.pem", tmp_path / "recovery.pub"
    subprocess.run(["openssl", "genpkey", "-algorithm", "X25519", "-out", str(private)], check=True)
    subprocess.run(["openssl", "pkey", "-in", str(private), "-pubout", "-out", str(public)], check=True)
    private.chmod(0o600)
    store, disk = tmp_path / "store", _image(tmp_path / "os.img", 18)
    rpfs("init", "--recovery-public-key", str(public), store=store)
    rpfs("key", "add", "--new-passphrase", store=store, env={**os.environ, "RPFS_NEW_PASSPHRASE": "pass phrase"})
    rpfs("backup", "db", "--disk", f"os={disk}", store=store)
    _add(vault_env, store)
    rpfs("vault", "push", "offsite", store=store)

    monkeypatch.setenv("RPFS_CONFIG", str(tmp_path / "new-machine"))
    monkeypatch.delenv("RPFS_KEY_FILE")
    _add(vault_env)
    with_passphrase = {**os.environ, "RPFS_PASSPHRASE": "pass phrase"}
    rpfs("--vault", "offsite", "restore", "db", "--disk", "os", "--to", str(tmp_path / "a.img"), env=with_passphrase)
    rpfs("--vault", "offsite", "--recovery-key", str(private), "restore", "db", "--disk", "os", "--to",
         str(tmp_path / "b.img"))
    assert (tmp_path / "a.img").read_bytes() == (tmp_path / "b.img").read_bytes() == disk.read_bytes()
    wrong = rpfs("--vault", "offsite", "list", check=False, env={**os.environ, "RPFS_PASSPHRASE": "wrong"})
    assert wrong.returncode == 1 and "wrong passphrase" in wrong.stderr and "Traceback" not in wrong.stderr

    s3 = _client(vault_env["endpoint"])   # someone edits keys.json to ask 16 GiB of scrypt: never tried
    slots = json.loads(s3.get_object(Bucket=vault_env["bucket"], Key="keys.json")["Body"].read())
    for slot in slots:
        if slot["kind"] == "passphrase":
            slot["kdf"]["n"] = 1 << 24
    s3.put_object(Bucket=vault_env["bucket"], Key="keys.json", Body=json.dumps(slots).encode())
    started = time.monotonic()
    heavy = rpfs("--vault", "offsite", "list", check=False, env=with_passphrase)
    assert time.monotonic() - started < 10 and heavy.returncode == 1 and heavy.stderr.count("\n") == 1
    assert "has no passphrase slot (damaged key slots, never tried: " in heavy.stderr, heavy.stderr
    rpfs("--vault", "offsite", "--recovery-key", str(private), "list")   # the other slot still opens it


def test_an_interrupted_push_leaves_no_point_and_the_next_one_resumes(vault_env, tmp_path):
    store, disk = _vault_of_one_backup(vault_env, tmp_path, 4, push=False, size_mib=48)
    with _pushing(store, "--limit-mbps", "8", "--pack-mib", "2") as pushing:
        _wait_until(lambda: len(_objects(vault_env, "index/")) >= 3, pushing)   # three packs whole and indexed
        pushing.send_signal(signal.SIGKILL)
    kept = _objects(vault_env, "packs/")
    assert not _objects(vault_env, "points/")   # no half point
    assert json.loads(rpfs("--vault", "offsite", "list", "--json", store=store).stdout)[0]["where"] == "local"

    resumed = json.loads(rpfs("vault", "push", "offsite", "--json", store=store).stdout)
    assert len(resumed["pushed"]) == 1 and resumed["blobs"] < 24
    after = _objects(vault_env, "packs/")
    assert all(after.get(name) == size for name, size in kept.items()), "a finished pack was changed"
    rpfs("--vault", "offsite", "restore", "web", "--disk", "os", "--to", str(tmp_path / "back.img"), store=store)
    assert (tmp_path / "back.img").read_bytes() == disk.read_bytes()


def test_a_damaged_pack_reads_as_an_error_never_as_wrong_bytes(vault_env, tmp_path):
    store, disk = _vault_of_one_backup(vault_env, tmp_path, 5)
    s3 = _client(vault_env["endpoint"])
    (pack,) = _objects(vault_env, "packs/")
    data = bytearray(s3.get_object(Bucket=vault_env["bucket"], Key=pack)["Body"].read())
    data[len(data) // 2] ^= 1
    s3.put_object(Bucket=vault_env["bucket"], Key=pack, Body=bytes(data))
    failed = rpfs("--vault", "offsite", "restore", "web", "--disk", "os", "--to", str(tmp_path / "back.img"),
                  check=False)
    assert failed.returncode == 3 and "Traceback" not in failed.stderr, failed.stderr
    assert not (tmp_path / "back.img").exists()


def test_another_format_version_and_a_bucket_without_a_vault_are_refused(vault_env, tmp_path):
    store = tmp_path / "store"
    rpfs("init", store=store)
    empty = _add(vault_env, check=False)   # no store given, and the bucket holds no vault
    assert empty.returncode == 1 and "the bucket does not exist" in empty.stderr
    _add(vault_env, store)
    assert _vault_version(vault_env) == 2   # a store of format 6: blobs with keys of their own go up
    s3 = _client(vault_env["endpoint"])
    record = json.loads(s3.get_object(Bucket=vault_env["bucket"], Key="rpfs-vault.json")["Body"].read())
    s3.put_object(Bucket=vault_env["bucket"], Key="rpfs-vault.json",
                  Body=json.dumps({**record, "format_version": 99}).encode())
    refused = rpfs("--vault", "offsite", "list", check=False)
    assert refused.returncode == 1 and "vault format version 99" in refused.stderr
    assert "matching rpfs release" in refused.stderr


def _vault_version(env: dict) -> int:
    s3 = _client(env["endpoint"])
    return json.loads(s3.get_object(Bucket=env["bucket"], Key="rpfs-vault.json")["Body"].read())["format_version"]


def test_a_vault_of_version_1_is_read_raised_by_a_push_of_blobs_with_keys_of_their_own_and_refused_by_its_release(
        vault_env, tmp_path):
    """The last release of store format 5 makes a store and its vault (version 1); this rpfs reads that vault,
    and its first push from the store (now format 6) raises the vault to 2 before any blob sealed under a
    key of its own goes up; both kinds of blob read back from the vault alone, whole and by frames; that
    release then refuses the vault with its one line."""
    from cli_helpers import FORMAT_5_RELEASE, previous_release, previous_rpfs, session_keys

    from rpfs.store.blob import FLAG_BLOCK_KEY, read_header
    from rpfs.vault.named import open_vault
    from rpfs.vault.vault import BLOB
    old = previous_release(tmp_path, FORMAT_5_RELEASE)
    store, disk = tmp_path / "store", _image(tmp_path / "os.img", 5)
    previous_rpfs(old, store, "init", keep_key=True)
    previous_rpfs(old, store, "backup", "web", "--disk", f"os={disk}", keep_key=True)
    copies = [disk.read_bytes()]
    previous_rpfs(old, store, "vault", "add", "offsite", "--endpoint", vault_env["endpoint"], "--bucket",
                  vault_env["bucket"], keep_key=True)
    previous_rpfs(old, store, "vault", "push", "offsite", keep_key=True)
    assert _vault_version(vault_env) == 1
    assert len(json.loads(rpfs("--vault", "offsite", "list", "--json").stdout)) == 1
    assert _vault_version(vault_env) == 1   # reading changes nothing

    _change(disk, 6, [0, 6])
    copies.append(disk.read_bytes())
    rpfs("backup", "web", "--no-catalog", "--disk", f"os={disk}", store=store)   # the store is marked format 7
    rpfs("vault", "push", "offsite", store=store)
    assert _vault_version(vault_env) == 2   # (3 once a catalog goes up: tests/test_vault_catalog.py)
    (store / "data.mdb").unlink()   # from the vault alone from here on
    flags = []
    with open_vault("offsite", session_keys()) as vault:
        for point, want in zip(vault.points("web"), copies):
            block_map = vault.block_map(vault.map_key("web", point.id, "os"))
            for n in range(0, len(block_map) // 32):
                digest = block_map[n * 32:(n + 1) * 32]
                if digest == bytes(32):
                    continue
                where = vault.index()[(BLOB, digest)]
                flags.append(read_header(vault._read_pack(where.pack, where.offset, 16)).flags)
                for start, stop in ((0, 1 << 20), (4096, 8192), (200000, 300000)):   # whole, then by frames
                    got = vault.get_blob(digest, lambda blob: vault.codec.read(digest, blob, 1 << 20, start, stop),
                                         part=None if (start, stop) == (0, 1 << 20) else (start, stop))
                    assert got == want[(n << 20) + start:(n << 20) + stop]
    assert flags.count(1) == 12 + 10 and flags.count(1 | FLAG_BLOCK_KEY) == 2   # the second point's two new blocks
    rpfs("--vault", "offsite", "restore", "web", "--disk", "os", "--to", str(tmp_path / "latest.img"))
    assert (tmp_path / "latest.img").read_bytes() == copies[1]
    env = {k: v for k, v in os.environ.items() if k != "RPFS_STORE"}
    refused = subprocess.run([sys.executable, "-m", "rpfs", "--vault", "offsite", "list"], cwd=old, capture_output=True,
                             text=True, env={**env, "PYTHONPATH": str(old)})
    assert refused.returncode == 1 and "vault format version 2; this rpfs reads version 1" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr


def test_an_unencrypted_store_gets_no_vault_and_mistakes_are_one_line(vault_env, tmp_path):
    store = tmp_path / "store"
    rpfs("init", "--encryption", "none", store=store, env={k: v for k, v in os.environ.items()
                                                             if k != "RPFS_KEY_FILE"})
    plain = _add(vault_env, store, check=False, env={k: v for k, v in os.environ.items() if k != "RPFS_KEY_FILE"})
    assert plain.returncode == 1 and "only ever holds encrypted data" in plain.stderr
    unknown = rpfs("--vault", "nowhere", "list", check=False)
    assert unknown.returncode == 1 and "unknown vault 'nowhere'" in unknown.stderr
    other = rpfs("--vault", "nowhere", "gc", check=False)
    assert other.returncode == 1 and "does not read from a vault" in other.stderr
    bad = rpfs("vault", "add", "x", "--endpoint", "ftp://here", "--bucket", "b", check=False)
    assert bad.returncode == 1 and "not an http(s) URL" in bad.stderr


def test_mount_and_attach_from_the_vault_alone(vault_env, area):
    """File-level restore with no local store: the vault mounted, its image attached, a file copied out."""
    from cli_helpers import force_unmount, is_mounted
    from diskimages import mkfs_ext4
    store, disk = area / "store", area / "os.img"
    disk.write_bytes(b"")
    os.truncate(disk, 64 << 20)
    mkfs_ext4(disk, {"etc/hostname": b"web01\n", "srv/index.html": os.urandom(3 << 20)})
    rpfs("init", store=store)
    rpfs("backup", "web", "--disk", f"os={disk}", store=store)
    _add(vault_env, store)
    rpfs("vault", "push", "offsite", store=store)
    (store / "data.mdb").unlink()

    mountpoint, dest = area / "mnt", area / "files"
    mountpoint.mkdir()
    rpfs("--vault", "offsite", "mount", str(mountpoint))
    try:
        image = mountpoint / "web" / "latest" / "os.img"
        assert image.read_bytes() == disk.read_bytes()
        rpfs("attach", str(image), str(dest))
        try:
            assert (dest / "disk" / "etc" / "hostname").read_bytes() == b"web01\n"
        finally:
            rpfs("detach", str(dest))
    finally:
        if is_mounted(mountpoint) and rpfs("umount", str(mountpoint), check=False).returncode != 0:
            force_unmount(mountpoint)
    attached = json.loads(rpfs("--vault", "offsite", "attach", "web", str(dest), "--json").stdout)   # the whole VM
    try:
        assert [d["disk"] for d in attached["disks"]] == ["os"]
        assert (dest / "os" / "disk" / "srv" / "index.html").stat().st_size == 3 << 20
    finally:
        rpfs("detach", str(dest))


def test_random_reads_through_the_vault_mount_fetch_frames_and_a_damaged_frame_fails_alone(vault_env, area):
    """A random 4 KiB read fetches only the frames it needs (blob.Cut by ranged GETs); a frame damaged in its
    pack is EIO for its range, while the rest of its block still reads right."""
    from cli_helpers import force_unmount, is_mounted, session_keys
    from rpfs.vault.named import open_vault
    from rpfs.vault.vault import BLOB
    store, disk = _vault_of_one_backup(vault_env, area, 16)
    with open_vault("offsite", session_keys()) as vault:
        point = vault.point("web")
        where = vault.index()[(BLOB, vault.block_digest(vault.map_key("web", point.id, "os"), 0))]
    s3 = _client(vault_env["endpoint"])
    key = f"packs/{where.pack}"
    data = bytearray(s3.get_object(Bucket=vault_env["bucket"], Key=key)["Body"].read())
    data[where.offset + where.length - 10] ^= 1   # in the last 64 KiB frame of block 0
    s3.put_object(Bucket=vault_env["bucket"], Key=key, Body=bytes(data))
    want = disk.read_bytes()

    mountpoint = area / "mnt"
    mountpoint.mkdir()
    rpfs("--vault", "offsite", "mount", str(mountpoint))
    try:
        fd = os.open(mountpoint / "web" / "latest" / "os.img", os.O_RDONLY)
        try:
            for offset in (8 << 20, 2 << 20, 8192, (6 << 20) + 70000):   # random reads, block 0's included
                assert os.pread(fd, 4096, offset) == want[offset:offset + 4096]
            with pytest.raises(OSError) as failed:
                os.pread(fd, 4096, (1 << 20) - 4096)
            assert failed.value.errno == errno.EIO
            assert os.pread(fd, 4096, 4096) == want[4096:8192]   # block 0 but its last frame: still right
        finally:
            os.close(fd)
    finally:
        if is_mounted(mountpoint) and rpfs("umount", str(mountpoint), check=False).returncode != 0:
            force_unmount(mountpoint)


def test_a_vault_opened_again_fetches_only_indexes_it_has_not_seen(vault_env, tmp_path):
    """Index objects are kept locally (sealed; opened each time): a second open GETs none, a damaged copy is
    fetched again, and the copy of an index gc removed is forgotten."""
    from cli_helpers import session_keys
    from rpfs.vault.config import vault_config
    from rpfs.vault.index_cache import IndexCache
    from rpfs.vault.named import open_vault
    store, disk = _vault_of_one_backup(vault_env, tmp_path, 17, push=False)
    rpfs("vault", "push", "offsite", "--pack-mib", "2", store=store)
    packs = len(_objects(vault_env, "index/"))
    assert packs >= 5

    def index_gets() -> tuple[int, dict]:
        with open_vault("offsite", session_keys()) as vault:
            fetched, get = [], vault.bucket.get
            vault.bucket.get = lambda name, *a: (fetched.append(name), get(name, *a))[1]
            index = vault.index()
            return sum(1 for name in fetched if name.startswith("index/")), index
    first = index_gets()
    assert first[0] == 0   # the push kept a copy of each index it wrote
    folder = IndexCache(vault_config("offsite")).folder
    copies = sorted(folder.iterdir())
    assert len(copies) == packs
    damaged = bytearray(copies[0].read_bytes())
    damaged[-1] ^= 1
    copies[0].write_bytes(damaged)   # fails authentication: fetched again
    again = index_gets()
    assert again == (1, first[1])
    rpfs("vault", "remove", "offsite")
    assert not folder.exists()


def test_instant_restore_from_the_vault_alone_keeps_its_point_until_copied(vault_env, area):
    """A writable image at once with no local store; written while it copies; the point pruned meanwhile and
    gc run twice: its hold keeps every pack; once whole, the hold goes and gc frees the packs."""
    store, disk = _vault_of_one_backup(vault_env, area, 15)
    (store / "data.mdb").unlink()
    expected, written = bytearray(disk.read_bytes()), b"written while it copies"
    expected[5 << 20:(5 << 20) + len(written)] = written
    target = area / "back.img"
    job = json.loads(rpfs("--vault", "offsite", "instant-restore", "web", "--disk", "os", "--to", str(target),
                          "--copy-mbps", "2", "--json").stdout)
    try:
        assert job["vault"] == "offsite" and len(_objects(vault_env, "holds/")) == 1
        with open(job["image"], "r+b") as image:
            image.seek(5 << 20)
            image.write(written)
            image.flush()
            os.fsync(image.fileno())
        [point] = _objects(vault_env, "points/")
        _client(vault_env["endpoint"]).delete_object(Bucket=vault_env["bucket"], Key=point)   # as a prune does
        assert _gc()["condemned_packs"] == 0 and _gc()["deleted_packs"] == 0
        done = json.loads(rpfs("instant-wait", str(target), "--json").stdout)
        assert done["state"] == "complete" and target.read_bytes() == bytes(expected)
        assert not _objects(vault_env, "holds/")   # released once whole
    finally:
        rpfs("instant-stop", str(target), check=False)
    assert _gc()["condemned_packs"] == 1 and _gc()["deleted_packs"] == 1


def test_a_hold_left_by_a_start_killed_before_its_state_file_is_discarded_by_name(vault_env, area):
    """instant-restore takes its vault hold, then writes the target's state: killed in between, only the
    hold is left. Found from the target and --vault alone."""
    from rpfs.host.run_dir import instant_files
    from rpfs.vault.vault import hold_object
    _vault_of_one_backup(vault_env, area, 16)
    target = area / "never.img"
    held = hold_object(instant_files(target)[0].stem)
    _client(vault_env["endpoint"]).put_object(Bucket=vault_env["bucket"], Key=held, Body=b"{}")
    refused = rpfs("instant-stop", "--discard", str(target), check=False)
    assert refused.returncode == 1 and "no instant restore into" in refused.stderr
    done = json.loads(rpfs("--vault", "offsite", "instant-stop", "--discard", str(target), "--json").stdout)
    assert done["removed"] == ["its hold in vault offsite"] and not _objects(vault_env, "holds/")
    again = rpfs("--vault", "offsite", "instant-stop", "--discard", str(target), check=False)
    assert again.returncode == 1 and "no instant restore into" in again.stderr


def _gc(vault: str = "offsite") -> dict:
    return json.loads(rpfs("vault", "gc", vault, "--json").stdout)


def test_gc_removes_what_no_manifest_needs_in_two_runs(vault_env, tmp_path):
    store, disk = _vault_of_one_backup(vault_env, tmp_path, 6)
    old_packs = set(_objects(vault_env, "packs/"))
    _change(disk, 7, list(range(0, 24, 2)))   # every stored block changes
    rpfs("backup", "web", "--disk", f"os={disk}", store=store)
    rpfs("vault", "push", "offsite", store=store)
    first = sorted(k for k in _objects(vault_env, "points/"))[0]
    _client(vault_env["endpoint"]).delete_object(Bucket=vault_env["bucket"], Key=first)   # as a vault prune does

    assert _gc()["condemned_packs"] == 1
    assert set(_objects(vault_env, "packs/")) >= old_packs   # only condemned: its index is gone
    second = _gc()
    assert second["deleted_packs"] == 1 and second["rescued_packs"] == 0
    assert not old_packs & set(_objects(vault_env, "packs/"))
    assert _gc()["condemned_packs"] == 0
    rpfs("--vault", "offsite", "restore", "web", "--disk", "os", "--to", str(tmp_path / "back.img"))
    assert (tmp_path / "back.img").read_bytes() == disk.read_bytes()


def test_gc_repacks_a_pack_whose_needed_blocks_take_less_than_half_of_it(vault_env, tmp_path):
    """10 of the first point's 12 blocks change, then it is pruned: its pack holds 2 needed blocks. gc copies
    them into a new pack (indexed first), condemns the old one, and the next run deletes it."""
    store, disk = _vault_of_one_backup(vault_env, tmp_path, 19)
    (old_pack,) = _objects(vault_env, "packs/")
    _change(disk, 20, list(range(0, 20, 2)))
    rpfs("backup", "web", "--disk", f"os={disk}", store=store)
    rpfs("vault", "push", "offsite", store=store)
    first = sorted(_objects(vault_env, "points/"))[0]
    _client(vault_env["endpoint"]).delete_object(Bucket=vault_env["bucket"], Key=first)   # as a vault prune does

    ran = _gc()
    assert ran["repacked_packs"] == 1 and ran["condemned_packs"] == 1
    assert (2 << 20) < ran["repacked_bytes"] < (3 << 20)   # the 2 blocks still needed (random data: 1 MiB each)
    rpfs("--vault", "offsite", "restore", "web", "--disk", "os", "--to", str(tmp_path / "between.img"))
    assert (tmp_path / "between.img").read_bytes() == disk.read_bytes()
    assert _gc()["deleted_packs"] == 1 and old_pack not in _objects(vault_env, "packs/")
    again = _gc()
    assert again["repacked_packs"] == again["condemned_packs"] == 0   # the new pack is full: left alone
    rpfs("--vault", "offsite", "verify")
    rpfs("--vault", "offsite", "restore", "web", "--disk", "os", "--to", str(tmp_path / "back.img"))
    assert (tmp_path / "back.img").read_bytes() == disk.read_bytes()


def test_gc_while_a_push_runs_never_removes_what_the_push_needs(vault_env, tmp_path):
    """The push relies on packs no manifest needs when gc looks (their point was pruned): an unchanged disk's
    blobs and block map piece, in packs of their own. gc condemns them, waits for the push, then finds the
    new manifest needing them and keeps every one."""
    store, disk = tmp_path / "store", _image(tmp_path / "os.img", 8, size_mib=48)
    data = _image(tmp_path / "data.img", 12, size_mib=12)
    disks = ["--disk", f"os={disk}", "--disk", f"data={data}"]
    rpfs("init", store=store)
    rpfs("backup", "web", *disks, store=store)
    _add(vault_env, store)
    rpfs("vault", "push", "offsite", "--pack-mib", "1", store=store)
    s3 = _client(vault_env["endpoint"])
    for name in _objects(vault_env, "points/"):
        s3.delete_object(Bucket=vault_env["bucket"], Key=name)   # pruned: no manifest needs any pack now
    assert not _objects(vault_env, "points/")
    _change(disk, 9, [0, 2, 4, 6, 8, 10, 12, 14])
    rpfs("backup", "web", *disks, store=store)   # data unchanged: its piece and blobs are in the old packs
    newest = json.loads(rpfs("list", "--json", store=store).stdout)[-1]["id"]
    indexes = len(_objects(vault_env, "index/"))
    with _pushing(store, "web", newest, "--limit-mbps", "1", "--pack-mib", "1") as pushing:
        _wait_until(lambda: len(_objects(vault_env, "index/")) > indexes, pushing)   # the push is under way
        condemned = _gc()
        assert condemned["condemned_packs"] >= 3   # the old packs and the push's first, unneeded so far
        waiting = _gc()
        assert waiting["deleted_packs"] == 0 and any("push" in w for w in waiting["waiting_for"])
        _out, err = pushing.communicate(timeout=120)
        assert pushing.returncode == 0, err
    finished = _gc()
    # kept: the 16 unchanged blocks of os, the 6 of data, the old pieces, the push's first pack; deleted: the
    # 8 blocks the new point replaced (one per pack, as --pack-mib 1 made them)
    assert finished["rescued_packs"] >= 23 and finished["deleted_packs"] == 8, finished
    assert not json.loads(rpfs("--vault", "offsite", "verify", "--json").stdout)["damaged"]
    rpfs("--vault", "offsite", "restore", "web", "--to", str(tmp_path / "back"))
    assert (tmp_path / "back" / "os.img").read_bytes() == disk.read_bytes()
    assert (tmp_path / "back" / "data.img").read_bytes() == data.read_bytes()


def test_a_push_a_gc_took_for_dead_writes_no_manifest(vault_env, tmp_path):
    store, disk = _vault_of_one_backup(vault_env, tmp_path, 13, push=False)
    with _pushing(store, "--limit-mbps", "2", "--pack-mib", "1") as pushing:
        (lock,) = _wait_until(lambda: _objects(vault_env, "locks/"), pushing)
        _client(vault_env["endpoint"]).put_object(Bucket=vault_env["bucket"], Key="dead/" + lock, Body=b"")
        _out, err = pushing.communicate(timeout=120)
    assert pushing.returncode == 1 and "took this push for a dead one" in err and "Traceback" not in err, err
    assert not _objects(vault_env, "points/") and not _objects(vault_env, "locks/")


def test_verify_from_the_vault_names_the_damaged_point(vault_env, tmp_path):
    store, disk = _vault_of_one_backup(vault_env, tmp_path, 10)
    clean = json.loads(rpfs("--vault", "offsite", "verify", "--json").stdout)
    assert clean["checked_blocks"] == 12 and not clean["damaged"]
    s3 = _client(vault_env["endpoint"])
    (pack,) = _objects(vault_env, "packs/")
    data = bytearray(s3.get_object(Bucket=vault_env["bucket"], Key=pack)["Body"].read())
    data[100] ^= 1   # inside the first blob
    s3.put_object(Bucket=vault_env["bucket"], Key=pack, Body=bytes(data))
    damaged = rpfs("--vault", "offsite", "verify", check=False)
    assert damaged.returncode == 4 and "DAMAGED web/" in damaged.stdout, damaged.stdout + damaged.stderr


def test_a_policy_pushes_each_backup_and_the_vault_keeps_its_own_count(vault_env, tmp_path):
    """Two tiers, two retentions: the store keeps the last 3, the vault the last 1; `run` pushes, prunes both
    and starts the vault's gc; what the vault pruned is never pushed again."""
    store, disk = tmp_path / "store", _image(tmp_path / "os.img", 11)
    rpfs("init", store=store)
    _add(vault_env, store)
    rpfs("policy", "create", "hourly", "--every-hours", "1", "--keep-last", "3", "--vault", "offsite",
         "--vault-keep-last", "1", store=store)
    shown = rpfs("policy", "show", "hourly", store=store).stdout
    assert "vault offsite keeps last 1" in shown
    rpfs("protect", "web", "--policy", "hourly", "--disk", f"os={disk}", store=store)
    ran = json.loads(rpfs("run", "--stagger-seconds", "0", "--json", store=store).stdout)   # due: never backed up
    assert ran["backed_up"] == ["web"] and not ran["push_failed"] and len(ran["pushed"]["web"]) == 1
    for round_ in range(2):   # more points, pushed by hand (the policy's next slot is an hour away)
        time.sleep(1.1)       # one point per second at most
        _change(disk, 20 + round_, [2 * round_])
        rpfs("backup", "web", "--disk", f"os={disk}", store=store)
        rpfs("vault", "push", "offsite", store=store)
    ids = [p["id"] for p in json.loads(rpfs("list", "--json", store=store).stdout)]
    ran = json.loads(rpfs("run", "--stagger-seconds", "0", "--json", store=store).stdout)   # not due: prunes
    assert ran["not_due"] == ["web"] and ran["vault_pruned"] == {"offsite/web": ids[:2]}
    listed = json.loads(rpfs("--vault", "offsite", "list", "--json", store=store).stdout)
    assert [(p["id"], p["where"]) for p in listed] == [(ids[0], "local"), (ids[1], "local"), (ids[2], "both")]
    again = json.loads(rpfs("vault", "push", "offsite", "--json", store=store).stdout)
    assert again["pushed"] == [] and len(again["already"]) == 3   # the vault pruned them: not sent again
    jobs = json.loads(rpfs("jobs", "--json", store=store).stdout)["jobs"]
    assert sum(1 for j in jobs if j["kind"] == "push" and j["status"] == "succeeded") == 4
    assert any(j["kind"] == "gc" for j in jobs)   # the vault's, started by the vault prune
    rpfs("--vault", "offsite", "restore", "web", ids[2], "--disk", "os", "--to", str(tmp_path / "back.img"))
    assert (tmp_path / "back.img").read_bytes() == disk.read_bytes()


def test_the_gateway_stopped_in_the_middle_of_a_push(vault_env, tmp_path):
    """One clear line, nothing half-visible; once the gateway is back the push resumes and finishes."""
    store, disk = _vault_of_one_backup(vault_env, tmp_path, 14, push=False)
    tool = REPO / "tools" / "ceph"
    try:
        with _pushing(store, "--limit-mbps", "2", "--pack-mib", "1") as pushing:
            _wait_until(lambda: len(_objects(vault_env, "index/")) >= 2, pushing)
            subprocess.run([tool, "stop"], check=True, capture_output=True, timeout=120)
            _out, err = pushing.communicate(timeout=180)
    finally:
        restarted = subprocess.run([tool, "start"], capture_output=True, text=True, timeout=300)
    assert restarted.returncode == 0 and "new, empty" not in restarted.stderr, restarted.stderr
    lines = err.strip().splitlines()
    assert pushing.returncode == 1 and len(lines) == 1 and lines[0].startswith("rpfs: vault offsite"), err
    assert "127.0.0.1:7480" in err and "Traceback" not in err
    assert not _objects(vault_env, "points/")
    resumed = json.loads(rpfs("vault", "push", "offsite", "--json", store=store).stdout)
    assert len(resumed["pushed"]) == 1 and resumed["blobs"] < 12
    rpfs("--vault", "offsite", "restore", "web", "--disk", "os", "--to", str(tmp_path / "back.img"))
    assert (tmp_path / "back.img").read_bytes() == disk.read_bytes()


def test_a_push_of_several_points_uploads_each_shared_block_once(vault_env, tmp_path):
    """Four backups of a 64 MiB disk (32 MiB of data, 1 MiB changed between them), then one push: within
    10% of what the store holds goes up, not a near copy of the disk per point."""
    store, disk = _vault_of_one_backup(vault_env, tmp_path, 30, push=False, size_mib=64)
    for n, mib in enumerate([2, 10, 20]):
        _change(disk, 31 + n, [mib])
        rpfs("backup", "web", "--disk", f"os={disk}", store=store)
    pushed = json.loads(rpfs("vault", "push", "offsite", "--json", store=store).stdout)
    stored = sum(d["new_stored_bytes"] for p in json.loads(rpfs("list", "--json", store=store).stdout)
                 for d in p["disks"])
    assert len(pushed["pushed"]) == 4 and pushed["blobs"] == 32 + 3
    assert stored <= pushed["uploaded_bytes"] <= stored * 1.1, (pushed, stored)
    for point in json.loads(rpfs("--vault", "offsite", "list", "--json").stdout)[::3]:
        rpfs("--vault", "offsite", "restore", "web", point["id"], "--disk", "os", "--to", str(tmp_path / point["id"]))
    assert (tmp_path / point["id"]).read_bytes() == disk.read_bytes()


def _slot_of(store: Path, key_file: Path) -> str:
    return next(s["id"] for s in json.loads(rpfs("key", "list", "--json", store=store).stdout)
                if s["note"] == str(key_file))


def test_a_removed_key_stops_opening_the_vault_at_once_or_at_the_next_push(vault_env, tmp_path):
    store, _disk = _vault_of_one_backup(vault_env, tmp_path, 32)
    second, third = tmp_path / "second.key", tmp_path / "third.key"
    rpfs("key", "add", "--new-key-file", str(second), store=store)
    rpfs("key", "add", "--new-key-file", str(third), store=store)
    assert rpfs("--vault", "offsite", "--key-file", str(second), "list", "--json").returncode == 0

    removed = rpfs("key", "remove", _slot_of(store, second), store=store)
    assert "vault offsite: its key slots updated" in removed.stdout
    refused = rpfs("--vault", "offsite", "--key-file", str(second), "list", check=False)
    assert refused.returncode == 1 and "opens no key slot" in refused.stderr

    listed = Path(os.environ["RPFS_CONFIG"]) / "vaults.json"   # the vault cannot be reached for a while
    reachable = listed.read_text()
    listed.write_text(reachable.replace(vault_env["endpoint"], "http://127.0.0.1:9"))
    unreached = rpfs("key", "remove", _slot_of(store, third), store=store)
    assert "vault offsite was not updated" in unreached.stderr and "Traceback" not in unreached.stderr
    fourth = tmp_path / "fourth.key"   # a key the vault has never seen
    rpfs("key", "add", "--new-key-file", str(fourth), store=store)
    config = json.loads(listed.read_text())["offsite"]
    listed.write_text(json.dumps({"offsite": {**json.loads(reachable)["offsite"], "keys_behind": config["keys_behind"]}}))
    behind = rpfs("--vault", "offsite", "--key-file", str(third), "list")
    assert "holds key slots older than its store's" in behind.stderr
    # the next command that reaches it sends the slots first, even given a key the vault lacks
    rpfs("--key-file", str(fourth), "vault", "push", "offsite", store=store)
    assert rpfs("--vault", "offsite", "--key-file", str(fourth), "list").returncode == 0
    refused = rpfs("--vault", "offsite", "--key-file", str(third), "list", check=False)
    assert refused.returncode == 1 and "opens no key slot" in refused.stderr
    assert not json.loads(listed.read_text())["offsite"]["keys_behind"]


def test_a_vault_forged_for_the_recovery_public_key_is_told_by_its_fingerprint(vault_env, tmp_path, monkeypatch):
    """Someone who can write the bucket wraps a master key of their own for the (public) recovery key and
    copies the store id: the recovery private key opens their vault, but its fingerprint is not the store's;
    copying the store's key check as well makes the fingerprint match and the vault no longer open."""
    from rpfs.store.crypto import Keyring
    from rpfs.store.key_slots import NewSlot, read_public_key
    from rpfs.store.store import key_settings
    private, public = tmp_path / "recovery.pem", tmp_path / "recovery.pub"
    subprocess.run(["openssl", "genpkey", "-algorithm", "X25519", "-out", str(private)], check=True)
    subprocess.run(["openssl", "pkey", "-in", str(private), "-pubout", "-out", str(public)], check=True)
    private.chmod(0o600)
    store, disk = tmp_path / "store", _image(tmp_path / "os.img", 33)
    fingerprint = rpfs("init", "--recovery-public-key", str(public), store=store).stdout \
        .split("store fingerprint: ")[1].split()[0]
    rpfs("backup", "db", "--disk", f"os={disk}", store=store)
    _add(vault_env, store)
    rpfs("vault", "push", "offsite", store=store)

    s3, bucket = _client(vault_env["endpoint"]), vault_env["bucket"]
    genuine = {name: s3.get_object(Bucket=bucket, Key=name)["Body"].read() for name in ("rpfs-vault.json", "keys.json")}
    record = json.loads(genuine["rpfs-vault.json"])
    store_id, master = bytes.fromhex(record["store_id"]), os.urandom(32)
    forged_slot = NewSlot("recovery", read_public_key(public)).make("1", master, store_id)
    own_check = Keyring(master, store_id).check(key_settings(record)).hex()
    s3.put_object(Bucket=bucket, Key="keys.json", Body=json.dumps([json.loads(forged_slot.to_json())]).encode())
    s3.put_object(Bucket=bucket, Key="rpfs-vault.json", Body=json.dumps({**record, "key_check": own_check}).encode())

    monkeypatch.setenv("RPFS_CONFIG", str(tmp_path / "new-machine"))
    monkeypatch.delenv("RPFS_KEY_FILE")
    shown = _add(vault_env).stdout
    assert "store fingerprint" in shown and fingerprint not in shown   # shown, and not the store's
    rpfs("vault", "remove", "offsite")
    refused = _add(vault_env, None, "offsite", "--fingerprint", fingerprint.lower().replace("-", " "), check=False)
    assert refused.returncode == 1 and "it is not the vault of your store" in refused.stderr
    pasted = _add(vault_env, None, "offsite", "--fingerprint", fingerprint.replace("-", "\u2013"), check=False)
    assert pasted.returncode == 1 and "Traceback" not in pasted.stderr   # en dashes from a document
    assert not json.loads(rpfs("vault", "list", "--json").stdout)

    s3.put_object(Bucket=bucket, Key="rpfs-vault.json", Body=genuine["rpfs-vault.json"])   # the store's check copied
    rpfs("vault", "add", "offsite", "--endpoint", vault_env["endpoint"], "--bucket", bucket, "--fingerprint",
         fingerprint)
    forged = rpfs("--vault", "offsite", "--recovery-key", str(private), "list", check=False)
    assert forged.returncode == 1 and "key check were changed" in forged.stderr

    s3.put_object(Bucket=bucket, Key="keys.json", Body=genuine["keys.json"])   # the real vault opens
    listed = json.loads(rpfs("--vault", "offsite", "--recovery-key", str(private), "list", "--json").stdout)
    assert [p["vm"] for p in listed] == ["db"]


def test_a_store_switched_to_unencrypted_is_refused_by_its_vault_record(vault_env, tmp_path):
    import lmdb
    store, disk = _vault_of_one_backup(vault_env, tmp_path, 34)
    env = lmdb.open(str(store), max_dbs=16)
    with env.begin(write=True) as txn:
        meta = env.open_db(b"meta", txn=txn)
        txn.put(b"encryption", b"none", db=meta)
        txn.put(b"block_id", b"blake3", db=meta)
        txn.delete(b"key_check", db=meta)
        txn.drop(env.open_db(b"keys", txn=txn), delete=False)
    env.close()
    no_key = {k: v for k, v in os.environ.items() if k != "RPFS_KEY_FILE"}
    refused = rpfs("vault", "push", "offsite", store=store, check=False, env=no_key)
    assert refused.returncode == 1 and "this machine opened it encrypted before" in refused.stderr
    (Path(os.environ["RPFS_CONFIG"]) / "encrypted-stores.json").unlink()   # say, the store moved: the vault tells
    for args in (("vault", "push", "offsite"), ("backup", "new", "--disk", f"os={disk}")):
        refused = rpfs(*args, store=store, check=False, env=no_key)
        assert refused.returncode == 1 and "vault offsite recorded it as encrypted" in refused.stderr, refused.stderr


def test_crafted_vault_records_are_one_line_and_change_nothing(vault_env, tmp_path):
    """An unsealed gc record (as someone who may write but not delete would plant to make gc delete a
    needed pack's index, or as an older rpfs left it) deletes nothing: the sealed indexes it keeps are put
    back, then it goes. A sealed one that does not open stops gc. JSON nested too deeply is "damaged"."""
    store, disk = _vault_of_one_backup(vault_env, tmp_path, 35)
    s3, bucket = _client(vault_env["endpoint"]), vault_env["bucket"]
    indexes = _objects(vault_env, "index/")
    ((index_name, _size),) = indexes.items()
    pack = index_name.split("/")[1]
    sealed_index = s3.get_object(Bucket=bucket, Key=index_name)["Body"].read()
    s3.delete_object(Bucket=bucket, Key=index_name)   # as an older gc left it: index hidden, record unsealed
    legacy = {"packs": {pack: __import__("base64").b64encode(sealed_index).decode()}, "locks": []}
    s3.put_object(Bucket=bucket, Key="gc/condemned", Body=json.dumps(legacy).encode())
    assert _gc()["deleted_packs"] == 0
    assert _objects(vault_env, "index/") == indexes and f"packs/{pack}" in _objects(vault_env, "packs/")
    assert "gc/condemned" not in _objects(vault_env, "gc/")
    s3.put_object(Bucket=bucket, Key="gc/condemned", Body=b"\0" * 64)
    refused = rpfs("vault", "gc", "offsite", check=False)
    assert refused.returncode == 1 and "gc/condemned is damaged" in refused.stderr and "Traceback" not in refused.stderr
    s3.delete_object(Bucket=bucket, Key="gc/condemned")
    rpfs("--vault", "offsite", "restore", "web", "--disk", "os", "--to", str(tmp_path / "back.img"))
    assert (tmp_path / "back.img").read_bytes() == disk.read_bytes()

    wrong = _add(vault_env, store, "elsewhere", "--prefix", "elsewhere", "--fingerprint", "AAAA-" * 5 + "AAAA",
                 check=False)
    assert wrong.returncode == 1 and "has the fingerprint" in wrong.stderr and not _objects(vault_env, "elsewhere/")
    record = json.loads(s3.get_object(Bucket=bucket, Key="rpfs-vault.json")["Body"].read())
    s3.put_object(Bucket=bucket, Key="rpfs-vault.json",
                  Body=json.dumps({k: v for k, v in record.items() if k != "store_id"}).encode())
    done = rpfs("--vault", "offsite", "list", check=False)
    assert done.returncode == 1 and "not an rpfs vault's" in done.stderr and "Traceback" not in done.stderr
    s3.put_object(Bucket=bucket, Key="rpfs-vault.json", Body=json.dumps(record).encode())
    for name, expected in (("keys.json", "are missing or damaged"), ("rpfs-vault.json", "not an rpfs vault's")):
        kept = s3.get_object(Bucket=bucket, Key=name)["Body"].read()
        s3.put_object(Bucket=bucket, Key=name, Body=b"[" * 100000)
        done = rpfs("--vault", "offsite", "list", check=False)
        assert done.returncode == 1 and expected in done.stderr and "Traceback" not in done.stderr, done.stderr
        s3.put_object(Bucket=bucket, Key=name, Body=kept)

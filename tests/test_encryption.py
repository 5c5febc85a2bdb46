"""Encryption at rest (format 3): nothing readable without a key, anything changed detected, keys that can be
changed, removed and recovered without rewriting data, and version 2 stores still read and written."""
import os
import subprocess
from pathlib import Path

import pytest
from cli_helpers import open_store, previous_release, previous_rpfs, rpfs, session_keys
from test_backup import corrupt_one_block, read_all, write_image

from rpfs.errors import CorruptBlockError
from rpfs.store.key_slots import KeyChoice
from rpfs.store.store import FORMAT_VERSION, Store

MiB = 1 << 20
SECRET = b"correct-horse-battery-staple-7f3a9c"
PASSPHRASE = "a long enough passphrase"


def one_line_error(done: subprocess.CompletedProcess, expected: str) -> None:
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and expected in done.stderr, done.stderr


def env_with(**values) -> dict:
    """The tests' environment without the session key (or with other values)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RPFS_KEY_FILE", "RPFS_PASSPHRASE", "RPFS_STORE")}
    env.update(values)
    return env


def disk_with_secret(path: Path) -> Path:
    """Random data with the secret in plain sight, once in a random block and once among zeros."""
    data = bytearray(os.urandom(3 * MiB)) + bytearray(MiB)
    data[123456:123456 + len(SECRET)] = SECRET
    data[3 * MiB + 4096:3 * MiB + 4096 + len(SECRET)] = SECRET
    path.write_bytes(bytes(data))
    return path


def store_bytes(store: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(store.iterdir()) if p.is_file())


def test_a_secret_on_a_disk_is_in_no_byte_of_an_encrypted_store(tmp_path):
    disk = disk_with_secret(tmp_path / "d.img")
    rpfs("init", store=tmp_path / "enc")
    rpfs("init", "--encryption", "none", store=tmp_path / "plain", env=env_with())
    for store in ("enc", "plain"):
        rpfs("backup", "vm", f"--disk=d={disk}", store=tmp_path / store, env=None if store == "enc" else env_with())
    assert SECRET in store_bytes(tmp_path / "plain")      # the search finds what is there
    assert SECRET not in store_bytes(tmp_path / "enc")
    assert b"vm" in store_bytes(tmp_path / "enc")         # VM names stay readable (docs/manual/encryption.md says so)
    info = rpfs("info", "--json", store=tmp_path / "enc", env=env_with()).stdout   # no key needed
    assert '"encryption": "aes-256-gcm"' in info and '"format_version": 7' in info
    assert '"encryption": "none"' in rpfs("info", "--json", store=tmp_path / "plain", env=env_with()).stdout
    with open_store(tmp_path / "enc", readonly=True) as store:
        assert read_all(store, store.point("vm"), "d") == disk.read_bytes()


def test_without_the_right_key_every_command_says_so_in_one_line(tmp_path):
    store = tmp_path / "s"
    rpfs("init", store=store, env=env_with(RPFS_PASSPHRASE=PASSPHRASE))
    one_line_error(rpfs("list", store=store, check=False, env=env_with()), "is encrypted: give --key-file")
    one_line_error(rpfs("list", store=store, check=False, env=env_with(RPFS_PASSPHRASE="not the passphrase")),
                   "wrong passphrase")
    rpfs("list", store=store, env=env_with(RPFS_PASSPHRASE=PASSPHRASE))
    other = tmp_path / "other-key"
    rpfs("init", "--key-file", str(other), store=tmp_path / "other")
    one_line_error(rpfs("--key-file", str(other), "list", store=store, check=False, env=env_with()),
                   "opens no key slot")
    other.chmod(0o644)
    one_line_error(rpfs("list", "--key-file", str(other), store=tmp_path / "other", check=False, env=env_with()),
                   "has mode 0644, so others may read it")
    one_line_error(rpfs("init", store=tmp_path / "x", check=False, env=env_with(), stdin=subprocess.DEVNULL),
                   "give --key-file PATH (made if missing)")
    assert not (tmp_path / "x" / "data.mdb").exists()


def test_a_flipped_byte_of_a_sealed_block_is_an_error_and_verify_names_the_point(tmp_path):
    disk = write_image(tmp_path / "d.img", 3, 4 * MiB)
    store = tmp_path / "s"
    rpfs("init", store=store)
    rpfs("backup", "vm", f"--disk=d={disk}", store=store)
    with open_store(store) as s:
        point = s.point("vm")
        corrupt_one_block(s, point, "d")
        with pytest.raises(CorruptBlockError, match="fails authentication"):
            read_all(s, point, "d")
    done = rpfs("verify", store=store, check=False)
    assert done.returncode == 4 and f"vm/{point.id}" in done.stdout + done.stderr, done   # 4: damage found


def test_a_changed_block_map_or_a_moved_record_is_detected(tmp_path):
    disk = write_image(tmp_path / "d.img", 4, 4 * MiB)
    store = tmp_path / "s"
    rpfs("init", store=store)
    rpfs("backup", "vm", f"--disk=d={disk}", store=store)
    rpfs("backup", "vm2", f"--disk=d={write_image(tmp_path / 'e.img', 5, 2 * MiB)}", store=store)
    with open_store(store) as s:   # (each read below in a new handle: a handle keeps what it checked)
        point, other = s.point("vm"), s.point("vm2")
        key, other_key = s.map_key("vm", point.id, "d"), s.map_key("vm2", other.id, "d")
        with s.read() as txn:   # vm2's index put where vm's was: it does not open there
            index, other_index = (bytes(txn.get(k, db=s.db("maps"))) for k in (key, other_key))
            piece_id = s.codec.block_id(s.map_piece(key, 0))   # vm's map is one piece, named by no other
            piece = bytearray(txn.get(piece_id, db=s.db("pieces")))
        s.write(lambda txn: txn.put(key, other_index, db=s.db("maps")))
    with open_store(store) as s:
        with pytest.raises(CorruptBlockError, match=f"block map index of vm/{point.id}/d fails authentication"):
            read_all(s, point, "d")
        s.write(lambda txn: txn.put(key, index, db=s.db("maps")))
    with open_store(store) as s:
        assert read_all(s, point, "d") == disk.read_bytes()
        piece[-1] ^= 1                          # one bit of the sealed piece
        s.write(lambda txn: txn.put(piece_id, bytes(piece), db=s.db("pieces")))
    with open_store(store) as s, pytest.raises(CorruptBlockError, match="a piece of the block map of vm/.* fails auth"):
        read_all(s, point, "d")
    done = rpfs("check", store=store, check=False)
    assert done.returncode == 4 and "a piece of the block map of vm" in done.stdout, done
    assert "fails authentication" in done.stdout and "repaired" not in rpfs("check", "--repair", store=store,
                                                                             check=False).stdout
    with open_store(store) as s:
        # vm2's record put where vm's was: it does not open there
        with s.read() as txn:
            moved = bytes(txn.get(s.point_key("vm2", other.id), db=s.db("points")))
        s.write(lambda txn: txn.put(s.point_key("vm", point.id), moved, db=s.db("points")))
        with pytest.raises(CorruptBlockError, match="fails authentication"):
            s.point("vm", point.id)
    done = rpfs("verify", "vm2", store=store, check=False)
    assert done.returncode == 0, done.stderr


def test_keys_change_and_go_and_the_recovery_key_brings_back_a_lost_key_file(tmp_path):
    disk = write_image(tmp_path / "d.img", 6, 5 * MiB)
    key_file, store = tmp_path / "key", tmp_path / "s"
    private, public = tmp_path / "recovery.pem", tmp_path / "recovery.pub"
    subprocess.run(["openssl", "genpkey", "-algorithm", "X25519", "-out", str(private)], check=True)
    subprocess.run(["openssl", "pkey", "-in", str(private), "-pubout", "-out", str(public)], check=True)
    private.chmod(0o600)
    env = env_with(RPFS_KEY_FILE=str(key_file))
    rpfs("init", "--recovery-public-key", str(public), store=store, env=env)
    assert oct(key_file.stat().st_mode & 0o777) == "0o600"
    rpfs("backup", "vm", f"--disk=d={disk}", store=store, env=env)
    rpfs("key", "add", "--new-passphrase", store=store, env={**env, "RPFS_NEW_PASSPHRASE": PASSPHRASE})
    with_passphrase = env_with(RPFS_PASSPHRASE=PASSPHRASE)
    rpfs("key", "passwd", store=store, env={**with_passphrase, "RPFS_NEW_PASSPHRASE": PASSPHRASE + "!"})
    one_line_error(rpfs("list", store=store, check=False, env=with_passphrase), "wrong passphrase")
    rpfs("list", store=store, env=env_with(RPFS_PASSPHRASE=PASSPHRASE + "!"))
    slots = {s["kind"]: s["id"] for s in __import__("json").loads(rpfs("key", "list", "--json", store=store).stdout)}
    assert set(slots) == {"key-file", "passphrase", "recovery"}

    blocks_before = (store / "data.mdb").read_bytes().count(b"RPB1")
    key_file.unlink()                                                    # the key file is lost
    one_line_error(rpfs("list", store=store, check=False, env=env), "key file")
    new_key = tmp_path / "new-key"
    rpfs("key", "recover", "--private-key", str(private), "--new-key-file", str(new_key), store=store, env=env_with())
    rpfs("key", "remove", slots["key-file"], store=store, env=env_with(RPFS_KEY_FILE=str(new_key)))
    rpfs("key", "remove", slots["passphrase"], store=store, env=env_with(RPFS_KEY_FILE=str(new_key)))
    assert (store / "data.mdb").read_bytes().count(b"RPB1") == blocks_before   # no block rewritten
    restored = tmp_path / "restored.img"
    rpfs("restore", "vm", "--disk", "d", "--to", str(restored), store=store, env=env_with(RPFS_KEY_FILE=str(new_key)))
    assert restored.read_bytes() == disk.read_bytes()


def test_the_paper_key_types_back_in_and_the_last_slot_stays(tmp_path):
    store = tmp_path / "s"
    rpfs("init", store=store)
    paper = rpfs("key", "export", "--paper", store=store).stdout
    assert "rpfs master key of store" in paper
    key_lines = [line for line in paper.splitlines()
                 if line and line.split()[0].isupper() and len(line.split()[0]) == 4]
    typed = "\n".join(line.lower().replace("o", "0") for line in key_lines)   # lower case, O typed as 0
    new_key = tmp_path / "k2"
    done = rpfs("key", "recover", "--paper", "-", "--new-key-file", str(new_key), store=store, env=env_with(),
                input=typed)
    assert "added key slot 2" in done.stdout
    again = rpfs("key", "add", "--new-key-file", str(new_key), store=store)   # the same again: nothing to do
    assert "already opens key slot 2" in again.stdout
    wrong = typed[:-1] + ("A" if typed[-1] != "a" else "B")
    one_line_error(rpfs("key", "recover", "--paper", "-", "--new-passphrase", store=store, check=False,
                        env=env_with(RPFS_NEW_PASSPHRASE=PASSPHRASE), input=wrong), "checksum does not match")
    rpfs("key", "remove", "1", store=store, env=env_with(RPFS_KEY_FILE=str(new_key)))
    one_line_error(rpfs("key", "remove", "2", store=store, check=False, env=env_with(RPFS_KEY_FILE=str(new_key))),
                   "is the last key slot")


def test_a_version_2_store_made_by_the_previous_release_is_read_then_upgraded(tmp_path):
    """The release before format 3 makes the store; this one reads it as it is, then a backup upgrades it
    to format 3 (block maps in pieces; sha256 ids and no encryption kept) and says what it is."""
    old = previous_release(tmp_path)
    a, b = write_image(tmp_path / "a.img", 7, 3 * MiB), write_image(tmp_path / "b.img", 8, 3 * MiB)
    store = tmp_path / "s"
    previous_rpfs(old, store, "init")
    previous_rpfs(old, store, "backup", "vm", f"--disk=d={a}")
    assert "format version  2" in rpfs("info", store=store, env=env_with()).stdout
    rpfs("list", store=store, env=env_with())                        # read as it is
    assert "format version  2" in rpfs("info", store=store, env=env_with()).stdout
    rpfs("backup", "vm", f"--disk=d={b}", store=store, env=env_with())
    info = rpfs("info", store=store, env=env_with()).stdout
    assert f"format version  {FORMAT_VERSION}" in info and "encryption      none" in info
    assert "block id        sha256" in info
    with Store.open(store, readonly=True) as s:
        first, second = s.points("vm")
        assert read_all(s, first, "d") == a.read_bytes() and read_all(s, second, "d") == b.read_bytes()
    assert rpfs("check", store=store, env=env_with()).returncode == 0


def test_a_killed_init_is_finished_by_the_same_init(tmp_path):
    """LMDB's file may exist before init's one transaction commits: the same init then makes the store."""
    store = tmp_path / "s"
    env_made = Store.init(tmp_path / "s")   # a whole store, made then emptied of its meta below
    env_made.close()
    import lmdb
    env = lmdb.open(str(store), max_dbs=16)
    with env.begin(write=True) as txn:
        txn.drop(env.open_db(b"meta", txn=txn), delete=True)
    env.close()
    rpfs("init", store=store)
    with Store.open(store, keys=session_keys()) as s:
        assert s.encrypted and s.format_version == FORMAT_VERSION
    one_line_error(rpfs("init", store=store, check=False), "already holds a store")
    with pytest.raises(Exception, match="is encrypted"):
        Store.open(store, keys=KeyChoice())


def test_the_timer_of_an_encrypted_store_runs_with_its_key_file(tmp_path):
    store = tmp_path / "s"
    rpfs("init", store=store)
    units = rpfs("schedule", "--print", store=store).stdout
    assert f"--key-file {os.environ['RPFS_KEY_FILE']} run" in units
    one_line_error(rpfs("schedule", "--print", store=store, check=False, env=env_with(RPFS_PASSPHRASE=PASSPHRASE)),
                   "a timer cannot type a passphrase")


def test_a_store_switched_to_unencrypted_or_given_other_settings_is_not_opened(tmp_path):
    """Its meta is not sealed, so it is checked: changed settings must never make new backups plaintext."""
    import lmdb
    store = tmp_path / "s"
    rpfs("init", store=store)

    def set_meta(**values) -> None:
        env = lmdb.open(str(store), max_dbs=16)
        with env.begin(write=True) as txn:
            meta = env.open_db(b"meta", txn=txn)
            for name, value in values.items():
                txn.put(name.encode(), value.encode(), db=meta)
        env.close()
    set_meta(block_id="blake3")
    one_line_error(rpfs("list", store=store, check=False), "settings (encryption, block ids, block size)")
    set_meta(block_id="blake3-keyed", encryption="none")
    one_line_error(rpfs("backup", "vm", f"--disk=d={write_image(tmp_path / 'd.img', 1, MiB)}", store=store,
                        check=False), "says it is not encrypted, but it has key slots")
    plain = tmp_path / "plain"
    rpfs("init", "--encryption", "none", store=plain, env=env_with())
    one_line_error(rpfs("--key-file", os.environ["RPFS_KEY_FILE"], "list", store=plain, check=False),
                   "says it is not encrypted, but a key was given")


def test_a_key_given_in_any_way_to_a_store_switched_to_unencrypted_is_refused(tmp_path):
    """Whoever can write the store's files switches it to "unencrypted" whole (no key check, no slots): a
    key given by option, environment variable or passphrase is refused, so nothing is written in the clear."""
    import lmdb
    store, disk = tmp_path / "s", disk_with_secret(tmp_path / "d.img")
    rpfs("init", store=store, env=env_with(RPFS_PASSPHRASE=PASSPHRASE, RPFS_KEY_FILE=os.environ["RPFS_KEY_FILE"]))
    env = lmdb.open(str(store), max_dbs=16)
    with env.begin(write=True) as txn:
        meta, keys = env.open_db(b"meta", txn=txn), env.open_db(b"keys", txn=txn)
        txn.put(b"encryption", b"none", db=meta)
        txn.put(b"block_id", b"blake3", db=meta)
        txn.delete(b"key_check", db=meta)
        txn.drop(keys, delete=False)
    env.close()
    backup = ("backup", "new", f"--disk=d={disk}")
    one_line_error(rpfs("--key-file", os.environ["RPFS_KEY_FILE"], *backup, store=store, check=False),
                   "says it is not encrypted, but a key was given")
    one_line_error(rpfs(*backup, store=store, check=False), "says it is not encrypted, but a key was given")
    one_line_error(rpfs(*backup, store=store, check=False, env=env_with(RPFS_PASSPHRASE=PASSPHRASE)),
                   "says it is not encrypted, but a key was given")
    one_line_error(rpfs(*backup, store=store, check=False, env=env_with()),   # no key: nothing asked either
                   "this machine opened it encrypted before")
    assert SECRET not in store_bytes(store)
    one_line_error(rpfs("init", "--encryption", "none", store=tmp_path / "p", check=False),
                   "--encryption none makes a store without a key, but a key was given")


def test_the_store_fingerprint_is_shown_where_it_must_be_kept_and_read_back(tmp_path):
    """init, info, the paper key and a new recovery slot show the same fingerprint; the paper still reads."""
    store = tmp_path / "s"
    made = rpfs("init", store=store).stdout
    fingerprint = made.split("store fingerprint: ")[1].split()[0]
    assert len(fingerprint) == 29 and fingerprint.count("-") == 5
    info = __import__("json").loads(rpfs("info", "--json", store=store, env=env_with()).stdout)
    assert info["store_fingerprint"] == fingerprint
    page = rpfs("key", "export", "--paper", store=store).stdout
    assert f"Store fingerprint: {fingerprint}" in page
    written_down = page + f"\n{fingerprint}\n"   # the fingerprint on a line of its own is no part of the key
    rpfs("key", "recover", "--paper", "-", "--new-key-file", str(tmp_path / "k"), store=store, env=env_with(),
         input=written_down)
    private, public = tmp_path / "recovery.pem", tmp_path / "recovery.pub"
    subprocess.run(["openssl", "genpkey", "-algorithm", "X25519", "-out", str(private)], check=True)
    subprocess.run(["openssl", "pkey", "-in", str(private), "-pubout", "-out", str(public)], check=True)
    added = rpfs("key", "add", "--recovery-public-key", str(public), store=store).stdout
    assert f"store fingerprint: {fingerprint}" in added
    other = tmp_path / "other"
    assert fingerprint not in rpfs("init", store=other).stdout


def test_a_key_slot_of_deeply_nested_json_is_a_damaged_slot(tmp_path):
    store = tmp_path / "s"
    rpfs("init", store=store, env=env_with(RPFS_PASSPHRASE=PASSPHRASE))
    with Store.open(store, keys=KeyChoice(passphrase=lambda: PASSPHRASE.encode())) as s:
        from rpfs.store.key_slots import NewSlot
        s.add_key_slot(NewSlot("key-file", os.urandom(32)))
        s.write(lambda txn: txn.put(b"2", b"[" * 100000, db=s.db("keys")))
    info = rpfs("info", "--json", store=store, env=env_with())
    assert '"damaged_key_slots"' in info.stdout and "Traceback" not in info.stderr


def test_slots_are_never_overwritten_or_reused_and_a_damaged_one_locks_nobody_out(tmp_path):
    store = tmp_path / "s"
    rpfs("init", store=store, env=env_with(RPFS_PASSPHRASE=PASSPHRASE))     # slot 1: passphrase
    keys = KeyChoice(passphrase=lambda: PASSPHRASE.encode())
    with Store.open(store, keys=keys) as s:
        from rpfs.store.key_slots import NewSlot
        second, added = s.add_key_slot(NewSlot("key-file", os.urandom(32)))
        third, _ = s.add_key_slot(NewSlot("key-file", os.urandom(32)))
        assert added and (second.id, third.id) == ("2", "3")
        s.remove_key_slot("3")
        assert s.add_key_slot(NewSlot("key-file", os.urandom(32)))[0].id == "4"   # 3 is never given again
        passphrase_slot = s.key_lock().of_kind("passphrase")[0]
        s.add_key_slot(NewSlot("passphrase", b"changed meanwhile"), replacing=passphrase_slot)
        with pytest.raises(Exception, match="changed or went meanwhile"):   # a second passwd from the old slot
            s.add_key_slot(NewSlot("passphrase", b"lost update"), replacing=passphrase_slot)
        s.write(lambda txn: txn.put(b"2", b"{damaged", db=s.db("keys")))
    with Store.open(store, keys=KeyChoice(passphrase=lambda: b"changed meanwhile")) as s:
        assert s.key_lock().damaged == ["2"]
    assert '"damaged_key_slots"' in rpfs("info", "--json", store=store, env=env_with()).stdout



def test_a_slot_asking_more_scrypt_work_than_rpfs_makes_is_damaged_and_never_tried(tmp_path):
    """Anyone who can edit the keys could make every unlock take gigabytes and minutes: the KDF parameters
    are read before any key is checked, so only what rpfs writes (or at most twice its work) is tried."""
    import json
    import shutil
    import time

    import lmdb
    made = tmp_path / "made"
    rpfs("init", store=made, env=env_with(RPFS_PASSPHRASE=PASSPHRASE))     # slot 1: passphrase
    key_file = tmp_path / "k.key"
    rpfs("key", "add", "--new-key-file", str(key_file), store=made, env=env_with(RPFS_PASSPHRASE=PASSPHRASE))
    for n in (1 << 19, 1 << 24):   # 512 MiB (what an earlier guard let through), 16 GiB
        store = tmp_path / f"n{n}"
        shutil.copytree(made, store)
        env = lmdb.open(str(store), max_dbs=16)
        with env.begin(write=True) as txn:
            keys = env.open_db(b"keys", txn=txn, create=False)
            slot = json.loads(txn.get(b"1", db=keys))
            slot["kdf"]["n"] = n
            txn.put(b"1", json.dumps(slot, sort_keys=True).encode(), db=keys)
        env.close()
        info = json.loads(rpfs("info", "--json", store=store, env=env_with()).stdout)
        assert info["damaged_key_slots"] == ["1"] and [s["kind"] for s in info["key_slots"]] == ["key-file"]
        started = time.monotonic()
        done = rpfs("list", store=store, env=env_with(RPFS_PASSPHRASE=PASSPHRASE), check=False)
        assert time.monotonic() - started < 10   # scrypt of 512 MiB alone takes seconds; of 16 GiB, minutes
        one_line_error(done, f"store {store} has no passphrase slot (damaged key slots, never tried: 1;")
        rpfs("list", store=store, env=env_with(RPFS_KEY_FILE=str(key_file)))   # the other slot opens it


def test_the_paper_key_reads_back_from_the_whole_page_in_any_case(tmp_path):
    store = tmp_path / "s"
    rpfs("init", store=store)
    page = rpfs("key", "export", "--paper", store=store).stdout
    typed = "\n".join("   " + line.lower() for line in page.splitlines())
    done = rpfs("key", "recover", "--paper", "-", "--new-key-file", str(tmp_path / "k"), store=store,
                env=env_with(), input=typed)
    assert "added key slot" in done.stdout


def test_no_process_rpfs_starts_inherits_the_passphrase(tmp_path, kernel):

    store = tmp_path / "s"
    env = env_with(RPFS_PASSPHRASE=PASSPHRASE)
    rpfs("init", store=store, env=env)
    rpfs("backup", "vm", f"--disk=d={write_image(tmp_path / 'd.img', 2, 2 * MiB)}", store=store, env=env)
    (tmp_path / "m").mkdir()
    done = rpfs("mount", str(tmp_path / "m"), "--json", store=store, env=env)
    try:
        pid = __import__("json").loads(done.stdout)["pid"]
        environ = Path(f"/proc/{pid}/environ").read_bytes()
        assert b"RPFS_PASSPHRASE" not in environ and PASSPHRASE.encode() not in environ
        assert PASSPHRASE.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()
    finally:
        rpfs("umount", str(tmp_path / "m"), check=False)


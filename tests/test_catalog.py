"""Catalogs of the files inside the disks: find, ls, diff, catalog; their counts through prune.

Real images (ext4 whole disk, GPT with ext4 and xfs, a swap partition), real attaches; the query logic
also against an in-memory reader of listings (kernel-free).
"""
from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

import pytest
from cli_helpers import open_store, rpfs
from diskimages import make_mixed_image, make_partitioned_image, make_whole_disk_ext4, mounted_rw

from rpfs.catalog.query import compile_name_pattern, compile_pattern, diff, find, split_fs_path
from rpfs.errors import CorruptBlockError, RpfsError
from rpfs.store.catalogs import CATALOGED, Catalog, CatalogedFilesystem, Entry, decode_listing, encode_listing

MiB = 1 << 20
pytestmark = pytest.mark.timeout(300)


# ------------------------------------------------------------------ kernel-free: format and queries

def test_a_listing_round_trips_any_name_exactly():
    odd = os.fsdecode(b"caf\xe9\nname\x1b[31m")   # not UTF-8, a newline, an escape sequence
    entries = [Entry(odd, "f", 3, 0o4755, 1000, 100, 123456789, ""), Entry("a", "l", 0, 0o777, 0, 0, 1, "/etc"),
               Entry("d", "d", 0, 0o700, 0, 0, 2, folder=bytes(range(32)))]
    raw = encode_listing(entries)
    assert decode_listing(raw, "x") == sorted(entries, key=lambda e: e.name)
    assert os.fsencode(decode_listing(raw, "x")[1].name) == b"caf\xe9\nname\x1b[31m"
    assert encode_listing(list(reversed(entries))) == raw   # canonical: the id does not depend on order
    with pytest.raises(CorruptBlockError):
        decode_listing(raw[:-3], "x")


def test_the_walk_reaches_folders_deeper_than_path_max_and_follows_no_link(tmp_path):
    import hashlib

    from rpfs.catalog.build import walk
    fd = os.open(tmp_path, os.O_RDONLY)
    for depth in range(40):   # 40 folders of 200-byte names: paths of 8,000 bytes
        name = f"d{depth:02d}" + "x" * 197
        os.mkdir(name, dir_fd=fd)
        os.close(os.open("f", os.O_CREAT | os.O_WRONLY, 0o600, dir_fd=fd))
        next_fd = os.open(name, os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd = next_fd
    os.symlink("/etc", "up", dir_fd=fd)   # never followed
    os.close(fd)
    root, made = walk(str(tmp_path), lambda raw: hashlib.sha256(raw).digest())
    assert (made.files, made.folders, len(made.listings)) == (41, 40, 41)
    deepest = [decode_listing(raw, "x") for raw in made.listings.values() if b'"up"' in raw][0]
    assert [(e.name, e.kind, e.target) for e in deepest] == [("up", "l", "/etc")]


class Listings:
    """An in-memory catalog reader: trees built from nested dicts (a name -> bytes is a file)."""

    def __init__(self):
        self.listings: dict[bytes, bytes] = {}
        self.catalogs: dict[tuple[str, str], Catalog] = {}
        self.reads = 0

    def tree(self, content: dict) -> bytes:
        entries = []
        for name, value in content.items():
            if isinstance(value, dict):
                entries.append(Entry(name, "d", 0, 0o755, 0, 0, 0, folder=self.tree(value)))
            else:
                entries.append(Entry(name, "f", len(value), 0o644, 0, 0, hash(value) & 0xFFFF))
        raw = encode_listing(entries)
        listing_id = __import__("hashlib").sha256(raw).digest()
        self.listings[listing_id] = raw
        return listing_id

    def add(self, vm: str, point_id: str, content: dict) -> Catalog:
        fs = CatalogedFilesystem("os", "p1", 1, "ext4", CATALOGED, self.tree(content).hex())
        self.catalogs[vm, point_id] = catalog = Catalog(vm, point_id, "now", [fs])
        return catalog

    def catalog(self, vm, point_id):
        return self.catalogs.get((vm, point_id))

    def listing(self, listing_id, where):
        return decode_listing(self.listing_bytes(listing_id, where), where)

    def listing_bytes(self, listing_id, where):
        self.reads += 1
        return self.listings[listing_id]


def test_find_groups_versions_and_reads_each_folder_once():
    reader = Listings()
    etc = {"nginx": {"nginx.conf": b"v1"}, "hosts": b"h"}
    points = []
    for n in range(50):
        tree = {"etc": etc, "var": {"log": {f"log{n}": b"x" * n}}}   # /var changes in every point
        if n == 30:
            etc = {"nginx": {"nginx.conf": b"v2-longer"}, "hosts": b"h"}
            tree["etc"] = etc
        reader.add("web", f"p{n:02d}", tree)
        points.append(("web", f"p{n:02d}"))
    reader.reads = 0
    answer = find(reader, "nginx.conf", points)
    [found] = answer.found
    assert found.path == "/etc/nginx/nginx.conf" and found.filesystem == "os/p1"
    assert [len(v.point_ids) for v in found.versions] == [30, 20]
    assert [v.entry.size for v in found.versions] == [2, 9]
    assert reader.reads == 3 * 50 + 4   # each point's root, /var and /var/log; /etc and /etc/nginx twice
    assert [f.path for f in find(reader, "/etc/**", points[:1]).found] == ["/etc/hosts", "/etc/nginx",
                                                                          "/etc/nginx/nginx.conf"]
    assert find(reader, "nope", points).found == []
    reader.catalogs.pop(("web", "p00"))
    assert [u.point_id for u in find(reader, "hosts", points).uncataloged] == ["p00"]


def test_patterns_work_as_restic_and_borg_globs():
    def matches(pattern, path):
        return bool(compile_pattern(pattern)[0].fullmatch(path))
    assert matches("nginx.conf", "/etc/nginx/nginx.conf") and not matches("nginx.conf", "/etc/nginx.conf.d")
    assert matches("*.conf", "/a/b.conf") and not matches("/*.conf", "/a/b.conf")
    assert matches("/var/mail/alice/**", "/var/mail/alice/cur/1") and not matches("/var/mail/alice/**", "/var/mail/bob/1")
    assert matches("nginx/*.conf", "/etc/nginx/x.conf") and not matches("nginx/*.conf", "/etc/nginx/a/x.conf")
    assert split_fs_path("os/p1:/etc/x") == ("os/p1", "/etc/x") and split_fs_path("/etc//x/") == (None, "/etc/x")
    paths = ["/a", "/a.conf", "/etc/a.conf", "/x/nginx.conf", "/x/nginx.confx", "/a\nb/c?d*", "/e/a*b.c", "/.x"]
    for pattern in ("nginx.conf", "*.conf", "a*", "?", "*", "c?d*", "a\\*b.*", ".*"):
        by_name = compile_name_pattern(pattern)   # find's shortcut: the name alone decides
        assert [by_name.fullmatch(p.rsplit("/", 1)[1]) is not None for p in paths] == \
            [matches(pattern, p) for p in paths], pattern
    assert compile_name_pattern("a/b") is None and compile_name_pattern("a**") is None
    for bad in ("etc/x", "/etc/../x"):
        with pytest.raises(RpfsError):
            split_fs_path(bad)


def test_diff_names_exactly_what_changed_and_skips_same_folders():
    reader = Listings()
    old = reader.add("web", "a", {"etc": {"same": {"f": b"1"}, "gone": b"g", "changed": b"1", "moved": b"m"}})
    new = reader.add("web", "b", {"etc": {"same": {"f": b"1"}, "added": b"a", "changed": b"22", "renamed": b"m"}})
    changes = [(c.kind, c.path) for c in diff(reader, old, new)]
    assert changes == [("+", "/etc/added"), ("M", "/etc/changed"), ("-", "/etc/gone"), ("-", "/etc/moved"),
                       ("+", "/etc/renamed")]
    assert diff(reader, old, old) == []


# ------------------------------------------------------------------ real images, the commands

def _files(n: int) -> dict[str, bytes]:
    return {"etc/nginx/nginx.conf": b"worker_processes 1;\n", "etc/hosts": b"127.0.0.1 localhost\n",
            "var/www/index.html": b"<h1>hi</h1>\n" * n, "home/alice/notes.txt": b"notes\n",
            "var/mail/alice/1": b"mail one\n", "var/mail/alice/2": b"mail two\n"}


def _json(*args, store) -> dict:
    return json.loads(rpfs(*args, "--json", store=store).stdout)


def test_find_ls_diff_across_points_of_ext4_and_xfs(area, store_path):
    store = store_path
    disk = make_partitioned_image(area / "os.img", [("ext4", _files(1)), ("xfs", {"data/db.sqlite": b"db" * 100})])
    first = _json("backup", "web01", f"--disk=os={disk}", store=store)
    assert first["catalog"]["filesystems"][0]["status"] == "cataloged"
    ids = [first["point_id"]]
    # change, add, remove and rename files in p1 (through a loop mount at its offset)
    _edit_partition(disk, area / "edit", {"etc/nginx/nginx.conf": b"worker_processes 4;\n", "etc/new.conf": b"n\n"},
                    remove=["home/alice/notes.txt"], rename=("var/mail/alice/1", "var/mail/alice/1.old"))
    ids.append(_json("backup", "web01", f"--disk=os={disk}", store=store)["point_id"])
    third = _json("backup", "web01", f"--disk=os={disk}", store=store)   # nothing changed
    ids.append(third["point_id"])
    assert third["catalog"]["reused_disks"] == ["os"] and third["catalog"]["new_listing_bytes"] == 0

    found = _json("find", "nginx.conf", "web01", store=store)["found"]
    assert [(f["filesystem"], f["path"]) for f in found] == [("os/p1", "/etc/nginx/nginx.conf")]
    assert [v["points"] for v in found[0]["versions"]] == [ids[:1], ids[1:]]
    assert [v["size"] for v in found[0]["versions"]] == [20, 20]
    named = _json("find", "nginx.conf", "web01", "--disk", "os", "--partition", "1", store=store)["found"]
    assert [v["points"] for v in named[0]["versions"]] == [ids[:1], ids[1:]]
    elsewhere = rpfs("find", "nginx.conf", "web01", "--disk", "os", "--partition", "2", store=store, check=False)
    assert elsewhere.returncode == 1 and "nothing matches" in elsewhere.stderr
    db = _json("find", "db.sqlite", store=store)["found"]   # every VM; the xfs partition
    assert [(f["filesystem"], f["path"], len(f["versions"])) for f in db] == [("os/p2", "/data/db.sqlite", 1)]
    mail = _json("find", "/var/mail/alice/**", "web01", store=store)["found"]
    assert sorted(f["path"] for f in mail) == ["/var/mail/alice/1", "/var/mail/alice/1.old", "/var/mail/alice/2"]

    changes = _json("diff", "web01", ids[0], ids[1], store=store)["changes"]
    assert sorted((c["change"], c["path"]) for c in changes if c["path"] != "/etc" and c["path"] != "/var/mail/alice"
                  and c["path"] != "/home/alice") == [
        ("+", "/etc/new.conf"), ("+", "/var/mail/alice/1.old"), ("-", "/home/alice/notes.txt"),
        ("-", "/var/mail/alice/1"), ("M", "/etc/nginx/nginx.conf")]
    assert _json("diff", "web01", ids[1], ids[2], store=store)["changes"] == []
    only_etc = _json("diff", "web01", ids[0], ids[1], "os/p1:/etc", store=store)["changes"]
    assert all(c["path"].startswith("/etc") for c in only_etc)

    # ls answers as a read-only attach of the same point does
    listed = _json("ls", "web01", ids[1], "os/p1:/etc", store=store)["folders"][0]["entries"]
    dest = area / "attached"
    rpfs("attach", f"web01/{ids[1]}", str(dest), store=store)
    try:
        real = {e.name: e.stat(follow_symlinks=False) for e in os.scandir(dest / "os" / "p1" / "etc")}
    finally:
        rpfs("detach", str(dest), store=store)
    assert sorted(e["name"] for e in listed) == sorted(real)
    for e in listed:
        st = real[e["name"]]
        assert (int(e["mode"], 8), e["uid"], e["gid"], e["mtime_ns"]) == \
            (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns)
        if e["kind"] == "file":
            assert e["size"] == st.st_size
    filesystems = _json("ls", "web01", store=store)["filesystems"]
    assert [(f["name"], f["fstype"], f["status"]) for f in filesystems] == [("p1", "ext4", "cataloged"),
                                                                           ("p2", "xfs", "cataloged")]


def _edit_partition(disk: Path, mountpoint: Path, write: dict[str, bytes], remove: list[str],
                    rename: tuple[str, str]) -> None:
    from rpfs.attach.partitions import read_partitions
    p1 = read_partitions(disk)[0]
    mountpoint.mkdir()
    subprocess.run(["mount", "-o", f"loop,offset={p1.start},sizelimit={p1.size}", str(disk), str(mountpoint)],
                   check=True)
    try:
        for name, data in write.items():
            (mountpoint / name).write_bytes(data)
        for name in remove:
            (mountpoint / name).unlink()
        os.rename(mountpoint / rename[0], mountpoint / rename[1])
    finally:
        subprocess.run(["umount", str(mountpoint)], check=True)
        mountpoint.rmdir()


def test_what_cannot_be_cataloged_is_said(area, store_path):
    store = store_path
    mixed = make_mixed_image(area / "mixed.img", {"etc/hosts": b"h\n"})
    plain = area / "plain.img"
    plain.write_bytes(os.urandom(MiB))   # no filesystem at all
    point = _json("backup", "vm", f"--disk=mixed={mixed}", f"--disk=plain={plain}", store=store)["point_id"]
    filesystems = {f"{f['disk']}/{f['name']}": f["status"] for f in
                   _json("ls", "vm", point, store=store)["filesystems"]}
    assert filesystems["mixed/p2"] == "cataloged"
    assert "swap" in filesystems["mixed/p1"]
    assert filesystems["plain/disk"] != "cataloged"
    found = _json("find", "hosts", "vm", store=store)
    assert [f["path"] for f in found["found"]] == ["/etc/hosts"]
    assert {u["filesystem"] for u in found["uncataloged"]} >= {"mixed/p1", "plain/disk"}

    bare = rpfs("backup", "vm", f"--disk=mixed={mixed}", f"--disk=plain={plain}", "--no-catalog", "--json",
                store=store)
    bare_id = json.loads(bare.stdout)["point_id"]
    assert json.loads(bare.stdout)["catalog"] is None
    refused = rpfs("ls", "vm", bare_id, "/etc", store=store, check=False)
    assert refused.returncode == 1 and "has no catalog" in refused.stderr and len(refused.stderr.splitlines()) == 1
    said = rpfs("find", "hosts", "vm", store=store)
    assert "1 point(s) without a catalog" in said.stderr
    nothing = rpfs("find", "no-such-file", "vm", store=store, check=False)
    assert nothing.returncode == 1 and len(nothing.stderr.splitlines()) == 1 and "nothing matches" in nothing.stderr
    unknown = rpfs("ls", "vm", point, "/no/such/folder", store=store, check=False)
    assert unknown.returncode == 1 and "not in the catalog" in unknown.stderr
    made = _json("catalog", "vm", store=store)
    assert [m["point_id"] for m in made] == [bare_id] and made[0]["reused_disks"] == ["mixed", "plain"]


def test_catalogs_go_with_their_points_and_share_unchanged_folders(area, store_path):
    store = store_path
    disk = make_whole_disk_ext4(area / "d.img", _files(3))
    rpfs("policy", "create", "two", "--daily", "02:00", "--keep-last", "2", store=store)
    rpfs("protect", "vm", "--policy", "two", f"--disk=d={disk}", store=store)
    for n in range(4):
        with mounted_rw(disk, area / "m") as m:
            (m / "var" / "www" / "index.html").write_bytes(b"<p>%d</p>" % n)
        rpfs("backup", "vm", f"--disk=d={disk}", store=store)
    with open_store(store) as opened:
        assert len(opened.catalog_keys()) == 4
        before = len(opened.stored_listing_ids())
    rpfs("prune", store=store)
    with open_store(store) as opened:
        from rpfs.store.catalogs import count_references
        kept = [opened.catalog(vm, pid) for vm, pid in opened.catalog_keys()]
        assert len(kept) == 2
        counts = count_references(kept, lambda i: opened.listing_bytes(i, "test"))
        assert opened.listing_ref_counts() == counts
        assert set(opened.stored_listing_ids()) == set(counts)   # nothing unreferenced is left
        assert len(counts) < before
        assert json.loads(rpfs("check", "--json", store=store).stdout)["problems"] == []
    rpfs("unprotect", "vm", "--delete-data", store=store)
    with open_store(store) as opened:
        assert opened.catalog_keys() == [] and opened.stored_listing_ids() == [] and opened.listing_ref_counts() == {}


def test_restore_files_copies_out_of_a_point_and_undoes_its_attach(area, store_path):
    store = store_path
    disk = make_partitioned_image(area / "os.img", [("ext4", _files(2)), ("xfs", {"etc/hosts": b"xfs hosts\n"})])
    point = _json("backup", "web01", f"--disk=os={disk}", store=store)["point_id"]
    to = area / "recovered"
    done = _json("restore-files", "web01", point, "/etc/nginx/nginx.conf", "/var/www", "--to", str(to), store=store)
    assert done["filesystem"] == "os/p1" and done["files"] == 2
    assert (to / "etc/nginx/nginx.conf").read_bytes() == _files(2)["etc/nginx/nginx.conf"]
    assert (to / "var/www/index.html").read_bytes() == _files(2)["var/www/index.html"]
    assert stat.S_IMODE(to.stat().st_mode) == 0o700
    ambiguous = rpfs("restore-files", "web01", "/etc/hosts", "--to", str(area / "x"), store=store, check=False)
    assert ambiguous.returncode == 1 and "several filesystems" in ambiguous.stderr
    rpfs("restore-files", "web01", "--disk", "os", "--partition", "2", "/etc/hosts", "--to", str(area / "x"),
         store=store)
    assert (area / "x/etc/hosts").read_bytes() == b"xfs hosts\n"
    again = rpfs("restore-files", "web01", "/etc/hosts", "os/p1:/etc/hosts", "--to", str(area / "y"), store=store,
                 check=False)
    assert again.returncode == 1   # one filesystem at a time
    missing = rpfs("restore-files", "web01", "/no/such", "--to", str(area / "z"), store=store, check=False)
    assert missing.returncode == 1 and "not in the catalog" in missing.stderr and not (area / "z").exists()
    run = Path(os.environ.get("RPFS_RUN_DIR", "")) / "files"
    assert not run.exists() or not any(run.iterdir())   # every attach undone

"""Fuzzing what rpfs reads from outside: partition tables, instant-restore state files, policy TOML and
names. Whatever the input, the answer is a result or one RpfsError, never another exception."""
import struct
import zlib
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rpfs.attach.partitions import MAX_PARTITIONS, read_partitions
from rpfs.errors import RpfsError
from rpfs.policy.policies import policy_from_toml
from rpfs.restore.partial import state_path
from rpfs.restore.writable_image import HEADER_SIZE, read_source
from rpfs.store.recovery_point import check_name

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
IMAGE = 4 << 20

mbr_entry = st.tuples(st.sampled_from([0x00, 0x80]), st.sampled_from([0, 0x83, 0x05, 0x0F, 0xEE, 0x07]),
                      st.integers(0, 2 ** 32 - 1), st.integers(0, 2 ** 32 - 1))
gpt_entry = st.tuples(st.binary(min_size=16, max_size=16), st.integers(0, 2 ** 64 - 1), st.integers(0, 2 ** 64 - 1))


def mbr(entries) -> bytes:
    sector = bytearray(512)
    for i, (boot, ptype, start, count) in enumerate(entries[:4]):
        struct.pack_into("<B3xB3xII", sector, 446 + 16 * i, boot, ptype, start, count)
    sector[510:512] = b"\x55\xaa"
    return bytes(sector)


def gpt(entries, count: int) -> bytes:
    """A protective MBR and a primary GPT with valid CRCs around fuzzed entries."""
    table = b"".join(guid + struct.pack("<QQ", first, last) + bytes(128 - 32) for guid, first, last in entries)
    table = table.ljust(count * 128, b"\0")
    header = bytearray(92)
    struct.pack_into("<8sIIIIQQQQ16sQIII", header, 0, b"EFI PART", 0x10000, 92, 0, 0, 1, IMAGE // 512 - 1,
                     34, IMAGE // 512 - 34, bytes(16), 2, count, 128, zlib.crc32(table))
    struct.pack_into("<I", header, 16, zlib.crc32(bytes(header)))
    return mbr([(0, 0xEE, 1, IMAGE // 512 - 1)]) + bytes(header).ljust(512, b"\0") + table


def read_image(tmp_path: Path, head: bytes):
    image = tmp_path / "fuzz.img"
    with open(image, "wb") as f:
        f.write(head[:IMAGE])
        f.truncate(IMAGE)
    try:
        parts = read_partitions(image)
    except RpfsError:
        return None
    assert len(parts) <= MAX_PARTITIONS
    ranges = sorted((p.start, p.start + p.size) for p in parts)
    assert all(0 < start < end <= IMAGE for start, end in ranges)
    assert all(a[1] <= b[0] for a, b in zip(ranges, ranges[1:]))   # never overlapping
    return parts


@FUZZ
@given(entries=st.lists(mbr_entry, min_size=1, max_size=4), tail=st.binary(max_size=2048))
def test_fuzzed_mbr(tmp_path, entries, tail):
    read_image(tmp_path, mbr(entries) + tail)


@FUZZ
@given(entries=st.lists(gpt_entry, max_size=40), count=st.sampled_from([128, 1024, 4096]))
def test_fuzzed_gpt(tmp_path, entries, count):
    read_image(tmp_path, gpt(entries, count))


def test_thousands_of_partitions_are_refused_with_one_line(tmp_path):
    entries = [(bytes(range(1, 17)), 40 + i, 40 + i) for i in range(2000)]
    image = tmp_path / "many.img"
    image.write_bytes(gpt(entries, 2048))
    with open(image, "r+b") as f:
        f.truncate(IMAGE)
    try:
        read_partitions(image)
        raise AssertionError("2000 partitions were accepted")
    except RpfsError as e:
        assert "at most" in e.message and "\n" not in e.message


@FUZZ
@given(header=st.one_of(st.binary(max_size=HEADER_SIZE),
                        st.dictionaries(st.sampled_from(["store", "vm", "point_id", "disk", "size", "block_size", "x"]),
                                        st.one_of(st.integers(-5, 2 ** 70), st.text(max_size=8), st.none(),
                                                  st.floats(allow_nan=True)), max_size=7).map(
                            lambda d: __import__("json").dumps(d).encode())))
def test_fuzzed_state_file(tmp_path, header):
    target = tmp_path / "t.img"
    state_path(target).write_bytes(header[:HEADER_SIZE].ljust(HEADER_SIZE, b"\0"))
    try:
        source = read_source(target)
    except RpfsError:
        return
    assert source.size > 0 and source.block_size > 0 and isinstance(source.vm, str)


def policy_text(name: str, daily: str, keep: str, extra: str) -> str:
    return f"name = {name}\n[schedule]\ndaily = {daily}\n[retention]\nkeep_last = {keep}\n{extra}"


@FUZZ
@given(text=st.one_of(st.text(max_size=300), st.builds(
    policy_text,
    st.sampled_from(['"p"', '"bad name"', "1", '""', "[1]"]), st.sampled_from(['"02:00"', '"25:00"', "2", '"2:0"']),
    st.sampled_from(["3", "-1", '"x"', "1e9", "true"]), st.text(max_size=40))))
def test_fuzzed_policy_toml(text):
    try:
        policy_from_toml(text, "fuzz.toml")
    except RpfsError as e:
        assert "\n" not in e.message


@FUZZ
@given(name=st.text(max_size=200))
def test_fuzzed_names(name):
    try:
        assert check_name("VM", name) == name and name.isascii() and "\n" not in name
    except RpfsError:
        pass

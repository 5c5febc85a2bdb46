"""Blocks stored in 64 KiB frames (format 4): a random read decodes only the frames it needs, each frame is
checked on its own, and stores of format 3 (whole-block blobs) are read and upgraded."""
from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import zstandard
from cli_helpers import FORMAT_3_RELEASE, mounted, open_store, previous_release, previous_rpfs, rpfs
from test_backup import read_all, write_image

from rpfs.errors import CorruptBlockError
from rpfs.store.blob import CODEC_FRAMES, FRAME, FRAME_SIZE, HEADER, BlockCodec, check_crc, cut, read_header
from rpfs.store.crypto import Keyring

MiB = 1 << 20
pytestmark = pytest.mark.timeout(300)


def codecs() -> list[BlockCodec]:
    return [BlockCodec("blake3"), BlockCodec("blake3", keyring=Keyring(os.urandom(32), os.urandom(16)))]


@pytest.mark.parametrize("codec", codecs(), ids=["plain", "sealed"])
def test_any_range_of_a_block_reads_back_exactly(codec):
    rnd = random.Random(1)
    for size in (0, 1, 4096, FRAME_SIZE, FRAME_SIZE + 1, MiB, MiB - 12345):
        raw = rnd.randbytes(size // 2) + bytes(size - size // 2)
        digest = codec.block_id(raw)
        blob = bytes(codec.encode(digest, raw))
        check_crc(blob)
        assert codec.decode(digest, blob) == raw
        for _ in range(40):
            start = rnd.randrange(size + 1)
            stop = rnd.randrange(start, size + 1)
            assert codec.read(digest, blob, size, start, stop) == raw[start:stop]


@pytest.mark.parametrize("codec", codecs(), ids=["plain", "sealed"])
def test_a_flipped_bit_anywhere_is_an_error_never_wrong_bytes(codec):
    """Bits of a small blob flipped one at a time (every bit of its header and frame table, and 3,000
    others): each frame's CRC or tag, the frame table and the length the block map gives catch each."""
    raw = random.Random(2).randbytes(FRAME_SIZE) + b"text " * (FRAME_SIZE // 5) + bytes(100)
    digest = codec.block_id(raw)
    blob = bytes(codec.encode(digest, raw))
    rnd = random.Random(3)
    head_bits = (HEADER.size + 3 * FRAME.size) * 8
    for position in [*range(head_bits), *rnd.sample(range(head_bits, len(blob) * 8), 3000)]:
        damaged = bytearray(blob)
        damaged[position // 8] ^= 1 << position % 8
        for start, stop in ((0, len(raw)), (10, 4106), (FRAME_SIZE + 7, FRAME_SIZE + 4000), (len(raw) - 50, len(raw))):
            for as_read in (bytes(damaged), "cut"):   # whole in the daemon, or cut by a reader process
                try:
                    got = codec.read(digest, cut(damaged, start, stop) if as_read == "cut" else as_read, len(raw),
                                     start, stop)
                except CorruptBlockError:
                    continue
                assert got == raw[start:stop], f"wrong bytes after flipping bit {position}"


@pytest.mark.parametrize("codec", codecs(), ids=["plain", "sealed"])
def test_a_blob_under_another_id_or_of_another_length_does_not_read(codec):
    """What a damaged LMDB page could hand over: another block's blob of the same length, or a bare header
    that claims an empty block. Neither is read as this block."""
    rnd = random.Random(5)
    mine, other = rnd.randbytes(MiB), rnd.randbytes(MiB)
    mine_id, other_id = codec.block_id(mine), codec.block_id(other)
    other_blob = bytes(codec.encode(other_id, other))
    for blob in (other_blob, cut(other_blob, 4096, 8192)):
        with pytest.raises(CorruptBlockError):
            codec.read(mine_id, blob, MiB, 4096, 8192)
    header_only = bytearray(codec.encode(codec.block_id(b""), b""))
    with pytest.raises(CorruptBlockError):
        codec.read(mine_id, bytes(header_only), MiB, 4096, 8192)


def test_a_frame_moved_to_another_place_does_not_open():
    """Two sealed frames of the same length swapped: each is bound to its place, so neither opens."""
    codec = codecs()[1]
    raw = random.Random(4).randbytes(2 * FRAME_SIZE)   # random: both frames stored raw, the same length
    digest = codec.block_id(raw)
    blob = bytes(codec.encode(digest, raw))
    frames = HEADER.size + 2 * FRAME.size
    half = (len(blob) - frames) // 2
    swapped = blob[:frames] + blob[frames + half:] + blob[frames:frames + half]
    assert codec.read(digest, blob, len(raw), 0, 10) == raw[:10]
    with pytest.raises(CorruptBlockError):
        codec.read(digest, swapped, len(raw), 0, 10)


def test_random_reads_through_the_mount_match_the_image(tmp_path):
    image = write_image(tmp_path / "d.img", 5, 24 * MiB + 4096)
    store = tmp_path / "store"
    rpfs("init", store=store)
    rpfs("backup", "vm", f"--disk=d={image}", store=store)
    want = image.read_bytes()
    rnd = random.Random(6)
    with mounted(store, tmp_path / "mnt") as mnt:
        fd = os.open(mnt / "vm" / "latest" / "d.img", os.O_RDONLY)
        try:
            for _ in range(400):
                offset = rnd.randrange(len(want)) & ~4095
                assert os.pread(fd, 4096, offset) == want[offset:offset + 4096]
            assert os.pread(fd, 100, len(want) - 50) == want[-50:]
        finally:
            os.close(fd)


def test_a_damaged_frame_fails_only_reads_of_it(tmp_path):
    image = write_image(tmp_path / "d.img", 7, 2 * MiB)
    store = tmp_path / "store"
    rpfs("init", store=store)
    rpfs("backup", "vm", f"--disk=d={image}", store=store)
    want = image.read_bytes()
    with open_store(store) as s:
        point = s.points("vm")[0]
        key = s.map_key("vm", point.id, "d")
        digest = next(s.block_digest(key, i) for i in range(point.disk("d").blocks) if any(s.block_digest(key, i)))
        index = next(i for i in range(point.disk("d").blocks) if s.block_digest(key, i) == digest)
        blob = bytearray(s.get_blob(digest))
        assert read_header(blob).codec == CODEC_FRAMES
        blob[-1] ^= 0xFF   # inside the block's last frame
        s.write(lambda txn: txn.put(digest, bytes(blob), db=s.db("blocks")))
        block_size = s.block_size
    last_frame = index * block_size + block_size - FRAME_SIZE
    with mounted(store, tmp_path / "mnt") as mnt:
        fd = os.open(mnt / "vm" / "latest" / "d.img", os.O_RDONLY)
        try:
            with pytest.raises(OSError) as failed:
                os.pread(fd, 4096, last_frame + 8192)
            assert failed.value.errno == 5   # EIO
            first = index * block_size
            assert os.pread(fd, 4096, first) == want[first:first + 4096]
        finally:
            os.close(fd)
    assert rpfs("verify", store=store, check=False).returncode == 4


def test_a_format_3_store_is_read_then_upgraded_and_refused_by_its_release(tmp_path):
    """The last release of format 3 makes an encrypted store; this one reads it, a backup marks it format 6
    (whole-block and framed blobs side by side, both read exactly), and that release then refuses it."""
    old = previous_release(tmp_path, FORMAT_3_RELEASE)
    a, b = write_image(tmp_path / "a.img", 8, 3 * MiB), write_image(tmp_path / "b.img", 9, 3 * MiB)
    store = tmp_path / "s"
    previous_rpfs(old, store, "init", keep_key=True)
    previous_rpfs(old, store, "backup", "vm", f"--disk=d={a}", keep_key=True)
    assert "format version  3" in rpfs("info", store=store).stdout
    assert "vm" in rpfs("list", store=store).stdout
    assert "format version  3" in rpfs("info", store=store).stdout   # reading does not upgrade
    rpfs("backup", "vm", f"--disk=d={b}", store=store)
    assert "format version  7" in rpfs("info", store=store).stdout
    with open_store(store) as s:
        first, second = s.points("vm")
        assert read_all(s, first, "d") == a.read_bytes() and read_all(s, second, "d") == b.read_bytes()
    assert rpfs("verify", store=store).returncode == 0
    with pytest.raises(Exception) as refused:
        previous_rpfs(old, store, "list", keep_key=True)
    assert b"format version 7; this rpfs reads versions 1 to 3" in refused.value.stderr


def test_frames_cost_little_space(tmp_path):
    """The frame table and per-frame zstd cost under 2% on a mixed image (measured 0.9%: docs/design/blob-frames.md)."""
    image: Path = write_image(tmp_path / "d.img", 10, 8 * MiB)
    data = image.read_bytes()
    plain = BlockCodec("blake3")
    framed = whole = 0
    for start in range(0, len(data), MiB):
        raw = data[start:start + MiB]
        framed += len(plain.encode(plain.block_id(raw), raw))
        whole += min(len(zstandard.ZstdCompressor(level=1).compress(raw)), len(raw)) + 16
    assert framed <= whole * 1.02

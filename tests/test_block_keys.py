"""A key per block (format 6): each sealed blob is sealed under a key derived from its block id, so no
AES-GCM key takes more than a block's few random nonces; blobs sealed the old way (one key for every
blob) still read, a flag flipped either way reads as damaged, and stores of format 5 are upgraded."""
from __future__ import annotations

import os
import random

import pytest
from cli_helpers import FORMAT_5_RELEASE, open_store, previous_release, previous_rpfs, rpfs
from test_backup import read_all, write_image

from rpfs.errors import CorruptBlockError
from rpfs.store.blob import (FLAG_BLOCK_KEY, FLAG_SEALED, FRAME, FRAME_PLACE, HEADER, SEALED_PART, BlockCodec, cut,
                             read_header)
from rpfs.store.crypto import NONCE_SIZE, Keyring, seal_into, unseal

MiB = 1 << 20
pytestmark = pytest.mark.timeout(300)
FLAGS_AT = 5   # the flags byte in the header (magic 4, codec 1)


def sealed_codec() -> BlockCodec:
    return BlockCodec("blake3-keyed", keyring=Keyring(os.urandom(32), os.urandom(16)))


def block(seed: int, size: int = MiB) -> bytes:
    """Half random, half zeros: frames both raw and compressed."""
    rnd = random.Random(seed)
    return rnd.randbytes(size // 2) + bytes(size - size // 2)


def frames_of(blob: bytes):
    """(index, codec, offset, stored length) of each frame of a framed blob."""
    header = read_header(blob)
    count = -(-header.raw_length // (header.frame_kib << 10))
    at = HEADER.size + count * FRAME.size
    for n in range(count):
        codec, stored, _check = FRAME.unpack_from(blob, HEADER.size + n * FRAME.size)
        yield n, codec, at, stored
        at += stored


def resealed(codec: BlockCodec, digest: bytes, blob: bytes, flags: int, old_key, new_key) -> bytes:
    """The blob with flags set and each frame opened under old_key and sealed again under new_key (its
    place in the associated data follows the new flags): how an rpfs of format 5 wrote it, given the
    store-wide key."""
    out = bytearray(blob)
    out[FLAGS_AT] = flags
    head_before, head_after = digest + bytes(blob[:SEALED_PART.size]), digest + bytes(out[:SEALED_PART.size])
    for n, frame_codec, at, stored in frames_of(blob):
        place = FRAME_PLACE.pack(n, frame_codec)
        payload = unseal(old_key, blob[at:at + stored], head_before + place, "frame")
        seal_into(new_key, payload, head_after + place, memoryview(out)[at:at + stored])
    return bytes(out)


def test_a_new_blob_carries_the_flag_and_opens_only_under_its_blocks_own_key():
    codec = sealed_codec()
    raw = block(1)
    digest = codec.block_id(raw)
    blob = bytes(codec.encode(digest, raw))
    assert read_header(blob).flags == FLAG_SEALED | FLAG_BLOCK_KEY
    own, store_wide = codec.keyring.blob_key(digest), codec.keyring.blob_key(None)
    aad = digest + blob[:SEALED_PART.size]
    for n, frame_codec, at, stored in frames_of(blob):
        place = FRAME_PLACE.pack(n, frame_codec)
        unseal(own, blob[at:at + stored], aad + place, "frame")
        with pytest.raises(CorruptBlockError):   # not sealed under the store-wide blocks key
            unseal(store_wide, blob[at:at + stored], aad + place, "frame")
        with pytest.raises(CorruptBlockError):   # nor under another block's key
            unseal(codec.keyring.blob_key(codec.block_id(block(2))), blob[at:at + stored], aad + place, "frame")
    assert codec.decode(digest, blob) == raw
    # the key is a function of the block id and the master key alone: another handle (a reader process,
    # the vault) derives the same, and the same content stored again gets it with new random nonces
    again = BlockCodec("blake3-keyed", keyring=Keyring(codec.keyring.master, codec.keyring.store_id))
    assert again.decode(digest, blob) == raw
    second = bytes(again.encode(digest, raw))
    assert {blob[at:at + NONCE_SIZE] for _n, _c, at, _s in frames_of(blob)}.isdisjoint(
        second[at:at + NONCE_SIZE] for _n, _c, at, _s in frames_of(second))
    assert codec.decode(digest, second) == raw


def test_an_old_blob_sealed_under_the_store_wide_key_still_reads_whole_and_by_frames():
    codec = sealed_codec()
    raw = block(3)
    digest = codec.block_id(raw)
    new = bytes(codec.encode(digest, raw))
    old = resealed(codec, digest, new, FLAG_SEALED, codec.keyring.blob_key(digest), codec.keyring.blob_key(None))
    assert read_header(old).flags == FLAG_SEALED
    assert codec.decode(digest, old) == raw
    for start, stop in ((0, 4096), (70000, 200000), (MiB - 10, MiB)):
        assert codec.read(digest, old, len(raw), start, stop) == raw[start:stop]
        assert codec.read(digest, cut(old, start, stop), len(raw), start, stop) == raw[start:stop]


def test_a_flipped_or_unknown_flag_reads_as_damaged():
    codec = sealed_codec()
    raw = block(4)
    digest = codec.block_id(raw)
    new = bytes(codec.encode(digest, raw))
    old = resealed(codec, digest, new, FLAG_SEALED, codec.keyring.blob_key(digest), codec.keyring.blob_key(None))
    damaged = []
    for blob, flags in ((new, FLAG_SEALED), (old, FLAG_SEALED | FLAG_BLOCK_KEY), (new, FLAG_BLOCK_KEY),
                        (new, FLAG_SEALED | FLAG_BLOCK_KEY | 4), (old, FLAG_SEALED | 0x80)):
        flipped = bytearray(blob)
        flipped[FLAGS_AT] = flags
        damaged.append(bytes(flipped))
    # the header's flags are sealed with each frame, so the right key with the wrong flags fails too
    damaged.append(resealed(codec, digest, new, FLAG_SEALED, codec.keyring.blob_key(digest),
                            codec.keyring.blob_key(digest)))
    for blob in damaged:
        with pytest.raises(CorruptBlockError):
            codec.decode(digest, blob)
        with pytest.raises(CorruptBlockError):
            codec.read(digest, cut(blob, 5000, 6000), len(raw), 5000, 6000)
    plain = BlockCodec("blake3")
    blob = bytearray(plain.encode(plain.block_id(raw), raw))
    blob[FLAGS_AT] = FLAG_BLOCK_KEY   # a key of its own in a plain store: no such blob
    with pytest.raises(CorruptBlockError, match="unknown flags"):
        plain.decode(plain.block_id(raw), bytes(blob))


def blob_flags(store) -> dict[bytes, int]:
    with store.read() as txn:
        return {bytes(k): read_header(v).flags for k, v in txn.cursor(db=store.db("blocks"))}


def test_a_format_5_store_is_read_then_upgraded_and_refused_by_its_release(tmp_path):
    """The last release of format 5 makes an encrypted store; this one reads it as it is, a backup marks it
    format 6 (old blobs under the store-wide key, new ones under their own, both read exactly), and that
    release then refuses it with its one line."""
    old = previous_release(tmp_path, FORMAT_5_RELEASE)
    a, b = write_image(tmp_path / "a.img", 8, 3 * MiB), write_image(tmp_path / "b.img", 9, 3 * MiB)
    store = tmp_path / "s"
    previous_rpfs(old, store, "init", keep_key=True)
    previous_rpfs(old, store, "backup", "vm", f"--disk=d={a}", keep_key=True)
    assert "vm" in rpfs("list", store=store).stdout
    assert "format version  5" in rpfs("info", store=store).stdout   # reading does not upgrade
    with open_store(store, readonly=True) as s:
        before = blob_flags(s)
        assert before and set(before.values()) == {FLAG_SEALED}
    rpfs("backup", "vm", f"--disk=d={b}", store=store)
    assert "format version  7" in rpfs("info", store=store).stdout
    with open_store(store) as s:
        after = blob_flags(s)
        assert {d: f for d, f in after.items() if d in before} == before   # old blobs stay as they are
        assert set(after) > set(before)
        assert {f for d, f in after.items() if d not in before} == {FLAG_SEALED | FLAG_BLOCK_KEY}
        first, second = s.points("vm")
        assert read_all(s, first, "d") == a.read_bytes() and read_all(s, second, "d") == b.read_bytes()
    assert rpfs("verify", store=store).returncode == 0
    rpfs("check", "--read-data", store=store)   # every blob decoded and checked against its id
    with pytest.raises(Exception) as refused:
        previous_rpfs(old, store, "list", keep_key=True)
    assert b"format version 7; this rpfs reads versions 1 to 5" in refused.value.stderr
    assert len(refused.value.stderr.strip().splitlines()) == 1


def test_an_encrypted_store_still_refuses_blocks_under_64k(tmp_path):
    """The blobs no longer need it, the map pieces (sealed under one key, one nonce each) do (docs/design/encryption.md)."""
    done = rpfs("init", "--block-size", "16K", store=tmp_path / "s", check=False)
    assert done.returncode == 1 and "64K or more" in done.stderr and "Traceback" not in done.stderr

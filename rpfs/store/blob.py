"""The framing of one stored block: a small header (magic, codec, flags, frame size, length, CRC-32) before
the payload.

The header lets a verifier find rot without decoding or a key, and leaves room for later codecs (a new
codec or flag value, never a reinterpretation of an old one). Since store format 4 a block is stored in
frames (CODEC_FRAMES): every 64 KiB of it compressed (or kept raw) on its own, behind a table of frames,
so that a 4 KiB read decodes 64 KiB, not the whole block (docs/design/blob-frames.md). Each frame is checked on
its own as it is read: by a CRC-32 of its raw bytes in a plain store, by its AES-256-GCM tag in an
encrypted one (a CRC of plaintext would leak it). Full block-id checks are left to verify and check.

In an encrypted store the payload is sealed (flag SEALED): nonce + AES-256-GCM ciphertext + tag per frame
(per blob for the whole-block codecs of format 3), with the block id, the header's first 12 bytes and the
frame's index and codec as associated data, so a frame moved to another block or place, or given another
codec or length, does not open. A store is all sealed or all plain: anything else reads as damaged.
Since store format 6 a sealed blob also has flag BLOCK_KEY: its frames are sealed under a key derived
from its block id (crypto.py: why), not the store-wide blocks key of older blobs, which still read. The
flags are part of the associated data, so a flag flipped reads as damaged like any other change, and an
unknown flag reads as damaged too (an older rpfs reads a new blob so: hence the format version).
"""
from __future__ import annotations

import hashlib
import struct
import threading
from dataclasses import dataclass

import blake3
import zstandard
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from zlib_ng.zlib_ng import crc32   # zlib's CRC-32, 4x faster here (docs/dev/benchmarks.md)

from rpfs.errors import CorruptBlockError, RpfsError
from rpfs.store.crypto import SEAL_OVERHEAD, Keyring

MAGIC = b"RPB1"
HEADER = struct.Struct("<4sBBHI I")  # magic, codec, flags, frame KiB (CODEC_FRAMES), raw length, crc32(payload)
SEALED_PART = struct.Struct("<4sBBHI")   # the header but its CRC: what a sealed payload is bound to
FRAME = struct.Struct("<BII")            # per frame: codec, stored length, check (below; 0 if sealed)
FRAME_PLACE = struct.Struct("<IB")       # what a sealed frame is bound to besides the header: index, codec
FLAG_SEALED = 1
FLAG_BLOCK_KEY = 2      # format 6: sealed under the block's own key (Keyring.blob_key), not the store-wide one
KNOWN_FLAGS = FLAG_SEALED | FLAG_BLOCK_KEY
CRC = struct.Struct("<I")
CODEC_RAW = 0      # whole block, stored as it is (format 3)
CODEC_ZSTD = 1     # whole block, one zstd frame (format 3)
CODEC_FRAMES = 2   # format 4: a table of frames, each CODEC_RAW or CODEC_ZSTD
FRAME_SIZE = 64 << 10   # measured: 4 KiB reads 2.5x faster than whole 1 MiB blocks, 0.9% more stored (docs/design/blob-frames.md)
DEFAULT_ZSTD_LEVEL = 1   # measured: ~15% faster backups than level 3 for ~2.5% more stored (docs/dev/benchmarks.md)

_local = threading.local()


def _compressor(level: int) -> zstandard.ZstdCompressor:
    """One compressor per thread and level: zstd contexts must never be shared between threads."""
    compressors = _local.__dict__.setdefault("compressors", {})
    c = compressors.get(level)
    if c is None:
        c = compressors[level] = zstandard.ZstdCompressor(level=level)
    return c


def _compress_frames(level: int, raw: memoryview) -> list[memoryview]:
    """Each FRAME_SIZE piece of raw zstd-compressed on its own, in one call: one release of the GIL per
    block instead of one per frame, each of which could wait a switch interval to take it back."""
    if not raw:
        return []
    segments = _frame_segments.get(len(raw))
    if segments is None:
        segments = _frame_segments[len(raw)] = b"".join(
            SEGMENT.pack(start, min(FRAME_SIZE, len(raw) - start)) for start in range(0, len(raw), FRAME_SIZE))
    compressor = _compressor(level)
    if not hasattr(compressor, "multi_compress_to_buffer"):   # python-zstandard's CFFI backend lacks it
        return [compressor.compress(raw[start:start + FRAME_SIZE]) for start in range(0, len(raw), FRAME_SIZE)]
    packed = compressor.multi_compress_to_buffer(zstandard.BufferWithSegments(raw, segments))
    return [memoryview(part) for part in packed]


SEGMENT = struct.Struct("<QQ")      # python-zstandard's segment: offset and length in the buffer
_frame_segments: dict[int, bytes] = {}


def _decompressor() -> zstandard.ZstdDecompressor:
    d = getattr(_local, "decompressor", None)
    if d is None:
        d = _local.decompressor = zstandard.ZstdDecompressor()
    return d


def _decompress(payload, raw_length: int) -> bytes:
    try:
        return _decompressor().decompress(payload, max_output_size=raw_length)
    except zstandard.ZstdError as e:
        raise CorruptBlockError(f"stored block does not decompress: {e}") from None


@dataclass(frozen=True)
class BlobHeader:
    codec: int
    flags: int
    frame_kib: int
    raw_length: int
    crc32: int


def read_header(blob: bytes | memoryview) -> BlobHeader:
    if len(blob) < HEADER.size:
        raise CorruptBlockError("stored block is shorter than its header")
    magic, codec, flags, frame_kib, raw_length, crc = HEADER.unpack_from(blob)
    if magic != MAGIC:
        raise CorruptBlockError("stored block has a bad magic number")
    return BlobHeader(codec, flags, frame_kib, raw_length, crc)


def check_crc(blob: bytes | memoryview) -> BlobHeader:
    """Check the stored bytes against the header's CRC without decoding: the cheap rot check."""
    header = read_header(blob)
    if crc32(memoryview(blob)[HEADER.size:]) != header.crc32:
        raise CorruptBlockError("stored block fails its CRC-32 check")
    return header


def _plain_ids(name: str):
    if name == "sha256":
        return lambda data: hashlib.sha256(data).digest()
    if name == "blake3":
        return lambda data: blake3.blake3(data).digest()
    raise RpfsError(f"this rpfs does not know block ids of kind {name!r} (use a matching rpfs release)")


class _Frames:
    """The frame table of one CODEC_FRAMES blob: where each frame lies (offsets from the end of the header)."""

    def __init__(self, header: BlobHeader, table):
        self.size = header.frame_kib << 10
        if self.size == 0:
            raise CorruptBlockError("stored block has a frame size of 0")
        self.raw_length = header.raw_length
        self.count = -(-header.raw_length // self.size)
        if len(table) < self.count * FRAME.size:
            raise CorruptBlockError("stored block is shorter than its frame table")
        self.entries = [FRAME.unpack_from(table, n * FRAME.size) for n in range(self.count)]
        self.starts = [self.count * FRAME.size]
        for _codec, stored, _check in self.entries:
            self.starts.append(self.starts[-1] + stored)

    @property
    def head_size(self) -> int:
        return HEADER.size + self.starts[0]

    def covering(self, start: int, stop: int) -> range:
        """The frames that bytes [start, stop) of the block lie in."""
        return range(start // self.size, (stop - 1) // self.size + 1) if start < stop else range(0)

    def raw_size(self, index: int) -> int:
        return min(self.size, self.raw_length - index * self.size)


@dataclass(frozen=True)
class Cut:
    """What a range of a block needs of its blob: the header and frame table, and the stored frames from
    index `first` on. A reader process sends this instead of a whole blob (store/isolated.py)."""
    head: bytes | memoryview
    first: int
    frames: bytes | memoryview


def cut(blob: bytes | memoryview, start: int, stop: int) -> Cut | bytes:
    """The Cut of a blob for bytes [start, stop) of its block (a blob not in frames: all of it). Needs no
    key: the frame table is plain. Whatever it holds is checked frame by frame when it is read."""
    span = frame_span(blob, start, stop)
    if span is None:
        return bytes(blob)
    head_size, first, at, size = span
    view = memoryview(blob)
    return Cut(bytes(view[:head_size]), first, bytes(view[at:at + size]))


def head_size(head: bytes | memoryview) -> int | None:
    """How many of a blob's first bytes hold its header and frame table, from its header alone (None: the
    blob is not in frames, it is read whole). A vault reads that much first, then only the frames it needs."""
    header = read_header(head)
    if header.codec != CODEC_FRAMES or header.frame_kib == 0:
        return None
    return HEADER.size + -(-header.raw_length // (header.frame_kib << 10)) * FRAME.size


def frame_span(head: bytes | memoryview, start: int, stop: int) -> tuple[int, int, int, int] | None:
    """Where the stored frames that bytes [start, stop) of a block need lie in its blob, from the blob's
    first head_size() bytes (or more): (head size, first frame, offset in the blob, length). None if the
    blob is not in frames."""
    header = read_header(head)
    if header.codec != CODEC_FRAMES:
        return None
    frames = _Frames(header, memoryview(head)[HEADER.size:])
    needed = frames.covering(start, min(stop, header.raw_length))
    if not needed:
        return frames.head_size, 0, frames.head_size, 0
    first, end = frames.starts[needed[0]], frames.starts[needed[-1] + 1]
    return frames.head_size, needed[0], HEADER.size + first, end - first


class BlockCodec:
    """A store's way from raw blocks to blobs and back: block ids, compression, and sealing when encrypted.

    block_id: sha256 (stores of format 1 and 2), blake3 (format 3 and later, unencrypted) or keyed blake3
    (encrypted). Thread-safe: compression contexts are per thread."""

    def __init__(self, block_id: str, zstd_level: int = DEFAULT_ZSTD_LEVEL, keyring: Keyring | None = None):
        self.keyring, self.zstd_level = keyring, zstd_level
        self.block_id = keyring.block_id if keyring is not None else _plain_ids(block_id)
        self._zero_ids: dict[int, bytes] = {}

    def zero_id(self, length: int) -> bytes:
        """The id an all-zero block of this length would have (a block with it is a hole)."""
        found = self._zero_ids.get(length)
        if found is None:
            found = self._zero_ids[length] = self.block_id(bytes(length))
        return found

    def encode(self, digest: bytes, raw: bytes | memoryview) -> bytearray:
        """Frame a block: each frame zstd-compressed when that makes it smaller, raw otherwise; sealed when
        encrypted. Written into one buffer: no copy of the block beyond its compressed frames."""
        raw = memoryview(raw)
        sealed = self.keyring is not None
        flags = FLAG_SEALED | FLAG_BLOCK_KEY if sealed else 0
        head = SEALED_PART.pack(MAGIC, CODEC_FRAMES, flags, FRAME_SIZE >> 10, len(raw))
        key = self.keyring.blob_key(digest) if sealed else None
        frames = []
        for start, packed in zip(range(0, len(raw), FRAME_SIZE), _compress_frames(self.zstd_level, raw), strict=True):
            part = raw[start:start + FRAME_SIZE]
            frames.append((CODEC_ZSTD, packed) if len(packed) < len(part) else (CODEC_RAW, part))
        overhead = SEAL_OVERHEAD if sealed else 0
        table_end = HEADER.size + len(frames) * FRAME.size
        framed = bytearray(table_end + sum(len(p) + overhead for _c, p in frames))
        framed[:SEALED_PART.size] = head
        view, at = memoryview(framed), table_end
        for n, (codec, payload) in enumerate(frames):
            stored = len(payload) + overhead
            place = digest + head + FRAME_PLACE.pack(n, codec)
            check = 0 if sealed else _frame_check(place, raw[n * FRAME_SIZE:(n + 1) * FRAME_SIZE])
            FRAME.pack_into(framed, HEADER.size + n * FRAME.size, codec, stored, check)
            if sealed:
                self.keyring.seal_block_into(key, payload, place, view[at:at + stored])
            else:
                view[at:at + stored] = payload
            at += stored
        CRC.pack_into(framed, SEALED_PART.size, crc32(view[HEADER.size:]))
        return framed

    def _checked_header(self, blob) -> BlobHeader:
        header = read_header(blob)
        if header.flags & ~KNOWN_FLAGS or header.flags == FLAG_BLOCK_KEY:
            raise CorruptBlockError(f"stored block has unknown flags {header.flags:#x}")
        if bool(header.flags & FLAG_SEALED) != (self.keyring is not None):
            raise CorruptBlockError("stored block is sealed in an unencrypted store" if self.keyring is None
                                    else "stored block is not sealed in an encrypted store")
        if header.codec not in (CODEC_RAW, CODEC_ZSTD, CODEC_FRAMES):
            raise CorruptBlockError(f"stored block has unknown codec {header.codec}")
        return header

    def _key(self, digest: bytes, header: BlobHeader) -> AESGCM | None:
        """The key a checked blob's payload opens with (None: a plain store)."""
        if self.keyring is None:
            return None
        return self.keyring.blob_key(digest if header.flags & FLAG_BLOCK_KEY else None)

    def decode(self, digest: bytes, blob: bytes | memoryview) -> bytes:
        """The raw block, opened when sealed and checked against its id: what verify and check trust."""
        header = self._checked_header(blob)
        if header.codec == CODEC_FRAMES:
            raw = self._read_frames(digest, header, *_whole_cut(header, blob), 0, header.raw_length)
        else:
            raw = self._read_whole(digest, blob, header, memoryview(blob)[HEADER.size:])
        if self.block_id(raw) != digest:
            raise CorruptBlockError("stored block does not match its digest")
        return raw

    def read(self, digest: bytes, blob: bytes | memoryview | Cut, length: int, start: int = 0,
             stop: int | None = None) -> bytes:
        """Bytes [start, stop) of a block of `length` bytes (the block map says how long it is), from its
        blob or a Cut of it, checked the cheap way: only the frames they lie in are decoded, each against
        its CRC or tag, both bound to the block id and the frame's place (a whole block of format 3 against
        its id). Exactly stop - start bytes or CorruptBlockError: wrong bytes never leave here."""
        stop = length if stop is None else min(stop, length)
        header = self._checked_header(blob.head if isinstance(blob, Cut) else blob)
        if header.codec != CODEC_FRAMES:
            if isinstance(blob, Cut):
                raise CorruptBlockError("stored block was cut but is not in frames")
            raw = self.decode(digest, blob)
            if len(raw) != length:
                raise CorruptBlockError("stored block has the wrong length")
            return raw if (start, stop) == (0, len(raw)) else raw[start:stop]
        if header.raw_length != length:
            raise CorruptBlockError("stored block has the wrong length")
        if isinstance(blob, Cut):
            frames = _Frames(header, memoryview(blob.head)[HEADER.size:])
        else:
            blob, frames = _whole_cut(header, blob)
        data = self._read_frames(digest, header, blob, frames, start, stop)
        if len(data) != max(stop - start, 0):
            raise CorruptBlockError("stored block reads short")
        return data

    def _read_frames(self, digest: bytes, header: BlobHeader, blob: Cut, frames: _Frames, start: int,
                     stop: int) -> bytes:
        needed = frames.covering(start, stop)
        if not needed:
            return b""
        stored = memoryview(blob.frames)
        if not 0 <= blob.first <= needed[0]:
            raise CorruptBlockError("stored block was cut without the frames asked for")
        base = frames.starts[blob.first]
        if frames.starts[needed[-1] + 1] - base > len(stored):
            raise CorruptBlockError("stored block is shorter than its frame table says")
        aad, key = digest + bytes(blob.head[:SEALED_PART.size]), self._key(digest, header)
        parts = [self._open_frame(aad, key, frames, n, stored[frames.starts[n] - base:frames.starts[n + 1] - base])
                 for n in needed]
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        skip = needed[0] * frames.size
        return data if (start - skip, stop - skip) == (0, len(data)) else data[start - skip:stop - skip]

    def _open_frame(self, aad: bytes, key: AESGCM | None, frames: _Frames, n: int, stored: memoryview) -> bytes:
        codec, _length, check = frames.entries[n]
        if key is not None:
            stored = self.keyring.unseal_block(key, stored, aad + FRAME_PLACE.pack(n, codec))
        size = frames.raw_size(n)
        if codec == CODEC_ZSTD:
            raw = _decompress(stored, size)
        elif codec == CODEC_RAW:
            raw = bytes(stored)
        else:
            raise CorruptBlockError(f"stored block has a frame of unknown codec {codec}")
        if len(raw) != size:
            raise CorruptBlockError("stored block has a frame of the wrong length")
        if self.keyring is None and _frame_check(aad + FRAME_PLACE.pack(n, codec), raw) != check:
            raise CorruptBlockError(f"stored block's frame {n} fails its CRC-32 check")
        return raw

    def _read_whole(self, digest: bytes, blob, header: BlobHeader, payload: memoryview) -> bytes:
        """A block of format 3: one payload, raw or one zstd frame, sealed whole when encrypted."""
        key = self._key(digest, header)
        if key is not None:
            payload = memoryview(self.keyring.unseal_block(key, payload, digest + bytes(blob[:SEALED_PART.size])))
        raw = bytes(payload) if header.codec == CODEC_RAW else _decompress(payload, header.raw_length)
        if len(raw) != header.raw_length:
            raise CorruptBlockError("stored block decodes to the wrong length")
        return raw


def _whole_cut(header: BlobHeader, blob: bytes | memoryview) -> tuple[Cut, _Frames]:
    """A whole blob in frames seen as a Cut (no copy) and its frame table, checked against its length."""
    view = memoryview(blob)
    frames = _Frames(header, view[HEADER.size:])
    if HEADER.size + frames.starts[-1] != len(view):
        raise CorruptBlockError("stored block's frame table does not match its length")
    return Cut(view[:frames.head_size], 0, view[frames.head_size:]), frames


def _frame_check(place: bytes, raw) -> int:
    """A plain frame's CRC-32, seeded with its place (block id, header, index, codec): a frame or blob
    read under another block's id, or at another place, fails it like damage does."""
    return crc32(raw, crc32(place))

"""Read a disk image's partition table (GPT or MBR with logical partitions) in user space.

We parse the bytes ourselves rather than run `sfdisk --json`: on a regular file sfdisk always assumes
512-byte sectors (it cannot ask a file for BLKSSZGET), so a 4Kn GPT disk would be missed; a parser of
a few sectors needs no tool, no root and no write access, and tells "no table" apart from "broken
table" without scraping a tool's messages. It only reads, so it is safe on a read-only FUSE file.
"""
from __future__ import annotations

import os
import struct
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path

from rpfs.errors import RpfsError

MBR_SIGNATURE = b"\x55\xaa"
GPT_SIGNATURE = b"EFI PART"
GPT_PROTECTIVE = 0xEE
EXTENDED_TYPES = frozenset({0x05, 0x0F, 0x85})
SECTOR_SIZES = (512, 4096)
MAX_LOGICAL = 128  # bound on an EBR chain, so a looping chain cannot hang us
MAX_PARTITIONS = 256   # GPT's usual 128 entries, and logical MBR partitions, fit with room to spare
MAX_GPT_ENTRIES_BYTES = 1 << 20


@dataclass(frozen=True)
class Partition:
    """One partition: byte range inside the image and its type (GPT type GUID or MBR type like 0x83)."""

    number: int
    start: int
    size: int
    type: str


def read_partitions(image: Path) -> list[Partition]:
    """Partitions of `image` in table order; [] when the image has no partition table. A table that
    lists more than MAX_PARTITIONS, a partition outside the image, or two that overlap is refused."""
    try:
        with open(image, "rb") as f:
            size = _file_size(f)
            return _sane(_read_table(f, size), size)
    except OSError as e:
        raise RpfsError(f"cannot read partition table of {image}: {e.strerror or e}") from None


def _sane(parts: list[Partition], image_size: int) -> list[Partition]:
    if len(parts) > MAX_PARTITIONS:
        raise RpfsError(f"the partition table lists {len(parts)} partitions; rpfs reads at most {MAX_PARTITIONS}")
    for p in parts:
        if p.size <= 0 or p.start <= 0 or p.start + p.size > image_size:
            raise RpfsError(f"partition {p.number} (bytes {p.start}-{p.start + p.size}) lies outside the image"
                            f" ({image_size} bytes): the table is damaged")
    by_start = sorted(parts, key=lambda p: p.start)
    for a, b in zip(by_start, by_start[1:]):
        if b.start < a.start + a.size:
            raise RpfsError(f"partitions {a.number} and {b.number} overlap: the table is damaged")
    return parts


def _file_size(f) -> int:
    """Size by seeking to the end: works for regular files and block devices alike."""
    return f.seek(0, os.SEEK_END)


def _read_at(f, offset: int, size: int) -> bytes:
    f.seek(offset)
    return f.read(size)


def _read_table(f, image_size: int) -> list[Partition]:
    mbr = _read_at(f, 0, 512)
    mbr_entries = _mbr_entries(mbr) if _looks_like_mbr(mbr) else None
    if mbr_entries is not None and any(ptype == GPT_PROTECTIVE for ptype, _, _ in mbr_entries):
        # Protective (or hybrid) MBR: the GPT is the real table.
        gpt = _read_gpt(f, image_size)
        if gpt is None:
            raise RpfsError("image has a protective MBR but no valid GPT header (primary or backup)")
        return gpt
    if mbr_entries is None:
        # No usable MBR: a GPT without protective MBR is still worth honouring.
        return _read_gpt(f, image_size) or []
    return _mbr_partitions(f, mbr_entries, image_size)


def _looks_like_mbr(sector: bytes) -> bool:
    """An MBR has the 55AA signature, sane boot flags and is not a FAT/NTFS/exFAT boot sector."""
    if len(sector) < 512 or sector[510:512] != MBR_SIGNATURE:
        return False
    if sector[3:11] in (b"NTFS    ", b"EXFAT   ") or sector[0x36:0x39] == b"FAT" or sector[0x52:0x57] == b"FAT32":
        return False
    return all(sector[446 + 16 * i] in (0x00, 0x80) for i in range(4))


def _mbr_entries(sector: bytes) -> list[tuple[int, int, int]]:
    """The four (type, start_lba, sectors) slots of an MBR or EBR, empty slots included."""
    entries = []
    for i in range(4):
        raw = sector[446 + 16 * i: 446 + 16 * (i + 1)]
        ptype = raw[4]
        start, count = struct.unpack_from("<II", raw, 8)
        entries.append((ptype, start, count))
    return entries


def _mbr_partitions(f, entries: list[tuple[int, int, int]], image_size: int) -> list[Partition]:
    """Primary partitions keep slot numbers 1-4; logical ones are numbered from 5 in chain order."""
    sector = 512  # MBR is defined in 512-byte sectors on every disk we can read as a file
    parts: list[Partition] = []
    extended_start = None
    for slot, (ptype, start, count) in enumerate(entries, start=1):
        if ptype == 0 or count == 0:
            continue
        if ptype in EXTENDED_TYPES:
            if extended_start is None:
                extended_start = start
            continue
        parts.append(Partition(slot, start * sector, count * sector, f"0x{ptype:02x}"))
    if extended_start is not None:
        parts.extend(_logical_partitions(f, extended_start, image_size))
    return parts


def _logical_partitions(f, extended_start: int, image_size: int) -> list[Partition]:
    """Walk the EBR chain: entry 1 is relative to its EBR, entry 2 links to the next EBR."""
    sector = 512
    parts: list[Partition] = []
    ebr_lba = extended_start
    seen: set[int] = set()
    number = 5
    while ebr_lba not in seen and len(seen) < MAX_LOGICAL and ebr_lba * sector < image_size:
        seen.add(ebr_lba)
        ebr = _read_at(f, ebr_lba * sector, 512)
        if len(ebr) < 512 or ebr[510:512] != MBR_SIGNATURE:
            break
        entries = _mbr_entries(ebr)
        ptype, start, count = entries[0]
        if ptype != 0 and count != 0 and ptype not in EXTENDED_TYPES:
            parts.append(Partition(number, (ebr_lba + start) * sector, count * sector, f"0x{ptype:02x}"))
            number += 1
        next_type, next_start, _ = entries[1]
        if next_type not in EXTENDED_TYPES or next_start == 0:
            break
        ebr_lba = extended_start + next_start
    return parts


def _read_gpt(f, image_size: int) -> list[Partition] | None:
    """GPT partitions, trying 512 and 4096-byte sectors and the backup header; None if no valid GPT."""
    for sector in SECTOR_SIZES:
        header = _gpt_header(f, sector, 1)
        if header is None and image_size >= 2 * sector:
            header = _gpt_header(f, sector, image_size // sector - 1)
        if header is not None:
            parts = _gpt_entries(f, sector, header)
            if parts is not None:
                return parts
    return None


@dataclass(frozen=True)
class _GptHeader:
    entries_lba: int
    entry_count: int
    entry_size: int
    entries_crc: int


def _gpt_header(f, sector: int, lba: int) -> _GptHeader | None:
    raw = _read_at(f, lba * sector, sector)
    if len(raw) < 92 or raw[:8] != GPT_SIGNATURE:
        return None
    header_size, header_crc = struct.unpack_from("<II", raw, 12)
    if not 92 <= header_size <= sector:
        return None
    check = bytearray(raw[:header_size])
    check[16:20] = b"\0\0\0\0"
    if zlib.crc32(check) != header_crc:
        return None
    (my_lba,) = struct.unpack_from("<Q", raw, 24)
    if my_lba != lba:
        return None
    entries_lba, count, entry_size, entries_crc = struct.unpack_from("<QIII", raw, 72)
    if entry_size < 128 or entry_size % 8 or count * entry_size > MAX_GPT_ENTRIES_BYTES:
        return None
    return _GptHeader(entries_lba, count, entry_size, entries_crc)


def _gpt_entries(f, sector: int, header: _GptHeader) -> list[Partition] | None:
    table = _read_at(f, header.entries_lba * sector, header.entry_count * header.entry_size)
    if len(table) != header.entry_count * header.entry_size or zlib.crc32(table) != header.entries_crc:
        return None
    parts = []
    for index in range(header.entry_count):
        raw = table[index * header.entry_size: (index + 1) * header.entry_size]
        type_guid = raw[:16]
        if type_guid == bytes(16):
            continue
        first, last = struct.unpack_from("<QQ", raw, 32)
        if last < first:
            continue
        parts.append(Partition(index + 1, first * sector, (last - first + 1) * sector,
                               str(uuid.UUID(bytes_le=type_guid))))
    return parts

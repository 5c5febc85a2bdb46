"""The keys of an encrypted store and what each does; every primitive comes from a library (docs/design/encryption.md).

A store has one random 32-byte master key. Each purpose has a key of its own, derived from it with
HKDF-SHA-256 (salt: the store's random id), so no key ever serves two purposes or two stores:
  block ids   keyed BLAKE3 of the raw block: without the key nobody can test whether a block is stored
              (3.4 times the speed of HMAC-SHA-256 on this CPU, measured: docs/design/encryption.md)
  blocks      AES-256-GCM, a random 96-bit nonce per frame, the block id and frame header as associated data;
              since store format 6 under a key of the blob's own (below), before under this key
  block keys  keyed BLAKE3 of a block id: the AES-256-GCM key of that block's blobs (store format 6)
  records     AES-256-GCM over catalog records (recovery points, policies, protections, jobs), their
              database and key as associated data: a record moved or changed does not open
  key check   keyed BLAKE3 of the store id and its settings (encryption, block id kind, block size): tells
              a master key typed in from paper from a wrong one, and a store whose settings were changed
              (say, to "unencrypted", so that new backups would be written in the clear) from its own

Why a key per block. NIST allows 2^32 random 96-bit nonces per AES-GCM key (SP 800-38D: collision
chance under 2^-32); every 64 KiB frame takes one, so one key for all blobs ran out after 256 TiB sealed
over a store's life, whatever the block size. Since format 6 a blob is sealed under
block_key = keyed BLAKE3(block keys, block id): BLAKE3's keyed mode is a PRF, and a PRF of a random key
over a label is a KDF (the shape of HKDF-Expand and NIST SP 800-108); with its AES context 1.8 us per blob
here, HKDF-SHA-256 4.9 us, sealing 1 MiB 312 us (docs/design/encryption.md, tools/bench-block-keys). The block id is a keyed hash of the block's content, so a key seals only the frames of
one content (16 at 1 MiB blocks), again each time the same content is stored after gc freed it: its
nonce bound is per block, and there is no store-wide limit on blobs left to count. The catalog records
key still seals one record per new block map piece (block_maps.py): that is why an encrypted store's
blocks stay 64 KiB or more (docs/design/encryption.md).
"""
from __future__ import annotations

import os

import blake3
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from rpfs.errors import CorruptBlockError

KEY_SIZE = 32
NONCE_SIZE = 12
TAG_SIZE = 16
SEAL_OVERHEAD = NONCE_SIZE + TAG_SIZE


def derive_key(secret: bytes, salt: bytes, purpose: str) -> bytes:
    """A 32-byte key for one purpose (HKDF-SHA-256)."""
    return HKDF(algorithm=hashes.SHA256(), length=KEY_SIZE, salt=salt, info=f"rpfs {purpose}".encode()).derive(secret)


def seal(aead: AESGCM, plaintext, associated: bytes) -> bytes:
    """nonce + ciphertext + tag, with a fresh random nonce."""
    nonce = os.urandom(NONCE_SIZE)
    return nonce + aead.encrypt(nonce, plaintext, associated)


def seal_into(aead: AESGCM, plaintext, associated: bytes, out: memoryview) -> None:
    """seal() written into out (exactly len(plaintext) + SEAL_OVERHEAD bytes): no copy of the block."""
    nonce = os.urandom(NONCE_SIZE)
    out[:NONCE_SIZE] = nonce
    aead.encrypt_into(nonce, plaintext, associated, out[NONCE_SIZE:])


def unseal(aead: AESGCM, sealed, associated: bytes, what: str) -> bytes:
    """The plaintext of seal(); anything changed, moved or sealed under another key is a CorruptBlockError."""
    view = memoryview(sealed)
    if len(view) < SEAL_OVERHEAD:
        raise CorruptBlockError(f"{what} is too short to be sealed")
    try:
        return aead.decrypt(bytes(view[:NONCE_SIZE]), view[NONCE_SIZE:], associated)
    except InvalidTag:
        raise CorruptBlockError(f"{what} fails authentication (changed, or sealed with another key)") from None


class Keyring:
    """The working keys of one encrypted store, derived from its master key. Thread-safe."""

    def __init__(self, master: bytes, store_id: bytes):
        if len(master) != KEY_SIZE:
            raise ValueError("a master key is 32 bytes")
        self.master = master
        self.store_id = store_id
        self._id_key = derive_key(master, store_id, "block id")
        self._blocks = AESGCM(derive_key(master, store_id, "blocks"))   # blobs of formats 3 to 5
        self._block_keys = derive_key(master, store_id, "block keys")
        self._records = AESGCM(derive_key(master, store_id, "catalog records"))
        self._check_key = derive_key(master, store_id, "key check")

    def check(self, settings: bytes) -> bytes:
        return blake3.blake3(self.store_id + b"\0" + settings, key=self._check_key).digest()

    def block_id(self, data) -> bytes:
        return blake3.blake3(data, key=self._id_key).digest()

    def blob_key(self, block_id: bytes | None) -> AESGCM:
        """The key a blob is sealed under: its block's own (format 6), or with None the store-wide blocks
        key of older blobs. Derived anew each time (1.8 us): nothing to keep in step."""
        if block_id is None:
            return self._blocks
        return AESGCM(blake3.blake3(block_id, key=self._block_keys).digest())

    @staticmethod
    def seal_block_into(key: AESGCM, payload, associated: bytes, out: memoryview) -> None:
        seal_into(key, payload, associated, out)

    @staticmethod
    def unseal_block(key: AESGCM, sealed, associated: bytes) -> bytes:
        return unseal(key, sealed, associated, "stored block")

    def seal_record(self, value: bytes, associated: bytes) -> bytes:
        return seal(self._records, value, associated)

    def unseal_record(self, sealed, associated: bytes) -> bytes:
        return unseal(self._records, sealed, associated, "catalog record " + associated.decode(errors="replace")
                      .replace("\0", "/"))


def seal_in(keyring: Keyring | None, db: bytes, key: bytes, value: bytes) -> bytes:
    """A value of a content-addressed table (block map pieces, catalog listings) as stored: sealed with its
    database and key as associated data, or as it is in an unencrypted store."""
    return value if keyring is None else keyring.seal_record(value, db + b"\0" + key)


def unseal_in(keyring: Keyring | None, db: bytes, key: bytes, value, what: str):
    """seal_in undone; CorruptBlockError naming `what` if the value was changed or moved from elsewhere."""
    if keyring is None:
        return value
    try:
        return keyring.unseal_record(value, db + b"\0" + key)
    except CorruptBlockError:
        raise CorruptBlockError(f"{what} fails authentication (changed, or moved from elsewhere)") from None

"""Key slots: the master key of an encrypted store, wrapped once for each way in (as LUKS does).

A slot wraps the master key with AES-256-GCM under a key-encryption key (KEK) made from:
  passphrase  scrypt(passphrase, random salt; n=2^17, r=8, p=1: 128 MiB and about 0.5 s here). A slot
              asking more than n=2^18, r=8, p=1 is damaged and never tried: the parameters are read before
              any key is checked, so whoever can edit a slot could otherwise make each unlock take
              gigabytes and minutes
  key-file    HKDF-SHA-256 of the 32 random bytes of a root-only key file (for unattended backups)
  recovery    HKDF-SHA-256 of an X25519 exchange between a one-time key and a recovery public key, whose
              private key is kept offline: only it opens this slot (the key-encryption key of Azure's model)
The store id and every field of the slot but the wrapped key itself (id, kind, KDF parameters, note...)
are the associated data, so a slot copied elsewhere, or edited, opens nothing. Slots
live in the store's `keys` database: adding, changing or removing one is one transaction and never
touches data. The master key itself can also be written on paper (paper_text) and typed back in.
"""
from __future__ import annotations

import base64
import hmac
import json
import os
import re
import stat
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import blake3
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from rpfs.errors import CorruptBlockError, RpfsError
from rpfs.host.access import owner_name
from rpfs.host.files import create_whole
from rpfs.host.libc import no_core_dumps
from rpfs.host.untrusted import parse_json
from rpfs.store.crypto import KEY_SIZE, Keyring, derive_key, seal, unseal

SCRYPT = {"n": 1 << 17, "r": 8, "p": 1}
SCRYPT_MOST = {"n": 1 << 18, "r": 8, "p": 1}   # twice the work rpfs asks, for a later rpfs; no more
KEY_FILE_HEADER = "# rpfs key file: whoever reads it reads the store; keep it root's alone (mode 0600)\n"
PAPER_GROUP = 4
_LOOKALIKES = str.maketrans("018", "OIB")   # base32 has no 0, 1 or 8: what was typed for O, I and B
_PAPER_WORD = re.compile(r"[A-Z2-7]{1,4}")
_FINGERPRINT_LINE = re.compile(r"([A-Z2-7]{4}-){5}[A-Z2-7]{4}")   # store_fingerprint's shape


@dataclass
class KeySlot:
    id: str
    kind: str                 # passphrase | key-file | recovery
    created: str
    wrapped: str              # hex: nonce + the master key sealed under this slot's KEK + tag
    salt: str = ""            # hex (passphrase, key-file)
    kdf: dict = field(default_factory=dict)   # scrypt parameters (passphrase)
    fingerprint: str = ""     # which key file or recovery key opens it (key-file, recovery)
    ephemeral: str = ""       # hex: the one-time X25519 public key (recovery)
    note: str = ""            # what the user said it is, e.g. the key file's path when it was added

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, data) -> "KeySlot":
        try:
            slot = cls(**parse_json(bytes(data)))
        except (ValueError, TypeError) as e:
            raise CorruptBlockError(f"a key slot is damaged ({e})") from None
        if slot.kind == "passphrase" and not scrypt_bounded(slot.kdf):
            raise CorruptBlockError(f"key slot {slot.id} is damaged (its scrypt parameters {slot.kdf} are beyond"
                                    f" what rpfs makes: {SCRYPT_MOST} at most)")
        return slot

    def associated(self, store_id: bytes) -> bytes:
        fields = {k: v for k, v in asdict(self).items() if k != "wrapped"}
        return b"rpfs key slot\0" + store_id + b"\0" + json.dumps(fields, sort_keys=True).encode()


@dataclass
class NewSlot:
    """A slot to add: its kind and the secret it is opened with (a passphrase, a key file's key, or the
    recovery public key's raw bytes)."""
    kind: str
    secret: bytes = field(repr=False)
    note: str = ""

    def fingerprint(self, store_id: bytes) -> str:
        """Which key file or recovery key this slot is for ("" for a passphrase)."""
        return "" if self.kind == "passphrase" else key_fingerprint(self.secret, store_id)

    def make(self, slot_id: str, master: bytes, store_id: bytes) -> KeySlot:
        slot = KeySlot(id=slot_id, kind=self.kind, created=_now(), wrapped="", note=self.note)
        if self.kind == "passphrase":
            salt = os.urandom(16)
            slot.salt, slot.kdf = salt.hex(), dict(SCRYPT, name="scrypt")
            kek = _scrypt(self.secret, salt, slot.kdf)
        elif self.kind == "key-file":
            salt = os.urandom(16)
            slot.salt, slot.fingerprint = salt.hex(), self.fingerprint(store_id)
            kek = derive_key(self.secret, salt, "key file slot")
        else:
            recipient = X25519PublicKey.from_public_bytes(self.secret)
            one_time = X25519PrivateKey.generate()
            ephemeral = one_time.public_key().public_bytes_raw()
            slot.ephemeral, slot.fingerprint = ephemeral.hex(), self.fingerprint(store_id)
            try:
                shared = one_time.exchange(recipient)
            except ValueError:   # a degenerate (low-order) public key: no secret can be agreed with it
                raise RpfsError(f"the recovery public key {self.note or ''} is not a usable X25519 key") from None
            kek = derive_key(shared, ephemeral + self.secret, "recovery slot")
        slot.wrapped = seal(AESGCM(kek), master, slot.associated(store_id)).hex()
        return slot


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def scrypt_bounded(kdf) -> bool:
    """Parameters rpfs could have written: scrypt, n a power of two, and no more work than SCRYPT_MOST."""
    if not isinstance(kdf, dict) or kdf.get("name") != "scrypt":
        return False
    n, r, p = (kdf.get(k) for k in ("n", "r", "p"))
    if not all(type(v) is int for v in (n, r, p)):
        return False
    return 2 <= n <= SCRYPT_MOST["n"] and n & (n - 1) == 0 and 1 <= r <= SCRYPT_MOST["r"] and \
        1 <= p <= SCRYPT_MOST["p"]


def _scrypt(passphrase: bytes, salt: bytes, kdf: dict) -> bytes:
    if not scrypt_bounded(kdf):
        raise ValueError("scrypt parameters out of range: a damaged slot")   # never gigabytes on a damaged slot
    return Scrypt(salt=salt, length=KEY_SIZE, n=kdf["n"], r=kdf["r"], p=kdf["p"]).derive(passphrase)


def key_fingerprint(key: bytes, store_id: bytes) -> str:
    """Which slot a key file or recovery key opens, without trying them all; says nothing of the key."""
    return derive_key(key, store_id, "key fingerprint")[:8].hex()


def store_fingerprint(store_id: bytes, check_value: bytes) -> str:
    """What tells this store, and a vault made from it, from a forgery: derived from the key check, which
    only the master key makes (Keyring.check) and every unlock verifies. Anyone may wrap a master key of
    their own for the recovery public key (it is handed around) and copy the store id; they cannot make
    their vault show this store's fingerprint and still open. 120 bits, as base32 groups to read aloud."""
    digest = blake3.blake3(b"rpfs store fingerprint\0" + store_id + b"\0" + check_value).digest()[:15]
    text = base64.b32encode(digest).decode()
    return "-".join(text[i:i + 4] for i in range(0, len(text), 4))


def same_fingerprint(given: str, fingerprint: str) -> bool:
    """Whether a fingerprint typed back in (any case, spaces or dashes, 0/1/8 for O/I/B) is this one."""
    def compact(text: str) -> bytes:   # anything not ASCII (a dash pasted from a document) matches nothing
        return "".join(text.upper().translate(_LOOKALIKES).replace("-", " ").split()).encode(errors="replace")
    return hmac.compare_digest(compact(given), compact(fingerprint))


def new_master_key() -> bytes:
    no_core_dumps()   # this process holds a master key from now on (docs/manual/encryption.md)
    return os.urandom(KEY_SIZE)


@dataclass
class KeyLock:
    """What an encrypted store shows before it is unlocked: its id, its key check (bound to its settings:
    encryption, block id kind, block size), its slots and the ids of slots too damaged to read."""
    store: Path
    store_id: bytes
    settings: bytes
    check_value: bytes
    slots: list[KeySlot]
    damaged: list[str] = field(default_factory=list)
    what: str = ""                               # how messages name it (default: "store PATH")
    hint: str = "rpfs info shows its slots"      # where a user sees its slots

    @property
    def label(self) -> str:
        return self.what or f"store {self.store}"

    @property
    def fingerprint(self) -> str:
        return store_fingerprint(self.store_id, self.check_value)

    def keyring(self, master: bytes, from_slot: bool = False) -> Keyring:
        """The keyring of a master key, refused unless it is this store's and the store's settings are
        the ones it was made with (a store switched to "unencrypted" behind our back is refused)."""
        if len(master) != KEY_SIZE:
            raise RpfsError(f"that is not a master key of {self.label}")
        keyring = Keyring(master, self.store_id)
        if not hmac.compare_digest(keyring.check(self.settings), self.check_value):
            if from_slot:   # the slot proved the key: what changed is the store's meta
                raise RpfsError(f"{self.label}: its settings (encryption, block ids, block size) or key check"
                                " were changed or damaged; it is not opened (rpfs info shows them)")
            raise RpfsError(f"that key is not the master key of {self.label}")
        return keyring

    def open_slot(self, slot: KeySlot, kek: Callable[[], bytes]) -> Keyring | None:
        """The keyring a slot gives with the key-encryption key kek() makes, or None; a damaged slot
        opens nothing (the other slots are still tried)."""
        try:
            master = unseal(AESGCM(kek()), bytes.fromhex(slot.wrapped), slot.associated(self.store_id), "key slot")
        except (CorruptBlockError, ValueError, KeyError, TypeError):
            return None
        return self.keyring(master, from_slot=True)

    def of_kind(self, kind: str) -> list[KeySlot]:
        return [s for s in self.slots if s.kind == kind]


@dataclass
class KeyChoice:
    """The key a command was given, tried in this order: a master key handed down by the parent process,
    the recovery private key, a master key typed from paper, a key file, a passphrase."""
    key_file: str | None = None
    passphrase: Callable[[], bytes] | None = field(default=None, repr=False)   # asked only when needed
    master: bytes | None = field(default=None, repr=False)
    private_key_file: str | None = None
    paper: str | None = field(default=None, repr=False)
    opened: KeySlot | None = None   # the slot that opened the store (key passwd changes that one)
    passphrase_given: bool = False  # the passphrase came with the command (environment), not only askable

    @property
    def given(self) -> bool:
        """Whether the command came with a key (a terminal that could be asked does not count): a store that
        says it is not encrypted refuses one (Store: it may have been switched to "unencrypted")."""
        return bool(self.key_file or self.master or self.private_key_file or self.paper is not None
                    or self.passphrase_given)

    def unlock(self, lock: KeyLock) -> Keyring:
        no_core_dumps()   # before any key is read: a crash from now on must not write it to a core file
        if self.master is not None:
            return lock.keyring(self.master)
        if self.private_key_file:
            return self._first(lock, _recovery_slots(lock, self.private_key_file), f"{self.private_key_file} opens"
                               f" no recovery slot of {lock.label} ({lock.hint})")
        if self.paper is not None:
            return lock.keyring(parse_paper(self.paper))
        refused = None
        if self.key_file:
            try:
                tries = self._key_file_slots(lock)
                refused = f"key file {self.key_file} opens no key slot of {lock.label} ({lock.hint})"
            except RpfsError as e:   # no such file, a mode others may read...: said, or a passphrase is tried
                tries, refused = [], e.message
                if self.passphrase is None:
                    raise
            if self.passphrase is None or tries:
                return self._first(lock, tries, refused)
        if self.passphrase is not None:   # also after a key file (RPFS_KEY_FILE) that is not this store's
            if not lock.of_kind("passphrase"):
                damaged = f" (damaged key slots, never tried: {', '.join(lock.damaged)}; {lock.hint})" \
                    if lock.damaged else ""
                raise RpfsError(refused or f"{lock.label} has no passphrase slot{damaged}: give --key-file PATH"
                                " (or RPFS_KEY_FILE)")
            passphrase = self.passphrase()
            tries = [(slot, lambda slot=slot: _scrypt(passphrase, bytes.fromhex(slot.salt), slot.kdf))
                     for slot in lock.of_kind("passphrase")]
            wrong = f"wrong passphrase for {lock.label}"
            return self._first(lock, tries, f"{refused}, and {wrong}" if refused else wrong)
        raise RpfsError(f"{lock.label} is encrypted: give --key-file PATH (or RPFS_KEY_FILE) or a passphrase"
                        " (RPFS_PASSPHRASE, or on a terminal)")

    def _key_file_slots(self, lock: KeyLock) -> list:
        """(slot, key-encryption key maker) for the key-file slots this key file may open."""
        file_key = read_key_file(Path(self.key_file))
        fingerprint = key_fingerprint(file_key, lock.store_id)
        return [(slot, lambda slot=slot: derive_key(file_key, bytes.fromhex(slot.salt), "key file slot"))
                for slot in lock.of_kind("key-file") if slot.fingerprint == fingerprint]

    def _first(self, lock: KeyLock, tries: list, refused: str) -> Keyring:
        """The keyring of the first slot that opens (remembered in self.opened), or refused."""
        for slot, kek in tries:
            keyring = lock.open_slot(slot, kek)
            if keyring is not None:
                self.opened = slot
                return keyring
        raise RpfsError(refused)


# -- key files and recovery keys ---------------------------------------------------------------------
def read_private_file(path: Path, what: str) -> bytes:
    """A secret file's bytes, refused unless it is the caller's and nobody else may read or change it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise RpfsError(f"{what} {path} does not exist") from None
    except PermissionError:
        raise RpfsError(f"{what} {path}: permission denied") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise RpfsError(f"{what} {path} is not a regular file")
        if st.st_uid != os.geteuid():
            raise RpfsError(f"{what} {path} is {owner_name(st.st_uid)}'s: it must be"
                            f" {owner_name(os.geteuid())}'s alone")
        if st.st_mode & 0o077:
            raise RpfsError(f"{what} {path} has mode {stat.S_IMODE(st.st_mode):04o}, so others may read it:"
                            f" chmod 600 {path}")
        return os.read(fd, 1 << 16)
    finally:
        os.close(fd)


def read_key_file(path: Path) -> bytes:
    text = read_private_file(path, "key file").decode(errors="replace")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    try:
        key = base64.b64decode(lines[-1], validate=True) if len(lines) == 1 else b""
    except ValueError:
        key = b""
    if len(key) != KEY_SIZE:
        raise RpfsError(f"{path} is not an rpfs key file (rpfs init --key-file or rpfs key add --new-key-file"
                        " make one)")
    return key


def create_key_file(path: Path) -> bytes:
    """A new key file of 32 random bytes, mode 0600, never over an existing file."""
    key = os.urandom(KEY_SIZE)
    try:
        create_whole(path, (KEY_FILE_HEADER + base64.b64encode(key).decode() + "\n").encode())
    except FileExistsError:
        raise RpfsError(f"{path} already exists") from None
    except FileNotFoundError:
        raise RpfsError(f"cannot make key file {path}: its folder does not exist") from None
    except PermissionError:
        raise RpfsError(f"cannot make key file {path}: permission denied") from None
    return key


def key_file_key(path: Path) -> bytes:
    """The key of a key file, made first if there is none at path (a key file is never overwritten)."""
    return read_key_file(path) if os.path.lexists(path) else create_key_file(path)


def read_public_key(path: Path) -> bytes:
    """A recovery public key (X25519, PEM, as `openssl pkey -pubout` writes it): its raw 32 bytes."""
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except FileNotFoundError:
        raise RpfsError(f"recovery public key {path} does not exist") from None
    except (ValueError, UnsupportedAlgorithm):
        key = None
    if not isinstance(key, X25519PublicKey):
        raise RpfsError(f"{path} is not an X25519 public key in PEM (make one with: openssl genpkey -algorithm"
                        " X25519 -out recovery.pem; openssl pkey -in recovery.pem -pubout -out recovery.pub)")
    return key.public_bytes_raw()


def _recovery_slots(lock: KeyLock, private_key_file: str) -> list:
    """(slot, key-encryption key maker) for the recovery slots this private key may open."""
    try:
        private = serialization.load_pem_private_key(read_private_file(Path(private_key_file), "private key"), None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        private = None
    if not isinstance(private, X25519PrivateKey):
        raise RpfsError(f"{private_key_file} is not an unencrypted X25519 private key in PEM")
    public = private.public_key().public_bytes_raw()

    def kek(slot: KeySlot) -> bytes:
        ephemeral = bytes.fromhex(slot.ephemeral)
        return derive_key(private.exchange(X25519PublicKey.from_public_bytes(ephemeral)), ephemeral + public,
                          "recovery slot")
    return [(slot, lambda slot=slot: kek(slot)) for slot in lock.of_kind("recovery")
            if slot.fingerprint == key_fingerprint(public, lock.store_id)]


# -- the master key on paper -------------------------------------------------------------------------
def paper_text(master: bytes, store: Path, store_id: bytes, fingerprint: str) -> str:
    """The master key as groups of base32 with a checksum group, to be typed back in (key recover --paper),
    and the store's fingerprint (a vault recovered without the store must show it)."""
    encoded = base64.b32encode(master + _paper_check(master)).decode().rstrip("=")
    groups = [encoded[i:i + PAPER_GROUP] for i in range(0, len(encoded), PAPER_GROUP)]
    lines = [" ".join(groups[i:i + 8]) for i in range(0, len(groups), 8)]
    return (f"rpfs master key of store {store} (id {store_id.hex()})\n"
            "Whoever has this page can read every backup in that store: keep it locked away.\n"
            "Type it back in with: rpfs key recover --paper FILE (spaces and case do not matter)\n"
            f"Store fingerprint: {fingerprint} (a vault you recover from must show the same)\n\n"
            + "\n".join(lines) + "\n")


def _paper_check(master: bytes) -> bytes:
    return blake3.blake3(b"rpfs paper key\0" + master).digest()[:3]


def parse_paper(text: str) -> bytes:
    """The master key from paper_text's key lines: the lines made only of groups of up to four base32
    characters (any case, look-alikes read as what they look like), whatever else the text holds."""
    groups = []
    for line in text.upper().translate(_LOOKALIKES).splitlines():
        if _FINGERPRINT_LINE.fullmatch(line.strip()):
            continue   # the store fingerprint, written down on the same page: not part of the key
        words = line.replace("-", " ").split()
        if words and all(_PAPER_WORD.fullmatch(word) for word in words):
            groups += words
    compact = "".join(groups)
    try:
        raw = base64.b32decode(compact + "=" * (-len(compact) % 8))
    except ValueError:
        raw = b""
    if len(raw) != KEY_SIZE + 3:
        raise RpfsError("the paper key does not have the right length: check for a missing or extra group")
    master, check = raw[:KEY_SIZE], raw[KEY_SIZE:]
    if _paper_check(master) != check:
        raise RpfsError("the paper key's checksum does not match: check it for a typo")
    return master

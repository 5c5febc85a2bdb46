"""Where each vault is: a name -> S3 endpoint, bucket and key prefix, in RPFS_CONFIG/vaults.json.
An endpoint file:///folder is a local folder instead (folder_bucket.py): for tests and local experiments.

Kept apart from the store so that a machine without a store (disaster recovery) can name a vault too:
`rpfs vault add` on it records the address, and the vault itself holds everything else. Credentials are
not kept here: boto3 finds them (AWS_* variables, AWS_SHARED_CREDENTIALS_FILE, ~/.aws/credentials).
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from urllib.parse import urlparse

from rpfs.errors import RpfsError
from rpfs.host.access import make_private_folder, open_trusted
from rpfs.host.files import write_whole
from rpfs.host.known_stores import config_folder
from rpfs.host.untrusted import parse_json
from rpfs.store.recovery_point import NAME_RE

@dataclass
class VaultConfig:
    name: str
    endpoint: str
    bucket: str
    prefix: str = ""
    store_id: str = ""     # the vault as it was when added: a bucket that holds another one since is refused
    key_check: str = ""
    keys_behind: str = ""  # when a key change of the store could not be sent to the vault (vault/keys.py)

    @property
    def label(self) -> str:
        return f"vault {self.name}"


def vaults() -> dict[str, VaultConfig]:
    """Every vault named on this machine (root's file: it says where root sends and reads backups)."""
    path = config_folder() / "vaults.json"
    if not path.exists():
        return {}
    fd = open_trusted(path, "vault list")
    try:
        with os.fdopen(fd, "rb") as f:
            fd = -1
            found = parse_json(f.read())
        return {name: VaultConfig(**entry) for name, entry in found.items()}
    except (ValueError, TypeError, AttributeError):
        raise RpfsError(f"{path} is damaged (not the vault list rpfs writes); fix or remove it") from None
    finally:
        if fd >= 0:
            os.close(fd)


def vault_config(name: str) -> VaultConfig:
    found = vaults()
    if name not in found:
        known = ", ".join(sorted(found)) or "none"
        raise RpfsError(f"unknown vault {name!r} (vaults: {known}; add one with rpfs vault add NAME --endpoint URL"
                        " --bucket BUCKET)")
    return found[name]


def checked(config: VaultConfig) -> VaultConfig:
    """Refuse a name, endpoint or bucket that cannot work, before anything is asked of the network."""
    if not NAME_RE.fullmatch(config.name):
        raise RpfsError(f"invalid vault name {config.name!r}: use letters, digits, '.', '_', '+', '-'")
    url = urlparse(config.endpoint)
    if url.scheme == "file":   # a folder (folder_bucket.py): for tests and local experiments
        if url.netloc or not url.path.startswith("/"):
            raise RpfsError(f"--endpoint {config.endpoint!r} names no folder (file:///path/to/folder)")
    elif url.scheme not in ("http", "https") or not url.hostname:
        raise RpfsError(f"--endpoint {config.endpoint!r} is not an http(s) URL (e.g. http://127.0.0.1:7480) nor"
                        " file:///folder (a local folder: for tests and local experiments)")
    if not 3 <= len(config.bucket) <= 63 or not all(c.isalnum() or c in ".-" for c in config.bucket) \
            or config.bucket != config.bucket.lower():
        raise RpfsError(f"--bucket {config.bucket!r} is not an S3 bucket name (3-63 lowercase letters, digits,"
                        " '.', '-')")
    return config


def save(config: VaultConfig) -> None:
    """Add or replace one vault in the list, written whole (0600 in a 0700 folder)."""
    folder = config_folder()
    found = vaults()
    found[config.name] = config
    make_private_folder(folder, "config folder")
    data = json.dumps({name: asdict(c) for name, c in sorted(found.items())}, indent=2).encode() + b"\n"
    write_whole(folder / "vaults.json", data, durable=True)


def remove(name: str) -> None:
    found = vaults()
    if found.pop(name, None) is None:
        vault_config(name)   # raises: unknown
    data = json.dumps({n: asdict(c) for n, c in sorted(found.items())}, indent=2).encode() + b"\n"
    write_whole(config_folder() / "vaults.json", data, durable=True)

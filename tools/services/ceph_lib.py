"""The parts of tools/ceph that talk HTTP or JSON: the S3 user's credentials file and the readiness probe.

    python3 tools/services/ceph_lib.py credentials CONF UID FILE   # the user's keys (made on first use) into FILE
    python3 tools/services/ceph_lib.py probe ENDPOINT [--credentials FILE]
    python3 tools/services/ceph_lib.py wait ENDPOINT --timeout S [--credentials FILE] [--pid-file P ...]

Standard library only: it runs with the system python3 that ceph-common needs anyway, before any venv exists.
The probe is a real S3 ListBuckets signed with SigV4, so "ready" means the gateway, its pools and the user work.
"""
from __future__ import annotations

import argparse
import configparser
import datetime
import hashlib
import hmac
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

REGION = "us-east-1"  # RGW signs with whatever region the client names; boto3's default keeps create_bucket plain


@dataclass(frozen=True)
class S3Keys:
    access_key: str
    secret_key: str


def read_keys(path: Path) -> S3Keys:
    ini = configparser.ConfigParser()
    ini.read(path)
    return S3Keys(ini["default"]["aws_access_key_id"], ini["default"]["aws_secret_access_key"])


def write_keys(path: Path, keys: S3Keys) -> None:
    """Written whole or not at all: a new 0600 file renamed into place, then the folder fsynced."""
    text = f"[default]\naws_access_key_id = {keys.access_key}\naws_secret_access_key = {keys.secret_key}\n"
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)
    dirfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dirfd)
    finally:
        os.close(dirfd)


def user_keys(conf: Path, uid: str) -> S3Keys:
    """The user's first S3 key pair; the user is created if it does not exist yet (so a rerun is harmless)."""
    admin = ["radosgw-admin", "--conf", str(conf)]
    info = subprocess.run(admin + ["user", "info", f"--uid={uid}"], capture_output=True, text=True)
    if info.returncode != 0:
        info = subprocess.run(admin + ["user", "create", f"--uid={uid}", f"--display-name={uid}"],
                              capture_output=True, text=True)
        if info.returncode != 0:
            raise SystemExit(f"ceph: radosgw-admin user create failed: {info.stderr.strip()}")
    key = json.loads(info.stdout)["keys"][0]
    return S3Keys(key["access_key"], key["secret_key"])


def _hmac(key: bytes, text: str) -> bytes:
    return hmac.new(key, text.encode(), hashlib.sha256).digest()


def list_buckets_request(endpoint: str, keys: S3Keys | None) -> urllib.request.Request:
    """GET / (ListBuckets); signed with SigV4 when keys are given, anonymous otherwise."""
    request = urllib.request.Request(endpoint.rstrip("/") + "/", method="GET")
    if keys is None:
        return request
    host = urllib.parse.urlsplit(endpoint).netloc
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    empty = hashlib.sha256(b"").hexdigest()
    signed = "host;x-amz-content-sha256;x-amz-date"
    canonical = f"GET\n/\n\nhost:{host}\nx-amz-content-sha256:{empty}\nx-amz-date:{stamp}\n\n{signed}\n{empty}"
    scope = f"{stamp[:8]}/{REGION}/s3/aws4_request"
    to_sign = f"AWS4-HMAC-SHA256\n{stamp}\n{scope}\n{hashlib.sha256(canonical.encode()).hexdigest()}"
    key = _hmac(("AWS4" + keys.secret_key).encode(), stamp[:8])
    for part in (REGION, "s3", "aws4_request"):
        key = _hmac(key, part)
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    request.add_header("x-amz-date", stamp)
    request.add_header("x-amz-content-sha256", empty)
    request.add_header("Authorization",
                       f"AWS4-HMAC-SHA256 Credential={keys.access_key}/{scope}, SignedHeaders={signed}, "
                       f"Signature={signature}")
    return request


def probe(endpoint: str, keys: S3Keys | None, timeout: float = 2.0) -> str | None:
    """None when ListBuckets answers 200, else why not (one line)."""
    try:
        with urllib.request.urlopen(list_buckets_request(endpoint, keys), timeout=timeout) as response:
            response.read()
            return None if response.status == 200 else f"HTTP {response.status}"
    except urllib.error.HTTPError as error:
        return f"HTTP {error.code}: {error.read(300).decode(errors='replace')}"
    except (OSError, urllib.error.URLError) as error:
        return str(getattr(error, "reason", error))


def alive(pid_file: Path) -> bool:
    """A zombie counts as dead: pid 1 here reaps the daemons (orphans once they fork) only every second or two."""
    try:
        stat = Path(f"/proc/{int(pid_file.read_text().strip())}/stat").read_text()
    except (OSError, ValueError):
        return False
    return stat.rsplit(") ", 1)[1].split()[0] != "Z"


def wait(endpoint: str, keys: S3Keys | None, timeout: float, pid_files: list[Path]) -> int:
    """Retry the probe until it answers or the deadline passes; give up at once if a daemon died."""
    deadline = time.monotonic() + timeout
    delay = 0.05
    while True:
        reason = probe(endpoint, keys)
        if reason is None:
            return 0
        dead = [p.name.removesuffix(".pid") for p in pid_files if not alive(p)]
        if dead:
            print(f"ceph: {', '.join(dead)} exited while waiting for {endpoint}", file=sys.stderr)
            return 1
        if time.monotonic() > deadline:
            print(f"ceph: {endpoint} did not answer within {timeout:.0f} s: {reason}", file=sys.stderr)
            return 1
        time.sleep(delay)
        delay = min(delay * 2, 0.5)


def main() -> int:
    parser = argparse.ArgumentParser(prog="ceph_lib.py")
    commands = parser.add_subparsers(dest="command", required=True)
    credentials = commands.add_parser("credentials")
    credentials.add_argument("conf", type=Path)
    credentials.add_argument("uid")
    credentials.add_argument("file", type=Path)
    for name in ("probe", "wait"):
        command = commands.add_parser(name)
        command.add_argument("endpoint")
        command.add_argument("--credentials", type=Path)
    commands.choices["wait"].add_argument("--timeout", type=float, required=True)
    commands.choices["wait"].add_argument("--pid-file", type=Path, action="append", default=[])
    args = parser.parse_args()

    if args.command == "credentials":
        write_keys(args.file, user_keys(args.conf, args.uid))
        return 0
    keys = read_keys(args.credentials) if args.credentials else None
    if args.command == "probe":
        reason = probe(args.endpoint, keys)
        if reason is not None:
            print(f"ceph: {args.endpoint}: {reason}", file=sys.stderr)
        return 0 if reason is None else 1
    return wait(args.endpoint, keys, args.timeout, args.pid_file)


if __name__ == "__main__":
    sys.exit(main())

"""The S3 calls of the vault, through boto3: one bucket, a key prefix, errors as one line each.

boto3 retries transient errors itself (standard mode: throttling, 5xx, dropped connections, with
exponential backoff and jitter); what still fails becomes an RpfsError naming the vault and the object.
Ceph 16's gateway ignores the newer x-amz-checksum headers, so checksums are sent only when an
operation requires them, and addressing is path-style (a bucket name in the host needs DNS we lack).
"""
from __future__ import annotations

import os
from datetime import datetime
from typing import BinaryIO, Iterator

import boto3
import botocore.config
import botocore.exceptions
import botocore.loaders
import botocore.session
from boto3.s3.transfer import TransferConfig

from rpfs.errors import RpfsError

RETRIES = 6                 # attempts per request (boto3's standard mode backs off between them)
PART_BYTES = 8 << 20        # multipart part size of a streamed upload
PARTS_IN_FLIGHT = 6         # parts of one object uploaded at once: about PART_BYTES x (this + 1) in memory
MISSING = ("NoSuchKey", "404", "NotFound", "NoSuchUpload")


class Bucket:
    """One bucket (and key prefix) of an S3 endpoint. Thread-safe: boto3 clients are."""

    def __init__(self, label: str, endpoint: str, bucket: str, prefix: str = ""):
        self.label, self.endpoint, self.name = label, endpoint, bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        config = botocore.config.Config(
            retries={"max_attempts": RETRIES, "mode": "standard"}, connect_timeout=5, read_timeout=60,
            s3={"addressing_style": "path"}, max_pool_connections=16,
            request_checksum_calculation="when_required", response_checksum_validation="when_required")
        session = _session()
        try:
            self._client = session.client("s3", endpoint_url=endpoint or None, config=config,
                                          region_name=session.region_name or "us-east-1")
        except (ValueError, botocore.exceptions.BotoCoreError) as e:
            raise RpfsError(f"{label}: cannot use endpoint {endpoint!r}: {e}") from None
        self._transfer = TransferConfig(multipart_threshold=PART_BYTES, multipart_chunksize=PART_BYTES,
                                        max_concurrency=PARTS_IN_FLIGHT, max_io_queue=PARTS_IN_FLIGHT,
                                        use_threads=True)
        self._transfer.max_in_memory_upload_chunks = PARTS_IN_FLIGHT + 1   # s3transfer's knob; boto3 hides it

    def key(self, name: str) -> str:
        return self.prefix + name

    def get(self, name: str, start: int = 0, length: int | None = None) -> bytes | None:
        """An object's bytes, or length bytes from start (a ranged GET); None if there is no such object."""
        extra = {} if length is None else {"Range": f"bytes={start}-{start + length - 1}"}
        try:
            with self._calling(f"read {name}"):
                body = self._client.get_object(Bucket=self.name, Key=self.key(name), **extra)["Body"]
                data = body.read()
        except _Missing:
            return None
        if length is not None and len(data) != length:
            raise RpfsError(f"{self.label}: {name} is shorter than its index says ({len(data)} of {length} bytes"
                            f" at {start})")
        return data

    def put(self, name: str, data: bytes) -> None:
        with self._calling(f"write {name}"):
            self._client.put_object(Bucket=self.name, Key=self.key(name), Body=data)

    def put_stream(self, name: str, stream: BinaryIO) -> None:
        """Upload a stream as one object, in parts uploaded in parallel: it exists only once complete."""
        with self._calling(f"write {name}"):
            self._client.upload_fileobj(stream, self.name, self.key(name), Config=self._transfer)

    def delete(self, name: str) -> None:
        with self._calling(f"delete {name}"):
            self._client.delete_object(Bucket=self.name, Key=self.key(name))

    def names(self, under: str) -> Iterator[tuple[str, int]]:
        """(name, size) of every object whose name starts with `under`, in key order."""
        for name, size, _modified in self.listing(under):
            yield name, size

    def listing(self, under: str) -> Iterator[tuple[str, int, datetime]]:
        """(name, size, last modified by the gateway's clock) of every object whose name starts with `under`."""
        pages = self._client.get_paginator("list_objects_v2").paginate(Bucket=self.name, Prefix=self.key(under))
        with self._calling(f"list {under}"):
            for page in pages:
                for item in page.get("Contents", []):
                    yield item["Key"][len(self.prefix):], item["Size"], item["LastModified"]

    def unfinished_uploads(self, under: str) -> list[tuple[str, str]]:
        """(name, upload id) of the multipart uploads under `under` that were started and never completed
        nor aborted (a killed push leaves one: its parts take space but no listing shows them)."""
        found = []
        with self._calling(f"list the unfinished uploads under {under}"):
            for page in self._client.get_paginator("list_multipart_uploads").paginate(Bucket=self.name,
                                                                                      Prefix=self.key(under)):
                found += [(u["Key"][len(self.prefix):], u["UploadId"]) for u in page.get("Uploads", [])]
        return found

    def abort_upload(self, name: str, upload_id: str) -> None:
        try:
            with self._calling(f"abort the upload of {name}"):
                self._client.abort_multipart_upload(Bucket=self.name, Key=self.key(name), UploadId=upload_id)
        except _Missing:
            pass   # completed or aborted meanwhile

    def ensure_bucket(self) -> None:
        """Create the bucket unless it exists (ours already, or anyone's we may write to)."""
        try:
            with self._calling("look up the bucket"):
                self._client.head_bucket(Bucket=self.name)
            return
        except _Missing:
            pass
        with self._calling("create the bucket"):
            self._client.create_bucket(Bucket=self.name)

    def _calling(self, what: str):
        return _Translated(self, what)


class _Missing(Exception):
    """The object or bucket is not there (a normal answer, not a failure)."""


class _Translated:
    """Turn what boto3 raises into one line: missing objects into _Missing, the rest into RpfsError."""

    def __init__(self, bucket: Bucket, what: str):
        self.bucket, self.what = bucket, what

    def __enter__(self):
        return self

    def __exit__(self, kind, error, tb):
        if error is None or not isinstance(error, (botocore.exceptions.BotoCoreError,
                                                   botocore.exceptions.ClientError, boto3.exceptions.Boto3Error)):
            return False
        where = f"{self.bucket.label} ({self.bucket.endpoint}, bucket {self.bucket.name})"
        if isinstance(error, botocore.exceptions.ClientError):
            code = error.response.get("Error", {}).get("Code", "")
            if code in MISSING:
                raise _Missing() from None
            if code == "NoSuchBucket":
                raise RpfsError(f"{where}: the bucket does not exist") from None
            if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403"):
                raise RpfsError(f"{where}: access denied ({code}) to {self.what}: check the S3 credentials"
                                " (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_SHARED_CREDENTIALS_FILE)"
                                ) from None
            raise RpfsError(f"{where}: cannot {self.what}: {code or error}") from None
        if isinstance(error, botocore.exceptions.NoCredentialsError):
            raise RpfsError(f"{where}: no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or"
                            " AWS_SHARED_CREDENTIALS_FILE (default ~/.aws/credentials)") from None
        if isinstance(error, boto3.exceptions.S3UploadFailedError) and "NoSuchBucket" in str(error):
            raise RpfsError(f"{where}: the bucket does not exist") from None
        raise RpfsError(f"{where}: cannot {self.what}: {error} (after {RETRIES} tries)") from None


SERVICES = ("s3", "sts", "sso", "sso-oidc")   # what _S3Only lets botocore load


class _S3Only(botocore.loaders.Loader):
    """botocore's loader of its service models, told that S3 and the services its credential providers call
    are the only ones: to check the name it is given it listed its 400 services first (6,000 stats: 0.15 to
    0.4 s of every vault command's start). STS serves roles (role_arn, web identity), SSO and SSO-OIDC the
    SSO profiles: without them those credentials failed to load."""

    def list_available_services(self, type_name: str) -> list[str]:
        return list(SERVICES)


def _session() -> boto3.session.Session:
    """A boto3 session as boto3 makes it (credentials, region, AWS_DATA_PATH), listing SERVICES alone. The
    region is boto3's or us-east-1: an S3 service on premises needs one to sign with."""
    core = botocore.session.Session()
    data_path = core.get_config_variable("data_path")
    extra = [os.path.expanduser(os.path.expandvars(p)) for p in data_path.split(os.pathsep)] if data_path else None
    core.register_component("data_loader", _S3Only(extra_search_paths=extra))
    return boto3.session.Session(botocore_session=core)

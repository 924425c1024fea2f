"""Chunk store in S3 or any S3-compatible object store (MinIO, Ceph RGW, R2, GCS with HMAC
keys): boto3 with the standard credential chain, chunks fetched as parallel ranged GETs."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from typing import Any
from urllib.parse import urlsplit

import boto3
import botocore.exceptions as bce
from botocore.config import Config

from ..errors import ChunkStoreError
from ..format.manifest import check_relative_name
from .base import ReadResult
from .ranged import Permanent, RangedReader, StoreOptions, Transient, parse_content_range

log = logging.getLogger(__name__)

RETRY_CODES = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "InternalError",
    "ServiceUnavailable",
    "503",
    "500",
}
CREDENTIAL_CODES = {
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "403",
}
CREDENTIALS_HINT = (
    "check the credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or the "
    "s3_profile setting, or the pod's IAM role) and that they may read this bucket"
)


@dataclass(frozen=True)
class S3Location:
    """``s3://bucket/prefix``: a store's files are the objects ``prefix/<name>``. Shared by
    the store (reads) and the chunker's sink (writes), so both name objects alike."""

    bucket: str
    prefix: str  # without slashes at either end; "" for the bucket's root

    @classmethod
    def parse(cls, uri: str) -> S3Location:
        parts = urlsplit(uri)
        if parts.scheme != "s3" or not parts.netloc:
            raise ChunkStoreError(f"{uri!r} is not an s3://bucket/prefix URI")
        return cls(parts.netloc, parts.path.strip("/"))

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}".rstrip("/")

    def key(self, name: str) -> str:
        """The object key of the store's file ``name`` (refusing names that leave it)."""
        check_relative_name(name, f"chunk store {self.uri}")
        return f"{self.prefix}/{name}" if self.prefix else name

    def list_keys(self, client: Any) -> list[str]:
        """Every object key under the prefix (botocore errors are the caller's to word)."""
        pages = client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self._start
        )
        return [o["Key"] for p in pages for o in p.get("Contents", [])]

    def name_of(self, key: str) -> str:
        """The store file name of an object key from ``list_keys``."""
        return key[len(self._start) :]

    @property
    def _start(self) -> str:
        return f"{self.prefix}/" if self.prefix else ""


def make_client(options: StoreOptions):
    """A boto3 S3 client: credentials from the standard chain (or the named profile); our own
    retry policy replaces botocore's, so it can honour one deadline across a ranged read."""
    try:
        session = boto3.session.Session(profile_name=options.profile)
    except bce.ProfileNotFound as exc:
        raise ChunkStoreError(f"s3_profile {options.profile!r} is not in ~/.aws/config") from exc
    config = Config(
        connect_timeout=options.connect_timeout_s,
        read_timeout=options.read_timeout_s,
        retries={"total_max_attempts": 1},
        max_pool_connections=options.max_concurrency + 2,
        s3={"addressing_style": options.addressing_style},
    )
    return session.client(
        "s3", endpoint_url=options.endpoint_url, region_name=options.region, config=config
    )


def describe_error(exc: Exception, where: str) -> Exception:
    """Turn a botocore error into Transient (worth retrying) or Permanent (with the fix)."""
    if isinstance(exc, bce.ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        message = error.get("Message") or code
        if code in RETRY_CODES or (status is not None and status >= 500) or status == 429:
            return Transient(f"{code or status} ({message})")
        if code in ("NoSuchKey", "404", "NotFound"):
            return Permanent(f"{where} does not exist; check chunk_store or re-run the chunker")
        if code == "NoSuchBucket":
            return Permanent(f"{where}: the bucket does not exist (check chunk_store)")
        if code in CREDENTIAL_CODES:
            return Permanent(f"{where}: access denied ({code}); {CREDENTIALS_HINT}")
        if code in ("PreconditionFailed", "412"):
            return Permanent(f"{where} changed while it was being read; retry the request")
        return Permanent(f"{where}: {code} ({message})")
    if isinstance(exc, (bce.NoCredentialsError, bce.PartialCredentialsError)):
        return Permanent(f"{where}: no usable AWS credentials ({exc}); {CREDENTIALS_HINT}")
    if isinstance(exc, bce.EndpointConnectionError):
        return Transient(
            f"cannot connect to the endpoint ({exc}); check s3_endpoint_url / s3_region and "
            "that the object store is reachable"
        )
    if isinstance(exc, (bce.HTTPClientError, bce.IncompleteReadError, bce.ResponseStreamingError)):
        return Transient(f"{type(exc).__name__}: {exc}")
    return Permanent(f"{where}: {type(exc).__name__}: {exc}")


BOTO_ERRORS = (bce.BotoCoreError, bce.ClientError)


def _total_size(response: dict, where: str) -> int:
    """The object's size from a ranged GET's answer (a whole-object answer has no range)."""
    content_range = response.get("ContentRange")
    if content_range:
        return parse_content_range(content_range, where)[2]
    return response["ContentLength"]


def _status(exc: bce.ClientError) -> int | None:
    return exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")


class S3Store:
    """``s3://bucket/prefix``: the store's files are objects ``prefix/<name>``."""

    def __init__(self, uri: str, options: StoreOptions | None = None):
        self.options = options or StoreOptions()
        self.location = S3Location.parse(uri)
        self.bucket = self.location.bucket
        self.uri = self.location.uri
        self._client = make_client(self.options)
        self._ranged = RangedReader(self.options)

    def _key(self, name: str) -> str:
        return self.location.key(name)

    def _where(self, name: str) -> str:
        return f"s3://{self.bucket}/{self._key(name)}"

    def _get(self, name: str, view: memoryview | None, **kwargs) -> tuple[dict, bytes | int]:
        where = self._where(name)
        try:
            response = self._client.get_object(Bucket=self.bucket, Key=self._key(name), **kwargs)
            body = response["Body"]
            try:
                if view is None:
                    return response, body.read()  # botocore checks Content-Length
                filled = 0
                while filled < len(view):
                    piece = body.read(min(1 << 20, len(view) - filled))
                    if not piece:
                        break
                    view[filled : filled + len(piece)] = piece
                    filled += len(piece)
                if body.read(1):
                    raise Transient("the server sent more bytes than asked for")
                return response, filled
            finally:
                body.close()
        except BOTO_ERRORS as exc:
            raise describe_error(exc, where) from exc

    # -- the ChunkStore contract ----------------------------------------------------------
    def read(self, name: str) -> bytes:
        _, body = self._ranged.policy.run(lambda: self._get(name, None), self._where(name))
        assert isinstance(body, bytes)
        return body

    def read_if_changed(self, name: str, version: str | None) -> tuple[bytes | None, str | None]:
        """(None, version) when the object still has ETag ``version`` (304: no body sent),
        else (its bytes, their ETag)."""
        where = self._where(name)

        def get() -> tuple[bytes | None, str | None]:
            try:
                response, body = self._get(
                    name, None, **({"IfNoneMatch": version} if version else {})
                )
            except Permanent as exc:
                cause = exc.__cause__
                if isinstance(cause, bce.ClientError) and _status(cause) == 304:
                    return None, version
                raise
            assert isinstance(body, bytes)
            return body, response.get("ETag")

        return self._ranged.policy.run(get, where)

    def read_into(self, name: str, buffer: memoryview, size: int | None = None) -> ReadResult:
        where = self._where(name)

        def first(whole: memoryview, length: int) -> tuple[int, int, str | None]:
            view = whole[:length]
            response, filled = self._get(name, view, Range=f"bytes=0-{length - 1}")
            assert isinstance(filled, int)
            total = _total_size(response, where)
            if filled < min(len(view), total):
                raise Transient(f"body cut short ({filled} bytes)")
            return filled, total, response.get("ETag")

        # The ETag kept the parts consistent (If-Match); it is not returned as the version,
        # which would let the streamer skip hashing: bytes that crossed a network are
        # checked on every read.
        got, _ = self._ranged.read(where, buffer, first, partial(self._part, name), size)
        return ReadResult(got, None)

    def read_ranges(
        self, name: str, buffer: memoryview, ranges: list[tuple[int, int]], size: int
    ) -> ReadResult:
        got = self._ranged.read_ranges(
            self._where(name), buffer, partial(self._part, name), ranges, size
        )
        return ReadResult(got, None)  # hashed on every read, as whole chunks are

    def _part(self, name: str, offset: int, view: memoryview, version: str | None) -> int:
        """Fill ``view`` exactly from ``offset``; returns the object size S3 reported (an
        object shorter than the manifest says: the caller reports it)."""
        extra = {"IfMatch": version} if version else {}
        rng = f"bytes={offset}-{offset + len(view) - 1}"
        response, filled = self._get(name, view, Range=rng, **extra)
        total = parse_content_range(response.get("ContentRange"), self._where(name))[2]
        if filled != len(view) and total >= offset + len(view):
            raise Transient(f"asked for {len(view)} bytes at {offset}, got {filled}")
        return total

    def read_head(self, name: str, length: int) -> tuple[bytes, int | None]:
        where = self._where(name)

        def get() -> tuple[bytes, int | None]:
            response, body = self._get(name, None, Range=f"bytes=0-{length - 1}")
            assert isinstance(body, bytes)
            return body[:length], _total_size(response, where)

        return self._ranged.policy.run(get, where)

    def exists(self, name: str) -> bool:
        where = self._where(name)

        def head() -> bool:
            try:
                self._client.head_object(Bucket=self.bucket, Key=self._key(name))
                return True
            except BOTO_ERRORS as exc:
                if isinstance(exc, bce.ClientError) and exc.response.get("Error", {}).get(
                    "Code"
                ) in ("404", "NoSuchKey", "NotFound"):
                    return False
                raise describe_error(exc, where) from exc

        return self._ranged.policy.run(head, where)

    def list(self) -> list[str]:
        def listing() -> list[str]:
            try:
                keys = self.location.list_keys(self._client)
                return sorted(self.location.name_of(key) for key in keys)
            except BOTO_ERRORS as exc:
                raise describe_error(exc, self.uri) from exc

        return self._ranged.policy.run(listing, self.uri)

    def close(self) -> None:
        self._ranged.close()

"""Chunk store behind any HTTP(S) static file server (nginx, S3 website, a CDN): ranged GETs
over a pool of reused connections."""

from __future__ import annotations

import contextlib
import logging
import ssl
from collections.abc import Iterator
from functools import partial
from urllib.parse import quote, urlsplit

import httpx

from ..errors import ChunkStoreError
from ..format.manifest import check_relative_name
from .base import ReadResult
from .ranged import Permanent, RangedReader, StoreOptions, Transient, parse_content_range

log = logging.getLogger(__name__)

RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}


class HTTPStore:
    """``http(s)://host/path``: the store's files are ``http(s)://host/path/<name>``."""

    def __init__(self, url: str, options: StoreOptions | None = None):
        self.options = options or StoreOptions()
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ChunkStoreError(f"chunk store {url!r} is not an http(s):// URL")
        if parts.query or parts.fragment:
            raise ChunkStoreError(f"chunk store {url!r}: no query or fragment allowed")
        self.uri = url.rstrip("/")
        headers = {"Accept-Encoding": "identity", **self.options.headers}
        if self.options.bearer_token:
            headers["Authorization"] = f"Bearer {self.options.bearer_token}"
        verify: bool | ssl.SSLContext = self.options.verify_tls
        if self.options.verify_tls and self.options.ca_bundle:
            try:
                verify = ssl.create_default_context(cafile=self.options.ca_bundle)
            except (OSError, ssl.SSLError) as exc:
                raise ChunkStoreError(
                    f"http_ca_bundle {self.options.ca_bundle!r} is not a readable PEM CA bundle "
                    f"({exc})"
                ) from exc
        if not self.options.verify_tls:
            log.warning("chunk store %s: TLS verification is OFF (http_verify_tls=false)", url)
        if parts.scheme == "http" and self.options.bearer_token:
            log.warning("chunk store %s: sending a bearer token over plain http", self.uri)
        self._client = httpx.Client(
            headers=headers,
            verify=verify,
            timeout=httpx.Timeout(
                self.options.read_timeout_s, connect=self.options.connect_timeout_s
            ),
            limits=httpx.Limits(
                max_connections=self.options.max_concurrency + 2,
                max_keepalive_connections=self.options.max_concurrency + 2,
            ),
            follow_redirects=True,
        )
        self._ranged = RangedReader(self.options)
        self._ranges = False  # whether the server honours Range (learned on the first read)

    def _url(self, name: str) -> str:
        check_relative_name(name, f"chunk store {self.uri}")
        return f"{self.uri}/{quote(name)}"

    # -- one request ---------------------------------------------------------------------
    def _get(
        self, name: str, view: memoryview | None, headers: dict[str, str], part: bool = False
    ) -> tuple[httpx.Response, bytes | int]:
        """One GET: the body into ``view`` (returns bytes filled) or as bytes. Transient
        failures raise Transient, the rest a ChunkStoreError naming the URL. ``part``: a
        ranged GET that only a 206 answers."""
        url = self._url(name)
        with _transport_errors(url), self._client.stream("GET", url, headers=headers) as response:
            self._check_status(response, url)
            if part and response.status_code == 200:
                raise Permanent(
                    f"{url} ignores byte ranges (HTTP 200 to a Range request); reading part "
                    "of a chunk (expert streaming) needs a server that honours them: set "
                    "expert_streaming=off, or serve the store from one that does"
                )
            if view is None:
                body = response.read()
                _check_length(response, len(body), url)
                return response, body
            filled = 0
            for piece in response.iter_raw():
                end = filled + len(piece)
                if end > len(view) and response.status_code == 200:
                    raise Permanent(
                        f"{url} has more than {len(view)} bytes, more than the manifest "
                        "allows; the store was modified after chunking: re-run the chunker"
                    )
                if end > len(view):
                    raise Transient("the server sent more bytes than asked for")
                view[filled:end] = piece
                filled = end
            _check_length(response, filled, url)
            return response, filled

    @staticmethod
    def _check_status(response: httpx.Response, url: str) -> None:
        status = response.status_code
        if status in (200, 206, 304):
            return
        if status in RETRY_STATUS:
            raise Transient(f"HTTP {status}")
        if status == 404:
            raise Permanent(f"{url} is missing (HTTP 404); check chunk_store or re-run the chunker")
        if status in (401, 403):
            raise Permanent(
                f"{url}: HTTP {status}, access denied; set http_bearer_token or http_headers "
                "to credentials the server accepts"
            )
        if status == 416:
            raise Permanent(
                f"{url} ends before the range asked for (HTTP 416); the store was modified "
                "after chunking: re-run the chunker"
            )
        if status == 412:
            raise Permanent(f"{url} changed while it was being read; retry the request")
        raise Permanent(f"{url}: unexpected HTTP {status}")

    # -- the ChunkStore contract ----------------------------------------------------------
    def read(self, name: str) -> bytes:
        _, body = self._ranged.policy.run(lambda: self._get(name, None, {}), self._url(name))
        assert isinstance(body, bytes)
        return body

    def read_if_changed(self, name: str, version: str | None) -> tuple[bytes | None, str | None]:
        """(None, version) when the server says ``name`` still has ``version`` (HTTP 304: no
        body sent), else (its bytes, their version)."""
        headers = {"If-None-Match": version} if version else {}

        def get() -> tuple[bytes | None, str | None]:
            response, body = self._get(name, None, headers)
            if response.status_code == 304:
                return None, version
            assert isinstance(body, bytes)
            return body, _version(response)

        return self._ranged.policy.run(get, self._url(name))

    def read_into(self, name: str, buffer: memoryview, size: int | None = None) -> ReadResult:
        url = self._url(name)

        def first(whole: memoryview, length: int) -> tuple[int, int, str | None]:
            response, filled = self._get(name, whole, {"Range": f"bytes=0-{length - 1}"})
            assert isinstance(filled, int)
            self._ranges = response.status_code == 206
            if response.status_code == 200:  # no range support: the body is the whole file
                return filled, filled, _version(response)
            if filled > length:
                raise Transient(f"asked for {length} bytes at 0, got {filled}")
            _, _, total = parse_content_range(response.headers.get("content-range"), url)
            return filled, total, _version(response)

        # All parts at once needs a known size and a server known to honour ranges (learned
        # from the first read). The ETag is not returned as the version, which would let the
        # streamer skip hashing: bytes that crossed a network are checked on every read.
        expected = size if self._ranges else None
        got, _ = self._ranged.read(url, buffer, first, partial(self._part, name), expected)
        return ReadResult(got, None)

    def read_ranges(
        self, name: str, buffer: memoryview, ranges: list[tuple[int, int]], size: int
    ) -> ReadResult:
        got = self._ranged.read_ranges(
            self._url(name), buffer, partial(self._part, name), ranges, size
        )
        return ReadResult(got, None)  # hashed on every read, as whole chunks are

    def _part(self, name: str, offset: int, view: memoryview, version: str | None) -> int:
        """Fill ``view`` exactly from ``offset``; returns the file size the server reported
        (a file shorter than the manifest says: the caller reports it)."""
        url = self._url(name)
        headers = {"Range": f"bytes={offset}-{offset + len(view) - 1}"}
        if version and version.startswith('"'):
            headers["If-Match"] = version  # a strong ETag: refuse a changed file
        response, filled = self._get(name, view, headers, part=True)
        if response.status_code != 206:
            raise Transient(f"asked for bytes {offset}- and got HTTP {response.status_code}")
        total = parse_content_range(response.headers.get("content-range"), url)[2]
        if filled != len(view) and total >= offset + len(view):
            raise Transient(f"asked for {len(view)} bytes at {offset}, got {filled}")
        return total

    def read_head(self, name: str, length: int) -> tuple[bytes, int | None]:
        url = self._url(name)

        def get() -> tuple[bytes, int | None]:
            headers = {"Range": f"bytes=0-{length - 1}"}
            with _transport_errors(url), self._client.stream("GET", url, headers=headers) as r:
                self._check_status(r, url)
                body = bytearray()
                for piece in r.iter_raw():  # a server that ignores ranges: stop at length
                    body += piece
                    if len(body) >= length:
                        break
                if r.status_code == 206:
                    total: int | None = parse_content_range(r.headers.get("content-range"), url)[2]
                else:
                    declared = r.headers.get("content-length")
                    total = int(declared) if declared is not None else None
            if total is not None and len(body) < min(length, total):
                raise Transient(f"body cut short ({len(body)} bytes)")
            return bytes(body[:length]), total

        return self._ranged.policy.run(get, url)

    def exists(self, name: str) -> bool:
        url = self._url(name)

        def head() -> bool:
            try:
                response = self._client.head(url)
            except httpx.TransportError as exc:
                raise Transient(f"{type(exc).__name__}: {exc}") from exc
            if response.status_code == 404:
                return False
            self._check_status(response, url)
            return True

        return self._ranged.policy.run(head, url)

    def list(self) -> list[str]:
        raise ChunkStoreError(
            f"chunk store {self.uri}: HTTP servers offer no listing; read manifest.json instead"
        )

    def close(self) -> None:
        self._ranged.close()
        self._client.close()


@contextlib.contextmanager
def _transport_errors(url: str) -> Iterator[None]:
    """httpx's failures as Transient (retried) or Permanent (a TLS failure: the fix named)."""
    try:
        yield
    except httpx.TimeoutException as exc:
        raise Transient(f"timed out ({type(exc).__name__})") from exc
    except httpx.TransportError as exc:  # refused, reset, truncated body, TLS, DNS...
        if _is_tls_failure(exc):
            raise Permanent(
                f"{url}: TLS verification failed ({exc}); set http_ca_bundle to the CA "
                "that signed the server's certificate"
            ) from exc
        raise Transient(f"{type(exc).__name__}: {exc or 'connection failed'}") from exc


def _version(response: httpx.Response) -> str | None:
    """A strong ETag names the bytes exactly; a weak one (W/...) or none leaves the version
    unknown, so the chunk is hashed on every read."""
    etag = response.headers.get("etag")
    return etag if etag and etag.startswith('"') else None


def _check_length(response: httpx.Response, got: int, url: str) -> None:
    expected = response.headers.get("content-length")
    if expected is not None and int(expected) != got:
        raise Transient(f"body cut short ({got} of {expected} bytes)")


def _is_tls_failure(exc: BaseException) -> bool:
    causes = [exc, exc.__cause__, exc.__context__]
    return any(isinstance(c, ssl.SSLCertVerificationError) for c in causes) or (
        "CERTIFICATE_VERIFY_FAILED" in str(exc)
    )

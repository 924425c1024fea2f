"""Real servers on 127.0.0.1 for the remote-store tests, started and stopped by the tests.

- :class:`S3Server`: moto's standalone S3 API server in its own process (stopped by its
  process group id), with authentication switched on and one IAM user's keys for clients.
- :class:`StaticServer`: a static file server (Python's http.server plus byte ranges, strong
  ETags and an optional bearer token), as nginx serves a directory.
- :class:`FaultProxy`: a TCP proxy between the runtime and a store that the test drives:
  take the store down and up, delay it, cut responses short, flip a byte; it counts the
  requests it forwards, by path.

PYTEST_DONT_REWRITE
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 30.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=1):
            return
        time.sleep(0.1)  # polling interval, not a timing assertion
    raise TimeoutError(f"nothing listening on {HOST}:{port} after {timeout}s")


# -- S3 --------------------------------------------------------------------------------------


@dataclass
class S3Server:
    """``python -m moto.server`` on a free port; :meth:`start` creates an IAM user, then
    turns on request authentication, so wrong keys get the errors AWS gives."""

    root: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None
    access_key: str = ""
    secret_key: str = ""

    @property
    def endpoint(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self) -> S3Server:
        log = open(self.root / "moto.log", "wb")  # noqa: SIM115 (kept open while it runs)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", HOST, "-p", str(self.port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        wait_port(self.port, proc=self.proc)
        import boto3

        iam = boto3.client(
            "iam",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id="bootstrap",
            aws_secret_access_key="bootstrap",
        )
        iam.create_user(UserName="layerstream")
        policy = {
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}],
        }
        iam.put_user_policy(
            UserName="layerstream", PolicyName="s3", PolicyDocument=json.dumps(policy)
        )
        key = iam.create_access_key(UserName="layerstream")["AccessKey"]
        self.access_key, self.secret_key = key["AccessKeyId"], key["SecretAccessKey"]
        httpx.post(f"{self.endpoint}/moto-api/reset-auth", content=b"0").raise_for_status()
        return self

    def env(self, wrong: bool = False) -> dict[str, str]:
        """Credentials as the standard chain reads them from the environment."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": "wrong" + self.secret_key if wrong else self.secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",  # never probe an instance metadata service
        }

    def chunk(self, source: Path, uri: str, name: str) -> str:
        """Chunk the checkpoint at ``source`` into ``uri`` on this server (bucket created if
        needed), with this server's keys in the environment as the chunker reads them."""
        from layerstream.chunker.convert import chunk_checkpoint
        from layerstream.stores import StoreOptions

        bucket = uri.removeprefix("s3://").split("/", 1)[0]
        with contextlib.suppress(self.client().exceptions.BucketAlreadyOwnedByYou):
            self.client().create_bucket(Bucket=bucket)
        saved = {k: os.environ.get(k) for k in self.env()}
        os.environ.update(self.env())
        try:
            chunk_checkpoint(
                source,
                uri,
                name,
                progress=False,
                store_options=StoreOptions(endpoint_url=self.endpoint),
            )
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
        return uri

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
        )

    def stop(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)


# -- static HTTP -----------------------------------------------------------------------------

_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


class _RangeHandler(SimpleHTTPRequestHandler):
    """GET/HEAD with single byte ranges (206 + Content-Range), a strong ETag (the sha256 of
    the file), and a required bearer token when the server has one."""

    protocol_version = "HTTP/1.1"  # keep-alive, as nginx
    token: str | None = None
    ranges = True  # False: ignore Range headers, as some servers do

    def log_message(self, format, *args) -> None:
        pass

    def _authorised(self) -> bool:
        if self.token and self.headers.get("Authorization") != f"Bearer {self.token}":
            self.send_error(401, "bearer token required")
            return False
        return True

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    def _serve(self, body: bool) -> None:
        if not self._authorised():
            return
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            self.send_error(404, "not found")
            return
        data = path.read_bytes()
        etag = '"' + hashlib.sha256(data).hexdigest()[:32] + '"'
        if self.headers.get("If-None-Match") == etag:
            self.send_response(304)  # unchanged: no body, as nginx answers a revalidation
            self.send_header("ETag", etag)
            self.end_headers()
            return
        status, start, end = 200, 0, len(data) - 1
        match = _RANGE.match(self.headers.get("Range", "")) if self.ranges else None
        if match:
            start = int(match.group(1))
            end = min(int(match.group(2)) if match.group(2) else end, len(data) - 1)
            if start > end:
                self.send_error(416, "range not satisfiable")
                return
            status = 206
            if self.headers.get("If-Match") not in (None, etag):
                self.send_error(412, "precondition failed")
                return
        self.send_response(status)
        self.send_header("Content-Length", str(end - start + 1))
        self.send_header("ETag", etag)
        self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        self.end_headers()
        if body:
            self.wfile.write(data[start : end + 1])


class StaticServer:
    """Serves ``directory`` on a free port from a thread of the test process."""

    def __init__(
        self,
        directory: Path,
        token: str | None = None,
        tls: tuple[Path, Path] | None = None,
        ranges: bool = True,
        base: type[_RangeHandler] | None = None,  # a handler class of the test's own
    ):
        handler = type(
            "Handler",
            (base or _RangeHandler,),
            {"token": token, "ranges": ranges, "__init__": _bind_directory(str(directory))},
        )
        self.httpd = ThreadingHTTPServer((HOST, 0), handler)
        self.httpd.daemon_threads = True
        self.scheme = "http"
        if tls is not None:  # (certificate, key): serve https
            import ssl

            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls)
            self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
            self.scheme = "https"
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"{self.scheme}://{HOST}:{self.port}"

    def start(self) -> StaticServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _bind_directory(directory: str):
    def __init__(self, *args, **kwargs):
        SimpleHTTPRequestHandler.__init__(self, *args, directory=directory, **kwargs)

    return __init__


# -- fault injection -------------------------------------------------------------------------

_SLOW_DOWN_BODY = (
    b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>SlowDown</Code>"
    b"<Message>Please reduce your request rate.</Message></Error>"
)
SLOW_DOWN = (
    b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\n"
    b"Content-Length: " + str(len(_SLOW_DOWN_BODY)).encode() + b"\r\n\r\n" + _SLOW_DOWN_BODY
)
_REQUEST_LINE = re.compile(rb"(GET|HEAD|PUT|POST|DELETE) (\S+) HTTP/1\.[01]\r\n")


class FaultProxy:
    """TCP proxy to ``upstream``; the test switches its behaviour at any time.

    - :meth:`down` closes the listening socket and every open connection (connection
      refused, like a store that went away); :meth:`up` listens again on the same port.
    - ``delay_s``: each chunk of the response waits this long (a slow store).
    - ``truncate``: the next N responses are cut after ``truncate_after`` body bytes.
    - ``corrupt``: the next N responses get one byte of their body flipped.
    - ``throttle``: the next N requests are answered 503 SlowDown by the proxy itself.

    ``requests`` lists the (method, path) of every request forwarded, ``body_bytes`` counts
    response bytes sent to clients.
    """

    def __init__(self, upstream_port: int):
        self.upstream = (HOST, upstream_port)
        self.port = free_port()
        self.delay_s = 0.0
        self.truncate = 0
        self.truncate_after = 1000
        self.corrupt = 0
        self.throttle = 0
        self.requests: list[tuple[str, str]] = []
        self.body_bytes = 0
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self._stopped = threading.Event()

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def up(self) -> FaultProxy:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((HOST, self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()
        return self

    def down(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        with self._lock:
            sockets, self._sockets = self._sockets, set()
        for s in sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def stop(self) -> None:
        self._stopped.set()
        self.down()

    def chunk_gets(self) -> list[str]:
        with self._lock:
            return [path for method, path in self.requests if method == "GET" and "block_" in path]

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # closed by down()
            try:
                server = socket.create_connection(self.upstream, timeout=10)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets |= {client, server}
            threading.Thread(target=self._upstream, args=(client, server), daemon=True).start()
            threading.Thread(target=self._downstream, args=(server, client), daemon=True).start()

    def _upstream(self, client: socket.socket, server: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := client.recv(65536):
                with self._lock:
                    for method, path in _REQUEST_LINE.findall(data):
                        self.requests.append((method.decode(), path.decode()))
                if _REQUEST_LINE.match(data) and self._take("throttle"):
                    client.sendall(SLOW_DOWN)  # as S3 answers a client over its request rate
                    continue
                server.sendall(data)
        with contextlib.suppress(OSError):
            server.shutdown(socket.SHUT_WR)

    def _take(self, kind: str) -> bool:
        with self._lock:
            if getattr(self, kind) > 0:
                setattr(self, kind, getattr(self, kind) - 1)
                return True
            return False

    def _downstream(self, server: socket.socket, client: socket.socket) -> None:
        """Copy the responses back; a response marked for a fault gets it once its headers
        have gone through (so the client sees a well-formed start, then the fault)."""
        pending = b""  # bytes of a response whose headers have not all arrived
        # a response marked for corruption whose body has not arrived yet: the headers and the
        # body may come in one read or several (the upstream writes them separately), and the
        # fault must not depend on which
        owed = False
        try:
            while data := server.recv(65536):
                if self.delay_s:
                    time.sleep(self.delay_s)
                data, pending = pending + data, b""
                end = data.find(b"\r\n\r\n")
                if data.startswith(b"HTTP/1.") and end < 0:
                    pending = data
                    continue
                if data.startswith(b"HTTP/1.") and self._take("truncate"):
                    cut = end + 4 + self.truncate_after
                    self._count(max(0, min(len(data), cut) - end - 4))
                    client.sendall(data[:cut])
                    break  # and close: the client is left with a short body
                head = data.startswith(b"HTTP/1.")
                if head and self._take("corrupt"):
                    owed = True
                body_from = end + 4 if head else 0
                if owed and len(data) > body_from:
                    flip = body_from + (len(data) - body_from) // 2
                    data = data[:flip] + bytes([data[flip] ^ 0xFF]) + data[flip + 1 :]
                    owed = False
                # counted before it is sent: once a client holds its bytes, a test reading
                # body_bytes must already see them (counting after raced the client)
                self._count(len(data) - (end + 4 if data.startswith(b"HTTP/1.") else 0))
                client.sendall(data)
        except OSError:
            pass
        finally:
            for s in (client, server):
                # shutdown first: close() alone waits for the other thread's recv() to return
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()
            with self._lock:
                self._sockets -= {client, server}

    def _count(self, n: int) -> None:
        with self._lock:
            self.body_bytes += max(n, 0)

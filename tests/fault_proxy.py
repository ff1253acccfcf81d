"""A fault-injecting HTTP proxy between an S3 client and a real S3 server (SeaweedFS in the tests).

It forwards requests byte for byte (the SigV4 signature covers the Host header the client sent,
so nothing is rewritten) and, on a deterministic schedule, answers some of them with a transient
fault instead:

- ``slowdown``: HTTP 503 with an S3 ``SlowDown`` XML error body (no body for HEAD);
- ``drop_before``: the request is read, then the connection is closed without a response;
- ``drop_mid``: the request is forwarded, then the connection is closed halfway through the
  response body (halfway through the header block when there is no body).

Requests are sorted into kinds ``GET`` (an object), ``LIST`` (a bucket listing), ``PUT`` and
``HEAD``; every other method passes through. Of each kind, request number ``every``,
``2 * every``, ... gets a fault, cycling through that kind's fault list, until ``max_faults`` of
that kind were injected: the number of faults is bounded, whatever the run does. Besides,
``cut_first_get_of`` names object suffixes (``(".tar",)``) whose first GET is cut off halfway
through the body, once per object. ``injected`` counts what was done, per (kind, fault); ``log``
lists each fault with the request's path and Range header.

Binds 127.0.0.1 only. Each connection is served by a daemon thread whose loop is bounded
(``max_requests_per_connection``, ``idle_timeout``); :meth:`close` stops accepting, closes
every open socket and joins the threads.
"""
from __future__ import annotations

import collections
import contextlib
import socket
import threading
from urllib.parse import urlsplit

FAULTS = ("slowdown", "drop_before", "drop_mid")
DEFAULT_SCHEDULE: dict[str, tuple[str, ...]] = {
    "GET": ("drop_mid", "slowdown", "drop_before"),
    "LIST": ("slowdown", "drop_mid", "drop_before"),
    "PUT": ("slowdown", "drop_before", "drop_mid"),
    "HEAD": ("slowdown", "drop_before"),
}
SLOWDOWN_XML = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
                b"<Message>Please reduce your request rate.</Message>"
                b"<RequestId>vaepipe-fault-proxy</RequestId></Error>")
MAX_HEAD_BYTES = 64 * 1024


class _Closed(Exception):
    """The peer closed the connection (or sent something we cannot frame)."""


class _Reader:
    """Buffered reads from a socket, keeping the raw bytes so they can be forwarded unchanged."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.buf = sock, b""

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise _Closed()
        self.buf += chunk

    def until(self, marker: bytes, limit: int = MAX_HEAD_BYTES) -> bytes:
        while marker not in self.buf:
            if len(self.buf) > limit:
                raise _Closed()
            self._fill()
        i = self.buf.index(marker) + len(marker)
        out, self.buf = self.buf[:i], self.buf[i:]
        return out

    def exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def rest(self) -> bytes:
        """Everything up to EOF (a body framed by the connection closing)."""
        with contextlib.suppress(_Closed):
            while True:
                self._fill()
        out, self.buf = self.buf, b""
        return out


def _headers(head: bytes) -> tuple[str, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    fields = {}
    for line in lines[1:]:
        if ":" in line:
            name, _, value = line.partition(":")
            fields[name.strip().lower()] = value.strip()
    return lines[0], fields


def _body(reader: _Reader, fields: dict[str, str], to_eof: bool) -> bytes:
    """The raw (still framed) body: chunked, Content-Length, or up to EOF for responses."""
    if "chunked" in fields.get("transfer-encoding", "").lower():
        raw = b""
        while True:
            size_line = reader.until(b"\r\n")
            raw += size_line
            size = int(size_line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while True:  # trailers, then the empty line
                    line = reader.until(b"\r\n")
                    raw += line
                    if line == b"\r\n":
                        return raw
            raw += reader.exactly(size + 2)
    if "content-length" in fields:
        return reader.exactly(int(fields["content-length"]))
    return reader.rest() if to_eof else b""


def request_kind(method: str, target: str) -> str | None:
    """``GET``/``LIST``/``PUT``/``HEAD`` for path-style S3 requests, ``None`` for other methods."""
    parts = urlsplit(target)
    if method == "GET":
        key = parts.path.lstrip("/").partition("/")[2]
        return "LIST" if not key or "list-type" in parts.query else "GET"
    return method if method in ("PUT", "HEAD") else None


class FaultProxy:
    """Forward ``127.0.0.1:port`` to ``upstream`` (``host:port``), injecting faults (see module doc)."""

    def __init__(self, upstream: tuple[str, int], every: int = 4, max_faults: int = 3,
                 schedule: dict[str, tuple[str, ...]] | None = None, cut_first_get_of: tuple[str, ...] = (),
                 max_requests_per_connection: int = 10_000, idle_timeout: float = 30.0) -> None:
        self.upstream = upstream
        self.every, self.max_faults = every, max_faults
        self.schedule = dict(DEFAULT_SCHEDULE if schedule is None else schedule)
        assert all(f in FAULTS for faults in self.schedule.values() for f in faults), self.schedule
        self.max_requests_per_connection, self.idle_timeout = max_requests_per_connection, idle_timeout
        self.requests: collections.Counter[str] = collections.Counter()
        self.injected: collections.Counter[tuple[str, str]] = collections.Counter()
        self.log: list[tuple[str, str, str, str | None]] = []  # kind, fault, path, Range header
        self.cut_first_get_of = cut_first_get_of
        self._cut: set[str] = set()
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._socks: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self._listener.settimeout(0.2)  # the accept loop checks for close() this often
        self.port = self._listener.getsockname()[1]
        self.endpoint_url = f"http://127.0.0.1:{self.port}"
        self._acceptor = threading.Thread(target=self._accept_loop, name="fault-proxy-accept", daemon=True)
        self._acceptor.start()

    # -- schedule --------------------------------------------------------------------------
    def _fault_for(self, kind: str | None, target: str, fields: dict[str, str]) -> str | None:
        if kind is None:
            return None
        path = urlsplit(target).path
        with self._lock:
            self.requests[kind] += 1
            if kind == "GET" and path.endswith(self.cut_first_get_of) and path not in self._cut:
                self._cut.add(path)
                fault = "drop_mid"
            else:
                n = self.requests[kind]
                faults = self.schedule.get(kind, ())
                done = sum(c for (k, _), c in self.injected.items() if k == kind)
                if not faults or n % self.every or done >= self.max_faults:
                    return None
                fault = faults[done % len(faults)]
            self.injected[(kind, fault)] += 1
            self.log.append((kind, fault, path, fields.get("range")))
            return fault

    def faults_by_kind(self) -> dict[str, int]:
        with self._lock:
            out: collections.Counter[str] = collections.Counter()
            for (kind, _), c in self.injected.items():
                out[kind] += c
            return dict(out)

    # -- serving ---------------------------------------------------------------------------
    def _track(self, sock: socket.socket) -> socket.socket:
        with self._lock:
            self._socks.add(sock)
        return sock

    def _forget(self, sock: socket.socket) -> None:
        with self._lock:
            self._socks.discard(sock)
        with contextlib.suppress(OSError):
            sock.close()

    def _accept_loop(self) -> None:
        while not self._closing.is_set():
            try:
                client, _ = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:  # listener closed by close()
                return
            if self._closing.is_set():
                client.close()
                return
            t = threading.Thread(target=self._serve, args=(self._track(client),), name="fault-proxy-conn",
                                 daemon=True)
            with self._lock:
                self._threads = [x for x in self._threads if x.is_alive()] + [t]
            t.start()

    def _serve(self, client: socket.socket) -> None:
        client.settimeout(self.idle_timeout)
        reader = _Reader(client)
        upstream: socket.socket | None = None
        up_reader: _Reader | None = None
        try:
            for _ in range(self.max_requests_per_connection):
                if self._closing.is_set():
                    return
                head = reader.until(b"\r\n\r\n")
                start, fields = _headers(head)
                method, target = start.split(" ")[:2]
                if fields.get("expect", "").lower() == "100-continue":
                    client.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")  # upstream's own 100 is dropped below
                body = _body(reader, fields, to_eof=False)
                fault = self._fault_for(request_kind(method, target), target, fields)
                if fault == "drop_before":
                    return
                if fault == "slowdown":
                    payload = b"" if method == "HEAD" else SLOWDOWN_XML
                    client.sendall(b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\n"
                                   b"x-amz-request-id: vaepipe-fault-proxy\r\n"
                                   + f"Content-Length: {len(SLOWDOWN_XML)}\r\n\r\n".encode() + payload)
                    continue
                if upstream is None:
                    upstream = self._track(socket.create_connection(self.upstream, timeout=self.idle_timeout))
                    up_reader = _Reader(upstream)
                upstream.sendall(head + body)
                while True:  # skip interim 1xx responses (the client already got its 100 Continue)
                    resp_head = up_reader.until(b"\r\n\r\n")
                    status_line, resp_fields = _headers(resp_head)
                    status = int(status_line.split(" ")[1])
                    if status >= 200 or status == 101:
                        break
                bodyless = method == "HEAD" or status in (204, 304)
                resp_body = b"" if bodyless else _body(up_reader, resp_fields, to_eof=True)
                if fault == "drop_mid":
                    client.sendall(resp_head + resp_body[:len(resp_body) // 2] if resp_body
                                   else resp_head[:len(resp_head) // 2])
                    return
                client.sendall(resp_head + resp_body)
                if (not bodyless and "content-length" not in resp_fields
                        and "chunked" not in resp_fields.get("transfer-encoding", "").lower()):
                    return  # body was framed by the upstream closing: close the client side too
                if resp_fields.get("connection", "").lower() == "close":
                    return
        except (_Closed, OSError, ValueError, IndexError):
            return  # a peer went away or sent something unframeable: drop this connection
        finally:
            self._forget(client)
            if upstream is not None:
                self._forget(upstream)

    def close(self) -> None:
        """Stop accepting, close every connection and wait for the serving threads."""
        self._closing.set()
        with contextlib.suppress(OSError):
            self._listener.close()
        with self._lock:
            socks, threads = list(self._socks), list(self._threads)
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                s.close()
        self._acceptor.join(5)
        for t in threads:
            t.join(5)

    def __enter__(self) -> "FaultProxy":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

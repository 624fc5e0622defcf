"""The /metrics endpoint: one thread, bounded connections, idle ones closed, loopback by default.

Why not ``prometheus_client.start_http_server``: it answers every path, listens on all
interfaces unless told, and holds a thread per connection with no timeout, so a few hundred
half-open connections (a scanner, a dead scraper) pin as many threads. This server is one
thread around a selector: a connection costs a file descriptor, never a thread; at most
``max_connections`` are open (a new one closes the longest-idle); a connection idle for
``idle_seconds`` (no full request, or a reader that stops reading) is closed. It serves
``GET``/``HEAD /metrics`` (any query string) and answers 404 for every other path, 405 for
other methods, 431 for a request head over 8 KiB; each response closes the connection
(HTTP/1.0), as Prometheus expects nothing more.

Where it listens (``listen_address``): ``$BACKBONES_METRICS_ADDR`` when set; else all
interfaces inside a backbones pod (the rendered pod sets ``BACKBONES_POD``, so Prometheus can
scrape the pod's IP); else loopback, so a laptop run never exposes its metrics to the network.

The only import is the standard library: the exposition itself (``render``) is handed in by
service.run.metrics, the one module that imports prometheus_client.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger("backbones.metrics")

ADDR_ENV = "BACKBONES_METRICS_ADDR"
MAX_CONNECTIONS = 16
IDLE_SECONDS = 10.0
MAX_HEAD_BYTES = 8192
_TICK_SECONDS = 0.5


def listen_address(environ=os.environ) -> str:
    """Where /metrics listens: $BACKBONES_METRICS_ADDR, else 0.0.0.0 in a pod, else loopback."""
    if environ.get(ADDR_ENV):
        return environ[ADDR_ENV]
    return "0.0.0.0" if environ.get("BACKBONES_POD") else "127.0.0.1"


@dataclass
class _Conn:
    sock: socket.socket
    seen: float
    inbox: bytearray = field(default_factory=bytearray)
    outbox: bytes = b""  # set once the request is answered


def _response(status: str, body: bytes, content_type: str, head_only: bool = False) -> bytes:
    head = (
        f"HTTP/1.0 {status}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    return head if head_only else head + body


class MetricsServer:
    """Serves ``render(accept)`` (the body and its content type for the request's Accept
    header) at /metrics on ``addr:port``, on a daemon thread, until ``shutdown()``. Raises
    OSError when the port cannot be bound."""

    def __init__(
        self,
        addr: str,
        port: int,
        render: Callable[[str], tuple[bytes, str]],
        *,
        max_connections: int = MAX_CONNECTIONS,
        idle_seconds: float = IDLE_SECONDS,
    ):
        self.render = render
        self.max_connections, self.idle_seconds = max_connections, idle_seconds
        family = socket.AF_INET6 if ":" in addr else socket.AF_INET
        self.listener = socket.socket(family, socket.SOCK_STREAM)
        try:
            self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.listener.bind((addr, port))
            self.listener.listen(64)
        except OSError:
            self.listener.close()
            raise
        self.listener.setblocking(False)
        self.server_address = self.listener.getsockname()[:2]  # as socketserver names it
        self._conns: dict[int, _Conn] = {}
        self._selector = selectors.DefaultSelector()
        self._selector.register(self.listener, selectors.EVENT_READ)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="metrics-http", daemon=True)
        self._thread.start()

    # ---- the loop -------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set():
            for key, events in self._selector.select(_TICK_SECONDS):
                try:
                    if key.fileobj is self.listener:
                        self._accept()
                    elif events & selectors.EVENT_READ:
                        self._read(key.fd)
                    else:
                        self._write(key.fd)
                except Exception as e:  # a scrape never takes the run down
                    log.debug("metrics: connection error: %s", e)
                    self._close(key.fd)
            self._close_idle()
        for fd in list(self._conns):
            self._close(fd)
        self._selector.close()
        self.listener.close()

    def _accept(self) -> None:
        try:
            sock, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        if len(self._conns) >= self.max_connections:  # room for the newcomer: drop the stalest
            self._close(min(self._conns, key=lambda fd: self._conns[fd].seen))
        sock.setblocking(False)
        self._conns[sock.fileno()] = _Conn(sock, time.monotonic())
        self._selector.register(sock, selectors.EVENT_READ)

    def _read(self, fd: int) -> None:
        conn = self._conns[fd]
        try:
            data = conn.sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        if not data:
            self._close(fd)
            return
        conn.seen = time.monotonic()
        conn.inbox += data
        if b"\r\n\r\n" in conn.inbox or b"\n\n" in conn.inbox:
            conn.outbox = self._answer(bytes(conn.inbox))
        elif len(conn.inbox) > MAX_HEAD_BYTES:
            conn.outbox = _response("431 Request Header Fields Too Large", b"", "text/plain")
        else:
            return
        self._selector.modify(conn.sock, selectors.EVENT_WRITE)
        self._write(fd)

    def _answer(self, head: bytes) -> bytes:
        line = head.split(b"\n", 1)[0].decode("latin-1").strip().split()
        method, target = (line[0], line[1]) if len(line) >= 2 else ("", "")
        if method not in ("GET", "HEAD"):
            return _response("405 Method Not Allowed", b"only GET\n", "text/plain")
        if target.split("?", 1)[0] != "/metrics":
            return _response("404 Not Found", b"only /metrics is served here\n", "text/plain")
        accept = next(
            (
                line.split(b":", 1)[1].decode("latin-1").strip()
                for line in head.split(b"\n")[1:]
                if line.lower().startswith(b"accept:")
            ),
            "",
        )
        body, content_type = self.render(accept)
        return _response("200 OK", body, content_type, method == "HEAD")

    def _write(self, fd: int) -> None:
        conn = self._conns[fd]
        try:
            sent = conn.sock.send(conn.outbox)
        except (BlockingIOError, InterruptedError):
            return
        conn.outbox = conn.outbox[sent:]
        if sent:
            conn.seen = time.monotonic()
        if not conn.outbox:
            self._close(fd)

    def _close_idle(self) -> None:
        limit = time.monotonic() - self.idle_seconds
        for fd in [fd for fd, c in self._conns.items() if c.seen < limit]:
            self._close(fd)

    def _close(self, fd: int) -> None:
        conn = self._conns.pop(fd, None)
        if conn is None:
            return
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(conn.sock)
        conn.sock.close()

    # ---- the outside ----------------------------------------------------------------------

    @property
    def open_connections(self) -> int:
        return len(self._conns)

    def shutdown(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

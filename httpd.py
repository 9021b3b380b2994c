"""The HTTP server plumbing under the API: the standard library's ThreadingHTTPServer with its
connections bounded in number, size and time.

A `Server` takes connections; its waiting room (one selector thread) reads each request as
it arrives, so idle and trickling clients cost no thread; a complete request gets a
`Handler` thread, which checks its headers and body limits and hands it to the application
(`App.handle`: method, target, lower-case headers, body in; a `Response` out). What each
endpoint does is api.py's; this file knows nothing of instances or tasks.
"""

from __future__ import annotations

import contextlib
import io
import ipaddress
import json
import logging
import math
import queue
import re
import resource
import selectors
import socket
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Protocol

from errors import BadRequest, Conflict, NotFound, PiDeployError

logger = logging.getLogger("api")  # the name the HTTP lines have always had in the logs

MAX_BODY = 64 * 1024
DRAIN_LIMIT = 1024 * 1024  # an oversize body up to this is read and dropped; past it the connection is closed


# ---------------------------------------------------------------------------
# Responses, and the status each error gets
# ---------------------------------------------------------------------------


class ApiError(BadRequest):
    """A client error with its own HTTP status (401, 403, 405, 411, 413)."""

    def __init__(self, status: int, message: str, **data: Any) -> None:
        super().__init__(message, **data)
        self.status = status


@dataclass
class Response:
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)


def json_response(status: int, payload: object) -> Response:
    return Response(status, (json.dumps(payload, default=_plain) + "\n").encode())


def _plain(value: object) -> object:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def error_response(error: PiDeployError) -> Response:
    if isinstance(error, ApiError):
        status = error.status
    elif isinstance(error, NotFound):
        status = 404
    elif isinstance(error, Conflict):
        status = 409
    elif isinstance(error, BadRequest):
        status = 400
    else:
        status = 503  # the database or another dependency is down
    extra = {k: v for k, v in error.data.items() if k in ("field", "instance_id", "task_id")}
    response = json_response(status, {"error": error.message, "error_class": error.error_class, **extra})
    if status == 401:
        response.headers["WWW-Authenticate"] = 'Bearer realm="pideploy"'
    if status == 405:
        response.headers["Allow"] = str(error.data.get("allow", ""))
    return response


class App(Protocol):
    """What the server serves: one request in, one response out (`headers` has lower-case names)."""

    def handle(self, method: str, target: str, headers: Mapping[str, str], body: bytes) -> Response: ...


# ---------------------------------------------------------------------------
# The server
# ---------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


REQUEST_TIMEOUT = 10.0  # seconds a client has to send its whole request, from its first byte
IDLE_TIMEOUT = 10.0  # seconds a connection may stay open without sending a byte
WRITE_TIMEOUT = 30.0  # seconds to hand a response to a client that does not read it
MAX_ACTIVE = 64  # requests handled at once (a thread each); past it a request gets a quick 503
MAX_OPEN = 4096  # connections open at once, within the file limit less FD_RESERVE
PREFETCH = 16 * 1024  # bytes of a request the waiting room reads; a longer one gets its thread then
FD_RESERVE = 256  # file descriptors kept for the database pool, nginx, the engine, logs
# Headers whose meaning a second copy would make ambiguous: a front end may check one copy
# and http.server's message hands us the last.
SINGLE_HEADERS = ("Authorization", "X-User-Id", "Idempotency-Key", "Content-Length", "Transfer-Encoding")


class _DeadlineReader(io.RawIOBase):
    """What the waiting room read of a request, then the socket's reads, all before one deadline.
    A per-read timeout restarts with every byte: a client sending a byte a second would hold its
    thread for as long as it liked."""

    def __init__(self, connection: socket.socket, deadline: float, prefix: bytes = b"") -> None:
        self.connection, self.deadline, self.prefix = connection, deadline, prefix

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self.prefix:
            n = min(len(buffer), len(self.prefix))
            buffer[:n], self.prefix = self.prefix[:n], self.prefix[n:]
            return n
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the request did not arrive in time")
        self.connection.settimeout(left)
        return self.connection.recv_into(buffer)


class Handler(BaseHTTPRequestHandler):
    """Reads the request (capped in size and time), hands it to the app, writes the response."""

    app: App  # set on the subclass `make_server` builds
    server: Server
    server_version = "piDeploy"
    sys_version = ""
    # A request line without a version is not taken for HTTP/0.9: every answer, an error to a
    # garbled line too, has a status line and headers.
    default_request_version = "HTTP/1.0"

    def setup(self) -> None:
        super().setup()
        self.rfile.close()  # the plain reader; closing it drops its hold on the socket
        prefix, deadline = self.server.prefetched(self.connection)
        self.rfile = io.BufferedReader(_DeadlineReader(self.connection, deadline, prefix))

    def _serve(self) -> None:
        # A client that resets the connection while sending raises ConnectionError out of here:
        # there is no one to answer, and Server.handle_error logs it in one line.
        try:
            self._check_headers()
            body = self._read_body()
        except PiDeployError as error:
            self.close_connection = True  # the body (if any) was not read
            self._respond(error_response(error))
            return
        try:
            headers = {name.lower(): value for name, value in self.headers.items()}
            response = self.app.handle(self.command, self.path, headers, body)
        except Exception:  # a bug must answer 500, not drop the connection
            logger.exception("%s %s crashed", self.command, self.path, extra={"action": "http_error"})
            response = json_response(
                500, {"error": "internal error (see the server log)", "error_class": "internal"}
            )
        self._respond(response)

    def _respond(self, response: Response) -> None:
        self.connection.settimeout(WRITE_TIMEOUT)  # the reads' deadline is not the writes'
        self.send_response(response.status)
        self.send_header("Content-Type", response.content_type)
        self.send_header("Content-Length", str(len(response.body)))
        for name, value in response.headers.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(response.body)

    def _check_headers(self) -> None:
        for name in SINGLE_HEADERS:
            if len(self.headers.get_all(name) or []) > 1:
                raise BadRequest(f"the {name} header is repeated: send it once", field=name)

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding") is not None:
            raise ApiError(411, "Transfer-Encoding (chunked) bodies are not accepted: send Content-Length")
        raw = self.headers.get("Content-Length")
        if raw is None:
            return b""
        if not re.fullmatch(r"[0-9]{1,18}", raw.strip(" \t")):
            raise BadRequest("Content-Length must be a number", field="Content-Length")
        length = int(raw)
        try:
            if length > MAX_BODY:
                if length <= DRAIN_LIMIT:
                    # Read and drop it, so the client (still sending) gets the 413 rather than a reset.
                    left = length
                    while left > 0:
                        chunk = self.rfile.read(min(MAX_BODY, left))
                        if not chunk:
                            break
                        left -= len(chunk)
                raise ApiError(413, f"the body is {length} bytes; the limit is {MAX_BODY}")
            return self.rfile.read(length)
        except TimeoutError:
            raise ApiError(
                408, f"the request did not arrive within {self.server.request_timeout:g}s"
            ) from None

    do_GET = do_HEAD = do_POST = do_DELETE = do_PUT = do_PATCH = do_OPTIONS = _serve

    def parse_request(self) -> bool:
        if super().parse_request():
            return True
        if not self.requestline.split():  # http.server closes on an empty line without a word
            self.send_error(HTTPStatus.BAD_REQUEST, "the request line is empty")
        return False

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own answers (a garbled request line or headers), in the API's JSON. Its
        501 means a method with no do_* here: the Api answers that (405 with Allow, or 404)."""
        if code == HTTPStatus.NOT_IMPLEMENTED and self.command:
            self._serve()
            return
        if code == HTTPStatus.HTTP_VERSION_NOT_SUPPORTED:
            code = HTTPStatus.BAD_REQUEST  # the client's mistake: 5xx stays "the server failed"
        self.close_connection = True
        self.log_error("code %d, message %s", code, message)
        try:
            phrase = HTTPStatus(code).phrase
        except ValueError:
            phrase = "error"
        self._respond(json_response(code, {"error": message or phrase, "error_class": "bad_request"}))

    def log_message(self, format: str, *args: Any) -> None:
        # Mutations at INFO; reads (dashboards poll) at DEBUG. The request line is the client's
        # text: control characters are escaped so it cannot forge log lines.
        level = logging.DEBUG if getattr(self, "command", None) in ("GET", "HEAD") else logging.INFO
        text = (format % args).encode("unicode_escape", "backslashreplace").decode("ascii")
        logger.log(level, "%s %s", self.address_string(), text, extra={"action": "http_request"})


@dataclass
class _Waiting:
    """A connection in the waiting room: what it has sent so far, and when it must be done."""

    address: Any
    expires: float
    data: bytearray = field(default_factory=bytearray)

    def complete(self) -> bool:
        """The whole head, and the body its Content-Length announces, have arrived (read loosely:
        the handler checks the request properly), or as much as the waiting room holds."""
        if len(self.data) >= PREFETCH:
            return True
        ends = [i + len(blank) for blank in (b"\n\r\n", b"\n\n") if (i := self.data.find(blank)) >= 0]
        if not ends:
            return False
        end = min(ends)
        length = re.search(rb"(?im)^content-length:[ \t]*([0-9]{1,18})[ \t]*\r?$", self.data[:end])
        return len(self.data) >= end + (int(length.group(1)) if length else 0)


class Server(ThreadingHTTPServer):
    """A ThreadingHTTPServer whose connections are bounded in number and in time.

    An accepted connection waits in one selector thread, the waiting room, which reads the
    request as it arrives; only a complete request (head, and a body up to PREFETCH) gets a
    handler thread. So idle and trickling clients cost no thread, and a handler never waits on
    a slow client for what fits in PREFETCH. A connection that sends nothing within
    `idle_timeout`, or not its whole request within `request_timeout` of its first byte, is
    closed (a longer request finishes in its thread, by the same deadline). With `max_open`
    connections open, the one that has waited longest is closed to make room, so a flood of
    connections cannot lock out /healthz; with `max_active` requests in hand, one more gets a
    quick 503. One request per connection (HTTP/1.0): nothing waits between requests.
    """

    daemon_threads = True
    # The listen backlog. socketserver's 5 drops the handshakes of a burst of connections: their
    # clients think they are connected and wait on SYN-ACK retries, one to several seconds.
    request_queue_size = 1024

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[Handler],
        family: socket.AddressFamily,
        *,
        request_timeout: float,
        idle_timeout: float,
        max_active: int,
        max_open: int,
    ) -> None:
        self.address_family = family
        self.request_timeout, self.idle_timeout = request_timeout, idle_timeout
        self.max_active, self.max_open = max_active, max_open
        self._incoming: queue.SimpleQueue[tuple[socket.socket, Any]] = queue.SimpleQueue()
        self._waiting: dict[socket.socket, _Waiting] = {}  # in accept order; the waiting room's own
        self._handed: dict[socket.socket, tuple[bytes, float]] = {}  # to its handler: data, deadline
        self._active = 0
        self._lock = threading.Lock()
        self._shed = 0  # connections refused or closed for room since the last warning
        self._warned_at = -math.inf
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_w.setblocking(False)
        self._closing = threading.Event()
        self._waiter = threading.Thread(target=self._wait_loop, name="http-waiting", daemon=True)
        super().__init__(address, handler)  # binds: on failure it calls server_close, which needs the above
        self._waiter.start()

    # -- socketserver's hooks ---------------------------------------------------

    def process_request(self, request: Any, client_address: Any) -> None:
        """Called on accept: the connection goes to the waiting room."""
        self._incoming.put((request, client_address))
        with contextlib.suppress(OSError):  # a full wake pipe already says "look"
            self._wake_w.send(b"\0")

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._lock:
                self._active -= 1
                self._handed.pop(request, None)

    def prefetched(self, connection: socket.socket) -> tuple[bytes, float]:
        """For its handler: what the waiting room read of this request, and the deadline for the rest."""
        with self._lock:
            return self._handed.pop(connection, (b"", time.monotonic() + self.request_timeout))

    def handle_error(self, request: Any, client_address: Any) -> None:
        """One log line, never socketserver's traceback on stderr."""
        error = sys.exc_info()[1]
        host = client_address[0] if isinstance(client_address, tuple) and client_address else "?"
        if isinstance(error, ConnectionError | TimeoutError):
            logger.info(
                "%s: the connection ended before the response was sent (%s)",
                host,
                type(error).__name__,
                extra={"action": "http_disconnected"},
            )
        else:
            logger.error("%s: the connection failed", host, exc_info=True, extra={"action": "http_error"})

    def server_close(self) -> None:
        self._closing.set()
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")
        if self._waiter.is_alive():
            self._waiter.join(5)
        for connection in list(self._waiting):
            self.shutdown_request(connection)
        self._waiting.clear()
        with contextlib.suppress(queue.Empty):
            while True:
                self.shutdown_request(self._incoming.get_nowait()[0])
        self._wake_r.close()
        self._wake_w.close()
        super().server_close()

    # -- the waiting room -----------------------------------------------------------

    def _wait_loop(self) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(self._wake_r, selectors.EVENT_READ)
            while not self._closing.is_set():
                try:
                    self._wait_round(selector)
                except Exception:  # this thread must outlive any one connection's trouble
                    logger.exception("waiting connections: unexpected error", extra={"action": "http_error"})
                    time.sleep(0.1)

    def _wait_round(self, selector: selectors.BaseSelector) -> None:
        for key, _ in selector.select(timeout=0.25):
            if key.fileobj is self._wake_r:
                with contextlib.suppress(OSError):
                    self._wake_r.recv(4096)
                with contextlib.suppress(queue.Empty):
                    while True:
                        connection, address = self._incoming.get_nowait()
                        try:
                            self._admit(selector, connection, address)
                        except (OSError, ValueError):  # closed under us: nothing to wait for
                            self._drop(selector, connection)
            elif isinstance(key.fileobj, socket.socket):
                self._receive(selector, key.fileobj)
        self._expire(selector)

    def _admit(self, selector: selectors.BaseSelector, connection: socket.socket, address: Any) -> None:
        with self._lock:
            full = len(self._waiting) + self._active >= self.max_open
        if full:
            if not self._waiting:
                self._refuse(connection, "too many connections")
                return
            self._drop(selector, next(iter(self._waiting)))
            self._note_shed("too many connections: closed the longest-waiting one")
        connection.setblocking(False)
        self._waiting[connection] = _Waiting(address, time.monotonic() + self.idle_timeout)
        selector.register(connection, selectors.EVENT_READ)

    def _receive(self, selector: selectors.BaseSelector, connection: socket.socket) -> None:
        waiting = self._waiting[connection]
        try:
            chunk = connection.recv(PREFETCH - len(waiting.data))
        except BlockingIOError:
            return
        except OSError:  # reset: no one to answer
            self._drop(selector, connection)
            return
        if not chunk and not waiting.data:  # closed without a word
            self._drop(selector, connection)
            return
        if not waiting.data:  # the request's deadline runs from its first byte
            waiting.expires = time.monotonic() + self.request_timeout
        waiting.data += chunk
        if chunk and not waiting.complete():
            return
        # Complete, or closed half-way (the handler answers what it can of it).
        selector.unregister(connection)
        del self._waiting[connection]
        self._dispatch(connection, waiting)

    def _dispatch(self, connection: socket.socket, waiting: _Waiting) -> None:
        with self._lock:
            busy = self._active >= self.max_active
            if not busy:
                self._active += 1
                self._handed[connection] = (bytes(waiting.data), waiting.expires)
        if busy:
            self._refuse(connection, "too many requests at once")
            return
        try:
            super().process_request(connection, waiting.address)  # ThreadingMixIn: a handler thread
        except RuntimeError:  # no thread could be started
            with self._lock:
                self._active -= 1
                self._handed.pop(connection, None)
            self._refuse(connection, "no thread for the request")

    def _drop(self, selector: selectors.BaseSelector, connection: socket.socket) -> None:
        if self._waiting.pop(connection, None) is not None:
            with contextlib.suppress(KeyError, ValueError):  # not registered yet, or closed
                selector.unregister(connection)
        self.shutdown_request(connection)

    def _expire(self, selector: selectors.BaseSelector) -> None:
        now = time.monotonic()
        for connection in [c for c, waiting in self._waiting.items() if waiting.expires <= now]:
            if self._waiting[connection].data:  # a request begun and not finished in time
                self._waiting.pop(connection)
                selector.unregister(connection)
                message = f"the request did not arrive within {self.request_timeout:g}s"
                self._answer(connection, 408, message, "bad_request")
            else:
                self._drop(selector, connection)

    def _refuse(self, connection: socket.socket, why: str) -> None:
        """A quick 503 and close."""
        message = f"the server is busy ({why}): try again"
        self._answer(connection, 503, message, "infra_unavailable", "Retry-After: 1\r\n")
        self._note_shed(why)

    def _answer(
        self, connection: socket.socket, status: int, message: str, error_class: str, extra: str = ""
    ) -> None:
        """A JSON error from the waiting room (best effort, never blocking), then close."""
        body = json.dumps({"error": message, "error_class": error_class}) + "\n"
        head = (
            f"HTTP/1.0 {status} {HTTPStatus(status).phrase}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n{extra}Connection: close\r\n\r\n"
        )
        with contextlib.suppress(OSError):
            connection.setblocking(False)
            connection.send((head + body).encode())
        self.shutdown_request(connection)

    def _note_shed(self, why: str) -> None:
        """A warning at most once a minute, with the count: a flood must not flood the log too."""
        self._shed += 1
        now = time.monotonic()
        if now - self._warned_at >= 60:
            logger.warning(
                "HTTP connections shed: %s (%d since the last warning)",
                why,
                self._shed,
                extra={"action": "http_shed", "shed": self._shed},
            )
            self._warned_at, self._shed = now, 0


def make_server(
    app: App,
    host: str,
    port: int,
    *,
    request_timeout: float = REQUEST_TIMEOUT,
    idle_timeout: float = IDLE_TIMEOUT,
    max_active: int = MAX_ACTIVE,
    max_open: int = MAX_OPEN,
) -> Server:
    """A threaded server bound to host:port (port 0: any free port)."""
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY:
        max_open = max(16, min(max_open, soft - FD_RESERVE))
    handler = type("BoundHandler", (Handler,), {"app": app})
    return Server(
        (host.strip("[]"), port),
        handler,
        family,
        request_timeout=request_timeout,
        idle_timeout=idle_timeout,
        max_active=max_active,
        max_open=max_open,
    )

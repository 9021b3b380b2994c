"""The HTTP API: JSON in and out, on the standard library's ThreadingHTTPServer.

The web front end calls it on behalf of its logged-in user: every /api/ call
carries `Authorization: Bearer <PIDEPLOY_API_TOKEN>` (when a token is
configured) and the acting user in `X-User-Id`. A user only ever sees and acts
on their own instances and tasks; someone else's answer exactly like a missing
one (404). Bad input is answered with a 4xx and a JSON error before anything
is written. `Api.handle` is plain request-in, response-out; `Handler` is the
thin http.server adapter around it.
"""

from __future__ import annotations

import contextlib
import hmac
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
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import tasks
from config import Config
from db import Database, Row
from errors import BadRequest, Conflict, InfraUnavailable, NotFound, PiDeployError
from proxy import Proxy, route_key

logger = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
MAX_BODY = 64 * 1024
DRAIN_LIMIT = 1024 * 1024  # an oversize body up to this is read and dropped; past it the connection is closed
MAX_DEPTH = 32  # JSON nesting a body may have (a config is a few levels deep)
INSTANCE_STATUSES = ("creating", "running", "stopped", "updating", "deleting", "error")


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


# ---------------------------------------------------------------------------
# Shapes: what a client sees of rows
# ---------------------------------------------------------------------------


INSTANCE_FIELDS = (
    "id",
    "user_id",
    "name",
    "status",
    "image",
    "port",
    "config",
    "last_error",
    "created_at",
    "updated_at",
)
TASK_FIELDS = (
    *("id", "type", "status", "instance_id", "user_id", "params", "result", "error_class", "attempts"),
    *("max_attempts", "cancel_requested", "turns", "cost_usd", "duration_s", "created_at", "started_at"),
    "finished_at",
)


def instance_json(row: Mapping[str, Any], config: Config, proxy: Proxy | None = None) -> dict[str, Any]:
    """An instance for its owner: the url carries the route token (proxy.route_key)."""
    body = {key: row[key] for key in INSTANCE_FIELDS}
    body["url"] = None
    if proxy is not None and row["status"] == "running":
        body["url"] = proxy.url_for(route_key(row, config))
    return body


def task_json(row: Row) -> dict[str, Any]:
    body = {key: row[key] for key in TASK_FIELDS}
    body["error"] = row["last_error"]
    body["trace_file"] = Path(row["trace_file"]).name if row["trace_file"] else None
    return body


def event_json(row: Row) -> dict[str, Any]:
    return {k: row[k] for k in ("id", "instance_id", "task_id", "kind", "detail", "created_at")}


# ---------------------------------------------------------------------------
# The API
# ---------------------------------------------------------------------------

Route = tuple[str, re.Pattern[str], str]
_ID = r"([0-9]{1,18})"
ROUTES: list[Route] = [
    (method, re.compile(pattern), name)
    for method, pattern, name in (
        ("GET", r"/", "dashboard"),
        ("GET", r"/healthz", "healthz"),
        ("GET", r"/metrics", "metrics"),
        ("GET", r"/api/instances", "list_instances"),
        ("POST", r"/api/instances", "create_instance"),
        ("GET", rf"/api/instances/{_ID}", "get_instance"),
        ("DELETE", rf"/api/instances/{_ID}", "delete_instance"),
        ("POST", rf"/api/instances/{_ID}/(start|stop|update)", "act"),
        ("GET", r"/api/tasks", "list_tasks"),
        ("GET", rf"/api/tasks/{_ID}", "get_task"),
        ("GET", rf"/api/tasks/{_ID}/trace", "get_trace"),
        ("GET", r"/api/events", "list_events"),
    )
]


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: Mapping[str, str]
    body: bytes
    user: str = ""  # set once the caller is identified

    def param(self, name: str) -> str | None:
        values = self.query.get(name)
        return values[-1] if values else None


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object with each key once: with a repeated key, which one counts depends on the
    parser, so a front end that checked the first could pass us a second."""
    document = dict(pairs)
    if len(document) != len(pairs):
        repeated = sorted(key for key, n in Counter(key for key, _ in pairs).items() if n > 1)
        raise ValueError(f"repeated key(s) in one object: {', '.join(map(repr, repeated))[:200]}")
    return document


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:40]} is out of range")
    return value


def _depth(document: object) -> int:
    """How deeply lists and objects nest (iteratively: the parser's own limit is near Python's)."""
    deepest, stack = 0, [(document, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict | list):
            deepest = max(deepest, depth)
            if depth <= MAX_DEPTH:
                stack += [
                    (item, depth + 1) for item in (value.values() if isinstance(value, dict) else value)
                ]
    return deepest


class Api:
    def __init__(
        self,
        config: Config,
        db: Database,
        queue: tasks.Queue,
        proxy: Proxy | None = None,
        root: Path = HERE,
    ) -> None:
        self.config, self.db, self.queue, self.proxy, self.root = config, db, queue, proxy, root
        self.token = config.api_token.encode()

    def handle(self, method: str, target: str, headers: Mapping[str, str], body: bytes) -> Response:
        """One request; `headers` has lower-case names."""
        split = urlsplit(target)
        path = split.path.rstrip("/") or "/"
        request = Request(method, path, parse_qs(split.query), headers, body)
        try:
            if path.startswith("/api/"):
                request = Request(method, path, request.query, headers, body, self.identify(headers))
            name, args = self.route(method, path)
            handler: Callable[..., Response] = getattr(self, name)
            return handler(request, *args)
        except PiDeployError as error:
            if isinstance(error, InfraUnavailable):
                logger.warning("%s %s: %s", method, path, error.message, extra={"action": "http_unavailable"})
            return error_response(error)

    def route(self, method: str, path: str) -> tuple[str, tuple[str, ...]]:
        """The endpoint for method and path. HEAD is GET without the body (the Handler drops it);
        any other method a path does not take is a 405 that lists, in `Allow`, the ones it does."""
        allowed: list[str] = []
        for route_method, pattern, name in ROUTES:
            match = pattern.fullmatch(path)
            if match:
                if method == route_method or (method == "HEAD" and route_method == "GET"):
                    return name, match.groups()
                allowed += [route_method, "HEAD"] if route_method == "GET" else [route_method]
        if allowed:
            allow = ", ".join(allowed)
            raise ApiError(405, f"{method[:20]} is not allowed on {path} (allowed: {allow})", allow=allow)
        raise NotFound(f"no route {path}")

    def identify(self, headers: Mapping[str, str]) -> str:
        """The acting user, once the caller proved it is the front end (or a local caller)."""
        if self.token:
            scheme, _, given = (headers.get("authorization") or "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.token):
                raise ApiError(
                    401, "missing or wrong bearer token (Authorization: Bearer <PIDEPLOY_API_TOKEN>)"
                )
        user = headers.get("x-user-id") or ""
        if not user:
            raise ApiError(401, "the X-User-Id header (the acting user) is required")
        if not re.fullmatch(tasks.USER_PATTERN, user):
            raise ApiError(
                400, "X-User-Id must be 1-128 characters of A-Z a-z 0-9 _ . @ -", field="X-User-Id"
            )
        if user == tasks.SYSTEM_USER:
            raise ApiError(403, f"{tasks.SYSTEM_USER!r} is reserved for piDeploy's own tasks")
        return user

    # --- helpers ----------------------------------------------------------

    @staticmethod
    def body(request: Request, allowed: tuple[str, ...]) -> dict[str, Any]:
        """The JSON object in the body (empty body: {}), with no fields besides `allowed`."""
        if not request.body.strip():
            return {}
        try:
            document = json.loads(
                request.body,
                object_pairs_hook=_unique_keys,
                parse_constant=_no_constant,
                parse_float=_finite_float,
            )
        except RecursionError:
            raise BadRequest(f"the body is nested deeper than {MAX_DEPTH} levels") from None
        except (ValueError, UnicodeDecodeError) as error:
            raise BadRequest(f"the body is not valid JSON: {error}") from None
        if not isinstance(document, dict):
            raise BadRequest("the body must be a JSON object")
        if _depth(document) > MAX_DEPTH:
            raise BadRequest(f"the body is nested deeper than {MAX_DEPTH} levels")
        unknown = sorted(set(document) - set(allowed))
        if unknown:
            known = ", ".join(allowed) or "none"
            raise BadRequest(f"unknown field(s): {', '.join(unknown)} (allowed: {known})", field=unknown[0])
        return document

    @staticmethod
    def idempotency_key(request: Request) -> str | None:
        key = request.headers.get("idempotency-key")
        if key is not None and not re.fullmatch(r"[\x21-\x7e]{1,200}", key):
            raise BadRequest(
                "Idempotency-Key must be 1-200 printable ASCII characters", field="Idempotency-Key"
            )
        return key

    @staticmethod
    def int_param(request: Request, name: str, default: int | None, low: int, high: int) -> int | None:
        raw = request.param(name)
        if raw is None:
            return default
        if not re.fullmatch(r"[0-9]{1,18}", raw) or not low <= int(raw) <= high:
            raise BadRequest(f"{name} must be an integer from {low} to {high}", field=name)
        return int(raw)

    def owned_instance(self, user: str, instance_id: int) -> Row:
        row = self.db.one("instance_get_owned", id=instance_id, user_id=user)
        if row is None:
            raise NotFound(f"no instance {instance_id}", instance_id=instance_id)
        return row

    def accepted(self, submitted: tasks.Submitted, **extra: Any) -> Response:
        task = submitted.task
        return json_response(
            202,
            {
                "task_id": task["id"],
                "instance_id": task["instance_id"],
                "status": task["status"],
                "deduplicated": not submitted.created,
                **extra,
            },
        )

    # --- endpoints --------------------------------------------------------

    def dashboard(self, request: Request) -> Response:
        page = self.root / "dashboard.html"
        if not page.is_file():
            raise NotFound("no dashboard here (dashboard.html is not installed); the API is under /api/")
        return Response(200, page.read_bytes(), "text/html; charset=utf-8", {"Cache-Control": "no-store"})

    def healthz(self, request: Request) -> Response:
        try:
            version = self.db.ping()  # at once: a load balancer must not wait out the pool's 30 s
        except PiDeployError as error:
            return json_response(503, {"ok": False, "db": error.message})
        return json_response(200, {"ok": True, "db": "ok", "schema_version": version})

    def metrics(self, request: Request) -> Response:
        text = render_metrics(self.db)
        return Response(200, text.encode(), "text/plain; version=0.0.4; charset=utf-8")

    def list_instances(self, request: Request) -> Response:
        rows = self.db.all("instance_list_for_user", user_id=request.user)
        events = self.db.all("event_last_per_instance_for_user", user_id=request.user)
        last = {e["instance_id"]: event_json(e) for e in events}
        return json_response(
            200,
            [{**instance_json(r, self.config, self.proxy), "last_event": last.get(r["id"])} for r in rows],
        )

    def create_instance(self, request: Request) -> Response:
        body = self.body(request, ("name", "config"))
        if "name" not in body:
            raise BadRequest("name is required", field="name")
        config = body.get("config")
        if "config" in body and not isinstance(config, dict):
            raise BadRequest("config must be a JSON object", field="config")
        instance, submitted = self.queue.submit_create(
            request.user, body["name"], config, self.config.image, self.idempotency_key(request)
        )
        return self.accepted(submitted, instance=instance_json(instance, self.config, self.proxy))

    def get_instance(self, request: Request, instance_id: str) -> Response:
        row = self.owned_instance(request.user, int(instance_id))
        events = self.db.all(
            "event_list_for_instance_user", instance_id=row["id"], user_id=request.user, limit=1
        )
        body = {
            **instance_json(row, self.config, self.proxy),
            "last_event": event_json(events[0]) if events else None,
        }
        return json_response(200, body)

    def delete_instance(self, request: Request, instance_id: str) -> Response:
        self.body(request, ())
        submitted = self.queue.submit_action(
            request.user, "instance_delete", int(instance_id), {}, self.idempotency_key(request)
        )
        return self.accepted(submitted)

    def act(self, request: Request, instance_id: str, action: str) -> Response:
        params = self.body(request, ("image", "config") if action == "update" else ())
        submitted = self.queue.submit_action(
            request.user, f"instance_{action}", int(instance_id), params, self.idempotency_key(request)
        )
        return self.accepted(submitted)

    def list_tasks(self, request: Request) -> Response:
        limit = self.int_param(request, "limit", 50, 1, 500)
        instance = self.int_param(request, "instance", None, 1, 2**62)
        rows = self.queue.list(user_id=request.user, instance_id=instance, limit=limit or 50)
        return json_response(200, [task_json(r) for r in rows])

    def get_task(self, request: Request, task_id: str) -> Response:
        return json_response(200, task_json(self.queue.get(int(task_id), request.user)))

    def get_trace(self, request: Request, task_id: str) -> Response:
        task = self.queue.get(int(task_id), request.user)
        if not task["trace_file"]:
            raise NotFound(f"task {task_id} has no trace yet", task_id=int(task_id))
        path = Path(task["trace_file"]).resolve()
        root = self.config.traces.resolve()
        if root not in path.parents or not path.is_file():
            raise NotFound(f"the trace of task {task_id} is not available here", task_id=int(task_id))
        return Response(200, path.read_bytes(), "application/json")

    def list_events(self, request: Request) -> Response:
        limit = self.int_param(request, "limit", 100, 1, 1000) or 100
        instance = self.int_param(request, "instance", None, 1, 2**62)
        if instance is None:
            rows = self.db.all("event_list_for_user", user_id=request.user, limit=limit)
        else:
            # A deleted instance keeps its history: ownership is read from the events themselves.
            rows = self.db.all(
                "event_list_for_instance_user", instance_id=instance, user_id=request.user, limit=limit
            )
            if not rows:
                self.owned_instance(request.user, instance)
        return json_response(200, [event_json(r) for r in rows])


# ---------------------------------------------------------------------------
# /metrics: Prometheus text exposition, written by hand
# ---------------------------------------------------------------------------


def render_metrics(db: Database) -> str:
    task_rows = db.all("metrics_tasks")
    counts = {(r["type"], r["status"]): r["n"] for r in task_rows}
    lines = [
        "# HELP pideploy_tasks Tasks in the table, by type and status.",
        "# TYPE pideploy_tasks gauge",
    ]
    statuses = ("queued", "running", "succeeded", "failed", "cancelled")
    for task_type in tasks.TYPES:
        for status in statuses:
            lines.append(
                f'pideploy_tasks{{type="{task_type}",status="{status}"}} {counts.get((task_type, status), 0)}'
            )
    depth = sum(n for (_, status), n in counts.items() if status == "queued")
    lines += [
        "# HELP pideploy_queue_depth Tasks waiting for a worker.",
        "# TYPE pideploy_queue_depth gauge",
        f"pideploy_queue_depth {depth}",
        "# HELP pideploy_task_duration_seconds Run time of finished tasks, by type.",
        "# TYPE pideploy_task_duration_seconds summary",
    ]
    for task_type in tasks.TYPES:
        rows = [r for r in task_rows if r["type"] == task_type]
        total = sum(float(r["duration_sum"]) for r in rows)
        count = sum(int(r["duration_count"]) for r in rows)
        lines.append(f'pideploy_task_duration_seconds_sum{{type="{task_type}"}} {total:.6f}')
        lines.append(f'pideploy_task_duration_seconds_count{{type="{task_type}"}} {count}')
    cost = sum(float(r["cost_usd"]) for r in task_rows)
    heartbeat = db.one("metrics_heartbeat") or {"rounds": 0, "repairs": 0}
    instances = {r["status"]: r["n"] for r in db.all("instance_count_by_status")}
    lines += [
        "# HELP pideploy_task_cost_usd_total Model spending of all recorded task runs, in US dollars.",
        "# TYPE pideploy_task_cost_usd_total counter",
        f"pideploy_task_cost_usd_total {cost:.6f}",
        "# HELP pideploy_heartbeat_rounds_total Heartbeat rounds recorded.",
        "# TYPE pideploy_heartbeat_rounds_total counter",
        f"pideploy_heartbeat_rounds_total {heartbeat['rounds']}",
        "# HELP pideploy_heartbeat_repairs_total Drifts the heartbeat repaired.",
        "# TYPE pideploy_heartbeat_repairs_total counter",
        f"pideploy_heartbeat_repairs_total {heartbeat['repairs']}",
        "# HELP pideploy_instances Instances by status.",
        "# TYPE pideploy_instances gauge",
    ]
    lines += [f'pideploy_instances{{status="{s}"}} {instances.get(s, 0)}' for s in INSTANCE_STATUSES]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------
# The HTTP server
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
    """Reads the request (capped in size and time), hands it to the Api, writes the response."""

    api: Api  # set on the subclass `make_server` builds
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
            response = self.api.handle(self.command, self.path, headers, body)
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
    api: Api,
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
    handler = type("BoundHandler", (Handler,), {"api": api})
    return Server(
        (host.strip("[]"), port),
        handler,
        family,
        request_timeout=request_timeout,
        idle_timeout=idle_timeout,
        max_active=max_active,
        max_open=max_open,
    )

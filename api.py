"""The HTTP API: what each endpoint does, JSON in and out (httpd.py serves it).

The web front end calls it on behalf of its logged-in user: every /api/ call
carries `Authorization: Bearer <PIDEPLOY_API_TOKEN>` (when a token is
configured) and the acting user in `X-User-Id`. A user only ever sees and acts
on their own instances and tasks; someone else's answer exactly like a missing
one (404). Bad input is answered with a 4xx and a JSON error before anything
is written. `Api.handle` is plain request-in, response-out; httpd.py's `Handler` is
the http.server adapter around it.
"""

from __future__ import annotations

import hmac
import json
import logging
import math
import re
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import tasks
from config import Config
from db import Database, Row
from errors import BadRequest, InfraUnavailable, NotFound, PiDeployError
from httpd import ApiError, Response, error_response, json_response
from proxy import Proxy, route_key

logger = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
MAX_DEPTH = 32  # JSON nesting a body may have (a config is a few levels deep)
INSTANCE_STATUSES = ("creating", "running", "stopped", "updating", "deleting", "error")


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

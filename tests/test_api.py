"""The HTTP API (api.py) over real HTTP: a real Postgres, MemoryEngine/MemoryProxy, the playbook loop.

The same lifecycle through a real `serve` process, on the real engine and
nginx, is in tests/test_serve.py.
"""

from __future__ import annotations

import http.client
import json
import logging
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import api
import httpd
import pideploy
import tasks
import tools
from config import Config
from db import Database
from engine import LABEL_INSTANCE, LABEL_NAMESPACE, MemoryEngine
from proxy import MemoryProxy
from tests import fuzz_api
from tests.conftest import make_config

pytestmark = pytest.mark.stack  # a real PostgreSQL (the `database` fixture)

TOKEN = "s3cret-token"
V2 = "localhost/pideploy-gateway:v2"


@dataclass
class Reply:
    status: int
    body: Any
    raw: bytes
    headers: dict[str, str]


class Client:
    def __init__(self, port: int, token: str | None) -> None:
        self.port, self.token = port, token

    def call(
        self,
        method: str,
        path: str,
        body: object = None,
        *,
        user: str | None = "alice",
        raw: bytes | None = None,
        headers: dict[str, str] | None = None,
        token: str | None = None,
    ) -> Reply:
        sent = dict(headers or {})
        bearer = token if token is not None else self.token
        if bearer:
            sent["Authorization"] = f"Bearer {bearer}"
        if user is not None:
            sent["X-User-Id"] = user
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        if data is not None:
            sent.setdefault("Content-Type", "application/json")
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request(method, path, body=data, headers=sent)
            response = conn.getresponse()
            payload = response.read()
        finally:
            conn.close()
        ctype = response.getheader("Content-Type") or ""
        parsed = json.loads(payload) if payload and ctype.startswith("application/json") else None
        return Reply(response.status, parsed, payload, {k.lower(): v for k, v in response.getheaders()})


@dataclass
class Service:
    client: Client
    database: Database
    engine: MemoryEngine
    config: Config
    queue: tasks.Queue
    start_workers: Callable[[], None]

    def wait_task(self, task_id: int, timeout: float = 30) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            task = self.client.call("GET", f"/api/tasks/{task_id}").body
            if task["finished_at"]:
                return dict(task)
            time.sleep(0.05)
        raise AssertionError(f"task {task_id} did not finish")

    def counts(self) -> tuple[int, int, int]:
        with self.database.transaction() as conn:
            row = conn.execute(
                "SELECT (SELECT count(*) FROM task) AS t, (SELECT count(*) FROM instance) AS i,"
                " (SELECT count(*) FROM event) AS e"
            ).fetchone()
        assert row is not None
        return row["t"], row["i"], row["e"]


def _service(database: Database, tmp_path: Path, token: str, root: Path) -> Iterator[Service]:
    config = make_config(tmp_path, agent="off", api_token=token, namespace="apitest")
    engine = MemoryEngine()
    proxy = MemoryProxy()
    rt = tools.Runtime(config, database, engine, proxy)
    queue = tasks.Queue(database, config.max_attempts)
    server = httpd.make_server(api.Api(config, database, queue, proxy, root=root), "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, args=(0.1,), daemon=True)
    thread.start()
    pool = tasks.WorkerPool(queue, lambda: pideploy.task_runner(rt, config), 2, lease_s=10, poll_interval=0.1)
    started: list[bool] = []

    def start_workers() -> None:
        started.append(True)
        pool.start()

    yield Service(
        Client(server.server_address[1], token or None), database, engine, config, queue, start_workers
    )
    if started:
        pool.shutdown(5)
    server.shutdown()
    server.server_close()
    engine.close()


@pytest.fixture
def service(database: Database, tmp_path: Path) -> Iterator[Service]:
    yield from _service(database, tmp_path, TOKEN, tmp_path / "no-dashboard")


@pytest.fixture
def open_service(database: Database, tmp_path: Path) -> Iterator[Service]:
    """No token configured: loopback callers still have to name their user."""
    root = tmp_path / "site"
    root.mkdir()
    (root / "dashboard.html").write_text("<html>dashboard</html>")
    yield from _service(database, tmp_path, "", root)


def containers(engine: MemoryEngine, instance_id: int) -> list[Any]:
    return engine.list({LABEL_NAMESPACE: "apitest", LABEL_INSTANCE: str(instance_id)})


# --- the lifecycle ------------------------------------------------------------


def test_the_full_lifecycle_through_the_api(service: Service) -> None:
    service.start_workers()
    c = service.client
    created = c.call("POST", "/api/instances", {"name": "web", "config": {"env": {"GREETING": "hi"}}})
    assert created.status == 202, created.body
    iid, task_id = created.body["instance_id"], created.body["task_id"]
    assert created.body["instance"]["status"] in ("creating", "running")  # the row exists at once
    assert service.wait_task(task_id)["status"] == "succeeded"
    inst = c.call("GET", f"/api/instances/{iid}").body
    token = service.database.one("instance_get", id=iid)["route_token"]  # type: ignore[index]
    assert inst["status"] == "running" and inst["url"].endswith(f"/i/{iid}-{token}/")
    assert [x.state for x in containers(service.engine, iid)] == ["running"]

    stop = c.call("POST", f"/api/instances/{iid}/stop")
    assert stop.status == 202 and service.wait_task(stop.body["task_id"])["status"] == "succeeded"
    assert c.call("GET", f"/api/instances/{iid}").body["status"] == "stopped"
    assert [x.state for x in containers(service.engine, iid)] == ["exited"]

    start = c.call("POST", f"/api/instances/{iid}/start", {})
    assert start.status == 202 and service.wait_task(start.body["task_id"])["status"] == "succeeded"
    assert [x.state for x in containers(service.engine, iid)] == ["running"]

    update = c.call("POST", f"/api/instances/{iid}/update", {"image": V2})
    assert update.status == 202 and service.wait_task(update.body["task_id"])["status"] == "succeeded"
    inst = c.call("GET", f"/api/instances/{iid}").body
    assert inst["image"] == V2 and inst["status"] == "running"
    assert [(x.image, x.state) for x in containers(service.engine, iid)] == [(V2, "running")]

    delete = c.call("DELETE", f"/api/instances/{iid}")
    assert delete.status == 202
    finished = service.wait_task(delete.body["task_id"])
    assert finished["status"] == "succeeded" and finished["trace_file"]
    assert c.call("GET", f"/api/instances/{iid}").status == 404
    assert containers(service.engine, iid) == []
    assert c.call("GET", "/api/instances").body == []

    kinds = [e["kind"] for e in c.call("GET", f"/api/events?instance={iid}").body]
    assert {"created", "stopped", "started", "updated", "deleted"} <= set(kinds)
    listed = c.call("GET", "/api/tasks?limit=10").body
    assert [t["type"] for t in listed][:5] == [
        "instance_delete",
        "instance_update",
        "instance_start",
        "instance_stop",
        "instance_create",
    ]
    trace = c.call("GET", f"/api/tasks/{finished['id']}/trace")
    assert trace.status == 200 and trace.body["task_id"] == finished["id"]


def test_actions_queued_behind_a_create_wait_their_turn(service: Service) -> None:
    c = service.client
    created = c.call("POST", "/api/instances", {"name": "early"}).body
    stop = c.call("POST", f"/api/instances/{created['instance_id']}/stop")
    assert stop.status == 202  # accepted while the create is still queued
    service.start_workers()
    create_task = service.wait_task(created["task_id"])
    stop_task = service.wait_task(stop.body["task_id"])
    assert create_task["status"] == stop_task["status"] == "succeeded"
    assert stop_task["started_at"] >= create_task["finished_at"]
    assert c.call("GET", f"/api/instances/{created['instance_id']}").body["status"] == "stopped"


def test_a_stop_queued_behind_a_create_that_fails_leaves_it_error(service: Service) -> None:
    c = service.client
    created = c.call(
        "POST", "/api/instances", {"name": "doomed", "config": {"env": {"GATEWAY_CRASH_AT_START": "1"}}}
    )
    iid = created.body["instance_id"]
    stop = c.call("POST", f"/api/instances/{iid}/stop")
    start = c.call("POST", f"/api/instances/{iid}/start")
    assert stop.status == start.status == 202  # accepted: the create may still succeed
    service.start_workers()
    assert service.wait_task(created.body["task_id"])["status"] == "failed"
    for task_id in (stop.body["task_id"], start.body["task_id"]):
        task = service.wait_task(task_id)
        assert (task["status"], task["error_class"]) == ("failed", "tool_refused"), task
    instance = c.call("GET", f"/api/instances/{iid}").body
    assert instance["status"] == "error" and instance["last_error"].startswith("create failed at health")
    assert containers(service.engine, iid) == []
    again = c.call("POST", f"/api/instances/{iid}/stop")
    assert again.status == 409 and "its create failed" in again.body["error"]


def test_instances_carry_their_last_event(service: Service) -> None:
    # The dashboard shows each instance's newest event without a request per row.
    service.start_workers()
    c = service.client
    mine = c.call("POST", "/api/instances", {"name": "evented"}).body
    theirs = c.call("POST", "/api/instances", {"name": "other"}, user="bob").body
    assert service.wait_task(mine["task_id"])["status"] == "succeeded"
    stop = c.call("POST", f"/api/instances/{mine['instance_id']}/stop").body
    assert service.wait_task(stop["task_id"])["status"] == "succeeded"
    newest = c.call("GET", f"/api/events?instance={mine['instance_id']}&limit=1").body[0]
    assert newest["kind"] == "stopped"

    [listed] = c.call("GET", "/api/instances").body
    assert listed["id"] == mine["instance_id"] and listed["last_event"] == newest
    assert c.call("GET", f"/api/instances/{mine['instance_id']}").body["last_event"] == newest
    [bobs] = c.call("GET", "/api/instances", user="bob").body
    assert bobs["last_event"]["instance_id"] == theirs["instance_id"]


# --- duplicates and ownership -------------------------------------------------------


def test_duplicate_submissions_are_deduplicated(service: Service) -> None:
    c = service.client
    first = c.call("POST", "/api/instances", {"name": "dup"})
    second = c.call("POST", "/api/instances", {"name": "dup"})
    assert first.status == second.status == 202
    assert (second.body["task_id"], second.body["instance_id"]) == (
        first.body["task_id"],
        first.body["instance_id"],
    )
    assert second.body["deduplicated"] and not first.body["deduplicated"]
    iid = first.body["instance_id"]
    a = c.call("POST", f"/api/instances/{iid}/stop", headers={"Idempotency-Key": "click-1"})
    b = c.call("POST", f"/api/instances/{iid}/stop", headers={"Idempotency-Key": "click-1"})
    assert a.body["task_id"] == b.body["task_id"] and b.body["deduplicated"]
    assert service.counts()[:2] == (2, 1)


def test_an_idempotency_key_held_by_a_different_request_is_a_409(service: Service) -> None:
    c = service.client
    first = c.call("POST", "/api/instances", {"name": "web"}, headers={"Idempotency-Key": "k1"})
    assert first.status == 202
    retry = c.call("POST", "/api/instances", {"name": "web"}, headers={"Idempotency-Key": "k1"})
    assert (
        retry.status == 202 and retry.body["deduplicated"] and retry.body["task_id"] == first.body["task_id"]
    )
    stop = c.call(
        "POST", f"/api/instances/{first.body['instance_id']}/stop", headers={"Idempotency-Key": "k2"}
    )
    assert stop.status == 202
    before = service.counts()
    for body, key, holder in [
        ({"name": "other"}, "k1", first.body["task_id"]),
        ({"name": "web", "config": {"env": {"A": "1"}}}, "k1", first.body["task_id"]),
        ({"name": "third"}, "k2", stop.body["task_id"]),
    ]:
        reply = c.call("POST", "/api/instances", body, headers={"Idempotency-Key": key})
        assert reply.status == 409, (body, key, reply.body)
        assert reply.body["task_id"] == holder and "a different request" in reply.body["error"]
    # Without a key, the same name with another config is not a repeat either.
    twin = c.call("POST", "/api/instances", {"name": "web", "config": {"env": {"A": "1"}}})
    assert twin.status == 409
    assert service.counts() == before


def test_a_user_only_sees_and_acts_on_their_own(service: Service) -> None:
    c = service.client
    created = c.call("POST", "/api/instances", {"name": "private"}).body
    iid, task_id = created["instance_id"], created["task_id"]
    before = service.counts()
    unknown = c.call("GET", "/api/instances/999999", user="bob")
    for method, path in [
        ("GET", f"/api/instances/{iid}"),
        ("POST", f"/api/instances/{iid}/stop"),
        ("POST", f"/api/instances/{iid}/start"),
        ("POST", f"/api/instances/{iid}/update"),
        ("DELETE", f"/api/instances/{iid}"),
        ("GET", f"/api/events?instance={iid}"),
    ]:
        reply = c.call(method, path, user="bob")
        assert reply.status == 404, (method, path, reply.body)
        assert reply.body["error"] == unknown.body["error"].replace("999999", str(iid))
    assert c.call("GET", f"/api/tasks/{task_id}", user="bob").status == 404
    assert c.call("GET", f"/api/tasks/{task_id}/trace", user="bob").status == 404
    assert c.call("GET", "/api/instances", user="bob").body == []
    assert c.call("GET", "/api/tasks", user="bob").body == []
    assert c.call("GET", "/api/events", user="bob").body == []
    assert service.counts() == before


def test_identity_is_required(service: Service) -> None:
    c = service.client
    assert c.call("GET", "/api/instances", token="wrong").status == 401
    no_token = Client(c.port, None).call("GET", "/api/instances")
    assert no_token.status == 401 and no_token.headers["www-authenticate"].startswith("Bearer")
    assert c.call("GET", "/api/instances", user=None).status == 401
    assert c.call("GET", "/api/instances", user="bad user!").status == 400
    assert c.call("GET", "/api/instances", user="system").status == 403
    assert c.call("GET", "/api/instances").status == 200
    # Health and metrics are for the operator's probes: no identity.
    assert Client(c.port, None).call("GET", "/healthz", user=None).body["ok"] is True


def test_without_a_token_the_user_header_is_still_required(open_service: Service) -> None:
    c = open_service.client
    assert c.call("GET", "/api/instances", user=None).status == 401
    assert c.call("GET", "/api/instances").status == 200
    page = c.call("GET", "/", user=None)
    assert page.status == 200 and b"dashboard" in page.raw


# --- bad input -----------------------------------------------------------------------


def test_bad_input_is_a_4xx_and_writes_nothing(service: Service) -> None:
    c = service.client
    iid = c.call("POST", "/api/instances", {"name": "target"}).body["instance_id"]
    gone = c.call("POST", "/api/instances", {"name": "gone"}).body["instance_id"]
    with service.database.transaction() as conn:
        conn.execute("UPDATE instance SET status = 'deleting', last_error = NULL WHERE id = %s", (gone,))
    before = service.counts()
    cases: list[tuple[int, str, str, dict[str, Any]]] = [
        (400, "POST", "/api/instances", {"raw": b"{not json"}),
        (400, "POST", "/api/instances", {"raw": b"[1, 2]"}),
        (400, "POST", "/api/instances", {"raw": b"\xff\xfe"}),
        (400, "POST", "/api/instances", {"body": {}}),
        (400, "POST", "/api/instances", {"body": {"name": "ok", "owner": "bob"}}),
        (400, "POST", "/api/instances", {"body": {"name": 5}}),
        (400, "POST", "/api/instances", {"body": {"name": "Not_Valid"}}),
        (400, "POST", "/api/instances", {"body": {"name": "ok", "config": "x"}}),
        (400, "POST", "/api/instances", {"body": {"name": "ok", "config": {"env": {"lower": "x"}}}}),
        (400, "POST", "/api/instances", {"body": {"name": "ok", "config": {"env": {"A": 1}}}}),
        # piDeploy's own fields of the config file: a config claiming another user's instance.
        (
            400,
            "POST",
            "/api/instances",
            {"body": {"name": "ok", "config": {"instance": {"id": 1, "user": "bob"}}}},
        ),
        (400, "POST", "/api/instances", {"body": {"name": "ok", "config": {"gateway": {"port": 1}}}}),
        (400, "POST", "/api/instances", {"body": {"name": "web\n"}}),
        (400, "POST", "/api/instances", {"body": {"name": "ok", "config": {"env": {"FOO\n": "x"}}}}),
        (400, "POST", f"/api/instances/{iid}/update", {"body": {"config": {"env": {"FOO\n": "x"}}}}),
        (400, "GET", "/api/tasks?limit=%D9%A3", {}),  # an Arabic-Indic 3 is not a number here
        (
            413,
            "POST",
            "/api/instances",
            {"raw": b'{"name": "big", "config": {"x": "' + b"a" * 70_000 + b'"}}'},
        ),
        (400, "POST", f"/api/instances/{iid}/update", {"body": {"image": 7}}),
        (400, "POST", f"/api/instances/{iid}/update", {"body": {"tag": "v2"}}),
        (400, "POST", f"/api/instances/{iid}/update", {"body": {"config": {"instance": {"user": "bob"}}}}),
        (400, "POST", f"/api/instances/{iid}/stop", {"body": {"force": True}}),
        (400, "POST", f"/api/instances/{iid}/stop", {"headers": {"Idempotency-Key": "x" * 300}}),
        (404, "POST", "/api/instances/424242/start", {}),
        (404, "POST", f"/api/instances/{iid}/reboot", {}),
        (404, "GET", "/api/nothing", {}),
        (405, "PUT", f"/api/instances/{iid}", {"body": {"name": "x"}}),
        (409, "POST", f"/api/instances/{gone}/start", {}),
        (409, "DELETE", f"/api/instances/{gone}", {}),
        (400, "GET", "/api/tasks?limit=lots", {}),
        (400, "GET", "/api/events?instance=-1", {}),
    ]
    for status, method, path, kw in cases:
        reply = c.call(method, path, kw.get("body"), raw=kw.get("raw"), headers=kw.get("headers"))
        assert reply.status == status, (method, path, kw, reply.status, reply.body)
        assert reply.body["error"] and reply.body["error_class"], (method, path)
    chunked = c.call("POST", "/api/instances", raw=b'{"name": "c"}', headers={"Transfer-Encoding": "chunked"})
    assert chunked.status in (400, 411)
    assert service.counts() == before
    # What the errors say is meant for people.
    unknown = c.call("POST", "/api/instances", {"name": "ok", "owner": "bob"}).body["error"]
    assert "owner" in unknown and "allowed" in unknown
    own = c.call("POST", "/api/instances", {"name": "ok", "config": {"instance": {"id": 1}}}).body["error"]
    assert "config: 'instance' is not allowed: piDeploy writes this key" in own


# --- health, metrics, dashboard ------------------------------------------------------


def test_healthz_and_metrics(service: Service) -> None:
    service.start_workers()
    c = service.client
    created = c.call("POST", "/api/instances", {"name": "counted"}).body
    service.wait_task(created["task_id"])
    health = c.call("GET", "/healthz", user=None)
    assert health.status == 200 and health.body["db"] == "ok"
    metrics = c.call("GET", "/metrics", user=None)
    assert metrics.status == 200 and metrics.headers["content-type"].startswith("text/plain")
    text = metrics.raw.decode()
    assert 'pideploy_tasks{type="instance_create",status="succeeded"} 1' in text
    assert "pideploy_queue_depth 0" in text
    assert 'pideploy_task_duration_seconds_count{type="instance_create"} 1' in text
    assert "pideploy_task_cost_usd_total 0.000000" in text
    assert "pideploy_heartbeat_rounds_total 0" in text and "pideploy_heartbeat_repairs_total 0" in text
    assert 'pideploy_instances{status="running"} 1' in text
    for line in text.splitlines():  # the exposition format: comments, or `name{labels} value`
        assert line.startswith("# ") or len(line.rsplit(" ", 1)) == 2


def test_no_dashboard_file_is_a_404(service: Service) -> None:
    assert service.client.call("GET", "/", user=None).status == 404


def test_loopback_detection() -> None:
    assert httpd.is_loopback("127.0.0.1") and httpd.is_loopback("::1") and httpd.is_loopback("localhost")
    assert (
        not httpd.is_loopback("0.0.0.0")
        and not httpd.is_loopback("10.1.2.3")
        and not httpd.is_loopback("example")
    )


# --- the HTTP edge: ambiguous headers, odd methods and bodies, slow and vanishing clients ---


def raw_request(port: int, data: bytes, timeout: float = 10) -> tuple[int, dict[str, str], bytes]:
    """Send bytes as they are; (status, headers, body) of the answer ((0, {}, b"") if none)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as conn:
        conn.sendall(data)
        received = b""
        while chunk := conn.recv(65536):
            received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    if not head:
        return 0, {}, b""
    lines = head.decode("latin-1").split("\r\n")
    pairs = [line.split(": ", 1) for line in lines[1:]]
    headers = {name.lower(): value for name, value in pairs}
    return int(lines[0].split()[1]), headers, body


def request_bytes(method: str, path: str, headers: list[tuple[str, str]], body: bytes = b"") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: x", *(f"{k}: {v}" for k, v in headers)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def test_a_repeated_identity_or_framing_header_is_refused(service: Service) -> None:
    port = service.client.port
    auth, alice = ("Authorization", f"Bearer {TOKEN}"), ("X-User-Id", "alice")
    body = b'{"name": "dup"}'
    length = ("Content-Length", str(len(body)))
    before = service.counts()
    for headers in [
        [auth, ("X-User-Id", "mallory"), alice],  # the last one used to win
        [("Authorization", "Bearer wrong"), auth, alice],  # a wrong then a right token
        [auth, auth, alice],
        [auth, alice, ("Idempotency-Key", "a"), ("Idempotency-Key", "b")],
        [auth, alice, length, length],
        [auth, alice, length, ("Transfer-Encoding", "chunked"), ("Transfer-Encoding", "identity")],
    ]:
        status, _, answer = raw_request(
            port, request_bytes("POST", "/api/instances", [*headers, length], body)
        )
        assert status == 400, (headers, status, answer)
        assert "repeated" in json.loads(answer)["error"]
    # A header name in another case is the same header.
    status, _, _ = raw_request(
        port, request_bytes("GET", "/api/instances", [auth, alice, ("x-user-id", "bob")])
    )
    assert status == 400
    assert service.counts() == before
    status, _, _ = raw_request(port, request_bytes("POST", "/api/instances", [auth, alice, length], body))
    assert status == 202


def test_bodies_that_are_not_plain_json_objects_are_a_400(service: Service) -> None:
    c = service.client
    before = service.counts()

    def nested(depth: int) -> dict[str, Any]:
        value: Any = "x"
        for _ in range(depth):
            value = [value]
        return {"name": "deep", "config": {"x": value}}

    for raw in [
        b"[" * 60_000,  # RecursionError in the parser: used to answer 500
        b'{"name": "deep", "config": {"x": ' + b"[" * 5000 + b"]" * 5000 + b"}}",
        json.dumps(nested(api.MAX_DEPTH)).encode(),  # parses, but too deep to keep
        b'{"name": "a", "name": "b"}',  # which one counts depends on the parser
        b'{"name": "nan", "config": {"x": NaN}}',
        b'{"name": "inf", "config": {"x": 1e999}}',
        b'{"name": "big", "config": {"x": ' + b"9" * 5000 + b"}}",
    ]:
        reply = c.call("POST", "/api/instances", raw=raw)
        assert reply.status == 400, (raw[:60], reply.status, reply.body)
        assert reply.body["error_class"] == "bad_request"
    assert service.counts() == before
    assert c.call("POST", "/api/instances", nested(api.MAX_DEPTH - 3)).status == 202


def test_every_method_gets_a_json_answer(service: Service) -> None:
    port = service.client.port
    auth, alice = ("Authorization", f"Bearer {TOKEN}"), ("X-User-Id", "alice")
    status, headers, body = raw_request(port, request_bytes("HEAD", "/healthz", []))
    assert status == 200 and body == b"" and int(headers["content-length"]) > 0  # GET without the body
    status, headers, body = raw_request(port, request_bytes("HEAD", "/api/instances", [auth, alice]))
    assert status == 200 and body == b""
    for method, path, allow in [
        ("OPTIONS", "/api/instances", "GET, HEAD, POST"),
        ("BREW", "/healthz", "GET, HEAD"),
        ("PUT", "/api/instances/1", "GET, HEAD, DELETE"),
        ("TRACE", "/api/instances/1/stop", "POST"),
        ("HEAD", "/api/instances/1/stop", "POST"),
    ]:
        status, headers, body = raw_request(port, request_bytes(method, path, [auth, alice]))
        assert (status, headers.get("allow")) == (405, allow), (method, path, status, headers, body)
        assert headers["content-type"] == "application/json"
        if method != "HEAD":
            assert json.loads(body)["error_class"] == "bad_request"
    status, headers, body = raw_request(port, request_bytes("BREW", "/nowhere", [auth, alice]))
    assert status == 404 and json.loads(body)["error"]
    for garbage in [
        b"NONSENSE\r\n\r\n",
        b"GET / HTTP/9.9\r\n\r\n",
        b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n",
    ]:
        status, headers, body = raw_request(port, garbage)
        assert 400 <= status < 500 and headers["content-type"] == "application/json", (garbage[:30], status)
        assert json.loads(body)["error"]


@pytest.fixture
def edge(database: Database, tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """A server with small limits (1 s to send a request, 1 s idle, 4 requests at once,
    40 connections open) and an 8 MB dashboard page: (port, log file)."""
    root = tmp_path / "site"
    root.mkdir()
    (root / "dashboard.html").write_bytes(b"<html>" + b"x" * 8_000_000)
    config = make_config(tmp_path, agent="off", namespace="apiedge")
    queue = tasks.Queue(database, config.max_attempts)
    server = httpd.make_server(
        api.Api(config, database, queue, MemoryProxy(), root=root),
        "127.0.0.1",
        0,
        request_timeout=1.0,
        idle_timeout=1.0,
        max_active=4,
        max_open=40,
    )
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    yield int(server.server_address[1]), tmp_path
    server.shutdown()
    server.server_close()


def _closed_by_server(conn: socket.socket) -> bool:
    """Whether the server closed this connection (it sent nothing, or an answer, then EOF)."""
    try:
        while conn.recv(65536):
            pass
        return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_idle_and_slow_connections_are_bounded(edge: tuple[int, Path]) -> None:
    port, _ = edge
    healthz = request_bytes("GET", "/healthz", [])
    idle = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(100)]
    try:
        # More idle connections than may be open: the longest-waiting make room for new ones.
        assert raw_request(port, healthz)[0] == 200
        # An idle connection is closed once it has sent nothing for the idle timeout.
        assert _closed_by_server(idle[-1])
        # A client that sends its headers a byte at a time is cut off at the request deadline,
        # not kept for as long as it keeps trickling (a per-read timeout would restart each byte).
        with socket.create_connection(("127.0.0.1", port), timeout=10) as slow:
            slow.settimeout(0.3)
            cut_off = False
            for byte in healthz[:-2] + b"X-Pad: " + b"a" * 60:
                try:
                    slow.send(bytes([byte]))
                except (BrokenPipeError, ConnectionResetError):
                    cut_off = True
                    break
                try:
                    if slow.recv(1) == b"":
                        cut_off = True
                        break
                except TimeoutError:
                    continue
                except ConnectionResetError:
                    cut_off = True
                    break
            assert cut_off, "a trickling client kept its connection for 20 s"
        # A body that never comes: 408 at the deadline.
        head = request_bytes("POST", "/api/instances", [("Content-Length", "100")])
        status, _, _ = raw_request(port, head + b"{")
        assert status == 408
    finally:
        for conn in idle:
            conn.close()


def test_trickling_clients_hold_no_thread(edge: tuple[int, Path]) -> None:
    port, _ = edge
    # Twenty clients sending their headers a byte at a time, with 4 threads for requests: their
    # unfinished requests wait in the waiting room, and complete ones still get answered.
    slow = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(20)]
    try:
        for _ in range(3):
            for conn in slow:
                conn.send(b"G")
            assert raw_request(port, request_bytes("GET", "/healthz", []), timeout=5)[0] == 200
            time.sleep(0.2)
    finally:
        for conn in slow:
            conn.close()


def test_requests_past_the_cap_get_a_quick_503(edge: tuple[int, Path]) -> None:
    port, _ = edge
    # Four requests in hand (their bodies, longer than the waiting room reads, never finish),
    # so a fifth is one too many.
    held = []
    for _ in range(4):
        conn = socket.create_connection(("127.0.0.1", port), timeout=10)
        conn.sendall(request_bytes("POST", "/api/instances", [("Content-Length", "60000")], b"x" * 20_000))
        held.append(conn)
    try:
        time.sleep(0.3)  # the four have their threads
        status, headers, body = raw_request(port, request_bytes("GET", "/healthz", []), timeout=0.9)
        assert status == 503 and headers["retry-after"] == "1" and json.loads(body)["error"]
    finally:
        for conn in held:
            conn.close()
    time.sleep(1.2)  # their deadline passed: the threads are free again
    assert raw_request(port, request_bytes("GET", "/healthz", []))[0] == 200


def test_a_client_that_goes_away_is_one_log_line_not_a_traceback(
    edge: tuple[int, Path], capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    port, _ = edge
    caplog.set_level(logging.INFO, logger="api")
    for request in [request_bytes("GET", "/", []), request_bytes("GET", "/healthz", [])]:
        conn = socket.create_connection(("127.0.0.1", port), timeout=10)
        conn.sendall(request)
        if request.startswith(b"GET / "):
            conn.recv(1)  # the 8 MB page is being written
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()  # a reset, mid-response or before it
    time.sleep(1.0)
    assert "Traceback" not in capfd.readouterr().err
    gone = [r for r in caplog.records if getattr(r, "action", "") == "http_disconnected"]
    assert gone and all(r.exc_info is None for r in gone)
    assert not [r for r in caplog.records if getattr(r, "action", "") == "http_error"]


def test_fuzzed_requests_get_no_5xx_and_leave_no_traceback(
    service: Service, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    # A few hundred seeded requests of tests/fuzz_api.py (the full run, against a real serve,
    # is described there): any status but a 5xx, and nothing the server could not handle.
    caplog.set_level(logging.INFO)
    counts = fuzz_api.run(f"http://127.0.0.1:{service.client.port}", TOKEN, 400, seed=12)
    assert not [status for status in counts if status >= 500 or status <= 0], counts
    assert "Traceback" not in capfd.readouterr().err
    assert not [r for r in caplog.records if r.exc_info or getattr(r, "action", "") == "http_error"]
    assert client_ok(service)


def client_ok(service: Service) -> bool:
    return service.client.call("GET", "/healthz", user=None).status == 200

"""How long the world takes to converge after an outage ends, on the real stack, with a real
`serve` process (embedded PostgreSQL and nginx, the heartbeat every 60 s as in production):

1. An engine outage in the middle of an update: the new container never answers, the engine
   goes away as its health wait ends, so the rollback cannot bring the previous container
   back (the instance stays `updating`). From the engine's return to the instance running on
   its previous container, alone and routed.
2. An engine outage in the middle of a create's health wait: the create is undone but its
   container cannot be removed. From the engine's return to no container left.
3. PostgreSQL killed with -9 under serve: from the kill to a new task having succeeded.
4. The whole embedded nginx killed with -9 and no task coming: from the kill to the routes
   answering again (the next interval round finds nginx silent: up to the interval).
5. nginx's master alone killed with -9 (its workers serve on, unreloadable): from the kill
   to a new instance's route being served.

The engine outage is a unix-socket relay between serve and the engine (serve's DOCKER_HOST)
that is cut, every open connection with it, and later restored. Knobs: OUTAGE_BENCH_SECONDS
(how long each engine outage lasts after the failed task ended, 10), OUTAGE_BENCH_INTERVAL
(serve's heartbeat interval, 60).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
from psycopg.rows import dict_row

import db
from engine import LABEL_INSTANCE, LABEL_NAMESPACE, DockerEngine
from localio import LOOPBACK, free_port

ROOT = Path(__file__).resolve().parent.parent
OUTAGE = float(os.environ.get("OUTAGE_BENCH_SECONDS", "10"))
INTERVAL = os.environ.get("OUTAGE_BENCH_INTERVAL", "60")
NEVER_HEALTHY = {"env": {"GATEWAY_HEALTHZ_DELAY": "600"}}


class Relay:
    """A unix socket that forwards to the engine's, until cut."""

    def __init__(self, path: Path, upstream: str) -> None:
        self.path, self.upstream = path, upstream
        self._server: socket.socket | None = None
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()

    def restore(self) -> None:
        self.path.unlink(missing_ok=True)
        server = socket.socket(socket.AF_UNIX)
        server.bind(str(self.path))
        server.listen(64)
        self._server = server
        threading.Thread(target=self._accept, args=(server,), daemon=True).start()

    def cut(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        self.path.unlink(missing_ok=True)
        with self._lock:
            for sock in self._open:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            self._open.clear()

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return
            engine = socket.socket(socket.AF_UNIX)
            try:
                engine.connect(self.upstream)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._open |= {client, engine}
            for source, target in ((client, engine), (engine, client)):
                threading.Thread(target=self._pump, args=(source, target), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, target: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                target.sendall(data)
        with contextlib.suppress(OSError):
            target.shutdown(socket.SHUT_WR)


class Serve:
    """One `serve` process on a home of its own, with the relay as its engine."""

    def __init__(self) -> None:
        upstream = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock").removeprefix("unix://")
        self.home = Path(tempfile.mkdtemp(prefix="pdo-", dir="/tmp"))
        self.engine = DockerEngine()
        self.relay = Relay(self.home / "engine.sock", upstream)
        self.relay.restore()
        low = random.randrange(10_000, 19_900, 100)  # noqa: S311 (ports of its own, not a secret)
        self.env = {
            k: v for k, v in os.environ.items() if not k.startswith("PIDEPLOY_") and k != "DATABASE_URL"
        }
        self.env.update(
            DOCKER_HOST=f"unix://{self.relay.path}",
            PIDEPLOY_HOME=str(self.home),
            PIDEPLOY_NAMESPACE=f"o{uuid.uuid4().hex[:10]}",
            PIDEPLOY_LISTEN=f"127.0.0.1:{free_port()}",
            PIDEPLOY_NGINX_LISTEN=f"127.0.0.1:{free_port()}",
            PIDEPLOY_PORT_RANGE=f"{low}-{low + 99}",
            PIDEPLOY_AGENT="off",
            PIDEPLOY_HEALTH_TIMEOUT="5",
            PIDEPLOY_MAX_ATTEMPTS="1",
            PIDEPLOY_HEARTBEAT_INTERVAL=INTERVAL,
            PIDEPLOY_CONFIG=str(self.home / "pideploy.toml"),
        )
        (self.home / "pideploy.toml").write_text("models = []\n")
        self.log = (self.home / "serve.log").open("wb")
        self.process = subprocess.Popen(
            [sys.executable, str(ROOT / "pideploy.py"), "serve"],
            env=self.env,
            cwd=self.home,
            stdout=self.log,
            stderr=self.log,
        )
        _until("serve to answer", lambda: self.healthz() == 200, 90)

    def close(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
        for container in self.containers():
            with contextlib.suppress(Exception):
                self.engine.remove(container.id)
        nginx_pid = self.home / "nginx" / "nginx.pid"
        with contextlib.suppress(OSError, ValueError):
            os.kill(int(nginx_pid.read_text()), signal.SIGTERM)
        self.relay.cut()
        time.sleep(0.5)
        shutil.rmtree(self.home, ignore_errors=True)

    def healthz(self) -> int:
        try:
            with LOOPBACK.open(f"http://{self.env['PIDEPLOY_LISTEN']}/healthz", timeout=5) as reply:
                return int(reply.status)
        except urllib.error.HTTPError as error:
            return error.code
        except OSError:
            return 0

    def call(self, method: str, path: str, body: object = None) -> tuple[int, Any]:
        request = urllib.request.Request(
            f"http://{self.env['PIDEPLOY_LISTEN']}{path}",
            method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"X-User-Id": "bench", "Content-Type": "application/json"},
        )
        try:
            with LOOPBACK.open(request, timeout=10) as reply:
                return reply.status, json.loads(reply.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read() or b"{}")
        except OSError:
            return 0, {}

    def sql(self, query: str, *params: object) -> list[dict[str, Any]]:
        conninfo = f"host={self.home / 'pg'} dbname={db.DB_NAME} user={db.DB_USER} connect_timeout=3"
        with psycopg.connect(conninfo, autocommit=True, row_factory=dict_row) as conn:
            return conn.execute(query.encode(), params or None).fetchall()

    def row(self, iid: int) -> dict[str, Any]:
        return self.sql("SELECT * FROM instance WHERE id = %s", iid)[0]

    def task_done(self, task_id: int) -> dict[str, Any] | None:
        rows = self.sql("SELECT * FROM task WHERE id = %s AND finished_at IS NOT NULL", task_id)
        return rows[0] if rows else None

    def containers(self, iid: int | None = None) -> list[Any]:
        labels = {LABEL_NAMESPACE: self.env["PIDEPLOY_NAMESPACE"]}
        if iid is not None:
            labels[LABEL_INSTANCE] = str(iid)
        return self.engine.list(labels)

    def routed(self, iid: int, path: str = "healthz") -> str | None:
        try:
            key = f"{iid}-{self.row(iid)['route_token']}"  # routes carry the instance's token
            url = f"http://{self.env['PIDEPLOY_NGINX_LISTEN']}/i/{key}/{path}"
            with LOOPBACK.open(url, timeout=3) as reply:
                return reply.read().decode().strip() if reply.status == 200 else None
        except OSError:
            return None

    def create(self, name: str, config: dict[str, Any] | None = None) -> tuple[int, int]:
        status, reply = self.call(
            "POST", "/api/instances", {"name": name, **({"config": config} if config else {})}
        )
        assert status == 202, reply
        return int(reply["instance_id"]), int(reply["task_id"])


def _until(what: str, check: Callable[[], Any], timeout: float = 120.0) -> float:
    """Seconds until `check` holds."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.05)
    return time.monotonic() - started


def update_cut_midway(site: Serve) -> float:
    iid, task = site.create("upd")
    _until("the create", lambda: site.task_done(task), 60)
    old = site.row(iid)["container_id"]
    status, reply = site.call("POST", f"/api/instances/{iid}/update", {"config": NEVER_HEALTHY})
    assert status == 202, reply
    _until("the new container's health wait", lambda: len(site.containers(iid)) == 2, 60)
    time.sleep(4)  # the engine goes away as the 5 s health wait ends
    site.relay.cut()
    done = _until("the update to fail", lambda: site.task_done(reply["task_id"]), 60)
    assert site.row(iid)["status"] == "updating", site.row(iid)
    time.sleep(max(0.0, OUTAGE - done))
    site.relay.restore()
    return _until(
        "the rollback",
        lambda: (
            (row := site.row(iid))["status"] == "running"
            and row["container_id"] == old
            and len(site.containers(iid)) == 1
            and site.routed(iid) == "ok"
        ),
        180,
    )


def create_cut_midway(site: Serve) -> float:
    iid, task = site.create("crt", NEVER_HEALTHY)
    _until("the create's container", lambda: site.containers(iid), 60)
    time.sleep(1)
    site.relay.cut()
    done = _until("the create to fail", lambda: site.task_done(task), 60)
    assert site.row(iid)["status"] == "error", site.row(iid)
    time.sleep(max(0.0, OUTAGE - done))
    site.relay.restore()
    return _until("the stray container's removal", lambda: not site.containers(iid), 180)


def postgres_killed(site: Serve) -> float:
    pid = int((site.home / "pg" / "data" / "postmaster.pid").read_text().split()[0])
    started = time.monotonic()
    os.kill(pid, signal.SIGKILL)

    def created() -> bool:
        status, reply = site.call("POST", "/api/instances", {"name": "after-pg"})
        return status == 202 and bool(_until("its task", lambda: site.task_done(reply["task_id"]), 60))

    _until("a task after the restart", created, 120)
    return time.monotonic() - started


def nginx_killed(site: Serve) -> float:
    """The whole embedded nginx killed (master and workers): no task comes, the heartbeat's
    next interval round finds nginx silent and starts it."""
    iid, task = site.create("routed")
    _until("its task", lambda: site.task_done(task), 60)
    master = int((site.home / "nginx" / "nginx.pid").read_text())
    workers = Path(f"/proc/{master}/task/{master}/children").read_text().split()
    started = time.monotonic()
    for pid in (master, *map(int, workers)):
        os.kill(pid, signal.SIGKILL)
    _until("the route to answer again", lambda: site.routed(iid) == "ok", 180)
    return time.monotonic() - started


def nginx_master_killed(site: Serve) -> float:
    """Only the master killed: its workers go on serving the last map; the next task's route
    change starts a new master (the orphans are stopped first) and its route answers."""
    master = int((site.home / "nginx" / "nginx.pid").read_text())
    started = time.monotonic()
    os.kill(master, signal.SIGKILL)
    iid, task = site.create("after-nginx")
    _until("its task", lambda: site.task_done(task), 180)
    _until("the new route", lambda: site.routed(iid) == "ok", 180)
    return time.monotonic() - started


def main() -> None:
    site = Serve()
    try:
        figures = [
            ("engine outage mid-update: engine back -> rolled back, routed", update_cut_midway),
            ("engine outage mid-create: engine back -> stray container removed", create_cut_midway),
            ("postgres killed -9 under serve -> a new task succeeded", postgres_killed),
            ("nginx killed -9 (master and workers) -> routes answer again", nginx_killed),
            ("nginx master killed -9 -> a new instance routed", nginx_master_killed),
        ]
        print(f"serve with heartbeat interval {INTERVAL}s; each engine outage lasts {OUTAGE:.0f}s")
        for label, measure in figures:
            print(f"  {label:<66} {measure(site):6.1f}s", flush=True)
    finally:
        site.close()

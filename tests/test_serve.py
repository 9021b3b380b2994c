"""`python pideploy.py serve` as real processes on the real stack: engine, nginx, embedded Postgres.

Each test gets its own PIDEPLOY_HOME (short, under /tmp), namespace, API port
and nginx port, and cleans up its containers (by namespace label), its nginx
and its cluster. The agent is off (the deterministic playbook), except in the
test that drives the chain through the replay model server.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import random
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

import db
import gate
from config import Config
from engine import LABEL_INSTANCE, LABEL_NAMESPACE, Container, DockerEngine
from errors import ContainerNotFound
from localio import free_port
from proxy import NginxProxy, route_key
from tests.conftest import ROOT, nginx_binary, require_stack

pytestmark = pytest.mark.stack

SLOW = {"env": {"GATEWAY_HEALTHZ_DELAY": "3"}}  # the gateway answers /healthz only after 3 s


def wait_for(what: str, predicate: Callable[[], Any], timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


@dataclass
class Site:
    """One deployment: a home, a namespace, ports; the serve processes started on it."""

    home: Path
    engine: DockerEngine
    env: dict[str, str]
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def namespace(self) -> str:
        return self.env["PIDEPLOY_NAMESPACE"]

    @property
    def api(self) -> str:
        return "http://" + self.env["PIDEPLOY_LISTEN"]

    @property
    def nginx(self) -> str:
        return "http://" + self.env["PIDEPLOY_NGINX_LISTEN"]

    def serve(self, *args: str, log: str = "serve", **env: str) -> subprocess.Popen[bytes]:
        log_file = (self.home / f"{log}.log").open("wb")
        process = subprocess.Popen(
            [sys.executable, str(ROOT / "pideploy.py"), "serve", *args],
            env={**self.env, **env},
            cwd=self.home,
            stdout=log_file,
            stderr=log_file,
        )
        self.processes.append(process)
        listen = env.get("PIDEPLOY_LISTEN", self.env["PIDEPLOY_LISTEN"])
        wait_for(f"serve ({log}) to answer", lambda: self._healthy(process, listen, log), timeout=60)
        return process

    def _healthy(self, process: subprocess.Popen[bytes], listen: str, log: str) -> bool:
        if process.poll() is not None:
            raise AssertionError(f"serve exited with {process.returncode}:\n{self.log(log)}")
        try:
            with urllib.request.urlopen(f"http://{listen}/healthz", timeout=2) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def log(self, name: str = "serve") -> str:
        return (self.home / f"{name}.log").read_text(errors="replace")

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, str(ROOT / "pideploy.py"), *args],
            env=self.env,
            cwd=self.home,
            capture_output=True,
            text=True,
            timeout=120,
        )

    def call(self, method: str, path: str, body: object = None, user: str = "alice") -> tuple[int, Any]:
        request = urllib.request.Request(
            self.api + path,
            method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"X-User-Id": user, "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())

    def sql(self, query: str, *params: object) -> list[dict[str, Any]]:
        conninfo = f"host={self.home / 'pg'} dbname={db.DB_NAME} user={db.DB_USER}"
        with psycopg.connect(conninfo, autocommit=True, row_factory=dict_row) as conn:
            cursor = conn.execute(query.encode(), params or None)
            return cursor.fetchall() if cursor.description else []

    def task(self, task_id: int) -> dict[str, Any]:
        return self.sql("SELECT * FROM task WHERE id = %s", task_id)[0]

    def wait_task(self, task_id: int, timeout: float = 60) -> dict[str, Any]:
        task = wait_for(
            f"task {task_id} to finish",
            lambda: (row := self.task(task_id))["finished_at"] is not None and row,
            timeout,
        )
        return dict(task)

    def containers(self, instance_id: int | None = None) -> list[Container]:
        labels = {LABEL_NAMESPACE: self.namespace}
        if instance_id is not None:
            labels[LABEL_INSTANCE] = str(instance_id)
        return self.engine.list(labels)

    def key(self, instance_id: int) -> str:
        return route_key(self.sql("SELECT * FROM instance WHERE id = %s", instance_id)[0], Config())

    def get(self, url: str) -> int:
        try:
            with urllib.request.urlopen(url, timeout=3) as response:
                return int(response.status)
        except urllib.error.HTTPError as error:
            return error.code
        except (urllib.error.URLError, OSError):
            return 0

    def routed(self, instance_id: int, key: str | None = None) -> bool:
        return self.get(f"{self.nginx}/i/{key or self.key(instance_id)}/healthz") == 200

    def check_world(self, instance_id: int, status: str = "running") -> Container:
        """The DB row, the engine and nginx agree: one container, the row's, in the right state."""
        row = self.sql("SELECT * FROM instance WHERE id = %s", instance_id)[0]
        assert row["status"] == status, row
        [container] = self.containers(instance_id)
        assert container.id == row["container_id"]
        assert container.running == (status == "running")
        assert self.routed(instance_id) == (status == "running")
        return container

    def cluster_running(self) -> bool:
        return (self.home / "pg" / "data" / "postmaster.pid").exists()


@pytest.fixture
def site(pg_home: Path, docker_engine: DockerEngine) -> Iterator[Site]:
    require_stack("nginx", nginx_binary() is not None, "apt-get install nginx")
    require_stack("PostgreSQL", db.find_server_bindir() is not None, db.INSTALL_HINT)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIDEPLOY_") and k != "DATABASE_URL"}
    env.update(
        PIDEPLOY_HOME=str(pg_home),
        PIDEPLOY_NAMESPACE=f"t{uuid.uuid4().hex[:10]}",
        PIDEPLOY_LISTEN=f"127.0.0.1:{free_port()}",
        PIDEPLOY_NGINX_LISTEN=f"127.0.0.1:{free_port()}",
        # Own host ports for the containers, below the kernel's ephemeral range and away from the
        # default 20000-29999 that other tests' engines use at the same time.
        PIDEPLOY_PORT_RANGE=f"{(base := random.randrange(10_000, 19_900, 100))}-{base + 99}",
        PIDEPLOY_AGENT="off",
        PIDEPLOY_LEASE_SECONDS="3",
        PIDEPLOY_POLL_INTERVAL="0.5",
        PIDEPLOY_CONFIG=str(pg_home / "pideploy.toml"),
        PYTHONUNBUFFERED="1",
    )
    (pg_home / "pideploy.toml").write_text("models = []\n")
    site = Site(pg_home, docker_engine, env)
    yield site
    for process in site.processes:
        if process.poll() is None:
            process.kill()
            process.wait(10)
    for container in site.containers():
        _remove(docker_engine, container.id)
    NginxProxy.embedded(pg_home / "nginx", env["PIDEPLOY_NGINX_LISTEN"], nginx_binary() or "nginx").close(
        stop=True
    )
    if site.cluster_running():  # a killed serve leaves it up: take a share, and as the last one out stop it
        cluster = db.EmbeddedPostgres(pg_home)
        cluster.start()
        cluster.release()


def _remove(engine: DockerEngine, container_id: str) -> None:
    with contextlib.suppress(ContainerNotFound):  # engine.remove retries Podman's transient refusals
        engine.remove(container_id)


# ---------------------------------------------------------------------------


def test_hand_inserted_tasks_are_worked_by_two_serves_sharing_the_queue(site: Site) -> None:
    site.serve(log="a")
    site.serve(log="b", PIDEPLOY_LISTEN=f"127.0.0.1:{free_port()}")
    names = ["hand-1", "hand-2", "hand-3", "hand-4"]
    image = os.environ.get("PIDEPLOY_IMAGE") or "localhost/pideploy-gateway:latest"
    for name in names:  # as the design's integration test asks: straight into the tables
        # A create task carries its instance row, as a submission makes it (a create task with
        # none is refused at claim: tests/test_tasks.py).
        site.sql(
            "WITH made AS (INSERT INTO instance (user_id, name, image) VALUES ('alice', %s, %s) RETURNING id)"
            " INSERT INTO task (type, user_id, params, instance_id)"
            " SELECT 'instance_create', 'alice', %s, id FROM made",
            name,
            image,
            json.dumps({"name": name}),
        )
    ids = [r["id"] for r in site.sql("SELECT id FROM task ORDER BY id")]
    for task_id in ids:
        task = site.wait_task(task_id)
        assert task["status"] == "succeeded" and task["attempts"] == 1, task
        site.check_world(task["instance_id"])
    assert len(site.containers()) == len(names)

    listed = site.cli("instances", "--format", "json")
    assert listed.returncode == 0, listed.stderr
    instances = json.loads(listed.stdout)
    assert sorted(i["name"] for i in instances) == names
    assert all({"id", "user_id", "name", "status", "port"} <= set(i) for i in instances)

    # submit --wait: progress on stderr, exit 0 only on success.
    first = instances[0]["id"]
    done = site.cli("submit", "instance_delete", "--user", "alice", "--instance", str(first), "--wait")
    assert done.returncode == 0, done.stderr
    assert "running" in done.stderr and json.loads(done.stdout)["status"] == "succeeded"
    assert site.containers(first) == []
    refused = site.cli(
        "submit", "instance_stop", "--user", "mallory", "--instance", str(instances[1]["id"]), "--wait"
    )
    assert refused.returncode != 0 and "no instance" in refused.stderr
    table = site.cli("tasks")
    assert table.returncode == 0 and table.stdout.splitlines()[0].split()[:3] == ["ID", "TYPE", "STATUS"]


def test_a_create_from_the_command_line_gets_the_apis_answers(site: Site) -> None:
    def submit(*args: str) -> subprocess.CompletedProcess[str]:
        return site.cli("submit", *args)

    def create(params: dict[str, Any], *more: str) -> subprocess.CompletedProcess[str]:
        return submit("instance_create", "--user", "alice", "--params", json.dumps(params), *more)

    # No serve yet, so every task stays unfinished and keeps its key.
    first = create({"name": "keyed"}, "--idempotency-key", "k1")
    assert first.returncode == 0, first.stderr
    keyed = json.loads(first.stdout)
    assert keyed["instance_id"] is not None and not keyed["deduplicated"]  # the row exists at once
    again = create({"name": "keyed"}, "--idempotency-key", "k1")
    assert json.loads(again.stdout) == {**keyed, "deduplicated": True}
    stop = submit(
        "instance_stop", "--user", "alice", "--instance", str(keyed["instance_id"]), "--idempotency-key", "k2"
    )
    assert stop.returncode == 0, stop.stderr
    stop_task = json.loads(stop.stdout)["task_id"]
    for params, key, holder in [
        ({"name": "other"}, "k1", keyed["task_id"]),
        ({"name": "third"}, "k2", stop_task),
    ]:
        refused = create(params, "--idempotency-key", key)
        assert refused.returncode == 1, refused.stdout
        assert f"is held by task {holder}, a different request" in refused.stderr

    site.serve()
    assert site.sql("SELECT count(*) AS n FROM task")[0]["n"] == 2  # the keyed create and the stop
    done = create({"name": "web"}, "--wait")
    assert done.returncode == 0, done.stderr
    iid = json.loads(done.stdout)["instance_id"]
    site.check_world(iid)
    # The same name with another config (or none given, when it has one): a refusal, not a success.
    changed = {"name": "web", "config": {"env": {"GATEWAY_LOG_MESSAGE": "other"}}}
    refused = create(changed, "--wait")
    assert refused.returncode == 1 and refused.stdout == ""
    status, answer = site.call("POST", "/api/instances", changed)
    assert status == 409 and f"pideploy: error: {answer['error']}\n" in refused.stderr
    assert site.sql("SELECT count(*) AS n FROM task")[0]["n"] == 3  # and the create of web
    assert site.sql("SELECT config FROM instance WHERE id = %s", iid)[0]["config"] == {}


def test_the_lifecycle_through_the_http_api(site: Site) -> None:
    site.serve()
    status, created = site.call("POST", "/api/instances", {"name": "life"})
    assert status == 202, created
    iid = created["instance_id"]
    assert site.sql("SELECT status FROM instance WHERE id = %s", iid)  # the row exists at once
    assert site.wait_task(created["task_id"])["status"] == "succeeded"
    first = site.check_world(iid)
    key = site.key(iid)

    # The route answers only at the URL its owner gets: ids are sequential, the token is not.
    status, mine = site.call("GET", f"/api/instances/{iid}")
    assert status == 200 and mine["url"] == f"{site.nginx}/i/{key}/"
    token = key.split("-", 1)[1]
    assert len(token) == 32 and site.get(mine["url"] + "healthz") == 200
    assert site.get(f"{site.nginx}/i/{iid}/healthz") == 404  # no token: as if there were no instance
    assert site.get(f"{site.nginx}/i/{iid}-{'0' * 32}/healthz") == 404  # a wrong one
    assert site.get(f"{site.nginx}/i/{iid}-{token[:-1]}/healthz") == 404
    assert site.get(f"{site.nginx}/i/{iid + 1}-{token}/healthz") == 404  # the token is this instance's
    assert site.get(f"{site.nginx}/i/{iid + 1}/healthz") == 404
    status, theirs = site.call("GET", "/api/instances", user="bob")
    assert status == 200 and token not in json.dumps(theirs)

    for action, expected in (("stop", "stopped"), ("start", "running")):
        status, reply = site.call("POST", f"/api/instances/{iid}/{action}")
        assert status == 202, reply
        assert site.wait_task(reply["task_id"])["status"] == "succeeded"
        assert site.check_world(iid, expected).id == first.id

    status, reply = site.call(
        "POST", f"/api/instances/{iid}/update", {"image": "localhost/pideploy-gateway:v2"}
    )
    assert status == 202, reply
    assert site.wait_task(reply["task_id"])["status"] == "succeeded"
    updated = site.check_world(iid)
    assert updated.id != first.id and updated.image.endswith("pideploy-gateway:v2")
    url = site.call("GET", f"/api/instances/{iid}")[1]["url"]
    with urllib.request.urlopen(url + "version", timeout=3) as response:
        assert response.read().decode().strip() == "v2"

    status, reply = site.call("DELETE", f"/api/instances/{iid}")
    assert status == 202, reply
    assert site.wait_task(reply["task_id"])["status"] == "succeeded"
    assert site.call("GET", f"/api/instances/{iid}")[0] == 404
    assert site.containers() == [] and not site.routed(iid, key)
    assert site.sql("SELECT count(*) AS n FROM instance")[0]["n"] == 0
    lines = [json.loads(line) for line in site.log().splitlines() if line.startswith("{")]
    assert {"time", "level", "logger", "action", "message"} <= set(lines[0])
    assert any(line["action"] == "task_succeeded" and line.get("task_id") for line in lines)
    assert token not in site.log()  # serve logs at INFO: the route token is not in it


def test_kill_9_mid_task_then_a_new_serve_reclaims_it(site: Site) -> None:
    first = site.serve(log="first")
    status, created = site.call("POST", "/api/instances", {"name": "survivor", "config": SLOW})
    assert status == 202, created
    iid, task_id = created["instance_id"], created["task_id"]
    # Mid-task: the container exists and the create is waiting for its health check.
    wait_for(
        "the create to be under way",
        lambda: site.task(task_id)["status"] == "running" and site.containers(iid),
    )
    first.send_signal(signal.SIGKILL)
    first.wait(10)

    site.serve(log="second")
    task = site.wait_task(task_id, timeout=90)
    assert task["status"] == "succeeded", (task, site.log("second")[-4000:])
    assert task["attempts"] == 2  # one claim by the dead process, one by the new one
    site.check_world(iid)  # exactly one container (no duplicate), the row's, routed
    assert [c.labels[LABEL_INSTANCE] for c in site.containers()] == [str(iid)]  # no orphan
    assert "task_claimed" in site.log("second")


def test_sigterm_during_a_task_is_graceful(site: Site) -> None:
    # A grace period shorter than the task: the run is stopped and its task given back.
    first = site.serve("--grace", "1", log="first")
    status, created = site.call("POST", "/api/instances", {"name": "patient", "config": SLOW})
    assert status == 202, created
    iid, task_id = created["instance_id"], created["task_id"]
    wait_for("the create to be under way", lambda: site.task(task_id)["status"] == "running")
    first.send_signal(signal.SIGTERM)
    assert first.wait(30) == 0, site.log("first")
    assert not site.cluster_running()  # this serve started the embedded cluster, and stopped it
    stopped = [json.loads(line) for line in site.log("first").splitlines() if '"serve_stopped"' in line]
    assert stopped and stopped[0]["released"] == [task_id]

    shown = site.cli("tasks", "--format", "json")  # the CLI works without serve running
    assert shown.returncode == 0, shown.stderr
    [task] = [t for t in json.loads(shown.stdout) if t["id"] == task_id]
    assert task["status"] == "queued" and task["attempts"] == 0  # given back, no attempt spent

    # Another serve picks it up; a long grace lets a running task finish before exit.
    second = site.serve("--grace", "60", log="second")
    assert site.wait_task(task_id)["status"] == "succeeded"
    site.check_world(iid)
    status, reply = site.call("POST", f"/api/instances/{iid}/update", {"config": SLOW})
    assert status == 202, reply
    wait_for("the update to be under way", lambda: site.task(reply["task_id"])["status"] == "running")
    second.send_signal(signal.SIGTERM)
    assert second.wait(60) == 0, site.log("second")
    assert not site.cluster_running()
    shown = site.cli("tasks", "--format", "json")
    [update] = [t for t in json.loads(shown.stdout) if t["id"] == reply["task_id"]]
    assert update["status"] == "succeeded", update


def test_one_run_through_the_replay_model(site: Site) -> None:
    from evals.llm_server import ReplayServer

    script = {
        "conversations": [
            {
                "id": "create",
                "match": '"type": "instance_create"',
                "turns": [
                    {
                        "tool_calls": [
                            {"name": "instance_create", "arguments": {"name": "{{task.params.name}}"}}
                        ]
                    },
                    {
                        "tool_calls": [
                            {
                                "name": "report_result",
                                "arguments": {
                                    "success": True,
                                    "action": "created by the replayed model",
                                    "data": {"instance_id": "{{last_result.instance_id}}"},
                                },
                            }
                        ]
                    },
                ],
            }
        ]
    }
    with ReplayServer(script) as replay:
        (site.home / "pideploy.toml").write_text(
            f'[[models]]\nname = "replay"\nbase_url = "{replay.url}"\nmodel = "replay-model"\napi_key_env = "REPLAY_KEY"\n'
        )
        site.serve(PIDEPLOY_AGENT="on", REPLAY_KEY="test")
        status, created = site.call("POST", "/api/instances", {"name": "modelled"})
        assert status == 202, created
        task = site.wait_task(created["task_id"])
        assert task["status"] == "succeeded", task
        assert task["result"]["action"] == "created by the replayed model"
        assert len(replay.requests) == 2 and not replay.errors
    site.check_world(created["instance_id"])
    trace = json.loads(Path(task["trace_file"]).read_text())
    assert "replay" in json.dumps(trace["model_chain"]) and not trace.get("playbook")


def test_serve_refuses_a_public_address_without_a_token(site: Site) -> None:
    refused = site.cli("serve", "--listen", f"0.0.0.0:{free_port()}")
    assert refused.returncode != 0
    assert "PIDEPLOY_API_TOKEN" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1


def test_doctor_checks_every_part_and_names_the_fix_of_a_missing_one(site: Site) -> None:
    report = site.cli("doctor", "--format", "json")
    assert report.returncode == 0, report.stdout + report.stderr
    doctor = json.loads(report.stdout)
    checks = {check["name"]: check for check in doctor["checks"]}
    needed = ("database", "container engine", "nginx", "data dir", "trace dir", "alerts file dir")
    assert doctor["ok"] and all(checks[name]["ok"] and checks[name]["required"] for name in needed)
    assert "schema version" in checks["database"]["detail"]
    assert checks["container engine"]["detail"].endswith("present")
    sandbox = checks["bash sandbox"]
    assert not sandbox["required"] and sandbox["ok"] == (gate.landlock_abi() > 0), sandbox

    no_engine = subprocess.run(
        [sys.executable, str(ROOT / "pideploy.py"), "doctor"],
        env={**site.env, "DOCKER_HOST": f"unix://{site.home}/no-engine.sock"},
        cwd=site.home,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert no_engine.returncode == 1, no_engine.stdout + no_engine.stderr
    failed = [line for line in no_engine.stdout.splitlines() if line.startswith("FAIL")]
    assert len(failed) == 1 and "container engine" in failed[0], no_engine.stdout
    assert "scripts/stack.sh up" in no_engine.stdout


def _pideploy(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "pideploy.py"), *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("args", "settings", "code", "says"),
    [
        (("serve", "--listen", "foo"), {}, 2, "expected HOST:PORT"),
        (("serve", "--workers", "-1"), {}, 2, "must be between 1 and 64"),
        (("tasks", "--limit", "-1"), {}, 2, "must be between 1 and 10000"),
        (("cancel", "99999999999999999999"), {}, 2, "must be between 1 and"),
        (("submit", "instance_stop", "--user", "alice", "--instance", "x"), {}, 2, "not a whole number"),
        (("submit", "instance_stop", "--user", "alice", "--timeout", "-5"), {}, 2, "0 or more seconds"),
        (
            (
                "submit",
                "instance_create",
                "--user",
                "alice",
                "--params",
                '{"name": "w", "config": {"instance": {}}}',
            ),
            {},
            1,
            "config: 'instance' is not allowed",
        ),
        (("tasks",), {"PIDEPLOY_WORKERS": "many"}, 1, "PIDEPLOY_WORKERS"),
        (("tasks",), {"PIDEPLOY_NO_SUCH_SETTING": "1"}, 1, "PIDEPLOY_NO_SUCH_SETTING"),
        (
            ("tasks",),
            {"DATABASE_URL": "postgresql://nobody@127.0.0.1:9/none?connect_timeout=2"},
            1,
            "database",
        ),
    ],
)
def test_bad_input_on_the_command_line_is_one_line_and_no_traceback(
    args: tuple[str, ...], settings: dict[str, str], code: int, says: str, tmp_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIDEPLOY_") and k != "DATABASE_URL"}
    env.update(PIDEPLOY_HOME=str(tmp_path / "home"), **settings)
    result = _pideploy(*args, env=env, cwd=tmp_path)
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr and says in result.stderr, result.stderr
    if code == 1:  # argparse prints its usage line first; our own errors are one line
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "home" / "pg").exists()  # nothing was started or written


def test_a_second_serve_on_a_taken_port_says_so_in_one_line(site: Site) -> None:
    site.serve()
    second = site.cli("serve")
    assert second.returncode == 1
    assert "Traceback" not in second.stderr
    error = [line for line in second.stderr.splitlines() if line.startswith("pideploy: error:")]
    assert error == [
        f"pideploy: error: cannot listen on {site.env['PIDEPLOY_LISTEN']}: Address already in use"
    ]
    assert site.call("GET", "/api/instances")[0] == 200  # the first one serves on


# ---------------------------------------------------------------------------
# Faults: serve killed on a task's last attempt, the database killed under serve
# ---------------------------------------------------------------------------

NEVER_HEALTHY = {"env": {"GATEWAY_HEALTHZ_DELAY": "600"}}
ONE_ATTEMPT = {"PIDEPLOY_MAX_ATTEMPTS": "1"}
QUICK_ROUNDS = {**ONE_ATTEMPT, "PIDEPLOY_HEARTBEAT_INTERVAL": "2"}


def _row(site: Site, iid: int) -> dict[str, Any]:
    return site.sql("SELECT * FROM instance WHERE id = %s", iid)[0]


def test_a_create_killed_on_its_last_attempt_leaves_no_container(site: Site) -> None:
    first = site.serve(log="first", **ONE_ATTEMPT)
    status, created = site.call("POST", "/api/instances", {"name": "lost", "config": NEVER_HEALTHY})
    assert status == 202, created
    iid, task_id = created["instance_id"], created["task_id"]
    wait_for("the health wait", lambda: site.task(task_id)["status"] == "running" and site.containers(iid))
    first.send_signal(signal.SIGKILL)
    first.wait(10)

    site.serve(log="second", **QUICK_ROUNDS)
    task = site.wait_task(task_id, timeout=60)
    assert task["status"] == "failed", task
    wait_for("the heartbeat to remove the container", lambda: not site.containers(iid), timeout=60)
    row = _row(site, iid)
    assert row["status"] == "error" and row["container_id"] is None, row
    kinds = [e["kind"] for e in site.sql("SELECT kind FROM event WHERE instance_id = %s ORDER BY id", iid)]
    assert kinds[-1] == "stray_container_removed", kinds


def test_an_update_killed_on_its_last_attempt_is_rolled_back_by_the_heartbeat(site: Site) -> None:
    first = site.serve(log="first", **ONE_ATTEMPT)
    status, created = site.call("POST", "/api/instances", {"name": "kept"})
    assert status == 202 and site.wait_task(created["task_id"])["status"] == "succeeded", created
    iid = created["instance_id"]
    old = site.check_world(iid)
    status, reply = site.call("POST", f"/api/instances/{iid}/update", {"config": NEVER_HEALTHY})
    assert status == 202, reply
    wait_for("the new container's health wait", lambda: len(site.containers(iid)) == 2)
    first.send_signal(signal.SIGKILL)
    first.wait(10)

    site.serve(log="second", **QUICK_ROUNDS)
    assert site.wait_task(reply["task_id"], timeout=60)["status"] == "failed"
    wait_for(
        "the heartbeat to roll the update back", lambda: _row(site, iid)["status"] == "running", timeout=60
    )
    wait_for("one container", lambda: len(site.containers(iid)) == 1, timeout=30)
    assert site.check_world(iid).id == old.id  # the old container, under its name, routed
    assert _row(site, iid)["config"] == {}


def test_serve_restarts_the_embedded_postgres_it_uses_when_it_dies(site: Site) -> None:
    site.serve(log="serve")
    postmaster = int((site.home / "pg" / "data" / "postmaster.pid").read_text().split()[0])
    os.kill(postmaster, signal.SIGKILL)
    wait_for("serve to see the database gone", lambda: '"db_down"' in site.log())

    def created() -> dict[str, Any] | None:
        status, reply = site.call("POST", "/api/instances", {"name": "after"})
        return reply if status == 202 else None

    reply = wait_for("serve to start the database again and take a task", created, timeout=60)
    assert site.wait_task(reply["task_id"])["status"] == "succeeded"
    site.check_world(reply["instance_id"])
    actions = [json.loads(line).get("action") for line in site.log().splitlines() if line.startswith("{")]
    said = [
        line[:400] for line in site.log().splitlines() if '"action": "db_' in line or '"action": "pg_' in line
    ]
    # Each change of state is said once: down and up alternate (a restart attempt that comes too
    # early, while the killed server is still going away, may make one more round of them).
    states = [a for a in actions if a in ("db_down", "db_up")]
    assert states[0] == "db_down" and states[-1] == "db_up", "\n".join(said)
    assert all(a != b for a, b in itertools.pairwise(states)), "\n".join(said)
    assert actions.count("pg_restart") >= 1 and len(states) <= 4, "\n".join(said)
    assert 1 <= actions.count("listener_error") <= 2

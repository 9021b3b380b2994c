"""The stack an eval run uses and each case's world in it: built for real, then checked.

`Site` is what every case of one eval run shares: one embedded PostgreSQL
cluster (a fresh database per case), the container engine (the real one when
it and nginx are here, else the in-memory engine and proxy), and each case's
own port range. `World` is one case's runtime: it builds the case's starting
world with the real tools (instances made and then stopped, killed or removed,
fault files in their storage, ports held by another process), runs a task or a
heartbeat round in it (`StepResult`), and tears its containers down.
`check_world` says, in sentences, how the world a run left differs from the
case's expectation. Scoring and the command are evals/run.py's.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import socket
import tempfile
import time
import urllib.error
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

import agent
import db
import models
import runtime
import tools
from engine import LABEL_INSTANCE, LABEL_NAMESPACE, DockerEngine, Engine, MemoryEngine
from errors import PiDeployError
from evals.casefile import fill_world
from localio import LOOPBACK
from proxy import MemoryProxy, route_instance, route_key

PORT_BASE, PORT_SLOT, PORT_SLOTS = 30000, 40, 60  # each case its own port range, below the ephemeral ones
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


# ---------------------------------------------------------------------------
# The stack this eval run uses
# ---------------------------------------------------------------------------


def _nginx_binary() -> str | None:
    return shutil.which("nginx") or ("/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None)


@dataclass
class Site:
    """What every case of one eval run shares: the PostgreSQL cluster and the engine in use."""

    cluster: db.EmbeddedPostgres
    real: bool
    where: str
    nginx_bin: str
    docker_host: str
    trace_root: Path
    databases: int = 0
    # Port-range slots start at a random one, so two eval runs on one machine rarely share ports.
    slots: int = field(default_factory=lambda: random.randrange(PORT_SLOTS))

    @classmethod
    @contextlib.contextmanager
    def open(cls, trace_root: Path) -> Iterator[Site]:
        if db.find_server_bindir() is None:
            raise PiDeployError(f"PostgreSQL is not available: {db.INSTALL_HINT}")
        real, where = _real_stack()
        if not real and IN_CI:
            raise PiDeployError(f"CI is set and the real stack is missing: {where} (run scripts/stack.sh up)")
        if not real:
            where = f"in-memory engine and proxy ({where}; scripts/stack.sh up for the real stack)"
        home = Path(tempfile.mkdtemp(prefix="pde-", dir="/tmp"))  # short: the cluster's socket lives there
        cluster = db.EmbeddedPostgres(home)
        try:
            cluster.start()
            yield cls(
                cluster,
                real,
                where,
                _nginx_binary() or "nginx",
                os.environ.get("DOCKER_HOST", ""),
                trace_root,
            )
        finally:
            cluster.release()
            shutil.rmtree(home, ignore_errors=True)

    @contextlib.contextmanager
    def database(self) -> Iterator[str]:
        """A new, empty database (dropped afterwards); yields its conninfo."""
        self.databases += 1
        name = f"eval_{os.getpid()}_{self.databases}"
        with psycopg.connect(self.cluster.admin_conninfo, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name}")
            conn.execute(f"CREATE DATABASE {name}")
        try:
            yield f"host={self.cluster.dir} dbname={name} user={db.DB_USER}"
        finally:
            with psycopg.connect(self.cluster.admin_conninfo, autocommit=True) as conn:
                conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def port_range(self, within: tuple[int, int] | None = None) -> str:
        """Each case its own slice of ports: of the eval's own range, or of `within` (live
        mode: the operator's PIDEPLOY_PORT_RANGE, so a live eval stays inside it)."""
        low, high = within or (PORT_BASE, PORT_BASE + PORT_SLOT * PORT_SLOTS - 1)
        slots = max(1, (high - low + 1) // PORT_SLOT)
        start = low + (self.slots % slots) * PORT_SLOT
        self.slots += 1
        return f"{start}-{min(high, start + PORT_SLOT - 1)}"

    def engine(self) -> Engine:
        return DockerEngine(self.docker_host or None, timeout=30) if self.real else MemoryEngine()


def _real_stack() -> tuple[bool, str]:
    """(True, where) when the container engine with the gateway images and nginx are here."""
    if _nginx_binary() is None:
        return False, "nginx is not installed"
    try:
        engine = DockerEngine(os.environ.get("DOCKER_HOST") or None, timeout=5)
    except PiDeployError as error:
        return False, error.message
    try:
        engine.version()
        for tag in ("latest", "v1", "v2"):
            if not engine.image_exists(f"localhost/pideploy-gateway:{tag}"):
                return (
                    False,
                    f"the image localhost/pideploy-gateway:{tag} is not in the engine at {engine.where}",
                )
        return True, f"real engine at {engine.where}, embedded nginx"
    except PiDeployError as error:
        return False, error.message
    finally:
        engine.close()


# ---------------------------------------------------------------------------
# One case's world
# ---------------------------------------------------------------------------


class Clock:
    """Real time plus an offset a heartbeat step moves forward (backoff without waiting)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


@dataclass
class StepResult:
    """What one run step did: its outcome and the traces of its agent runs."""

    kind: str  # "task" | "heartbeat"
    status: str  # task: succeeded | failed; heartbeat: ok | unrepaired
    error_class: str | None
    reported: bool  # every agent run of the step ended with report_result
    traces: list[dict[str, Any]]
    seconds: float


@dataclass
class World:
    """A case's runtime and what was built in it."""

    rt: tools.Runtime
    ids: dict[str, int] = field(default_factory=dict)  # instance name -> id
    built_containers: dict[str, str | None] = field(default_factory=dict)
    values: dict[str, dict[str, Any]] = field(default_factory=dict)  # for {{world...}} placeholders
    held: list[socket.socket] = field(default_factory=list)

    def ctx(self, user: str | None) -> tools.ToolContext:
        return tools.ToolContext.direct(self.rt.config.traces, user, "eval_world")

    def build(self, spec: dict[str, Any]) -> None:
        for instance in spec.get("instances", []):
            self._instance(fill_world(instance, self.values))
        if spec.get("faults", {}).get("port_taken"):
            self._take_ports()

    def _instance(self, spec: dict[str, Any]) -> None:
        rt, name, user, state = self.rt, spec["name"], spec["user"], spec["state"]
        if state == "requested":  # what the queue leaves: the row, `creating`, before its task runs
            with rt.db.transaction() as conn:
                row = rt.db.one(
                    "instance_insert", conn, user_id=user, name=name, image=rt.config.image,
                    config=spec.get("config") or {},
                )  # fmt: skip
                assert row is not None
                rt.db.one(
                    "event_insert", conn, instance_id=row["id"], user_id=user, task_id=None,
                    kind="create_requested", detail={"name": name, "actor": user},
                )  # fmt: skip
            self._remember(name, row)
            return
        created = tools.instance_create(rt, self.ctx(user), name, spec.get("config"))
        row = rt.db.one("instance_get", id=created["instance_id"])
        assert row is not None
        for file_name, text in spec.get("files", {}).items():
            (Path(row["storage_path"]) / file_name).write_text(text)
        container_id = row["container_id"]
        if state == "stopped":
            tools.instance_stop(rt, self.ctx(user), row["id"])
        elif state == "crashed":  # SIGKILL, as a crash or the OOM killer would
            rt.engine.kill(container_id)
            _wait(f"container of {name} to stop", lambda: not _running(rt.engine, container_id))
        elif state == "removed":  # removed by hand behind piDeploy's back
            rt.engine.remove(container_id)
        self._remember(name, row)

    def _remember(self, name: str, row: db.Row) -> None:
        self.ids[name] = row["id"]
        self.built_containers[name] = row["container_id"]
        self.values[name] = {
            "instance_id": row["id"],
            "container": runtime.container_name(self.rt.config, row["id"]),
            "port": row["port"],
            "user": row["user_id"],
        }

    def _take_ports(self) -> None:
        """Another process listens on every free port of the range but the highest one."""
        low, high = self.rt.config.ports
        free = [port for port in range(low, high + 1) if runtime.port_is_free(port)]
        for port in free[:-1]:
            squatter = socket.socket()
            squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            squatter.bind(("127.0.0.1", port))
            squatter.listen()
            self.held.append(squatter)

    def run_task(self, step: dict[str, Any], chain: models.Chain, limits: agent.Limits) -> StepResult:
        task = step["task"]
        instance = task.get("instance")
        spec = agent.TaskSpec(
            type=task["type"],
            user_id=task["user"],
            params=fill_world(task.get("params", {}), self.values),
            instance_id=self.ids[instance] if instance else None,
        )
        started = time.monotonic()
        outcome = agent.run_task(spec, agent.ToolsEnvironment(self.rt), chain, limits)
        seconds = time.monotonic() - started
        trace = json.loads(Path(outcome.trace_file).read_text())
        return StepResult(
            "task", outcome.status, outcome.error_class, outcome.result is not None, [trace], seconds
        )

    def run_heartbeat(self, step: dict[str, Any], beat: Any, clock: Clock) -> StepResult:
        clock.offset += float(step["heartbeat"].get("advance_s", 0))
        started = time.monotonic()
        report = beat.round("eval")
        seconds = time.monotonic() - started
        # A model's run has a trace of its own; the plan's steps run without one (the playbook)
        # are in the round's trace, which ends in no report_result: no model was asked.
        files = dict.fromkeys(run["trace_file"] for run in report.agent_runs)
        traces = [json.loads(Path(file).read_text()) for file in files]
        return StepResult(
            "heartbeat",
            "ok" if report.ok else "unrepaired",
            None,
            all(t.get("result") is not None for t in traces if t["task_type"] != "round"),
            traces,
            seconds,
        )

    def close(self) -> None:
        for squatter in self.held:
            squatter.close()
        labels = {LABEL_NAMESPACE: self.rt.config.namespace}
        with contextlib.suppress(PiDeployError):
            for container in self.rt.engine.list(labels):
                with contextlib.suppress(PiDeployError):
                    self.rt.engine.remove(container.id)


def _running(engine: Engine, container_id: str) -> bool:
    state = engine.inspect(container_id)
    return state is not None and state.running


def _wait(what: str, check: Any, timeout: float = 15.0) -> None:
    limit = time.monotonic() + timeout
    while not check():
        if time.monotonic() > limit:
            raise PiDeployError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.05)


# ---------------------------------------------------------------------------
# Checking the world a run left
# ---------------------------------------------------------------------------


def _get(url: str) -> tuple[int, str]:
    try:
        with LOOPBACK.open(url, timeout=3) as response:
            return int(response.status), response.read().decode(errors="replace")
    except urllib.error.HTTPError as error:
        return error.code, ""
    except OSError:
        return 0, ""


def through_proxy(rt: tools.Runtime, instance_id: int, path: str) -> tuple[int, str]:
    """GET an instance's path the way a user reaches it: through nginx at its route (in memory:
    its route's port). A deleted instance is tried at any route the map still has for its id."""
    row = rt.db.one("instance_get", id=instance_id)
    routes = rt.proxy.routes()
    key = (
        route_key(row, rt.config)
        if row
        else next((k for k in routes if route_instance(k) == instance_id), None)
    )
    if key is None:
        return 404, ""
    if isinstance(rt.proxy, MemoryProxy):
        port = routes.get(key)
        return _get(f"http://127.0.0.1:{port}/{path}") if port else (404, "")
    return _get(rt.proxy.url_for(key) + path)


def check_world(world: World, expect: dict[str, Any]) -> list[str]:
    """Every way the world differs from the expectation, as sentences ([] when it matches)."""
    rt, problems = world.rt, []
    rows = rt.db.all("instance_list_all")
    containers = rt.engine.list({LABEL_NAMESPACE: rt.config.namespace})
    for name, wanted in expect.get("instances", {}).items():
        matching = [r for r in rows if r["name"] == name]
        if len(matching) > 1:
            problems.append(f"{name}: {len(matching)} instances have this name")
            continue
        row = matching[0] if matching else None
        instance_id = row["id"] if row else world.ids.get(name)
        mine = [
            c
            for c in containers
            if instance_id is not None and c.labels.get(LABEL_INSTANCE) == str(instance_id)
        ]
        problems += [f"{name}: {p}" for p in _check_instance(world, name, row, instance_id, mine, wanted)]
    if "instance_count" in expect and len(rows) != expect["instance_count"]:
        problems.append(f"{len(rows)} instances exist, expected {expect['instance_count']}")
    if expect.get("no_orphans", True):
        known = {str(r["id"]) for r in rows}
        for container in containers:
            if container.labels.get(LABEL_INSTANCE) not in known:
                problems.append(f"orphan container {container.name} ({container.state}) has no instance row")
        for row in rows:
            count = sum(1 for c in containers if c.labels.get(LABEL_INSTANCE) == str(row["id"]))
            if count > 1:
                problems.append(f"{row['name']}: {count} containers (a leftover from a rebuild?)")
    return problems


def _check_instance(
    world: World,
    name: str,
    row: db.Row | None,
    instance_id: int | None,
    mine: list[Any],
    wanted: dict[str, Any],
) -> list[str]:
    rt, problems = world.rt, []
    if not wanted.get("exists", True):
        if row is not None:
            problems.append(f"still exists ({row['status']})")
        if mine:
            problems.append(f"{len(mine)} container(s) left")
        if instance_id is not None and runtime.storage_for(rt, instance_id).exists():
            problems.append("its storage folder is left")
        if instance_id is not None and through_proxy(rt, instance_id, "healthz")[0] == 200:
            problems.append("still answers through nginx")
        return problems
    if row is None:
        return ["does not exist"]
    for column, value in wanted.get("row", {}).items():
        if row.get(column) != value:
            problems.append(f"{column} is {row.get(column)!r}, expected {value!r}")
    state = wanted.get("container")
    if state == "absent" and mine:
        problems.append(f"has {len(mine)} container(s), expected none")
    elif state in ("running", "stopped"):
        own = [c for c in mine if c.id == row["container_id"] or c.id.startswith(row["container_id"] or "-")]
        if not own:
            problems.append(f"its container {str(row['container_id'])[:12]} is missing")
        elif own[0].running != (state == "running"):
            problems.append(f"its container is {own[0].state}, expected {state}")
    if "same_container" in wanted:
        same = row["container_id"] == world.built_containers.get(name)
        if same != wanted["same_container"]:
            problems.append("its container was replaced" if not same else "its container was not replaced")
    if "routed" in wanted:
        code = through_proxy(rt, row["id"], "healthz")[0]
        if (code == 200) != wanted["routed"]:
            problems.append(
                f"/healthz through nginx answers {code or 'nothing'}, expected {'200' if wanted['routed'] else 'no 200'}"
            )
    if "version" in wanted:
        code, body = through_proxy(rt, row["id"], "version")
        if body.strip() != wanted["version"]:
            problems.append(
                f"/version through nginx is {body.strip()!r} (HTTP {code}), expected {wanted['version']!r}"
            )
    if "storage" in wanted and runtime.storage_for(rt, row["id"]).exists() != wanted["storage"]:
        problems.append("its storage folder is " + ("missing" if wanted["storage"] else "left"))
    if "last_error_contains" in wanted and wanted["last_error_contains"] not in (row["last_error"] or ""):
        problems.append(
            f"last_error {row['last_error']!r} does not contain {wanted['last_error_contains']!r}"
        )
    events = [
        e["kind"] for e in reversed(rt.db.all("event_list_for_instance", instance_id=row["id"], limit=500))
    ]
    for kind in wanted.get("events_include", []):
        if kind not in events:
            problems.append(f"no {kind} event (events: {', '.join(events)})")
    for kind, count in wanted.get("events_count", {}).items():
        if events.count(kind) != count:
            problems.append(f"{events.count(kind)} {kind} event(s), expected {count}")
    return problems

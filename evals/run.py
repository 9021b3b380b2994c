"""`make eval`: replay (or run live) every case of the dataset and score each run.

A case (evals/cases/<id>.json; the README's "Evals" section has the format)
holds a starting world, the task(s) or heartbeat round(s) to run, the model
turns recorded from a run, and the expectations. For each case this module:

1. builds the starting world for real: a fresh database on one embedded
   PostgreSQL cluster, its own namespace, an embedded nginx on a free port,
   instances made with the real tools and then stopped, killed or removed,
   fault files written into their storage, ports held by another process;
2. serves the recorded turns from the local OpenAI-compatible replay server
   (evals/llm_server.py) to the case's model chain, or, with --live, uses the
   configured real chain (pideploy.toml [[models]]);
3. runs the real loop and tools (`agent.run_task`, `Heartbeat.round`);
4. scores the run from its traces and the world it left: `completed`,
   `expected_tools`, `cost_reasonable`, `no_loops`, `world_ok` (a run passes
   when all five hold);
5. tears everything down (containers, nginx, database).

On a machine without the container engine or nginx it falls back to the
in-memory engine and proxy, unless CI is set: then a missing stack is an error.
Replay mode exits 1 if any case fails; live mode runs each case k times and
exits 1 if the share of cases passing all k runs (pass^k) is below
`eval_pass_threshold`. Exit 2: a bad case file or a missing stack.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import logging
import os
import random
import re
import shutil
import socket
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

import agent
import config as config_module
import db
import models
import runtime
import tools
from config import Config, ModelConfig
from engine import LABEL_INSTANCE, LABEL_NAMESPACE, DockerEngine, Engine, MemoryEngine
from errors import PiDeployError
from evals.llm_server import ReplayServer, validate_script
from localio import LOOPBACK, free_port, write_atomic
from proxy import MemoryProxy, NginxProxy, Proxy, route_instance, route_key

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
CASES_DIR = Path(__file__).resolve().parent / "cases"
DEFAULT_REPORT = Path("artifacts/eval-report.json")
SCORES = ("completed", "expected_tools", "cost_reasonable", "no_loops", "world_ok")
DEFAULT_MODEL = {"name": "minimax-m2.5-free", "input_usd_per_mtok": 0.0, "output_usd_per_mtok": 0.0}
# Settings every case starts from (a case's world.settings override them).
BASE_SETTINGS = {"health_timeout": 10, "stop_timeout": 3}
PORT_BASE, PORT_SLOT, PORT_SLOTS = 30000, 40, 60  # each case its own port range, below the ephemeral ones
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


class CaseError(ValueError):
    """A case file that cannot be used; the message names the file and the problem."""


# ---------------------------------------------------------------------------
# The case format
# ---------------------------------------------------------------------------

_NAME = {"type": "string", "pattern": "^[a-z0-9][a-z0-9-]{0,62}$"}
_NAMES = {"type": "array", "items": {"type": "string"}, "uniqueItems": True}
_OUTCOME = {
    "type": "object",
    "additionalProperties": False,
    "required": ["status"],
    "properties": {
        "status": {"enum": ["succeeded", "failed", "ok", "unrepaired"]},
        "error_class": {"type": ["string", "null"]},
        "reported": {"type": "boolean"},
    },
}
_INSTANCE_EXPECT = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "exists": {"type": "boolean"},
        "row": {"type": "object"},
        "container": {"enum": ["running", "stopped", "absent"]},
        "same_container": {"type": "boolean"},
        "routed": {"type": "boolean"},
        "version": {"type": "string"},
        "storage": {"type": "boolean"},
        "last_error_contains": {"type": "string"},
        "events_include": _NAMES,
        "events_count": {"type": "object", "additionalProperties": {"type": "integer", "minimum": 0}},
    },
}
_TOOL_EXPECT = {
    "tools_required": _NAMES,
    "tools_forbidden": _NAMES,
    "tools_refused": _NAMES,
    "playbook": {"type": "boolean"},
    "models_answered": _NAMES,
}
_LIMIT_FIELDS = {f.name: f.type for f in dataclasses.fields(agent.Limits)}
CASE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["id", "description", "tags", "world", "run", "recorded_turns", "expect"],
    "properties": {
        "id": {"type": "string", "pattern": "^[a-z0-9][a-z0-9-]*$"},
        "description": {"type": "string", "minLength": 1},
        "tags": {
            "type": "object",
            "additionalProperties": False,
            "required": ["task", "difficulty", "fault"],
            "properties": {
                "task": {"type": "string"},
                "difficulty": {"enum": ["easy", "medium", "hard", "unknown"]},
                "fault": {"type": "string"},
            },
        },
        "live": {"type": "boolean"},
        "needs_review": {"type": "boolean"},
        "source": {"type": "string"},
        "world": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "settings": {"type": "object"},
                "faults": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {"port_taken": {"type": "boolean"}},
                },
                "instances": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["name", "user", "state"],
                        "properties": {
                            "name": _NAME,
                            "user": {"type": "string", "minLength": 1},
                            "state": {"enum": ["requested", "running", "stopped", "crashed", "removed"]},
                            "config": {"type": "object"},
                            "files": {"type": "object", "additionalProperties": {"type": "string"}},
                        },
                    },
                },
            },
        },
        "models": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["name"],
                "properties": {
                    "name": {"type": "string", "minLength": 1},
                    "input_usd_per_mtok": {"type": "number", "minimum": 0},
                    "output_usd_per_mtok": {"type": "number", "minimum": 0},
                    # The model's compatibility settings (README, "The model chain").
                    "stream": {"type": "boolean"},
                    "tool_choice": {"enum": ["auto", "required", "none-sent"]},
                    "send_usage_request": {"type": "boolean"},
                    "tool_schema": {"enum": ["full", "plain"]},
                },
            },
        },
        "limits": {
            "type": "object",
            "additionalProperties": False,
            "properties": {name: {"type": "number", "minimum": 0} for name in _LIMIT_FIELDS},
        },
        "run": {
            "type": "array",
            "minItems": 1,
            "items": {
                "oneOf": [
                    {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["task"],
                        "properties": {
                            "task": {
                                "type": "object",
                                "additionalProperties": False,
                                "required": ["type", "user"],
                                "properties": {
                                    "type": {"enum": sorted(t for t in tools.TOOLSETS if t != "heartbeat")},
                                    "user": {"type": "string", "minLength": 1},
                                    "instance": _NAME,
                                    "params": {"type": "object"},
                                },
                            }
                        },
                    },
                    {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["heartbeat"],
                        "properties": {
                            "heartbeat": {
                                "type": "object",
                                "additionalProperties": False,
                                "properties": {"advance_s": {"type": "number", "minimum": 0}},
                            }
                        },
                    },
                ]
            },
        },
        "recorded_turns": {"type": "object"},
        "expect": {
            "type": "object",
            "additionalProperties": False,
            "required": ["outcomes", "max_turns", "max_cost_usd", "world"],
            "properties": {
                "outcomes": {"type": "array", "items": _OUTCOME},
                "max_turns": {"type": "integer", "minimum": 0},
                "max_cost_usd": {"type": "number", "minimum": 0},
                "max_repeats": {"type": "integer", "minimum": 1},
                **_TOOL_EXPECT,
                "world": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "instances": {"type": "object", "additionalProperties": _INSTANCE_EXPECT},
                        "instance_count": {"type": "integer", "minimum": 0},
                        "no_orphans": {"type": "boolean"},
                    },
                },
            },
        },
        # Expectations about the recorded model's own path, checked in replay mode only.
        "expect_replay": {"type": "object", "additionalProperties": False, "properties": _TOOL_EXPECT},
    },
}


def validate_case(case: Any, where: str) -> dict[str, Any]:
    """The case if it is usable; CaseError naming `where` and the first problem otherwise."""
    problems = sorted(tools.SchemaValidator(CASE_SCHEMA).iter_errors(case), key=lambda e: list(e.path))
    if problems:
        path = "/".join(str(p) for p in problems[0].path) or "(case)"
        raise CaseError(f"{where}: {path}: {problems[0].message}")
    try:
        validate_script(case["recorded_turns"])
    except ValueError as error:
        raise CaseError(f"{where}: recorded_turns: {error}") from None
    names = [i["name"] for i in case["world"].get("instances", [])]
    if len(set(names)) != len(names):
        raise CaseError(f"{where}: world.instances: names must be unique (they are the keys)")
    if len(case["expect"]["outcomes"]) != len(case["run"]):
        raise CaseError(f"{where}: expect.outcomes needs one entry per run step ({len(case['run'])})")
    for index, step in enumerate(case["run"]):
        status = case["expect"]["outcomes"][index]["status"]
        heartbeat = "heartbeat" in step
        if heartbeat != (status in ("ok", "unrepaired")):
            kind = "ok/unrepaired" if heartbeat else "succeeded/failed"
            raise CaseError(
                f"{where}: expect.outcomes[{index}]: a {'heartbeat' if heartbeat else 'task'} step is {kind}"
            )
        instance = step.get("task", {}).get("instance")
        if instance is not None and instance not in names:
            raise CaseError(f"{where}: run[{index}].task.instance {instance!r} is not in world.instances")
        if not heartbeat and step["task"]["type"] != "instance_create" and instance is None:
            raise CaseError(f"{where}: run[{index}]: a {step['task']['type']} task needs an instance")
    unknown = set(case["world"].get("settings", {})) - {f.name for f in dataclasses.fields(Config)}
    if unknown:
        raise CaseError(f"{where}: world.settings: unknown settings {sorted(unknown)}")
    valid: dict[str, Any] = case
    return valid


def load_cases(directory: Path = CASES_DIR, only: list[str] | None = None) -> list[dict[str, Any]]:
    cases: list[dict[str, Any]] = []
    for path in sorted(directory.glob("*.json")):
        try:
            case = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise CaseError(f"{path}: not readable JSON: {error}") from None
        validate_case(case, str(path))
        if case["id"] != path.stem:
            raise CaseError(f"{path}: id {case['id']!r} must be the file name without .json")
        cases.append(case)
    if only:
        missing = sorted(set(only) - {c["id"] for c in cases})
        if missing:
            raise CaseError(f"no such case: {', '.join(missing)} (in {directory})")
        cases = [c for c in cases if c["id"] in only]
    return cases


def expectations(case: dict[str, Any], live: bool) -> dict[str, Any]:
    """The case's expectations for this mode: in replay, expect_replay adds to them; live runs
    must be the models' own (a missing API key must not pass as the playbook's success)."""
    expect: dict[str, Any] = copy.deepcopy(case["expect"])
    if live:  # the playbook standing in for the models would judge the playbook, not the chain
        expect.setdefault("playbook", False)
    else:
        for key, value in case.get("expect_replay", {}).items():
            if isinstance(value, list):
                expect[key] = sorted(set(expect.get(key, [])) | set(value))
            else:
                expect[key] = value
    return expect


# ---------------------------------------------------------------------------
# Placeholders: {{world.<instance name>.<instance_id|container|port|user>}}
# ---------------------------------------------------------------------------

_WORLD_PLACEHOLDER = re.compile(r"\{\{\s*world\.([a-z0-9-]+)\.([a-z_]+)\s*\}\}")


def fill_world(value: Any, known: dict[str, dict[str, Any]]) -> Any:
    """`value` with the world placeholders replaced; a whole-string placeholder keeps its type."""
    if isinstance(value, str):

        def lookup(match: re.Match[str]) -> Any:
            name, key = match.group(1), match.group(2)
            if name not in known or key not in known[name]:
                raise CaseError(f"placeholder {match.group(0)}: no such world value")
            return known[name][key]

        whole = _WORLD_PLACEHOLDER.fullmatch(value)
        if whole:
            return lookup(whole)
        return _WORLD_PLACEHOLDER.sub(lambda m: str(lookup(m)), value)
    if isinstance(value, dict):
        return {k: fill_world(v, known) for k, v in value.items()}
    if isinstance(value, list):
        return [fill_world(v, known) for v in value]
    return value


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


# ---------------------------------------------------------------------------
# Scoring: pure functions of the step results, the expectations and the world check
# ---------------------------------------------------------------------------


def spans(trace: dict[str, Any]) -> Iterator[dict[str, Any]]:
    stack = [trace["spans"]]
    while stack:
        span = stack.pop()
        yield span
        stack.extend(span.get("children", []))


def tool_spans(trace: dict[str, Any]) -> list[dict[str, Any]]:
    found = [s for s in spans(trace) if s["attributes"].get("gen_ai.operation.name") == "execute_tool"]
    return sorted(found, key=lambda s: s["start"])


def max_repeats(trace: dict[str, Any]) -> tuple[int, str]:
    """The most times one tool was asked for with the same arguments in a run, and which."""
    counts: dict[tuple[str, str], int] = {}
    for message in trace.get("transcript", []):
        for call in message.get("tool_calls") or [] if message.get("role") == "assistant" else []:
            name, arguments = call["function"]["name"], call["function"]["arguments"]
            with contextlib.suppress(ValueError):
                arguments = json.dumps(json.loads(arguments or "{}"), sort_keys=True)
            counts[(name, arguments)] = counts.get((name, arguments), 0) + 1
    if not counts:
        return 0, ""
    (name, arguments), most = max(counts.items(), key=lambda item: item[1])
    return most, f"{name} {arguments}"


@dataclass
class Figures:
    turns: int = 0
    tokens: int = 0
    cost_usd: float = 0.0
    seconds: float = 0.0


def figures(steps: list[StepResult]) -> Figures:
    traces = [t for s in steps for t in s.traces]
    return Figures(
        turns=sum(int(t["summary"]["turns"]) for t in traces),
        tokens=sum(int(t["summary"]["total_tokens"]) for t in traces),
        cost_usd=round(sum(float(t["summary"]["cost_usd"]) for t in traces), 8),
        seconds=round(sum(s.seconds for s in steps), 3),
    )


def score(
    expect: dict[str, Any], steps: list[StepResult], world_problems: list[str], replay_errors: list[str]
) -> tuple[dict[str, bool], list[str]]:
    """The five scores and, for each one that fails, why."""
    problems: dict[str, list[str]] = {name: [] for name in SCORES}
    traces = [t for s in steps for t in s.traces]

    for index, (step, wanted) in enumerate(zip(steps, expect["outcomes"], strict=True)):
        where = f"step {index + 1} ({step.kind})"
        if step.status != wanted["status"]:
            problems["completed"].append(
                f"{where} ended {step.status} ({step.error_class}), expected {wanted['status']}"
            )
        elif "error_class" in wanted and step.error_class != wanted["error_class"]:
            problems["completed"].append(
                f"{where} failed with {step.error_class}, expected {wanted['error_class']}"
            )
        if step.reported != wanted.get("reported", True):
            ended = "with report_result" if step.reported else f"without report_result ({step.error_class})"
            problems["completed"].append(f"{where} ended {ended}")
    # The playbook standing in for failed models (not a heartbeat's deliberate playbook-only run).
    playbook = any(
        t["summary"].get("playbook") and any(m != "playbook" for m in t.get("model_chain", []))
        for t in traces
    )
    if "playbook" in expect and playbook != expect["playbook"]:
        problems["completed"].append("the playbook " + ("answered" if playbook else "did not answer"))
    if "models_answered" in expect:
        answered = sorted(
            {
                str(s["attributes"].get("pideploy.model_name"))
                for t in traces
                for s in spans(t)
                if s["attributes"].get("gen_ai.operation.name") == "chat"
                and s["status"] == "ok"
                and s["attributes"].get("pideploy.model_name") != "playbook"
            }
        )
        if answered != sorted(expect["models_answered"]):
            problems["completed"].append(
                f"models that answered: {answered}, expected {sorted(expect['models_answered'])}"
            )
    problems["completed"] += [f"the run left the recorded turns: {e}" for e in replay_errors[:3]]

    called = {s["attributes"].get("gen_ai.tool.name") for t in traces for s in tool_spans(t)}
    refused = {
        s["attributes"].get("gen_ai.tool.name")
        for t in traces
        for s in tool_spans(t)
        if s["attributes"].get("error.type") == "tool_refused"
    }
    for tool in expect.get("tools_required", []):
        if tool not in called:
            problems["expected_tools"].append(f"{tool} was not called")
    for tool in expect.get("tools_forbidden", []):
        if tool in called:
            problems["expected_tools"].append(f"{tool} was called")
    for tool in expect.get("tools_refused", []):
        if tool not in refused:
            problems["expected_tools"].append(f"{tool} was not refused")

    total = figures(steps)
    if total.cost_usd > expect["max_cost_usd"]:
        problems["cost_reasonable"].append(f"cost ${total.cost_usd:.4f} > cap ${expect['max_cost_usd']:.4f}")

    if total.turns > expect["max_turns"]:
        problems["no_loops"].append(f"{total.turns} turns > {expect['max_turns']}")
    limit = expect.get("max_repeats", 1)
    for trace in traces:
        most, what = max_repeats(trace)
        if most > limit:
            problems["no_loops"].append(f"{what} asked for {most} times (at most {limit})")

    problems["world_ok"] = list(world_problems)
    scores = {name: not problems[name] for name in SCORES}
    return scores, [f"{name}: {p}" for name in SCORES for p in problems[name]]


# ---------------------------------------------------------------------------
# Running one case
# ---------------------------------------------------------------------------


@dataclass
class RunRecord:
    case: str
    attempt: int
    scores: dict[str, bool]
    problems: list[str]
    figures: Figures
    trace_files: list[str]
    setup_s: float = 0.0
    error: str | None = None  # the runner itself failed (world build, teardown)

    @property
    def passed(self) -> bool:
        return self.error is None and all(self.scores.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "attempt": self.attempt,
            "passed": self.passed,
            "scores": self.scores,
            "problems": self.problems,
            "turns": self.figures.turns,
            "tokens": self.figures.tokens,
            "cost_usd": self.figures.cost_usd,
            "run_s": self.figures.seconds,
            "setup_s": round(self.setup_s, 3),
            "trace_files": self.trace_files,
            "error": self.error,
        }


# What a case's run owns whatever the mode: its own data dir, namespace, nginx and database.
_CASE_OWNED = ("home", "namespace", "nginx_listen", "nginx_bin", "nginx_map", "trace_dir", "database_url",
               "docker_host", "port_range", "alerts_file", "lock_dir")  # fmt: skip


def case_config(
    site: Site, case: dict[str, Any], home: Path, conninfo: str, traces: Path, operator: Config | None = None
) -> Config:
    """The settings of one case's run. Replay: the eval's own (short health waits). Live
    (`operator`, the operator's loaded settings): the operator's max_tokens, timeouts, caps and
    port range, with only what the run must own and the case's own settings changed."""
    case_settings = case["world"].get("settings", {})
    settings = case_settings if operator is not None else {**BASE_SETTINGS, **case_settings}
    env = {
        "PIDEPLOY_HOME": str(home),
        "PIDEPLOY_NAMESPACE": f"ev{uuid.uuid4().hex[:8]}",
        "PIDEPLOY_NGINX_LISTEN": f"127.0.0.1:{free_port()}",
        "PIDEPLOY_NGINX_BIN": site.nginx_bin,
        "PIDEPLOY_PORT_RANGE": site.port_range(operator.ports if operator is not None else None),
        "PIDEPLOY_TRACE_DIR": str(traces),
        "DATABASE_URL": conninfo,
        **{"PIDEPLOY_" + key.upper(): str(value) for key, value in settings.items()},
    }
    if site.docker_host:
        env["DOCKER_HOST"] = site.docker_host
    own = config_module.load(env=env, cwd=home, auth_path=home / "no-auth.json")
    if operator is None:
        return own
    changed = {key: getattr(own, key) for key in (*_CASE_OWNED, *case_settings)}
    return dataclasses.replace(operator, **changed)


_COMPAT = ("stream", "tool_choice", "send_usage_request", "tool_schema")


def replay_models(case: dict[str, Any], url: str) -> list[ModelConfig]:
    return [
        ModelConfig(
            name=m["name"],
            base_url=url,
            model=m["name"],
            api_key_env="EVAL_REPLAY_KEY",
            input_usd_per_mtok=float(m.get("input_usd_per_mtok", 0.0)),
            output_usd_per_mtok=float(m.get("output_usd_per_mtok", 0.0)),
            timeout=15.0,
            api_key="replay",
            **{key: m[key] for key in _COMPAT if key in m},
        )
        for m in case.get("models") or [DEFAULT_MODEL]
    ]


def run_case(case: dict[str, Any], site: Site, attempt: int = 1, operator: Config | None = None) -> RunRecord:
    """Build the case's world, run its steps, score them, tear it all down. `operator`: live
    mode, with the operator's settings and model chain."""
    live = operator is not None
    traces = site.trace_root / case["id"] / f"run-{attempt}"
    shutil.rmtree(traces, ignore_errors=True)
    home = Path(tempfile.mkdtemp(prefix="pdc-", dir="/tmp"))
    started = time.monotonic()
    empty = Figures()
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(shutil.rmtree, home, True)
        try:
            conninfo = cleanup.enter_context(site.database())
            config = case_config(site, case, home, conninfo, traces, operator)
            database = db.Database(conninfo)
            cleanup.callback(database.close)
            database.apply_schema()
            proxy: Proxy = (
                NginxProxy.embedded(home / "nginx", config.nginx_listen, config.nginx_bin)
                if site.real
                else MemoryProxy()
            )
            if isinstance(proxy, NginxProxy):
                cleanup.callback(proxy.close, True)
            proxy.ensure_running()
            engine = site.engine()
            world = World(tools.Runtime(config, database, engine, proxy))
            cleanup.callback(world.close)
            world.build(case["world"])
            replay = None
            if operator is not None:
                configs = list(operator.models if operator.agent == "on" else ())
            else:
                script = fill_world(case["recorded_turns"], world.values)
                replay = cleanup.enter_context(ReplayServer(script))
                configs = replay_models(case, replay.url)
            config = dataclasses.replace(config, models=tuple(configs))
            world.rt = dataclasses.replace(world.rt, config=config)
            limits = dataclasses.replace(agent.Limits.from_config(config), **case.get("limits", {}))
            links = [models.Link(models.OpenAIChat(m), m) for m in configs]
            sleep = time.sleep if live else (lambda _: None)  # replayed backoff is not worth waiting for
            chain = models.Chain(links, models.MemoryCooldowns(), limits, sleep=sleep)
            setup_s = time.monotonic() - started
            steps = _run_steps(case, world, chain, limits)
            world_problems = check_world(world, case["expect"]["world"])
            errors = replay.recorded()[1] if replay else []
            scores, problems = score(expectations(case, live), steps, world_problems, errors)
            trace_files = sorted(str(p) for p in traces.glob("*.json"))
            return RunRecord(case["id"], attempt, scores, problems, figures(steps), trace_files, setup_s)
        except Exception as error:  # one case's runner failure must not hide the others' results
            logger.exception("eval case %s failed to run", case["id"], extra={"action": "eval_case_error"})
            message = getattr(error, "message", None) or f"{type(error).__name__}: {error}"
            failed = {name: False for name in SCORES}
            return RunRecord(case["id"], attempt, failed, [f"runner: {message}"], empty, [], error=message)
    raise AssertionError("unreachable")


def _run_steps(
    case: dict[str, Any], world: World, chain: models.Chain, limits: agent.Limits
) -> list[StepResult]:
    import heartbeat  # here: a replay of task cases needs nothing of it

    clock = Clock()
    beat = heartbeat.Heartbeat(world.rt, world.rt.config, chain=chain, clock=clock)
    results = []
    for step in case["run"]:
        if "heartbeat" in step:
            results.append(world.run_heartbeat(step, beat, clock))
        else:
            results.append(world.run_task(step, chain, limits))
    return results


# ---------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------


def _mark(ok: bool) -> str:
    return "ok" if ok else "FAIL"


def replay_table(records: list[RunRecord]) -> str:
    width = max([len("case"), *(len(r.case) for r in records)])
    head = (
        f"{'case':<{width}}  completed  tools  cost  loops  world  turns  tokens      cost$   time  verdict"
    )
    lines = [head, "-" * len(head)]
    for r in records:
        s, f = r.scores, r.figures
        verdict = "ERROR" if r.error else ("pass" if r.passed else "FAIL")
        lines.append(
            f"{r.case:<{width}}  {_mark(s['completed']):<9}  {_mark(s['expected_tools']):<5}  "
            f"{_mark(s['cost_reasonable']):<4}  {_mark(s['no_loops']):<5}  {_mark(s['world_ok']):<5}  "
            f"{f.turns:>5}  {f.tokens:>6}  {f.cost_usd:>9.5f}  {f.seconds:>5.1f}s  {verdict}"
        )
    return "\n".join(lines)


@dataclass
class CaseSummary:
    case: str
    runs: list[RunRecord]
    skipped: str = ""

    @property
    def pass_k(self) -> bool:
        return bool(self.runs) and all(r.passed for r in self.runs)

    @property
    def pass_at_1(self) -> float:
        return sum(r.passed for r in self.runs) / len(self.runs) if self.runs else 0.0

    def mean(self, value: str) -> float:
        numbers = [float(getattr(r.figures, value)) for r in self.runs]
        return sum(numbers) / len(numbers) if numbers else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "case": self.case,
            "skipped": self.skipped or None,
            "pass_k": self.pass_k,
            "pass_at_1": round(self.pass_at_1, 4),
            "mean_turns": round(self.mean("turns"), 2),
            "mean_tokens": round(self.mean("tokens"), 1),
            "mean_cost_usd": round(self.mean("cost_usd"), 8),
            "mean_run_s": round(self.mean("seconds"), 3),
            "runs": [r.to_dict() for r in self.runs],
        }


def live_table(summaries: list[CaseSummary], k: int) -> str:
    width = max([len("case"), *(len(s.case) for s in summaries)])
    head = (
        f"{'case':<{width}}  pass^{k:<3} pass@1  completed  tools  cost  loops  world  "
        "turns   tokens      cost$    time"
    )
    lines = [head, "-" * len(head)]
    for s in summaries:
        if s.skipped:
            lines.append(f"{s.case:<{width}}  skipped: {s.skipped}")
            continue
        counts = "  ".join(
            f"{sum(r.scores[name] for r in s.runs)}/{len(s.runs)}".ljust(w)
            for name, w in zip(SCORES, (9, 5, 4, 5, 5), strict=True)
        )
        lines.append(
            f"{s.case:<{width}}  {'yes' if s.pass_k else 'no':<8} {s.pass_at_1:>6.2f}  {counts}  "
            f"{s.mean('turns'):>5.1f}  {s.mean('tokens'):>7.0f}  {s.mean('cost_usd'):>9.5f}  {s.mean('seconds'):>5.1f}s"
        )
    return "\n".join(lines)


def problems_text(records: list[RunRecord]) -> str:
    lines = []
    for r in records:
        if not r.passed:
            lines.append(f"{r.case} (run {r.attempt}):")
            lines += [f"  {p}" for p in r.problems]
            lines += [f"  trace {t}" for t in r.trace_files[-3:]]
    return "\n".join(lines)


def write_report(path: Path, report: dict[str, Any]) -> None:
    write_atomic(path, json.dumps(report, indent=2) + "\n")


# ---------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m evals.run", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--live", action="store_true", help="the configured real model chain instead of the recorded turns"
    )
    parser.add_argument("--k", type=int, default=3, help="live mode: runs per case (default 3)")
    parser.add_argument(
        "--case", action="append", dest="cases", metavar="ID", help="only this case (repeatable)"
    )
    parser.add_argument(
        "--report", type=Path, default=DEFAULT_REPORT, help=f"JSON report (default {DEFAULT_REPORT})"
    )
    parser.add_argument("--cases-dir", type=Path, default=CASES_DIR, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.k < 1:
        parser.error("--k must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.report.parent.mkdir(parents=True, exist_ok=True)
    # The terminal gets the table; the loop's and the tools' own logs go to a file beside the report.
    handler = logging.FileHandler(args.report.with_suffix(".log"), mode="w")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        return _main(args)
    finally:
        root.removeHandler(handler)
        handler.close()


def _main(args: argparse.Namespace) -> int:
    try:
        cases = load_cases(args.cases_dir, args.cases)
        operator = config_module.load() if args.live else None
    except (CaseError, PiDeployError) as error:
        print(f"eval: {getattr(error, 'message', None) or error}", file=sys.stderr)
        return 2
    trace_root = args.report.parent / "eval-traces"
    started = time.monotonic()
    try:
        with Site.open(trace_root) as site:
            print(
                f"eval: {len(cases)} case(s), {'live' if operator else 'replay'} mode, {site.where}",
                flush=True,
            )
            if operator is not None:
                return _live(cases, site, operator, args, started)
            return _replay(cases, site, args, started)
    except PiDeployError as error:
        print(f"eval: {error.message}", file=sys.stderr)
        return 2


def _replay(cases: list[dict[str, Any]], site: Site, args: argparse.Namespace, started: float) -> int:
    records = []
    for case in cases:
        record = run_case(case, site)
        if case.get("needs_review"):
            record.scores["completed"] = False
            record.problems.insert(
                0, "completed: the expectations were drafted by `eval record` and need review"
            )
        records.append(record)
        print(
            f"  {case['id']}: {'pass' if record.passed else 'FAIL'} ({record.figures.seconds + record.setup_s:.1f}s)",
            flush=True,
        )
    passed = sum(r.passed for r in records)
    wall = time.monotonic() - started
    print()
    print(replay_table(records))
    if passed < len(records):
        print()
        print(problems_text(records))
    summary = f"{passed} passed, {len(records) - passed} failed"
    print()
    print(f"{summary} in {wall:.1f}s (report: {args.report})")
    write_report(
        args.report,
        {
            "mode": "replay",
            "stack": site.where,
            "wall_s": round(wall, 2),
            "summary": {"passed": passed, "failed": len(records) - passed, "line": summary},
            "cases": [CaseSummary(r.case, [r]).to_dict() for r in records],
        },
    )
    return 0 if passed == len(records) else 1


def _live(
    cases: list[dict[str, Any]], site: Site, operator: Config, args: argparse.Namespace, started: float
) -> int:
    models = operator.models if operator.agent == "on" else ()
    for model in models:
        if not model.api_key:
            print(
                f"eval: warning: model {model.name} has no API key (set {model.api_key_env})", file=sys.stderr
            )
    summaries: list[CaseSummary] = []
    for case in cases:
        if not case.get("live", True):
            summaries.append(
                CaseSummary(case["id"], [], skipped="replay only (its fault is in the recorded model)")
            )
            continue
        runs = [run_case(case, site, attempt, operator) for attempt in range(1, args.k + 1)]
        summaries.append(CaseSummary(case["id"], runs))
        print(f"  {case['id']}: pass^{args.k} {'yes' if summaries[-1].pass_k else 'no'}", flush=True)
    ran = [s for s in summaries if not s.skipped]
    if not ran:
        print(
            "eval: none of these cases runs in live mode (their faults are in the recorded model)",
            file=sys.stderr,
        )
        return 2
    pass_k = sum(s.pass_k for s in ran) / len(ran) if ran else 0.0
    pass_1 = sum(s.pass_at_1 for s in ran) / len(ran) if ran else 0.0
    wall = time.monotonic() - started
    print()
    print(live_table(summaries, args.k))
    failing = [r for s in ran for r in s.runs if not r.passed]
    if failing:
        print()
        print(problems_text(failing))
    passed = sum(s.pass_k for s in ran)
    summary = f"{passed} passed, {len(ran) - passed} failed"
    verdict = "ok" if pass_k >= operator.eval_pass_threshold else "below"
    print()
    print(
        f"{summary}, {len(summaries) - len(ran)} skipped (a case passes when all {args.k} runs pass): "
        f"pass^{args.k} {pass_k:.2f}, "
        f"pass@1 {pass_1:.2f}; threshold {operator.eval_pass_threshold:.2f}: {verdict}; "
        f"chain {', '.join(m.name for m in models) or 'playbook only'}; {wall:.1f}s (report: {args.report})"
    )
    write_report(
        args.report,
        {
            "mode": "live",
            "k": args.k,
            "stack": site.where,
            "models": [m.name for m in models],
            "wall_s": round(wall, 2),
            "summary": {
                "passed": passed,
                "failed": len(ran) - passed,
                "skipped": len(summaries) - len(ran),
                "pass_k": round(pass_k, 4),
                "pass_at_1": round(pass_1, 4),
                "threshold": operator.eval_pass_threshold,
                "line": summary,
            },
            "cases": [s.to_dict() for s in summaries],
        },
    )
    return 0 if pass_k >= operator.eval_pass_threshold else 1


if __name__ == "__main__":
    sys.exit(main())

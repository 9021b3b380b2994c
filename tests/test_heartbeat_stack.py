"""The heartbeat on the real stack: Podman's engine, an embedded nginx, a real Postgres.

Instances are created through the tools, so the world is the one piDeploy
builds. Each test has its own namespace, nginx (stopped afterwards) and
database; its containers are removed at the end. Backoff is shown with an
injected clock, so no test waits for it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

import agent
import db
import drift
import heartbeat as hb
import instances
import models
import runtime
import tasks
import tools
from config import Config, ModelConfig
from engine import LABEL_INSTANCE, LABEL_NAMESPACE, Container, DockerEngine
from errors import RolledBack
from evals.llm_server import ReplayServer
from localio import free_port
from proxy import NginxProxy, proxy_from_config, render_map, route_key
from tests.conftest import ROOT, EngineOutage, make_config, nginx_binary, require_stack

pytestmark = pytest.mark.stack


class Clock:
    """Real time plus an offset the test moves forward."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds


def wait_for(what: str, check: Callable[[], bool], timeout: float = 10.0) -> None:
    limit = time.monotonic() + timeout
    while not check():
        if time.monotonic() > limit:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


@dataclass
class Stack:
    rt: tools.Runtime
    config: Config
    database_url: str
    engine: DockerEngine
    proxy: NginxProxy

    def ctx(self, user: str | None = "alice") -> tools.ToolContext:
        return tools.ToolContext.direct(self.config.traces, user, "test")

    def create(self, name: str) -> int:
        return int(tools.instance_create(self.rt, self.ctx(), name)["instance_id"])

    def heartbeat(self, **kwargs: Any) -> hb.Heartbeat:
        return hb.Heartbeat(self.rt, self.config, **kwargs)

    def row(self, iid: int) -> db.Row:
        row = self.rt.db.one("instance_get", id=iid)
        assert row is not None
        return row

    def events(self, iid: int) -> list[str]:
        rows = self.rt.db.all("event_list_for_instance", instance_id=iid, limit=200)
        return [r["kind"] for r in reversed(rows)]

    def rounds(self) -> list[db.Row]:
        return list(reversed(self.rt.db.all("heartbeat_round_recent", limit=100)))

    def containers(self) -> list[Container]:
        return self.engine.list({LABEL_NAMESPACE: self.config.namespace})

    def kill(self, iid: int, wait: bool = True) -> None:
        """SIGKILL the container's process from the host, as a crash or the OOM killer would.

        (Podman's kill API call can block for 20 s when the container is restarted under it.)
        """
        container_id = self.row(iid)["container_id"]
        os.kill(int(self.engine.api.inspect_container(container_id)["State"]["Pid"]), signal.SIGKILL)
        if wait:
            wait_for("the container to stop", lambda: not _running(self.engine.inspect(container_id)))

    def key(self, iid: int) -> str:
        return route_key(self.row(iid), self.config)

    def through_nginx(self, iid: int, key: str | None = None) -> int:
        """GET /healthz through nginx at the instance's route (or at `key`)."""
        return self.get(iid, "healthz", key)[0]

    def get(self, iid: int, path: str, key: str | None = None) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(
                self.proxy.url_for(key or self.key(iid)) + path, timeout=3
            ) as response:
                return int(response.status), response.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, ""
        except OSError:
            return 0, ""

    def with_settings(self, **changes: Any) -> None:
        self.config = dataclasses.replace(self.config, **changes)
        self.rt = dataclasses.replace(self.rt, config=self.config)

    def env(self, **settings: str) -> dict[str, str]:
        """The environment of a piDeploy process on this test's database, engine and nginx."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("PIDEPLOY_")}
        env.update(
            DATABASE_URL=self.database_url,
            PIDEPLOY_HOME=str(self.config.home),
            PIDEPLOY_NAMESPACE=self.config.namespace,
            PIDEPLOY_NGINX_LISTEN=self.config.nginx_listen,
            PIDEPLOY_AGENT="off",
            PIDEPLOY_LOG_FORMAT="text",
            **{"PIDEPLOY_" + k.upper(): v for k, v in settings.items()},
        )
        return env

    def cli(self, *args: str, **settings: str) -> subprocess.CompletedProcess[str]:
        """`pideploy.py heartbeat --once ...` in its own process."""
        command = [sys.executable, str(ROOT / "pideploy.py"), "heartbeat", "--once", *args]
        return subprocess.run(
            command,
            env=self.env(**settings),
            capture_output=True,
            text=True,
            timeout=60,
            cwd=self.config.home,
        )


def _running(container: Container | None) -> bool:
    return container is not None and container.running


@pytest.fixture
def stack(
    docker_engine: DockerEngine, database: db.Database, database_url: str, tmp_path: Path
) -> Iterator[Stack]:
    require_stack("nginx", nginx_binary() is not None, "apt-get install nginx")
    low = random.randrange(30000, 32500)  # not the default range, which other test runs here use at once
    config = make_config(
        tmp_path,
        namespace=f"hb{uuid.uuid4().hex[:8]}",
        port_range=f"{low}-{low + 199}",
        agent="off",
        health_timeout=30,  # a bound, not a wait: a loaded CI machine can take seconds to start one
        stop_timeout=2,
        nginx_bin=str(nginx_binary()),
        nginx_listen=f"127.0.0.1:{free_port()}",
    )
    proxy = proxy_from_config(config)
    proxy.ensure_running()
    world = Stack(
        tools.Runtime(config, database, docker_engine, proxy), config, database_url, docker_engine, proxy
    )
    try:
        yield world
    finally:
        for container in world.containers():
            docker_engine.remove(container.id)
        proxy.close(stop=True)


def _trace(report: drift.RoundReport) -> dict[str, Any]:
    assert report.trace_file
    data: dict[str, Any] = json.loads(Path(report.trace_file).read_text())
    return data


# ---------------------------------------------------------------------------


def test_a_killed_container_is_recovered_and_routed_again(stack: Stack) -> None:
    iid = stack.create("alpha")
    container_id = stack.row(iid)["container_id"]
    stack.kill(iid)
    assert stack.through_nginx(iid) != 200

    report = stack.heartbeat().round("cron")

    assert [(d.kind, d.instance_id) for d in report.drifts] == [("container_exited", iid)]
    assert report.drifts[0].evidence["exit_code"] == 137
    assert report.drifts[0].evidence["oom_killed"] is False
    assert report.repaired == report.drifts and report.ok
    assert [(a["tool"], a["ok"]) for a in report.actions] == [("instance_start", True)]
    assert stack.through_nginx(iid) == 200
    row = stack.row(iid)
    assert (row["status"], row["container_id"], row["recovery_failures"]) == ("running", container_id, 1)
    assert row["healthy_since"] is not None
    assert stack.events(iid)[-2:] == ["started", "recovered"]
    trace = _trace(report)
    assert trace["kind"] == "heartbeat" and trace["outcome"] == "succeeded"
    assert trace["extra"]["drifts"][0]["kind"] == "container_exited"
    assert trace["extra"]["actions"][0]["tool"] == "instance_start"
    assert trace["extra"]["cost_usd"] == 0
    assert Path(report.agent_runs[0]["trace_file"]).is_file()  # the playbook ran in the round's trace
    last = stack.rounds()[-1]
    assert (last["source"], last["drifts"], last["repaired"], last["unrepaired"]) == ("cron", 1, 1, 0)
    assert last["trace_file"] == report.trace_file


def test_serve_recovers_on_the_die_event_without_waiting_for_the_round(stack: Stack) -> None:
    iid = stack.create("alpha")
    beat = stack.heartbeat()  # interval 60 s: after the first round, only an event can trigger one
    stop = threading.Event()
    loop = threading.Thread(target=beat.run, args=(stop,), daemon=True)
    loop.start()
    try:
        wait_for("the first full round", lambda: len(stack.rounds()) >= 1)
        stack.kill(iid, wait=False)  # the heartbeat may bring it back before a poll sees it down
        wait_for("the recovery", lambda: "recovered" in stack.events(iid), timeout=15)
        assert stack.through_nginx(iid) == 200
    finally:
        stop.set()
        loop.join(timeout=15)
    assert not loop.is_alive()
    event_rounds = [r for r in stack.rounds() if r["source"] == "event"]
    assert event_rounds and event_rounds[0]["repaired"] == 1
    assert [r["source"] for r in stack.rounds()].count("serve") == 1  # the event did it, not a round


def test_a_container_that_crashes_at_every_start_gets_three_recoveries_then_error(stack: Stack) -> None:
    iid = stack.create("alpha")
    (Path(stack.row(iid)["storage_path"]) / "crash_at_start").touch()  # the gateway's fault contract
    stack.kill(iid)
    clock = Clock()
    beat = stack.heartbeat(clock=clock)

    first = beat.round("cron")
    assert [a["tool"] for a in first.actions] == ["instance_start"] and not first.ok
    assert first.retry_at[iid] == pytest.approx(clock() + 5, abs=2)  # recovery_backoff
    waiting = beat.round("cron")
    assert waiting.actions == [] and not waiting.ok  # not in a tight loop
    clock.advance(5)
    second = beat.round("cron")
    assert [a["tool"] for a in second.actions] == ["instance_start"]
    assert stack.row(iid)["recovery_failures"] == 2
    clock.advance(10)
    third = beat.round("cron")

    assert [a["tool"] for a in third.actions] == ["instance_start", "mark_error"]
    assert third.marked_error == [iid] and not third.ok
    row = stack.row(iid)
    assert row["status"] == "error"
    assert "3 consecutive recoveries did not hold" in row["last_error"]
    assert "exit code 3" in row["last_error"]
    assert row["recovery_failures"] == 0  # an operator's start begins a new streak
    events = stack.events(iid)
    assert (events.count("start_failed"), events.count("recovery_failed"), events.count("marked_error")) == (
        3,
        3,
        1,
    )
    alerts = [json.loads(line) for line in stack.config.alerts.read_text().splitlines()]
    assert [(a["rule"], a["instance_id"]) for a in alerts] == [("instance_error", iid)]
    assert stack.through_nginx(iid) != 200 and stack.key(iid) not in stack.proxy.routes()

    clock.advance(3600)
    after = beat.round("cron")
    assert after.drifts == [] and after.ok  # left alone until an operator starts it
    assert stack.events(iid).count("start_failed") == 3


def test_a_container_removed_by_hand_is_recreated(stack: Stack) -> None:
    iid = stack.create("alpha")
    old = stack.row(iid)["container_id"]
    stack.engine.remove(old)

    report = stack.heartbeat().round("cron")

    assert [(d.kind, d.instance_id) for d in report.drifts] == [("container_missing", iid)]
    assert report.repaired == report.drifts
    row = stack.row(iid)
    assert row["status"] == "running" and row["container_id"] != old
    assert row["recovery_failures"] == 1  # counted as a recovery
    assert stack.events(iid)[-3:] == ["container_recreated", "started", "recovered"]
    assert stack.through_nginx(iid) == 200


def test_a_crashed_instance_whose_port_was_taken_meanwhile_moves_to_a_new_port(stack: Stack) -> None:
    iid = stack.create("alpha")
    old_port = stack.row(iid)["port"]
    stack.kill(iid)
    with socket.socket() as squatter:  # another program took the port while the instance was down
        squatter.bind(("127.0.0.1", old_port))
        squatter.listen()

        report = stack.heartbeat().round("cron")

        assert report.repaired == report.drifts and report.ok
        row = stack.row(iid)
        assert row["status"] == "running" and row["port"] != old_port
        assert stack.proxy.routes()[stack.key(iid)] == row["port"]
        assert stack.through_nginx(iid) == 200
        assert stack.events(iid)[-4:] == ["port_reserved", "container_recreated", "started", "recovered"]


def test_an_nginx_map_edited_by_hand_is_repaired(stack: Stack) -> None:
    alpha, beta = stack.create("alpha"), stack.create("beta")
    routes = stack.proxy.routes()
    edited = {stack.key(alpha): routes[stack.key(alpha)], "ghost": 1025}  # beta's line deleted, a stray added
    stack.proxy.map_path.write_text(render_map(edited, "edited-by-hand"))
    os.kill(int((stack.config.home / "nginx" / "nginx.pid").read_text()), signal.SIGHUP)  # nginx -s reload
    # Every worker serves the edited map (an old one may answer for a moment after a reload).
    wait_for(
        "nginx to serve the edited map",
        lambda: stack.through_nginx(beta) != 200 and not stack.proxy.problem(),
    )

    report = stack.heartbeat().round("cron")

    assert sorted((d.kind, d.instance_id) for d in report.drifts) == sorted(
        [("route_missing", beta), ("route_stale", None)]
    )
    assert [a["tool"] for a in report.actions] == ["nginx_sync"] and report.ok
    assert stack.proxy.routes() == {
        stack.key(alpha): routes[stack.key(alpha)],
        stack.key(beta): routes[stack.key(beta)],
    }
    assert stack.through_nginx(beta) == 200 and stack.through_nginx(alpha) == 200
    assert stack.events(beta)[-1] == "drift_repaired"
    stray = [e for e in stack.rt.db.all("event_list_all", limit=50) if e["instance_id"] is None]
    assert [(e["kind"], e["detail"]["drift"], e["detail"]["evidence"]["route"]) for e in stray] == [
        ("drift_repaired", "route_stale", "ghost")
    ]


def test_routes_from_before_route_tokens_are_replaced(stack: Stack) -> None:
    # An upgrade finds `/i/<id>/` routes in the map: sequential ids anyone can walk.
    alpha, beta = stack.create("alpha"), stack.create("beta")
    old_form = {str(iid): stack.row(iid)["port"] for iid in (alpha, beta)}
    stack.proxy.map_path.write_text(render_map(old_form, "before-the-upgrade"))
    os.kill(int((stack.config.home / "nginx" / "nginx.pid").read_text()), signal.SIGHUP)
    wait_for("nginx to serve the old map", lambda: stack.through_nginx(alpha, str(alpha)) == 200)

    report = stack.heartbeat().round("cron")

    assert sorted((d.kind, d.instance_id) for d in report.drifts) == sorted(
        [(kind, iid) for iid in (alpha, beta) for kind in ("route_missing", "route_stale")]
    )
    assert report.ok and stack.proxy.routes() == {stack.key(i): stack.row(i)["port"] for i in (alpha, beta)}
    for iid in (alpha, beta):
        assert stack.through_nginx(iid) == 200
        assert stack.through_nginx(iid, str(iid)) == 404  # the old URL answers nothing
        assert stack.through_nginx(iid, f"{iid}-{'0' * 32}") == 404  # nor does a wrong token
    # The drift report (events, the trace) names the routes, never their tokens.
    tokens = [stack.row(i)["route_token"] for i in (alpha, beta)]
    recorded = json.dumps([e["detail"] for e in stack.rt.db.all("event_list_all", limit=50)], default=str)
    recorded += Path(report.trace_file or "").read_text()
    assert not [token for token in tokens if token in recorded]


class _NeverCalled:
    name = "never"

    def __init__(self) -> None:
        self.calls = 0

    def complete(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]], max_tokens: int, timeout: float
    ) -> models.Completion:
        self.calls += 1
        raise AssertionError("a healthy round must not call a model")


def test_a_targeted_round_lists_only_its_instances_containers(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A `die` event's round must not pay for the whole fleet: at 200 instances, listing every
    # container is most of the round.
    alpha, beta = stack.create("alpha"), stack.create("beta")
    stack.kill(alpha)
    listed: list[dict[str, str]] = []
    real_list = stack.engine.list

    def spy(labels: dict[str, str]) -> Any:
        listed.append(dict(labels))
        return real_list(labels)

    monkeypatch.setattr(stack.engine, "list", spy)

    report = stack.heartbeat().round("event", only={alpha})

    assert [d.kind for d in report.repaired] == ["container_exited"] and report.ok
    assert report.engine_calls == 2  # its list, and an inspect of the dead container for its OOM flag
    assert listed and all(labels.get(LABEL_INSTANCE) == str(alpha) for labels in listed), listed
    assert stack.through_nginx(alpha) == 200 and stack.through_nginx(beta) == 200


def test_a_healthy_fleet_costs_one_engine_call_and_no_model_call(stack: Stack) -> None:
    for name in ("alpha", "beta", "gamma"):
        stack.create(name)
    model = _NeverCalled()
    config = ModelConfig("never", "http://127.0.0.1:9/v1", "never", "NEVER_KEY", output_usd_per_mtok=1.0)
    limits = agent.Limits.from_config(stack.config, heartbeat=True)
    chain = models.Chain([models.Link(model, config)], models.MemoryCooldowns(), limits)
    before = dict(stack.engine.calls)

    report = stack.heartbeat(chain=chain).round("cron")

    assert report.drifts == [] and report.ok
    assert (model.calls, report.model_calls, report.cost_usd, report.agent_runs) == (0, 0, 0.0, [])
    assert {k: v - before.get(k, 0) for k, v in stack.engine.calls.items() if v != before.get(k, 0)} == {
        "list": 1
    }
    assert report.engine_calls == 1
    trace = _trace(report)
    assert trace["summary"]["model_calls"] == 0 and trace["transcript"] == []
    assert trace["extra"]["drifts"] == [] and trace["outcome"] == "succeeded"
    assert stack.rounds()[-1]["drifts"] == 0


def test_overlapping_once_and_serve_rounds_do_not_double_act(stack: Stack) -> None:
    iid = stack.create("alpha")
    # A round in progress elsewhere holds the lock: --once waits a bounded time, reports skipped, exits 0.
    with stack.rt.db.pool.connection() as conn:
        assert stack.rt.db.one("heartbeat_try_lock", conn, key=hb._HEARTBEAT_LOCK)["ok"]  # type: ignore[index]
        skipped = stack.cli("--format", "json", heartbeat_interval="1")
        stack.kill(iid)
        # Now a serve round and a cron round both want the lock while it is held.
        serve: list[drift.RoundReport] = []
        waiter = threading.Thread(target=lambda: serve.append(stack.heartbeat().round("serve")))
        waiter.start()
        cron = subprocess.Popen(
            [sys.executable, str(ROOT / "pideploy.py"), "heartbeat", "--once", "--format", "json"],
            env=stack.env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=stack.config.home,  # no operator's pideploy.toml
        )
        time.sleep(2)  # let the cron process reach the lock too
        stack.rt.db.one("heartbeat_unlock", conn, key=hb._HEARTBEAT_LOCK)
    out, err = cron.communicate(timeout=60)
    waiter.join(timeout=60)

    assert skipped.returncode == 0, skipped.stderr
    assert json.loads(skipped.stdout)["skipped"] is True
    assert cron.returncode == 0, err
    reports = [serve[0].to_dict(), json.loads(out)]
    assert sorted(len(r["repaired"]) for r in reports) == [0, 1]  # one acted; the other found nothing
    assert not any(r["skipped"] for r in reports)
    events = stack.events(iid)
    assert (events.count("started"), events.count("recovered")) == (1, 1)
    assert stack.through_nginx(iid) == 200


def test_once_prints_what_it_found_and_exits_1_while_drift_is_left(stack: Stack) -> None:
    iid = stack.create("alpha")
    orphan = stack.engine.create(
        runtime.container_spec(
            stack.rt, {**stack.row(iid), "id": 999_999}, stack.config.image, free_port(), {}
        )
    )
    unlabelled = stack.engine.create(
        dataclasses.replace(
            runtime.container_spec(stack.rt, stack.row(iid), stack.config.image, free_port(), {}),
            name=f"pideploy-{stack.config.namespace}-junk",
            labels={LABEL_NAMESPACE: stack.config.namespace, LABEL_INSTANCE: "junk"},
        )
    )
    stack.kill(iid)

    first = stack.cli()
    assert first.returncode == 1, first.stderr  # the unlabelled container is reported, never removed
    assert "repaired    container_exited" in first.stdout
    assert "repaired    orphan_container     instance 999999" in first.stdout
    assert "UNREPAIRED  orphan_container" in first.stdout and "reported only" in first.stdout
    assert "action      instance_start" in first.stdout
    assert "action      remove_stray_container" in first.stdout
    assert [c.id for c in stack.containers() if c.id in (orphan.id, unlabelled.id)] == [unlabelled.id]
    assert stack.events(999_999) == ["stray_container_removed"]

    stack.engine.remove(unlabelled.id)
    clean = stack.cli("--format", "json")
    assert clean.returncode == 0, clean.stderr
    assert json.loads(clean.stdout)["drifts"] == []


def _old_file(path: Path, age_days: float) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("{}")
    then = time.time() - age_days * 86_400
    os.utime(path, (then, then))
    return path


def test_retention_prunes_old_traces_and_rounds_at_most_hourly(stack: Stack) -> None:
    config = dataclasses.replace(stack.config, retention_days=1)
    traces = config.traces
    old_trace = _old_file(traces / "20200101T000000-task-7-abcdef.json", 3)
    old_temp = _old_file(traces / ".20200101T000000-task-8-abcdef.json.k2j4_x9a.tmp", 3)
    fresh_trace = _old_file(traces / "20200101T000000-heartbeat-none-123456.json", 0.5)
    operators_file = _old_file(traces / "README.txt", 3)  # not a trace: never touched
    marker = str(traces / "old-round-marker.json")
    stack.rt.db.execute(
        "heartbeat_round_insert",
        started_at=datetime.fromtimestamp(time.time() - 3 * 86_400, UTC),
        duration_s=0.1,
        drifts=0,
        repaired=0,
        unrepaired=0,
        cost_usd=0.0,
        source="cron",
        trace_file=marker,
    )

    beat = hb.Heartbeat(stack.rt, config)
    report = beat.round("cron")
    assert report.trace_file is not None
    assert not old_trace.exists() and not old_temp.exists()
    assert fresh_trace.exists() and operators_file.exists() and Path(report.trace_file).exists()
    kept = [r["trace_file"] for r in stack.rounds()]
    assert marker not in kept and report.trace_file in kept

    # The same process prunes again only an hour later; a new one (cron's --once) at once.
    again = _old_file(traces / "20200101T000000-task-9-abcdef.json", 3)
    beat.round("serve")
    assert again.exists()
    hb.Heartbeat(stack.rt, config).round("cron")
    assert not again.exists()

    # 0 keeps everything.
    forever = _old_file(traces / "20200101T000000-task-10-abcdef.json", 3000)
    hb.Heartbeat(stack.rt, dataclasses.replace(config, retention_days=0)).round("cron")
    assert forever.exists()


# ---------------------------------------------------------------------------
# the agent path, with the replay model server, and its $0.05 cap
# ---------------------------------------------------------------------------


def _replay_chain(stack: Stack, server: ReplayServer, usd_per_mtok: float) -> models.Chain:
    model = ModelConfig(
        "replay",
        server.url,
        "replay-model",
        "REPLAY_KEY",
        input_usd_per_mtok=usd_per_mtok,
        output_usd_per_mtok=usd_per_mtok,
        api_key="test",
    )
    limits = agent.Limits.from_config(stack.config, heartbeat=True)
    return models.Chain([models.Link(models.OpenAIChat(model), model)], models.MemoryCooldowns(), limits)


START = {
    "name": "instance_start",
    "arguments": {"instance_id": "{{task.params.plan.0.arguments.instance_id}}"},
}
REPORT = {"name": "report_result", "arguments": {"success": True, "action": "restarted the crashed instance"}}


def test_the_agent_repairs_under_the_heartbeat_cost_cap(stack: Stack) -> None:
    iid = stack.create("alpha")
    script = {
        "conversations": [
            {
                "match": '"type": "heartbeat"',
                "turns": [
                    {"tool_calls": [START], "usage": {"prompt_tokens": 8000, "completion_tokens": 40}},
                    {"tool_calls": [REPORT], "usage": {"prompt_tokens": 8400, "completion_tokens": 20}},
                ],
            }
        ]
    }
    clock = Clock()
    with ReplayServer(script) as server:
        stack.kill(iid)
        cheap = stack.heartbeat(chain=_replay_chain(stack, server, 0.0), clock=clock).round("cron")
        assert cheap.repaired == cheap.drifts and cheap.ok
        assert cheap.model_calls == 2 and len(cheap.agent_runs) == 1
        assert cheap.agent_runs[0]["status"] == "succeeded" and not cheap.agent_runs[0]["playbook"]

        # At $5 per million tokens the model's first turn spends $0.0402; the budget's estimate
        # for the next call crosses $0.05, so the run stops before it and the plan finishes as
        # a playbook.
        clock.advance(stack.config.recovery_backoff)  # past the first recovery's backoff
        stack.kill(iid)
        capped = stack.heartbeat(chain=_replay_chain(stack, server, 5.0), clock=clock).round("cron")
    assert capped.repaired == capped.drifts and capped.ok
    assert capped.model_calls == 1
    assert capped.cost_usd == pytest.approx(0.0402) and capped.cost_usd <= stack.config.heartbeat_cost_cap
    assert [(r["error_class"], r["playbook"]) for r in capped.agent_runs] == [
        ("cost_cap", False),
        (None, True),
    ]
    assert [a["tool"] for a in capped.actions] == [
        "instance_start",
        "instance_start",
    ]  # the model's, the plan's
    assert stack.events(iid).count("recovered") == 2
    assert stack.through_nginx(iid) == 200
    assert stack.rounds()[-1]["cost_usd"] == pytest.approx(0.0402)


def test_a_die_event_round_restarts_without_asking_the_model(stack: Stack) -> None:
    iid = stack.create("alpha")
    with ReplayServer({"conversations": []}) as server:  # any model call would be a replay error
        beat = stack.heartbeat(chain=_replay_chain(stack, server, 5.0), clock=Clock())
        stack.kill(iid)
        report = beat.round("event", only={iid})
        assert server.requests == []
    assert report.repaired == report.drifts and report.ok
    assert (report.model_calls, report.cost_usd) == (0, 0.0)
    assert [r["playbook"] for r in report.agent_runs] == [True]
    assert stack.through_nginx(iid) == 200


# ---------------------------------------------------------------------------
# Faults: an engine outage mid-create and mid-update, a create killed on its
# last attempt, a task at work, a dead nginx
# ---------------------------------------------------------------------------

V2 = "localhost/pideploy-gateway:v2"
NEVER_HEALTHY = {"env": {"GATEWAY_HEALTHZ_DELAY": "600"}}


@pytest.fixture
def outage(stack: Stack, tmp_path: Path) -> EngineOutage:
    """The stack's tools and heartbeat on an engine that can go away (stack.engine stays the real one)."""
    wrapped = EngineOutage(stack.engine, tmp_path)
    stack.rt = dataclasses.replace(stack.rt, engine=wrapped)
    stack.with_settings(health_timeout=3)
    return wrapped


def test_an_engine_outage_mid_create_is_undone_and_the_next_round_removes_what_is_left(
    stack: Stack, outage: EngineOutage
) -> None:
    # The engine goes away once the container runs: at the health wait's first look at it.
    outage.after("inspect", 0)
    with pytest.raises(RolledBack) as failed:
        tools.instance_create(stack.rt, stack.ctx(), "cut", NEVER_HEALTHY)
    message = failed.value.message
    assert message.startswith("create failed at step health: /healthz did not answer 200 within 3s")
    assert "not undone: remove container" in message and "container engine unreachable" in message
    [row] = stack.rt.db.all("instance_list_for_user", user_id="alice")
    iid = int(row["id"])
    # The row is settled (not `creating` until the stuck timeout) and says what is left.
    assert (row["status"], row["container_id"], row["port"], row["storage_path"]) == (
        "error",
        None,
        None,
        None,
    )
    assert (
        row["last_error"].startswith("create failed at health")
        and "not undone: remove container" in row["last_error"]
    )
    assert not runtime.storage_for(stack.rt, iid).exists()
    [event] = [
        e
        for e in stack.rt.db.all("event_list_for_instance", instance_id=iid, limit=50)
        if e["kind"] == "create_failed"
    ]
    assert "container engine unreachable" in event["detail"]["not_undone"][0]
    [left] = stack.containers()
    assert left.running and left.labels[LABEL_INSTANCE] == str(iid)

    outage.end()
    report = stack.heartbeat().round("cron")

    assert [(d.kind, d.instance_id) for d in report.drifts] == [("stray_container", iid)]
    assert report.ok and [(a["tool"], a["ok"]) for a in report.actions] == [("remove_stray_container", True)]
    assert stack.containers() == []
    assert stack.row(iid)["status"] == "error"
    assert stack.events(iid)[-1] == "stray_container_removed"


@pytest.mark.parametrize(
    ("cut_at", "failed_step"),
    [
        ("remove", "health"),  # the new container never answers; the engine goes as the rollback starts
        ("create", "container"),  # the engine goes before the new container is made
        ("rename", "keep_old"),  # ... before the old one is put aside (whether it was is unknown)
    ],
)
def test_an_engine_outage_mid_update_is_rolled_back_by_the_next_round(
    stack: Stack, outage: EngineOutage, cut_at: str, failed_step: str
) -> None:
    iid = stack.create("alpha")
    before = stack.row(iid)
    name = runtime.container_name(stack.config, iid)
    outage.after(cut_at, 0)
    with pytest.raises(RolledBack) as failed:
        tools.instance_update(stack.rt, stack.ctx(), iid, image=V2, config=NEVER_HEALTHY)
    message = failed.value.message
    assert message.startswith(f"update failed at step {failed_step}:"), message
    assert "rollback incomplete, not undone:" in message and "container engine unreachable" in message
    assert (
        "restore the previous container" in message and "a heartbeat round finishes the rollback" in message
    )
    row = stack.row(iid)
    # Left `updating` with what is left to do; still on the old container, image and route.
    assert (row["status"], row["container_id"], row["image"]) == (
        "updating",
        before["container_id"],
        before["image"],
    )
    assert "restore the previous container" in row["last_error"]
    assert stack.proxy.routes() == {stack.key(iid): before["port"]}

    outage.end()
    clock = Clock()
    clock.advance(drift.INTERRUPTED_GRACE + 1)
    report = stack.heartbeat(clock=clock).round("cron")

    assert [(d.kind, d.instance_id) for d in report.drifts] == [("interrupted_transition", iid)]
    assert report.ok and [(a["tool"], a["ok"]) for a in report.actions] == [("instance_rollback", True)]
    row = stack.row(iid)
    assert (row["status"], row["container_id"], row["image"], row["last_error"]) == (
        "running",
        before["container_id"],
        before["image"],
        None,
    )
    [only] = stack.containers()
    assert (only.id, only.name, only.running) == (before["container_id"], name, True)
    assert stack.get(iid, "version") == (200, "v1")
    assert stack.events(iid)[-3:] == ["update_rollback_incomplete", "update_rolled_back", "drift_repaired"]


def test_a_create_whose_task_gave_up_leaves_a_container_the_round_removes(stack: Stack) -> None:
    # What task_fail_exhausted leaves when the worker running a create's last attempt died
    # after starting the container: the row `error` (recording no container), the container up.
    queue = tasks.Queue(stack.rt.db, max_attempts=1)
    row, submitted = queue.submit_create("alice", "lost", None, stack.config.image, None)
    claimed = queue.claim("dead-worker", lease_s=0.5)
    assert claimed is not None and claimed["id"] == submitted.task["id"]
    ctx = tools.ToolContext.direct(stack.config.traces, "alice", "test", int(row["id"]))
    row = instances.allocate_port(stack.rt, ctx, row)
    assert row["port"] is not None
    lost = runtime.create_and_start(
        stack.rt, ctx, runtime.container_spec(stack.rt, row, row["image"], row["port"], {})
    )
    time.sleep(0.6)
    queue.sweep()
    assert queue.get(submitted.task["id"])["status"] == "failed"
    assert (stack.row(row["id"])["status"], stack.row(row["id"])["container_id"]) == ("error", None)

    report = stack.heartbeat().round("cron")

    assert [(d.kind, d.instance_id, d.evidence["container_id"]) for d in report.drifts] == [
        ("stray_container", row["id"], lost.id)
    ]
    assert report.ok and stack.containers() == []
    assert stack.events(row["id"])[-1] == "stray_container_removed"


def test_a_round_during_an_update_leaves_the_instance_and_its_route_to_the_update(stack: Stack) -> None:
    iid = stack.create("alpha")
    port = stack.row(iid)["port"]
    outcome: dict[str, Any] = {}

    def update() -> None:
        try:
            slow = {"env": {"GATEWAY_HEALTHZ_DELAY": "3"}}
            outcome["result"] = tools.instance_update(stack.rt, stack.ctx(), iid, image=V2, config=slow)
        except Exception as error:  # reported by the assertion below
            outcome["error"] = error

    updater = threading.Thread(target=update)
    updater.start()
    wait_for("the update's health wait", lambda: len(stack.containers()) == 2, timeout=15)
    clock = Clock()
    clock.advance(3600)  # long past every grace and timeout: only "busy" keeps the round away
    rounds, routes = [], []
    while updater.is_alive():
        rounds.append(stack.heartbeat(clock=clock).round("cron"))
        routes.append(stack.proxy.routes().get(stack.key(iid)))
    updater.join()

    assert "error" not in outcome, outcome
    assert rounds and all(r.drifts == [] and r.actions == [] for r in rounds), [r.to_dict() for r in rounds]
    assert set(routes) == {port}  # never removed, never flapping
    assert stack.get(iid, "version") == (200, "v2")


def test_a_crashed_instance_with_a_queued_task_is_left_to_that_task(stack: Stack) -> None:
    iid = stack.create("alpha")
    stack.kill(iid)
    tasks.Queue(stack.rt.db).submit_action("alice", "instance_stop", iid)

    report = stack.heartbeat().round("cron")

    assert report.drifts == [] and report.actions == []
    assert not _running(stack.engine.inspect(stack.row(iid)["container_id"]))
    assert "started" not in stack.events(iid)[1:]


def _nginx_master(stack: Stack) -> int:
    return int((stack.config.home / "nginx" / "nginx.pid").read_text())


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL])
def test_a_dead_nginx_is_started_again_and_reported(stack: Stack, signum: int) -> None:
    iid = stack.create("alpha")
    master = _nginx_master(stack)
    os.kill(master, signum)  # SIGKILL leaves its workers serving the old map, holding the port
    wait_for("the master to die", lambda: not NginxProxy._alive(master))

    report = stack.heartbeat().round("cron")

    assert [(d.kind, d.instance_id) for d in report.drifts] == [("nginx_down", None)]
    problem = report.drifts[0].evidence["problem"]
    assert "has no master process" in problem
    assert ("orphaned workers" in problem) == (signum == signal.SIGKILL)
    assert report.ok and [(a["tool"], a["ok"]) for a in report.actions] == [("nginx_sync", True)]
    assert _nginx_master(stack) != master and stack.through_nginx(iid) == 200
    beta = stack.create("beta")  # the new master takes new routes
    assert stack.through_nginx(beta) == 200
    [line] = [json.loads(line) for line in stack.config.alerts.read_text().splitlines()]
    assert (line["rule"], line["repaired"], line["severity"]) == ("nginx_down", True, "warning")
    nginx_events = [e for e in stack.rt.db.all("event_list_all", limit=50) if e["instance_id"] is None]
    assert [(e["kind"], e["detail"]["drift"]) for e in nginx_events] == [("drift_repaired", "nginx_down")]
    assert stack.heartbeat().round("cron").drifts == []


def test_serve_finds_a_dead_nginx_between_rounds(stack: Stack) -> None:
    iid = stack.create("alpha")
    beat = stack.heartbeat()  # interval 60 s: after the first round, only the quick look finds nginx
    stop = threading.Event()
    loop = threading.Thread(target=beat.run, args=(stop,), daemon=True)
    loop.start()
    try:
        wait_for("the first full round", lambda: len(stack.rounds()) >= 1)
        master = _nginx_master(stack)
        workers = Path(f"/proc/{master}/task/{master}/children").read_text().split()
        for pid in (master, *map(int, workers)):
            os.kill(pid, signal.SIGKILL)
        assert stack.through_nginx(iid) == 0
        wait_for(
            "nginx to be started again",
            lambda: stack.through_nginx(iid) == 200,
            timeout=hb.NGINX_CHECK_INTERVAL + 10,
        )
    finally:
        stop.set()
        loop.join(timeout=15)
    assert [r["source"] for r in stack.rounds()] == ["serve", "serve"] and stack.rounds()[-1]["repaired"] == 1

"""The heartbeat: keep the database, the container engine and nginx consistent.

One round is four steps, each small and separately testable:

1. `Heartbeat.observe`: ONE query of the busy instances (an unfinished task is
   about them, or someone holds their lock), ONE engine list call for every
   container labelled with this namespace (a round about a few instances lists
   just theirs), ONE query of the instance table, the live nginx route map and
   whether nginx serves it (one GET), and a concurrent, bounded `GET /healthz`
   of each running instance that is not busy.
2. `diff(observation, config)`: pure; the drifts, each with its evidence.
3. `plan(drifts, rows, now, config)`: pure; the deterministic repair steps,
   with the recovery rules applied (backoff, give up after N, never start a
   stopped instance). With no step to take the round makes no model call at
   all. Otherwise the agent gets the drift report, the plan and the repair
   tools under the heartbeat's cost cap; when the model chain is unavailable
   or a cap is reached, the plan runs as a playbook instead.
4. Record: the drifted instances are observed AGAIN (the model's own report is
   never trusted) to tell repaired from unrepaired; recovery counters, events,
   a `heartbeat_round` row, alert lines and the round's trace are written.

After a round, at most hourly (and on every `--once`), retention deletes trace
files and `heartbeat_round` rows older than `retention_days`.

Recovery rules
--------------
- `recovery_failures` counts the recoveries of the current streak. A recovery
  only ends the streak once the instance has stayed healthy for
  `healthy_reset` seconds; a crash before that makes it a failed one. (So a
  container that answers once and dies ten seconds later is not restarted in
  a loop forever.) Between attempts the heartbeat waits
  min(recovery_backoff_max, recovery_backoff * 2**(failures-1)) seconds
  (`next_recovery_at`).
- After `recovery_max_failures` recoveries that did not hold, the instance is
  marked `error` (mark_error, with the reason), an alert line is written
  (rule `instance_error`) and its counters are cleared: the heartbeat never
  touches an `error` instance again, and an operator's start begins a new
  streak.
- A container removed by hand while its row says `running` is RECREATED by
  instance_start (same image, port and storage), counted as a recovery like a
  crash.
- A user's stop is respected: only `running` rows are recovered; instance_start
  in a system context re-reads the row under the instance's lock and refuses
  if it is no longer running (a stop or an update won the race), which the
  round treats as nothing to do.
- A busy instance is its task's: one that an unfinished task (queued or running) is about,
  or whose per-instance lock someone holds, gets no drift at all: no restart, no stop, no
  route change, no stray removal. (tools.wanted_routes keeps an updating instance's live
  route for every route sync, so no task flaps it either.)
- A create or update left `creating`/`updating` with no task and no lock holder (its task
  died on its last attempt, or its rollback could not reach the engine) is
  `interrupted_transition`: instance_rollback undoes the create (error) or rolls the update
  back to the previous container, at once, not after the stuck timeout. A `deleting` one is
  still marked error after `stuck_timeout` (the heartbeat never deletes).
- Containers labelled with this namespace that no row expects are removed
  (remove_stray_container, which checks again under the instance's lock): an
  `orphan_container` has no row (its instance was deleted); a `stray_container` is not the
  one its row records (a leftover of a create or update that died half-way, an `-old`
  container an update could not remove, a container of a create whose task gave up). The
  recorded container of an `error` row is kept for the operator; a container with no
  instance label is only reported.
- nginx must serve the live route map (proxy.problem): `nginx_down` is repaired by
  nginx_sync, which starts the embedded nginx again (an external one is reloaded), with an
  `nginx_down` alert and an event. nginx sends no events, so `run` also looks every
  NGINX_CHECK_INTERVAL seconds between rounds and starts a full round when it is down
  (not again after a round that could not repair it: the interval paces those).
- The fast path: a round triggered by a `die` event whose only steps are
  `instance_start` runs the plan as a playbook, with no model call, so a crash
  is repaired in about half a second whatever the model's latency. Interval
  and cron rounds (and event rounds with anything else to do) go to the agent.

Overlapping rounds
------------------
Every round runs under one Postgres advisory lock (`heartbeat_try_lock`), so
a cron `heartbeat --once` and the rounds inside `serve` (in any process on the
same database) never act at once. A round that finds the lock taken polls for
up to `lock_wait` seconds (by default half the heartbeat interval, at most 30:
much longer than a healthy round, about one repair), then returns a report
with `skipped=True`: whoever holds the lock is doing the same work, so
`--once` exits 0.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import agent
import models
import tools
from config import Config
from db import Row
from engine import LABEL_INSTANCE, LABEL_NAMESPACE, Container
from errors import PiDeployError
from observability import Outcome, Trace, alert, prune_traces
from proxy import route_instance, route_key, shown_key

logger = logging.getLogger(__name__)

_HEARTBEAT_LOCK = 8_700_003  # advisory lock key: one heartbeat round at a time, across processes

# Drift kinds.
CONTAINER_EXITED = "container_exited"  # a running row's container is not running (crash, kill, OOM)
CONTAINER_UNHEALTHY = "container_unhealthy"  # it runs but /healthz does not answer 200
CONTAINER_MISSING = "container_missing"  # a running row has no container at all (removed by hand)
STOPPED_BUT_RUNNING = "stopped_but_running"  # the row says stopped, its container runs
ORPHAN = "orphan_container"  # a labelled container with no row
STRAY = "stray_container"  # a labelled container its row does not expect (tools.stray_reason)
ROUTE_MISSING = "route_missing"  # a running instance has no nginx route
ROUTE_STALE = "route_stale"  # a route to a wrong port, or for an instance that is not running
NGINX_DOWN = "nginx_down"  # nginx does not serve the live route map (dead, or a stale master)
INTERRUPTED = "interrupted_transition"  # creating/updating with no task and no lock holder
STUCK = "stuck_transition"  # deleting for too long, no task working on it

DOWN = (CONTAINER_EXITED, CONTAINER_UNHEALTHY, CONTAINER_MISSING)
ROUTES = (ROUTE_MISSING, ROUTE_STALE)
TARGETED_LIST_MAX = 8  # a round about this many instances or fewer lists each one's containers alone
TRANSITIONAL = tools.TRANSITIONAL
# A row another process has just put in a transition may not show its task or lock yet (a
# direct tool call inserts the row a moment before it takes the lock): not yet interrupted.
INTERRUPTED_GRACE = 5.0
NGINX_CHECK_INTERVAL = 5.0  # serve looks at nginx this often between rounds

# Run endings that mean "the model could not do it", after which the plan runs as a playbook.
MODEL_FAILURES = frozenset(
    {
        "llm_api_error",
        "llm_rate_limited",
        "llm_timeout",
        "llm_bad_output",
        "cost_cap",
        "token_cap",
        "agent_stuck",
    }
)


# ---------------------------------------------------------------------------
# Observations, drifts, steps: plain data
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Probe:
    ok: bool
    detail: str  # "HTTP 200", "HTTP 404", "timed out", "connection refused" ...


@dataclass(frozen=True)
class Observation:
    """What one round saw, at `now` (epoch seconds)."""

    now: float
    containers: list[Container]
    rows: list[Row]
    routes: dict[str, int]
    probes: dict[int, Probe]  # only running instances whose container runs (and, if targeted, in `only`)
    busy: frozenset[int] = frozenset()  # instances an unfinished task is about, or whose lock is held
    engine_calls: int = 1
    proxy_problem: str = ""  # why nginx does not serve the live map ("" when it does)


@dataclass(frozen=True)
class Drift:
    kind: str
    instance_id: int | None
    evidence: dict[str, Any] = field(default_factory=dict)

    @property
    def family(self) -> str:
        """Drifts one repair answers together: any `down` kind is fixed by one restart."""
        return "down" if self.kind in DOWN else "routes" if self.kind in ROUTES else self.kind

    @property
    def key(self) -> tuple[str, int | None]:
        return (self.family, self.instance_id)

    def describe(self) -> str:
        e = self.evidence
        match self.kind:
            case "container_exited":
                oom = " (OOM killed)" if e.get("oom_killed") else ""
                what = f"container {e.get('state')} with exit code {e.get('exit_code')}{oom}"
            case "container_unhealthy":
                what = f"container runs but /healthz failed: {e.get('probe')}"
            case "container_missing":
                what = "the row says running but its container is gone"
            case "stopped_but_running":
                what = "the row says stopped but its container runs"
            case "orphan_container":
                what = f"container {e.get('name')} ({e.get('state')}) has no instance row"
            case "stray_container":
                what = f"container {e.get('name')} ({e.get('state')}) is not expected: {e.get('reason')}"
            case "nginx_down":
                what = f"nginx does not serve the route map: {e.get('problem')}"
            case "interrupted_transition":
                what = f"{e.get('status')} since {e.get('since')} with no task working on it"
            case "route_missing":
                what = f"no nginx route (expected port {e.get('expected_port')})"
            case "route_stale":
                what = f"nginx routes to port {e.get('routed_port')}, expected {e.get('expected_port')}"
            case _:
                what = f"{e.get('status')} for {e.get('age_s')}s with no task working on it"
        where = f"instance {self.instance_id}" if self.instance_id is not None else f"route {e.get('route')}"
        if self.kind == NGINX_DOWN:
            where = "nginx"
        elif self.instance_id is None and self.kind == ORPHAN:
            where = "a container with no instance label"
        return f"{where}: {what}"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "instance_id": self.instance_id, "evidence": self.evidence}


@dataclass(frozen=True)
class Step:
    """One deterministic repair: a tool call (the Playbook reads `tool` and `arguments`)."""

    tool: str
    arguments: dict[str, Any]
    instance_id: int | None
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "tool": self.tool,
            "arguments": self.arguments,
            "instance_id": self.instance_id,
            "reason": self.reason,
        }


@dataclass(frozen=True)
class Counters:
    """The heartbeat's columns of one instance row."""

    failures: int
    next_recovery_at: float | None
    healthy_since: float | None

    def on(self, row: Row) -> Row:
        """`row` with these counters."""
        return {
            **row,
            "recovery_failures": self.failures,
            "next_recovery_at": self.next_recovery_at,
            "healthy_since": self.healthy_since,
        }

    @classmethod
    def of(cls, row: Row) -> Counters:
        return cls(
            int(row["recovery_failures"] or 0), _ts(row["next_recovery_at"]), _ts(row["healthy_since"])
        )


CLEAR = Counters(0, None, None)


# ---------------------------------------------------------------------------
# Pure functions: diff, plan, counters
# ---------------------------------------------------------------------------


def _ts(value: datetime | float | None) -> float | None:
    if value is None:
        return None
    return value.timestamp() if isinstance(value, datetime) else float(value)


def _iso(epoch: float | None) -> str | None:
    return None if epoch is None else datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds")


def instance_label(container: Container) -> int | None:
    value = container.labels.get(LABEL_INSTANCE, "")
    return int(value) if value.isascii() and value.isdigit() else None


own_container = tools.recorded_container


def diff(observation: Observation, config: Config) -> list[Drift]:
    """Every drift between the rows, the containers, the routes, nginx and the probes. No I/O.

    A busy instance (an unfinished task is about it, or someone holds its lock) is its task's:
    no drift is reported for it, its containers and its route included."""
    obs = observation
    rows = {int(row["id"]): row for row in obs.rows}
    by_instance: dict[int, list[Container]] = {}
    drifts: list[Drift] = []
    for labelled in obs.containers:
        iid = instance_label(labelled)
        if iid is not None and iid in obs.busy:
            continue
        evidence: dict[str, Any] = {
            "container_id": labelled.id,
            "name": labelled.name,
            "state": labelled.state,
        }
        row = rows.get(iid) if iid is not None else None
        if row is not None:
            by_instance.setdefault(int(row["id"]), []).append(labelled)
            reason = tools.stray_reason(row, labelled)
            if reason:
                drifts.append(Drift(STRAY, iid, {**evidence, "reason": reason}))
            continue
        drifts.append(Drift(ORPHAN, iid, {**evidence, "user": labelled.labels.get("pideploy.user")}))

    for iid, row in rows.items():
        if iid in obs.busy:
            continue
        status = row["status"]
        container = own_container(row, by_instance.get(iid, []))
        if status == "running":
            if container is None:
                others = [c.id[:12] for c in by_instance.get(iid, [])]
                drifts.append(
                    Drift(
                        CONTAINER_MISSING,
                        iid,
                        {"container_id": row["container_id"], "other_containers": others},
                    )
                )
            elif not container.running:
                evidence = {
                    "container_id": container.id,
                    "state": container.state,
                    "exit_code": container.exit_code,
                    "oom_killed": container.oom_killed,
                }
                drifts.append(Drift(CONTAINER_EXITED, iid, evidence))
            elif iid in obs.probes and not obs.probes[iid].ok:
                evidence = {
                    "container_id": container.id,
                    "port": row["port"],
                    "probe": obs.probes[iid].detail,
                }
                drifts.append(Drift(CONTAINER_UNHEALTHY, iid, evidence))
        elif status == "stopped":
            if container is not None and container.running:
                drifts.append(Drift(STOPPED_BUT_RUNNING, iid, {"container_id": container.id}))
        elif status in TRANSITIONAL:
            age = obs.now - (_ts(row["updated_at"]) or obs.now)
            since = {"status": status, "age_s": round(age), "since": _iso(_ts(row["updated_at"]))}
            if status in ("creating", "updating") and age > INTERRUPTED_GRACE:
                drifts.append(Drift(INTERRUPTED, iid, since))
            elif status == "deleting" and age > config.stuck_timeout:
                drifts.append(Drift(STUCK, iid, since))

    # Evidence names a route without its token: it reaches events, traces and the model. A busy
    # instance's route is left to its task.
    routable = [r for r in obs.rows if int(r["id"]) not in obs.busy]
    keys = {r["id"]: route_key(r, config) for r in routable}
    expected_routes = tools.wanted_routes(routable, keys, obs.routes)
    for key, port in expected_routes.items():
        if key not in obs.routes:
            missing = {"route": shown_key(key), "expected_port": port}
            drifts.append(Drift(ROUTE_MISSING, route_instance(key), missing))
    for key, routed in obs.routes.items():
        if route_instance(key) in obs.busy:
            continue
        if expected_routes.get(key) != routed:
            # A key in another form than route_key's (from before an upgrade) is stale too.
            stale = {
                "route": shown_key(key),
                "routed_port": routed,
                "expected_port": expected_routes.get(key),
            }
            drifts.append(Drift(ROUTE_STALE, route_instance(key), stale))
    if obs.proxy_problem:
        drifts.append(Drift(NGINX_DOWN, None, {"problem": obs.proxy_problem}))
    return drifts


def effective_failures(row: Row, now: float, config: Config) -> int:
    """The streak's length, or 0 once the instance has stayed healthy for `healthy_reset`."""
    counters = Counters.of(row)
    if counters.healthy_since is not None and now - counters.healthy_since >= config.healthy_reset:
        return 0
    return counters.failures


def backoff(failures: int, config: Config) -> float:
    """Seconds to wait after the `failures`-th recovery of a streak before the next one."""
    if failures <= 0:
        return 0.0
    return float(min(config.recovery_backoff_max, config.recovery_backoff * 2 ** (failures - 1)))


def recovery_due_at(row: Row, now: float, config: Config) -> float | None:
    """When the next recovery may start, if that is in the future; None if now is fine."""
    if effective_failures(row, now, config) == 0:
        return None
    due = Counters.of(row).next_recovery_at
    return due if due is not None and due > now else None


def after_attempt(row: Row, healthy: bool, now: float, config: Config) -> Counters:
    """The counters after one recovery attempt of `row` (as it was before the attempt)."""
    failures = effective_failures(row, now, config) + 1
    return Counters(failures, now + backoff(failures, config), now if healthy else None)


def settle(observation: Observation, skip: Iterable[int], config: Config) -> dict[int, Counters]:
    """Counter bookkeeping for instances that need no recovery now (only rows that change)."""
    obs, skipped, updates = observation, set(skip), {}
    for row in obs.rows:
        iid, counters = int(row["id"]), Counters.of(row)
        if iid in skipped or counters == CLEAR:
            continue
        if row["status"] != "running":  # stopped, error...: the streak is over
            updates[iid] = CLEAR
        elif iid in obs.probes and obs.probes[iid].ok:
            if counters.healthy_since is None:
                updates[iid] = Counters(counters.failures, counters.next_recovery_at, obs.now)
            elif obs.now - counters.healthy_since >= config.healthy_reset:
                updates[iid] = CLEAR
    return updates


def plan(drifts: Iterable[Drift], rows: Mapping[int, Row], now: float, config: Config) -> list[Step]:
    """The deterministic repair plan. No I/O. Instances in backoff get no step, nor does a
    container with no instance label (reported only: nothing scopes it to an instance)."""
    removals: list[Step] = []
    rollbacks: list[Step] = []
    stops: list[Step] = []
    starts: list[Step] = []
    errors: list[Step] = []
    nginx: list[Drift] = []
    seen: set[int] = set()
    for drift in drifts:
        iid = drift.instance_id
        if drift.family == "routes" or drift.kind == NGINX_DOWN:
            nginx.append(drift)
            continue
        if drift.kind in (ORPHAN, STRAY):
            if iid is not None:
                step = Step(
                    "remove_stray_container",
                    {"container_id": drift.evidence["container_id"]},
                    iid,
                    drift.describe(),
                )
                removals.append(step)
            continue
        if iid is None or iid in seen or iid not in rows:
            continue
        row = rows[iid]
        if drift.family == "down" and row["status"] == "running":
            seen.add(iid)
            failures = effective_failures(row, now, config)
            if failures >= config.recovery_max_failures:
                reason = f"{failures} consecutive recoveries did not hold; last: {drift.describe()}"
                errors.append(Step("mark_error", {"instance_id": iid, "reason": reason[:500]}, iid, reason))
            elif recovery_due_at(row, now, config) is None:
                starts.append(Step("instance_start", {"instance_id": iid}, iid, drift.describe()))
        elif drift.kind == STOPPED_BUT_RUNNING and row["status"] == "stopped":
            seen.add(iid)
            stops.append(Step("instance_stop", {"instance_id": iid}, iid, drift.describe()))
        elif drift.kind == INTERRUPTED and row["status"] in ("creating", "updating"):
            seen.add(iid)
            rollbacks.append(Step("instance_rollback", {"instance_id": iid}, iid, drift.describe()))
        elif drift.kind == STUCK and row["status"] in TRANSITIONAL:
            seen.add(iid)
            reason = f"stuck: {drift.describe()}"
            errors.append(Step("mark_error", {"instance_id": iid, "reason": reason[:500]}, iid, reason))
    # Strays first: one may hold the name or the port the rest of the plan needs.
    steps = [
        *removals,
        *sorted(rollbacks, key=_by_id),
        *sorted(stops, key=_by_id),
        *sorted(starts, key=_by_id),
    ]
    steps += sorted(errors, key=_by_id)
    if nginx:
        reason = "; ".join(d.describe() for d in nginx)
        steps.append(Step("nginx_sync", {}, None, reason[:500]))
    return steps


def _by_id(step: Step) -> int:
    return step.instance_id or 0


# ---------------------------------------------------------------------------
# The round's report
# ---------------------------------------------------------------------------


@dataclass
class RoundReport:
    source: str
    started_at: float
    drifts: list[Drift] = field(default_factory=list)
    plan: list[Step] = field(default_factory=list)
    actions: list[dict[str, Any]] = field(default_factory=list)
    repaired: list[Drift] = field(default_factory=list)
    unrepaired: list[Drift] = field(default_factory=list)
    cost_usd: float = 0.0
    duration_s: float = 0.0
    trace_file: str | None = None
    skipped: bool = False
    only: list[int] | None = None
    model_calls: int = 0
    engine_calls: int = 0
    agent_runs: list[dict[str, Any]] = field(default_factory=list)
    marked_error: list[int] = field(default_factory=list)
    retry_at: dict[int, float] = field(default_factory=dict)  # deferred recoveries: when they are due

    @property
    def ok(self) -> bool:
        """No unrepaired drift at the end of the round (a skipped round is ok: another one ran)."""
        return not self.unrepaired

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "source": self.source,
            "started_at": _iso(self.started_at),
            "skipped": self.skipped,
            "only": self.only,
            "duration_s": round(self.duration_s, 4),
            "drifts": [d.to_dict() for d in self.drifts],
            "plan": [s.to_dict() for s in self.plan],
            "actions": self.actions,
            "repaired": [d.to_dict() for d in self.repaired],
            "unrepaired": [d.to_dict() for d in self.unrepaired],
            "marked_error": self.marked_error,
            "retry_at": {str(k): _iso(v) for k, v in self.retry_at.items()},
            "cost_usd": round(self.cost_usd, 6),
            "model_calls": self.model_calls,
            "engine_calls": self.engine_calls,
            "agent_runs": self.agent_runs,
            "trace_file": self.trace_file,
        }

    def render(self) -> str:
        """The text `heartbeat --once` prints."""
        if self.skipped:
            return "heartbeat: skipped, another round holds the heartbeat lock (it does this work)"
        lines = [
            f"heartbeat ({self.source}): {len(self.drifts)} drift(s), {len(self.repaired)} repaired, "
            f"{len(self.unrepaired)} unrepaired in {self.duration_s:.2f}s; "
            f"{self.model_calls} model call(s), ${self.cost_usd:.4f}; {self.engine_calls} engine call(s) to observe"
        ]
        for drift in self.repaired:
            lines.append(f"  repaired    {drift.kind:<20} {drift.describe()}")
        for drift in self.unrepaired:
            note = ""
            if drift.kind == ORPHAN and drift.instance_id is None:
                note = "  (reported only: no instance label; remove it by hand if it is not needed)"
            elif drift.instance_id in self.marked_error:
                note = "  (marked error)"
            elif drift.instance_id in self.retry_at:
                note = f"  (next recovery at {_iso(self.retry_at[drift.instance_id])})"
            lines.append(f"  UNREPAIRED  {drift.kind:<20} {drift.describe()}{note}")
        for action in self.actions:
            verdict = "ok" if action.get("ok") else f"failed: {action.get('error')}"
            lines.append(f"  action      {action['tool']} {json.dumps(action.get('arguments'))} -> {verdict}")
        if self.trace_file:
            lines.append(f"  trace       {self.trace_file}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------
# Probes
# ---------------------------------------------------------------------------


def probe(port: int, timeout: float) -> Probe:
    """GET http://127.0.0.1:<port>/healthz once."""
    return Probe(*tools.healthz(port, timeout))


def probe_all(ports: Mapping[int, int], timeout: float, workers: int = 32) -> dict[int, Probe]:
    """Probe every instance concurrently, at most `workers` at a time."""
    if not ports:
        return {}
    with concurrent.futures.ThreadPoolExecutor(min(workers, len(ports)), thread_name_prefix="probe") as pool:
        futures = {iid: pool.submit(probe, port, timeout) for iid, port in ports.items()}
        return {iid: future.result() for iid, future in futures.items()}


# ---------------------------------------------------------------------------
# The heartbeat
# ---------------------------------------------------------------------------


@dataclass
class _Run:
    """One agent run of a round."""

    outcome: Outcome
    trace: Trace

    def summary(self) -> dict[str, Any]:
        models = [
            s
            for s in self.trace.spans()
            if s.attributes.get("gen_ai.operation.name") == "chat"
            and s.attributes.get("pideploy.model_name") != "playbook"
        ]
        return {
            "status": self.outcome.status,
            "error_class": self.outcome.error_class,
            "error": self.outcome.error,
            "cost_usd": self.outcome.cost_usd,
            "model_calls": len(models),
            "playbook": self.outcome.playbook,
            "turns": self.outcome.turns,
            "trace_file": self.outcome.trace_file,
        }

    def actions(self) -> list[dict[str, Any]]:
        """The tool calls of the run (report_result aside) with what each returned."""
        calls: dict[str, dict[str, Any]] = {}
        actions: list[dict[str, Any]] = []
        for message in self.trace.transcript:
            if message.get("role") == "assistant":
                for call in message.get("tool_calls") or []:
                    name = call["function"]["name"]
                    if name == "report_result":
                        continue
                    try:
                        arguments = json.loads(call["function"]["arguments"] or "{}")
                    except ValueError:
                        arguments = call["function"]["arguments"]
                    entry = {"tool": name, "arguments": arguments, "ok": None, "error": None}
                    calls[call["id"]] = entry
                    actions.append(entry)
            elif message.get("role") == "tool" and message.get("tool_call_id") in calls:
                entry = calls[message["tool_call_id"]]
                try:
                    content = json.loads(message.get("content") or "{}")
                except ValueError:
                    content = {}
                entry["ok"] = bool(content.get("ok"))
                entry["error"] = content.get("error")
                entry["error_class"] = content.get("error_class")
        return actions


class Heartbeat:
    """Rounds of observe, diff, plan, act and record; see the module's docstring."""

    def __init__(
        self,
        rt: tools.Runtime,
        config: Config,
        *,
        chain: models.Chain | None = None,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
        lock_wait: float | None = None,
        debounce: float = 0.05,
    ) -> None:
        self.rt, self.config = rt, config
        self.limits = agent.Limits.from_config(config, heartbeat=True)
        self.cooldowns = models.DatabaseCooldowns(rt.db)
        self.chain = chain or models.Chain.from_config(config, self.cooldowns, self.limits)
        self.clock, self.sleep = clock, sleep
        # Waiting longer than half an interval for another round would only delay the next one.
        self.lock_wait = min(30.0, config.heartbeat_interval / 2) if lock_wait is None else lock_wait
        self.debounce = debounce
        self._pending: set[int] = set()  # instances a `die` event asked about
        self._full_round_requested = False
        self._pending_lock = threading.Lock()
        self._pruned_at: float | None = None  # monotonic time of the last retention pass

    # -- one round -----------------------------------------------------------

    def round(self, source: str = "serve", only: set[int] | None = None) -> RoundReport:
        """One round under the heartbeat lock; `skipped` if another round kept it for `lock_wait`."""
        with self._lock() as held:
            if not held:
                logger.info(
                    "heartbeat round skipped: another round holds the lock",
                    extra={"action": "heartbeat_skipped", "source": source},
                )
                return RoundReport(source, self.clock(), skipped=True, only=sorted(only) if only else None)
            report = self._round(source, only)
        self._prune_if_due()  # outside the lock: it needs none, and the next round need not wait
        return report

    def _prune_if_due(self) -> None:
        """Retention: trace files and heartbeat_round rows older than `retention_days` go.

        At most hourly in one process (a cron `--once` is a new process: every run). A failure
        is logged and retried next hour: it must never cost a round."""
        now = time.monotonic()
        if self.config.retention_days <= 0 or (self._pruned_at is not None and now - self._pruned_at < 3600):
            return
        self._pruned_at = now
        before = self.clock() - self.config.retention_days * 86_400
        try:
            traces = prune_traces(self.config.traces, before)
            rounds = self.rt.db.execute("heartbeat_round_prune", before=datetime.fromtimestamp(before, UTC))
        except (OSError, PiDeployError) as error:
            logger.warning("retention pass failed: %s", error, extra={"action": "retention_failed"})
            return
        if traces or rounds:
            logger.info(
                "retention: removed %d trace file(s) and %d heartbeat round(s) older than %g days",
                traces,
                rounds,
                self.config.retention_days,
                extra={"action": "retention_pruned", "traces": traces, "rounds": rounds},
            )

    @contextlib.contextmanager
    def _lock(self) -> Iterator[bool]:
        db = self.rt.db
        with db.connection() as conn:
            limit = time.monotonic() + self.lock_wait
            held = False
            while True:
                row = db.one("heartbeat_try_lock", conn, key=_HEARTBEAT_LOCK)
                held = bool(row and row["ok"])
                if held or time.monotonic() >= limit:
                    break
                self.sleep(0.1)
            try:
                yield held
            finally:
                if held:
                    db.unlock("heartbeat_unlock", conn, key=_HEARTBEAT_LOCK)

    def _round(self, source: str, only: set[int] | None) -> RoundReport:
        started = time.monotonic()
        report = RoundReport(source, self.clock(), only=sorted(only) if only else None)
        trace = Trace(
            kind="heartbeat",
            task_id=None,
            task_type="round",
            user_id=None,
            instance_id=None,
            prompt_version=agent.PROMPT_VERSION,
            model_chain=self.chain.names,
            trace_dir=self.config.traces,
            clock=self.clock,
        )
        trace.extra.update(source=source, only=report.only)
        ctx = tools.ToolContext(trace, None)
        try:
            with trace.span("heartbeat.observe"):
                observation = self.observe(only)
            report.engine_calls = observation.engine_calls
            report.drifts = [
                d for d in diff(observation, self.config) if only is None or d.instance_id in only
            ]
            rows = {int(r["id"]): r for r in observation.rows}
            report.plan = plan(report.drifts, rows, observation.now, self.config)
            trace.extra["drifts"] = [d.to_dict() for d in report.drifts]
            trace.extra["plan"] = [s.to_dict() for s in report.plan]
            down = {d.instance_id for d in report.drifts if d.family == "down" and d.instance_id is not None}
            self._write_counters(settle(observation, down | observation.busy, self.config))
            if report.plan:
                with trace.span("heartbeat.act", **{"pideploy.steps": len(report.plan)}):
                    self._act(report, report.plan, self._fast_path(source, report.plan))
            if report.drifts:
                with trace.span("heartbeat.verify"):
                    self._verify(report, rows, ctx)
            report.cost_usd = sum(r["cost_usd"] for r in report.agent_runs)
            report.model_calls = sum(r["model_calls"] for r in report.agent_runs)
            trace.finish("succeeded" if report.ok else "failed")
        except BaseException as error:
            trace.finish("failed", error=error)
            raise
        finally:
            report.duration_s = time.monotonic() - started
            report.trace_file = str(trace.path)
            trace.extra.update(
                {k: v for k, v in report.to_dict().items() if k not in ("drifts", "plan", "trace_file")}
            )
            trace.write()
        self.rt.db.execute(
            "heartbeat_round_insert",
            started_at=datetime.fromtimestamp(report.started_at, UTC),
            duration_s=report.duration_s,
            drifts=len(report.drifts),
            repaired=len(report.repaired),
            unrepaired=len(report.unrepaired),
            cost_usd=report.cost_usd,
            source=source,
            trace_file=report.trace_file,
        )
        logger.log(
            logging.INFO if report.ok else logging.WARNING,
            "heartbeat round: %d drift(s), %d repaired, %d unrepaired, $%.4f, %.3fs",
            len(report.drifts),
            len(report.repaired),
            len(report.unrepaired),
            report.cost_usd,
            report.duration_s,
            extra={"action": "heartbeat_round", "source": source, "trace_file": report.trace_file},
        )
        return report

    # -- observe -------------------------------------------------------------

    def observe(self, only: set[int] | None = None) -> Observation:
        """One engine list call, the instance rows, the busy instances, the route map, and probes.

        Only running instances with a running container are probed (only those in `only`, if
        given); a dead container of a running row is inspected too, for its OOM flag.
        """
        now = self.clock()
        # Busy first: a task that finishes after this read has written its rows before it
        # finished, so the rows read next show where it left them.
        busy = frozenset(
            int(r["instance_id"])
            for r in self.rt.db.all("heartbeat_busy_instances", space=tools.INSTANCE_LOCK_SPACE)
        )
        if only is not None and len(only) <= TARGETED_LIST_MAX:
            # A targeted round (a `die` event, a verify) looks at its few instances only: listing
            # every container costs a fleet-sized call (0.4 s at 200 running instances) whose
            # other rows the diff would drop anyway.
            containers = [c for iid in sorted(only) for c in tools.instance_containers(self.rt, iid)]
            calls = len(only)
        else:
            containers, calls = self.rt.engine.list({LABEL_NAMESPACE: self.config.namespace}), 1
        rows = self.rt.db.all("instance_list_all")
        routes = self.rt.proxy.routes()
        targets: dict[int, int] = {}
        for row in rows:
            iid = int(row["id"])
            if row["status"] != "running" or iid in busy or (only is not None and iid not in only):
                continue
            container = own_container(row, containers)
            if container is not None and container.running and row["port"]:
                targets[iid] = int(row["port"])
            elif container is not None and not container.running and container.oom_killed is None:
                # A list call does not tell OOM kills apart: inspect the few that died (drift only).
                detail = self.rt.engine.inspect(container.id)
                calls += 1
                if detail is not None:
                    containers = [detail if c.id == container.id else c for c in containers]
        probes = probe_all(targets, self.config.heartbeat_probe_timeout)
        return Observation(now, containers, rows, routes, probes, busy, calls, self.rt.proxy.problem())

    # -- act -----------------------------------------------------------------

    def _fast_path(self, source: str, steps: list[Step]) -> models.Chain | None:
        """A `die` event whose only repair is to start the container again needs no model:
        the playbook does it at once (a model's turns would cost seconds of downtime)."""
        if source == "event" and all(s.tool == "instance_start" for s in steps):
            return models.Chain([], self.cooldowns, self.limits)
        return None

    def _act(self, report: RoundReport, steps: list[Step], chain: models.Chain | None = None) -> None:
        """Hand the drift report and the plan to the agent; the playbook if the model cannot."""
        chain = chain or self.chain
        allowed = {s.instance_id for s in steps if s.instance_id is not None}
        allowed |= {
            d.instance_id for d in report.drifts if d.family == "routes" and d.instance_id is not None
        }
        nginx = ("routes", NGINX_DOWN)
        task = agent.TaskSpec(
            type="heartbeat",
            user_id=None,
            params={
                "drifts": [
                    d.to_dict() for d in report.drifts if d.instance_id in allowed or d.family in nginx
                ],
                "plan": [s.to_dict() for s in steps],
            },
            allowed_instances=frozenset(allowed),
        )
        outcome = self._run(report, task, chain)
        if chain.links and outcome.status == "failed" and outcome.error_class in MODEL_FAILURES:
            logger.warning(
                "heartbeat agent run failed (%s): running the repair plan as a playbook",
                outcome.error_class,
                extra={"action": "heartbeat_playbook_fallback", "trace_file": outcome.trace_file},
            )
            self._run(report, task, models.Chain([], self.cooldowns, self.limits))

    def _run(self, report: RoundReport, task: agent.TaskSpec, chain: models.Chain) -> Outcome:
        trace = agent.new_trace(task, self.config, chain)
        outcome = agent.run_task(task, agent.ToolsEnvironment(self.rt), chain, self.limits, trace=trace)
        run = _Run(outcome, trace)
        report.agent_runs.append(run.summary())
        report.actions.extend(run.actions())
        return outcome

    # -- verify and record ---------------------------------------------------

    def _verify(self, report: RoundReport, rows: dict[int, Row], ctx: tools.ToolContext) -> None:
        """Observe the drifted instances again; count, give up, alert and write events."""
        ids = {d.instance_id for d in report.drifts if d.instance_id is not None}
        after = self.observe(ids)
        keys = {d.key for d in report.drifts}
        still = {d.key for d in diff(after, self.config) if d.key in keys}
        now_rows = {int(r["id"]): r for r in after.rows}  # counters updated below as they are written
        attempted = [s.instance_id for s in report.plan if s.tool == "instance_start" and s.instance_id]
        giving_up: list[Step] = []
        for iid in attempted:
            row = now_rows.get(iid)
            if row is None or row["status"] != "running":
                continue  # stopped, updated or deleted meanwhile: a refusal, nothing to count
            healthy = ("down", iid) not in still
            counters = after_attempt(rows[iid], healthy, after.now, self.config)
            self._write_counters({iid: counters})
            now_rows[iid] = counters.on(row)
            drift = next(d for d in report.drifts if d.key == ("down", iid))
            detail = {"drift": drift.kind, "evidence": drift.evidence, "attempt": counters.failures}
            if healthy:
                tools.record_event(self.rt, ctx, iid, "recovered", **detail)
                continue
            due = _iso(counters.next_recovery_at)
            tools.record_event(self.rt, ctx, iid, "recovery_failed", **detail, next_recovery_at=due)
            giving_up += plan([drift], {iid: now_rows[iid]}, after.now, self.config)
        if giving_up:  # the last recovery of the streak failed: mark it error now, not a round later
            self._act(report, giving_up, models.Chain([], self.cooldowns, self.limits))
        self._record_errors(report, str(ctx.trace.path))
        for drift in report.drifts:
            given_up = drift.instance_id in report.marked_error and drift.family in ("down", STUCK)
            unlabelled = drift.kind == ORPHAN and drift.instance_id is None  # reported only
            if given_up or unlabelled or drift.key in still:
                report.unrepaired.append(drift)
                row = now_rows.get(drift.instance_id or 0)
                if drift.family == "down" and not given_up and row is not None and row["status"] == "running":
                    due_at = recovery_due_at(row, after.now, self.config)
                    if due_at is not None:
                        report.retry_at[int(row["id"])] = due_at
            else:
                report.repaired.append(drift)
            # A route of no known instance, and nginx itself, are in the history too. A stray
            # container's removal is its own event (remove_stray_container writes it).
            known = drift.instance_id in now_rows
            recorded = known or drift.family in ("routes", NGINX_DOWN)
            if drift.family != "down" and drift.kind not in (ORPHAN, STRAY) and recorded:
                kind = "drift_unrepaired" if drift in report.unrepaired else "drift_repaired"
                tools.record_event(
                    self.rt, ctx, drift.instance_id, kind, drift=drift.kind, evidence=drift.evidence
                )
            if drift.kind == NGINX_DOWN:
                repaired = drift not in report.unrepaired
                alert(
                    self.config.alerts,
                    "nginx_down",
                    f"nginx was not serving the routes ({drift.evidence['problem']}): "
                    + ("started again" if repaired else "still not serving"),
                    severity="warning" if repaired else "critical",
                    task_type="heartbeat",
                    trace_file=str(ctx.trace.path),
                    problem=drift.evidence["problem"],
                    repaired=repaired,
                )

    def _record_errors(self, report: RoundReport, trace_file: str) -> None:
        """Instances this round marked error: alert, and clear their counters (an operator restarts them)."""
        for action in report.actions:
            iid = action["arguments"].get("instance_id") if isinstance(action["arguments"], dict) else None
            if (
                action["tool"] != "mark_error"
                or not action["ok"]
                or iid is None
                or iid in report.marked_error
            ):
                continue
            report.marked_error.append(iid)
            self._write_counters({iid: CLEAR})
            reason = action["arguments"].get("reason", "")
            alert(
                self.config.alerts,
                "instance_error",
                f"heartbeat marked instance {iid} error: {reason}",
                severity="critical",
                task_type="heartbeat",
                trace_file=trace_file,
                instance_id=iid,
                reason=reason,
            )

    def _write_counters(self, updates: Mapping[int, Counters]) -> None:
        for iid, counters in updates.items():
            self.rt.db.execute(
                "heartbeat_counters_set",
                id=iid,
                recovery_failures=counters.failures,
                next_recovery_at=_dt(counters.next_recovery_at),
                healthy_since=_dt(counters.healthy_since),
            )

    # -- serve: rounds every interval, and at once on a `die` event -----------

    def run(self, stop: threading.Event, *, follow_events: bool = True) -> None:
        """Rounds every `heartbeat_interval` until `stop`; a `die` event triggers a targeted round at once.

        `follow_events=False` leaves only the interval rounds (what a cron-only deployment gets).
        """
        wake = threading.Event()
        follower = threading.Thread(
            target=self._follow_events, args=(stop, wake), name="heartbeat-events", daemon=True
        )
        if follow_events:
            follower.start()

        def wake_on_stop() -> None:
            stop.wait()
            wake.set()

        threading.Thread(target=wake_on_stop, name="heartbeat-stop", daemon=True).start()
        next_full = next_nginx_check = time.monotonic()
        retries: dict[int, float] = {}  # instance -> clock time its deferred recovery is due
        nginx_left_down = False  # the last round could not repair nginx: wait for the next one
        while not stop.is_set():
            with self._pending_lock:
                targeted, self._pending = self._pending, set()
                full = self._full_round_requested or time.monotonic() >= next_full
                self._full_round_requested = False
            targeted |= {iid for iid, due in retries.items() if due <= self.clock()}
            try:
                if not full and time.monotonic() >= next_nginx_check:
                    # nginx sends no events: a cheap look between rounds, so a dead one costs
                    # every route seconds, not up to a whole interval.
                    next_nginx_check = time.monotonic() + NGINX_CHECK_INTERVAL
                    full = not nginx_left_down and bool(self.rt.proxy.problem())
                if full:
                    next_full = time.monotonic() + self.config.heartbeat_interval
                    report = self.round("serve")
                elif targeted:
                    report = self.round("event", only=targeted)
                else:
                    report = None
                if report is not None and report.skipped and report.only:
                    with self._pending_lock:  # the round holding the lock may have looked too early
                        self._pending |= set(report.only)
                elif report is not None:
                    if report.only is None:
                        retries.clear()
                        nginx_left_down = any(d.kind == NGINX_DOWN for d in report.unrepaired)
                    for iid in report.only or ():
                        retries.pop(iid, None)
                    retries.update(report.retry_at)
            except Exception:  # the loop must survive anything a round throws: logged with its traceback
                logger.exception("heartbeat round failed", extra={"action": "heartbeat_round_failed"})
            now = time.monotonic()
            waits = [
                next_full - now,
                next_nginx_check - now,
                *(due - self.clock() for due in retries.values()),
            ]
            wake.wait(max(0.0, min(waits)))
            wake.clear()
            if self._pending and not stop.is_set():
                stop.wait(self.debounce)  # let a burst of die events arrive before the targeted round
        if follower.is_alive():
            follower.join(timeout=5)

    def _follow_events(self, stop: threading.Event, wake: threading.Event) -> None:
        """Follow the engine's container events; reconnect with backoff when the stream breaks."""
        pause = 1.0
        labels = {LABEL_NAMESPACE: self.config.namespace}
        while not stop.is_set():
            try:
                for event in self.rt.engine.events(labels, stop):
                    pause = 1.0
                    iid = event.labels.get(LABEL_INSTANCE, "")
                    if event.action == "die" and iid.isascii() and iid.isdigit():
                        logger.info(
                            "container of instance %s died: targeted round",
                            iid,
                            extra={"action": "heartbeat_die_event", "instance_id": int(iid)},
                        )
                        with self._pending_lock:
                            self._pending.add(int(iid))
                        wake.set()
            except PiDeployError as error:
                logger.warning(
                    "engine event stream broke (%s); reconnecting in %.0fs",
                    error.message,
                    pause,
                    extra={"action": "heartbeat_events_broken"},
                )
            except Exception:
                logger.exception("engine event stream failed", extra={"action": "heartbeat_events_failed"})
            if stop.wait(pause):
                return
            pause = min(pause * 2, 30.0)
            with self._pending_lock:  # events may have been missed meanwhile: look at everything
                self._full_round_requested = True
            wake.set()


def cli(rt: tools.Runtime, config: Config, *, once: bool, fmt: str = "text") -> int:
    """`pideploy.py heartbeat`: one round (--once: exit 0 when nothing is left unrepaired, else 1),
    or rounds forever in the foreground until SIGTERM or SIGINT."""
    beat = Heartbeat(rt, config)
    if once:
        report = beat.round("cron")
        print(json.dumps(report.to_dict(), indent=2) if fmt == "json" else report.render())
        return 0 if report.ok else 1
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    beat.run(stop)
    return 0


def _dt(epoch: float | None) -> datetime | None:
    return None if epoch is None else datetime.fromtimestamp(epoch, UTC)

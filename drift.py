"""The heartbeat's pure part: what one round saw, the drifts in it and the repair plan.

No I/O here: `diff(observation, config)` finds the drifts, each with its evidence;
`plan(drifts, rows, now, config)` turns them into deterministic repair steps with the
recovery rules applied (backoff, give up after N, never start a stopped instance);
`settle` and `after_attempt` keep the recovery counters. heartbeat.py observes the world,
acts on the plan and records the round (`RoundReport`); the recovery rules themselves are
described in its docstring. Tests call these functions with `now` injected.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from config import Config
from engine import LABEL_INSTANCE, Container
from proxy import route_instance, route_key, shown_key

# The rules the heartbeat shares with the repairs (pure functions of rows and containers).
# They live in tools.py for now; the tools split (issue 14) moves them to a lower module.
from runtime import TRANSITIONAL, recorded_container, stray_reason, wanted_routes

if TYPE_CHECKING:
    from db import Row

# Drift kinds.
CONTAINER_EXITED = "container_exited"  # a running row's container is not running (crash, kill, OOM)
CONTAINER_UNHEALTHY = "container_unhealthy"  # it runs but /healthz does not answer 200
CONTAINER_MISSING = "container_missing"  # a running row has no container at all (removed by hand)
STOPPED_BUT_RUNNING = "stopped_but_running"  # the row says stopped, its container runs
ORPHAN = "orphan_container"  # a labelled container with no row
STRAY = "stray_container"  # a labelled container its row does not expect (runtime.stray_reason)
ROUTE_MISSING = "route_missing"  # a running instance has no nginx route
ROUTE_STALE = "route_stale"  # a route to a wrong port, or for an instance that is not running
NGINX_DOWN = "nginx_down"  # nginx does not serve the live route map (dead, or a stale master)
INTERRUPTED = "interrupted_transition"  # creating/updating with no task and no lock holder
STUCK = "stuck_transition"  # deleting for too long, no task working on it

DOWN = (CONTAINER_EXITED, CONTAINER_UNHEALTHY, CONTAINER_MISSING)
ROUTES = (ROUTE_MISSING, ROUTE_STALE)
# A row another process has just put in a transition may not show its task or lock yet (a
# direct tool call inserts the row a moment before it takes the lock): not yet interrupted.
INTERRUPTED_GRACE = 5.0


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
    """One deterministic repair: a tool call. The heartbeat calls it itself, or hands the plan
    to a model's run (whose Playbook link reads `tool` and `arguments`)."""

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


def iso(epoch: float | None) -> str | None:
    return None if epoch is None else datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds")


def instance_label(container: Container) -> int | None:
    value = container.labels.get(LABEL_INSTANCE, "")
    return int(value) if value.isascii() and value.isdigit() else None


own_container = recorded_container


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
            reason = stray_reason(row, labelled)
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
            since = {"status": status, "age_s": round(age), "since": iso(_ts(row["updated_at"]))}
            if status in ("creating", "updating") and age > INTERRUPTED_GRACE:
                drifts.append(Drift(INTERRUPTED, iid, since))
            elif status == "deleting" and age > config.stuck_timeout:
                drifts.append(Drift(STUCK, iid, since))

    # Evidence names a route without its token: it reaches events, traces and the model. A busy
    # instance's route is left to its task.
    routable = [r for r in obs.rows if int(r["id"]) not in obs.busy]
    keys = {r["id"]: route_key(r, config) for r in routable}
    expected_routes = wanted_routes(routable, keys, obs.routes)
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
            "started_at": iso(self.started_at),
            "skipped": self.skipped,
            "only": self.only,
            "duration_s": round(self.duration_s, 4),
            "drifts": [d.to_dict() for d in self.drifts],
            "plan": [s.to_dict() for s in self.plan],
            "actions": self.actions,
            "repaired": [d.to_dict() for d in self.repaired],
            "unrepaired": [d.to_dict() for d in self.unrepaired],
            "marked_error": self.marked_error,
            "retry_at": {str(k): iso(v) for k, v in self.retry_at.items()},
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
                note = f"  (next recovery at {iso(self.retry_at[drift.instance_id])})"
            lines.append(f"  UNREPAIRED  {drift.kind:<20} {drift.describe()}{note}")
        for action in self.actions:
            verdict = "ok" if action.get("ok") else f"failed: {action.get('error')}"
            lines.append(f"  action      {action['tool']} {json.dumps(action.get('arguments'))} -> {verdict}")
        if self.trace_file:
            lines.append(f"  trace       {self.trace_file}")
        return "\n".join(lines)

"""The heartbeat: keep the database, the container engine and nginx consistent.

One round is four steps, each small and separately testable:

1. `Heartbeat.observe`: ONE query of the busy instances (an unfinished task is
   about them, or someone holds their lock), ONE engine list call for every
   container labelled with this namespace (a round about a few instances lists
   just theirs), ONE query of the instance table, the live nginx route map and
   whether nginx serves it (one GET), and a concurrent, bounded `GET /healthz`
   of each running instance that is not busy.
2. `drift.diff(observation, config)`: pure; the drifts, each with its evidence.
3. `drift.plan(drifts, rows, now, config)`: pure; the deterministic repair steps,
   with the recovery rules applied (backoff, give up after N, never start a
   stopped instance). With no step to take the round makes no model call at
   all. Otherwise the agent gets the drift report, the plan and the repair
   tools under the heartbeat's cost cap, each of its tool calls recorded in
   the round's report as it returns; when the model chain is unavailable or a
   cap is reached, the heartbeat runs the plan's steps itself (the playbook):
   it calls the repair tools directly, in the round's trace and scope.
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
  route change, no stray removal. (runtime.wanted_routes keeps an updating instance's live
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
- The fast path: a round triggered by a `die` event (the event hands the round its
  instance) whose only steps are `instance_start` runs the plan itself, with no
  model call, so a crash is repaired in about half a second whatever the model's latency. Interval
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
from datetime import UTC, datetime
from typing import Any

import agent
import instances
import models
import runtime
import tools
from config import Config
from db import Row
from drift import (
    CLEAR,
    NGINX_DOWN,
    ORPHAN,
    STRAY,
    STUCK,
    Counters,
    Observation,
    Probe,
    RoundReport,
    Step,
    after_attempt,
    diff,
    iso,
    own_container,
    plan,
    recovery_due_at,
    settle,
)
from engine import LABEL_INSTANCE, LABEL_NAMESPACE
from errors import DatabaseError, PiDeployError, RunTimedOut
from observability import Outcome, Trace, alert, evaluate_alerts, prune_traces

logger = logging.getLogger(__name__)

_HEARTBEAT_LOCK = 8_700_003  # advisory lock key: one heartbeat round at a time, across processes

TARGETED_LIST_MAX = 8  # a round about this many instances or fewer lists each one's containers alone
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
# Probes
# ---------------------------------------------------------------------------


def probe(port: int, timeout: float) -> Probe:
    """GET http://127.0.0.1:<port>/healthz once."""
    return Probe(*runtime.healthz(port, timeout))


def probe_all(ports: Mapping[int, int], timeout: float, workers: int = 32) -> dict[int, Probe]:
    """Probe every instance concurrently, at most `workers` at a time."""
    if not ports:
        return {}
    with concurrent.futures.ThreadPoolExecutor(min(workers, len(ports)), thread_name_prefix="probe") as pool:
        futures = {iid: pool.submit(probe, port, timeout) for iid, port in ports.items()}
        return {iid: future.result() for iid, future in futures.items()}


# ---------------------------------------------------------------------------
# Acting: the plan's steps called directly, or a model's calls recorded
# ---------------------------------------------------------------------------

# The tool entry points the plan's steps name (drift.plan); each checks its own scope.
REPAIRS: dict[str, Callable[..., tools.Result]] = {
    "remove_stray_container": tools.remove_stray_container,
    "instance_rollback": tools.instance_rollback,
    "instance_stop": tools.instance_stop,
    "instance_start": tools.instance_start,
    "mark_error": tools.mark_error,
    "nginx_sync": tools.nginx_sync,
}


def action(tool: str, arguments: object, failed: tuple[str, str] | None = None) -> dict[str, Any]:
    """One entry of a round's `actions`: a tool call, and its (error_class, error) if it failed."""
    return {
        "tool": tool,
        "arguments": arguments,
        "ok": failed is None,
        "error": failed[1] if failed else None,
        "error_class": failed[0] if failed else None,
    }


def failure(error: Exception, trace: Trace) -> tuple[str, str]:
    """A tool's error as a tool result shows it: its class and its message, secrets hidden."""
    if isinstance(error, PiDeployError):
        return error.error_class, trace.redactor.text(error.message)
    return "tool_execution_error", trace.redactor.text(f"{type(error).__name__}: {error}")


class RecordingEnvironment:
    """The real tools for a model's run, each call (report_result aside) appended to `actions`
    as it returns: the round's report says what the model did without reading its transcript."""

    def __init__(self, inner: agent.ToolsEnvironment, actions: list[dict[str, Any]]) -> None:
        self.inner, self.actions = inner, actions

    @property
    def config(self) -> Config:
        return self.inner.config

    def toolset(self, task_type: str) -> tuple[str, ...]:
        return self.inner.toolset(task_type)

    def specs(self, allowed: tuple[str, ...]) -> list[dict[str, Any]]:
        return self.inner.specs(allowed)

    def call(
        self, ctx: tools.ToolContext, name: str, arguments: object, allowed: tuple[str, ...]
    ) -> dict[str, Any]:
        try:
            result = self.inner.call(ctx, name, arguments, allowed)
        except Exception as error:
            if name != "report_result":
                with contextlib.suppress(PiDeployError):  # hidden as the model's tool message hides it
                    ctx.trace.redactor = ctx.trace.redactor.including(self.secret_values())
                self.actions.append(action(name, arguments, failure(error, ctx.trace)))
            raise
        if name != "report_result":
            self.actions.append(action(name, arguments))
        return result

    def snapshot(self, ctx: tools.ToolContext) -> dict[str, Any]:
        return self.inner.snapshot(ctx)

    def verify(self, task: agent.TaskSpec) -> str:
        return self.inner.verify(task)

    def secret_values(self) -> set[str]:
        return self.inner.secret_values()


class Handoff:
    """The instances `die` events named, from the event follower to the round loop: `put` one,
    `take` them all (several deaths in a burst become one round). `full` asks for a full round
    (the event stream broke: events may have been missed); `wake` tells the loop."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ids: set[int] = set()
        self._full = False
        self.wake = threading.Event()

    def put(self, instance_id: int | None = None, *, full: bool = False) -> None:
        with self._lock:
            if instance_id is not None:
                self._ids.add(instance_id)
            self._full = self._full or full
        self.wake.set()

    def give_back(self, ids: Iterable[int]) -> None:
        """Instances a round could not look at (another one held the lock): for the next round."""
        with self._lock:
            self._ids.update(ids)

    def take(self) -> tuple[set[int], bool]:
        """The instances handed over since the last take, and whether a full round was asked for."""
        with self._lock:
            ids, full = self._ids, self._full
            self._ids, self._full = set(), False
        return ids, full

    def pending(self) -> bool:
        with self._lock:
            return bool(self._ids)


# ---------------------------------------------------------------------------
# The heartbeat
# ---------------------------------------------------------------------------


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
                    self._act(report, report.plan, trace, model=self._wants_model(source, report.plan))
            if report.drifts:
                with trace.span("heartbeat.verify"):
                    self._verify(report, rows, ctx)
            report.cost_usd = sum(r["cost_usd"] for r in report.agent_runs)
            report.model_calls = sum(r["model_calls"] for r in report.agent_runs)
            trace.finish("succeeded" if report.ok else "failed")
            if trace.summary()["tool_calls"]:  # the plan's steps ran here: checked as a run is
                evaluate_alerts(trace, self.config)
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
            for r in self.rt.db.all("heartbeat_busy_instances", space=instances.INSTANCE_LOCK_SPACE)
        )
        if only is not None and len(only) <= TARGETED_LIST_MAX:
            # A targeted round (a `die` event, a verify) looks at its few instances only: listing
            # every container costs a fleet-sized call (0.4 s at 200 running instances) whose
            # other rows the diff would drop anyway.
            containers = [c for iid in sorted(only) for c in runtime.instance_containers(self.rt, iid)]
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

    def _wants_model(self, source: str, steps: list[Step]) -> bool:
        """Whether a model works the plan. Not without one in the chain, nor for a `die` event
        whose only repair is to start the container again: the heartbeat does that at once (a
        model's turns would cost seconds of downtime)."""
        fast = source == "event" and all(s.tool == "instance_start" for s in steps)
        return bool(self.chain.links) and not fast

    def _act(self, report: RoundReport, steps: list[Step], trace: Trace, *, model: bool = False) -> None:
        """Hand the drift report and the plan to the agent (`model`), else run the plan's steps
        directly; directly too when the model cannot."""
        allowed = {s.instance_id for s in steps if s.instance_id is not None}
        allowed |= {
            d.instance_id for d in report.drifts if d.family == "routes" and d.instance_id is not None
        }
        if model:
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
            outcome = self._run(report, task)
            if outcome.status != "failed" or outcome.error_class not in MODEL_FAILURES:
                return
            logger.warning(
                "heartbeat agent run failed (%s): running the repair plan as a playbook",
                outcome.error_class,
                extra={"action": "heartbeat_playbook_fallback", "trace_file": outcome.trace_file},
            )
        deadline = time.monotonic() + self.limits.timeout_s
        self._play(report, steps, tools.ToolContext(trace, None, None, None, frozenset(allowed), deadline))

    def _run(self, report: RoundReport, task: agent.TaskSpec) -> Outcome:
        """One agent run over the real tools, each call recorded in the report as it returns."""
        trace = agent.new_trace(task, self.config, self.chain)
        env = RecordingEnvironment(agent.ToolsEnvironment(self.rt), report.actions)
        outcome = agent.run_task(task, env, self.chain, self.limits, trace=trace)
        chats = [
            s
            for s in trace.spans()
            if s.attributes.get("gen_ai.operation.name") == "chat"
            and s.attributes.get("pideploy.model_name") != models.Playbook.name
        ]
        report.agent_runs.append(
            {
                "status": outcome.status,
                "error_class": outcome.error_class,
                "error": outcome.error,
                "cost_usd": outcome.cost_usd,
                "model_calls": len(chats),
                "playbook": outcome.playbook,
                "turns": outcome.turns,
                "trace_file": outcome.trace_file,
            }
        )
        return outcome

    def _play(self, report: RoundReport, steps: list[Step], ctx: tools.ToolContext) -> None:
        """The playbook: call each step's tool entry point in the round's trace and scope, its
        result or typed error recorded in the report as it returns. A lost database ends the
        round (the next one starts over from what it observes)."""
        with contextlib.suppress(PiDeployError):  # the values the recorded errors must not show
            ctx.trace.redactor = ctx.trace.redactor.including(tools.secret_values(self.rt))
        failures: list[tuple[str, str]] = []
        ended: RunTimedOut | None = None
        for step in steps:
            if time.monotonic() >= ctx.deadline:
                ended = RunTimedOut(self.limits.timeout_s)
                break
            failed = self._step(step, ctx)
            report.actions.append(action(step.tool, step.arguments, failed))
            failures += [failed] if failed else []
        error_class, error = (ended.error_class, ended.message) if ended else (None, None)
        if failures and not ended:
            error_class, error = failures[-1][0], "; ".join(message for _, message in failures)
        report.agent_runs.append(
            {
                "status": "failed" if error_class else "succeeded",
                "error_class": error_class,
                "error": error,
                "cost_usd": 0.0,
                "model_calls": 0,
                "playbook": True,
                "turns": 0,
                "trace_file": str(ctx.trace.path),
            }
        )

    def _step(self, step: Step, ctx: tools.ToolContext) -> tuple[str, str] | None:
        """One step, traced as a run traces a tool call: None, or its (error_class, error)."""
        attributes = {"gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": step.tool}
        with ctx.trace.span(f"execute_tool {step.tool}", **attributes) as span:
            try:
                REPAIRS[step.tool](self.rt, ctx, **step.arguments)
            except DatabaseError:
                raise
            except PiDeployError as error:
                span.fail(error)
                return failure(error, ctx.trace)
            except Exception as error:  # a tool bug must not end the round: logged, and recorded
                logger.exception("tool %s crashed", step.tool, extra={"action": "tool_crashed"})
                span.fail(error)
                return failure(error, ctx.trace)
        return None

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
                instances.record_event(self.rt, ctx, iid, "recovered", **detail)
                continue
            due = iso(counters.next_recovery_at)
            instances.record_event(self.rt, ctx, iid, "recovery_failed", **detail, next_recovery_at=due)
            giving_up += plan([drift], {iid: now_rows[iid]}, after.now, self.config)
        if giving_up:  # the last recovery of the streak failed: mark it error now, not a round later
            self._act(report, giving_up, ctx.trace)
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
                instances.record_event(
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
        """Instances this round marked error (its recorded mark_error calls that succeeded):
        alert, and clear their counters (an operator restarts them)."""
        for done in report.actions:
            arguments = done["arguments"] if isinstance(done["arguments"], dict) else {}
            iid = arguments.get("instance_id")
            if done["tool"] != "mark_error" or not done["ok"] or iid is None or iid in report.marked_error:
                continue
            report.marked_error.append(iid)
            self._write_counters({iid: CLEAR})
            reason = arguments.get("reason", "")
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
        handoff = Handoff()  # the follower hands the loop the instances `die` events name
        follower = threading.Thread(
            target=self._follow_events, args=(stop, handoff), name="heartbeat-events", daemon=True
        )
        if follow_events:
            follower.start()

        def wake_on_stop() -> None:
            stop.wait()
            handoff.wake.set()

        threading.Thread(target=wake_on_stop, name="heartbeat-stop", daemon=True).start()
        next_full = next_nginx_check = time.monotonic()
        retries: dict[int, float] = {}  # instance -> clock time its deferred recovery is due
        nginx_left_down = False  # the last round could not repair nginx: wait for the next one
        while not stop.is_set():
            targeted, full = handoff.take()
            full = full or time.monotonic() >= next_full
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
                    handoff.give_back(report.only)  # the round holding the lock may have looked too early
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
            handoff.wake.wait(max(0.0, min(waits)))
            handoff.wake.clear()
            if handoff.pending() and not stop.is_set():
                stop.wait(self.debounce)  # let a burst of die events arrive before the targeted round
        if follower.is_alive():
            follower.join(timeout=5)

    def _follow_events(self, stop: threading.Event, handoff: Handoff) -> None:
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
                        handoff.put(int(iid))
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
            handoff.put(full=True)  # events may have been missed meanwhile: look at everything


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

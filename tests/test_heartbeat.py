"""The heartbeat's pure parts (drift.py): diff, plan, backoff, counters and the round report.
No I/O, `now` injected."""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

import drift as dr
import heartbeat as hb
import runtime
from config import Config
from engine import LABEL_INSTANCE, LABEL_NAMESPACE, LABEL_USER, Container

NOW = 1_800_000_000.0
CONFIG = Config(home=Path("/nonexistent"))  # backoff 5 s, max 60 s, 3 failures, reset 300 s, stuck 600 s


def at(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, UTC)


def row(iid: int, status: str = "running", **columns: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "id": iid,
        "user_id": "alice",
        "name": f"i{iid}",
        "status": status,
        "container_id": f"c{iid:063d}",
        "port": 20000 + iid,
        "recovery_failures": 0,
        "next_recovery_at": None,
        "healthy_since": None,
        "last_error": None,
        "updated_at": at(NOW - 60),
        "route_token": f"{iid:032x}",
    }
    return {**base, **columns}


def key(iid: int) -> str:
    """The route key of row(iid) (proxy.route_key with route tokens on)."""
    return f"{iid}-{iid:032x}"


def container(iid: int | str, state: str = "running", **fields: Any) -> Container:
    labels = {LABEL_INSTANCE: str(iid), LABEL_USER: "alice", LABEL_NAMESPACE: "default"}
    ident = f"c{int(iid):063d}" if str(iid).isdigit() else f"x{iid}"
    values: dict[str, Any] = {
        "id": ident,
        "name": f"pideploy-default-{iid}",
        "image": "localhost/pideploy-gateway:latest",
        "state": state,
        "labels": labels,
        "host_port": 20000 + int(iid) if str(iid).isdigit() else None,
        **fields,
    }
    return Container(**values)


def observe(
    rows: list[dict[str, Any]],
    containers: list[Container],
    routes: dict[str, int] | None = None,
    probes: dict[int, dr.Probe] | None = None,
    busy: frozenset[int] = frozenset(),
    now: float = NOW,
) -> dr.Observation:
    """A consistent world unless told otherwise: routes for running rows, every probe ok."""
    if routes is None:
        routes = {key(r["id"]): r["port"] for r in rows if r["status"] == "running"}
    if probes is None:
        running = {c.labels[LABEL_INSTANCE] for c in containers if c.running}
        probes = {r["id"]: dr.Probe(True, "HTTP 200") for r in rows if str(r["id"]) in running}
    return dr.Observation(now, containers, rows, routes, probes, busy)


def kinds(drifts: list[dr.Drift]) -> list[tuple[str, int | None]]:
    return sorted(((d.kind, d.instance_id) for d in drifts), key=str)


# ---------------------------------------------------------------------------
# diff
# ---------------------------------------------------------------------------


def test_a_consistent_fleet_has_no_drift() -> None:
    rows = [row(1), row(2), row(3, "stopped"), row(4, "error", container_id=None)]
    containers = [container(1), container(2), container(3, "exited", exit_code=0)]
    assert dr.diff(observe(rows, containers), CONFIG) == []


def test_an_empty_fleet_has_no_drift() -> None:
    assert dr.diff(observe([], []), CONFIG) == []


def test_a_crashed_container_carries_its_exit_code_and_oom_flag() -> None:
    drifts = dr.diff(observe([row(1)], [container(1, "exited", exit_code=137, oom_killed=True)]), CONFIG)
    assert kinds(drifts) == [("container_exited", 1)]
    assert drifts[0].evidence["exit_code"] == 137
    assert drifts[0].evidence["oom_killed"] is True
    assert "exit code 137 (OOM killed)" in drifts[0].describe()


@pytest.mark.parametrize("state", ["exited", "dead", "created", "paused", "restarting"])
def test_any_state_but_running_is_an_exited_container(state: str) -> None:
    drifts = dr.diff(observe([row(1)], [container(1, state)]), CONFIG)
    assert kinds(drifts) == [("container_exited", 1)]


def test_a_failing_probe_is_an_unhealthy_container() -> None:
    obs = observe([row(1)], [container(1)], probes={1: dr.Probe(False, "HTTP 404")})
    drifts = dr.diff(obs, CONFIG)
    assert kinds(drifts) == [("container_unhealthy", 1)]
    assert drifts[0].evidence["probe"] == "HTTP 404"


def test_an_unprobed_instance_is_not_called_unhealthy() -> None:
    # A targeted round probes only the instances it was asked about.
    assert dr.diff(observe([row(1)], [container(1)], probes={}), CONFIG) == []


def test_a_running_row_without_its_container_is_missing() -> None:
    drifts = dr.diff(observe([row(1)], []), CONFIG)
    assert kinds(drifts) == [("container_missing", 1)]


def test_another_container_of_the_instance_does_not_stand_in_for_its_own() -> None:
    stray = dataclasses.replace(container(1), id="f" * 64, name="pideploy-default-1-old")
    drifts = dr.diff(observe([row(1)], [stray]), CONFIG)
    assert kinds(drifts) == [("container_missing", 1), ("stray_container", 1)]
    missing = next(d for d in drifts if d.kind == "container_missing")
    assert missing.evidence["other_containers"] == ["f" * 12]


def test_short_container_ids_match_full_ones() -> None:
    rows = [row(1, container_id="c" + "0" * 11)]
    assert dr.diff(observe(rows, [container(1)]), CONFIG) == []


def test_a_stopped_row_whose_container_runs() -> None:
    drifts = dr.diff(observe([row(1, "stopped")], [container(1)]), CONFIG)
    assert kinds(drifts) == [("stopped_but_running", 1)]


def test_a_stopped_row_with_a_stopped_or_no_container_is_fine() -> None:
    assert dr.diff(observe([row(1, "stopped")], [container(1, "exited", exit_code=0)]), CONFIG) == []
    assert dr.diff(observe([row(1, "stopped")], []), CONFIG) == []


def test_error_rows_are_left_alone() -> None:
    # The heartbeat stops at `error` until an operator starts the instance again: its recorded
    # container stays, for the operator to inspect.
    obs = observe([row(1, "error")], [container(1, "exited", exit_code=3)])
    assert dr.diff(obs, CONFIG) == []


def test_a_container_no_row_expects_is_a_stray() -> None:
    # A create killed on its last attempt: the row is `error` and records no container, yet the
    # container runs. Likewise an `-old` container an update could not remove, beside a running
    # or stopped row's own.
    killed_create = row(1, "error", container_id=None, port=None)
    old = dataclasses.replace(container(2), id="e" * 64, name="pideploy-default-2-old", state="exited")
    old3 = dataclasses.replace(old, id="d" * 64, labels={**old.labels, LABEL_INSTANCE: "3"})
    rows = [killed_create, row(2), row(3, "stopped")]
    drifts = dr.diff(observe(rows, [container(1), container(2), old, container(3, "exited"), old3]), CONFIG)
    assert kinds(drifts) == [("stray_container", 1), ("stray_container", 2), ("stray_container", 3)]
    by_id = {d.instance_id: d.evidence for d in drifts}
    assert by_id[1]["container_id"] == container(1).id
    assert by_id[1]["reason"] == "instance 1 is error and records no container"
    assert by_id[2]["container_id"] == "e" * 64 and "records container c000" in by_id[2]["reason"]


def test_a_labelled_container_without_a_row_is_an_orphan() -> None:
    drifts = dr.diff(observe([], [container(7, "exited"), container("junk")]), CONFIG)
    assert kinds(drifts) == [("orphan_container", 7), ("orphan_container", None)]
    assert {d.evidence["name"] for d in drifts} == {"pideploy-default-7", "pideploy-default-junk"}


def test_an_instance_label_of_other_digits_is_no_instance() -> None:
    # str.isdigit() is true of "\u00b2" (a superscript two), which int() refuses: no crash.
    odd = dataclasses.replace(container(1), labels={LABEL_INSTANCE: "\u00b2", LABEL_NAMESPACE: "default"})
    assert kinds(dr.diff(observe([], [odd]), CONFIG)) == [("orphan_container", None)]


def test_a_busy_instance_is_left_to_its_task() -> None:
    # An unfinished task (or a held lock) owns the instance: its dead container, its extra
    # container, its route and its transition are the task's, whatever they look like now.
    other = dataclasses.replace(container(1), id="f" * 64, name="pideploy-default-1-old")
    rows = [
        row(1, "updating"),
        row(2),
        row(3, "stopped"),
        row(4, "creating", updated_at=at(NOW - 3600)),
        row(5, "deleting", updated_at=at(NOW - 3600)),
    ]
    containers = [container(1, "exited"), other, container(2, "exited"), container(3), container(4)]
    routes = {key(1): 20001, key(3): 20003}  # 2's route is missing, 3's stale
    obs = observe(rows, containers, routes=routes, busy=frozenset({1, 2, 3, 4, 5}))
    assert dr.diff(obs, CONFIG) == []
    # Not busy, the same world is full of drift.
    assert kinds(dr.diff(observe(rows, containers, routes=routes), CONFIG)) == [
        ("container_exited", 2),
        ("interrupted_transition", 1),
        ("interrupted_transition", 4),
        ("route_missing", 2),
        ("route_stale", 3),
        ("stopped_but_running", 3),
        ("stuck_transition", 5),
    ]


def test_an_updating_instance_keeps_its_live_route() -> None:
    # Its port does not change in an update: removing the route mid-update only makes it flap.
    rows = [row(1, "updating"), row(2, "updating")]
    assert dr.diff(observe(rows, [], routes={key(1): 20001}, busy=frozenset({1, 2})), CONFIG) == []
    keys = {i: key(i) for i in range(1, 5)}
    assert runtime.wanted_routes(rows, keys, {key(1): 20001, key(2): 29999}) == {key(1): 20001}
    assert runtime.wanted_routes([row(3, "stopped"), row(4)], keys, {key(3): 20003}) == {key(4): 20004}


def test_nginx_not_serving_is_drift() -> None:
    obs = dataclasses.replace(observe([row(1)], [container(1)]), proxy_problem="nothing answers at x")
    drifts = dr.diff(obs, CONFIG)
    assert kinds(drifts) == [("nginx_down", None)]
    assert drifts[0].describe() == "nginx: nginx does not serve the route map: nothing answers at x"
    assert steps(drifts, [row(1)]) == [("nginx_sync", None)]


def test_a_running_instance_without_a_route() -> None:
    drifts = dr.diff(observe([row(1), row(2)], [container(1), container(2)], routes={key(1): 20001}), CONFIG)
    assert kinds(drifts) == [("route_missing", 2)]
    # The evidence names the route without its token: it reaches events, traces and the model.
    assert drifts[0].evidence == {"route": "2-<token>", "expected_port": 20002}


def test_a_route_to_the_wrong_port_or_for_no_running_instance_is_stale() -> None:
    rows = [row(1), row(2, "stopped")]
    routes = {key(1): 20999, key(2): 20002, "ghost": 21000}
    drifts = dr.diff(observe(rows, [container(1)], routes=routes), CONFIG)
    assert kinds(drifts) == [("route_stale", 1), ("route_stale", 2), ("route_stale", None)]
    by_route = {d.evidence["route"]: d.evidence for d in drifts}
    assert by_route["1-<token>"]["expected_port"] == 20001
    assert by_route["2-<token>"]["expected_port"] is None
    assert "route ghost" in next(d for d in drifts if d.instance_id is None).describe()


def test_a_route_key_in_the_other_form_is_stale() -> None:
    # After an upgrade the map still has `/i/<id>/` routes: they answer anyone, so they go.
    rows, containers = [row(1), row(2)], [container(1), container(2)]
    drifts = dr.diff(observe(rows, containers, routes={"1": 20001, key(2): 20002}), CONFIG)
    assert kinds(drifts) == [("route_missing", 1), ("route_stale", 1)]
    assert [s.tool for s in dr.plan(drifts, {1: rows[0]}, NOW, CONFIG)] == ["nginx_sync"]
    # An operator who fronts nginx with their own auth turns tokens off: then `<id>` is right.
    off = dataclasses.replace(CONFIG, route_tokens="off")
    drifts = dr.diff(observe(rows, containers, routes={"1": 20001, key(2): 20002}), off)
    assert kinds(drifts) == [("route_missing", 2), ("route_stale", 2)]
    everything = json.dumps([d.to_dict() for d in drifts]) + " ".join(d.describe() for d in drifts)
    assert f"{2:032x}" not in everything


def test_a_transition_with_no_task_is_interrupted_and_a_deleting_one_stuck_only_when_old() -> None:
    old = at(NOW - CONFIG.stuck_timeout - 1)
    rows = [
        row(1, "creating", updated_at=at(NOW - 60)),
        row(2, "updating", updated_at=old),  # a task is working on it
        row(3, "updating", updated_at=at(NOW - 60)),
        row(4, "updating", updated_at=at(NOW - 1)),  # too recent: its task or lock may not show yet
        row(5, "deleting", updated_at=at(NOW - 60)),  # too recent for a delete
        row(6, "deleting", updated_at=old),
    ]
    drifts = dr.diff(observe(rows, [], busy=frozenset({2})), CONFIG)
    assert kinds(drifts) == [
        ("interrupted_transition", 1),
        ("interrupted_transition", 3),
        ("stuck_transition", 6),
    ]
    assert drifts[0].evidence["status"] == "creating" and drifts[0].evidence["age_s"] == 60
    assert drifts[2].evidence["age_s"] == CONFIG.stuck_timeout + 1


def test_drift_dicts_are_json() -> None:
    drifts = dr.diff(observe([row(1, "creating", updated_at=at(0))], [container(9)]), CONFIG)
    assert json.loads(json.dumps([d.to_dict() for d in drifts]))


# ---------------------------------------------------------------------------
# backoff and counters
# ---------------------------------------------------------------------------


def test_backoff_doubles_up_to_its_cap() -> None:
    assert [dr.backoff(n, CONFIG) for n in range(7)] == [0, 5, 10, 20, 40, 60, 60]
    tight = dataclasses.replace(CONFIG, recovery_backoff=0.0)
    assert dr.backoff(5, tight) == 0


def test_after_an_attempt_the_streak_grows_and_the_next_one_waits() -> None:
    first = dr.after_attempt(row(1), healthy=True, now=NOW, config=CONFIG)
    assert first == dr.Counters(1, NOW + 5, NOW)
    second = dr.after_attempt(
        row(1, recovery_failures=1, next_recovery_at=at(NOW + 5)), healthy=False, now=NOW + 6, config=CONFIG
    )
    assert second == dr.Counters(2, NOW + 6 + 10, None)


def test_a_streak_ends_after_staying_healthy_for_healthy_reset() -> None:
    streak = row(1, recovery_failures=2, healthy_since=at(NOW - CONFIG.healthy_reset))
    assert dr.effective_failures(streak, NOW, CONFIG) == 0
    assert dr.after_attempt(streak, healthy=True, now=NOW, config=CONFIG).failures == 1
    recent = row(1, recovery_failures=2, healthy_since=at(NOW - 10))
    assert dr.effective_failures(recent, NOW, CONFIG) == 2


def test_recovery_due_at() -> None:
    assert dr.recovery_due_at(row(1), NOW, CONFIG) is None
    waiting = row(1, recovery_failures=1, next_recovery_at=at(NOW + 3))
    assert dr.recovery_due_at(waiting, NOW, CONFIG) == NOW + 3
    assert dr.recovery_due_at(waiting, NOW + 3, CONFIG) is None


def test_settle_marks_healthy_since_then_clears_the_streak() -> None:
    streak = row(1, recovery_failures=1, next_recovery_at=at(NOW - 1))
    obs = observe([streak], [container(1)])
    assert dr.settle(obs, [], CONFIG) == {1: dr.Counters(1, NOW - 1, NOW)}
    later = observe([row(1, recovery_failures=1, healthy_since=at(NOW))], [container(1)], now=NOW + 300)
    assert dr.settle(later, [], CONFIG) == {1: dr.CLEAR}
    meanwhile = observe([row(1, recovery_failures=1, healthy_since=at(NOW))], [container(1)], now=NOW + 299)
    assert dr.settle(meanwhile, [], CONFIG) == {}


def test_settle_clears_counters_of_instances_no_longer_running() -> None:
    rows = [row(1, "stopped", recovery_failures=2), row(2, "error", next_recovery_at=at(NOW + 9))]
    assert dr.settle(observe(rows, []), [], CONFIG) == {1: dr.CLEAR, 2: dr.CLEAR}


def test_settle_writes_nothing_for_a_healthy_fleet_or_unprobed_or_skipped_rows() -> None:
    rows = [row(1), row(2, recovery_failures=1), row(3, recovery_failures=1)]
    obs = observe(rows, [container(1), container(2), container(3)], probes={1: dr.Probe(True, "HTTP 200")})
    assert dr.settle(obs, [], CONFIG) == {}
    obs = observe(rows, [container(1), container(2), container(3)])
    assert dr.settle(obs, [2, 3], CONFIG) == {}


# ---------------------------------------------------------------------------
# plan
# ---------------------------------------------------------------------------


def steps(drifts: list[dr.Drift], rows: list[dict[str, Any]], now: float = NOW) -> list[tuple[str, Any]]:
    planned = dr.plan(drifts, {r["id"]: r for r in rows}, now, CONFIG)
    return [(s.tool, s.instance_id) for s in planned]


def drift(kind: str, iid: int | None, **evidence: Any) -> dr.Drift:
    return dr.Drift(kind, iid, evidence)


@pytest.mark.parametrize("kind", dr.DOWN)
def test_a_down_instance_is_started(kind: str) -> None:
    assert steps([drift(kind, 1)], [row(1)]) == [("instance_start", 1)]


def test_one_start_per_instance_however_many_drifts() -> None:
    drifts = [drift("container_exited", 1), drift("container_unhealthy", 1), drift("container_missing", 1)]
    assert steps(drifts, [row(1)]) == [("instance_start", 1)]


def test_no_start_while_the_backoff_runs() -> None:
    waiting = row(1, recovery_failures=1, next_recovery_at=at(NOW + 4))
    assert steps([drift("container_exited", 1)], [waiting]) == []
    assert steps([drift("container_exited", 1)], [waiting], now=NOW + 4) == [("instance_start", 1)]


def test_after_max_failures_the_instance_is_marked_error_with_the_reason() -> None:
    spent = row(1, recovery_failures=3, next_recovery_at=at(NOW + 60))
    planned = dr.plan([drift("container_exited", 1, state="exited", exit_code=3)], {1: spent}, NOW, CONFIG)
    assert [(s.tool, s.instance_id) for s in planned] == [("mark_error", 1)]
    assert "3 consecutive recoveries did not hold" in planned[0].arguments["reason"]
    assert "exit code 3" in planned[0].arguments["reason"]


def test_a_streak_that_held_long_enough_is_not_held_against_a_new_crash() -> None:
    held = row(1, recovery_failures=3, healthy_since=at(NOW - CONFIG.healthy_reset - 1))
    assert steps([drift("container_exited", 1)], [held]) == [("instance_start", 1)]


def test_a_stopped_instance_is_never_recovered() -> None:
    # The diff would not report it; a row that changed since must not be started either.
    assert steps([drift("container_exited", 1)], [row(1, "stopped")]) == []
    assert steps([drift("container_missing", 1)], [row(1, "updating")]) == []


def test_a_container_that_runs_against_a_stop_is_stopped() -> None:
    assert steps([drift("stopped_but_running", 1)], [row(1, "stopped")]) == [("instance_stop", 1)]


def test_route_drifts_need_one_nginx_sync_last() -> None:
    drifts = [
        drift("route_missing", 2),
        drift("route_stale", None, route="ghost"),
        drift("container_exited", 1),
    ]
    assert steps(drifts, [row(1), row(2)]) == [("instance_start", 1), ("nginx_sync", None)]


def test_orphans_and_strays_are_removed_but_an_unlabelled_container_is_only_reported() -> None:
    drifts = [
        drift("orphan_container", 9, container_id="a" * 64),
        drift("stray_container", 1, container_id="b" * 64),
        drift("orphan_container", None, container_id="c" * 64),
    ]
    planned = dr.plan(drifts, {1: row(1, "error")}, NOW, CONFIG)
    assert [(s.tool, s.instance_id, s.arguments) for s in planned] == [
        ("remove_stray_container", 9, {"container_id": "a" * 64}),
        ("remove_stray_container", 1, {"container_id": "b" * 64}),
    ]


def test_an_interrupted_transition_is_rolled_back() -> None:
    interrupted = drift("interrupted_transition", 4, status="updating", age_s=30)
    planned = dr.plan([interrupted], {4: row(4, "updating")}, NOW, CONFIG)
    assert [(s.tool, s.arguments) for s in planned] == [("instance_rollback", {"instance_id": 4})]


def test_a_stuck_instance_is_marked_error_with_the_reason() -> None:
    stuck = drift("stuck_transition", 4, status="deleting", age_s=900)
    planned = dr.plan([stuck], {4: row(4, "deleting")}, NOW, CONFIG)
    assert [(s.tool, s.instance_id) for s in planned] == [("mark_error", 4)]
    assert planned[0].arguments["reason"] == "stuck: instance 4: deleting for 900s with no task working on it"


def test_the_plan_orders_strays_rollbacks_stops_starts_errors_then_routes() -> None:
    drifts = [
        drift("route_missing", 5),
        drift("stuck_transition", 4, status="deleting", age_s=700),
        drift("container_exited", 3),
        drift("interrupted_transition", 6, status="updating"),
        drift("container_missing", 1),
        drift("stopped_but_running", 2),
        drift("stray_container", 1, container_id="f" * 64),
    ]
    rows = [row(1), row(2, "stopped"), row(3), row(4, "deleting"), row(5), row(6, "updating")]
    assert steps(drifts, rows) == [
        ("remove_stray_container", 1),
        ("instance_rollback", 6),
        ("instance_stop", 2),
        ("instance_start", 1),
        ("instance_start", 3),
        ("mark_error", 4),
        ("nginx_sync", None),
    ]


def test_plan_steps_are_what_the_playbook_reads() -> None:
    planned = dr.plan([drift("container_exited", 1)], {1: row(1)}, NOW, CONFIG)
    step = planned[0].to_dict()
    assert step["tool"] == "instance_start" and step["arguments"] == {"instance_id": 1}
    assert json.loads(json.dumps(step)) == step


def test_a_container_that_crashes_at_every_start_gets_exactly_three_recoveries() -> None:
    """The rules together, with a clock: start, start, start (each after its backoff), then error."""
    current = row(1)
    now, starts, marked = NOW, 0, False
    for _ in range(50):
        planned = dr.plan([drift("container_exited", 1, exit_code=3)], {1: current}, now, CONFIG)
        tools = [s.tool for s in planned]
        if tools == ["mark_error"]:
            marked = True
            break
        if tools == ["instance_start"]:
            starts += 1
            counters = dr.after_attempt(current, healthy=False, now=now, config=CONFIG)
            current = {
                **current,
                "recovery_failures": counters.failures,
                "next_recovery_at": at(counters.next_recovery_at or now),
                "healthy_since": None,
            }
        now += 1.0
    assert (starts, marked) == (3, True)
    assert now == NOW + 5 + 10 + 1  # started at 0, 5 and 15 s (the backoffs); given up right after


def test_a_container_that_answers_then_dies_is_not_restarted_forever() -> None:
    """Recoveries that 'succeed' but do not last count towards the limit too."""
    current, now = row(1), NOW
    for attempt in range(1, 4):
        assert steps([drift("container_exited", 1)], [current], now) == [("instance_start", 1)]
        counters = dr.after_attempt(current, healthy=True, now=now, config=CONFIG)
        assert counters.failures == attempt
        current = {
            **current,
            "recovery_failures": counters.failures,
            "next_recovery_at": at(counters.next_recovery_at or now),
            "healthy_since": at(now),
        }
        now += dr.backoff(attempt, CONFIG) + 10  # it dies 10 s after each backoff
    assert steps([drift("container_exited", 1)], [current], now) == [("mark_error", 1)]


# ---------------------------------------------------------------------------
# the report
# ---------------------------------------------------------------------------


def test_the_report_says_ok_only_without_unrepaired_drift() -> None:
    report = dr.RoundReport("cron", NOW)
    assert report.ok
    orphan = drift("orphan_container", None, name="pideploy-default-junk", state="exited")
    report.drifts, report.unrepaired = [orphan], [orphan]
    assert not report.ok
    text = report.render()
    assert "UNREPAIRED  orphan_container" in text and "reported only" in text
    data = report.to_dict()
    assert data["ok"] is False and data["unrepaired"][0]["kind"] == "orphan_container"
    assert json.loads(json.dumps(data)) == data


def test_a_skipped_report_is_ok_and_says_why() -> None:
    report = dr.RoundReport("cron", NOW, skipped=True)
    assert report.ok
    assert "another round holds the heartbeat lock" in report.render()


def test_die_events_reach_the_loop_as_one_handoff() -> None:
    """Several deaths before the loop takes them become one targeted round's instances."""
    handoff = hb.Handoff()
    handoff.put(3)
    handoff.put(5)
    handoff.put(3)
    assert handoff.wake.is_set() and handoff.pending()
    assert handoff.take() == ({3, 5}, False)
    assert handoff.take() == (set(), False) and not handoff.pending()
    handoff.put(full=True)  # the event stream broke: look at everything
    handoff.give_back([7])  # a skipped round's instances wait for the next one
    assert handoff.take() == ({7}, True)

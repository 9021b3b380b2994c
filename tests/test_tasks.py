"""The queue (tasks.py) on a real Postgres: dedupe, claim order, leases, reclaim, cancel, shutdown.

A fake runner stands in for the agent loop, except in the test that works a
hand-inserted task with the real loop (playbook) on MemoryEngine/MemoryProxy.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import db
import instances
import pideploy
import tasks
import tools
from db import Database, Row
from engine import MemoryEngine
from errors import BadRequest, Conflict, DatabaseError, NotFound, RunCrashed
from observability import Outcome
from proxy import MemoryProxy
from runtime import InstanceRow
from tests.conftest import make_config

pytestmark = pytest.mark.stack  # a real PostgreSQL (the `database` fixture)

LEASE = 0.3  # seconds: long enough for a claim, short enough that expiry tests are quick


def ok(result: dict[str, Any] | None = None) -> Outcome:
    return Outcome("succeeded", result or {"ok": True}, None, None, 1, 0.0, 0, "/tmp/trace.json")


def wait_until(predicate: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.02)


def instance(database: Database, name: str, user: str = "alice") -> int:
    row = database.one("instance_insert", user_id=user, name=name, image="img", config={})
    assert row is not None
    return int(row["id"])


def all_tasks(database: Database) -> list[Row]:
    return database.all("task_list", user_id=None, status=None, instance_id=None, limit=10_000)


def status(database: Database, task_id: int) -> Row:
    row = database.one("task_get", id=task_id)
    assert row is not None
    return row


@pytest.fixture
def queue(database: Database) -> tasks.Queue:
    return tasks.Queue(database, max_attempts=3)


@pytest.fixture
def pools() -> Iterator[list[tasks.WorkerPool]]:
    started: list[tasks.WorkerPool] = []
    yield started
    for pool in started:
        pool.shutdown(0.5, release_wait_s=0.5)


def start_pool(
    pools: list[tasks.WorkerPool], queue: tasks.Queue, runner: tasks.Runner, count: int = 1, **kw: Any
) -> tasks.WorkerPool:
    pool = tasks.WorkerPool(queue, lambda: runner, count, lease_s=kw.pop("lease_s", LEASE), **kw)
    pools.append(pool)
    pool.start()
    return pool


# --- params -----------------------------------------------------------------


def test_params_are_checked_like_the_tools_check_them() -> None:
    assert tasks.check_params("instance_create", {"name": "web-1"}) == {"name": "web-1"}
    tasks.check_params("instance_update", {"image": "x:1", "config": {"env": {"A": "b"}}})
    for task_type, params in [
        ("instance_create", {}),
        ("instance_create", {"name": "Bad_Name"}),
        ("instance_create", {"name": "ok", "extra": 1}),
        ("instance_create", {"name": "ok", "config": {"env": {"lower": "x"}}}),
        ("instance_stop", {"force": True}),
        ("instance_create", {"name": "ok", "config": {"instance": {"id": 1, "user": "bob"}}}),
        ("instance_create", {"name": "ok", "config": {"gateway": {"port": 1}}}),
        ("instance_update", {"config": {"instance": {"name": "web"}}}),
        ("instance_update", {"image": 5}),
        ("nope", {}),
        # `$` is the end of the input: a trailing newline is not part of a valid name or key.
        ("instance_create", {"name": "web\n"}),
        ("instance_create", {"name": "ok", "config": {"env": {"FOO\n": "x"}}}),
        ("instance_update", {"config": {"env": {"FOO\n": "x"}}}),
    ]:
        with pytest.raises(BadRequest):
            tasks.check_params(task_type, params)
    for user in ("alice\n", "alice\r\n", "\nalice", "alice\x00"):
        with pytest.raises(BadRequest):
            tasks.check_user(user)


# --- submitting -------------------------------------------------------------


def test_a_repeated_submission_returns_the_unfinished_task(queue: tasks.Queue, database: Database) -> None:
    iid = instance(database, "a")
    first = queue.submit_action("alice", "instance_stop", iid)
    again = queue.submit_action("alice", "instance_stop", iid)
    assert first.created and not again.created
    assert again.task["id"] == first.task["id"]
    # Once the first has finished, the same submission is a new task.
    claimed = queue.claim("w", LEASE)
    assert claimed is not None and claimed["id"] == first.task["id"]
    queue.finish(claimed["id"], "w", "succeeded", ok(), 0.1)
    assert queue.submit_action("alice", "instance_stop", iid).created


def test_stop_start_stop_are_three_tasks_in_order(queue: tasks.Queue, database: Database) -> None:
    # Only a repeat of the newest unfinished task is a duplicate: the last stop must not be
    # answered with the first one, or the instance would end up running.
    iid = instance(database, "a")
    submitted = [queue.submit_action("alice", kind, iid) for kind in ("instance_stop", "instance_start")]
    submitted.append(queue.submit_action("alice", "instance_stop", iid))
    assert all(s.created for s in submitted)
    assert len({s.task["id"] for s in submitted}) == 3
    update_v2 = queue.submit_action("alice", "instance_update", iid, {"image": "img:2"})
    update_v3 = queue.submit_action("alice", "instance_update", iid, {"image": "img:3"})
    assert update_v2.created and update_v3.created  # same action, other params: not a repeat
    assert not queue.submit_action("alice", "instance_update", iid, {"image": "img:3"}).created
    order = []
    while (claimed := queue.claim("w", LEASE)) is not None:
        order.append((claimed["type"], claimed["params"]))
        queue.finish(claimed["id"], "w", "succeeded", ok(), 0.1)
    assert order == [
        ("instance_stop", {}),
        ("instance_start", {}),
        ("instance_stop", {}),
        ("instance_update", {"image": "img:2"}),
        ("instance_update", {"image": "img:3"}),
    ]


def test_an_idempotency_key_answers_only_its_own_request(queue: tasks.Queue, database: Database) -> None:
    iid, other = instance(database, "a"), instance(database, "b")
    keyed = queue.submit_action("alice", "instance_stop", iid, idempotency_key="k1")
    plain = queue.submit_action("alice", "instance_start", iid)
    retried = queue.submit_action("alice", "instance_stop", iid, idempotency_key="k1")
    assert keyed.created and plain.created and not retried.created
    assert retried.task["id"] == keyed.task["id"]  # a retry, though a start was queued since
    before = all_tasks(database)
    for task_type, target in [("instance_delete", other), ("instance_start", iid), ("instance_stop", other)]:
        with pytest.raises(Conflict, match="held by task"):
            queue.submit_action("alice", task_type, target, idempotency_key="k1")
    assert all_tasks(database) == before
    # bob's k1 is his own.
    bobs = instance(database, "c", user="bob")
    assert queue.submit_action("bob", "instance_stop", bobs, idempotency_key="k1").created


def test_an_idempotency_key_taken_meanwhile_for_another_instance_is_a_conflict(
    queue: tasks.Queue, database: Database
) -> None:
    # Two instances share no row lock: a request for B can pass the key check while one for A
    # holds the key uncommitted. When A commits, B's insert finds A's task: B must not get it.
    a, b = instance(database, "a"), instance(database, "b")
    outcome: list[object] = []
    with database.transaction() as conn:
        conn.execute(
            "INSERT INTO task (type, params, instance_id, user_id, dedupe_key) "
            "VALUES ('instance_stop', '{}', %s, 'alice', 'idem:alice:k')",
            (a,),
        )

        def other() -> None:
            try:
                outcome.append(queue.submit_action("alice", "instance_start", b, idempotency_key="k"))
            except Conflict as conflict:
                outcome.append(conflict)

        racer = threading.Thread(target=other)
        racer.start()
        time.sleep(0.5)  # the racer is now blocked on the unique index, behind our insert
        assert not outcome
    racer.join(10)
    assert len(outcome) == 1 and isinstance(outcome[0], Conflict), outcome
    assert "held by task" in outcome[0].message
    assert database.all("task_unfinished_for_instance", instance_id=b) == []


def test_an_instance_whose_create_failed_can_only_be_deleted(queue: tasks.Queue, database: Database) -> None:
    iid = instance(database, "broken")
    with database.transaction() as conn:  # as instance_create's rollback leaves it
        conn.execute(
            "UPDATE instance SET status = 'error', last_error = 'image missing' WHERE id = %s", (iid,)
        )
    for task_type in ("instance_start", "instance_stop", "instance_update"):
        params = {"image": "img:2"} if task_type == "instance_update" else {}
        with pytest.raises(Conflict, match="its create failed \\(image missing\\); delete it"):
            queue.submit_action("alice", task_type, iid, params)
    assert database.all("task_unfinished_for_instance", instance_id=iid) == []
    assert queue.submit_action("alice", "instance_delete", iid).created
    # Half built (a storage folder and a port), as a create killed on its last attempt leaves it.
    half = instance(database, "half")
    with database.transaction() as conn:
        conn.execute(
            "UPDATE instance SET status = 'error', storage_path = '/tmp/x', port = 20001,"
            " last_error = 'worker gone' WHERE id = %s",
            (half,),
        )
    with pytest.raises(Conflict, match="its create failed \\(worker gone\\)"):
        queue.submit_action("alice", "instance_start", half)
    # An instance that was created and is error since (the heartbeat gave up on it) may be started.
    given_up = instance(database, "given-up")
    with database.transaction() as conn:
        conn.execute(
            "UPDATE instance SET status = 'error', last_error = '3 recoveries failed' WHERE id = %s",
            (given_up,),
        )
        database.one(
            "event_insert",
            conn,
            instance_id=given_up,
            user_id="alice",
            task_id=None,
            kind="created",
            detail={},
        )
    assert queue.submit_action("alice", "instance_start", given_up).created


def test_create_inserts_the_instance_and_its_task_together(queue: tasks.Queue, database: Database) -> None:
    row, submitted = queue.submit_create("alice", "web", {"env": {"A": "1"}}, "img:1", None)
    assert row["status"] == "creating" and row["image"] == "img:1"
    assert submitted.task["instance_id"] == row["id"] and submitted.task["type"] == "instance_create"
    repeat_row, repeat = queue.submit_create("alice", "web", {"env": {"A": "1"}}, "img:1", None)
    assert repeat_row["id"] == row["id"] and repeat.task["id"] == submitted.task["id"] and not repeat.created
    # bob may use the same name; alice may not create a second "web" once the first is done.
    queue.submit_create("bob", "web", None, "img:1", None)
    claimed = queue.claim("w", LEASE)
    assert claimed is not None
    queue.finish(claimed["id"], "w", "succeeded", ok(), 0.1)
    with pytest.raises(Conflict):
        queue.submit_create("alice", "web", None, "img:1", None)


def test_a_create_with_an_existing_name_is_a_repeat_only_with_the_same_config(
    queue: tasks.Queue, database: Database
) -> None:
    row, first = queue.submit_create("alice", "web", None, "img", None)
    same_row, same = queue.submit_create("alice", "web", {}, "img", None)  # no config is {}
    assert (same_row["id"], same.task["id"], same.created) == (row["id"], first.task["id"], False)
    before = all_tasks(database)
    with pytest.raises(Conflict, match="an instance named 'web' already exists"):
        queue.submit_create("alice", "web", {"env": {"A": "1"}}, "img", None)
    assert all_tasks(database) == before
    assert database.one("instance_get", id=row["id"])["config"] == {}  # type: ignore[index]


def test_an_idempotency_key_answers_only_its_own_create(queue: tasks.Queue, database: Database) -> None:
    row, keyed = queue.submit_create("alice", "web", None, "img", "k1")
    again_row, again = queue.submit_create("alice", "web", None, "img", "k1")
    assert (again_row["id"], again.task["id"], again.created) == (row["id"], keyed.task["id"], False)
    stop = queue.submit_action("alice", "instance_stop", instance(database, "other"), idempotency_key="k2")
    before = (all_tasks(database), database.all("instance_list_for_user", user_id="alice"))
    for name, config, key, holder in [
        ("web-2", None, "k1", keyed.task["id"]),  # another name under the create's key
        ("web", {"env": {"A": "1"}}, "k1", keyed.task["id"]),  # the same name, another config
        ("web-3", None, "k2", stop.task["id"]),  # a key held by a stop
    ]:
        with pytest.raises(Conflict, match=f"is held by task {holder}, a different request") as refused:
            queue.submit_create("alice", name, config, "img", key)
        assert refused.value.data["task_id"] == holder
    assert (all_tasks(database), database.all("instance_list_for_user", user_id="alice")) == before
    # bob's k1 is his own.
    assert queue.submit_create("bob", "web-2", None, "img", "k1")[1].created


def test_a_create_key_taken_meanwhile_by_another_request_is_a_conflict_and_leaves_no_row(
    queue: tasks.Queue, database: Database
) -> None:
    # The key check passes while another request holds the key uncommitted; our insert then finds
    # its task: we must not answer with it, nor leave our instance row without a task.
    other = instance(database, "other")
    outcome: list[object] = []
    with database.transaction() as conn:
        conn.execute(
            "INSERT INTO task (type, params, instance_id, user_id, dedupe_key) "
            "VALUES ('instance_stop', '{}', %s, 'alice', 'idem:alice:k')",
            (other,),
        )

        def create() -> None:
            try:
                outcome.append(queue.submit_create("alice", "new", None, "img", "k"))
            except Conflict as conflict:
                outcome.append(conflict)

        racer = threading.Thread(target=create)
        racer.start()
        time.sleep(0.5)  # the racer is now blocked on the unique index, behind our insert
        assert not outcome
    racer.join(10)
    assert len(outcome) == 1 and isinstance(outcome[0], Conflict), outcome
    assert "held by task" in outcome[0].message
    assert database.one("instance_by_name", user_id="alice", name="new") is None


def test_a_heartbeat_under_a_key_held_by_another_request_is_a_conflict(
    queue: tasks.Queue, database: Database
) -> None:
    iid = instance(database, "a", user=tasks.SYSTEM_USER)  # a user may be called "system"
    stop = queue.submit_action(tasks.SYSTEM_USER, "instance_stop", iid, idempotency_key="k")
    with pytest.raises(Conflict, match=f"held by task {stop.task['id']}"):
        queue.submit_heartbeat({}, "k")
    first = queue.submit_heartbeat({}, "h")
    assert first.created and queue.submit_heartbeat({}, "h").task["id"] == first.task["id"]


def test_concurrent_twin_creates_make_one_instance(queue: tasks.Queue, database: Database) -> None:
    results: list[tuple[InstanceRow, tasks.Submitted]] = []
    barrier = threading.Barrier(4)

    def twin() -> None:
        barrier.wait()
        results.append(queue.submit_create("alice", "twin", None, "img", None))

    threads = [threading.Thread(target=twin) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 4  # every twin is answered with the one task (none raises)
    assert len({r[0]["id"] for r in results}) == 1
    assert len({r[1].task["id"] for r in results}) == 1
    assert sum(r[1].created for r in results) == 1
    assert len(database.all("instance_list_for_user", user_id="alice")) == 1


def test_actions_respect_ownership_and_deleting(queue: tasks.Queue, database: Database) -> None:
    iid = instance(database, "mine")
    with pytest.raises(NotFound):
        queue.submit_action("mallory", "instance_stop", iid)
    with pytest.raises(NotFound):
        queue.submit_action("alice", "instance_stop", 999_999)
    queue.submit_action("alice", "instance_delete", iid)
    with pytest.raises(Conflict):
        queue.submit_action("alice", "instance_start", iid)
    # A repeat of the delete itself is still answered with the delete task.
    assert not queue.submit_action("alice", "instance_delete", iid).created


# --- claiming ---------------------------------------------------------------


def test_tasks_of_one_instance_run_in_submission_order(queue: tasks.Queue, database: Database) -> None:
    a, b = instance(database, "a"), instance(database, "b")
    create = queue.submit("instance_create", "alice", {"name": "a"}, a, "c-a").task
    stop = queue.submit("instance_stop", "alice", {}, a, "s-a").task
    other = queue.submit("instance_start", "alice", {}, b, "s-b").task
    first = queue.claim("w1", LEASE)
    second = queue.claim("w2", LEASE)
    assert first is not None and first["id"] == create["id"]
    assert second is not None and second["id"] == other["id"]  # the stop waits for the create
    assert queue.claim("w3", LEASE) is None
    queue.finish(create["id"], "w1", "succeeded", ok(), 0.1)
    third = queue.claim("w3", LEASE)
    assert third is not None and third["id"] == stop["id"]


def test_concurrent_workers_never_overlap_an_instance(
    queue: tasks.Queue, database: Database, pools: list[tasks.WorkerPool]
) -> None:
    instances = [instance(database, f"i{n}") for n in range(3)]
    submitted: dict[int, list[int]] = {i: [] for i in instances}
    for n in range(8):
        for iid in instances:
            task = queue.submit("instance_start", "alice", {}, iid, f"k{n}-{iid}").task
            submitted[iid].append(task["id"])
    lock = threading.Lock()
    running: set[int] = set()
    ran: dict[int, list[int]] = {i: [] for i in instances}
    overlaps: list[int] = []

    def runner(task: Row, cancelled: tasks.Cancelled) -> Outcome:
        with lock:
            if task["instance_id"] in running:
                overlaps.append(task["instance_id"])
            running.add(task["instance_id"])
            ran[task["instance_id"]].append(task["id"])
        time.sleep(0.005)
        with lock:
            running.discard(task["instance_id"])
        return ok()

    start_pool(pools, queue, runner, count=4, poll_interval=0.05)
    wait_until(
        lambda: not database.all("task_list", user_id=None, status="queued", instance_id=None, limit=1)
    )
    wait_until(
        lambda: not database.all("task_list", user_id=None, status="running", instance_id=None, limit=1)
    )
    assert overlaps == []
    assert ran == submitted  # each instance's tasks, one at a time, in submission order


def test_an_expired_lease_is_reclaimed_and_attempts_count_claims(
    queue: tasks.Queue, database: Database
) -> None:
    task = queue.submit("heartbeat", "system").task
    claimed = queue.claim("dead-worker", 0.05)
    assert claimed is not None and claimed["attempts"] == 1
    assert queue.claim("w2", LEASE) is None  # the lease is still live
    time.sleep(0.1)
    reclaimed = queue.claim("w2", LEASE)
    assert reclaimed is not None and reclaimed["id"] == task["id"]
    assert reclaimed["attempts"] == 2 and reclaimed["locked_by"] == "w2"
    # The dead worker's late renewal and result are refused: the task is w2's now.
    assert queue.renew(task["id"], "dead-worker", LEASE) is None
    assert queue.finish(task["id"], "dead-worker", "succeeded", ok(), 0.1) is None
    assert queue.renew(task["id"], "w2", LEASE) is False


def test_a_task_out_of_attempts_fails_with_the_last_error(queue: tasks.Queue, database: Database) -> None:
    short = tasks.Queue(database, max_attempts=2, sweep_every=0)
    iid = instance(database, "doomed")
    task = short.submit("instance_create", "alice", {"name": "doomed"}, iid, "c").task
    for _ in range(2):
        assert short.claim("w", 0.05) is not None
        time.sleep(0.1)
    assert short.claim("w", LEASE) is None  # no attempts left: failed, not claimed
    row = status(database, task["id"])
    assert row["status"] == "failed" and row["attempts"] == 2
    assert "stopped renewing its lease" in row["last_error"] and "attempt 2 of 2" in row["last_error"]
    # The instance it was creating is left in error, not `creating` forever.
    inst = database.one("instance_get", id=iid)
    assert inst is not None and inst["status"] == "error"


def test_a_create_that_ends_without_building_leaves_its_instance_error(
    queue: tasks.Queue, database: Database
) -> None:
    # A model that never called instance_create (stuck, out of turns, over its cap) left the row
    # `creating` until the heartbeat's stuck timeout, ten minutes later.
    row, submitted = queue.submit_create("alice", "unbuilt", None, "img", None)
    claimed = queue.claim("w", LEASE)
    assert claimed is not None and claimed["id"] == submitted.task["id"]
    stuck = Outcome("failed", None, "agent_stuck", "no report_result after 12 turns", 12, 0.0, 0, "")
    assert queue.finish(claimed["id"], "w", "failed", stuck, 1.0) is not None
    inst = database.one("instance_get", id=row["id"])
    assert inst is not None and inst["status"] == "error"
    assert "no report_result after 12 turns" in inst["last_error"]
    events = database.all("event_list_for_instance", instance_id=row["id"], limit=10)
    assert events[0]["kind"] == "create_failed" and events[0]["task_id"] == claimed["id"]
    # A create that succeeded, or an instance the tool already moved on, is left alone.
    built, done = queue.submit_create("alice", "built", None, "img", None)
    with database.transaction() as conn:  # as the tool leaves it
        conn.execute(
            "UPDATE instance SET status = 'running', last_error = NULL WHERE id = %s", (built["id"],)
        )
    assert queue.claim("w", LEASE) is not None
    queue.finish(done.task["id"], "w", "failed", stuck, 1.0)
    assert (database.one("instance_get", id=built["id"]) or {})["status"] == "running"


def test_release_gives_the_attempt_back(queue: tasks.Queue, database: Database) -> None:
    task = queue.submit("heartbeat", "system").task
    assert queue.claim("w", LEASE) is not None
    released = queue.release(task["id"], "w")
    assert released is not None
    assert released["status"] == "queued" and released["attempts"] == 0 and released["locked_by"] is None
    assert queue.release(task["id"], "w") is None


# --- cancelling -------------------------------------------------------------


def test_cancel_a_queued_task_and_its_waiting_create(queue: tasks.Queue, database: Database) -> None:
    row, submitted = queue.submit_create("alice", "never", None, "img", None)
    cancelled = queue.cancel(submitted.task["id"], "alice")
    assert cancelled["status"] == "cancelled" and cancelled["error_class"] == "cancelled"
    inst = database.one("instance_get", id=row["id"])
    assert inst is not None and inst["status"] == "error"
    with pytest.raises(Conflict):
        queue.cancel(submitted.task["id"])
    with pytest.raises(NotFound):
        queue.cancel(submitted.task["id"], "mallory")


def test_cancel_a_running_task_stops_it_at_lease_renewal(
    queue: tasks.Queue, database: Database, pools: list[tasks.WorkerPool]
) -> None:
    started = threading.Event()

    def runner(task: Row, cancelled: tasks.Cancelled) -> Outcome:
        started.set()
        while not cancelled():
            time.sleep(0.01)
        return Outcome("failed", None, "cancelled", "the task was cancelled", 1, 0.0, 0, "")

    task = queue.submit("heartbeat", "system").task
    start_pool(pools, queue, runner, poll_interval=0.05)
    assert started.wait(10)
    assert queue.cancel(task["id"])["status"] == "running"
    wait_until(lambda: status(database, task["id"])["status"] == "cancelled")
    assert status(database, task["id"])["error_class"] == "cancelled"


# --- workers ----------------------------------------------------------------


def test_a_run_that_raises_is_retried_then_recorded(
    queue: tasks.Queue, database: Database, pools: list[tasks.WorkerPool]
) -> None:
    calls: list[int] = []

    def runner(task: Row, cancelled: tasks.Cancelled) -> Outcome:
        calls.append(task["attempts"])
        if len(calls) == 1:
            raise RuntimeError("flaky infrastructure")
        return ok({"done": True})

    task = queue.submit("heartbeat", "system").task
    start_pool(pools, queue, runner, lease_s=0.6, poll_interval=0.05)
    wait_until(lambda: status(database, task["id"])["status"] == "succeeded")
    row = status(database, task["id"])
    assert calls == [1, 2] and row["attempts"] == 2 and row["result"] == {"done": True}
    assert row["trace_file"] == "/tmp/trace.json" and row["duration_s"] is not None


def test_a_run_that_crashes_on_its_last_attempt_keeps_its_trace(
    queue: tasks.Queue, database: Database, pools: list[tasks.WorkerPool]
) -> None:
    def runner(task: Row, cancelled: tasks.Cancelled) -> Outcome:
        cause = DatabaseError("database unavailable: connection lost")
        raise RunCrashed(cause, "infra_unavailable", f"task-{task['id']}-{task['attempts']}.json") from cause

    task = queue.submit("heartbeat", "system").task
    start_pool(pools, queue, runner, lease_s=0.6, poll_interval=0.05)
    wait_until(lambda: status(database, task["id"])["status"] == "failed", timeout=30)
    row = status(database, task["id"])
    last = row["max_attempts"]
    assert row["trace_file"] == f"task-{task['id']}-{last}.json" and row["error_class"] == "infra_unavailable"
    assert (
        row["last_error"]
        == f"DatabaseError: database unavailable: connection lost (attempt {last} of {last})"
    )


def test_notify_wakes_an_idle_worker(
    queue: tasks.Queue, database: Database, pools: list[tasks.WorkerPool]
) -> None:
    # Polling every 60 s: only the NOTIFY can get this task worked within the wait below.
    start_pool(pools, queue, lambda task, cancelled: ok(), poll_interval=60)
    time.sleep(0.5)  # let the worker go idle and the listener subscribe
    task = queue.submit("heartbeat", "system").task
    wait_until(lambda: status(database, task["id"])["status"] == "succeeded", timeout=20)


def test_shutdown_waits_the_grace_period_then_releases(queue: tasks.Queue, database: Database) -> None:
    started = threading.Event()

    def slow(task: Row, cancelled: tasks.Cancelled) -> Outcome:
        started.set()
        while not cancelled():
            time.sleep(0.01)
        return Outcome("failed", None, "cancelled", "the task was cancelled", 1, 0.0, 0, "")

    task = queue.submit("heartbeat", "system").task
    pool = tasks.WorkerPool(queue, lambda: slow, 1, lease_s=LEASE, poll_interval=0.05)
    pool.start()
    assert started.wait(10)
    assert pool.shutdown(grace_s=0.2) == [task["id"]]
    row = status(database, task["id"])
    assert row["status"] == "queued" and row["attempts"] == 0 and row["locked_by"] is None


def test_shutdown_lets_a_short_task_finish(queue: tasks.Queue, database: Database) -> None:
    started = threading.Event()

    def short(task: Row, cancelled: tasks.Cancelled) -> Outcome:
        started.set()
        time.sleep(0.2)
        return ok()

    task = queue.submit("heartbeat", "system").task
    pool = tasks.WorkerPool(queue, lambda: short, 1, lease_s=LEASE, poll_interval=0.05)
    pool.start()
    assert started.wait(10)
    assert pool.shutdown(grace_s=10) == []
    assert status(database, task["id"])["status"] == "succeeded"


# --- the real loop on a hand-inserted task -----------------------------------


def test_a_hand_inserted_task_is_worked_by_the_agent_loop(
    database: Database, tmp_path: Path, pools: list[tasks.WorkerPool]
) -> None:
    config = make_config(tmp_path, agent="off", image="localhost/pideploy-gateway:latest")
    engine = MemoryEngine()
    rt = tools.Runtime(config, database, engine, MemoryProxy())
    with database.transaction() as conn:  # the row as a submission makes it, then the task by hand
        row = instances.request_create(database, conn, "alice", "byhand", config.image, None)
        conn.execute(
            "INSERT INTO task (type, user_id, params, instance_id)"
            " VALUES ('instance_create', 'alice', '{\"name\": \"byhand\"}', %s)",
            (row["id"],),
        )
    queue = tasks.Queue(database)
    start_pool(pools, queue, pideploy.task_runner(rt, config), lease_s=5, poll_interval=0.1)
    wait_until(
        lambda: (
            database.all("task_list", user_id="alice", status=None, instance_id=None, limit=1)[0][
                "finished_at"
            ]
            is not None
        )
    )
    task = database.all("task_list", user_id="alice", status=None, instance_id=None, limit=1)[0]
    assert task["status"] == "succeeded", task["last_error"]
    inst = database.one("instance_by_name", user_id="alice", name="byhand")
    assert inst is not None and inst["status"] == "running" and task["instance_id"] == inst["id"]
    assert Path(task["trace_file"]).is_file() and task["turns"] >= 2
    engine.close()


def test_a_hand_inserted_create_with_no_instance_row_is_refused_at_claim(
    queue: tasks.Queue, database: Database
) -> None:
    # Every create is submitted with its row (submit_create); a task inserted without one is
    # refused as a bad request, not built from its params.
    with database.transaction() as conn:
        conn.execute(
            "INSERT INTO task (type, user_id, params) VALUES ('instance_create', 'alice', '{\"name\": \"byhand\"}')"
        )
    stop = queue.submit("heartbeat", "system").task
    claimed = queue.claim("w1", lease_s=5)
    assert claimed is not None and claimed["id"] == stop["id"]  # the refused one is skipped
    task = database.all("task_list", user_id="alice", status=None, instance_id=None, limit=1)[0]
    assert (task["status"], task["error_class"]) == ("failed", "bad_request")
    assert "has no instance row" in task["last_error"]
    assert database.one("instance_by_name", user_id="alice", name="byhand") is None


def test_an_invalid_user_is_refused_in_words_before_anything_is_written(
    queue: tasks.Queue, database: Database
) -> None:
    with pytest.raises(BadRequest, match="invalid user"):
        queue.submit("heartbeat", "bad user!")
    with pytest.raises(BadRequest, match="invalid user"):
        queue.submit_create("bad user!", "x", None, "img", None)
    assert database.all("instance_list_all") == []
    assert sum(int(r["n"]) for r in database.all("metrics_tasks")) == 0


def test_the_listener_says_once_that_it_lost_the_database_and_once_that_it_is_back(
    tmp_path: Path, pg_home: Path, caplog: pytest.LogCaptureFixture
) -> None:
    postgres = db.Postgres(make_config(tmp_path, home=pg_home))
    cluster, bindir = postgres.embedded, db.find_server_bindir()
    assert cluster is not None and bindir is not None
    wakeup, stop = tasks.Wakeup(), threading.Event()
    listener = tasks.Listener(postgres.db, wakeup, stop, retry_s=0.1)
    caplog.set_level(logging.INFO, logger="tasks")
    listener.start()
    try:
        wait_until(lambda: wakeup.token() > 0)  # listening
        stopped = cluster._pg(bindir, "pg_ctl", "stop", "-m", "fast", "-w", "-D", str(cluster.data))
        assert stopped.returncode == 0, stopped.stderr
        time.sleep(3)  # thirty retries' worth at 0.1 s apiece
        assert cluster.revive()
        wait_until(
            lambda: any(getattr(r, "action", "") == "listener_back" for r in caplog.records), timeout=60
        )
    finally:
        stop.set()
        listener.join(10)
        postgres.close()
    said = [getattr(r, "action", "") for r in caplog.records]
    assert (said.count("listener_error"), said.count("listener_back")) == (1, 1)

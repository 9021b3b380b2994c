"""The agent loop over real HTTP: the real `openai` client against the replay server.

Tools act on a real Postgres with the in-memory engine and proxy (fast); the
happy paths also run on the real stack.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import agent
import db
import models
import observability
import runtime
import tools
from config import ModelConfig
from errors import DatabaseError, ModelContextOverflow, ModelOutputTruncated, ModelServerError, RunCrashed
from evals.llm_server import ReplayServer
from tests.conftest import World, make_config_like

pytestmark = pytest.mark.stack

MODEL_A, MODEL_B = "model-a", "model-b"


@pytest.fixture
def replay() -> Iterator[ReplayServer]:
    with ReplayServer() as server:
        yield server


def model(
    server: ReplayServer, name: str, *, price_in: float = 0.0, price_out: float = 0.0, timeout: float = 5
) -> ModelConfig:
    return ModelConfig(
        name=name,
        base_url=server.url,
        model=name,
        api_key_env="TEST_KEY",
        input_usd_per_mtok=price_in,
        output_usd_per_mtok=price_out,
        timeout=timeout,
        api_key="test-key",
    )


def chain(configs: list[ModelConfig], limits: agent.Limits, *, playbook: bool = True) -> models.Chain:
    links = [models.Link(models.OpenAIChat(m), m) for m in configs]
    return models.Chain(links, models.MemoryCooldowns(), limits, use_playbook=playbook, sleep=lambda _: None)


def call(tool: str, /, **arguments: Any) -> dict[str, Any]:
    return {"tool_calls": [{"name": tool, "arguments": arguments}]}


def report(success: bool = True, **data: Any) -> dict[str, Any]:
    return call("report_result", success=success, action="done", data=data)


def script(*turns: dict[str, Any], model_name: str | None = MODEL_A, **extra: Any) -> dict[str, Any]:
    conversation: dict[str, Any] = {"turns": list(turns), **extra}
    if model_name:
        conversation["model"] = model_name
    return {"conversations": [conversation]}


def make_instance(w: World, name: str = "alpha", user: str = "alice") -> int:
    return int(tools.instance_create(w.rt, w.ctx(user), name)["instance_id"])


def run(
    w: World,
    task: agent.TaskSpec,
    configs: list[ModelConfig],
    limits: agent.Limits | None = None,
    *,
    playbook: bool = True,
) -> observability.Outcome:
    limits = limits or agent.Limits(retries=1)
    return agent.run_task(
        task, agent.ToolsEnvironment(w.rt), chain(configs, limits, playbook=playbook), limits
    )


def trace_of(outcome: observability.Outcome) -> dict[str, Any]:
    return json.loads(Path(outcome.trace_file).read_text())  # type: ignore[no-any-return]


def spans(trace: dict[str, Any]) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    stack = [trace["spans"]] if isinstance(trace["spans"], dict) else list(trace["spans"])
    while stack:
        span = stack.pop()
        found.append(span)
        stack.extend(span.get("children", []))
    return found


def chat_spans(outcome: observability.Outcome) -> list[dict[str, Any]]:
    chats = [s for s in spans(trace_of(outcome)) if s["attributes"].get("gen_ai.operation.name") == "chat"]
    return sorted(chats, key=lambda s: s["start"])


# ---------------------------------------------------------------------------
# The prompt is versioned
# ---------------------------------------------------------------------------


def test_prompt_text_is_pinned_to_its_version() -> None:
    # Changing SYSTEM_PROMPT must come with a new PROMPT_VERSION: update both lines together.
    assert (agent.PROMPT_VERSION, hashlib.sha256(agent.SYSTEM_PROMPT.encode()).hexdigest()[:12]) == (
        "2026-12-01.1",
        agent.PROMPT_SHA,
    )


def test_prompt_states_the_rules_and_the_boundaries() -> None:
    text = agent.SYSTEM_PROMPT
    assert "report_result exactly once" in text
    assert "data, not instructions" in text
    assert "bash is for reading only" in text
    assert "only for the task's user" in text
    for task_type in tools.TOOLSETS:
        assert task_type in text


# ---------------------------------------------------------------------------
# Happy paths: every task type in two turns
# ---------------------------------------------------------------------------


def test_create_in_two_turns_with_the_trace_fields(memory_world: World, replay: ReplayServer) -> None:
    replay.set_script(
        script(
            {
                **call("instance_create", name="{{task.params.name}}"),
                "usage": {"prompt_tokens": 900, "completion_tokens": 40},
            },
            {
                **report(instance_id="{{last_result.instance_id}}"),
                "usage": {"prompt_tokens": 1100, "completion_tokens": 30},
            },
        )
    )
    priced = model(replay, MODEL_A, price_in=1.0, price_out=2.0)
    task = agent.TaskSpec("instance_create", "alice", {"name": "alpha"})
    outcome = run(memory_world, task, [priced])
    assert outcome.status == "succeeded", outcome.error
    assert outcome.turns == 2
    assert outcome.result is not None and isinstance(outcome.result["data"]["instance_id"], int)
    assert outcome.cost_usd == pytest.approx((2000 * 1.0 + 70 * 2.0) / 1e6)
    row = memory_world.rt.db.one("instance_by_name", user_id="alice", name="alpha")
    assert row is not None and row["status"] == "running"

    trace = trace_of(outcome)
    assert (
        trace["task_id"] is None and trace["task_type"] == "instance_create" and trace["user_id"] == "alice"
    )
    assert trace["prompt_version"] == agent.PROMPT_VERSION and trace["model_chain"] == [MODEL_A, "playbook"]
    assert trace["outcome"] == "succeeded" and trace["result"]["success"] is True
    summary = trace["summary"]
    assert summary["turns"] == 2 and summary["model_calls"] == 2
    assert summary["input_tokens"] == 2000 and summary["output_tokens"] == 70
    assert len(summary["ttft_s"]) == 2 and "instance_create" in summary["tool_durations"]
    assert summary["tool_cost_usd"]["instance_create"] == pytest.approx((1100 * 1.0 + 30 * 2.0) / 1e6)
    roles = [m["role"] for m in trace["transcript"]]
    assert roles == ["system", "user", "assistant", "tool", "assistant"]
    chat = chat_spans(outcome)[0]["attributes"]
    for key in ("gen_ai.request.model", "gen_ai.response.model", "gen_ai.usage.input_tokens",
                "gen_ai.usage.output_tokens", "gen_ai.response.finish_reasons", "pideploy.ttft_s"):  # fmt: skip
        assert key in chat
    tool_span = next(s for s in spans(trace) if s["attributes"].get("gen_ai.tool.name") == "instance_create")
    assert tool_span["attributes"]["gen_ai.tool.call.id"]
    assert any(c["name"] == "engine.create" for c in spans(trace))  # the tool's own steps


@pytest.mark.parametrize(
    "task_type", ["instance_stop", "instance_start", "instance_update", "instance_delete"]
)
def test_each_task_type_in_two_turns(real_world: World, replay: ReplayServer, task_type: str) -> None:
    w = real_world
    iid = make_instance(w)
    if task_type == "instance_start":
        tools.instance_stop(w.rt, w.ctx(), iid)
    params = {"image": "localhost/pideploy-gateway:v2"} if task_type == "instance_update" else {}
    arguments = {"instance_id": "{{task.instance_id}}", **params}
    replay.set_script(script(call(task_type, **arguments), report(instance_id="{{task.instance_id}}")))
    outcome = run(w, agent.TaskSpec(task_type, "alice", params, instance_id=iid), [model(replay, MODEL_A)])
    assert outcome.status == "succeeded", outcome.error
    assert outcome.turns == 2
    row = w.row(iid)
    expected = {"instance_stop": "stopped", "instance_start": "running", "instance_update": "running"}
    if task_type == "instance_delete":
        assert row is None and w.containers(iid) == []
    else:
        assert row is not None and row["status"] == expected[task_type]
    if task_type == "instance_update":
        assert w.through_nginx(iid, "version")[1] == "v2"


# ---------------------------------------------------------------------------
# Faults: each handled with the right class and the right fallback
# ---------------------------------------------------------------------------


def _create_script(model_name: str | None, *first: dict[str, Any]) -> dict[str, Any]:
    return script(*first, call("instance_create", name="alpha"), report(), model_name=model_name)


def test_500s_exhaust_retries_then_fall_back_to_the_next_model(
    memory_world: World, replay: ReplayServer
) -> None:
    replay.set_script(
        {
            "conversations": [
                {"model": MODEL_A, "turns": [{"repeat": {"fault": "http_500"}}]},
                {"model": MODEL_B, "turns": [call("instance_create", name="alpha"), report()]},
            ]
        }
    )
    task = agent.TaskSpec("instance_create", "alice", {"name": "alpha"})
    outcome = run(
        memory_world, task, [model(replay, MODEL_A), model(replay, MODEL_B)], agent.Limits(retries=2)
    )
    assert outcome.status == "succeeded", outcome.error
    calls = chat_spans(outcome)
    failed_a = [s for s in calls if s["attributes"]["pideploy.model_name"] == MODEL_A]
    assert len(failed_a) == 3  # one try and two retries, each a span
    assert all(s["attributes"]["error.type"] == "llm_api_error" for s in failed_a)
    assert [s["attributes"]["pideploy.attempt"] for s in failed_a] == [1, 2, 3]


def _a_fails_b_works(a_turn: dict[str, Any]) -> dict[str, Any]:
    return {
        "conversations": [
            {"model": MODEL_A, "turns": [{"repeat": a_turn}]},
            {"model": MODEL_B, "turns": [call("instance_create", name="{{task.params.name}}"), report()]},
        ]
    }


def _models_asked(replay: ReplayServer) -> list[str]:
    return [str(request["model"]) for request in replay.recorded()[0]]


def test_a_model_that_keeps_failing_is_skipped_by_the_next_run(
    memory_world: World, replay: ReplayServer
) -> None:
    replay.set_script(_a_fails_b_works({"fault": "http_500"}))
    limits = agent.Limits(retries=2)
    shared = chain([model(replay, MODEL_A), model(replay, MODEL_B)], limits)
    first = agent.run_task(
        agent.TaskSpec("instance_create", "alice", {"name": "one"}),
        agent.ToolsEnvironment(memory_world.rt),
        shared,
        limits,
    )
    assert first.status == "succeeded", first.error
    asked_first = _models_asked(replay)
    replay.reset_counters(forget_requests=True)
    second = agent.run_task(
        agent.TaskSpec("instance_create", "alice", {"name": "two"}),
        agent.ToolsEnvironment(memory_world.rt),
        shared,
        limits,
    )
    assert second.status == "succeeded", second.error
    assert MODEL_A not in _models_asked(replay)  # skipped without a call: it cools down
    assert {s["attributes"]["pideploy.model_name"] for s in chat_spans(second)} == {MODEL_B}
    assert asked_first.count(MODEL_A) == 3  # one try and two retries; turn 2 already skipped it


def test_a_cool_down_in_the_database_holds_across_processes(
    memory_world: World, replay: ReplayServer, database_url: str
) -> None:
    # Two Database pools on one database stand for two processes (two workers, or serve and cron).
    other_process = db.Database(database_url)
    try:
        limits = agent.Limits(retries=1)
        links = [
            models.Link(models.OpenAIChat(m), m) for m in (model(replay, MODEL_A), model(replay, MODEL_B))
        ]
        here = models.Chain(links, models.DatabaseCooldowns(memory_world.rt.db), limits, sleep=lambda _: None)
        there = models.Chain(links, models.DatabaseCooldowns(other_process), limits, sleep=lambda _: None)
        replay.set_script(_a_fails_b_works({"fault": "http_500"}))
        first = agent.run_task(
            agent.TaskSpec("instance_create", "alice", {"name": "one"}),
            agent.ToolsEnvironment(memory_world.rt),
            here,
            limits,
        )
        asked_first = _models_asked(replay)
        replay.reset_counters(forget_requests=True)
        second = agent.run_task(
            agent.TaskSpec("instance_create", "alice", {"name": "two"}),
            agent.ToolsEnvironment(memory_world.rt),
            there,
            limits,
        )
        assert second.status == "succeeded" and _models_asked(replay) == [MODEL_B, MODEL_B]
        assert first.status == "succeeded" and MODEL_A in asked_first
    finally:
        other_process.close()


def test_database_cooldowns_are_shared_and_expire(database: db.Database, database_url: str) -> None:
    other_process = db.Database(database_url)
    try:
        mine, theirs = models.DatabaseCooldowns(database), models.DatabaseCooldowns(other_process)
        assert mine.active() == theirs.active() == set()
        mine.start(MODEL_A, 60, "x" * 2000)
        assert theirs.active() == {MODEL_A}
        row = other_process.one("model_cooldown_active")
        assert row is not None and len(row["reason"]) == 500
        theirs.clear(MODEL_A)
        assert mine.active() == set()
        mine.start(MODEL_B, 0.3, "brief")
        assert theirs.active() == {MODEL_B}
        time.sleep(0.5)
        assert theirs.active() == set()  # expired, without anyone clearing it
    finally:
        other_process.close()


def test_429_retries_the_same_model_honouring_retry_after(memory_world: World, replay: ReplayServer) -> None:
    pauses: list[float] = []
    replay.set_script(
        _create_script(
            MODEL_A,
            {
                "fault": "http_429",
                "retry_after": 3,
                "times": 1,
                "then": call("instance_create", name="alpha"),
            },
        )
    )
    limits = agent.Limits(retries=2, backoff_s=0.1)
    shared = chain([model(replay, MODEL_A)], limits)
    shared.sleep = pauses.append
    outcome = agent.run_task(
        agent.TaskSpec("instance_create", "alice", {"name": "alpha"}),
        agent.ToolsEnvironment(memory_world.rt),
        shared,
        limits,
    )
    assert outcome.status == "succeeded", outcome.error
    assert len(pauses) == 1 and pauses[0] >= 3.0
    assert chat_spans(outcome)[0]["attributes"]["error.type"] == "llm_rate_limited"


@pytest.mark.parametrize("next_link", [MODEL_B, "playbook"])
def test_a_retry_after_beyond_the_run_moves_on_instead_of_timing_out(
    memory_world: World, replay: ReplayServer, next_link: str
) -> None:
    pauses: list[float] = []
    replay.set_script(_a_fails_b_works({"fault": "http_429", "retry_after": 3600}))
    configs = [model(replay, MODEL_A)] + ([model(replay, MODEL_B)] if next_link == MODEL_B else [])
    limits = agent.Limits(retries=2, backoff_s=0.1, timeout_s=30)
    shared = chain(configs, limits)
    shared.sleep = pauses.append
    outcome = agent.run_task(
        agent.TaskSpec("instance_create", "alice", {"name": "alpha"}),
        agent.ToolsEnvironment(memory_world.rt),
        shared,
        limits,
    )
    assert outcome.status == "succeeded", outcome.error
    assert pauses == []  # nobody waited an hour for a run with 30 s to live
    calls = chat_spans(outcome)
    assert [s["attributes"]["pideploy.model_name"] for s in calls] == [MODEL_A, next_link, next_link]
    assert calls[0]["attributes"]["error.type"] == "llm_rate_limited"
    assert outcome.playbook is (next_link == "playbook")
    assert MODEL_A in shared.cooldowns.active()


def test_a_dropped_connection_is_retried_on_the_same_model(memory_world: World, replay: ReplayServer) -> None:
    pauses: list[float] = []
    dropped = {"fault": "disconnect", "times": 1, "then": call("instance_create", name="alpha")}
    replay.set_script(
        {
            "conversations": [
                {"model": MODEL_A, "turns": [dropped, report()]},
                {"model": MODEL_B, "turns": [{"repeat": {"fault": "http_500"}}]},
            ]
        }
    )
    limits = agent.Limits(retries=2, backoff_s=0.1)
    shared = chain([model(replay, MODEL_A), model(replay, MODEL_B)], limits)
    shared.sleep = pauses.append
    outcome = agent.run_task(
        agent.TaskSpec("instance_create", "alice", {"name": "alpha"}),
        agent.ToolsEnvironment(memory_world.rt),
        shared,
        limits,
    )
    assert outcome.status == "succeeded", outcome.error
    calls = chat_spans(outcome)
    assert [(s["attributes"]["pideploy.model_name"], s["attributes"]["pideploy.attempt"]) for s in calls] == [
        (MODEL_A, 1),
        (MODEL_A, 2),
        (MODEL_A, 1),
    ]
    assert calls[0]["attributes"]["error.type"] == "llm_api_error" and calls[0]["status"] == "error"
    assert len(pauses) == 1 and MODEL_B not in _models_asked(replay)
    assert shared.cooldowns.active() == set()


def test_no_request_carries_a_null_content(memory_world: World, replay: ReplayServer) -> None:
    # Issue 13, fault 3: llama.cpp's server rejects an assistant message with "content": null.
    replay.set_script(_create_script(MODEL_A))
    outcome = run(
        memory_world, agent.TaskSpec("instance_create", "alice", {"name": "alpha"}), [model(replay, MODEL_A)]
    )
    assert outcome.status == "succeeded"
    sent = [m for body in replay.recorded()[0] for m in body["messages"]]
    assistants = [m for m in sent if m["role"] == "assistant"]
    # A string always: llama.cpp refuses null, and its template fails on a missing key.
    assert assistants and all(isinstance(m.get("content"), str) for m in assistants)


def test_a_call_that_broke_mid_stream_is_charged(memory_world: World, replay: ReplayServer) -> None:
    # Issue 13, fault 5: calls that broke after the server began answering were never charged.
    broken = {"fault": "disconnect", "after_chunks": 3}
    replay.set_script(_a_fails_b_works(broken))
    paid = model(replay, MODEL_A, price_in=1.0, price_out=1.0)
    outcome = run(
        memory_world,
        agent.TaskSpec("instance_create", "alice", {"name": "alpha"}),
        [paid, model(replay, MODEL_B)],
    )
    assert outcome.status == "succeeded"
    failed = [s for s in chat_spans(outcome) if s["status"] == "error"]
    assert failed and all(s["attributes"]["gen_ai.usage.input_tokens"] > 0 for s in failed)
    assert all(s["attributes"]["pideploy.usage_estimated"] is True for s in failed)
    assert outcome.cost_usd > 0 and outcome.tokens > 0


def test_an_answer_cut_at_max_tokens_is_its_own_class_and_moves_on(
    memory_world: World, replay: ReplayServer
) -> None:
    # Issue 13, fault 6: finish_reason "length" is half an answer, not an answer.
    cut = {"tool_calls": [{"name": "instance_create", "arguments": '{"na'}], "finish_reason": "length"}
    replay.set_script(_a_fails_b_works(cut))
    limits = agent.Limits(retries=1)
    shared = chain([model(replay, MODEL_A), model(replay, MODEL_B)], limits)
    outcome = agent.run_task(
        agent.TaskSpec("instance_create", "alice", {"name": "alpha"}),
        agent.ToolsEnvironment(memory_world.rt),
        shared,
        limits,
    )
    assert outcome.status == "succeeded", outcome.error
    first = chat_spans(outcome)[0]
    assert first["attributes"]["error.type"] == "llm_output_truncated"
    assert len([s for s in chat_spans(outcome) if s["attributes"]["pideploy.model_name"] == MODEL_A]) == 1
    assert shared.cooldowns.active() == set()  # the model is fine; the answer was too long


@pytest.mark.parametrize("stream", [True, False])
def test_a_model_s_compatibility_settings_shape_its_requests(
    memory_world: World, replay: ReplayServer, stream: bool
) -> None:
    replay.set_script(_create_script(MODEL_A))
    llama = dataclasses.replace(
        model(replay, MODEL_A), stream=stream, tool_choice="auto", send_usage_request=False
    )
    outcome = run(memory_world, agent.TaskSpec("instance_create", "alice", {"name": "alpha"}), [llama])
    assert outcome.status == "succeeded", outcome.error
    bodies = replay.recorded()[0]
    assert [b.get("stream", False) for b in bodies] == [stream, stream]
    assert all(b["tool_choice"] == "auto" and "stream_options" not in b for b in bodies)
    assert all(s["attributes"]["pideploy.ttft_s"] is not None for s in chat_spans(outcome))
    default = model(replay, MODEL_A)
    replay.reset_counters(forget_requests=True)
    run(memory_world, agent.TaskSpec("instance_create", "alice", {"name": "beta"}), [default])
    assert all(
        "tool_choice" not in b and b["stream_options"] == {"include_usage": True}
        for b in replay.recorded()[0]
    )


def test_a_context_overflow_moves_on_without_a_cool_down(memory_world: World, replay: ReplayServer) -> None:
    replay.set_script(_a_fails_b_works({"fault": "context_overflow"}))
    limits = agent.Limits(retries=2)
    shared = chain([model(replay, MODEL_A), model(replay, MODEL_B)], limits)
    first = agent.run_task(
        agent.TaskSpec("instance_create", "alice", {"name": "one"}),
        agent.ToolsEnvironment(memory_world.rt),
        shared,
        limits,
    )
    assert first.status == "succeeded", first.error
    failed = [s for s in chat_spans(first) if s["attributes"]["pideploy.model_name"] == MODEL_A]
    # MODEL_A is asked once, without retries: the prompt only grows, so the run goes on without it.
    assert [s["attributes"]["pideploy.attempt"] for s in failed] == [1] and first.turns == 2
    assert all(s["attributes"]["error.type"] == "llm_api_error" for s in failed)
    # Too long a prompt is this run's problem, not the model's: the next run asks MODEL_A again.
    assert shared.cooldowns.active() == set()
    replay.reset_counters(forget_requests=True)
    second = agent.run_task(
        agent.TaskSpec("instance_create", "alice", {"name": "two"}),
        agent.ToolsEnvironment(memory_world.rt),
        shared,
        limits,
    )
    assert second.status == "succeeded" and _models_asked(replay)[0] == MODEL_A


@pytest.mark.parametrize(
    ("fault", "error_class"), [("http_401", "llm_api_error"), ("http_404", "llm_api_error")]
)
def test_auth_and_missing_model_skip_to_the_next_model_without_retries(
    memory_world: World, replay: ReplayServer, fault: str, error_class: str
) -> None:
    replay.set_script(
        {
            "conversations": [
                {"model": MODEL_A, "turns": [{"repeat": {"fault": fault}}]},
                {"model": MODEL_B, "turns": [call("instance_create", name="alpha"), report()]},
            ]
        }
    )
    task = agent.TaskSpec("instance_create", "alice", {"name": "alpha"})
    outcome = run(
        memory_world, task, [model(replay, MODEL_A), model(replay, MODEL_B)], agent.Limits(retries=3)
    )
    assert outcome.status == "succeeded"
    failed = [s for s in chat_spans(outcome) if s["attributes"]["pideploy.model_name"] == MODEL_A]
    assert len(failed) == 1 and failed[0]["attributes"]["error.type"] == error_class


def test_a_stalled_stream_times_out_and_falls_back(memory_world: World, replay: ReplayServer) -> None:
    replay.set_script(
        {
            "conversations": [
                {"model": MODEL_A, "turns": [{"repeat": {"fault": "stall", "seconds": 30}}]},
                {"model": MODEL_B, "turns": [call("instance_create", name="alpha"), report()]},
            ]
        }
    )
    started = time.monotonic()
    task = agent.TaskSpec("instance_create", "alice", {"name": "alpha"})
    outcome = run(
        memory_world,
        task,
        [model(replay, MODEL_A, timeout=0.5), model(replay, MODEL_B)],
        agent.Limits(retries=0),
    )
    assert outcome.status == "succeeded"
    assert time.monotonic() - started < 20
    stalled = [s for s in chat_spans(outcome) if s["attributes"]["pideploy.model_name"] == MODEL_A]
    assert stalled[0]["attributes"]["error.type"] == "llm_timeout"


def test_a_stream_that_trickles_forever_is_cut_at_the_model_timeout(
    memory_world: World, replay: ReplayServer
) -> None:
    # Every read gets a byte within the timeout, so only a cut on the call's own clock ends it;
    # without one, model A would hold the run until its 10 s deadline.
    replay.set_script(
        {
            "conversations": [
                {
                    "model": MODEL_A,
                    "turns": [{"repeat": {"fault": "trickle", "seconds": 60, "interval": 0.1}}],
                },
                {"model": MODEL_B, "turns": [call("instance_create", name="alpha"), report()]},
            ]
        }
    )
    task = agent.TaskSpec("instance_create", "alice", {"name": "alpha"})
    outcome = run(
        memory_world,
        task,
        [model(replay, MODEL_A, timeout=1), model(replay, MODEL_B)],
        agent.Limits(retries=0, timeout_s=10),
    )
    assert outcome.status == "succeeded", outcome.error
    trickled = [s for s in chat_spans(outcome) if s["attributes"]["pideploy.model_name"] == MODEL_A]
    assert trickled[0]["attributes"]["error.type"] == "llm_timeout"
    assert "still streaming after 1s" in trickled[0]["attributes"]["error.message"]


def test_malformed_json_is_returned_to_the_model_once(memory_world: World, replay: ReplayServer) -> None:
    bad = {"tool_calls": [{"name": "instance_create", "arguments": '{"name": "alpha"'}]}
    replay.set_script(_create_script(MODEL_A, bad))
    outcome = run(
        memory_world, agent.TaskSpec("instance_create", "alice", {"name": "alpha"}), [model(replay, MODEL_A)]
    )
    assert outcome.status == "succeeded" and outcome.turns == 3
    tool_message = json.loads(trace_of(outcome)["transcript"][3]["content"])
    assert tool_message["ok"] is False and "not valid JSON" in tool_message["error"]


@pytest.mark.parametrize(
    "bad_turn",
    [
        {"tool_calls": [{"name": "instance_create", "arguments": "{nope"}]},
        {"tool_calls": [{"name": "format_disk", "arguments": {}}]},
        {"tool_calls": [{"name": "instance_create", "arguments": {"name": "NOT VALID"}}]},
        {"fault": "empty"},
    ],
    ids=["bad-json", "unknown-tool", "schema-mismatch", "empty-answer"],
)
def test_repeated_bad_output_ends_the_run_classified(
    memory_world: World, replay: ReplayServer, bad_turn: dict[str, Any]
) -> None:
    replay.set_script(script({"repeat": bad_turn}))
    task = agent.TaskSpec("instance_create", "alice", {"name": "alpha"})
    outcome = run(memory_world, task, [model(replay, MODEL_A)], playbook=False)
    assert outcome.status == "failed"
    assert outcome.error_class == "llm_bad_output"
    assert outcome.turns == 3  # once returned to the model, the second time the link is given up
    assert memory_world.rt.db.all("instance_list_all") == []


@pytest.mark.parametrize(
    "bad_turn",
    [
        {"tool_calls": [{"name": "instance_create", "arguments": "{nope"}]},
        {"tool_calls": [{"name": "format_disk", "arguments": {}}]},
        {"fault": "empty"},
    ],
    ids=["bad-json", "unknown-tool", "empty-answer"],
)
def test_a_link_that_keeps_answering_badly_gives_way_to_the_next(
    memory_world: World, replay: ReplayServer, bad_turn: dict[str, Any]
) -> None:
    # Issue 13, fault 8: bad output ended the run; the next model and the playbook were never tried.
    replay.set_script(script({"repeat": bad_turn}))
    limits = agent.Limits(retries=1)
    shared = chain([model(replay, MODEL_A)], limits)
    task = agent.TaskSpec("instance_create", "alice", {"name": "alpha"})
    outcome = agent.run_task(task, agent.ToolsEnvironment(memory_world.rt), shared, limits)
    assert outcome.status == "succeeded" and outcome.playbook
    row = memory_world.rt.db.one("instance_by_name", user_id="alice", name="alpha")
    assert row is not None and row["status"] == "running"
    assert MODEL_A in shared.cooldowns.active()  # treated like a failing link: cooled down
    assert MODEL_A in " ".join(trace_of(outcome)["extra"]["chain_failures"])


def test_a_second_model_takes_over_from_one_that_answers_badly(
    memory_world: World, replay: ReplayServer
) -> None:
    iid = make_instance(memory_world)
    replay.set_script(
        {
            "conversations": [
                {"model": MODEL_A, "turns": [{"repeat": {"content": "I think it is fine."}}]},
                {
                    "model": MODEL_B,  # turn k answers a request holding k assistant messages
                    "turns": [{"content": "unused"}] * 2 + [call("instance_stop", instance_id=iid), report()],
                },
            ]
        }
    )
    task = agent.TaskSpec("instance_stop", "alice", {}, instance_id=iid)
    outcome = run(memory_world, task, [model(replay, MODEL_A), model(replay, MODEL_B)], playbook=False)
    assert outcome.status == "succeeded" and not outcome.playbook
    assert memory_world.row(iid)["status"] == "stopped"  # type: ignore[index]


def test_a_looping_model_is_stopped_by_the_guard(memory_world: World, replay: ReplayServer) -> None:
    iid = make_instance(memory_world)
    replay.set_script(script({"repeat": call("instance_status", instance_id=iid)}))
    task = agent.TaskSpec("instance_stop", "alice", {}, instance_id=iid)
    outcome = run(memory_world, task, [model(replay, MODEL_A)], playbook=False)
    assert outcome.status == "failed" and outcome.error_class == "agent_stuck"
    assert outcome.turns == 4  # the third identical call gives the link up; nothing is left
    assert memory_world.row(iid)["status"] == "running"  # type: ignore[index]


def test_a_looping_model_gives_way_to_the_playbook(memory_world: World, replay: ReplayServer) -> None:
    # Seen against llama.cpp: its template drops tool results, so a model asks for the same
    # call again and again; the loop guard ended the run and a stop was never made.
    iid = make_instance(memory_world)
    replay.set_script(script({"repeat": call("instance_status", instance_id=iid)}))
    limits = agent.Limits(retries=1)
    shared = chain([model(replay, MODEL_A)], limits)
    task = agent.TaskSpec("instance_stop", "alice", {}, instance_id=iid)
    outcome = agent.run_task(task, agent.ToolsEnvironment(memory_world.rt), shared, limits)
    assert outcome.status == "succeeded" and outcome.playbook, outcome.error
    assert memory_world.row(iid)["status"] == "stopped"  # type: ignore[index]
    assert MODEL_A in shared.cooldowns.active()
    assert "3 times in a row" in " ".join(trace_of(outcome)["extra"]["chain_failures"])


def test_the_loop_guard_threshold_is_configurable(memory_world: World, replay: ReplayServer) -> None:
    iid = make_instance(memory_world)
    replay.set_script(script({"repeat": call("instance_status", instance_id=iid)}))
    limits = agent.Limits.from_config(make_config_like(memory_world, loop_guard_repeats=2))
    assert limits.loop_guard_repeats == 2
    task = agent.TaskSpec("instance_stop", "alice", {}, instance_id=iid)
    outcome = agent.run_task(
        task,
        agent.ToolsEnvironment(memory_world.rt),
        chain([model(replay, MODEL_A)], limits, playbook=False),
        limits,
    )
    assert outcome.status == "failed" and outcome.error_class == "agent_stuck"
    assert outcome.turns == 3 and "2 times in a row" in (outcome.error or "")


def test_max_turns_ends_the_run(memory_world: World, replay: ReplayServer) -> None:
    iid = make_instance(memory_world)
    turns = [call("instance_status", instance_id=iid) if i % 2 else call("nginx_sync") for i in range(10)]
    replay.set_script(script(*turns))
    outcome = run(memory_world, agent.TaskSpec("instance_stop", "alice", {}, instance_id=iid), [model(replay, MODEL_A)],
                  agent.Limits(max_turns=4), playbook=False)  # fmt: skip
    assert outcome.status == "failed" and outcome.error_class == "agent_stuck" and outcome.turns == 5


def test_after_the_models_turns_the_playbook_finishes(memory_world: World, replay: ReplayServer) -> None:
    iid = make_instance(memory_world)
    turns = [call("instance_status", instance_id=iid) if i % 2 else call("nginx_sync") for i in range(10)]
    replay.set_script(script(*turns))
    task = agent.TaskSpec("instance_stop", "alice", {}, instance_id=iid)
    outcome = run(memory_world, task, [model(replay, MODEL_A)], agent.Limits(max_turns=4))
    assert outcome.status == "succeeded" and outcome.playbook and outcome.turns == 6
    assert memory_world.row(iid)["status"] == "stopped"  # type: ignore[index]


def test_a_playbook_plan_longer_than_the_turn_cap_runs_to_its_end(memory_world: World) -> None:
    # A heartbeat round that repairs many instances is one playbook step per instance.
    ids = [make_instance(memory_world, f"i{n}") for n in range(14)]
    plan = [{"tool": "instance_status", "arguments": {"instance_id": i}} for i in ids]
    task = agent.TaskSpec("heartbeat", None, {"plan": plan}, allowed_instances=frozenset(ids))
    outcome = run(memory_world, task, [], agent.Limits(max_turns=12))
    assert outcome.status == "succeeded" and outcome.turns == len(ids) + 1


def test_the_model_claiming_success_without_doing_the_work_fails(
    memory_world: World, replay: ReplayServer
) -> None:
    iid = make_instance(memory_world)
    replay.set_script(script(report(instance_id=iid)))
    outcome = run(
        memory_world, agent.TaskSpec("instance_stop", "alice", {}, instance_id=iid), [model(replay, MODEL_A)]
    )
    assert outcome.status == "failed" and outcome.error_class == "llm_bad_output"
    assert "is running, not stopped" in (outcome.error or "")


def test_a_reported_failure_takes_the_class_of_the_failed_tool(
    memory_world: World, replay: ReplayServer
) -> None:
    victim = make_instance(memory_world, "victim", user="bob")
    mine = make_instance(memory_world, "mine")
    replay.set_script(script(call("instance_delete", instance_id=victim), report(False)))
    outcome = run(
        memory_world,
        agent.TaskSpec("instance_delete", "alice", {}, instance_id=mine),
        [model(replay, MODEL_A)],
    )
    assert outcome.status == "failed" and outcome.error_class == "tool_refused"
    assert memory_world.row(victim) is not None and memory_world.row(mine) is not None
    assert "ownership_refused" in memory_world.events(victim)


# ---------------------------------------------------------------------------
# Caps: stopped BEFORE the crossing call
# ---------------------------------------------------------------------------


def alternating(iid: int, usage: dict[str, int], turns: int = 50) -> list[dict[str, Any]]:
    """Different calls each turn, so the loop guard never fires before a cap does."""
    return [
        {**(call("instance_status", instance_id=iid) if i % 2 else call("nginx_sync")), "usage": usage}
        for i in range(turns)
    ]


def test_cost_cap_stops_the_run_before_the_crossing_call(memory_world: World, replay: ReplayServer) -> None:
    iid = make_instance(memory_world)
    replay.set_script(script(*alternating(iid, {"completion_tokens": 500})))
    expensive = model(replay, MODEL_A, price_in=10.0, price_out=30.0)  # $ per million tokens
    limits = agent.Limits(cost_cap_usd=0.2, max_tokens=1000, max_turns=50)
    task = agent.TaskSpec("instance_stop", "alice", {}, instance_id=iid)
    outcome = agent.run_task(
        task, agent.ToolsEnvironment(memory_world.rt), chain([expensive], limits, playbook=False), limits
    )
    assert outcome.status == "failed" and outcome.error_class == "cost_cap"
    assert 0 < outcome.cost_usd <= 0.2
    requests = len(replay.requests)
    assert requests == len(chat_spans(outcome))  # no call was made and then refused
    last_prompt = chat_spans(outcome)[-1]["attributes"]["gen_ai.usage.input_tokens"]
    assert len(chat_spans(outcome)) >= 2 and last_prompt > 0


def test_token_cap_stops_free_models_too(memory_world: World, replay: ReplayServer) -> None:
    iid = make_instance(memory_world)
    replay.set_script(script(*alternating(iid, {"completion_tokens": 300})))
    limits = agent.Limits(token_cap=12_000, max_tokens=1000, max_turns=50)
    task = agent.TaskSpec("instance_stop", "alice", {}, instance_id=iid)
    outcome = agent.run_task(
        task,
        agent.ToolsEnvironment(memory_world.rt),
        chain([model(replay, MODEL_A)], limits, playbook=False),
        limits,
    )
    assert outcome.status == "failed" and outcome.error_class == "token_cap", outcome.error
    assert outcome.tokens <= 12_000 and outcome.cost_usd == 0


# ---------------------------------------------------------------------------
# The run's timeout: a hanging tool and a stalled stream are cut off
# ---------------------------------------------------------------------------


def _processes_with(marker: str) -> list[int]:
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if marker in cmdline:
                found.append(int(pid))
    return found


def test_timeout_kills_a_hanging_tool(memory_world: World, replay: ReplayServer) -> None:
    iid = make_instance(memory_world)
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    port = silent.getsockname()[1]
    with memory_world.rt.db.transaction() as conn:  # alice's own instance, or bash refuses the port
        conn.execute("UPDATE instance SET port = %s WHERE id = %s", (port, iid))
    marker = f"127.0.0.1:{port}/hang"
    replay.set_script(script(call("bash", command=f"curl -s http://{marker}"), report()))
    limits = agent.Limits(timeout_s=2.0)
    started = time.monotonic()
    outcome = run(
        memory_world,
        agent.TaskSpec("instance_stop", "alice", {}, instance_id=iid),
        [model(replay, MODEL_A)],
        limits,
    )
    silent.close()
    assert time.monotonic() - started < 10
    assert outcome.status == "failed" and outcome.error_class == "timeout"
    assert _processes_with(marker) == []


def test_timeout_cuts_a_stalled_stream(memory_world: World, replay: ReplayServer) -> None:
    replay.set_script(script({"repeat": {"fault": "stall", "seconds": 60}}))
    limits = agent.Limits(timeout_s=1.5, retries=0)
    started = time.monotonic()
    task = agent.TaskSpec("instance_create", "alice", {"name": "alpha"})
    outcome = agent.run_task(
        task,
        agent.ToolsEnvironment(memory_world.rt),
        chain([model(replay, MODEL_A, timeout=30)], limits, playbook=False),
        limits,
    )
    assert time.monotonic() - started < 10
    assert outcome.status == "failed" and outcome.error_class == "timeout"
    assert Path(outcome.trace_file).exists()  # the trace is written even so


# ---------------------------------------------------------------------------
# The playbook: piDeploy works with no model at all
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "task_type", ["instance_create", "instance_stop", "instance_start", "instance_update", "instance_delete"]
)
def test_playbook_completes_every_task_type_with_the_chain_down(
    memory_world: World, replay: ReplayServer, task_type: str
) -> None:
    w = memory_world
    replay.set_script(script({"repeat": {"fault": "http_500"}}, model_name=None))
    iid = None if task_type == "instance_create" else make_instance(w)
    if task_type == "instance_start":
        tools.instance_stop(w.rt, w.ctx(), iid)  # type: ignore[arg-type]
    params: dict[str, Any] = {
        "instance_create": {"name": "fresh"},
        "instance_update": {"image": "localhost/pideploy-gateway:v2"},
    }.get(task_type, {})
    outcome = run(
        w,
        agent.TaskSpec(task_type, "alice", params, instance_id=iid),
        [model(replay, MODEL_A), model(replay, MODEL_B)],
    )
    assert outcome.status == "succeeded", outcome.error
    assert outcome.playbook is True
    trace = trace_of(outcome)
    assert trace["extra"]["playbook"] is True and len(trace["extra"]["chain_failures"]) == 2


def test_the_playbook_acts_after_a_model_that_answered_then_failed(
    memory_world: World, replay: ReplayServer
) -> None:
    # Issue 13, fault 1: the playbook counted the failed model's turns as its own steps and
    # reported success without ever calling instance_start.
    iid = make_instance(memory_world)
    tools.instance_stop(memory_world.rt, memory_world.ctx(), iid)
    replay.set_script(script(call("instance_status", instance_id=iid), {"repeat": {"fault": "http_500"}}))
    task = agent.TaskSpec("instance_start", "alice", {}, instance_id=iid)
    outcome = run(memory_world, task, [model(replay, MODEL_A)])
    assert outcome.status == "succeeded" and outcome.playbook, outcome.error
    assert memory_world.row(iid)["status"] == "running"  # type: ignore[index]
    calls = [
        c["function"]["name"]
        for m in trace_of(outcome)["transcript"]
        if m["role"] == "assistant"
        for c in m.get("tool_calls") or []
    ]
    assert calls == ["instance_status", "instance_start", "report_result"]


def test_a_model_cannot_pass_its_calls_off_as_the_playbook_s(
    memory_world: World, replay: ReplayServer
) -> None:
    iid = make_instance(memory_world)
    tools.instance_stop(memory_world.rt, memory_world.ctx(), iid)
    spoof = {
        "tool_calls": [{"id": "playbook_0", "name": "instance_status", "arguments": {"instance_id": iid}}]
    }
    replay.set_script(script(spoof, {"repeat": {"fault": "http_500"}}))
    outcome = run(
        memory_world, agent.TaskSpec("instance_start", "alice", {}, instance_id=iid), [model(replay, MODEL_A)]
    )
    assert outcome.status == "succeeded" and memory_world.row(iid)["status"] == "running"  # type: ignore[index]


def test_a_playbook_whose_steps_do_not_hold_is_not_blamed_on_a_model(
    memory_world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    iid = make_instance(memory_world)
    monkeypatch.setattr(agent, "verify_outcome", lambda task, rt: f"instance {iid} is error, not stopped")
    outcome = run(memory_world, agent.TaskSpec("instance_stop", "alice", {}, instance_id=iid), [])
    assert outcome.status == "failed" and outcome.error_class == "tool_execution_error"
    assert "playbook" in (outcome.error or "")


def test_agent_off_uses_the_playbook_and_calls_no_model(memory_world: World, replay: ReplayServer) -> None:
    limits = agent.Limits()
    off = models.Chain([], models.MemoryCooldowns(), limits)
    outcome = agent.run_task(
        agent.TaskSpec("instance_create", "alice", {"name": "quiet"}),
        agent.ToolsEnvironment(memory_world.rt),
        off,
        limits,
    )
    assert outcome.status == "succeeded" and outcome.playbook and replay.requests == []


def test_chain_down_without_playbook_is_classified(memory_world: World, replay: ReplayServer) -> None:
    replay.set_script(script({"repeat": {"fault": "http_500"}}, model_name=None))
    outcome = run(memory_world, agent.TaskSpec("instance_create", "alice", {"name": "alpha"}), [model(replay, MODEL_A)],
                  playbook=False)  # fmt: skip
    assert outcome.status == "failed" and outcome.error_class == "llm_api_error"


# ---------------------------------------------------------------------------
# A crash is an ending too: recorded in the trace, alerts evaluated, then raised
# ---------------------------------------------------------------------------


class BrokenAdapter:
    """A model adapter with a bug: what no error translation foresaw."""

    name = MODEL_A

    def complete(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]], max_tokens: int, timeout: float
    ) -> models.Completion:
        raise RuntimeError("adapter bug")


def _lost_database_chain(database_url: str, replay: ReplayServer, limits: agent.Limits) -> models.Chain:
    lost = db.Database(database_url)
    lost.close()  # the cool-down store's database goes away under the run
    links = [models.Link(models.OpenAIChat(model(replay, MODEL_A)), model(replay, MODEL_A))]
    return models.Chain(links, models.DatabaseCooldowns(lost), limits, sleep=lambda _: None)


def _broken_adapter_chain(database_url: str, replay: ReplayServer, limits: agent.Limits) -> models.Chain:
    return models.Chain(
        [models.Link(BrokenAdapter(), model(replay, MODEL_A))], models.MemoryCooldowns(), limits
    )


def _verify_crash_chain(database_url: str, replay: ReplayServer, limits: agent.Limits) -> models.Chain:
    replay.set_script(_create_script(MODEL_A))
    return chain([model(replay, MODEL_A)], limits)


def _verify_fails(task: agent.TaskSpec, rt: tools.Runtime) -> str:
    raise DatabaseError("database unavailable: connection lost while verifying")


@pytest.mark.parametrize(
    ("make_chain", "error", "error_class", "turns"),
    [
        (_lost_database_chain, DatabaseError, "infra_unavailable", 1),
        (_broken_adapter_chain, RuntimeError, "tool_execution_error", 1),
        (_verify_crash_chain, DatabaseError, "infra_unavailable", 2),
    ],
    ids=["lost-database", "adapter-bug", "crash-while-finishing"],
)
def test_a_crash_is_recorded_as_a_failed_run_then_raised(
    memory_world: World,
    replay: ReplayServer,
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
    make_chain: Any,
    error: type[Exception],
    error_class: str,
    turns: int,
) -> None:
    w = memory_world
    w.rt = dataclasses.replace(w.rt, config=make_config_like(w, alert_turns=0))
    monkeypatch.setattr(agent, "verify_outcome", _verify_fails)  # reached only by the last case
    limits = agent.Limits(retries=0)
    shared = make_chain(database_url, replay, limits)
    task = agent.TaskSpec("instance_create", "alice", {"name": "alpha"}, id=77)
    trace = agent.new_trace(task, w.rt.config, shared)
    with pytest.raises(RunCrashed) as crash:
        agent.run_task(task, agent.ToolsEnvironment(w.rt), shared, limits, trace=trace)
    assert isinstance(crash.value.__cause__, error) and crash.value.error_class == error_class
    assert crash.value.data == {"trace_file": str(trace.path)}  # as a finished run records it

    written = json.loads(trace.path.read_text())
    assert written["outcome"] == "failed" and written["error_class"] == error_class
    assert written["finished_at"] is not None and written["summary"]["turns"] == turns
    assert written["extra"]["crashed"].startswith(error.__name__ + ": ")
    assert written["spans"]["status"] == "error" and written["spans"]["end"] is not None
    assert written["transcript"][0]["role"] == "system"
    alerts = [json.loads(line) for line in w.rt.config.alerts.read_text().splitlines()]
    assert [(a["rule"], a["outcome"], a["task_id"]) for a in alerts] == [("high_turn_count", "failed", 77)]
    assert alerts[0]["trace_file"] == str(trace.path)


def test_a_tool_that_loses_the_database_ends_the_run_for_the_queue_to_retry(
    memory_world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A restarted Postgres mid-task is no failed tool for the model (or the playbook) to
    # report: the run ends as a crash, which the queue tries again.
    w = memory_world
    iid = w.create("alpha")["instance_id"]

    def lost(rt: tools.Runtime, ctx: tools.ToolContext, instance_id: int) -> dict[str, Any]:
        raise DatabaseError("database unavailable: server closed the connection unexpectedly")

    stop = dataclasses.replace(tools.TOOLS["instance_stop"], handler=lost)
    monkeypatch.setitem(tools.TOOLS, "instance_stop", stop)
    limits = agent.Limits(retries=0)
    playbook = models.Chain([], models.MemoryCooldowns(), limits)
    task = agent.TaskSpec(type="instance_stop", user_id="alice", params={}, instance_id=iid, id=78)
    with pytest.raises(RunCrashed) as crash:
        agent.run_task(task, agent.ToolsEnvironment(w.rt), playbook, limits)
    assert isinstance(crash.value.__cause__, DatabaseError) and crash.value.error_class == "infra_unavailable"


# ---------------------------------------------------------------------------
# Alerts
# ---------------------------------------------------------------------------


def test_alert_lines_are_written_when_thresholds_are_crossed(
    memory_world: World, replay: ReplayServer
) -> None:
    w = memory_world
    w.rt = tools.Runtime(
        __import__("dataclasses").replace(w.rt.config, alert_turns=1, alert_tool_error_rate=0.3),
        w.rt.db, w.rt.engine, w.rt.proxy,
    )  # fmt: skip
    iid = make_instance(w)
    replay.set_script(
        script(call("instance_start", instance_id=999), call("instance_stop", instance_id=iid), report())
    )
    outcome = run(w, agent.TaskSpec("instance_stop", "alice", {}, instance_id=iid), [model(replay, MODEL_A)])
    assert outcome.status == "succeeded"
    lines = [json.loads(line) for line in w.rt.config.alerts.read_text().splitlines()]
    rules = {line["rule"] for line in lines}
    assert {"high_turn_count", "tool_error_rate"} <= rules
    assert all(line["trace_file"] == outcome.trace_file for line in lines)


def test_the_loop_is_one_short_function() -> None:
    import inspect

    assert len(inspect.getsource(agent.run_task).splitlines()) <= 50


def test_concurrent_runs_do_not_share_state(memory_world: World, replay: ReplayServer) -> None:
    replay.set_script(script(call("instance_create", name="{{task.params.name}}"), report(), model_name=None))
    outcomes: list[observability.Outcome] = []

    def one(name: str) -> None:
        outcomes.append(
            run(
                memory_world,
                agent.TaskSpec("instance_create", "alice", {"name": name}),
                [model(replay, MODEL_A)],
            )
        )

    threads = [threading.Thread(target=one, args=(f"n{i}",)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(o.status for o in outcomes) == ["succeeded"] * 3
    assert len({o.trace_file for o in outcomes}) == 3


def test_models_without_a_key_are_left_out_and_the_trace_says_so(
    memory_world: World, replay: ReplayServer
) -> None:
    keyless = dataclasses.replace(model(replay, MODEL_A), api_key="")
    config = dataclasses.replace(memory_world.rt.config, models=(keyless,))
    limits = agent.Limits()
    chain = models.Chain.from_config(config, models.MemoryCooldowns(), limits)
    outcome = agent.run_task(
        agent.TaskSpec("instance_create", "alice", {"name": "nokey"}),
        agent.ToolsEnvironment(memory_world.rt),
        chain,
        limits,
    )
    assert outcome.status == "succeeded" and outcome.playbook
    assert replay.requests == []  # nothing was tried, so nothing waited on retries
    assert trace_of(outcome)["extra"]["chain_failures"] == [f"{MODEL_A}: no API key (TEST_KEY unset)"]


# ---------------------------------------------------------------------------
# Secrets: never in a tool result a model reads, nor anywhere in a trace
# ---------------------------------------------------------------------------


def _tool_results(replay: ReplayServer) -> list[str]:
    requests, _ = replay.recorded()
    return [m["content"] for m in requests[-1]["messages"] if m["role"] == "tool"]


def test_a_heartbeat_model_never_reads_a_users_secrets(real_world: World, replay: ReplayServer) -> None:
    # A heartbeat may inspect every container: all their environments are redacted from what it
    # reads, whatever the tool (bash, instance_logs) and wherever the value shows (inspect's Env,
    # the container's own logs, an error message naming it).
    w = real_world
    secret, plain = f"sk-live-{uuid.uuid4().hex}", f"just-a-value-{uuid.uuid4().hex[:8]}"
    env = {"MALLORY_API_KEY": secret, "GATEWAY_LOG_MESSAGE": f"booted with {secret}", "PLAIN": plain}
    theirs = int(tools.instance_create(w.rt, w.ctx("mallory"), "m-web", {"env": env})["instance_id"])
    name = runtime.container_name(w.rt.config, theirs)
    replay.set_script(
        script(
            call("bash", command=f"docker inspect {name}"),
            call("bash", command=f"docker logs --tail 20 {name} 2>&1"),
            call("instance_logs", instance_id=theirs),
            call("bash", command=f"cat /nonexistent/{secret}"),  # refused; the reason names the path
            # Cut in pieces before the output is redacted, a secret would no longer be found.
            call(
                "bash",
                command=f"docker inspect {name} | jq -r '.[0].Config.Env[]' | cut -d = -f 2 | cut -c 2-",
            ),
            call("bash", command=f"docker logs {name} 2>&1 | cut -c 2-"),
            report(),
        )
    )
    task = agent.TaskSpec("heartbeat", None, {"plan": []}, allowed_instances=frozenset({theirs}))
    outcome = run(w, task, [model(replay, MODEL_A)])
    assert outcome.status == "succeeded", outcome.error
    results = _tool_results(replay)
    assert len(results) == 6
    for result in results:
        assert secret[1:] not in result and plain[1:] not in result
    inspected, logged, logs_tool, refused, *sliced = (json.loads(r) for r in results)
    assert inspected["ok"] and json.loads(inspected["stdout"])[0]["Name"] == f"/{name}"  # it did run
    assert f'"MALLORY_API_KEY={observability.REDACTED}"' in inspected["stdout"]
    # The log line is itself an environment value (GATEWAY_LOG_MESSAGE): it goes whole.
    assert logged["stdout"].startswith(f"{observability.REDACTED}\n") and "listening on" in logged["stdout"]
    assert logs_tool["untrusted_logs"].startswith(f"{observability.REDACTED}\n")
    assert refused["error_class"] == "tool_refused"
    assert [r["error_class"] for r in sliced] == ["tool_refused", "tool_refused"]
    written = Path(outcome.trace_file).read_text()  # the model's own call that named it, too
    assert secret not in written and plain not in written


def test_a_users_task_and_its_trace_never_show_the_environment(
    real_world: World, replay: ReplayServer
) -> None:
    # The user's own container: by name it is theirs to inspect, but its environment (a
    # secret of theirs) still reaches neither the model nor the trace; nor does a value given in
    # the task itself (an update's new config), nor an API key of the chain.
    w = real_world
    secret, updated = f"own-secret-{uuid.uuid4().hex}", f"new-secret-{uuid.uuid4().hex}"
    iid = int(tools.instance_create(w.rt, w.ctx(), "web", {"env": {"OWN_TOKEN": secret}})["instance_id"])
    name = runtime.container_name(w.rt.config, iid)
    params = {"config": {"env": {"OWN_TOKEN": updated}}}
    replay.set_script(
        script(
            call("bash", command=f"docker inspect {name}"),
            call("instance_update", instance_id=iid, config=params["config"]),
            call("bash", command=f"docker inspect {name}"),
            report(instance_id=iid),
        )
    )
    keyed = dataclasses.replace(model(replay, MODEL_A), api_key=f"chain-key-{uuid.uuid4().hex}")
    outcome = run(w, agent.TaskSpec("instance_update", "alice", params, instance_id=iid), [keyed])
    assert outcome.status == "succeeded", outcome.error
    for result in _tool_results(replay):
        assert secret not in result and updated not in result
    before, _, after = (json.loads(r) for r in _tool_results(replay))
    assert f'"OWN_TOKEN={observability.REDACTED}"' in before["stdout"]
    assert f'"OWN_TOKEN={observability.REDACTED}"' in after["stdout"]
    written = Path(outcome.trace_file).read_text()
    assert secret not in written and updated not in written and keyed.api_key not in written


def test_tool_output_is_withheld_when_the_values_to_hide_cannot_be_read(
    memory_world: World, replay: ReplayServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    w = memory_world
    replay.set_script(script(call("bash", command="uptime"), report(success=False)))

    def unreadable(rt: tools.Runtime) -> set[str]:
        raise DatabaseError("the database is gone")

    monkeypatch.setattr(tools, "secret_values", unreadable)
    outcome = run(
        w,
        agent.TaskSpec("heartbeat", None, {"plan": []}, allowed_instances=frozenset()),
        [model(replay, MODEL_A)],
    )
    (result,) = (json.loads(r) for r in _tool_results(replay))
    assert result["ok"] is False and "withheld" in result["error"] and "stdout" not in result
    assert outcome.trace_file and Path(outcome.trace_file).exists()


# Dialects: what real servers send (issue 13), as captured from llama.cpp's server and as the
# replay server speaks each family
# ---------------------------------------------------------------------------

WIRE = json.loads((Path(__file__).parent / "data" / "llamacpp_wire.json").read_text())["exchanges"]


class CapturedServer:
    """Answers every chat request with bytes captured from llama.cpp's real server: `by_stream`
    maps the request's `stream` flag to an exchange of tests/data/llamacpp_wire.json."""

    def __init__(self, by_stream: dict[bool, str]) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        exchanges = {flag: WIRE[name] for flag, name in by_stream.items()}
        self.requests: list[dict[str, Any]] = []
        requests = self.requests

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                requests.append(body)
                exchange = exchanges[bool(body.get("stream"))]
                data = exchange["body"].encode()
                streamed = bool(body.get("stream")) and exchange["status"] == 200
                self.send_response(exchange["status"])
                self.send_header("Content-Type", "text/event-stream" if streamed else "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def chat(self, **compat: Any) -> models.OpenAIChat:
        config = ModelConfig(
            name="llama", base_url=self.url, model="m1", api_key_env="K", api_key="k", timeout=5, **compat
        )
        return models.OpenAIChat(config)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def captured() -> Iterator[Any]:
    servers: list[CapturedServer] = []

    def start(by_stream: dict[bool, str]) -> CapturedServer:
        servers.append(CapturedServer(by_stream))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


ASK = [{"role": "user", "content": "Stop instance 7."}]


def test_a_tool_call_streamed_as_llama_cpp_does_is_assembled_whole(captured: Any) -> None:
    # Issue 13, fault 4: llama.cpp repeats id and function.name in every delta; the name
    # was concatenated into instance_stopinstance_stop...
    answer = captured({True: "named_stream"}).chat(stream=True).complete(ASK, [], 256, 5)
    (call,) = answer.tool_calls
    assert call.name == "instance_stop" and isinstance(json.loads(call.arguments), dict)
    assert call.id.startswith("call__0_instance_stop")
    assert answer.usage_estimated and answer.input_tokens > 0  # it sent no usage: ours, marked


def test_a_stream_llama_cpp_cut_is_a_retryable_error(captured: Any) -> None:
    # Issue 13, fault 2: [DONE] with no finish_reason was taken as a complete answer.
    with pytest.raises(ModelServerError) as caught:
        captured({True: "interrupted"}).chat(stream=True).complete(ASK, [], 256, 5)
    assert caught.value.retryable and "without a finish_reason" in caught.value.message
    assert caught.value.consumed[0] > 0  # charged: the server had read the prompt


def test_an_empty_200_stream_is_asked_again_whole(captured: Any) -> None:
    # Streamed tool_choice "auto" when the model picks a tool: llama.cpp answers an empty 200.
    server = captured({True: "auto_stream", False: "auto_plain"})
    answer = server.chat(stream=True, tool_choice="auto").complete(ASK, [], 256, 5)
    assert [c.name for c in answer.tool_calls] == ["report_result"]
    assert not answer.usage_estimated and answer.input_tokens == 241  # the server's own count
    assert [r.get("stream") for r in server.requests] == [True, False]


def test_a_prompt_over_the_context_reaches_the_context_path_as_an_empty_stream(captured: Any) -> None:
    server = captured({True: "over_stream", False: "over_plain"})
    with pytest.raises(ModelContextOverflow):
        server.chat(stream=True).complete(ASK, [], 256, 5)
    with pytest.raises(ModelContextOverflow):
        server.chat(stream=False).complete(ASK, [], 256, 5)


def test_a_text_answer_cut_at_max_tokens_is_truncated(captured: Any) -> None:
    with pytest.raises(ModelOutputTruncated):
        captured({True: "plain_stream"}).chat(stream=True).complete(ASK, [], 12, 5)


def test_an_empty_body_is_a_server_error_not_a_crash(captured: Any) -> None:
    server = captured({False: "auto_stream"})  # a zero-length body where JSON was due
    with pytest.raises(ModelServerError):
        server.chat(stream=False).complete(ASK, [], 256, 5)


@pytest.mark.parametrize("dialect", ["openai", "vllm", "sglang", "whole", "llamacpp"])
def test_the_loop_works_in_every_dialect(memory_world: World, replay: ReplayServer, dialect: str) -> None:
    replay.set_script({"conversations": [{**replay_conversation(MODEL_A), "dialect": dialect}]})
    compat: dict[str, Any] = {"stream": False, "tool_choice": "auto"} if dialect == "llamacpp" else {}
    chosen = dataclasses.replace(model(replay, MODEL_A), **compat)
    outcome = run(
        memory_world, agent.TaskSpec("instance_create", "alice", {"name": "alpha"}), [chosen], playbook=False
    )
    assert outcome.status == "succeeded", outcome.error
    names = [
        c["function"]["name"] for m in trace_of(outcome)["transcript"] for c in m.get("tool_calls") or []
    ]
    assert names == ["instance_create", "report_result"]
    assert replay.recorded()[1] == []  # no request refused (llamacpp refuses what the real one does)


def replay_conversation(model_name: str) -> dict[str, Any]:
    return dict(_create_script(model_name)["conversations"][0])


@pytest.mark.parametrize(
    "fault",
    [
        {
            "fault": "interrupted",
            **call("instance_create", name="alpha"),
            "times": 1,
            "then": call("instance_create", name="alpha"),
        },
        {"fault": "empty_200", "times": 1, "then": call("instance_create", name="alpha")},
    ],
    ids=["interrupted", "empty-200"],
)
def test_a_cut_or_empty_stream_is_retried_not_taken_as_the_answer(
    memory_world: World, replay: ReplayServer, fault: dict[str, Any]
) -> None:
    replay.set_script(script(fault, report()))
    outcome = run(
        memory_world, agent.TaskSpec("instance_create", "alice", {"name": "alpha"}), [model(replay, MODEL_A)]
    )
    assert outcome.status == "succeeded" and not outcome.playbook, outcome.error
    row = memory_world.rt.db.one("instance_by_name", user_id="alice", name="alpha")
    assert row is not None and row["status"] == "running"


def test_a_context_overflow_as_an_empty_stream_moves_on_without_a_cool_down(
    memory_world: World, replay: ReplayServer
) -> None:
    replay.set_script(_a_fails_b_works({"fault": "context_overflow", "as": "empty_stream"}))
    limits = agent.Limits(retries=2)
    shared = chain([model(replay, MODEL_A), model(replay, MODEL_B)], limits)
    outcome = agent.run_task(
        agent.TaskSpec("instance_create", "alice", {"name": "one"}),
        agent.ToolsEnvironment(memory_world.rt),
        shared,
        limits,
    )
    assert outcome.status == "succeeded", outcome.error
    failed = [s for s in chat_spans(outcome) if s["attributes"]["pideploy.model_name"] == MODEL_A]
    assert len(failed) == 1 and shared.cooldowns.active() == set()

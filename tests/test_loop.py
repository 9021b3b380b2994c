"""The agent loop on its own: a scripted model and a memory environment, no Postgres, no HTTP.

Each behaviour here is also covered on the real stack (real openai client, replay server,
Postgres) in tests/test_agent.py; these run in milliseconds and say which rule broke.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import agent
from config import ModelConfig
from errors import DatabaseError, ModelContextOverflow, ModelServerError, RunCrashed, ToolRefused
from models import Chain, ChatModel, Completion, Link, MemoryCooldowns, ScriptedModel, ToolCall
from observability import Outcome
from tests.conftest import make_config
from tests.memory_env import MemoryEnvironment

MODEL_A, MODEL_B = "model-a", "model-b"


@pytest.fixture
def env(tmp_path: Path) -> MemoryEnvironment:
    return MemoryEnvironment(make_config(tmp_path))


def reply(
    *calls: tuple[str, dict[str, Any] | str], text: str = "", usage: tuple[int, int] = (100, 10)
) -> Completion:
    """An answer calling these tools (arguments as a dict, or raw text as a model wrote it)."""
    tool_calls = tuple(
        ToolCall(f"call_{n}", name, arguments if isinstance(arguments, str) else json.dumps(arguments))
        for n, (name, arguments) in enumerate(calls)
    )
    return Completion(text, tool_calls, usage[0], usage[1], "tool_calls" if calls else "stop", "scripted")


def report(success: bool = True, **data: Any) -> tuple[str, dict[str, Any]]:
    return ("report_result", {"success": success, "action": "done", "data": data})


def link(model: ChatModel, *, price_in: float = 0.0, price_out: float = 0.0) -> Link:
    config = ModelConfig(
        name=model.name,
        base_url="http://scripted.invalid/v1",
        model=model.name,
        api_key_env="TEST_KEY",
        input_usd_per_mtok=price_in,
        output_usd_per_mtok=price_out,
        timeout=5,
        api_key="test-key",
    )
    return Link(model, config)


def chain(*links: Link, limits: agent.Limits, playbook: bool = True) -> Chain:
    return Chain(links, MemoryCooldowns(), limits, use_playbook=playbook, sleep=lambda _: None)


def run(
    env: MemoryEnvironment,
    task: agent.TaskSpec,
    *models: ScriptedModel,
    limits: agent.Limits | None = None,
    playbook: bool = True,
) -> Outcome:
    limits = limits or agent.Limits(retries=1)
    return agent.run_task(
        task, env, chain(*(link(m) for m in models), limits=limits, playbook=playbook), limits
    )


def trace_of(outcome: Outcome) -> dict[str, Any]:
    return json.loads(Path(outcome.trace_file).read_text())  # type: ignore[no-any-return]


def called(outcome: Outcome) -> list[str]:
    return [
        c["function"]["name"]
        for m in trace_of(outcome)["transcript"]
        if m["role"] == "assistant"
        for c in m.get("tool_calls") or []
    ]


def stop_task(iid: int) -> agent.TaskSpec:
    return agent.TaskSpec("instance_stop", "alice", {}, instance_id=iid)


def alternating(iid: int, turns: int, usage: tuple[int, int] = (100, 10)) -> list[Completion | Exception]:
    """Different calls each turn, so the loop guard never fires before another limit does."""
    return [
        reply(("instance_status", {"instance_id": iid}) if n % 2 else ("nginx_sync", {}), usage=usage)
        for n in range(turns)
    ]


# ---------------------------------------------------------------------------
# Endings: report_result, verified against the world
# ---------------------------------------------------------------------------


def test_a_task_done_and_reported_succeeds_in_two_turns(env: MemoryEnvironment) -> None:
    iid = env.add("alpha")
    model = ScriptedModel(
        [reply(("instance_stop", {"instance_id": iid})), reply(report(instance_id=iid))], MODEL_A
    )
    outcome = run(env, stop_task(iid), model)
    assert outcome.status == "succeeded" and outcome.turns == 2 and not outcome.playbook, outcome.error
    assert outcome.result == {"success": True, "action": "done", "data": {"instance_id": iid}, "errors": []}
    assert env.instances[iid]["status"] == "stopped"
    # The model was asked with the prompt, the task and the task's tools, then read the result.
    first, second = model.requests
    assert first["messages"][0] == {"role": "system", "content": agent.SYSTEM_PROMPT}
    assert [t["function"]["name"] for t in first["tools"]] == list(env.toolset("instance_stop"))
    assert json.loads(second["messages"][-1]["content"])["status"] == "stopped"
    trace = trace_of(outcome)
    assert (
        trace["outcome"] == "succeeded"
        and trace["extra"]["world_before"]["instances"][0]["status"] == "running"
    )


def test_claiming_success_without_doing_the_work_fails(env: MemoryEnvironment) -> None:
    iid = env.add("alpha")
    outcome = run(env, stop_task(iid), ScriptedModel([reply(report(instance_id=iid))], MODEL_A))
    assert outcome.status == "failed" and outcome.error_class == "llm_bad_output"
    assert outcome.error == f"{MODEL_A} reported success, but instance {iid} is running, not stopped"


def test_a_reported_failure_takes_the_class_of_the_failed_tool(env: MemoryEnvironment) -> None:
    victim, mine = env.add("victim", "bob"), env.add("mine")
    model = ScriptedModel(
        [reply(("instance_delete", {"instance_id": victim})), reply(report(False))], MODEL_A
    )
    outcome = run(env, agent.TaskSpec("instance_delete", "alice", {}, instance_id=mine), model)
    assert outcome.status == "failed" and outcome.error_class == "tool_refused"
    assert victim in env.instances and mine in env.instances
    refused = json.loads(model.requests[1]["messages"][-1]["content"])
    assert refused == {
        "ok": False,
        "error_class": "tool_refused",
        "error": f"instance {victim} does not belong to user alice",
    }


def test_a_playbook_whose_steps_do_not_hold_is_not_blamed_on_a_model(env: MemoryEnvironment) -> None:
    iid = env.add("alpha")
    env.override["instance_stop"] = lambda ctx, instance_id: {"instance_id": instance_id}  # does nothing
    outcome = run(env, stop_task(iid))
    assert outcome.status == "failed" and outcome.error_class == "tool_execution_error"
    assert outcome.error == f"the playbook's steps succeeded, but instance {iid} is running, not stopped"


# ---------------------------------------------------------------------------
# Unusable answers: returned to the model, then the next link
# ---------------------------------------------------------------------------


def test_a_toolless_answer_gets_the_nudge(env: MemoryEnvironment) -> None:
    iid = env.add("alpha")
    model = ScriptedModel(
        [reply(text="It looks fine."), reply(("instance_stop", {"instance_id": iid})), reply(report())],
        MODEL_A,
    )
    outcome = run(env, stop_task(iid), model)
    assert outcome.status == "succeeded" and outcome.turns == 3 and not outcome.playbook
    assert model.requests[1]["messages"][-2:] == [
        {"role": "assistant", "content": "It looks fine."},
        agent.NUDGE,
    ]


def test_malformed_json_is_returned_to_the_model_once(env: MemoryEnvironment) -> None:
    iid = env.add("alpha")
    model = ScriptedModel(
        [
            reply(("instance_stop", '{"instance_id": 1')),
            reply(("instance_stop", {"instance_id": iid})),
            reply(report()),
        ],
        MODEL_A,
    )
    outcome = run(env, stop_task(iid), model)
    assert outcome.status == "succeeded" and outcome.turns == 3
    error = json.loads(model.requests[1]["messages"][-1]["content"])
    assert (
        error["ok"] is False
        and error["error_class"] == "llm_bad_output"
        and "not valid JSON" in error["error"]
    )


def test_repeated_bad_output_without_a_playbook_ends_the_run(env: MemoryEnvironment) -> None:
    iid = env.add("alpha")
    model = ScriptedModel([reply(text="hmm"), reply(text="hmm")], MODEL_A)
    outcome = run(env, stop_task(iid), model, playbook=False)
    assert outcome.status == "failed" and outcome.error_class == "llm_bad_output"
    assert outcome.error == "the model kept answering unusably: an answer without a tool call"


def test_a_second_model_takes_over_from_one_that_answers_badly(env: MemoryEnvironment) -> None:
    iid = env.add("alpha")
    bad = ScriptedModel([reply(("no_such_tool", {})), reply(("no_such_tool", {}))], MODEL_A)
    good = ScriptedModel([reply(("instance_stop", {"instance_id": iid})), reply(report())], MODEL_B)
    limits = agent.Limits(retries=0)
    shared = chain(link(bad), link(good), limits=limits, playbook=False)
    outcome = agent.run_task(stop_task(iid), env, shared, limits)
    assert outcome.status == "succeeded" and not outcome.playbook
    assert env.instances[iid]["status"] == "stopped"
    assert MODEL_A in shared.cooldowns.active() and MODEL_B not in shared.cooldowns.active()


# ---------------------------------------------------------------------------
# The loop guard
# ---------------------------------------------------------------------------


def test_a_looping_model_is_stopped_by_the_guard(env: MemoryEnvironment) -> None:
    iid = env.add("alpha")
    model = ScriptedModel([reply(("instance_status", {"instance_id": iid}))] * 5, MODEL_A)
    outcome = run(env, stop_task(iid), model, playbook=False)
    assert outcome.status == "failed" and outcome.error_class == "agent_stuck"
    assert outcome.turns == 4  # the third identical call gives the link up; nothing is left
    assert outcome.error == "instance_status called 3 times in a row with the same arguments"
    assert env.instances[iid]["status"] == "running"


def test_a_looping_model_gives_way_to_the_playbook(env: MemoryEnvironment) -> None:
    iid = env.add("alpha")
    model = ScriptedModel([reply(("instance_status", {"instance_id": iid}))] * 3, MODEL_A)
    limits = agent.Limits(retries=1)
    shared = chain(link(model), limits=limits)
    outcome = agent.run_task(stop_task(iid), env, shared, limits)
    assert outcome.status == "succeeded" and outcome.playbook, outcome.error
    assert env.instances[iid]["status"] == "stopped"
    assert MODEL_A in shared.cooldowns.active()
    assert "3 times in a row" in " ".join(trace_of(outcome)["extra"]["chain_failures"])


def test_the_loop_guard_threshold_is_configurable(env: MemoryEnvironment, tmp_path: Path) -> None:
    iid = env.add("alpha")
    limits = agent.Limits.from_config(make_config(tmp_path, loop_guard_repeats=2))
    model = ScriptedModel([reply(("instance_status", {"instance_id": iid}))] * 3, MODEL_A)
    outcome = agent.run_task(stop_task(iid), env, chain(link(model), limits=limits, playbook=False), limits)
    assert outcome.status == "failed" and outcome.error_class == "agent_stuck"
    assert outcome.turns == 3 and "2 times in a row" in (outcome.error or "")


# ---------------------------------------------------------------------------
# Limits: turns, cost, tokens, time, cancellation
# ---------------------------------------------------------------------------


def test_max_turns_ends_the_run(env: MemoryEnvironment) -> None:
    iid = env.add("alpha")
    model = ScriptedModel(alternating(iid, 10), MODEL_A)
    outcome = run(env, stop_task(iid), model, limits=agent.Limits(max_turns=4), playbook=False)
    assert outcome.status == "failed" and outcome.error_class == "agent_stuck" and outcome.turns == 5
    assert len(model.requests) == 4


def test_after_the_models_turns_the_playbook_finishes(env: MemoryEnvironment) -> None:
    iid = env.add("alpha")
    outcome = run(
        env, stop_task(iid), ScriptedModel(alternating(iid, 10), MODEL_A), limits=agent.Limits(max_turns=4)
    )
    assert outcome.status == "succeeded" and outcome.playbook and outcome.turns == 6
    assert called(outcome)[-2:] == ["instance_stop", "report_result"]
    assert env.instances[iid]["status"] == "stopped"


def test_a_playbook_plan_longer_than_the_turn_cap_runs_to_its_end(env: MemoryEnvironment) -> None:
    ids = [env.add(f"i{n}") for n in range(14)]
    plan = [{"tool": "instance_status", "arguments": {"instance_id": i}} for i in ids]
    task = agent.TaskSpec("heartbeat", None, {"plan": plan}, allowed_instances=frozenset(ids))
    outcome = run(env, task, limits=agent.Limits(max_turns=12))
    assert outcome.status == "succeeded" and outcome.turns == len(ids) + 1


def test_the_cost_cap_stops_the_run_before_the_crossing_call(env: MemoryEnvironment) -> None:
    # $100 a million output tokens, 1000 a call: $0.10 a call. After two, $0.05 is left of the
    # $0.25 cap: not enough for a third call's 1000 tokens, so it is never made.
    iid = env.add("alpha")
    model = ScriptedModel(alternating(iid, 10, usage=(0, 1000)), MODEL_A)
    limits = agent.Limits(cost_cap_usd=0.25, max_tokens=1000, min_output_tokens=1000)
    expensive = link(model, price_out=100.0)
    outcome = agent.run_task(stop_task(iid), env, chain(expensive, limits=limits, playbook=False), limits)
    assert outcome.status == "failed" and outcome.error_class == "cost_cap"
    assert len(model.requests) == 2 and outcome.cost_usd == pytest.approx(0.2) and outcome.cost_usd <= 0.25
    assert outcome.error == "cost cap reached: spent $0.200000, next call needs $0.100000, cap $0.250000"


def test_the_token_cap_stops_free_models_too(env: MemoryEnvironment) -> None:
    iid = env.add("alpha")
    model = ScriptedModel(alternating(iid, 10, usage=(24_000, 1_000)), MODEL_A)
    limits = agent.Limits(token_cap=50_000)
    outcome = run(env, stop_task(iid), model, limits=limits, playbook=False)
    assert outcome.status == "failed" and outcome.error_class == "token_cap", outcome.error
    assert outcome.tokens == 50_000 and len(model.requests) == 2 and outcome.cost_usd == 0


def test_a_run_times_out_after_a_slow_tool(env: MemoryEnvironment) -> None:
    iid = env.add("alpha")

    def slow(ctx: Any, instance_id: int) -> dict[str, Any]:
        time.sleep(0.4)
        return {"instance_id": instance_id}

    env.override["instance_status"] = slow
    model = ScriptedModel(alternating(iid, 5), MODEL_A)
    outcome = run(env, stop_task(iid), model, limits=agent.Limits(timeout_s=0.3), playbook=False)
    assert outcome.status == "failed" and outcome.error_class == "timeout"
    assert outcome.turns == 3  # turn 3 found the deadline passed


class HangingModel:
    name = MODEL_A

    def __init__(self) -> None:
        self.release = threading.Event()

    def complete(self, messages: Any, tools: Any, max_tokens: int, timeout: float) -> Completion:
        self.release.wait(10)
        raise ModelServerError("released", model=self.name)


def test_a_model_that_hangs_is_cut_at_the_run_s_deadline(env: MemoryEnvironment) -> None:
    iid = env.add("alpha")
    hanging = HangingModel()
    limits = agent.Limits(timeout_s=0.3, retries=0)
    started = time.monotonic()
    try:
        outcome = agent.run_task(
            stop_task(iid), env, chain(link(hanging), limits=limits, playbook=False), limits
        )
    finally:
        hanging.release.set()
    assert outcome.status == "failed" and outcome.error_class == "timeout"
    assert time.monotonic() - started < 2


def test_a_cancelled_task_ends_at_the_next_turn(env: MemoryEnvironment) -> None:
    iid = env.add("alpha")
    asked: list[int] = []

    def cancelled() -> bool:  # cancelled while the second turn ran
        asked.append(1)
        return len(asked) > 2

    model = ScriptedModel(alternating(iid, 5), MODEL_A)
    limits = agent.Limits()
    outcome = agent.run_task(
        stop_task(iid), env, chain(link(model), limits=limits), limits, cancelled=cancelled
    )
    assert outcome.status == "failed" and outcome.error_class == "cancelled" and len(model.requests) == 2


# ---------------------------------------------------------------------------
# The fallback chain
# ---------------------------------------------------------------------------


def test_a_failing_model_is_retried_then_the_next_one_answers(env: MemoryEnvironment) -> None:
    iid = env.add("alpha")
    failing = ScriptedModel([ModelServerError("boom", model=MODEL_A)] * 3, MODEL_A)
    good = ScriptedModel([reply(("instance_stop", {"instance_id": iid})), reply(report())], MODEL_B)
    limits = agent.Limits(retries=2)
    shared = chain(link(failing), link(good), limits=limits)
    outcome = agent.run_task(stop_task(iid), env, shared, limits)
    assert outcome.status == "succeeded" and not outcome.playbook
    assert len(failing.requests) == 3 and len(good.requests) == 2  # a try and two retries
    assert shared.cooldowns.active() == {MODEL_A}
    # The second turn goes straight to B: A is cooling down.
    spans = [s for s in _spans(trace_of(outcome)) if s["attributes"].get("gen_ai.operation.name") == "chat"]
    order = [s["attributes"]["pideploy.model_name"] for s in sorted(spans, key=lambda s: s["start"])]
    assert order == [MODEL_A, MODEL_A, MODEL_A, MODEL_B, MODEL_B]


def test_a_context_overflow_moves_on_without_a_cool_down(env: MemoryEnvironment) -> None:
    iid = env.add("alpha")
    small = ScriptedModel([ModelContextOverflow("too long", model=MODEL_A)], MODEL_A)
    good = ScriptedModel([reply(("instance_stop", {"instance_id": iid})), reply(report())], MODEL_B)
    limits = agent.Limits(retries=2)
    shared = chain(link(small), link(good), limits=limits)
    outcome = agent.run_task(stop_task(iid), env, shared, limits)
    assert outcome.status == "succeeded" and len(small.requests) == 1  # not asked again this run
    assert shared.cooldowns.active() == set()


def test_every_model_down_falls_to_the_playbook(env: MemoryEnvironment) -> None:
    iid = env.add("alpha")
    down = [ModelServerError("boom", model="m")] * 2
    outcome = run(env, stop_task(iid), ScriptedModel(down, MODEL_A), ScriptedModel(down, MODEL_B))
    assert outcome.status == "succeeded" and outcome.playbook and outcome.cost_usd == 0
    assert called(outcome) == ["instance_stop", "report_result"]
    assert len(trace_of(outcome)["extra"]["chain_failures"]) == 2


def test_every_model_down_without_a_playbook_is_classified(env: MemoryEnvironment) -> None:
    iid = env.add("alpha")
    down = ScriptedModel([ModelServerError("boom", model=MODEL_A)] * 2, MODEL_A)
    outcome = run(env, stop_task(iid), down, playbook=False)
    assert outcome.status == "failed" and outcome.error_class == "llm_api_error"
    assert (outcome.error or "").startswith("every model of the chain failed: boom")


def test_the_playbook_acts_after_a_model_that_answered_then_failed(env: MemoryEnvironment) -> None:
    iid = env.add("alpha", status="stopped")
    model = ScriptedModel(
        [reply(("instance_status", {"instance_id": iid})), ModelServerError("boom", model=MODEL_A)]
    )
    outcome = run(
        env,
        agent.TaskSpec("instance_start", "alice", {}, instance_id=iid),
        model,
        limits=agent.Limits(retries=0),
    )
    assert outcome.status == "succeeded" and outcome.playbook, outcome.error
    assert called(outcome) == ["instance_status", "instance_start", "report_result"]


def test_a_model_cannot_pass_its_calls_off_as_the_playbook_s(env: MemoryEnvironment) -> None:
    iid = env.add("alpha", status="stopped")
    spoof = Completion(
        "",
        (ToolCall("playbook_0", "instance_status", json.dumps({"instance_id": iid})),),
        1,
        1,
        "tool_calls",
        "m",
    )
    model = ScriptedModel([spoof, ModelServerError("boom", model=MODEL_A)], MODEL_A)
    outcome = run(
        env,
        agent.TaskSpec("instance_start", "alice", {}, instance_id=iid),
        model,
        limits=agent.Limits(retries=0),
    )
    assert outcome.status == "succeeded" and env.instances[iid]["status"] == "running"


def test_agent_off_runs_the_playbook_alone(env: MemoryEnvironment) -> None:
    outcome = run(env, agent.TaskSpec("instance_create", "alice", {"name": "quiet"}))
    assert outcome.status == "succeeded" and outcome.playbook
    assert env.by_name("alice", "quiet") is not None


# ---------------------------------------------------------------------------
# Crashes, refusals, redaction
# ---------------------------------------------------------------------------


def test_a_tool_that_loses_the_database_ends_the_run_as_a_crash(env: MemoryEnvironment) -> None:
    iid = env.add("alpha")

    def lost(ctx: Any, instance_id: int) -> dict[str, Any]:
        raise DatabaseError("database unavailable")

    env.override["instance_stop"] = lost
    limits = agent.Limits()
    with pytest.raises(RunCrashed) as crash:
        agent.run_task(stop_task(iid), env, chain(limits=limits), limits)
    assert isinstance(crash.value.__cause__, DatabaseError) and crash.value.error_class == "infra_unavailable"
    written = json.loads(Path(crash.value.data["trace_file"]).read_text())
    assert written["outcome"] == "failed" and written["extra"]["crashed"].startswith("DatabaseError")


def test_a_tool_bug_is_told_to_the_model_not_raised(env: MemoryEnvironment) -> None:
    iid = env.add("alpha")

    def buggy(ctx: Any, instance_id: int) -> dict[str, Any]:
        raise KeyError("port")

    env.override["instance_status"] = buggy
    model = ScriptedModel(
        [
            reply(("instance_status", {"instance_id": iid})),
            reply(("instance_stop", {"instance_id": iid})),
            reply(report()),
        ]
    )
    outcome = run(env, stop_task(iid), model)
    assert outcome.status == "succeeded"
    told = json.loads(model.requests[1]["messages"][-1]["content"])
    assert told == {"ok": False, "error_class": "tool_execution_error", "error": "KeyError: 'port'"}


def test_the_task_s_scope_binds_the_tools(env: MemoryEnvironment) -> None:
    mine, other = env.add("mine"), env.add("other")
    model = ScriptedModel([reply(("instance_stop", {"instance_id": other})), reply(report(False))])
    outcome = run(env, stop_task(mine), model)
    assert outcome.status == "failed" and outcome.error_class == ToolRefused.error_class
    assert env.instances[other]["status"] == "running"


def test_secret_values_never_reach_the_model_or_the_trace(env: MemoryEnvironment) -> None:
    iid = env.add("alpha", last_error="token sk-live-0123456789 rejected")
    env.secrets = {"sk-live-0123456789"}
    model = ScriptedModel(
        [
            reply(("instance_status", {"instance_id": iid})),
            reply(("instance_stop", {"instance_id": iid})),
            reply(report()),
        ]
    )
    outcome = run(env, stop_task(iid), model)
    assert outcome.status == "succeeded"
    assert "sk-live-0123456789" not in json.dumps(model.requests)
    assert "sk-live-0123456789" not in Path(outcome.trace_file).read_text()


def test_tool_output_is_withheld_when_the_secrets_cannot_be_read(env: MemoryEnvironment) -> None:
    iid = env.add("alpha")
    env.secrets_error = DatabaseError("database unavailable")
    model = ScriptedModel(
        [
            reply(("instance_status", {"instance_id": iid})),
            reply(("instance_stop", {"instance_id": iid})),
            reply(report()),
        ]
    )
    outcome = run(env, stop_task(iid), model)
    assert outcome.status == "succeeded"
    withheld = json.loads(model.requests[1]["messages"][-1]["content"])
    assert withheld["ok"] is False and "its output is withheld" in withheld["error"]


def test_the_scripted_model_runs_out_loudly(env: MemoryEnvironment) -> None:
    iid = env.add("alpha")
    with pytest.raises(RunCrashed):
        run(env, stop_task(iid), ScriptedModel([reply(("instance_status", {"instance_id": iid}))]))


def _spans(trace: dict[str, Any]) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    stack = [trace["spans"]] if isinstance(trace["spans"], dict) else list(trace["spans"])
    while stack:
        span = stack.pop()
        found.append(span)
        stack.extend(span.get("children", []))
    return found

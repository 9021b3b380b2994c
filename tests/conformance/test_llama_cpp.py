"""The agent loop, the tools and the queue against llama.cpp's OpenAI-compatible server.

What must hold is the plumbing, whatever the tiny model decides: every request the loop
sends is accepted by the server (its access log says 200), tool calls are parsed with
whole names, tokens are recorded (the server's count, or marked estimated), TTFT is
recorded, cut streams and a dead server are classified and retried, and every task ends
as it should through the chain and, at the end, the playbook.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import agent
import models
import tools
from config import ModelConfig
from errors import ModelContextOverflow, ModelServerError
from observability import Outcome
from tests.conformance.conftest import KillAtRequest, LlamaServer, record_calls
from tests.conftest import World
from tests.test_serve import Site, wait_for

pytestmark = [pytest.mark.conformance, pytest.mark.stack]

# The tiny model never learns from tool results (its chat template drops `tool` messages):
# three turns show the plumbing; more would only repeat it.
LIMITS = agent.Limits(max_turns=3, retries=1, backoff_s=0.2)
# What llama.cpp's chatml-function-calling format needs (README, "The model chain"): tools reach
# the model only with a tool_choice, "auto" cannot stream, and its grammar of a full tool spec
# (maxLength 4096...) kills the server.
LLAMA = {"stream": False, "tool_choice": "auto", "tool_schema": "plain"}


def llama_model(url: str, **compat: Any) -> ModelConfig:
    return ModelConfig(
        name="smollm2",
        base_url=url,
        model="smollm2-135m",
        api_key_env="LLAMA_KEY",
        timeout=240,
        api_key="none",
        **compat,
    )


def run(w: World, task: agent.TaskSpec, model: ModelConfig, limits: agent.Limits = LIMITS) -> Outcome:
    chain = models.Chain([models.Link(models.OpenAIChat(model), model)], models.MemoryCooldowns(), limits)
    return agent.run_task(task, agent.ToolsEnvironment(w.rt), chain, limits)


def transcript_calls(trace: dict[str, Any]) -> list[tuple[str, str]]:
    """(call id, tool name) of every tool call in the transcript."""
    return [
        (call["id"], call["function"]["name"])
        for message in trace["transcript"]
        if message["role"] == "assistant"
        for call in message.get("tool_calls") or []
    ]


def chat_spans(trace: dict[str, Any]) -> list[dict[str, Any]]:
    stack, found = [trace["spans"]], []
    while stack:
        span = stack.pop()
        stack.extend(span.get("children", []))
        if span["attributes"].get("gen_ai.operation.name") == "chat":
            found.append(span)
    return sorted(found, key=lambda s: s["start"])


@pytest.mark.parametrize(
    "compat",
    [LLAMA, {"stream": True, "tool_choice": "auto", "tool_schema": "plain"}, {"stream": True}],
    ids=["whole-auto", "streamed-auto", "streamed-no-tool-choice"],
)
def test_the_loop_speaks_to_llama_cpp(real_world: World, llama: LlamaServer, compat: dict[str, Any]) -> None:
    iid = int(real_world.create("alpha")["instance_id"])
    tools.instance_stop(real_world.rt, real_world.ctx(), iid)
    before = len(llama.statuses())
    task = agent.TaskSpec("instance_start", "alice", {}, instance_id=iid, id=None)
    outcome = run(real_world, task, llama_model(llama.url, **compat))
    trace = json.loads(Path(outcome.trace_file).read_text())
    record_calls(f"instance_start {'/'.join(f'{k}={v}' for k, v in compat.items())}", trace)

    statuses = llama.statuses()[before:]
    assert statuses and set(statuses) == {200}, statuses  # no request refused for its shape
    offered = set(tools.TOOLSETS["instance_start"])
    names = [name for call_id, name in transcript_calls(trace) if not call_id.startswith("playbook_")]
    assert all(name in offered for name in names), names  # whole names, never concatenations
    answered = [
        s
        for s in chat_spans(trace)
        if s["status"] != "error" and s["attributes"]["pideploy.model_name"] == "smollm2"
    ]
    for span in answered:
        attributes = span["attributes"]
        assert attributes["gen_ai.usage.input_tokens"] > 0
        assert isinstance(attributes["pideploy.ttft_s"], float)
        if not compat["stream"]:  # llama.cpp counts the tokens of whole answers itself
            assert "pideploy.usage_estimated" not in attributes
    # Whatever the model did, the run ended as one of the loop's endings, and the world says so.
    row = real_world.row(iid)
    assert row is not None
    if outcome.status == "succeeded":
        assert row["status"] == "running" and real_world.through_nginx(iid)[0] == 200
    else:
        assert outcome.error_class in (
            "agent_stuck",
            "llm_bad_output",
            "tool_refused",
            "tool_execution_error",
        )
        assert row["status"] in ("stopped", "running", "error")


def test_whole_answers_carry_the_server_s_own_token_count(real_world: World, llama: LlamaServer) -> None:
    task = agent.TaskSpec("instance_create", "alice", {"name": "counted"})
    outcome = run(real_world, task, llama_model(llama.url, **LLAMA))
    trace = json.loads(Path(outcome.trace_file).read_text())
    record_calls("instance_create whole-auto", trace)
    measured = [
        s
        for s in chat_spans(trace)
        if s["attributes"].get("pideploy.model_name") == "smollm2" and s["status"] != "error"
    ]
    assert measured
    for span in measured:
        attributes = span["attributes"]
        assert "pideploy.usage_estimated" not in attributes  # the server's own count, not ours
        # Our reservation is an upper bound of the prompt (bytes), never below the server's count.
        assert attributes["gen_ai.usage.input_tokens"] < 8192


def test_a_stream_the_server_cuts_is_a_retryable_server_error(llama: LlamaServer) -> None:
    # llama.cpp ends an in-flight stream with [DONE] and no finish_reason when another request
    # arrives (interrupt_requests is on by default).
    chat = models.OpenAIChat(llama_model(llama.url, stream=True))
    messages = [{"role": "user", "content": "Write a very long story about a lighthouse keeper."}]
    outcome: dict[str, Any] = {}

    def long_call() -> None:
        try:
            outcome["answer"] = chat.complete(messages, [], 2000, 240)
        except Exception as error:  # the thread hands it to the test
            outcome["error"] = error

    caller = threading.Thread(target=long_call)
    caller.start()
    time.sleep(3)  # the first answer is streaming by now (a 2,000-token story takes minutes here)
    models.OpenAIChat(llama_model(llama.url, stream=False)).complete(
        [{"role": "user", "content": "Hi"}], [], 8 * 32, 120
    )
    caller.join(240)
    error = outcome.get("error")
    assert isinstance(error, ModelServerError) and error.retryable, outcome
    assert "without a finish_reason" in error.message
    assert error.consumed[0] > 0  # the server had read the prompt: charged


@pytest.mark.parametrize("stream", [True, False])
def test_a_prompt_over_the_context_reaches_the_context_path(
    llama_parts: tuple[str, str], tmp_path: Path, stream: bool
) -> None:
    # Streamed, llama.cpp answers an empty 200; whole, a 400 context_length_exceeded.
    small = LlamaServer(*llama_parts, tmp_path, n_ctx=512)
    try:
        chat = models.OpenAIChat(
            llama_model(small.url, stream=stream, tool_choice="auto", tool_schema="plain")
        )
        specs = [tools.TOOLS[name].spec() for name in tools.TOOLSETS["instance_create"]]
        messages = [
            {"role": "system", "content": agent.SYSTEM_PROMPT},
            {
                "role": "user",
                "content": agent.task_message(agent.TaskSpec("instance_create", "alice", {"name": "a"})),
            },
        ]
        with pytest.raises(ModelContextOverflow):
            chat.complete(messages, specs, 256, 120)
    finally:
        small.stop()


def test_a_server_killed_at_the_second_request_ends_in_the_playbook(
    site: Site, own_llama: LlamaServer
) -> None:
    relay = KillAtRequest(own_llama)
    try:
        (site.home / "pideploy.toml").write_text(
            "[settings]\nmax_turns = 3\nmodel_retries = 1\nmodel_backoff = 0.2\n\n"
            f'[[models]]\nname = "smollm2"\nbase_url = "{relay.url}"\nmodel = "smollm2-135m"\n'
            'api_key_env = "LLAMA_KEY"\ntimeout = 240.0\nstream = false\ntool_choice = "auto"\ntool_schema = "plain"\n'
        )
        site.serve(PIDEPLOY_AGENT="off", log="playbook")  # the instance to start, made without the model
        created = site.cli(
            "submit", "instance_create", "--user", "alice", "--params", '{"name": "web"}', "--wait"
        )
        assert created.returncode == 0, created.stderr
        iid = json.loads(created.stdout)["instance_id"]
        stopped = site.cli("submit", "instance_stop", "--user", "alice", "--instance", str(iid), "--wait")
        assert stopped.returncode == 0, stopped.stderr
        for process in site.processes:
            process.terminate()
            process.wait(60)
        site.serve(PIDEPLOY_AGENT="on", LLAMA_KEY="none", log="llama")
        relay.arm(2)  # the first request is answered; the second kills the server
        started = site.cli(
            "submit",
            "instance_start",
            "--user",
            "alice",
            "--instance",
            str(iid),
            "--wait",
            "--timeout",
            "600",
        )
        assert started.returncode == 0, started.stderr + site.log("llama")[-3000:]
        assert own_llama.process.poll() is not None  # it really died
        site.check_world(iid, "running")
        task = json.loads(started.stdout)
        trace = json.loads((site.home / "traces" / task["trace_file"]).read_text())
        record_calls("instance_start (server killed)", trace)
        assert trace["extra"].get("playbook") is True
        assert any("smollm2" in failure for failure in trace["extra"]["chain_failures"])
        models = [s["attributes"]["pideploy.model_name"] for s in chat_spans(trace)]
        assert models[0] == "smollm2" and models[-1] == "playbook"
    finally:
        relay.close()


def test_the_queue_works_tasks_through_llama_cpp(site: Site, llama: LlamaServer) -> None:
    (site.home / "pideploy.toml").write_text(
        "[settings]\nmax_turns = 3\nmodel_retries = 1\n\n"
        f'[[models]]\nname = "smollm2"\nbase_url = "{llama.url}"\nmodel = "smollm2-135m"\n'
        'api_key_env = "LLAMA_KEY"\ntimeout = 240.0\nstream = false\ntool_choice = "auto"\ntool_schema = "plain"\n'
    )
    site.serve(PIDEPLOY_AGENT="on", LLAMA_KEY="none")
    status, created = site.call("POST", "/api/instances", {"name": "queued"})
    assert status == 202, created
    task = site.wait_task(created["task_id"], timeout=900)
    trace = json.loads(Path(task["trace_file"]).read_text())
    record_calls("instance_create through the queue", trace)
    # The model's choice decides success; either way the task ended and the row agrees with it.
    row = site.sql("SELECT * FROM instance WHERE id = %s", created["instance_id"])[0]
    if task["status"] == "succeeded":
        site.check_world(created["instance_id"])
    else:
        assert task["error_class"] in (
            "agent_stuck",
            "llm_bad_output",
            "tool_refused",
            "tool_execution_error",
        )
        assert row["status"] in ("creating", "error", "running"), row
    wait_for("no unfinished task", lambda: not site.sql("SELECT 1 FROM task WHERE finished_at IS NULL"), 60)

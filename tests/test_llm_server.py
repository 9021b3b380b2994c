from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, cast

import openai
import pytest
from openai.types.chat import ChatCompletion

from evals.llm_server import ReplayServer, validate_script
from tests.conftest import ROOT

TASK = {"type": "instance_create", "task_id": 17, "user_id": "u1", "params": {"name": "web", "replicas": 2}}
TASK_MESSAGE = "Task:\n```json\n" + json.dumps(TASK, indent=2, sort_keys=True) + "\n```"
SYSTEM = {"role": "system", "content": "You are piDeploy's operator agent."}
USER = {"role": "user", "content": TASK_MESSAGE}

CREATE = {
    "id": "create-ok",
    "match": '"type": "instance_create"',
    "turns": [
        {
            "content": "Creating the instance now.",
            "tool_calls": [
                {"id": "call_1", "name": "instance_create", "arguments": {"name": "{{task.params.name}}"}},
                {"name": "instance_status", "arguments": {"note": "replicas={{task.params.replicas}}"}},
            ],
            "usage": {"prompt_tokens": 950, "completion_tokens": 30},
        },
        {
            "content": "Created.",
            "tool_calls": [
                {
                    "name": "report_result",
                    "arguments": {
                        "success": True,
                        "action": "created",
                        "data": {"instance_id": "{{last_result.instance_id}}", "task": "{{task.task_id}}"},
                    },
                }
            ],
        },
    ],
}


@pytest.fixture
def server() -> Iterator[ReplayServer]:
    with ReplayServer({"conversations": [CREATE]}) as replay:
        yield replay


def client(server: ReplayServer, timeout: float = 10.0) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url, api_key="test", max_retries=0, timeout=timeout)


def assistant(*calls: tuple[str, str]) -> dict[str, Any]:
    return {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": i, "type": "function", "function": {"name": name, "arguments": "{}"}} for i, name in calls
        ],
    }


def tool(call_id: str, content: dict[str, Any]) -> dict[str, Any]:
    return {"role": "tool", "tool_call_id": call_id, "content": json.dumps(content)}


def complete(api: openai.OpenAI, messages: list[dict[str, Any]], model: str = "m1") -> ChatCompletion:
    return api.chat.completions.create(model=model, messages=cast(Any, messages))


def stream(
    api: openai.OpenAI, messages: list[dict[str, Any]], model: str = "m1", include_usage: bool = True
) -> dict[str, Any]:
    """Read a stream the way the agent does: content, tool calls by index, finish reason, usage."""
    content, finish, usage = "", None, None
    calls: dict[int, dict[str, Any]] = {}
    chunks = 0
    response = api.chat.completions.create(
        model=model,
        messages=cast(Any, messages),
        stream=True,
        stream_options={"include_usage": include_usage},
    )
    with response:
        for chunk in response:
            chunks += 1
            usage = chunk.usage or usage
            for choice in chunk.choices:
                content += choice.delta.content or ""
                for piece in choice.delta.tool_calls or []:
                    call = calls.setdefault(piece.index, {"id": "", "name": "", "arguments": "", "pieces": 0})
                    call["id"] = piece.id or call["id"]
                    if piece.function is not None:
                        call["name"] += piece.function.name or ""
                        call["arguments"] += piece.function.arguments or ""
                        call["pieces"] += 1
                finish = choice.finish_reason or finish
    return {"content": content, "calls": [calls[i] for i in sorted(calls)], "finish": finish, "usage": usage}


# ---------------------------------------------------------------------------
# answers
# ---------------------------------------------------------------------------


def test_streamed_tool_calls_reassemble(server: ReplayServer) -> None:
    reply = stream(client(server), [SYSTEM, USER])
    assert reply["content"] == "Creating the instance now."
    assert reply["finish"] == "tool_calls"
    first, second = reply["calls"]
    assert (first["id"], first["name"]) == ("call_1", "instance_create")
    assert json.loads(first["arguments"]) == {"name": "web"}
    assert first["pieces"] > 2  # the arguments arrived over several deltas
    assert (second["id"], second["name"]) == ("call_0_1", "instance_status")
    assert json.loads(second["arguments"]) == {"note": "replicas=2"}
    usage = reply["usage"]
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (950, 30, 980)
    (request,) = server.requests
    assert request["stream"] is True and request["messages"][1] == USER


def test_no_usage_chunk_unless_asked(server: ReplayServer) -> None:
    reply = stream(client(server), [USER], include_usage=False)
    assert reply["usage"] is None and reply["finish"] == "tool_calls"


def test_non_streamed_answer_and_placeholders_keep_their_type(server: ReplayServer) -> None:
    messages = [
        SYSTEM,
        USER,
        assistant(("call_1", "instance_create")),
        tool("call_1", {"ok": True, "instance_id": 42}),
    ]
    completion = complete(client(server), messages)
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Created."
    (call,) = choice.message.tool_calls or []
    assert call.id == "call_1_0" and call.type == "function"
    assert call.function.name == "report_result"
    arguments = json.loads(call.function.arguments)
    assert arguments["data"] == {"instance_id": 42, "task": 17}  # ints stay ints
    usage = completion.usage
    assert usage is not None
    compact = len(json.dumps(server.requests[-1], separators=(",", ":")))
    assert abs(usage.prompt_tokens - compact // 4) <= 2  # estimated from the request's size
    assert usage.completion_tokens > 0 and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_conversation_selection_by_model_match_and_position(server: ReplayServer) -> None:
    server.set_script(
        {
            "conversations": [
                {"id": "other-model", "model": "m2", "turns": [{"content": "m2 answers"}]},
                {"id": "by-system", "match": "operator agent", "turns": [{"content": "a"}, {"content": "b"}]},
                {"id": "fallback", "turns": [{"content": "anything"}]},
            ]
        }
    )
    api = client(server)

    def ask(model: str, *messages: dict[str, Any]) -> str | None:
        return complete(api, list(messages), model).choices[0].message.content

    assert ask("m2", SYSTEM, USER) == "m2 answers"
    assert ask("m1", SYSTEM, USER) == "a"
    assert ask("m1", SYSTEM, USER, assistant(("x", "t")), tool("x", {"ok": True})) == "b"
    assert ask("m1", USER) == "anything"


def test_no_match_and_running_out_are_loud(server: ReplayServer) -> None:
    api = client(server)
    with pytest.raises(openai.InternalServerError) as raised:
        complete(api, [{"role": "user", "content": "hello"}])
    assert "no conversation matches model 'm1'" in str(raised.value)
    assert "create-ok" in str(raised.value)
    three = [USER, assistant(("a", "t")), assistant(("b", "t"))]
    with pytest.raises(openai.InternalServerError) as raised:
        stream(api, three)
    assert "has 2 turns, but the request already holds 2 assistant messages" in str(raised.value)
    assert len(server.errors) == 2


def test_after_end_and_repeat(server: ReplayServer) -> None:
    server.set_script(
        {
            "conversations": [
                {
                    "id": "last",
                    "match": "last",
                    "after_end": "repeat_last",
                    "turns": [{"content": "1"}, {"content": "2"}],
                },
                {
                    "id": "loop",
                    "match": "loop",
                    "turns": [
                        {"content": "first"},
                        {"repeat": {"tool_calls": [{"name": "instance_status"}]}},
                    ],
                },
            ]
        }
    )
    api = client(server)
    history = [assistant(("a", "t"))] * 5
    last = complete(api, [{"role": "user", "content": "last"}, *history])
    assert last.choices[0].message.content == "2"
    for k in (1, 2, 7):
        reply = stream(api, [{"role": "user", "content": "loop"}, *[assistant(("a", "t"))] * k])
        (call,) = reply["calls"]
        assert (call["name"], call["id"], json.loads(call["arguments"])) == (
            "instance_status",
            f"call_{k}_0",
            {},
        )


def test_raw_string_arguments_are_served_verbatim(server: ReplayServer) -> None:
    broken = '{"name": "web",'
    server.set_script(
        {"conversations": [{"turns": [{"tool_calls": [{"name": "instance_create", "arguments": broken}]}]}]}
    )
    (call,) = stream(client(server), [USER])["calls"]
    assert call["arguments"] == broken


def test_a_missing_placeholder_key_is_a_replay_error(server: ReplayServer) -> None:
    server.set_script(
        {
            "conversations": [
                {"turns": [{"tool_calls": [{"name": "x", "arguments": {"n": "{{task.params.nope}}"}}]}]}
            ]
        }
    )
    with pytest.raises(openai.InternalServerError, match=r"task.params has no 'nope'"):
        stream(client(server), [USER])


def test_empty_answer(server: ReplayServer) -> None:
    server.set_script({"conversations": [{"turns": [{"fault": "empty"}]}]})
    reply = stream(client(server), [USER])
    assert (reply["content"], reply["calls"], reply["finish"]) == ("", [], "stop")
    message = complete(client(server), [USER]).choices[0].message
    assert message.content is None and not message.tool_calls


# ---------------------------------------------------------------------------
# faults
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "exception", "status"),
    [
        ({"fault": "http_500"}, openai.InternalServerError, 500),
        ({"fault": "http_429", "retry_after": 3}, openai.RateLimitError, 429),
        ({"fault": "http_401"}, openai.AuthenticationError, 401),
        ({"fault": "http_404"}, openai.NotFoundError, 404),
        ({"fault": "context_overflow"}, openai.BadRequestError, 400),
    ],
    ids=lambda value: value["fault"] if isinstance(value, dict) else None,
)
@pytest.mark.parametrize("streamed", [True, False], ids=["stream", "plain"])
def test_http_faults_raise_the_right_openai_error(
    server: ReplayServer,
    fault: dict[str, Any],
    exception: type[openai.APIStatusError],
    status: int,
    streamed: bool,
) -> None:
    server.set_script({"conversations": [{"turns": [fault]}]})
    with pytest.raises(exception) as raised:
        if streamed:
            stream(client(server), [USER])
        else:
            complete(client(server), [USER])
    assert raised.value.status_code == status
    if fault["fault"] == "http_429":
        assert raised.value.response.headers["retry-after"] == "3"
    if fault["fault"] == "context_overflow":
        assert raised.value.code == "context_length_exceeded"
    if fault["fault"] == "http_404":
        assert raised.value.code == "model_not_found" and "m1" in raised.value.message


@pytest.mark.parametrize("streamed", [True, False], ids=["stream", "plain"])
def test_stall_times_out_promptly_and_does_not_hold_up_stop(streamed: bool) -> None:
    server = ReplayServer(
        {"conversations": [{"turns": [{"fault": "stall", "after_chunks": 1, "seconds": 600}]}]}
    )
    server.start()
    try:
        started = time.monotonic()
        with pytest.raises(openai.APITimeoutError):
            if streamed:
                stream(client(server, timeout=1.0), [USER])
            else:
                complete(client(server, timeout=1.0), [USER])
        assert time.monotonic() - started < 15
    finally:
        started = time.monotonic()
        server.stop()  # the stalled handler is still waiting out its 600 s
        assert time.monotonic() - started < 15


def test_stop_interrupts_a_stalled_stream_in_progress() -> None:
    server = ReplayServer(
        {"conversations": [{"turns": [{"fault": "stall", "after_chunks": 2, "seconds": 600}]}]}
    )
    server.start()
    outcome: list[BaseException] = []

    def read() -> None:
        try:
            stream(client(server, timeout=30.0), [USER])
        except BaseException as error:
            outcome.append(error)

    reader = threading.Thread(target=read)
    reader.start()
    time.sleep(0.3)
    started = time.monotonic()
    server.stop()
    reader.join(timeout=5)
    assert not reader.is_alive() and time.monotonic() - started < 15
    assert isinstance(outcome[0], openai.APIConnectionError)


@pytest.mark.parametrize("streamed", [True, False], ids=["stream", "plain"])
def test_disconnect_is_a_connection_error(server: ReplayServer, streamed: bool) -> None:
    server.set_script({"conversations": [{"turns": [{"fault": "disconnect", "after_chunks": 2}]}]})
    with pytest.raises(openai.APIConnectionError):
        if streamed:
            stream(client(server), [USER])
        else:
            complete(client(server), [USER])


def test_times_then_fails_n_times_per_position(server: ReplayServer) -> None:
    server.set_script(
        {
            "conversations": [
                {
                    "id": "flaky",
                    "turns": [
                        {
                            "fault": "http_500",
                            "times": 2,
                            "then": {"fault": "http_429", "times": 1, "then": {"content": "ok"}},
                        },
                        {"content": "second"},
                    ],
                }
            ]
        }
    )
    api = client(server)
    for expected in (openai.InternalServerError, openai.InternalServerError, openai.RateLimitError):
        with pytest.raises(expected):
            stream(api, [USER])
    assert stream(api, [USER])["content"] == "ok"
    assert stream(api, [USER])["content"] == "ok"
    assert stream(api, [USER, assistant(("a", "t"))])["content"] == "second"
    server.reset_counters()
    with pytest.raises(openai.InternalServerError):
        stream(api, [USER])


def test_delay_shows_as_time_to_first_token(server: ReplayServer) -> None:
    server.set_script({"conversations": [{"turns": [{"content": "late", "delay": 0.3}]}]})
    started = time.monotonic()
    response = client(server).chat.completions.create(model="m", messages=cast(Any, [USER]), stream=True)
    first = None
    for chunk in response:
        if chunk.choices and chunk.choices[0].delta.content:
            first = time.monotonic() - started
            break
    response.close()
    assert first is not None and first >= 0.3


def test_concurrent_runs_are_served_independently(server: ReplayServer) -> None:
    api = client(server)

    def run(i: int) -> tuple[str, str]:
        first = stream(api, [USER])["calls"][0]["name"]
        messages = [
            USER,
            assistant(("call_1", "instance_create")),
            tool("call_1", {"ok": True, "instance_id": i}),
        ]
        second = stream(api, messages)["calls"][0]["arguments"]
        return first, second

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(run, range(16)))
    for i, (first, second) in enumerate(results):
        assert first == "instance_create"
        assert json.loads(second)["data"]["instance_id"] == i
    assert len(server.requests) == 32


def test_models_endpoint(server: ReplayServer) -> None:
    server.set_script({"conversations": [{"model": "b", "turns": [{}]}, {"model": "a", "turns": [{}]}]})
    assert [m.id for m in client(server).models.list()] == ["a", "b"]


@pytest.mark.parametrize(
    ("script", "complaint"),
    [
        ({"conversation": []}, "conversations"),
        ({"conversations": [{"turns": [{"fault": "http_503"}]}]}, "unknown fault 'http_503'"),
        ({"conversations": [{"turns": [{"contnet": "typo"}]}]}, "unknown keys ['contnet']"),
        ({"conversations": [{"mach": "x", "turns": [{}]}]}, "unknown keys ['mach']"),
        ({"conversations": [{"turns": [{"repeat": {}}, {}]}]}, "must be alone and last"),
        ({"conversations": [{"turns": [{"fault": "http_500", "times": 2}]}]}, "times needs a then"),
        ({"conversations": [{"id": "a", "turns": [{}]}, {"id": "a", "turns": [{}]}]}, "duplicate id"),
        ({"conversations": [{"turns": []}]}, "non-empty"),
    ],
)
def test_bad_scripts_are_refused(script: dict[str, Any], complaint: str) -> None:
    with pytest.raises(ValueError, match=complaint.replace("[", r"\[").replace("]", r"\]")):
        validate_script(script)


# ---------------------------------------------------------------------------
# standalone
# ---------------------------------------------------------------------------


def test_runs_standalone_and_stops_on_sigterm(tmp_path: Path) -> None:
    script = tmp_path / "script.json"
    script.write_text(
        json.dumps({"conversations": [{"model": "m1", "turns": [{"content": "from the process"}]}]})
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "evals.llm_server", "--port", "0", "--script", str(script)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line.startswith("listening on http://127.0.0.1:"), line + (
            process.stderr.read() if process.stderr else ""
        )
        url = line.split()[-1]
        api = openai.OpenAI(base_url=url, api_key="test", max_retries=0, timeout=5)
        assert stream(api, [USER])["content"] == "from the process"
        assert [m.id for m in api.models.list()] == ["m1"]

        new_script = {"conversations": [{"turns": [{"content": "swapped"}]}]}
        put = urllib.request.Request(
            url.removesuffix("/v1") + "/replay/script", data=json.dumps(new_script).encode(), method="PUT"
        )
        with urllib.request.urlopen(put, timeout=5) as response:
            assert json.load(response) == {"ok": True}
        assert stream(api, [USER])["content"] == "swapped"
        with urllib.request.urlopen(url.removesuffix("/v1") + "/replay/requests", timeout=5) as response:
            assert [r["model"] for r in json.load(response)["requests"]] == ["m1", "m1"]
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=5) == 0


def test_standalone_refuses_a_bad_script(tmp_path: Path) -> None:
    script = tmp_path / "script.json"
    script.write_text('{"conversations": [{"turns": [{"fault": "nope"}]}]}')
    result = subprocess.run(
        [sys.executable, "-m", "evals.llm_server", "--script", str(script)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert result.returncode == 2 and "unknown fault 'nope'" in result.stderr

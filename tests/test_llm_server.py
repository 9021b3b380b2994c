from __future__ import annotations

import json
import re
import signal
import socket
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

from evals.llm_server import ReplayServer
from evals.replay_script import validate_script
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
    api: openai.OpenAI,
    messages: list[dict[str, Any]],
    model: str = "m1",
    include_usage: bool = True,
    **extra: Any,
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
        **extra,
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


# ---------------------------------------------------------------------------
# dialects: the wire as each server family writes it
# ---------------------------------------------------------------------------

WIRE = json.loads((ROOT / "tests" / "data" / "llamacpp_wire.json").read_text())
TOOLS = WIRE["tools"]
NAMED = {"type": "function", "function": {"name": "instance_stop"}}
STOP_CALL = {"name": "instance_stop", "arguments": {"instance_id": 7}}
REPORT_ARGUMENTS = {"success": True, "note": "stopped instance 7"}
TWO_CALLS: dict[str, Any] = {
    "content": "Stopping.",
    "tool_calls": [
        {"name": "instance_stop", "arguments": {"instance_id": 7}},
        {"name": "report_result", "arguments": REPORT_ARGUMENTS},
    ],
    "usage": {"prompt_tokens": 241, "completion_tokens": 16},
}


class Wire:
    """One HTTP exchange as bytes: status, headers, the de-chunked body, and how it ended."""

    def __init__(self, raw: bytes) -> None:
        head, _, rest = raw.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        self.status = int(lines[0].split()[1])
        self.headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        self.complete = True
        if self.headers.get("transfer-encoding") == "chunked":
            body, self.complete = b"", False
            while rest:
                size_line, _, rest = rest.partition(b"\r\n")
                size = int(size_line, 16)
                if size == 0:
                    self.complete = True
                    break
                body, rest = body + rest[:size], rest[size + 2 :]
            self.body = body.decode()
        else:
            self.body = rest.decode()

    @property
    def events(self) -> list[str]:
        """The `data:` payloads, in order; each event must be exactly `data: X` and a blank line."""
        *events, end = self.body.split("\n\n")
        assert end == "" and all(e.startswith("data: ") and "\n" not in e for e in events), self.body
        return [event.removeprefix("data: ") for event in events]

    @property
    def chunks(self) -> list[dict[str, Any]]:
        events = self.events
        assert events[-1] == "[DONE]"
        return [json.loads(e) for e in events[:-1]]


def post(server: ReplayServer, body: dict[str, Any]) -> Wire:
    """POST a chat request on a fresh connection and read every byte until the server closes it."""
    data = json.dumps(body).encode()
    with socket.create_connection((server.host, server.port), timeout=10) as connection:
        connection.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: replay\r\nContent-Type: application/json\r\n"
            b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(data), data)
        )
        raw = b""
        while piece := connection.recv(65536):
            raw += piece
    return Wire(raw)


def request(
    messages: list[dict[str, Any]] | None = None, stream: bool = True, **extra: Any
) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "m1", "messages": messages or [SYSTEM, USER], "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    return {**body, **extra}


def dialect_server(dialect: str, *turns: dict[str, Any]) -> ReplayServer:
    return ReplayServer(
        {"conversations": [{"dialect": dialect, "turns": [*turns[:-1], {"repeat": turns[-1]}]}]}
    )


_VALUES = {
    "id",
    "created",
    "name",
    "arguments",
    "content",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
}


def skeleton(value: Any) -> Any:
    """A chunk's shape, keys in order: ids, times, text and counts become placeholders."""
    if isinstance(value, dict):
        return {k: (f"<{k}>" if k in _VALUES and v is not None else skeleton(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [skeleton(v) for v in value]
    return value


def real(name: str) -> Wire:
    exchange = WIRE["exchanges"][name]
    wire = Wire(b"HTTP/1.1 %d X\r\n\r\n" % exchange["status"])
    wire.body, wire.complete = exchange["body"], exchange.get("chunked_end", True)
    return wire


def test_openai_dialect_wire(server: ReplayServer) -> None:
    server.set_script({"conversations": [{"turns": [TWO_CALLS]}]})
    wire = post(server, request())
    assert wire.status == 200 and wire.complete
    assert wire.headers["content-type"] == "text/event-stream; charset=utf-8"
    chunks = wire.chunks
    deltas = [c["choices"][0]["delta"] for c in chunks[:-1]]
    assert deltas[0] == {"role": "assistant", "content": ""}
    heads = [d["tool_calls"][0] for d in deltas if "tool_calls" in d and "id" in d["tool_calls"][0]]
    assert heads == [
        {
            "index": 0,
            "id": "call_0_0",
            "type": "function",
            "function": {"name": "instance_stop", "arguments": ""},
        },
        {
            "index": 1,
            "id": "call_0_1",
            "type": "function",
            "function": {"name": "report_result", "arguments": ""},
        },
    ]
    pieces = [d["tool_calls"][0] for d in deltas if "tool_calls" in d and "id" not in d["tool_calls"][0]]
    assert all(set(p) == {"index", "function"} and set(p["function"]) == {"arguments"} for p in pieces)
    assert all("usage" in c and c["usage"] is None for c in chunks[:-1])
    assert chunks[-2]["choices"][0] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": "tool_calls",
    }
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] == 257


# --- llamacpp: checked against tests/data/llamacpp_wire.json, captured from the real server ---


@pytest.mark.parametrize(
    "name",
    [
        *("null_content", "tool_no_id", "bad_role", "nokey_plain", "required_plain", "named_missing"),
        *("not_a_message", "messages_not_a_list", "user_content_number", "system_no_content"),
    ],
)
def test_llamacpp_refuses_what_the_real_server_refuses_byte_for_byte(name: str) -> None:
    exchange = WIRE["exchanges"][name]
    with dialect_server("llamacpp", {"content": "never served"}) as server:
        wire = post(server, exchange["request"])
        assert (wire.status, wire.body) == (exchange["status"], exchange["body"])
        assert server.requests == [exchange["request"]]  # recorded as received


@pytest.mark.parametrize("name", ["nokey_stream", "required_stream", "auto_stream"])
def test_llamacpp_a_stream_it_cannot_answer_is_an_empty_200(name: str) -> None:
    exchange = WIRE["exchanges"][name]
    assert exchange["body"] == ""  # what the real server sent
    with dialect_server("llamacpp", {"tool_calls": [STOP_CALL]}) as server:
        wire = post(server, exchange["request"])
        assert (wire.status, wire.body, wire.complete) == (200, "", True)
        assert wire.headers["content-type"] == "text/event-stream; charset=utf-8"
        body = exchange["request"]
        reply = stream(
            client(server), body["messages"], **{k: body[k] for k in ("tools", "tool_choice") if k in body}
        )
        assert reply == {"content": "", "calls": [], "finish": None, "usage": None}  # the client sees nothing


def test_llamacpp_a_refused_request_does_not_use_up_a_turn() -> None:
    script = {
        "turns": [{"fault": "http_500", "times": 1, "then": {"content": "second"}}],
        "dialect": "llamacpp",
    }
    with ReplayServer({"conversations": [script]}) as server:
        bad: list[dict[str, Any]] = [SYSTEM, USER, {"role": "assistant", "content": None}]
        assert post(server, request(bad)).status == 500  # refused: the scripted 500 is still to come
        with pytest.raises(openai.InternalServerError, match="scripted server error"):
            complete(client(server), [SYSTEM, USER])
        assert complete(client(server), [SYSTEM, USER]).choices[0].message.content == "second"


def test_llamacpp_streams_a_forced_function_like_the_real_server() -> None:
    with dialect_server("llamacpp", {"tool_calls": [STOP_CALL]}) as server:
        wire = post(server, request(tools=TOOLS, tool_choice=NAMED))
    ours, theirs = wire.events, real("named_stream").events
    assert wire.complete and ours[-1] == theirs[-1] == "[DONE]"
    for event in ours[:-1] + theirs[:-1]:  # json.dumps with its spaces, keys in the server's order
        assert event == json.dumps(json.loads(event))
    shapes = [skeleton(json.loads(e)) for e in ours[:-1]]
    real_shapes = [skeleton(json.loads(e)) for e in theirs[:-1]]
    assert shapes[0] == real_shapes[0]  # the role chunk, with its four keys
    assert shapes[-1] == real_shapes[-1]  # the end: finish_reason "tool_calls", all else null
    assert {json.dumps(s) for s in shapes[1:-1]} == {json.dumps(s) for s in real_shapes[1:-1]}
    middle = [json.loads(e)["choices"][0]["delta"] for e in ours[1:-2]]
    assert all(d["tool_calls"][0]["function"]["name"] == "instance_stop" for d in middle)  # in every delta
    assert len({d["tool_calls"][0]["id"] for d in middle}) == 1
    assert middle[0]["tool_calls"][0]["function"]["arguments"] != ""  # the first piece comes with the name
    assert middle[-1]["tool_calls"][0]["function"]["arguments"] == ""  # as the real stream's last delta
    assert json.loads("".join(d["tool_calls"][0]["function"]["arguments"] for d in middle)) == {
        "instance_id": 7
    }
    call_id = middle[0]["tool_calls"][0]["id"]
    assert call_id == "call__0_instance_stop_" + json.loads(ours[0])["id"].removeprefix("chat")


def test_llamacpp_text_stream_and_answers_like_the_real_server() -> None:
    with dialect_server("llamacpp", {"content": "Instance 7 is stopped."}) as server:
        wire = post(server, request())
        plain = post(server, request(stream=False))
    ours, theirs = wire.events, real("plain_stream").events
    for event in ours[:-1]:
        assert event == json.dumps(json.loads(event))
    shapes = [json.dumps(skeleton(json.loads(e))) for e in ours[:-1]]
    real_shapes = [json.dumps(skeleton(json.loads(e))) for e in theirs[:-1]]
    assert shapes[0] == real_shapes[0] and shapes[1] == real_shapes[1]
    assert shapes[-1] == real_shapes[-1].replace('"length"', '"stop"')
    assert not any('"usage"' in e for e in ours)  # no usage chunk, although include_usage was asked
    body = json.loads(plain.body)
    assert plain.body == json.dumps(body, separators=(",", ":"))
    assert json.dumps(skeleton(body)) == json.dumps(
        skeleton(json.loads(real("plain_nonstream").body))
    ).replace('"length"', '"stop"')
    assert list(body["usage"]) == ["prompt_tokens", "completion_tokens", "total_tokens"]


@pytest.mark.parametrize(("choice", "real_name"), [(NAMED, "named_plain"), ("auto", "auto_plain")])
def test_llamacpp_non_streamed_tool_call_like_the_real_server(choice: Any, real_name: str) -> None:
    with dialect_server("llamacpp", {"content": "dropped", **{"tool_calls": [STOP_CALL]}}) as server:
        wire = post(server, request(stream=False, tools=TOOLS, tool_choice=choice))
        completion = complete(client(server), [SYSTEM, USER])  # no tool_choice: the call is text
    theirs = json.loads(real(real_name).body)
    ours = json.loads(wire.body)
    assert json.dumps(skeleton(ours)) == json.dumps(skeleton(theirs))
    message = ours["choices"][0]["message"]
    assert message["content"] is None and ours["choices"][0]["finish_reason"] == "tool_calls"
    assert message["function_call"]["name"] == ("instance_stop" if choice == NAMED else "instance_stop:")
    assert theirs["choices"][0]["message"]["function_call"]["name"].endswith("" if choice == NAMED else ":")
    assert completion.choices[0].message.tool_calls is None
    assert completion.choices[0].message.content == 'dropped\nfunctions.instance_stop:\n{"instance_id": 7}'
    assert completion.choices[0].finish_reason == "stop"


def test_llamacpp_the_client_must_assemble_tool_calls_by_index(server: ReplayServer) -> None:
    server.set_script({"conversations": [{"dialect": "llamacpp", "turns": [{"tool_calls": [STOP_CALL]}]}]})
    api = client(server)
    response = api.chat.completions.create(
        model="m1",
        messages=cast(Any, [SYSTEM, USER]),
        tools=cast(Any, TOOLS),
        tool_choice=cast(Any, NAMED),
        stream=True,
        stream_options={"include_usage": True},
    )
    names, ids, usage = [], set(), None
    with response:
        for chunk in response:
            usage = chunk.usage or usage
            for choice in chunk.choices:
                for piece in choice.delta.tool_calls or []:
                    names.append(piece.function.name if piece.function else None)
                    ids.add(piece.id)
    assert len(names) == 4 and set(names) == {"instance_stop"}  # concatenating them is fault 4 of issue 13
    assert len(ids) == 1 and usage is None
    assert server.requests[0]["tool_choice"] == NAMED and server.requests[0]["stream"] is True


def test_llamacpp_a_cut_function_still_ends_with_tool_calls() -> None:
    cut = {"fault": "length", "tool_calls": [STOP_CALL], "keep": 9}
    with dialect_server("llamacpp", cut) as server:
        wire = post(server, request(tools=TOOLS, tool_choice=NAMED, max_tokens=3))
        plain = post(server, request(stream=False, tools=TOOLS, tool_choice=NAMED, max_tokens=3))
    chunks = wire.chunks
    arguments = "".join(
        c["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"] for c in chunks[1:-1]
    )
    assert arguments == '{"instanc' and chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    real_chunks = real("named_stream_short").chunks
    assert real_chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"  # what the real one did
    body = json.loads(plain.body)
    assert body["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"] == '{"instanc'
    assert body["choices"][0]["finish_reason"] == "tool_calls" and body["usage"]["completion_tokens"] == 3
    assert (
        json.loads(real("named_plain_short").body)["choices"][0]["message"]["tool_calls"][0]["function"][
            "arguments"
        ]
        == '{"instanc'
    )


def test_llamacpp_interrupted_stream_like_the_real_server() -> None:
    with dialect_server(
        "llamacpp", {"fault": "interrupted", "content": "Once upon a time", "after_chunks": 2}
    ) as server:
        wire = post(server, request())
        reply = stream(client(server), [SYSTEM, USER])
        plain = complete(client(server), [SYSTEM, USER])
    theirs = real("interrupted")
    assert not wire.complete and not theirs.complete  # no last chunk: the connection just closes
    assert wire.events[-1] == theirs.events[-1] == "[DONE]"
    assert all(c["choices"][0]["finish_reason"] is None for c in wire.chunks + theirs.chunks)
    assert len(wire.events) == 3  # after_chunks events, then [DONE]
    assert (reply["content"], reply["finish"]) == ("Once u", None)  # the client takes it without a word
    assert plain.choices[0].message.content == "Once upon a time"  # not streamed: not interrupted


def test_llamacpp_context_overflow() -> None:
    overflow = {"fault": "context_overflow", "as": "empty_stream"}
    with dialect_server("llamacpp", overflow) as server:
        streamed = post(server, request(max_tokens=8))
        plain = post(server, request(stream=False, max_tokens=8))
    assert (streamed.status, streamed.body) == (200, "") and real("over_stream").body == ""
    theirs = json.loads(real("over_plain").body)["error"]
    ours = json.loads(plain.body)["error"]
    assert plain.status == 400 and {**ours, "message": ""} == {**theirs, "message": ""}
    pattern = r"This model's maximum context length is 8192 tokens\. However, you requested (\d+) tokens \((\d+) in the messages, 8 in the completion\)\. Please reduce the length of the messages or completion\."
    for message in (ours["message"], theirs["message"]):
        total, prompt = re.fullmatch(pattern, message).groups()  # type: ignore[union-attr]
        assert int(total) == int(prompt) + 8


# --- vllm, sglang, whole ---


def test_vllm_dialect_wire() -> None:
    with dialect_server("vllm", TWO_CALLS) as server:
        wire = post(server, request(tools=TOOLS, tool_choice="auto"))
        reply = stream(client(server), [SYSTEM, USER])
    chunks = wire.chunks
    assert all(set(c) == {"id", "object", "created", "model", "choices"} for c in chunks[:-1])
    assert chunks[0]["id"].startswith("chatcmpl-") and all(c["id"] == chunks[0]["id"] for c in chunks)
    deltas = [c["choices"][0]["delta"] for c in chunks[:-1]]
    assert deltas[0] == {"role": "assistant", "content": ""}
    for index, name in enumerate(["instance_stop", "report_result"]):
        first = next(d for d in deltas if d.get("tool_calls", [{}])[0].get("index") == index)
        head, arguments = first["tool_calls"]  # the name and the first arguments, in one chunk
        assert re.fullmatch(r"chatcmpl-tool-[0-9a-f]{32}", head["id"])
        assert head == {"index": index, "type": "function", "id": head["id"], "function": {"name": name}}
        assert arguments["index"] == index and set(arguments["function"]) == {"arguments"}
    later = [e for d in deltas if "tool_calls" in d for e in d["tool_calls"] if "id" not in e]
    assert all(set(e) == {"index", "function"} for e in later)
    end = chunks[-2]["choices"][0]
    assert end["finish_reason"] == "tool_calls" and end["stop_reason"] is None
    assert set(end["delta"]["tool_calls"][0]) == {"index", "function"}  # the last arguments ride here
    assert chunks[-1]["choices"] == [] and list(chunks[-1]["usage"]) == [
        "prompt_tokens",
        "total_tokens",
        "completion_tokens",
    ]
    first, second = reply["calls"]
    assert (first["name"], json.loads(first["arguments"])) == ("instance_stop", {"instance_id": 7})
    assert json.loads(second["arguments"]) == {"success": True, "note": "stopped instance 7"}
    assert reply["finish"] == "tool_calls" and reply["usage"].total_tokens == 257


def test_vllm_a_forced_function() -> None:
    with dialect_server("vllm", {"tool_calls": [STOP_CALL]}) as server:
        wire = post(server, request(tools=TOOLS, tool_choice=NAMED))
        plain = post(server, request(stream=False, tools=TOOLS, tool_choice=NAMED))
    first = wire.chunks[1]["choices"][0]["delta"]["tool_calls"]
    assert len(first) == 1 and list(first[0]) == ["id", "function", "index"]  # no type
    assert first[0]["function"]["name"] == "instance_stop" and first[0]["function"]["arguments"]
    assert wire.chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert json.loads(plain.body)["choices"][0]["finish_reason"] == "stop"


def test_sglang_dialect_wire() -> None:
    with dialect_server("sglang", TWO_CALLS) as server:
        wire = post(server, request(tools=TOOLS))
        reply = stream(client(server), [SYSTEM, USER])
    chunks = wire.chunks
    assert all(c["usage"] is None for c in chunks[:-2]) and chunks[-1]["choices"] == []
    deltas = [c["choices"][0]["delta"] for c in chunks[:-1]]
    assert all(list(d) == ["role", "content", "reasoning_content", "tool_calls"] for d in deltas)
    calls = [d["tool_calls"][0] for d in deltas if d["tool_calls"]]
    heads = [c for c in calls if c["id"] is not None]
    assert [h["function"] for h in heads] == [
        {"name": "instance_stop", "arguments": ""},
        {"name": "report_result", "arguments": ""},
    ]
    assert all(re.fullmatch(r"call_[0-9a-f]{24}", h["id"]) for h in heads)
    later = [c for c in calls if c["id"] is None]
    assert later and all(c["type"] == "function" and c["function"]["name"] is None for c in later)
    end = chunks[-2]["choices"][0]
    assert end["finish_reason"] == "tool_calls" and end["matched_stop"] is None
    assert end["delta"] == {"role": None, "content": None, "reasoning_content": None, "tool_calls": None}
    assert [c["name"] for c in reply["calls"]] == ["instance_stop", "report_result"]
    assert json.loads(reply["calls"][1]["arguments"])["note"] == "stopped instance 7"


def test_whole_dialect_wire() -> None:
    with dialect_server("whole", TWO_CALLS) as server:
        wire = post(server, request(tools=TOOLS))
        plain = post(server, request(stream=False, tools=TOOLS))
        reply = stream(client(server), [SYSTEM, USER])
    chunks = wire.chunks
    assert all(c["system_fingerprint"] == "fp_ollama" for c in chunks)
    choices = [c["choices"][0] for c in chunks[:-1]]
    assert all(
        list(c) == ["index", "delta", "finish_reason"] and c["delta"]["role"] == "assistant" for c in choices
    )
    (together,) = [c["delta"]["tool_calls"] for c in choices if "tool_calls" in c["delta"]]
    assert [(c["index"], c["type"], c["function"]["name"]) for c in together] == [
        (0, "function", "instance_stop"),
        (1, "function", "report_result"),
    ]
    assert json.loads(together[0]["function"]["arguments"]) == {"instance_id": 7}  # whole, in one delta
    assert all(re.fullmatch(r"call_[a-z0-9]{8}", c["id"]) for c in together)
    assert choices[-1] == {
        "index": 0,
        "delta": {"role": "assistant", "content": ""},
        "finish_reason": "tool_calls",
    }
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] == 257
    message = json.loads(plain.body)["choices"][0]["message"]
    assert message["content"] == "Stopping." and [c["index"] for c in message["tool_calls"]] == [0, 1]
    assert reply["content"] == "Stopping." and [c["pieces"] for c in reply["calls"]] == [1, 1]


@pytest.mark.parametrize("dialect", ["openai", "llamacpp", "vllm", "sglang", "whole"])
def test_every_dialect_reassembles_with_the_openai_client(dialect: str) -> None:
    forced = {"tools": TOOLS, "tool_choice": NAMED} if dialect == "llamacpp" else {}
    with dialect_server(
        dialect, {"tool_calls": [STOP_CALL]}, {"content": "Done, instance 7 is stopped."}
    ) as server:
        first = stream(client(server), [SYSTEM, USER], **forced)
        said = {**assistant(("c", "instance_stop")), "content": ""}  # llama.cpp refuses null content
        last = stream(client(server), [SYSTEM, USER, said], **forced)
        plain = complete(client(server), [SYSTEM, USER, said, said])
    (call,) = first["calls"]
    assert call["id"] and json.loads(call["arguments"]) == {"instance_id": 7}
    assert call["name"] == "instance_stop" * (4 if dialect == "llamacpp" else 1)  # naive += shows the repeats
    assert first["finish"] == ("stop" if dialect == "vllm" and forced else "tool_calls")
    assert (last["content"], last["finish"]) == ("Done, instance 7 is stopped.", "stop")
    assert plain.choices[0].message.content == "Done, instance 7 is stopped."
    assert (first["usage"] is None) == (dialect == "llamacpp")


# --- the faults of issue 13 ---


@pytest.mark.parametrize("dialect", ["openai", "vllm", "sglang", "whole"])
def test_interrupted_ends_with_done_and_no_finish_reason(dialect: str) -> None:
    turn = {"fault": "interrupted", "content": "Stopping instance 7 now.", "tool_calls": [STOP_CALL]}
    with dialect_server(dialect, {**turn, "after_chunks": 3}, turn) as server:
        wire = post(server, request())
        reply = stream(client(server), [SYSTEM, USER, {**assistant(("a", "b")), "content": ""}])
        plain = complete(client(server), [SYSTEM, USER])
    assert not wire.complete  # the connection closed after [DONE], without the last chunk
    assert len(wire.events) == 4 and wire.events[-1] == "[DONE]"
    assert all(c["choices"][0]["finish_reason"] is None for c in wire.chunks)
    with dialect_server(dialect, {k: v for k, v in turn.items() if k != "fault"}) as server:
        whole = post(server, request())
    assert [skeleton(c) for c in wire.chunks] == [
        skeleton(c) for c in whole.chunks[:3]
    ]  # its start, then cut
    assert reply["finish"] is None and len(reply["content"]) < len(turn["content"])  # the default: 2 events
    assert plain.choices[0].finish_reason == "tool_calls"  # not streamed: answered whole


def test_empty_200() -> None:
    with dialect_server("openai", {"fault": "empty_200"}) as server:
        streamed, plain = post(server, request()), post(server, request(stream=False))
        reply = stream(client(server), [SYSTEM, USER])
        with pytest.raises(ValueError):  # the openai client cannot parse an empty JSON body
            complete(client(server), [SYSTEM, USER])
    assert (streamed.status, streamed.body, streamed.complete) == (200, "", True)
    assert streamed.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert (plain.status, plain.body, plain.headers["content-length"]) == (200, "", "0")
    assert reply == {
        "content": "",
        "calls": [],
        "finish": None,
        "usage": None,
    }  # no error: the caller must see it


def test_context_overflow_as_an_empty_stream() -> None:
    with dialect_server("openai", {"fault": "context_overflow", "as": "empty_stream"}) as server:
        streamed, plain = post(server, request()), post(server, request(stream=False))
        with pytest.raises(openai.BadRequestError) as raised:
            complete(client(server), [SYSTEM, USER])
    assert (streamed.status, streamed.body) == (200, "")
    assert plain.status == 400 and json.loads(plain.body)["error"]["code"] == "context_length_exceeded"
    assert raised.value.code == "context_length_exceeded"


def test_length_cuts_the_last_tool_call() -> None:
    cut = {"fault": "length", **TWO_CALLS, "usage": {"prompt_tokens": 241}}
    with dialect_server("openai", cut) as server:
        reply = stream(client(server), [SYSTEM, USER], max_tokens=40)
        plain = complete(client(server), [SYSTEM, USER])
    first, second = reply["calls"]
    assert json.loads(first["arguments"]) == {"instance_id": 7}  # the earlier call is whole
    full = json.dumps(REPORT_ARGUMENTS)
    assert second["arguments"] == full[: len(full) // 2]  # cut mid-way: not JSON
    with pytest.raises(ValueError):
        json.loads(second["arguments"])
    assert reply["finish"] == "length" and reply["content"] == "Stopping."
    assert (reply["usage"].prompt_tokens, reply["usage"].completion_tokens) == (241, 40)  # all it was allowed
    assert plain.choices[0].finish_reason == "length" and plain.usage is not None
    assert plain.usage.completion_tokens > 0


def test_length_cuts_the_content() -> None:
    with dialect_server(
        "vllm", {"fault": "length", "content": "Instance 7 is being stopped", "keep": 11}
    ) as server:
        reply = stream(client(server), [SYSTEM, USER])
    assert (reply["content"], reply["finish"], reply["calls"]) == ("Instance 7 ", "length", [])


def test_a_break_sends_the_dialects_events() -> None:
    with dialect_server("llamacpp", {"fault": "disconnect", "after_chunks": 1}) as server:
        wire = post(server, request())
    assert not wire.complete
    (event,) = wire.events
    assert list(json.loads(event)) == [
        "id",
        "model",
        "created",
        "object",
        "choices",
    ]  # llama.cpp's role chunk


@pytest.mark.parametrize(
    ("script", "complaint"),
    [
        ({"conversations": [{"dialect": "ollama", "turns": [{}]}]}, "dialect must be one of"),
        ({"conversations": [{"turns": [{"dialect": "tgi"}]}]}, "dialect must be one of"),
        (
            {"conversations": [{"turns": [{"fault": "http_500", "as": "empty_stream"}]}]},
            "for context_overflow only",
        ),
        (
            {"conversations": [{"turns": [{"fault": "context_overflow", "as": "stream"}]}]},
            "for context_overflow",
        ),
        (
            {"conversations": [{"turns": [{"fault": "empty_200", "content": "x"}]}]},
            "unknown keys ['content']",
        ),
        ({"conversations": [{"turns": [{"fault": "interrupted", "keep": 3}]}]}, "unknown keys ['keep']"),
        ({"conversations": [{"turns": [{"fault": "length", "keep": -1}]}]}, "keep must be a whole number"),
        (
            {"conversations": [{"turns": [{"fault": "interrupted", "after_chunks": 1.5}]}]},
            "after_chunks must be",
        ),
    ],
)
def test_bad_dialects_and_fault_options_are_refused(script: dict[str, Any], complaint: str) -> None:
    with pytest.raises(ValueError, match=re.escape(complaint)):
        validate_script(script)


def test_every_eval_case_still_validates() -> None:
    for path in sorted((ROOT / "evals" / "cases").glob("*.json")):
        validate_script(json.loads(path.read_text())["recorded_turns"])

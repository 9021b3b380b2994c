"""A local OpenAI-compatible chat-completions server that replays scripted assistant turns.

Tests, `make eval` and the browser end-to-end test point piDeploy's model chain
at it instead of a real provider. It speaks exactly the wire format the
`openai` client parses: `POST /v1/chat/completions`, streamed (server-sent
events, tool calls split over several deltas, a final chunk with
`finish_reason`, a usage chunk when `stream_options.include_usage` is true,
then `data: [DONE]`) or not, and `GET /v1/models`.

Run it on its own:  python -m evals.llm_server --port 8799 --script case.json
(it prints `listening on http://127.0.0.1:PORT/v1` once it accepts requests,
and stops cleanly on SIGTERM or Ctrl-C). In tests: `with ReplayServer(script) as
server: openai.OpenAI(base_url=server.url, ...)`.

Script format (JSON; recorded eval cases use the same format)
-------------------------------------------------------------
    {"conversations": [
      {"id": "create-ok",                      # unique; default "#<index>"
       "model": "minimax-m2.5-free",           # optional: only requests for this model
       "match": "\\"type\\": \\"instance_create\\"",  # optional: substring of the first user
                                               #   (or system) message
       "after_end": "repeat_last",             # optional: past the last turn, repeat it
                                               #   (default: HTTP 500 saying the script ran out)
       "description": "free text",             # optional, ignored
       "turns": [
         {"tool_calls": [{"id": "call_1", "name": "instance_create",
                          "arguments": {"name": "{{task.params.name}}"}}],
          "usage": {"prompt_tokens": 950, "completion_tokens": 30}},
         {"content": "Created.",
          "tool_calls": [{"name": "report_result", "arguments": {"success": true,
                          "data": {"instance_id": "{{last_result.instance_id}}"}}}]}
       ]}
    ]}

Selection is stateless, by conversation position, so concurrent runs and
retries work: the conversation is the first whose `model` equals the request's
and whose `match` occurs in the request's first user message or its system
message; the turn served is `turns[k]`, k = the number of assistant messages
already in the request. No matching conversation, or k past the end, answers
HTTP 500 with a body that says exactly why (type "replay_error").

A turn:
- `content` (string), `tool_calls` (list of {`id`?, `name`, `arguments`}),
  `usage` ({`prompt_tokens`, `completion_tokens`}; default: the request's JSON
  length / 4, and the turn's size / 4), `finish_reason` (default "tool_calls"
  when there are tool calls, else "stop"), `delay` (seconds before the first
  token, for timing tests).
- `arguments` is an object (sent as its JSON text) or a string (sent verbatim:
  that is how malformed JSON is scripted). Tool call ids default to
  `call_<k>_<i>`. A tool name not in the request's `tools` is just served.
- Placeholders in `content` and in object `arguments`: `{{task.X.Y}}` reads the
  first JSON object in a ```json fenced block of the first user message (the
  loop puts the task there); `{{last_result.X}}` reads the JSON content of the
  last `tool` message. A placeholder that is a whole string value keeps its
  JSON type (an int stays an int); inside a longer string it is text. A missing
  key is an HTTP 500 replay error.
- A fault instead of an answer, `{"fault": NAME, ...}`:
    http_500          500, type server_error          -> openai.InternalServerError
    http_429          429 with `Retry-After: <retry_after>` (default 1) -> openai.RateLimitError
    http_401          401, code invalid_api_key       -> openai.AuthenticationError
    http_404          404, code model_not_found       -> openai.NotFoundError
    context_overflow  400, code context_length_exceeded -> openai.BadRequestError
    stall             sends `after_chunks` SSE events (default 1; non-streaming: nothing),
                      then hangs for `seconds` (default 600) or until the server stops,
                      then drops the connection            -> a read timeout in the client
    disconnect        sends `after_chunks` SSE events (default 1; non-streaming: nothing),
                      then closes the connection mid-stream -> a transport error
    trickle           sends `after_chunks` SSE events (default 1), then a "." every
                      `interval` s (default 0.5) for `seconds` (default 600), then drops
                      the connection: no read ever times out -> only a wall-clock cut ends it
    empty             a normal answer with no content and no tool calls
  Any fault may carry `message` to replace the error text.
- `"times": N, "then": TURN`: the turn is served for the first N requests at
  this position (counted per conversation id and k, thread-safe; see
  `reset_counters`), after which the position serves `then` (itself a turn,
  which may again have times/then). Used for "fail twice, then succeed".
- `{"repeat": TURN}`, only as the last entry: served at that position and every
  position after it (the never-ending tool loop).

Control endpoints, for a server running as its own process: `PUT /replay/script`
(body: a script), `POST /replay/reset` (zero the times counters and forget the
recorded requests), `GET /replay/requests` (the request bodies received).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import logging
import re
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, cast

logger = logging.getLogger(__name__)

FAULTS = (
    *("http_500", "http_429", "http_401", "http_404", "context_overflow"),
    *("stall", "disconnect", "trickle", "empty"),
)
_CONVERSATION_KEYS = {"id", "model", "match", "turns", "after_end", "description"}
_TURN_KEYS = {"content", "tool_calls", "usage", "finish_reason", "delay", "times", "then"}
_FAULT_KEYS = {"fault", "retry_after", "after_chunks", "seconds", "interval", "message", "times", "then"}
_TOOL_CALL_KEYS = {"id", "name", "arguments"}
_PLACEHOLDER = re.compile(r"\{\{\s*(task|last_result)((?:\.[A-Za-z0-9_-]+)*)\s*\}\}")
_FENCED_JSON = re.compile(r"```json[ \t]*\n(.*?)```", re.DOTALL)


class ScriptError(Exception):
    """The request cannot be answered from the script; becomes an HTTP 500 replay error."""

    def __init__(self, message: str, code: str = "replay_error") -> None:
        super().__init__(message)
        self.message = message
        self.code = code


# ---------------------------------------------------------------------------
# The script
# ---------------------------------------------------------------------------


def validate_script(script: Any) -> None:
    """Raise ValueError naming the first thing wrong with a script (typos fail loudly)."""
    if not isinstance(script, dict) or not isinstance(script.get("conversations"), list):
        raise ValueError('a script is an object with a "conversations" list')
    seen: set[str] = set()
    for index, conversation in enumerate(script["conversations"]):
        where = f"conversations[{index}]"
        if not isinstance(conversation, dict):
            raise ValueError(f"{where} must be an object")
        unknown = set(conversation) - _CONVERSATION_KEYS
        if unknown:
            raise ValueError(f"{where}: unknown keys {sorted(unknown)} (known: {sorted(_CONVERSATION_KEYS)})")
        name = _conversation_id(conversation, index)
        if name in seen:
            raise ValueError(f"{where}: duplicate id {name!r}")
        seen.add(name)
        for key in ("model", "match"):
            if key in conversation and not isinstance(conversation[key], str):
                raise ValueError(f"{where}.{key} must be a string")
        if conversation.get("after_end", "error") not in ("error", "repeat_last"):
            raise ValueError(f'{where}.after_end must be "error" or "repeat_last"')
        turns = conversation.get("turns")
        if not isinstance(turns, list) or not turns:
            raise ValueError(f"{where}.turns must be a non-empty list")
        for k, turn in enumerate(turns):
            if isinstance(turn, dict) and "repeat" in turn:
                if k != len(turns) - 1 or set(turn) != {"repeat"}:
                    raise ValueError(f'{where}.turns[{k}]: {{"repeat": TURN}} must be alone and last')
                _validate_turn(turn["repeat"], f"{where}.turns[{k}].repeat")
            else:
                _validate_turn(turn, f"{where}.turns[{k}]")


def _validate_turn(turn: Any, where: str) -> None:
    if not isinstance(turn, dict):
        raise ValueError(f"{where} must be an object")
    if "fault" in turn:
        if turn["fault"] not in FAULTS:
            raise ValueError(f"{where}: unknown fault {turn['fault']!r} (known: {', '.join(FAULTS)})")
        known = _FAULT_KEYS
    else:
        known = _TURN_KEYS
    unknown = set(turn) - known
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)} (known: {sorted(known)})")
    if "times" in turn:
        if not isinstance(turn["times"], int) or isinstance(turn["times"], bool) or turn["times"] < 0:
            raise ValueError(f"{where}.times must be a whole number >= 0")
        if "then" not in turn:
            raise ValueError(f"{where}: times needs a then (the turn served afterwards)")
        _validate_turn(turn["then"], f"{where}.then")
    elif "then" in turn:
        raise ValueError(f"{where}: then needs times")
    if "content" in turn and turn["content"] is not None and not isinstance(turn["content"], str):
        raise ValueError(f"{where}.content must be a string")
    usage = turn.get("usage", {})
    if not isinstance(usage, dict) or not all(
        k in ("prompt_tokens", "completion_tokens") and isinstance(v, int) for k, v in usage.items()
    ):
        raise ValueError(f"{where}.usage must be {{prompt_tokens: int, completion_tokens: int}}")
    calls = turn.get("tool_calls", [])
    if not isinstance(calls, list):
        raise ValueError(f"{where}.tool_calls must be a list")
    for i, call in enumerate(calls):
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            raise ValueError(f"{where}.tool_calls[{i}] must be an object with a name")
        unknown = set(call) - _TOOL_CALL_KEYS
        if unknown:
            raise ValueError(f"{where}.tool_calls[{i}]: unknown keys {sorted(unknown)}")


def _conversation_id(conversation: dict[str, Any], index: int) -> str:
    return str(conversation.get("id") or f"#{index}")


def _text(message: dict[str, Any]) -> str:
    """A message's content as text (plain string or a list of content parts)."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return ""


def _first(messages: list[dict[str, Any]], role: str) -> str:
    return next((_text(m) for m in messages if m.get("role") == role), "")


# ---------------------------------------------------------------------------
# What to answer
# ---------------------------------------------------------------------------


@dataclass
class Answer:
    """One reply, decided before anything is written."""

    status: int = 200
    error: dict[str, Any] | None = None  # the error body when status != 200
    headers: dict[str, str] = field(default_factory=dict)
    content: str | None = None
    tool_calls: list[dict[str, str]] = field(default_factory=list)  # id, name, arguments (text)
    finish_reason: str = "stop"
    usage: dict[str, int] = field(default_factory=dict)
    model: str = ""
    break_after: int | None = None  # stall/disconnect: events sent before the break
    hang_s: float = 0.0  # stall: how long to hang before dropping the connection
    trickle_s: float = 0.0  # trickle: how long to keep sending a "." before dropping it
    trickle_every_s: float = 0.5
    delay_s: float = 0.0


def _error(status: int, message: str, kind: str, code: str | None, param: str | None = None) -> Answer:
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return Answer(status=status, error=body)


def _fault(turn: dict[str, Any], model: str, prompt_tokens: int) -> Answer:
    fault, message = turn["fault"], turn.get("message")
    if fault == "http_500":
        return _error(500, message or "scripted server error", "server_error", None)
    if fault == "http_429":
        answer = _error(
            429, message or "Rate limit reached (scripted)", "rate_limit_error", "rate_limit_exceeded"
        )
        answer.headers["Retry-After"] = str(turn.get("retry_after", 1))
        return answer
    if fault == "http_401":
        return _error(
            401,
            message or "Incorrect API key provided (scripted)",
            "invalid_request_error",
            "invalid_api_key",
        )
    if fault == "http_404":
        text = message or f"The model `{model}` does not exist or you do not have access to it."
        return _error(404, text, "invalid_request_error", "model_not_found")
    if fault == "context_overflow":
        text = message or (
            f"This model's maximum context length is 8192 tokens. However, your messages resulted in "
            f"{max(prompt_tokens, 8193)} tokens. Please reduce the length of the messages."
        )
        return _error(400, text, "invalid_request_error", "context_length_exceeded", "messages")
    if fault == "stall":
        return Answer(break_after=int(turn.get("after_chunks", 1)), hang_s=float(turn.get("seconds", 600)))
    if fault == "trickle":
        return Answer(
            break_after=int(turn.get("after_chunks", 1)),
            trickle_s=float(turn.get("seconds", 600)),
            trickle_every_s=float(turn.get("interval", 0.5)),
        )
    assert fault == "disconnect", fault  # "empty" is an ordinary answer with nothing in it
    return Answer(break_after=int(turn.get("after_chunks", 1)))


class _Placeholders:
    """Fills {{task.X}} and {{last_result.X}} from the request's messages."""

    def __init__(self, messages: list[dict[str, Any]]) -> None:
        self.messages = messages

    def source(self, root: str) -> Any:
        if root == "task":
            user = _first(self.messages, "user")
            for block in _FENCED_JSON.findall(user):
                with contextlib.suppress(ValueError):
                    value = json.loads(block)
                    if isinstance(value, dict):
                        return value
            raise ScriptError("{{task...}}: the first user message has no ```json block with an object")
        tools = [m for m in self.messages if m.get("role") == "tool"]
        if not tools:
            raise ScriptError("{{last_result...}}: the request has no tool message yet")
        try:
            return json.loads(_text(tools[-1]))
        except ValueError:
            raise ScriptError(
                f"{{{{last_result...}}}}: the last tool message is not JSON: {_text(tools[-1])[:200]!r}"
            ) from None

    def lookup(self, match: re.Match[str]) -> Any:
        root, path = match.group(1), match.group(2)
        value = self.source(root)
        walked = root
        for key in path.split(".")[1:]:
            if isinstance(value, dict) and key in value:
                value = value[key]
            elif isinstance(value, list) and key.isdigit() and int(key) < len(value):
                value = value[int(key)]
            else:
                raise ScriptError(
                    f"placeholder {match.group(0)}: {walked} has no {key!r}", "replay_placeholder"
                )
            walked += "." + key
        return value

    def fill(self, value: Any) -> Any:
        if isinstance(value, str):
            whole = _PLACEHOLDER.fullmatch(value)
            if whole:
                return self.lookup(whole)
            return _PLACEHOLDER.sub(lambda m: _as_text(self.lookup(m)), value)
        if isinstance(value, dict):
            return {k: self.fill(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.fill(v) for v in value]
        return value


def _as_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


# ---------------------------------------------------------------------------
# The server
# ---------------------------------------------------------------------------


class ReplayServer:
    """The replay server on a loopback port, in background threads."""

    def __init__(self, script: dict[str, Any] | None = None, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host, self.port = host, port
        self.requests: list[dict[str, Any]] = []
        self.errors: list[str] = []  # every replay error served, for assertions and for the log
        self._script: dict[str, Any] = {"conversations": []}
        self._counters: dict[tuple[str, int], int] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._ids = itertools.count(1)
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        if script is not None:
            self.set_script(script)

    # --- lifecycle ---------------------------------------------------------

    def start(self) -> ReplayServer:
        if self._httpd is not None:
            return self
        self._stopping.clear()
        self._httpd = _HTTPServer((self.host, self.port), _Handler, self)
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, args=(0.05,), name="replay-server", daemon=True
        )  # a short poll interval: stop() waits for the loop to notice
        self._thread.start()
        return self

    def stop(self) -> None:
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        self._stopping.set()  # wakes stalled and delayed answers
        httpd.shutdown()
        httpd.drop_connections()  # wakes handlers waiting on idle keep-alive connections
        httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> ReplayServer:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    # --- the script ----------------------------------------------------------

    def set_script(self, script: dict[str, Any]) -> None:
        validate_script(script)
        with self._lock:
            self._script = script
            self._counters.clear()

    def reset_counters(self, *, forget_requests: bool = False) -> None:
        """Zero the `times` counters (and, if asked, forget the recorded requests and errors)."""
        with self._lock:
            self._counters.clear()
            if forget_requests:
                self.requests.clear()
                self.errors.clear()

    def recorded(self) -> tuple[list[dict[str, Any]], list[str]]:
        """Copies of the request bodies received and the replay errors served."""
        with self._lock:
            return list(self.requests), list(self.errors)

    def models(self) -> list[str]:
        with self._lock:
            conversations = self._script["conversations"]
        return sorted({c["model"] for c in conversations if c.get("model")})

    def answer(self, request: dict[str, Any], size: int) -> Answer:
        """What to send for one chat-completions request body (`size`: its length in bytes)."""
        with self._lock:
            self.requests.append(request)
            conversations = list(self._script["conversations"])
        messages = [m for m in request.get("messages") or [] if isinstance(m, dict)]
        model = str(request.get("model", ""))
        prompt_tokens = max(1, size // 4)
        try:
            index, conversation = self._select(conversations, model, messages)
            k = sum(1 for m in messages if m.get("role") == "assistant")
            turn = self._turn(_conversation_id(conversation, index), conversation, k)
            if "fault" in turn and turn["fault"] != "empty":
                return _fault(turn, model, prompt_tokens)
            return self._reply(turn, k, model, messages, prompt_tokens)
        except ScriptError as error:
            message = f"replay: {error.message}"
            with self._lock:
                self.errors.append(message)
            logger.error("%s", message, extra={"action": "replay_error"})
            return _error(500, message, "replay_error", error.code)

    def _select(
        self, conversations: list[dict[str, Any]], model: str, messages: list[dict[str, Any]]
    ) -> tuple[int, dict[str, Any]]:
        user, system = _first(messages, "user"), _first(messages, "system")
        for index, conversation in enumerate(conversations):
            if conversation.get("model") not in (None, model):
                continue
            match = conversation.get("match")
            if match is None or match in user or match in system:
                return index, conversation
        known = "; ".join(
            f"{_conversation_id(c, i)} (model {c.get('model', '*')!r}, match {c.get('match', '*')!r})"
            for i, c in enumerate(conversations)
        )
        raise ScriptError(
            f"no conversation matches model {model!r} and the first user message {user[:300]!r} "
            f"(conversations: {known or 'none'})",
            "replay_no_match",
        )

    def _turn(self, name: str, conversation: dict[str, Any], k: int) -> dict[str, Any]:
        turns: list[dict[str, Any]] = conversation["turns"]
        if k < len(turns):
            turn = turns[k]
        elif "repeat" in turns[-1] or conversation.get("after_end") == "repeat_last":
            turn = turns[-1]
        else:
            raise ScriptError(
                f"conversation {name!r} has {len(turns)} turns, but the request already holds {k} "
                f'assistant messages (add turns, a {{"repeat": TURN}}, or "after_end": "repeat_last")',
                "replay_script_exhausted",
            )
        turn = cast(dict[str, Any], turn.get("repeat", turn))
        with self._lock:
            seen = self._counters.get((name, k), 0)
            self._counters[(name, k)] = seen + 1
        while "times" in turn and seen >= turn["times"]:
            seen -= turn["times"]
            turn = cast(dict[str, Any], turn["then"])
        return turn

    def _reply(
        self, turn: dict[str, Any], k: int, model: str, messages: list[dict[str, Any]], prompt_tokens: int
    ) -> Answer:
        fill = _Placeholders(messages).fill
        content = turn.get("content")
        calls = []
        for i, call in enumerate(turn.get("tool_calls", [])):
            arguments = call.get("arguments", {})
            text = arguments if isinstance(arguments, str) else json.dumps(fill(arguments))
            calls.append(
                {"id": str(call.get("id") or f"call_{k}_{i}"), "name": call["name"], "arguments": text}
            )
        content = fill(content) if content is not None else None
        usage = dict(turn.get("usage") or {})
        size = len(json.dumps({"content": content, "tool_calls": calls}))
        usage.setdefault("prompt_tokens", prompt_tokens)
        usage.setdefault("completion_tokens", max(1, size // 4))
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        return Answer(
            content=_as_text(content) if content is not None else None,
            tool_calls=calls,
            finish_reason=str(turn.get("finish_reason") or ("tool_calls" if calls else "stop")),
            usage=usage,
            model=model,
            delay_s=float(turn.get("delay", 0.0)),
        )

    def next_id(self) -> str:
        return f"chatcmpl-replay-{next(self._ids)}"


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], handler: type[_Handler], replay: ReplayServer) -> None:
        self.replay = replay
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        super().__init__(address, handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        error = sys.exc_info()[1]
        if isinstance(error, OSError):  # a client that went away (reset, timeout): routine here
            logger.debug("replay: connection from %s ended: %s", client_address, error)
            return
        logger.exception("replay: error while answering %s", client_address, extra={"action": "replay_crash"})

    def drop_connections(self) -> None:
        with self.connections_lock:
            connections = list(self.connections)
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)


# ---------------------------------------------------------------------------
# HTTP
# ---------------------------------------------------------------------------


def _pieces(text: str, parts: int = 3) -> list[str]:
    """Split text into up to `parts` non-empty pieces (a stream arrives in several deltas)."""
    if not text:
        return []
    size = max(1, -(-len(text) // parts))
    return [text[i : i + size] for i in range(0, len(text), size)]


def stream_events(answer: Answer, response_id: str, created: int, include_usage: bool) -> list[str]:
    """The SSE `data:` payloads of a streamed answer, `[DONE]` last."""
    base: dict[str, Any] = {
        "id": response_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": answer.model,
        "system_fingerprint": None,
    }

    def chunk(delta: dict[str, Any], finish: str | None = None) -> str:
        body = {**base, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
        if include_usage:
            body["usage"] = None
        return json.dumps(body)

    events = [chunk({"role": "assistant", "content": ""})]
    events += [chunk({"content": piece}) for piece in _pieces(answer.content or "")]
    for index, call in enumerate(answer.tool_calls):
        head = {"index": index, "id": call["id"], "type": "function"}
        events.append(chunk({"tool_calls": [{**head, "function": {"name": call["name"], "arguments": ""}}]}))
        for piece in _pieces(call["arguments"]):
            events.append(chunk({"tool_calls": [{"index": index, "function": {"arguments": piece}}]}))
    events.append(chunk({}, answer.finish_reason))
    if include_usage:
        events.append(json.dumps({**base, "choices": [], "usage": answer.usage}))
    events.append("[DONE]")
    return events


def completion_body(answer: Answer, response_id: str, created: int) -> dict[str, Any]:
    """The JSON body of a non-streamed answer."""
    message: dict[str, Any] = {"role": "assistant", "content": answer.content, "refusal": None}
    if answer.tool_calls:
        message["tool_calls"] = [
            {"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
            for c in answer.tool_calls
        ]
    return {
        "id": response_id,
        "object": "chat.completion",
        "created": created,
        "model": answer.model,
        "system_fingerprint": None,
        "choices": [
            {"index": 0, "message": message, "logprobs": None, "finish_reason": answer.finish_reason}
        ],
        "usage": answer.usage,
    }


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "pideploy-replay/1"

    @property
    def replay(self) -> ReplayServer:
        return cast(_HTTPServer, self.server).replay

    def setup(self) -> None:
        super().setup()
        with contextlib.suppress(OSError):  # each SSE event leaves at once, as from a real provider
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        server = cast(_HTTPServer, self.server)
        with server.connections_lock:
            server.connections.add(self.connection)

    def finish(self) -> None:
        server = cast(_HTTPServer, self.server)
        with server.connections_lock:
            server.connections.discard(self.connection)
        with contextlib.suppress(OSError):
            super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s " + format, self.address_string(), *args)

    # --- routes --------------------------------------------------------------

    def do_GET(self) -> None:
        path = self.path.split("?")[0].rstrip("/")
        if path.endswith("/models"):
            data = [
                {"id": m, "object": "model", "created": 0, "owned_by": "replay"} for m in self.replay.models()
            ]
            self._json(200, {"object": "list", "data": data})
        elif path == "/replay/requests":
            requests, errors = self.replay.recorded()
            self._json(200, {"requests": requests, "errors": errors})
        else:
            self._json(404, _error(404, f"no route GET {path}", "invalid_request_error", "not_found").error)

    def do_PUT(self) -> None:
        if self.path.rstrip("/") != "/replay/script":
            self._json(
                404, _error(404, f"no route PUT {self.path}", "invalid_request_error", "not_found").error
            )
            return
        body = self._body()
        try:
            self.replay.set_script(body)
        except ValueError as error:
            self._json(400, _error(400, f"bad script: {error}", "invalid_request_error", None).error)
            return
        self._json(200, {"ok": True})

    def do_POST(self) -> None:
        path = self.path.split("?")[0].rstrip("/")
        if path == "/replay/reset":
            self._body()
            self.replay.reset_counters(forget_requests=True)
            self._json(200, {"ok": True})
            return
        if not path.endswith("/chat/completions"):
            self._json(404, _error(404, f"no route POST {path}", "invalid_request_error", "not_found").error)
            return
        raw = self._raw()
        try:
            request = json.loads(raw or b"null")
        except ValueError:
            request = None
        if not isinstance(request, dict):
            self._json(400, _error(400, "the body is not a JSON object", "invalid_request_error", None).error)
            return
        answer = self.replay.answer(request, len(raw))
        if answer.status != 200:
            self._json(answer.status, answer.error or {}, answer.headers)
        elif request.get("stream"):
            include_usage = bool((request.get("stream_options") or {}).get("include_usage"))
            self._stream(answer, include_usage)
        else:
            self._complete(answer)

    # --- writing -------------------------------------------------------------

    def _raw(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _body(self) -> Any:
        try:
            return json.loads(self._raw() or b"null")
        except ValueError:
            return None

    def _json(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def _wait(self, seconds: float) -> bool:
        """Sleep unless the server stops first; True when it is stopping."""
        return seconds > 0 and self.replay._stopping.wait(seconds)

    def _break(self, answer: Answer) -> None:
        """Stall (hang, then drop) or disconnect: the connection ends without a complete answer."""
        if answer.hang_s:
            self._wait(answer.hang_s)
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def _complete(self, answer: Answer) -> None:
        if answer.break_after is not None:
            self._break(answer)
            return
        if self._wait(answer.delay_s):
            self.close_connection = True
            return
        self._json(200, completion_body(answer, self.replay.next_id(), int(time.time())))

    def _stream(self, answer: Answer, include_usage: bool) -> None:
        events = stream_events(answer, self.replay.next_id(), int(time.time()), include_usage)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            for index, event in enumerate(events):
                if index == answer.break_after:
                    if answer.trickle_s:
                        dot = stream_events(Answer(content=".", model=answer.model), "", 0, include_usage)[1]
                        self._trickle(answer, dot)
                    self._break(answer)
                    return
                if index == 1 and self._wait(answer.delay_s):
                    self.close_connection = True
                    return
                self._chunk(f"data: {event}\n\n".encode())
            if answer.break_after is not None:  # asked to break after every event was sent
                self._break(answer)
                return
            self.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client went away (its read timeout, say)

    def _trickle(self, answer: Answer, event: str) -> None:
        """A model that never stops: an event every trickle_every_s, each one resets the read timeout."""
        ends = time.monotonic() + answer.trickle_s
        while time.monotonic() < ends and not self._wait(answer.trickle_every_s):
            self._chunk(f"data: {event}\n\n".encode())

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))


# ---------------------------------------------------------------------------
# Standalone
# ---------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m evals.llm_server", description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback)")
    parser.add_argument("--port", type=int, default=0, help="port (default 0: any free port)")
    parser.add_argument("--script", type=Path, help="script JSON file (default: empty, every request fails)")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s"
    )
    script: dict[str, Any] = {"conversations": []}
    if args.script:
        try:
            script = json.loads(args.script.read_text())
            validate_script(script)
        except (OSError, ValueError) as error:
            print(f"llm_server: cannot use script {args.script}: {error}", file=sys.stderr)
            return 2
    server = ReplayServer(script, args.host, args.port)
    try:
        server.start()
    except OSError as error:
        print(f"llm_server: cannot listen on {args.host}:{args.port}: {error}", file=sys.stderr)
        return 2
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    print(f"listening on {server.url}", flush=True)
    while not stop.wait(0.5):
        pass
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

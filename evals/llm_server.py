"""A local OpenAI-compatible chat-completions server that replays scripted assistant turns.

Tests, `make eval` and the browser end-to-end test point piDeploy's model chain
at it instead of a real provider. It speaks `POST /v1/chat/completions`,
streamed (server-sent events) or not, and `GET /v1/models`, in the dialect of
each server family the model chain meets (see Dialects below): OpenAI's by
default, llama.cpp's, vLLM's, SGLang's, or whole tool calls in one chunk as
Ollama-style gateways send them, down to what each refuses and how it breaks.
Every request body received is kept in `ReplayServer.requests`, so a test can
check what the client sent (no null content, the tool_choice, the stream flag).

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
       "dialect": "openai",                    # optional: how answers go on the wire (Dialects)
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
  token, for timing tests), `dialect` (this answer's dialect, over the
  conversation's).
- `arguments` is an object (sent as its JSON text) or a string (sent verbatim:
  that is how malformed JSON is scripted). Tool call ids default to
  `call_<k>_<i>` (other dialects: their own forms, below). A tool name not in
  the request's `tools` is just served.
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
    context_overflow  400, code context_length_exceeded -> openai.BadRequestError; with
                      `"as": "empty_stream"` a streamed request gets an empty 200 instead
                      (llama.cpp), a non-streamed one still the 400
    empty_200         HTTP 200 and nothing in it: streamed, the SSE headers and not one
                      event (the chunked body just ends); not streamed, a zero-length body
    stall             sends `after_chunks` SSE events (default 1; non-streaming: nothing),
                      then hangs for `seconds` (default 600) or until the server stops,
                      then drops the connection            -> a read timeout in the client
    disconnect        sends `after_chunks` SSE events (default 1; non-streaming: nothing),
                      then closes the connection mid-stream -> a transport error
    trickle           sends `after_chunks` SSE events (default 1), then a "." every
                      `interval` s (default 0.5) for `seconds` (default 600), then drops
                      the connection: no read ever times out -> only a wall-clock cut ends it
    interrupted       an answer (a turn's keys) of which a stream sends only the first
                      `after_chunks` events (default 2), then `data: [DONE]` with no
                      finish_reason ever sent, then the connection closes without the
                      chunked body's last chunk (llama.cpp, when another request arrives
                      during a stream); not streamed: the whole answer (llama.cpp does not
                      interrupt those)
    empty             a normal answer with no content and no tool calls
    length            an answer cut by max_tokens: it takes a turn's `content`, `tool_calls`,
                      `usage`, `delay`; the last tool call's arguments (or, without tool
                      calls, the content) keep only their first `keep` characters (default
                      half), finish_reason is "length" and completion_tokens defaults to the
                      request's max_tokens
  Any fault may carry `message` to replace the error text, and `dialect`.
- `"times": N, "then": TURN`: the turn is served for the first N requests at
  this position (counted per conversation id and k, thread-safe; see
  `reset_counters`), after which the position serves `then` (itself a turn,
  which may again have times/then). Used for "fail twice, then succeed".
- `{"repeat": TURN}`, only as the last entry: served at that position and every
  position after it (the never-ending tool loop).

Dialects
--------
A conversation's `dialect` (default "openai"), or a turn's, sets how its answers
are written; faults that send events (stall, disconnect, trickle, interrupted)
send that dialect's events. In every dialect an event is `data: <json>\n\n`
and the stream ends with `data: [DONE]`.

openai     What api.openai.com sends (and what this server always sent): a role chunk
           {"role": "assistant", "content": ""}, content in pieces, then each tool
           call's first delta {index, id, type, function: {name, arguments: ""}} and
           its arguments in pieces with index only; a chunk with an empty delta and
           the finish_reason; a usage chunk (`choices: []`) when
           `stream_options.include_usage` is true (every chunk then has "usage": null).
           Tool call ids `call_<k>_<i>`, response ids `chatcmpl-replay-N`.

llamacpp   llama-cpp-python's server, 0.3.36, `--chat_format chatml-function-calling`,
           as captured from it on this machine (tests/data/llamacpp_wire.json holds the
           bytes). Chunks are `json.dumps` with spaces and no system_fingerprint;
           ids are "chatcmpl-<uuid4>". There is never a usage chunk
           (`include_usage` is ignored); non-streamed answers carry usage.
           - Text streams: key order id, model, created, object; a role chunk
             {"role": "assistant"} (no content), content pieces, then {} with the
             finish_reason ("stop" or "length").
           - Tools reach the model only when the request has tools and a tool_choice
             other than "none": without one, scripted tool calls come out as the text
             a model writes in this format ("functions.NAME:\nARGS"), finish "stop".
           - A function streams only when tool_choice names it: key order id, object,
             created, model; choice keys index, finish_reason, logprobs, delta; a role
             chunk {"role": "assistant", "content": null, "function_call": null,
             "tool_calls": null}; then EVERY delta repeats index, id, type and
             function.name, beside the legacy function_call, with the next piece of
             arguments; the first piece already comes with the name, the last delta's
             arguments are ""; the end chunk has all four null and finish_reason
             "tool_calls", also when max_tokens cut the arguments (never "length").
             The real server streams one call; the replay streams each scripted call
             the same way, with its own index.
           - Tool call ids: "call__<i>_<name>_cmpl-<uuid>" (the response's uuid).
             Non-streamed: message keys content (null), tool_calls, role, and, beside
             a single call, function_call, whose name ends with ":" when tool_choice
             was "auto"; finish_reason "tool_calls" even when cut.
           - Requests it refuses, whatever the script says (the turn is not used up):
             a message that fits none of its message types (an assistant message with
             "content": null, a tool message without tool_call_id, an unknown role):
             HTTP 500, type internal_server_error, with pydantic's "N validation
             errors:" text, byte for byte. Accepted, but failing once the answer has
             started (a 500 when not streamed, an empty 200 when streamed): an
             assistant message without a content key ("'dict object' has no attribute
             'content'": the chat template reads it; send "" instead), tool_choice
             "required" (an assert: empty message), tool_choice naming a function not
             in tools, and tool_choice "auto" when streamed and the answer is a tool
             call ("Automatic streaming tool choice is not supported").
           - A context overflow is a 400 with llama.cpp's own text when not streamed;
             streamed it is an empty 200 (script `{"fault": "context_overflow",
             "as": "empty_stream"}`). An interrupted stream: see `interrupted`.
           - Not reproduced: the `: ping - <time>` SSE comment it may send (clients
             skip comments), the tool messages its template drops, its one-model
             echo of any model name.

vllm       vLLM's OpenAI server (chunks dumped with exclude_unset): no system_fingerprint,
           no "usage" key on ordinary chunks, compact JSON, ids "chatcmpl-<hex>". Role
           chunk {"role": "assistant", "content": ""}. A tool call's first chunk holds
           two entries for the same index: {index, type, id, function: {name}} (no
           arguments key at all) and {index, function: {arguments: <first piece>}};
           later pieces {index, function: {arguments}}; the last piece rides on the
           chunk with the finish_reason (which also has "stop_reason": null). When
           tool_choice names a function: the first delta is {id, function: {name,
           arguments: <first piece>}, index} without type, and the answer ends "stop"
           (as OpenAI does for a forced function). Tool call ids
           "chatcmpl-tool-<hex>". Usage chunk when asked, `choices: []`.

sglang     SGLang's server (every field dumped): each delta has role, content,
           reasoning_content and tool_calls (null when unused), each chunk has
           "usage": null and the choice a "matched_stop": null; a tool call's first
           delta {id, index, type, function: {name, arguments: ""}}, its later deltas
           {"id": null, index, type, function: {"name": null, arguments}}; the
           finish_reason comes in a chunk of its own. Ids "call_<24 hex>". Usage chunk
           when asked, with "reasoning_tokens": 0.

whole      Ollama-style gateways: no role-only chunk, every delta says
           {"role": "assistant", ...}, no logprobs key, system_fingerprint
           "fp_ollama"; content in pieces, then ALL the turn's tool calls complete
           (index, id, type, name, full arguments) in one chunk; then
           {"role": "assistant", "content": ""} with the finish_reason; a usage chunk
           when asked. Ids "call_<8 chars>"; non-streamed content is "" not null.

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
import random
import re
import signal
import socket
import string
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, cast

logger = logging.getLogger(__name__)

DIALECTS = ("openai", "llamacpp", "vllm", "sglang", "whole")
FAULTS = (
    *("http_500", "http_429", "http_401", "http_404", "context_overflow"),
    *("stall", "disconnect", "trickle", "empty", "interrupted", "empty_200", "length"),
)
_CONVERSATION_KEYS = {"id", "model", "match", "turns", "after_end", "description", "dialect"}
_TURN_KEYS = {"content", "tool_calls", "usage", "finish_reason", "delay", "times", "then", "dialect"}
_FAULT_KEYS = {
    *("fault", "retry_after", "after_chunks", "seconds", "interval", "message", "times", "then"),
    *("dialect", "as"),
}
# `length` and `interrupted` are answers that end early: they carry what a turn carries, and
# where it ends.
_ANSWER_FAULT_KEYS = {"fault", "content", "tool_calls", "usage", "delay", "times", "then", "dialect"}
_FAULT_KEYS_OF = {
    "length": _ANSWER_FAULT_KEYS | {"keep"},
    "interrupted": _ANSWER_FAULT_KEYS | {"after_chunks"},
}
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
        if conversation.get("dialect", "openai") not in DIALECTS:
            raise ValueError(f"{where}.dialect must be one of {', '.join(DIALECTS)}")
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
        known = _FAULT_KEYS_OF.get(turn["fault"], _FAULT_KEYS)
    else:
        known = _TURN_KEYS
    unknown = set(turn) - known
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)} (known: {sorted(known)})")
    if turn.get("dialect", "openai") not in DIALECTS:
        raise ValueError(f"{where}.dialect must be one of {', '.join(DIALECTS)}")
    if turn.get("as", "error") not in ("error", "empty_stream") or (
        "as" in turn and turn["fault"] != "context_overflow"
    ):
        raise ValueError(f'{where}.as is for context_overflow only, "error" or "empty_stream"')
    for key in ("after_chunks", "keep"):
        value = turn.get(key, 0)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{where}.{key} must be a whole number >= 0")
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
    dialect: str = "openai"
    response_id: str = ""  # default: chatcmpl-replay-N
    named_tool: bool = False  # the request forced a function by name (vLLM then ends with "stop")
    empty_body: bool = False  # HTTP 200 with nothing in it: no SSE event, or a zero-length body
    interrupt_after: int | None = None  # interrupted: events sent before a bare [DONE]
    break_after: int | None = None  # stall/disconnect: events sent before the break
    hang_s: float = 0.0  # stall: how long to hang before dropping the connection
    trickle_s: float = 0.0  # trickle: how long to keep sending a "." before dropping it
    trickle_every_s: float = 0.5
    delay_s: float = 0.0


def _error(status: int, message: str, kind: str, code: str | None, param: str | None = None) -> Answer:
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return Answer(status=status, error=body)


def _fault(
    turn: dict[str, Any], model: str, prompt_tokens: int, request: dict[str, Any], dialect: str
) -> Answer:
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
    if fault == "empty_200":
        return Answer(empty_body=True)
    if fault == "context_overflow":
        if (
            request.get("stream") and turn.get("as") == "empty_stream"
        ):  # llama.cpp: the stream opens, then nothing
            return Answer(empty_body=True)
        prompt = max(prompt_tokens, 8193)
        text = message or (
            f"This model's maximum context length is 8192 tokens. However, your messages resulted in "
            f"{prompt} tokens. Please reduce the length of the messages."
        )
        if dialect == "llamacpp" and not message:
            asked = request.get("max_tokens")
            text = (
                f"This model's maximum context length is 8192 tokens. However, you requested "
                f"{prompt + (asked or 0)} tokens ({prompt} in the messages, {asked} in the completion). "
                "Please reduce the length of the messages or completion."
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
    assert fault == "disconnect", fault  # the others are answers (see ReplayServer._reply)
    return Answer(break_after=int(turn.get("after_chunks", 1)))


def _cut(
    content: str | None, calls: list[dict[str, str]], keep: int | None
) -> tuple[str | None, list[dict[str, str]]]:
    """An answer cut by max_tokens: the last tool call's arguments (or else the content) end mid-way."""

    def shorter(text: str) -> str:
        kept = len(text) // 2 if keep is None else keep
        return text[: min(kept, max(0, len(text) - 1))]

    if calls:
        return content, [*calls[:-1], {**calls[-1], "arguments": shorter(calls[-1]["arguments"])}]
    return (shorter(content) if content else content), calls


# llama-cpp-python validates each message against a union of TypedDicts (pydantic): a message that
# fits none gets every member's complaints, in this order, as one HTTP 500.
_LLAMACPP_MEMBERS = (
    ("ChatCompletionRequestSystemMessage", "system", (("content", "optional"),)),
    ("ChatCompletionRequestUserMessage", "user", (("content", "optional_parts"),)),
    ("ChatCompletionRequestAssistantMessage", "assistant", (("content", "not_required"),)),
    ("ChatCompletionRequestToolMessage", "tool", (("content", "optional"), ("tool_call_id", "str"))),
    ("ChatCompletionRequestFunctionMessage", "function", (("content", "optional"), ("name", "str"))),
)


_LLAMACPP_PARTS = (
    "list[union[ChatCompletionRequestMessageContentPartText,ChatCompletionRequestMessageContentPartImage]]"
)


def _llamacpp_message_errors(index: int, message: Any) -> list[dict[str, Any]]:
    """Pydantic's errors for one message, or [] when some member of the union accepts it."""
    found: list[dict[str, Any]] = []
    for member, role, fields in _LLAMACPP_MEMBERS:
        where: tuple[Any, ...] = ("body", "messages", index, member)
        errors: list[dict[str, Any]] = []
        if not isinstance(message, dict):
            found.append(
                {
                    "type": "dict_type",
                    "loc": where,
                    "msg": "Input should be a valid dictionary",
                    "input": message,
                }
            )
            continue
        if "role" not in message:
            errors.append(
                {"type": "missing", "loc": (*where, "role"), "msg": "Field required", "input": message}
            )
        elif message["role"] != role:
            literal = f"'{role}'"
            errors.append(
                {
                    "type": "literal_error",
                    "loc": (*where, "role"),
                    "msg": f"Input should be {literal}",
                    "input": message["role"],
                    "ctx": {"expected": literal},
                }
            )
        for key, kind in fields:
            if key not in message:
                if kind != "not_required":
                    errors.append(
                        {"type": "missing", "loc": (*where, key), "msg": "Field required", "input": message}
                    )
                continue
            value = message[key]
            if isinstance(value, str) or (value is None and kind.startswith("optional")):
                continue
            if kind == "optional_parts":  # str or a list of parts: pydantic names both branches
                if isinstance(value, list):
                    continue
                text, parts = (*where, key, "str"), (*where, key, _LLAMACPP_PARTS)
                errors.append(
                    {
                        "type": "string_type",
                        "loc": text,
                        "msg": "Input should be a valid string",
                        "input": value,
                    }
                )
                errors.append(
                    {"type": "list_type", "loc": parts, "msg": "Input should be a valid list", "input": value}
                )
                continue
            errors.append(
                {
                    "type": "string_type",
                    "loc": (*where, key),
                    "msg": "Input should be a valid string",
                    "input": value,
                }
            )
        if not errors:
            return []
        found += errors
    return found


def _llamacpp_error(message: str) -> Answer:
    body = {"error": {"message": message, "type": "internal_server_error", "param": None, "code": None}}
    return Answer(status=500, error=body, dialect="llamacpp")


def _refusal(dialect: str, request: dict[str, Any]) -> Answer | None:
    """The server's own answer to a request it does not take, whatever the script says."""
    if dialect != "llamacpp":
        return None
    messages = request.get("messages") or []
    if isinstance(messages, list):
        errors = [e for i, m in enumerate(messages) for e in _llamacpp_message_errors(i, m)]
    else:
        errors = [
            {
                "type": "list_type",
                "loc": ("body", "messages"),
                "msg": "Input should be a valid list",
                "input": messages,
            }
        ]
        messages = []
    if errors:  # FastAPI's RequestValidationError, turned into a 500 by llama-cpp-python's route handler
        text = f"{len(errors)} validation error{'s' if len(errors) != 1 else ''}:\n"
        text += "".join(f"  {error}\n" for error in errors)
        text += f"\n{_LLAMACPP_ENDPOINT}"
        return _llamacpp_error(text)
    # What fails after the request was accepted: a 500 when not streamed; when streamed, the SSE
    # response has already started, so the failure is a 200 with no event at all.
    streamed = bool(request.get("stream"))
    tools, choice = request.get("tools") or [], request.get("tool_choice")
    problem = None
    if any(isinstance(m, dict) and m.get("role") == "assistant" and "content" not in m for m in messages):
        problem = "'dict object' has no attribute 'content'"  # the chat template reads message.content
    elif tools and choice == "required":
        problem = ""  # an assert in the chat handler: the message is empty
    elif tools and isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name")
        if not any((t.get("function") or {}).get("name") == name for t in tools if isinstance(t, dict)):
            problem = f"Tool with name '{name}' not found in tools"
    if problem is None:
        return None
    return Answer(empty_body=True, dialect="llamacpp") if streamed else _llamacpp_error(problem)


_LLAMACPP_ENDPOINT = (
    '  File "/work/llmvenv/lib/python3.11/site-packages/llama_cpp/server/app.py", line 376, '
    "in create_chat_completion\n    POST /v1/chat/completions"
)


def _as_llamacpp(answer: Answer, request: dict[str, Any]) -> Answer:
    """The scripted answer as llama.cpp's chatml-function-calling format can give it."""
    tools, choice = request.get("tools") or [], request.get("tool_choice")
    if not answer.tool_calls:
        return answer
    if not tools or choice in (None, "none"):
        # Tools reach the model only with a tool_choice: without one it can only write text.
        text = "\n".join(f"functions.{c['name']}:\n{c['arguments']}" for c in answer.tool_calls)
        answer.content = f"{answer.content}\n{text}" if answer.content else text
        answer.tool_calls = []
        if answer.finish_reason == "tool_calls":
            answer.finish_reason = "stop"
        return answer
    if choice == "auto" and request.get("stream"):  # "Automatic streaming tool choice is not supported"
        return Answer(empty_body=True, dialect="llamacpp")
    answer.content = None  # a function's answer has no text, and ends "tool_calls" even when cut
    answer.finish_reason = "tool_calls"
    answer.named_tool = isinstance(choice, dict)
    return answer


def _call_id(dialect: str, k: int, i: int, name: str, response_id: str) -> str:
    """A tool call id in the form each server family makes them (a script's own id wins)."""
    if dialect == "llamacpp":  # "call_" + "_<i>_" + name + "_" + the completion's id ("cmpl-<uuid>")
        return f"call__{i}_{name}_{response_id.removeprefix('chat')}"
    if dialect == "vllm":
        return f"chatcmpl-tool-{uuid.uuid4().hex}"
    if dialect == "sglang":
        return f"call_{uuid.uuid4().hex[:24]}"
    if dialect == "whole":  # Ollama: "call_" and eight characters
        return "call_" + "".join(random.choices(string.ascii_lowercase + string.digits, k=8))
    return f"call_{k}_{i}"


def _response_id(dialect: str) -> str:
    if dialect == "llamacpp":
        return f"chatcmpl-{uuid.uuid4()}"
    if dialect == "vllm":
        return f"chatcmpl-{uuid.uuid4().hex}"
    if dialect == "sglang":
        return uuid.uuid4().hex
    if dialect == "whole":
        return f"chatcmpl-{random.randrange(1000)}"
    return ""  # openai: chatcmpl-replay-N, numbered as answers leave


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
            name = _conversation_id(conversation, index)
            k = sum(1 for m in messages if m.get("role") == "assistant")
            dialect = self._peek_dialect(conversation, k)
            refused = _refusal(dialect, request)
            if refused is not None:  # the server refuses the request itself: no turn is used up
                return refused
            turn = self._turn(name, conversation, k)
            dialect = str(turn.get("dialect", dialect))
            if "fault" in turn and turn["fault"] not in ("empty", "interrupted", "length"):
                answer = _fault(turn, model, prompt_tokens, request, dialect)
            else:
                answer = self._reply(turn, k, model, request, prompt_tokens, dialect)
            answer.model, answer.dialect = model, dialect
            if dialect == "llamacpp" and answer.status == 200 and not answer.empty_body:
                answer = _as_llamacpp(answer, request)
            return answer
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

    @staticmethod
    def _peek_dialect(conversation: dict[str, Any], k: int) -> str:
        """The dialect at position k, looked at without counting the request against `times`."""
        turns: list[dict[str, Any]] = conversation["turns"]
        turn = turns[min(k, len(turns) - 1)]
        turn = cast(dict[str, Any], turn.get("repeat", turn))
        return str(turn.get("dialect", conversation.get("dialect", "openai")))

    def _reply(
        self,
        turn: dict[str, Any],
        k: int,
        model: str,
        request: dict[str, Any],
        prompt_tokens: int,
        dialect: str,
    ) -> Answer:
        messages = [m for m in request.get("messages") or [] if isinstance(m, dict)]
        fill = _Placeholders(messages).fill
        content = turn.get("content")
        response_id = _response_id(dialect)
        calls = []
        for i, call in enumerate(turn.get("tool_calls", [])):
            arguments = call.get("arguments", {})
            text = arguments if isinstance(arguments, str) else json.dumps(fill(arguments))
            calls.append(
                {
                    "id": str(call.get("id") or _call_id(dialect, k, i, call["name"], response_id)),
                    "name": call["name"],
                    "arguments": text,
                }
            )
        content = _as_text(fill(content)) if content is not None else None
        finish = str(turn.get("finish_reason") or ("tool_calls" if calls else "stop"))
        named_tool = isinstance(request.get("tool_choice"), dict)
        if dialect == "vllm" and named_tool and finish == "tool_calls":
            finish = "stop"  # vLLM (like OpenAI) ends a forced function call with "stop"
        usage = dict(turn.get("usage") or {})
        if turn.get("fault") == "length":
            content, calls = _cut(content, calls, turn.get("keep"))
            finish = "length"
            limit = request.get("max_completion_tokens") or request.get("max_tokens")
            if isinstance(limit, int) and limit > 0:
                usage.setdefault("completion_tokens", limit)  # a cut answer used all it was allowed
        size = len(json.dumps({"content": content, "tool_calls": calls}))
        usage.setdefault("prompt_tokens", prompt_tokens)
        usage.setdefault("completion_tokens", max(1, size // 4))
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        answer = Answer(
            content=content,
            tool_calls=calls,
            finish_reason=finish,
            usage=usage,
            model=model,
            dialect=dialect,
            response_id=response_id,
            named_tool=named_tool,
            delay_s=float(turn.get("delay", 0.0)),
        )
        if turn.get("fault") == "interrupted" and request.get("stream"):
            answer.interrupt_after = int(turn.get("after_chunks", 2))
        return answer

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


def _compact(body: Any) -> str:
    return json.dumps(body, separators=(",", ":"))


def stream_events(answer: Answer, response_id: str, created: int, include_usage: bool) -> list[str]:
    """The SSE `data:` payloads of a streamed answer in its dialect, `[DONE]` last."""
    write = {
        "openai": _openai_events,
        "llamacpp": _llamacpp_events,
        "vllm": _vllm_events,
        "sglang": _sglang_events,
        "whole": _whole_events,
    }[answer.dialect]
    events = write(answer, response_id, created, include_usage)
    if answer.interrupt_after is not None:  # llama.cpp cut in by another request: no finish_reason
        events = [*events[:-1][: answer.interrupt_after], "[DONE]"]
    return events


def _openai_events(answer: Answer, response_id: str, created: int, include_usage: bool) -> list[str]:
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


def _llamacpp_events(answer: Answer, response_id: str, created: int, include_usage: bool) -> list[str]:
    # llama-cpp-python writes json.dumps(chunk) (with spaces), no system_fingerprint, and never a
    # usage chunk (stream_options is ignored).
    if not answer.tool_calls:
        base = {
            "id": response_id,
            "model": answer.model,
            "created": created,
            "object": "chat.completion.chunk",
        }

        def text(delta: dict[str, Any], finish: str | None = None) -> str:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return json.dumps({**base, "choices": [choice]})

        events = [text({"role": "assistant"})]
        events += [text({"content": piece}) for piece in _pieces(answer.content or "")]
        return [*events, text({}, answer.finish_reason), "[DONE]"]

    # A function streams as its arguments' text: every delta repeats index, id, type and name,
    # beside the legacy function_call; the last one has empty arguments (the completion's final
    # chunk), and the end says "tool_calls" even when max_tokens cut the arguments.
    base = {"id": response_id, "object": "chat.completion.chunk", "created": created, "model": answer.model}

    def chunk(delta: dict[str, Any], finish: str | None = None) -> str:
        choice = {"index": 0, "finish_reason": finish, "logprobs": None, "delta": delta}
        return json.dumps({**base, "choices": [choice]})

    nothing = {"function_call": None, "tool_calls": None}
    events = [chunk({"role": "assistant", "content": None, **nothing})]
    for index, call in enumerate(answer.tool_calls):
        for piece in [*_pieces(call["arguments"]), ""]:
            function = {"name": call["name"], "arguments": piece}
            delta = {
                "role": None,
                "content": None,
                "function_call": function,
                "tool_calls": [{"index": index, "id": call["id"], "type": "function", "function": function}],
            }
            events.append(chunk(delta))
    events.append(chunk({"role": None, "content": None, **nothing}, "tool_calls"))
    return [*events, "[DONE]"]


def _vllm_events(answer: Answer, response_id: str, created: int, include_usage: bool) -> list[str]:
    # vLLM dumps its chunks with exclude_unset: no system_fingerprint, no "usage" on ordinary
    # chunks, and a tool call's deltas hold only the keys its parser set.
    base = {"id": response_id, "object": "chat.completion.chunk", "created": created, "model": answer.model}
    deltas: list[dict[str, Any]] = [{"role": "assistant", "content": ""}]
    deltas += [{"content": piece} for piece in _pieces(answer.content or "")]
    for index, call in enumerate(answer.tool_calls):
        first, *rest = _pieces(call["arguments"]) or [""]
        if answer.named_tool:  # the forced-function path: arguments already in the first delta, no type
            entries: list[dict[str, Any]] = [
                {"id": call["id"], "function": {"name": call["name"], "arguments": first}, "index": index}
            ]
        else:  # a tool parser: the name alone (no arguments key), its first arguments in the same chunk
            head = {"index": index, "type": "function", "id": call["id"], "function": {"name": call["name"]}}
            entries = [head, {"index": index, "function": {"arguments": first}}] if first else [head]
        deltas.append({"tool_calls": entries})
        deltas += [{"tool_calls": [{"index": index, "function": {"arguments": p}}]} for p in rest]
    # The parser's last arguments ride on the chunk that carries the finish_reason.
    tail = deltas[-1].get("tool_calls") or [{"id": ""}]
    last = deltas.pop() if all("id" not in entry for entry in tail) else {}
    if not answer.tool_calls:
        last = {"content": ""}  # the end-of-text token, decoded to nothing
    events = [
        _compact({**base, "choices": [{"index": 0, "delta": d, "logprobs": None, "finish_reason": None}]})
        for d in deltas
    ]
    finish = {
        "index": 0,
        "delta": last,
        "logprobs": None,
        "finish_reason": answer.finish_reason,
        "stop_reason": None,
    }
    events.append(_compact({**base, "choices": [finish]}))
    if include_usage:
        usage = {k: answer.usage[k] for k in ("prompt_tokens", "total_tokens", "completion_tokens")}
        events.append(_compact({**base, "choices": [], "usage": usage}))
    return [*events, "[DONE]"]


def _sglang_events(answer: Answer, response_id: str, created: int, include_usage: bool) -> list[str]:
    # SGLang dumps every field: nulls everywhere, "usage": null on each chunk, and a tool call's
    # later deltas say "id": null and "name": null (with "type" repeated).
    base = {"id": response_id, "object": "chat.completion.chunk", "created": created, "model": answer.model}

    def chunk(finish: str | None = None, **delta: Any) -> str:
        full = {"role": None, "content": None, "reasoning_content": None, "tool_calls": None, **delta}
        choice = {"index": 0, "delta": full, "logprobs": None, "finish_reason": finish, "matched_stop": None}
        return _compact({**base, "choices": [choice], "usage": None})

    def call(call_id: str | None, index: int, name: str | None, arguments: str) -> dict[str, Any]:
        return {
            "id": call_id,
            "index": index,
            "type": "function",
            "function": {"name": name, "arguments": arguments},
        }

    events = [chunk(role="assistant", content="")]
    events += [chunk(content=piece) for piece in _pieces(answer.content or "")]
    for index, tool in enumerate(answer.tool_calls):
        events.append(chunk(tool_calls=[call(tool["id"], index, tool["name"], "")]))
        events += [chunk(tool_calls=[call(None, index, None, p)]) for p in _pieces(tool["arguments"])]
    events.append(chunk(answer.finish_reason))
    if include_usage:
        usage: dict[str, Any] = {
            k: answer.usage[k] for k in ("prompt_tokens", "total_tokens", "completion_tokens")
        }
        usage.update(prompt_tokens_details=None, reasoning_tokens=0)
        events.append(_compact({**base, "choices": [], "usage": usage}))
    return [*events, "[DONE]"]


def _whole_events(answer: Answer, response_id: str, created: int, include_usage: bool) -> list[str]:
    # Ollama-style: every delta says role "assistant", no role-only opening chunk, no logprobs
    # key, and all tool calls of the turn arrive complete in one chunk.
    base = {
        "id": response_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": answer.model,
        "system_fingerprint": "fp_ollama",
    }

    def chunk(delta: dict[str, Any], finish: str | None = None) -> str:
        choice = {"index": 0, "delta": {"role": "assistant", **delta}, "finish_reason": finish}
        return _compact({**base, "choices": [choice]})

    events = [chunk({"content": piece}) for piece in _pieces(answer.content or "")]
    if answer.tool_calls:
        calls = [
            {
                "id": c["id"],
                "index": i,
                "type": "function",
                "function": {"name": c["name"], "arguments": c["arguments"]},
            }
            for i, c in enumerate(answer.tool_calls)
        ]
        events.append(chunk({"content": "", "tool_calls": calls}))
    events.append(chunk({"content": ""}, answer.finish_reason))
    if include_usage:
        usage = {k: answer.usage[k] for k in ("prompt_tokens", "completion_tokens", "total_tokens")}
        events.append(_compact({**base, "choices": [], "usage": usage}))
    return [*events, "[DONE]"]


def completion_body(answer: Answer, response_id: str, created: int) -> dict[str, Any]:
    """The JSON body of a non-streamed answer, in its dialect."""
    calls: list[dict[str, Any]] = [
        {"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
        for c in answer.tool_calls
    ]
    head = {"id": response_id, "object": "chat.completion", "created": created, "model": answer.model}
    if answer.dialect == "llamacpp":
        message: dict[str, Any] = {"content": answer.content}
        if calls:
            message["tool_calls"] = calls
        message["role"] = "assistant"
        if len(calls) == 1:  # the legacy field beside a single call; "auto" leaves a ":" on its name
            name = calls[0]["function"]["name"] + ("" if answer.named_tool else ":")
            message["function_call"] = {"name": name, "arguments": calls[0]["function"]["arguments"]}
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": answer.finish_reason}
        usage = {k: answer.usage[k] for k in ("prompt_tokens", "completion_tokens", "total_tokens")}
        return {**head, "choices": [choice], "usage": usage}
    if answer.dialect == "whole":
        message = {"role": "assistant", "content": answer.content or ""}
        if calls:
            message["tool_calls"] = [{**c, "index": i} for i, c in enumerate(calls)]
        choice = {"index": 0, "message": message, "finish_reason": answer.finish_reason}
        return {**head, "system_fingerprint": "fp_ollama", "choices": [choice], "usage": answer.usage}
    message = {"role": "assistant", "content": answer.content, "refusal": None}
    if calls:
        message["tool_calls"] = calls
    choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": answer.finish_reason}
    if answer.dialect == "vllm":
        choice["stop_reason"] = None
    elif answer.dialect == "sglang":
        choice["matched_stop"] = None
    return {**head, "system_fingerprint": None, "choices": [choice], "usage": answer.usage}


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
            self._json(answer.status, answer.error or {}, answer.headers, answer.dialect)
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

    def _json(
        self, status: int, body: Any, headers: dict[str, str] | None = None, dialect: str = "openai"
    ) -> None:
        data = (json.dumps(body) if dialect == "openai" else _compact(body)).encode()
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
        if answer.empty_body:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if self._wait(answer.delay_s):
            self.close_connection = True
            return
        response_id = answer.response_id or self.replay.next_id()
        self._json(200, completion_body(answer, response_id, int(time.time())), dialect=answer.dialect)

    def _stream(self, answer: Answer, include_usage: bool) -> None:
        response_id = answer.response_id or self.replay.next_id()
        events = (
            [] if answer.empty_body else stream_events(answer, response_id, int(time.time()), include_usage)
        )
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            for index, event in enumerate(events):
                if index == answer.break_after:
                    if answer.trickle_s:
                        dot_answer = Answer(content=".", model=answer.model, dialect=answer.dialect)
                        dots = stream_events(dot_answer, response_id, 0, include_usage)
                        dot = dots[0 if answer.dialect == "whole" else 1]  # the one content delta
                        self._trickle(answer, dot)
                    self._break(answer)
                    return
                if index == 1 and self._wait(answer.delay_s):
                    self.close_connection = True
                    return
                self._chunk(f"data: {event}\n\n".encode())
            if answer.break_after is not None or answer.interrupt_after is not None:
                # A break asked for after every event; or llama.cpp's interrupt, which sends
                # [DONE] and then closes without ending the chunked body.
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

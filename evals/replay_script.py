"""The replay server's script: its format, its checks, and what each request is answered.

`evals/llm_server.py` serves HTTP; this module owns everything it decides before a
byte is written: the script format and `validate_script`, which conversation and
turn a request gets (`select_conversation`, `peek_dialect`; the `times` counters
stay in the server), the `Answer` each turn or fault becomes (`reply`,
`fault_answer`, `error_answer`), the placeholders, and what llama.cpp refuses or
changes whatever the script says (`refusal`, `as_llamacpp`). How an `Answer` goes
on the wire, dialect by dialect, is `evals/replay_wire.py`.

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
       "dialect": "openai",                    # optional: how answers go on the wire (Dialects,
                                               #   in evals/replay_wire.py)
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
  `ReplayServer.reset_counters`), after which the position serves `then` (itself a turn,
  which may again have times/then). Used for "fail twice, then succeed".
- `{"repeat": TURN}`, only as the last entry: served at that position and every
  position after it (the never-ending tool loop).
"""

from __future__ import annotations

import contextlib
import json
import random
import re
import string
import uuid
from dataclasses import dataclass, field
from typing import Any, cast

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
        name = conversation_id(conversation, index)
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


def conversation_id(conversation: dict[str, Any], index: int) -> str:
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


def error_answer(status: int, message: str, kind: str, code: str | None, param: str | None = None) -> Answer:
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return Answer(status=status, error=body)


def fault_answer(
    turn: dict[str, Any], model: str, prompt_tokens: int, request: dict[str, Any], dialect: str
) -> Answer:
    fault, message = turn["fault"], turn.get("message")
    if fault == "http_500":
        return error_answer(500, message or "scripted server error", "server_error", None)
    if fault == "http_429":
        answer = error_answer(
            429, message or "Rate limit reached (scripted)", "rate_limit_error", "rate_limit_exceeded"
        )
        answer.headers["Retry-After"] = str(turn.get("retry_after", 1))
        return answer
    if fault == "http_401":
        return error_answer(
            401,
            message or "Incorrect API key provided (scripted)",
            "invalid_request_error",
            "invalid_api_key",
        )
    if fault == "http_404":
        text = message or f"The model `{model}` does not exist or you do not have access to it."
        return error_answer(404, text, "invalid_request_error", "model_not_found")
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
        return error_answer(400, text, "invalid_request_error", "context_length_exceeded", "messages")
    if fault == "stall":
        return Answer(break_after=int(turn.get("after_chunks", 1)), hang_s=float(turn.get("seconds", 600)))
    if fault == "trickle":
        return Answer(
            break_after=int(turn.get("after_chunks", 1)),
            trickle_s=float(turn.get("seconds", 600)),
            trickle_every_s=float(turn.get("interval", 0.5)),
        )
    assert fault == "disconnect", fault  # the others are answers (see reply)
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


def refusal(dialect: str, request: dict[str, Any]) -> Answer | None:
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


def as_llamacpp(answer: Answer, request: dict[str, Any]) -> Answer:
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
# Which conversation, and a turn's answer
# ---------------------------------------------------------------------------


def select_conversation(
    conversations: list[dict[str, Any]], model: str, messages: list[dict[str, Any]]
) -> tuple[int, dict[str, Any]]:
    """The first conversation for this model whose `match` is in the first user or system message."""
    user, system = _first(messages, "user"), _first(messages, "system")
    for index, conversation in enumerate(conversations):
        if conversation.get("model") not in (None, model):
            continue
        match = conversation.get("match")
        if match is None or match in user or match in system:
            return index, conversation
    known = "; ".join(
        f"{conversation_id(c, i)} (model {c.get('model', '*')!r}, match {c.get('match', '*')!r})"
        for i, c in enumerate(conversations)
    )
    raise ScriptError(
        f"no conversation matches model {model!r} and the first user message {user[:300]!r} "
        f"(conversations: {known or 'none'})",
        "replay_no_match",
    )


def peek_dialect(conversation: dict[str, Any], k: int) -> str:
    """The dialect at position k, looked at without counting the request against `times`."""
    turns: list[dict[str, Any]] = conversation["turns"]
    turn = turns[min(k, len(turns) - 1)]
    turn = cast(dict[str, Any], turn.get("repeat", turn))
    return str(turn.get("dialect", conversation.get("dialect", "openai")))


def reply(
    turn: dict[str, Any],
    k: int,
    model: str,
    request: dict[str, Any],
    prompt_tokens: int,
    dialect: str,
) -> Answer:
    """The answer a turn (or an `empty`, `interrupted` or `length` fault) gives at position k."""
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

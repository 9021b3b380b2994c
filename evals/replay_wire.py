"""How the replay server writes an answer: SSE events and JSON bodies, dialect by dialect.

`stream_events` gives the `data:` payloads of a streamed `Answer`, `completion_body`
the JSON of a non-streamed one, each in the answer's dialect. What the answer is
(turn, fault, refusal) was decided in `evals/replay_script.py`; the HTTP around
it (headers, chunked encoding, stalls and drops) is `evals/llm_server.py`.

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
"""

from __future__ import annotations

import json
from typing import Any

from evals.replay_script import Answer


def _pieces(text: str, parts: int = 3) -> list[str]:
    """Split text into up to `parts` non-empty pieces (a stream arrives in several deltas)."""
    if not text:
        return []
    size = max(1, -(-len(text) // parts))
    return [text[i : i + size] for i in range(0, len(text), size)]


def compact(body: Any) -> str:
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
        compact({**base, "choices": [{"index": 0, "delta": d, "logprobs": None, "finish_reason": None}]})
        for d in deltas
    ]
    finish = {
        "index": 0,
        "delta": last,
        "logprobs": None,
        "finish_reason": answer.finish_reason,
        "stop_reason": None,
    }
    events.append(compact({**base, "choices": [finish]}))
    if include_usage:
        usage = {k: answer.usage[k] for k in ("prompt_tokens", "total_tokens", "completion_tokens")}
        events.append(compact({**base, "choices": [], "usage": usage}))
    return [*events, "[DONE]"]


def _sglang_events(answer: Answer, response_id: str, created: int, include_usage: bool) -> list[str]:
    # SGLang dumps every field: nulls everywhere, "usage": null on each chunk, and a tool call's
    # later deltas say "id": null and "name": null (with "type" repeated).
    base = {"id": response_id, "object": "chat.completion.chunk", "created": created, "model": answer.model}

    def chunk(finish: str | None = None, **delta: Any) -> str:
        full = {"role": None, "content": None, "reasoning_content": None, "tool_calls": None, **delta}
        choice = {"index": 0, "delta": full, "logprobs": None, "finish_reason": finish, "matched_stop": None}
        return compact({**base, "choices": [choice], "usage": None})

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
        events.append(compact({**base, "choices": [], "usage": usage}))
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
        return compact({**base, "choices": [choice]})

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
        events.append(compact({**base, "choices": [], "usage": usage}))
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

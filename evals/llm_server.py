"""A local OpenAI-compatible chat-completions server that replays scripted assistant turns.

Tests, `make eval` and the browser end-to-end test point piDeploy's model chain
at it instead of a real provider. It speaks `POST /v1/chat/completions`,
streamed (server-sent events) or not, and `GET /v1/models`, in the dialect of
each server family the model chain meets (see evals/replay_wire.py): OpenAI's by
default, llama.cpp's, vLLM's, SGLang's, or whole tool calls in one chunk as
Ollama-style gateways send them, down to what each refuses and how it breaks.
Every request body received is kept in `ReplayServer.requests`, so a test can
check what the client sent (no null content, the tool_choice, the stream flag).

Run it on its own:  python -m evals.llm_server --port 8799 --script case.json
(it prints `listening on http://127.0.0.1:PORT/v1` once it accepts requests,
and stops cleanly on SIGTERM or Ctrl-C). In tests: `with ReplayServer(script) as
server: openai.OpenAI(base_url=server.url, ...)`.

The script format, and what each request is answered, is in
`evals/replay_script.py`; how answers are written in each dialect, in
`evals/replay_wire.py`. This module is the HTTP server, its state (the recorded
requests, the `times` counters) and the command line.

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
import signal
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, cast

if not __package__:  # run as `python evals/llm_server.py`: the project root is not on sys.path yet
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from evals.replay_script import (
    Answer,
    ScriptError,
    as_llamacpp,
    conversation_id,
    error_answer,
    fault_answer,
    peek_dialect,
    refusal,
    reply,
    select_conversation,
    validate_script,
)
from evals.replay_wire import compact, completion_body, stream_events

logger = logging.getLogger(__name__)


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
            index, conversation = select_conversation(conversations, model, messages)
            name = conversation_id(conversation, index)
            k = sum(1 for m in messages if m.get("role") == "assistant")
            dialect = peek_dialect(conversation, k)
            refused = refusal(dialect, request)
            if refused is not None:  # the server refuses the request itself: no turn is used up
                return refused
            turn = self._turn(name, conversation, k)
            dialect = str(turn.get("dialect", dialect))
            if "fault" in turn and turn["fault"] not in ("empty", "interrupted", "length"):
                answer = fault_answer(turn, model, prompt_tokens, request, dialect)
            else:
                answer = reply(turn, k, model, request, prompt_tokens, dialect)
            answer.model, answer.dialect = model, dialect
            if dialect == "llamacpp" and answer.status == 200 and not answer.empty_body:
                answer = as_llamacpp(answer, request)
            return answer
        except ScriptError as error:
            message = f"replay: {error.message}"
            with self._lock:
                self.errors.append(message)
            logger.error("%s", message, extra={"action": "replay_error"})
            return error_answer(500, message, "replay_error", error.code)

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
            self._json(
                404, error_answer(404, f"no route GET {path}", "invalid_request_error", "not_found").error
            )

    def do_PUT(self) -> None:
        if self.path.rstrip("/") != "/replay/script":
            self._json(
                404,
                error_answer(404, f"no route PUT {self.path}", "invalid_request_error", "not_found").error,
            )
            return
        body = self._body()
        try:
            self.replay.set_script(body)
        except ValueError as error:
            self._json(400, error_answer(400, f"bad script: {error}", "invalid_request_error", None).error)
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
            self._json(
                404, error_answer(404, f"no route POST {path}", "invalid_request_error", "not_found").error
            )
            return
        raw = self._raw()
        try:
            request = json.loads(raw or b"null")
        except ValueError:
            request = None
        if not isinstance(request, dict):
            self._json(
                400, error_answer(400, "the body is not a JSON object", "invalid_request_error", None).error
            )
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
        data = (json.dumps(body) if dialect == "openai" else compact(body)).encode()
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

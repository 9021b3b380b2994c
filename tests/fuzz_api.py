"""A seeded fuzzer for the HTTP API: random methods, paths, headers and bodies, sent as raw bytes.

tests/test_api.py runs a few hundred cases against an in-process server on every test run.
Against a real `serve` (thousands of cases, slow clients too; its instances are real containers):

    python -m tests.fuzz_api --url http://127.0.0.1:8700 --token TOKEN --requests 3000 --slow

It prints the answers counted by status (0: the server closed without answering, -1: no answer
within the client's timeout). What the server logged is for the caller to read: no traceback
and no `http_error` line is expected, and no 5xx answer.
"""

from __future__ import annotations

import argparse
import json
import random
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

IDS = [
    "1",
    "2",
    "3",
    "0",
    "-1",
    "007",
    "99999999999999999999999",
    "\u0663",
    "1e3",
    "%31",
    "1%00",
    "abc",
    "",
    " ",
]
PATHS = [
    "/",
    "/healthz",
    "/metrics",
    "/api/instances",
    "/api/instances/{id}",
    "/api/instances/{id}/start",
    "/api/instances/{id}/stop",
    "/api/instances/{id}/update",
    "/api/instances/{id}/reboot",
    "/api/tasks",
    "/api/tasks/{id}",
    "/api/tasks/{id}/trace",
    "/api/events",
    "/api/nothing",
    "/i/1/",
    "*",
    "http://example/api/instances",
    "//api//instances//",
    "/api/instances/../tasks",
    "/api/instances/{id}/",
]
QUERIES = [
    "",
    "",
    "?limit=5",
    "?limit=0",
    "?limit=99999999999999999999",
    "?limit=%D9%A3",
    "?instance={id}",
    "?instance=-1&instance=2",
    "?%zz=%",
    "?" + "a=b&" * 2000,
    "?limit=" + "9" * 5000,
    "?instance=%0A1",
]
METHODS = ["GET"] * 6 + ["POST"] * 6 + ["DELETE"] * 2 + ["PUT", "PATCH", "HEAD", "OPTIONS", "TRACE"]
ODD_METHODS = ["CONNECT", "BREW", "get", "M" * 300, "G\x00T", "PRI"]
USERS = ["alice", "alice", "bob", "system", "", "a" * 200, "al ice", "alice\tx", "\u00e5lice", "alice,bob"]
TEXT = [
    "",
    "web",
    "web\n",
    "\u00e9\u00e8",
    "\u202e",
    "\u0000",
    "\ud800",
    "\U0001f600" * 50,
    "x" * 5000,
    "Not_Valid",
]


@dataclass(frozen=True)
class Case:
    data: bytes
    slow: bool = False  # sent a few bytes at a time, with pauses


def _scalar(r: random.Random) -> Any:
    return r.choice(
        [
            None,
            True,
            False,
            r.randint(-(2**70), 2**70),
            r.random() * 10 ** r.randint(-300, 300),
            -0.0,
            r.choice(TEXT),
            "".join(chr(r.randrange(0x20, 0x3000)) for _ in range(r.randrange(12))),
        ]
    )


def _value(r: random.Random, depth: int, limit: int) -> Any:
    roll = r.random()
    if depth >= limit or roll < 0.3:
        return _scalar(r)
    if roll < 0.65:
        return [_value(r, depth + 1, limit) for _ in range(r.randrange(1, 4))]
    return {r.choice(["name", "config", "env", "image", "A", "FOO\n", "x"]): _value(r, depth + 1, limit)}


def _json(value: Any, r: random.Random) -> bytes:
    text = json.dumps(value, ensure_ascii=r.random() < 0.5)
    return text.encode("utf-8", "surrogatepass")  # a lone surrogate becomes bytes that are not UTF-8


def _body(r: random.Random) -> bytes:
    name = "".join(r.choice("abcdefghij0123456789-") for _ in range(r.randrange(1, 12)))
    options: list[Callable[[], bytes]] = [
        lambda: b"",
        lambda: _json({"name": "f" + name}, r),
        lambda: _json({"name": "f" + name, "config": {"env": {"GREETING": r.choice(TEXT)}}}, r),
        lambda: _json({"image": r.choice(["localhost/pideploy-gateway:v2", "", "x" * 300])}, r),
        lambda: _json(_value(r, 0, r.randrange(1, 45)), r),
        lambda: _json({"name": "f" + name, "config": _value(r, 0, r.randrange(1, 45))}, r),
        lambda: b"[" * r.randrange(100, 60_000),
        lambda: b'{"name": "a", "name": "b"}',
        lambda: b'{"name": "nan", "config": {"x": NaN}}',
        lambda: b'{"name": "big", "config": {"x": 1e999}}',
        lambda: b'{"name": "big", "config": {"x": ' + b"9" * r.randrange(10, 20_000) + b"}}",
        lambda: bytes(r.randrange(256) for _ in range(r.randrange(1, 300))),
        lambda: b"null",
        lambda: b'{"name": "' + b"x" * 70_000 + b'"}',  # past the body limit
    ]
    return r.choice(options)()


def _headers(r: random.Random, token: str | None, body: bytes, slow: bool) -> list[tuple[str, str]]:
    headers: list[tuple[str, str]] = [("Host", "fuzz")]
    bearer = f"Bearer {token}" if token else ""
    auth = r.choice(
        [[bearer], [bearer], [], ["Bearer wrong"], ["Basic eA=="], [bearer.lower()], [bearer, bearer]]
    )
    auth += [bearer] if r.random() < 0.05 else []  # a second, right one after a wrong one
    headers += [("Authorization", a) for a in auth if a]
    users = [r.choice(USERS)] if r.random() < 0.9 else []
    users += [r.choice(USERS)] if r.random() < 0.05 else []
    headers += [(r.choice(["X-User-Id", "x-user-id", "X-USER-ID"]), u) for u in users]
    if r.random() < 0.2:
        key = r.choice(["k1", "k" * 300, "a b", "\u00e9", str(r.randrange(5))])
        headers += [("Idempotency-Key", key)] * (2 if r.random() < 0.1 else 1)
    length = str(len(body))
    lengths = r.choice(
        [[length]] * 8 + [[], ["abc"], ["-1"], ["1e3"], [f" {length}"], [f"{length}, {length}"]]
    )
    lengths += [length] if r.random() < 0.03 else []
    if slow:
        lengths = r.choice([lengths, [str(len(body) + 100)]])  # a body that never fully arrives
    headers += [("Content-Length", value) for value in lengths]
    if r.random() < 0.05:
        headers.append(("Transfer-Encoding", r.choice(["chunked", "gzip", "identity"])))
    if r.random() < 0.3:
        headers.append(("Content-Type", r.choice(["application/json", "text/plain", "\u00ff", ""])))
    if r.random() < 0.03:
        headers += [(f"X-Junk-{i}", "y") for i in range(r.choice([20, 120]))]  # 120: too many
    if r.random() < 0.02:
        headers.append(("X-Long", "z" * r.choice([1000, 70_000])))
    if r.random() < 0.03:
        headers.append(("Bad Header", "x"))
    r.shuffle(headers)
    return headers


def _valid(r: random.Random, token: str | None) -> Case:
    """A request the API accepts, to reach the queue and the database; now and then one thing
    about it is wrong (a repeated header or key, a deep or huge value, a name with a newline)."""
    iid = str(r.randrange(1, 40))
    choices: list[tuple[str, str, dict[str, Any] | None]] = [
        ("POST", "/api/instances", {"name": f"f{r.randrange(12)}"}),
        (
            "POST",
            "/api/instances",
            {"name": f"f{r.randrange(12)}", "config": {"env": {"GREETING": "hi"}}},
        ),
        ("GET", "/api/instances", None),
        ("GET", f"/api/instances/{iid}", None),
        ("POST", f"/api/instances/{iid}/{r.choice(['stop', 'start'])}", None),
        ("POST", f"/api/instances/{iid}/update", {"image": "localhost/pideploy-gateway:v2"}),
        ("DELETE", f"/api/instances/{iid}", None),
        ("GET", f"/api/tasks?limit={r.randrange(1, 600)}", None),
        ("GET", f"/api/tasks/{r.randrange(1, 200)}", None),
        ("GET", f"/api/tasks/{r.randrange(1, 200)}/trace", None),
        ("GET", f"/api/events?instance={iid}", None),
        ("GET", "/healthz", None),
        ("GET", "/metrics", None),
    ]
    method, path, body = r.choice(choices)
    headers = [
        ("Host", "fuzz"),
        ("Authorization", f"Bearer {token}"),
        ("X-User-Id", r.choice(["alice", "bob"])),
    ]
    if r.random() < 0.3:
        headers.append(("Idempotency-Key", f"k{r.randrange(20)}"))
    mutation = r.randrange(12)
    if body is not None and mutation == 0:
        body = {**body, "config": _value(r, 0, r.randrange(30, 45))}
    elif body is not None and mutation == 1:
        body = {**body, "config": {"env": {r.choice(["FOO\n", "A", "lower"]): r.choice(TEXT)}}}
    elif body is not None and mutation == 2:
        body = {**body, "name": r.choice(TEXT)}
    data = b"" if body is None else _json(body, r)
    if mutation == 3:
        data = data[:-1] + b', "name": "again"}' if data else b'{"a": 1, "a": 2}'
    elif mutation == 4:
        headers.append(r.choice(headers[1:]))  # a header twice
    elif mutation == 5:
        headers[2] = ("X-User-Id", r.choice(USERS))
    headers.append(("Content-Length", str(len(data))))
    head = "\r\n".join([f"{method} {path} HTTP/1.1"] + [f"{k}: {v}" for k, v in headers])
    return Case(head.encode("utf-8", "surrogatepass") + b"\r\n\r\n" + data)


def cases(seed: int, count: int, token: str | None, slow: bool = False) -> Iterator[Case]:
    """`count` requests, the same for the same seed."""
    r = random.Random(seed)
    for _ in range(count):
        if token and r.random() < 0.4:
            yield _valid(r, token)
            continue
        method = r.choice(METHODS) if r.random() < 0.95 else r.choice(ODD_METHODS)
        path = r.choice(PATHS) + r.choice(QUERIES)
        path = path.replace("{id}", r.choice(IDS + [str(r.randrange(1, 60))] * 6))
        if r.random() < 0.05:
            path += "/" + "seg" * r.choice([10, 30_000])
        version = r.choice(["HTTP/1.1"] * 12 + ["HTTP/1.0", "HTTP/2.0", "HTTP/1.x", ""])
        is_slow = slow and r.random() < 0.03
        body = _body(r) if method not in ("GET", "HEAD") or r.random() < 0.1 else b""
        line = f"{method} {path} {version}".rstrip()
        if r.random() < 0.01:
            line = r.choice(["", "GET", "GET / HTTP/1.1 extra", "\x16\x03\x01 TLS?"])
        head = "\r\n".join([line] + [f"{k}: {v}" for k, v in _headers(r, token, body, is_slow)])
        yield Case(head.encode("utf-8", "surrogatepass") + b"\r\n\r\n" + body, is_slow)


def send(host: str, port: int, case: Case, timeout: float = 30.0) -> int:
    """The answer's status; 0 if the server closed the connection without one, -1 if none came."""
    received = b""
    try:
        with socket.create_connection((host, port), timeout=timeout) as conn:
            try:
                if case.slow:
                    for i in range(0, min(len(case.data), 40), 4):
                        conn.sendall(case.data[i : i + 4])
                        time.sleep(0.5)
                    conn.sendall(case.data[40:])
                else:
                    conn.sendall(case.data)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the server answered (a 413, a 400) before reading it all: read that answer
            while chunk := conn.recv(65536):
                received += chunk
    except TimeoutError:
        return -1
    except OSError:
        pass  # reset after its answer: what arrived counts
    words = received.split(b"\r\n", 1)[0].split()
    return int(words[1]) if len(words) >= 2 and words[0].startswith(b"HTTP/") and words[1].isdigit() else 0


def run(
    url: str, token: str | None, count: int, seed: int, slow: bool = False, workers: int = 8
) -> Counter[int]:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return Counter(pool.map(lambda case: send(host, port, case), cases(seed, count, token, slow)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--token", default="")
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--slow", action="store_true", help="also clients that trickle or never finish")
    parser.add_argument("--workers", type=int, default=16)
    args = parser.parse_args()
    started = time.monotonic()
    counts = run(args.url, args.token or None, args.requests, args.seed, args.slow, args.workers)
    print(
        json.dumps(
            {
                "requests": sum(counts.values()),
                "seconds": round(time.monotonic() - started, 1),
                "by_status": dict(sorted(counts.items())),
            }
        )
    )


if __name__ == "__main__":
    main()

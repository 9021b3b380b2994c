"""The heartbeat's figures, in one run, on the real engine and nginx when present:

1. From killing an instance's container (SIGKILL to its process, as a crash or
   the OOM killer does) to the instance answering through nginx again, over
   KILLS kills each: the bare engine restarting the same container (the floor),
   `serve` following the engine's `die` events, and the interval rounds alone
   (events off: a cron-only deployment). The rounds run every ROUND_INTERVAL
   seconds (60, as in production; about 10 minutes for 10 kills), kills land at
   random points of it. HEARTBEAT_BENCH_INTERVAL=4 gives a quick run: the wait
   for the round shrinks in proportion and the repair stays the same, so the
   figure for 60 s is then derived and printed beside it.
   The instances of (2) stay running meanwhile, so the interval rounds probe
   a whole fleet.
2. One healthy round (no drift, so no model call) with 10, 50 and 200
   instances: its duration, the engine API calls it makes and the size of its
   trace file, on the real engine (201 running containers take about 1 GiB
   here). Sizes above REAL_MAX use the in-memory engine, for a machine that
   cannot hold them (HEARTBEAT_BENCH_REAL_MAX=50, say).
3. Retention: what 30 days of one round a minute leave on disk, and one
   retention pass over that many trace files (nothing old; all of them old).

Knobs: HEARTBEAT_BENCH_KILLS (10), HEARTBEAT_BENCH_INTERVAL (60 s), HEARTBEAT_BENCH_REAL_MAX (200).
"""

from __future__ import annotations

import dataclasses
import os
import random
import signal
import statistics
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import heartbeat
import tools
from bench.queue_bench import _site, _world
from bench.tools_bench import _ctx
from config import Config
from db import Postgres
from engine import LABEL_NAMESPACE, DockerEngine, Engine, MemoryEngine
from localio import LOOPBACK
from observability import prune_traces
from proxy import MemoryProxy, NginxProxy, Proxy

KILLS = int(os.environ.get("HEARTBEAT_BENCH_KILLS", "10"))
ROUND_INTERVAL = float(os.environ.get("HEARTBEAT_BENCH_INTERVAL", "60"))
REAL_MAX = int(os.environ.get("HEARTBEAT_BENCH_REAL_MAX", "200"))
SIZES = (10, 50, 200)
TRACE_BYTES: dict[int, int] = {}  # instances -> bytes of a healthy round's trace
ROUNDS = 5


def _answers(url: str) -> bool:
    try:
        with LOOPBACK.open(url, timeout=0.5) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _wait(check: Callable[[], bool], timeout: float, what: str) -> float:
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"no {what} within {timeout:.0f}s")
        time.sleep(0.005)
    return time.monotonic()


def _crash(engine: Engine, container_id: str) -> None:
    """SIGKILL the container's process, the way a crash looks to the engine."""
    if isinstance(engine, DockerEngine):
        os.kill(int(engine.api.inspect_container(container_id)["State"]["Pid"]), signal.SIGKILL)
    else:
        engine.kill(container_id)


def _down_then_up(url: str, timeout: float) -> float:
    """The moment `url` answers again after it stopped answering."""
    _wait(lambda: not _answers(url), 5, "outage after the kill")
    return _wait(lambda: _answers(url), timeout, "answer after the kill")


def _p(values: list[float]) -> str:
    return f"p50 {statistics.median(values):6.3f} s   max {max(values):6.3f} s"


def recovery(rt: tools.Runtime, world: str) -> None:
    created = tools.instance_create(rt, _ctx(rt), "victim")
    iid, url = int(created["instance_id"]), str(created["url"]) + "healthz"

    def container_id() -> str:
        row = rt.db.one("instance_get", id=iid)
        assert row is not None
        return str(row["container_id"])

    floor = []
    for _ in range(KILLS):
        started = time.monotonic()
        if isinstance(rt.engine, DockerEngine):
            rt.engine.api.restart(container_id(), timeout=0)  # the engine's own kill + start
        else:
            rt.engine.kill(container_id())
            rt.engine.start(container_id())
        floor.append(_wait(lambda: _answers(url), 30, "answer after restart") - started)

    def kills(follow_events: bool, interval: float) -> tuple[list[float], list[float]]:
        """(kill -> answering again, the round's start -> answering again) for each kill."""
        config = dataclasses.replace(rt.config, heartbeat_interval=interval)
        beat = heartbeat.Heartbeat(dataclasses.replace(rt, config=config), config)
        stop = threading.Event()
        loop = threading.Thread(target=beat.run, args=(stop,), kwargs={"follow_events": follow_events})
        loop.start()
        outages: list[tuple[float, float]] = []  # wall-clock (killed, answering again)
        try:
            time.sleep(0.5)  # the first round, and the event stream subscribed
            for _ in range(KILLS):
                if not follow_events:
                    time.sleep(random.uniform(0, interval))  # noqa: S311 (a random phase of the round)
                killed, killed_wall = time.monotonic(), time.time()
                _crash(rt.engine, container_id())
                outages.append((killed_wall, killed_wall + _down_then_up(url, interval + 30) - killed))
                time.sleep(0.2)
        finally:
            stop.set()
            loop.join(30)
        starts = sorted(r["started_at"].timestamp() for r in rt.db.all("heartbeat_round_recent", limit=1000))
        repairs = [back - next(s for s in starts if s >= at) for at, back in outages]
        return [back - at for at, back in outages], repairs

    events, event_repairs = kills(True, 60.0)
    rounds, repairs = kills(False, ROUND_INTERVAL)
    fleet = len(rt.db.all("instance_list_running"))
    print(f"kill -> answering through nginx again ({KILLS} kills each; {fleet} instances running):")
    print(f"  bare engine restart, same container (floor)  {_p(floor)}")
    print(f"  serve, on the engine's die event             {_p(events)}")
    print(f"    of which the repair, once the round starts {_p(event_repairs)}")
    print(f"  interval rounds only, every {ROUND_INTERVAL:g} s             {_p(rounds)}")
    print(f"    of which the repair, once the round starts {_p(repairs)}")
    if ROUND_INTERVAL != 60:
        print(
            f"    derived for the 60 s round: the wait for the round is uniform in [0, 60] s, so "
            f"p50 ~{30 + statistics.median(repairs):.1f} s, max ~{60 + max(repairs):.1f} s"
        )


def _fill(rt: tools.Runtime, count: int, prefix: str) -> None:
    # One user each: a create verifies its user's routes through the proxy, and one user owning
    # all 200 would make filling the fleet quadratic.
    have = len(rt.db.all("instance_list_running"))
    for i in range(have, count):
        tools.instance_create(rt, _ctx(rt, f"user{i}"), f"{prefix}{i}")


def _healthy_round(rt: tools.Runtime, count: int, label: str) -> str:
    _fill(rt, count, "h")
    assert isinstance(rt.engine, DockerEngine | MemoryEngine)  # both count their API calls
    calls = rt.engine.calls
    beat = heartbeat.Heartbeat(rt, rt.config)
    durations, per_round, sizes = [], [], []
    for _ in range(ROUNDS):
        before = sum(calls.values())
        report = beat.round("bench")
        per_round.append(sum(calls.values()) - before)
        assert not report.drifts and report.model_calls == 0, report.to_dict()
        assert report.trace_file is not None
        durations.append(report.duration_s)
        sizes.append(os.path.getsize(report.trace_file))
    TRACE_BYTES[count] = max(sizes)
    return (
        f"  {count:>4} instances  {label:<7} {_p(durations)}   engine API calls/round: "
        f"{min(per_round)}-{max(per_round)}   model calls: 0   trace: {max(sizes) / 1024:.1f} KiB"
    )


def retention(days: int = 30) -> None:
    files = days * 24 * 60  # one heartbeat round a minute
    print(f"retention: {days} days of one round a minute = {files} trace files")
    for count, size in sorted(TRACE_BYTES.items()):
        print(f"  {count:>4} instances: {files * size / 2**20:,.0f} MiB of healthy-round traces kept")
    with tempfile.TemporaryDirectory() as folder:
        traces = Path(folder)
        now = time.time()
        for i in range(files):
            path = traces / f"20260101T{i:06d}-heartbeat-none-{i:06x}.json"
            path.write_bytes(b"{}")
            os.utime(path, (now - 3600, now - 3600))
        started = time.monotonic()
        assert prune_traces(traces, before=now - 86_400) == 0
        scan = time.monotonic() - started
        started = time.monotonic()
        assert prune_traces(traces, before=now) == files
        delete = time.monotonic() - started
    print(f"  one retention pass: {scan:.3f} s when nothing is old, {delete:.3f} s deleting all {files}")


def healthy_rounds(rt: tools.Runtime, world: str) -> None:
    """In-memory sizes first (on an empty instance table, emptied again after), then the real ones."""
    real = isinstance(rt.engine, DockerEngine)
    lines: dict[int, str] = {}
    memory = dataclasses.replace(rt, engine=MemoryEngine(), proxy=MemoryProxy())
    for count in SIZES:
        if not real or count > REAL_MAX:
            lines[count] = _healthy_round(memory, count, "memory")
    for row in memory.db.all("instance_list_all"):
        tools.instance_delete(memory, _ctx(memory, row["user_id"]), row["id"])
    for count in SIZES:
        if real and count <= REAL_MAX:
            lines[count] = _healthy_round(rt, count, "real")
    print(f"one healthy round (no drift, no model call; {ROUNDS} rounds each; real: {world}):")
    print("\n".join(lines[count] for count in SIZES))


def main() -> None:
    with _site() as (_, base):
        # Not the default port range, which test runs on this machine may use at the same time.
        low = random.randrange(30000, 32500)  # noqa: S311
        config: Config = dataclasses.replace(
            base, agent="off", healthy_reset=0.0, stop_timeout=2, port_range=f"{low}-{low + 999}"
        )
        # healthy_reset 0: each kill here is a new crash, not a crash loop (no backoff between kills)
        postgres = Postgres(config)
        engine, proxy, world = _world(config)
        rt = tools.Runtime(config, postgres.db, engine, proxy)
        try:
            healthy_rounds(rt, world)
            recovery(rt, world)  # beside the fleet the healthy rounds left running
            retention()
        finally:
            _cleanup(engine, proxy, config)
            postgres.close()


def _cleanup(engine: Engine, proxy: Proxy, config: Config) -> None:
    for container in engine.list({LABEL_NAMESPACE: config.namespace}):
        engine.remove(container.id)
    if isinstance(proxy, NginxProxy):
        proxy.close(stop=True)

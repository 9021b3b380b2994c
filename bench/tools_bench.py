"""The lifecycle tools' figures, in one run, on the real engine and nginx when present:

1. instance_create to a healthy, routed instance (the tool returns only after the
   route answers through nginx) against the bare engine's create + start + first
   /healthz of the same image: the ratio is piDeploy's overhead.
2. nginx_sync (read the running instances, render, nginx -t, reload, confirm,
   verify every route through nginx) with 1, 10 and 50 running instances, both
   when the map changed (a reload) and when it did not (verification only).
3. The bash gate: one `cat` of a file through check + run, in the Landlock
   sandbox and with the check alone (as on a kernel without Landlock).
"""

from __future__ import annotations

import statistics
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from unittest import mock

import gate
import sandbox
import tools
from bench.queue_bench import _site, _world
from db import Postgres
from engine import LABEL_NAMESPACE, ContainerSpec, Engine
from proxy import NginxProxy

RUNS = 10
SYNC_RUNS = 5
GATE_RUNS = 50


def _ctx(rt: tools.Runtime, user: str | None = "bench") -> tools.ToolContext:
    return tools.ToolContext.direct(rt.config.traces, user, "bench")


def _bare(engine: Engine, image: str, port: int, container_port: int, namespace: str) -> float:
    started = time.monotonic()
    spec = ContainerSpec(
        f"bare-{namespace}-{port}", image, port, container_port, {LABEL_NAMESPACE: namespace}
    )
    container = engine.create(spec)
    engine.start(container.id)
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as response:
                if response.status == 200:
                    break
        except (urllib.error.URLError, OSError):
            time.sleep(0.005)
    elapsed = time.monotonic() - started
    engine.remove(container.id)
    return elapsed


def _gate_runs(sandboxed: bool) -> list[float]:
    with tempfile.TemporaryDirectory() as folder:
        log = Path(folder) / "app.log"
        log.write_text("ok\n" * 100)
        abi = gate.landlock_abi() if sandboxed else 0
        timings = []
        # _warned_unsandboxed: the check-only runs are on purpose, no warning for them.
        with (
            mock.patch.object(sandbox, "landlock_abi", return_value=abi),
            mock.patch.object(sandbox, "_warned_unsandboxed", True),
        ):
            for _ in range(GATE_RUNS):
                started = time.monotonic()
                result = gate.run(f"grep -c ok {log}", read_roots=[Path(folder)])
                timings.append(time.monotonic() - started)
                assert result.stdout == "100\n", result
        return timings


def _stats(values: list[float]) -> str:
    return f"median {statistics.median(values):.3f} s  [min {min(values):.3f}, max {max(values):.3f}]"


def main() -> None:
    print(f"bash gate, check + run of one grep ({GATE_RUNS} runs each; {gate.sandbox_status()}):")
    if gate.landlock_abi():
        print(f"  in the Landlock sandbox           {_stats(_gate_runs(True))}")
    print(f"  check alone (no Landlock)         {_stats(_gate_runs(False))}")
    with _site() as (_, config):
        postgres = Postgres(config)
        engine, proxy, world = _world(config)
        rt = tools.Runtime(config, postgres.db, engine, proxy)
        try:
            bare, created = [], []
            low, _ = config.ports
            for i in range(RUNS):
                bare.append(
                    _bare(engine, config.image, low + 5000 + i, config.container_port, config.namespace)
                )
                started = time.monotonic()
                result = tools.instance_create(rt, _ctx(rt), f"b{i}")
                created.append(time.monotonic() - started)
                tools.instance_delete(rt, _ctx(rt), result["instance_id"])
            print(f"instance_create to healthy + routed vs bare engine ({world}; {RUNS} runs each):")
            print(f"  bare engine create+start+healthz   {_stats(bare)}")
            print(f"  piDeploy instance_create           {_stats(created)}")
            print(
                f"  overhead ratio (medians)           {statistics.median(created) / statistics.median(bare):.1f}x"
            )

            print(f"nginx_sync with N running instances ({SYNC_RUNS} syncs each):")
            running = 0
            for target in (1, 10, 50):
                while running < target:
                    tools.instance_create(rt, _ctx(rt), f"s{running}")
                    running += 1
                changed: list[float] = []
                unchanged: list[float] = []
                for _ in range(SYNC_RUNS):
                    proxy.apply({})  # the live map is now stale: the sync must rewrite and reload
                    for timings in (changed, unchanged):
                        started = time.monotonic()
                        result = tools.nginx_sync(rt, _ctx(rt, None))
                        timings.append(time.monotonic() - started)
                        assert len(result["reachable"]) == target, result
                print(f"  {target:>3} instances, map changed (reload): {_stats(changed)}")
                print(f"  {target:>3} instances, map unchanged:       {_stats(unchanged)}")
        finally:
            for container in engine.list({LABEL_NAMESPACE: config.namespace}):
                engine.remove(container.id)
            if isinstance(proxy, NginxProxy):
                proxy.close(stop=True)
            postgres.close()

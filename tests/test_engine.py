"""One conformance suite for every Engine: MemoryEngine and DockerEngine (real stack).

Each test owns a unique `pideploy.namespace` label value and removes its
containers afterwards. The gateway's behaviour (healthz, version, faults) is
the contract of scripts/gateway/entry.sh, which MemoryEngine copies.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from engine import (
    LABEL_INSTANCE,
    LABEL_NAMESPACE,
    Container,
    ContainerSpec,
    DockerEngine,
    EngineEvent,
    MemoryEngine,
)
from errors import ContainerNotFound, EngineError, ImageNotFound
from localio import LOOPBACK, free_port
from tests.conftest import GATEWAY_IMAGE

_opener = LOOPBACK


def get(port: int, path: str, timeout: float = 2.0) -> tuple[int | None, str]:
    """(status, body) of GET 127.0.0.1:port/path; (None, "") when nothing answers."""
    try:
        with _opener.open(f"http://127.0.0.1:{port}{path}", timeout=timeout) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, ""
    except OSError:
        return None, ""


def wait_for(check: Callable[[], Any], timeout: float = 10.0, step: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(step)


class Harness:
    """An engine plus a namespace of its own: specs carry the label, teardown removes them."""

    def __init__(self, engine: MemoryEngine | DockerEngine) -> None:
        self.engine = engine
        self.namespace = f"t{uuid.uuid4().hex[:12]}"
        self.count = 0

    def spec(self, namespace: str | None = None, **changes: Any) -> ContainerSpec:
        self.count += 1
        fields: dict[str, Any] = {
            "name": f"pdtest-{self.namespace}-{self.count}",
            "image": GATEWAY_IMAGE,
            "host_port": free_port(),
            "container_port": 8080,
            "labels": {LABEL_NAMESPACE: namespace or self.namespace, LABEL_INSTANCE: str(self.count)},
        }
        fields.update(changes)
        return ContainerSpec(**fields)

    def healthy(self, port: int, timeout: float = 10.0) -> bool:
        return bool(wait_for(lambda: get(port, "/healthz")[0] == 200, timeout))

    def cleanup(self, namespace: str) -> None:
        for container in self.engine.list({LABEL_NAMESPACE: namespace}):
            with contextlib.suppress(ContainerNotFound):
                self.engine.remove(container.id)


def _exited(h: Harness, container_id: str) -> Container | None:
    seen = h.engine.inspect(container_id)
    return seen if seen and seen.state == "exited" else None


@pytest.fixture(params=["memory", pytest.param("docker", marks=pytest.mark.stack)])
def h(request: pytest.FixtureRequest) -> Iterator[Harness]:
    if request.param == "memory":
        memory = MemoryEngine()
        harness = Harness(memory)
        yield harness
        harness.cleanup(harness.namespace)
        memory.close()
    else:
        harness = Harness(request.getfixturevalue("docker_engine"))
        yield harness
        harness.cleanup(harness.namespace)
        harness.cleanup(harness.namespace + "-other")


def test_create_start_serves_the_gateway_contract(h: Harness) -> None:
    spec = h.spec()
    started = time.monotonic()
    container = h.engine.create(spec)
    h.engine.start(container.id)
    assert h.healthy(spec.host_port)
    elapsed = time.monotonic() - started
    assert (container.name, container.state, container.host_port) == (spec.name, "created", spec.host_port)
    assert get(spec.host_port, "/healthz") == (200, "ok")
    assert get(spec.host_port, "/version") == (200, "v1")
    status, page = get(spec.host_port, "/")
    assert status == 200 and "gateway" in page
    seen = h.engine.inspect(container.id)
    assert seen is not None and seen.running and seen.exit_code is None
    assert seen.host_port == spec.host_port and seen.labels[LABEL_NAMESPACE] == h.namespace
    assert h.engine.inspect(spec.name) == seen
    print(f"create+start+healthz: {elapsed:.3f}s")


def test_version_follows_the_image_tag(h: Harness) -> None:
    spec = h.spec(image="localhost/pideploy-gateway:v2")
    h.engine.start(h.engine.create(spec).id)
    assert h.healthy(spec.host_port)
    assert get(spec.host_port, "/version") == (200, "v2")


def test_list_is_one_call_and_knows_exit_codes(h: Harness) -> None:
    first, second, other = h.spec(), h.spec(), h.spec(namespace=h.namespace + "-other")
    one = h.engine.create(first)
    two = h.engine.create(second)
    foreign = h.engine.create(other)
    try:
        h.engine.start(one.id)
        assert h.healthy(first.host_port)
        h.engine.kill(one.id)
        before = sum(h.engine.calls.values())
        listed = {c.id: c for c in h.engine.list({LABEL_NAMESPACE: h.namespace})}
        assert sum(h.engine.calls.values()) == before + 1
    finally:
        h.engine.remove(foreign.id)
    assert set(listed) == {one.id, two.id}
    assert (listed[one.id].state, listed[one.id].exit_code) == ("exited", 137)
    assert (listed[two.id].state, listed[two.id].exit_code) == ("created", None)
    assert listed[two.id].name == second.name and listed[two.id].host_port == second.host_port
    assert listed[one.id].oom_killed is None  # a list does not say
    assert h.engine.list({LABEL_NAMESPACE: h.namespace, LABEL_INSTANCE: "2"})[0].id == two.id


def test_kill_leaves_exit_code_137_and_closes_the_port(h: Harness) -> None:
    spec = h.spec()
    container = h.engine.create(spec)
    with pytest.raises(EngineError, match="running"):
        h.engine.kill(container.id)  # only a running container can be killed
    h.engine.start(container.id)
    assert h.healthy(spec.host_port)
    h.engine.kill(container.id)
    seen = wait_for(lambda: _exited(h, container.id), 5)
    assert seen is not None and (seen.state, seen.exit_code, seen.oom_killed) == ("exited", 137, False)
    assert wait_for(lambda: get(spec.host_port, "/healthz")[0] is None, 5)
    h.engine.start(container.id)  # a killed container starts again
    assert h.healthy(spec.host_port)


def test_crash_at_start_from_env_and_from_data_file(h: Harness, tmp_path: Path) -> None:
    by_env = h.engine.create(h.spec(env={"GATEWAY_CRASH_AT_START": "1"}))
    data = tmp_path / "data"
    data.mkdir()
    (data / "crash_at_start").touch()
    by_file = h.engine.create(h.spec(mounts={str(data): "/data"}))
    for container in (by_env, by_file):
        h.engine.start(container.id)
        seen = wait_for(lambda c=container.id: _exited(h, c), 5)  # type: ignore[misc]
        assert seen is not None and seen.exit_code == 3


def test_crash_after_and_healthz_delay(h: Harness, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "healthz_delay").write_text("1\n")
    spec = h.spec(env={"GATEWAY_CRASH_AFTER": "2"}, mounts={str(data): "/data"})
    container = h.engine.create(spec)
    h.engine.start(container.id)
    assert wait_for(lambda: get(spec.host_port, "/version")[0] == 200, 5)
    assert get(spec.host_port, "/healthz")[0] == 404  # delayed 1 s
    assert h.healthy(spec.host_port, 3)
    seen = wait_for(lambda: _exited(h, container.id), 5, 0.1)
    assert seen is not None and seen.exit_code == 1


def test_stop_is_graceful_and_idempotent_then_start(h: Harness) -> None:
    spec = h.spec()
    container = h.engine.create(spec)
    h.engine.start(container.id)
    assert h.healthy(spec.host_port)
    h.engine.stop(container.id, 5)
    seen = h.engine.inspect(container.id)
    assert seen is not None and (seen.state, seen.exit_code) == ("exited", 0)  # SIGTERM: exit 0
    h.engine.stop(container.id, 5)
    h.engine.start(container.id)
    assert h.healthy(spec.host_port)


def test_rename(h: Harness) -> None:
    spec = h.spec()
    container = h.engine.create(spec)
    h.engine.rename(container.id, spec.name + "-old")
    renamed = h.engine.inspect(spec.name + "-old")
    assert renamed is not None and renamed.id == container.id and renamed.name == spec.name + "-old"
    assert h.engine.inspect(spec.name) is None
    taken = h.engine.create(h.spec())
    with pytest.raises(EngineError):
        h.engine.rename(taken.id, spec.name + "-old")


def test_remove_twice_raises_container_not_found(h: Harness) -> None:
    spec = h.spec()
    container = h.engine.create(spec)
    h.engine.start(container.id)
    assert h.healthy(spec.host_port)
    h.engine.remove(container.id)  # force: running is fine
    assert h.engine.inspect(container.id) is None
    with pytest.raises(ContainerNotFound):
        h.engine.remove(container.id)
    with pytest.raises(ContainerNotFound):
        h.engine.start(container.id)


def test_missing_image_is_image_not_found_without_pulling(h: Harness) -> None:
    missing = f"localhost/pideploy-missing-{h.namespace}:nope"
    assert not h.engine.image_exists(missing)
    started = time.monotonic()
    with pytest.raises(ImageNotFound):
        h.engine.create(h.spec(image=missing))
    assert time.monotonic() - started < 20  # no pull attempt (a registry timeout takes far longer)
    assert not h.engine.image_exists(missing)
    assert h.engine.list({LABEL_NAMESPACE: h.namespace}) == []


def test_port_in_use_at_start_is_an_engine_error_naming_the_port(h: Harness) -> None:
    spec = h.spec()
    container = h.engine.create(spec)
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", spec.host_port))
        squatter.listen()
        with pytest.raises(EngineError) as caught:
            h.engine.start(container.id)
    assert not isinstance(caught.value, ContainerNotFound)
    assert str(spec.host_port) in caught.value.message and "in use" in caught.value.message
    seen = h.engine.inspect(container.id)
    assert seen is not None and not seen.running
    h.engine.start(container.id)  # the port is free again
    assert h.healthy(spec.host_port)


def test_logs_carry_the_log_message(h: Harness, tmp_path: Path) -> None:
    word = f"hello-{uuid.uuid4().hex[:8]}"
    by_env = h.engine.create(h.spec(env={"GATEWAY_LOG_MESSAGE": word}))
    data = tmp_path / "data"
    data.mkdir()
    (data / "log_message").write_text(word + "-file\n")
    by_file = h.engine.create(h.spec(mounts={str(data): "/data"}))
    for container, expected in ((by_env, word), (by_file, word + "-file")):
        h.engine.start(container.id)
        assert wait_for(lambda c=container.id, e=expected: e in h.engine.logs(c, 50), 5)  # type: ignore[misc]


def test_events_deliver_die_for_own_labels_only(h: Harness) -> None:
    mine_spec, other_spec = h.spec(), h.spec(namespace=h.namespace + "-other")
    mine = h.engine.create(mine_spec)
    other = h.engine.create(other_spec)
    for container in (mine, other):
        h.engine.start(container.id)
    assert h.healthy(mine_spec.host_port) and h.healthy(other_spec.host_port)
    stop = threading.Event()
    seen: list[EngineEvent] = []
    stream = h.engine.events({LABEL_NAMESPACE: h.namespace}, stop)  # subscribed on return

    def read() -> None:
        for event in stream:
            seen.append(event)
            if event.action == "die":
                stop.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        h.engine.kill(other.id)
        h.engine.kill(mine.id)
        reader.join(10)
    finally:
        stop.set()
        h.engine.remove(other.id)
    dies = [e for e in seen if e.action == "die"]
    assert dies and dies[0].container_id == mine.id
    assert dies[0].labels[LABEL_NAMESPACE] == h.namespace and dies[0].time > 0
    assert all(e.container_id != other.id for e in seen)


def test_events_return_promptly_when_stopped(h: Harness) -> None:
    stop = threading.Event()
    stream = h.engine.events({LABEL_NAMESPACE: h.namespace}, stop)
    ended = threading.Event()

    def read() -> None:
        for _event in stream:
            pass
        ended.set()

    threading.Thread(target=read, daemon=True).start()
    time.sleep(0.1)
    stop.set()
    assert ended.wait(10), "events() kept blocking after stop was set"


def test_tag_image(h: Harness) -> None:
    target = f"localhost/pideploy-gateway:{h.namespace}"
    assert not h.engine.image_exists(target)
    h.engine.tag_image(GATEWAY_IMAGE, target)
    try:
        assert h.engine.image_exists(target)
        with pytest.raises(ImageNotFound):
            h.engine.tag_image("localhost/pideploy-missing:nope", target + "x")
    finally:
        if isinstance(h.engine, DockerEngine):
            h.engine.api.remove_image(target)


def test_version_names_the_engine(h: Harness) -> None:
    version = h.engine.version()
    assert set(version) == {"api_version", "version", "name"} and version["name"]


def test_unreachable_engine_is_an_engine_error_naming_the_url(tmp_path: Path) -> None:
    url = f"unix://{tmp_path}/no-such.sock"
    engine = DockerEngine(base_url=url, timeout=2)
    for call in (engine.version, lambda: engine.list({LABEL_NAMESPACE: "x"}), lambda: engine.inspect("x")):
        with pytest.raises(EngineError) as caught:
            call()
        assert url in caught.value.message
    assert engine.calls["version"] == 1 and engine.calls["list"] == 1

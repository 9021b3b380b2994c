"""The container engine behind a small Protocol: Docker Engine API, or in memory.

`DockerEngine` talks to any Docker-compatible API through the `docker` SDK (a
real Docker daemon, or Podman's compatible socket). `MemoryEngine` keeps
containers in a dict and serves each running one's /healthz from a thread, so
fast tests exercise the same HTTP paths. Both pass tests/test_engine.py.

docker SDK exceptions are translated here, where they enter, into EngineError,
ContainerNotFound and ImageNotFound.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Protocol

LABEL_INSTANCE = "pideploy.instance"
LABEL_USER = "pideploy.user"
LABEL_NAMESPACE = "pideploy.namespace"


@dataclass(frozen=True)
class ContainerSpec:
    """What to create: one instance's container."""

    name: str
    image: str
    host_port: int  # published on 127.0.0.1 only
    container_port: int
    labels: Mapping[str, str] = field(default_factory=dict)
    mounts: Mapping[str, str] = field(default_factory=dict)  # host path -> container path
    env: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Container:
    """What the engine says about a container."""

    id: str
    name: str
    image: str
    state: str  # created, running, exited, paused, restarting, removing, dead
    labels: Mapping[str, str]
    host_port: int | None
    exit_code: int | None = None
    oom_killed: bool | None = None  # None: not known (a list call does not say)

    @property
    def running(self) -> bool:
        return self.state == "running"


@dataclass(frozen=True)
class EngineEvent:
    action: str  # start, die, kill, stop, remove, ...
    container_id: str
    labels: Mapping[str, str]
    time: float


class Engine(Protocol):
    def version(self) -> dict[str, str]:
        """Reachability check: {"api_version": ..., "version": ..., "name": ...}."""
        ...

    def image_exists(self, ref: str) -> bool: ...

    def tag_image(self, source: str, target: str) -> None: ...

    def create(self, spec: ContainerSpec) -> Container:
        """Create (not start). ImageNotFound if the image is absent."""
        ...

    def start(self, container_id: str) -> None: ...

    def stop(self, container_id: str, timeout: float) -> None:
        """Graceful stop (SIGTERM, then SIGKILL after `timeout`); a stopped one is fine."""
        ...

    def kill(self, container_id: str) -> None: ...

    def remove(self, container_id: str) -> None:
        """Force-remove; ContainerNotFound if it is already gone."""
        ...

    def rename(self, container_id: str, new_name: str) -> None: ...

    def inspect(self, ref: str) -> Container | None:
        """By id or name; None if absent. Knows exit code and OOM flag."""
        ...

    def list(self, labels: Mapping[str, str]) -> list[Container]:
        """Every container (any state) carrying all these labels, in ONE engine call."""
        ...

    def logs(self, container_id: str, tail: int) -> str: ...

    def events(self, labels: Mapping[str, str], stop: threading.Event) -> Iterator[EngineEvent]:
        """Container events for containers carrying these labels, until `stop` is set."""
        ...

"""The container engine behind a small Protocol: Docker Engine API, or in memory.

`DockerEngine` talks to any Docker-compatible API through the `docker` SDK (a
real Docker daemon, or Podman's compatible socket). `MemoryEngine` keeps
containers in a dict and serves each running one's /healthz from a thread, so
fast tests exercise the same HTTP paths. Both pass tests/test_engine.py.

docker SDK exceptions are translated here, where they enter, into EngineError,
ContainerNotFound and ImageNotFound.

Both count their engine API calls per Engine method in `calls`, so a benchmark
can report what one heartbeat round costs. Both subscribe in `events()` before
it returns: an event that happens after the call is delivered.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import http.server
import logging
import os
import queue
import re
import secrets
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from errors import ContainerNotFound, EngineError, EngineUnreachable, ImageNotFound

if TYPE_CHECKING:
    from config import Config

logger = logging.getLogger(__name__)

LABEL_INSTANCE = "pideploy.instance"
LABEL_USER = "pideploy.user"
LABEL_NAMESPACE = "pideploy.namespace"

# Pinned so that building a client costs no round trip (the SDK's "auto" asks
# the engine at construction) and an unreachable engine fails at the first
# real call, translated. Podman 4.3 and Docker >= 20.10 both serve 1.41.
API_VERSION = "1.41"


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


def _has_labels(have: Mapping[str, str] | None, want: Mapping[str, str]) -> bool:
    have = have or {}
    return all(have.get(key) == value for key, value in want.items())


def _port_from_message(message: str) -> int | None:
    match = re.search(r"(?:127\.0\.0\.1|0\.0\.0\.0|\[::\]|::):(\d+)", message)
    return int(match.group(1)) if match else None


def _port_in_use(message: str) -> bool:
    return "address already in use" in message or "port is already allocated" in message


# Podman's own state names, in case its compatible API lets one through.
_STATES = {"configured": "created", "initialized": "created", "stopped": "exited", "stopping": "running"}
_EXITED = re.compile(r"^Exited \((-?\d+)\)")
# Actor.Attributes of an event carry the labels plus these engine fields.
_EVENT_FIELDS = {"image", "name", "exitCode", "containerExitCode", "podId", "signal", "execID", "execId"}
_ACTIONS = {"destroy": "remove"}  # Docker says destroy, Podman says remove


class DockerEngine:
    """A Docker-compatible Engine API (Docker, or Podman's socket), through the docker SDK."""

    def __init__(self, base_url: str | None = None, timeout: float = 30) -> None:
        self.base_url = base_url or os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
        self.where = f"{self.base_url} ({'DOCKER_HOST' if not base_url else 'docker_host'})"
        self.calls: collections.Counter[str] = collections.Counter()
        self._calls_lock = threading.Lock()
        # The SDK is imported by the engine that uses it: the CLI's listings and the in-memory
        # engine never load it (a tenth of a second).
        import docker

        try:
            self.client = docker.DockerClient(
                base_url=self.base_url, version=API_VERSION, timeout=max(1, round(timeout))
            )
        except docker.errors.DockerException as error:
            raise EngineError(f"cannot use the container engine at {self.where}: {error}") from None
        self.api = self.client.api

    @contextlib.contextmanager
    def _call(self, method: str, ref: str = "", image: bool = False) -> Iterator[None]:
        """Count one engine API call and translate what the SDK raises (`image`: a 404 means the image)."""
        import docker.errors
        import requests.exceptions

        with self._calls_lock:
            self.calls[method] += 1
        try:
            yield
        except docker.errors.ImageNotFound as error:
            raise ImageNotFound(f"image not found: {error.explanation or error}", ref=ref) from None
        except docker.errors.NotFound as error:
            if image:
                raise ImageNotFound(f"image not found: {error.explanation or error}", ref=ref) from None
            raise ContainerNotFound(f"no such container: {ref}", ref=ref) from None
        except docker.errors.APIError as error:
            explanation = str(error.explanation or error)
            raise EngineError(f"engine {method} {ref}: {explanation}", ref=ref) from None
        except requests.exceptions.Timeout as error:
            raise EngineUnreachable(
                f"container engine at {self.where} timed out in {method}: {error}"
            ) from None
        except (requests.exceptions.ConnectionError, ConnectionError, FileNotFoundError) as error:
            raise EngineUnreachable(f"container engine unreachable at {self.where}: {error}") from None
        except (requests.exceptions.RequestException, docker.errors.DockerException) as error:
            raise EngineError(f"container engine at {self.where}, {method}: {error}") from None

    def close(self) -> None:
        """Close the SDK's connection pool."""
        self.client.close()

    # -- reading -----------------------------------------------------------

    def version(self) -> dict[str, str]:
        with self._call("version"):
            data = self.api.version()
        components = data.get("Components") or [{}]
        return {
            "api_version": str(data.get("ApiVersion", "")),
            "version": str(data.get("Version", "")),
            "name": str(components[0].get("Name", "")),
        }

    def image_exists(self, ref: str) -> bool:
        try:
            with self._call("image_exists", ref, image=True):
                self.api.inspect_image(ref)  # type: ignore[no-untyped-call]  # untyped in types-docker
        except ImageNotFound:
            return False
        return True

    def inspect(self, ref: str) -> Container | None:
        for attempt in range(3):
            try:
                with self._call("inspect", ref):
                    data = self.api.inspect_container(ref)
                break
            except ContainerNotFound:
                return None
            except EngineError as error:
                # Podman reads a container's state from its process; one that is exiting right
                # now can answer "no such process" once. A moment later it has its final state.
                if "no such process" not in error.message.lower() or attempt == 2:
                    raise
                time.sleep(0.05 * (attempt + 1))
        state = data.get("State") or {}
        config = data.get("Config") or {}
        ports = (data.get("NetworkSettings") or {}).get("Ports") or {}
        bindings = (data.get("HostConfig") or {}).get("PortBindings") or {}
        host_port = None
        for published in [*ports.values(), *bindings.values()]:
            for binding in published or []:
                if binding.get("HostPort"):
                    host_port = int(binding["HostPort"])
                    break
            if host_port:
                break
        status = str(state.get("Status", ""))
        return Container(
            id=data["Id"],
            name=str(data.get("Name", "")).lstrip("/"),
            image=str(config.get("Image", data.get("Image", ""))),
            state=_STATES.get(status, status),
            labels=dict(config.get("Labels") or {}),
            host_port=host_port,
            exit_code=None if status in ("created", "running") else state.get("ExitCode"),
            oom_killed=bool(state.get("OOMKilled")),
        )

    def list(self, labels: Mapping[str, str]) -> list[Container]:
        # key=value filters only: Podman 4.3 ignores a bare key. Checked again below.
        filters = {"label": [f"{key}={value}" for key, value in labels.items()]}
        with self._call("list"):
            rows = self.api.containers(all=True, filters=filters)
        found = []
        for row in rows:
            if not _has_labels(row.get("Labels"), labels):
                continue
            status = str(row.get("State", ""))
            exited = _EXITED.match(str(row.get("Status", "")))
            host_port = next(
                (int(p["PublicPort"]) for p in row.get("Ports") or [] if p.get("PublicPort")), None
            )
            names = row.get("Names") or [""]
            found.append(
                Container(
                    id=row["Id"],
                    name=str(names[0]).lstrip("/"),
                    image=str(row.get("Image", "")),
                    state=_STATES.get(status, status),
                    labels=dict(row.get("Labels") or {}),
                    host_port=host_port,
                    exit_code=int(exited.group(1)) if exited else None,
                    oom_killed=None,
                )
            )
        return found

    def logs(self, container_id: str, tail: int) -> str:
        with self._call("logs", container_id):
            raw = self.api.logs(container_id, stdout=True, stderr=True, tail=tail)
        return raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else str(raw)

    # -- changing ----------------------------------------------------------

    def tag_image(self, source: str, target: str) -> None:
        import docker.utils

        repository, tag = docker.utils.parse_repository_tag(target)
        with self._call("tag_image", source, image=True):
            ok = self.api.tag(source, repository, tag or "latest", force=True)
        if not ok:
            raise EngineError(f"engine refused to tag {source} as {target}")

    def create(self, spec: ContainerSpec) -> Container:
        """Create from a local image only: the low-level call never pulls."""
        port = f"{spec.container_port}/tcp"
        host_config = self.api.create_host_config(
            port_bindings={port: ("127.0.0.1", spec.host_port)},
            binds={host: {"bind": inside, "mode": "rw"} for host, inside in spec.mounts.items()},
        )
        with self._call("create", spec.image, image=True):
            created = self.api.create_container(
                spec.image,
                name=spec.name,
                labels=dict(spec.labels),
                environment=dict(spec.env),
                ports=[port],
                host_config=host_config,
            )
        return Container(
            id=created["Id"],
            name=spec.name,
            image=spec.image,
            state="created",
            labels=dict(spec.labels),
            host_port=spec.host_port,
        )

    def start(self, container_id: str) -> None:
        try:
            with self._call("start", container_id):
                self.api.start(container_id)
        except EngineError as error:
            if isinstance(error, ContainerNotFound) or not _port_in_use(error.message):
                raise
            port = _port_from_message(error.message)
            raise EngineError(
                f"cannot start container {container_id[:12]}: host port {port} is already in use ({error.message})",
                ref=container_id,
                port=port,
            ) from None

    def stop(self, container_id: str, timeout: float) -> None:
        with self._call("stop", container_id):
            # The SDK adds the grace period to its HTTP timeout.
            self.api.stop(container_id, timeout=max(0, round(timeout)))

    def kill(self, container_id: str) -> None:
        with self._call("kill", container_id):
            self.api.kill(container_id)

    def remove(self, container_id: str) -> None:
        # Podman 4.x sometimes refuses a forced remove of a container it is still stopping
        # ("could not be stopped", "container state improper"): try again briefly.
        for attempt in range(3):
            try:
                with self._call("remove", container_id):
                    self.api.remove_container(container_id, force=True)
                return
            except ContainerNotFound:
                raise
            except EngineError as error:
                transient = "could not be stopped" in error.message or "state improper" in error.message
                if not transient or attempt == 2:
                    raise
                logger.warning("retrying remove of %s: %s", container_id[:12], error.message,
                               extra={"action": "engine_remove_retry"})  # fmt: skip
                time.sleep(0.5 * (attempt + 1))

    def rename(self, container_id: str, new_name: str) -> None:
        with self._call("rename", container_id):
            self.api.rename(container_id, new_name)

    # -- events ------------------------------------------------------------

    def events(self, labels: Mapping[str, str], stop: threading.Event) -> Iterator[EngineEvent]:
        """Subscribed on return. Label filtering happens here: Podman 4.3 ignores a bare-key filter."""
        with self._call("events"):
            stream = self.api.events(decode=True, filters={"type": "container"})
        done = threading.Event()

        def close_when_stopped() -> None:
            # Closing the stream's socket is what unblocks a read in progress.
            while not (stop.wait(0.05) or done.is_set()):
                pass
            with contextlib.suppress(Exception):
                stream.close()

        threading.Thread(target=close_when_stopped, name="engine-events-closer", daemon=True).start()
        return self._read_events(stream, labels, stop, done)

    def _read_events(
        self, stream: Any, labels: Mapping[str, str], stop: threading.Event, done: threading.Event
    ) -> Iterator[EngineEvent]:
        try:
            for raw in stream:
                if stop.is_set():
                    return
                if raw.get("Type", "container") != "container":
                    continue
                actor = raw.get("Actor") or {}
                attributes = {k: str(v) for k, v in (actor.get("Attributes") or {}).items()}
                if not _has_labels(attributes, labels):
                    continue
                nanos = raw.get("timeNano")
                yield EngineEvent(
                    action=_ACTIONS.get(str(raw.get("Action")), str(raw.get("Action", ""))),
                    container_id=str(actor.get("ID") or raw.get("id", "")),
                    labels={k: v for k, v in attributes.items() if k not in _EVENT_FIELDS},
                    time=nanos / 1e9 if nanos else float(raw.get("time", time.time())),
                )
        except Exception as error:
            if stop.is_set():
                return  # the closer shut the socket under the read
            raise EngineError(f"event stream from {self.where} broke: {error}") from None
        finally:
            done.set()
        if not stop.is_set():
            raise EngineError(f"event stream from {self.where} ended")


# ---------------------------------------------------------------------------
# in memory
# ---------------------------------------------------------------------------

DEFAULT_IMAGES = ("localhost/pideploy-gateway:latest", "localhost/pideploy-gateway:v2")


def _full_ref(ref: str) -> str:
    """An image reference with its tag: `name` means `name:latest`."""
    last = ref.rsplit("/", 1)[-1]
    return ref if ":" in last or "@" in last else f"{ref}:latest"


def _gateway_version(image: str) -> str:
    """The stand-in image's contract: tag v2 serves v2; latest (and anything else) v1."""
    tag = _full_ref(image).rsplit(":", 1)[-1]
    return tag if re.fullmatch(r"v\d+", tag) else "v1"


@dataclass
class _Faults:
    """The gateway's fault contract (scripts/gateway/entry.sh): env wins over /data files."""

    crash_at_start: bool = False
    crash_after: float | None = None
    healthz_delay: float = 0.0
    log_message: str | None = None

    @classmethod
    def read(cls, spec: ContainerSpec) -> _Faults:
        data = next(
            (Path(host) for host, inside in spec.mounts.items() if inside.rstrip("/") == "/data"), None
        )

        def setting(var: str, name: str) -> str:
            value = spec.env.get(var, "")
            if not value and data is not None and (data / name).is_file():
                lines = (data / name).read_text(errors="replace").splitlines()
                value = lines[0].strip() if lines else ""
            return value

        def seconds(var: str, name: str) -> float | None:
            value = setting(var, name)
            return float(value) if value.isascii() and value.isdigit() else None

        crash = spec.env.get("GATEWAY_CRASH_AT_START", "")
        log_message = spec.env.get("GATEWAY_LOG_MESSAGE") or None
        if log_message is None and data is not None and (data / "log_message").is_file():
            log_message = (data / "log_message").read_text(errors="replace").rstrip("\n")
        return cls(
            crash_at_start=bool(crash and crash != "0")
            or (data is not None and (data / "crash_at_start").is_file()),
            crash_after=seconds("GATEWAY_CRASH_AFTER", "crash_after"),
            healthz_delay=seconds("GATEWAY_HEALTHZ_DELAY", "healthz_delay") or 0.0,
            log_message=log_message,
        )


class _GatewayHandler(http.server.BaseHTTPRequestHandler):
    server: _GatewayServer

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        gateway = self.server
        if path == "/healthz":
            ready = time.monotonic() - gateway.started >= gateway.healthz_delay
            self._answer(200 if ready else 404, "ok" if ready else "404 Not Found")
        elif path == "/version":
            self._answer(200, gateway.version)
        elif path in ("/", "/index.html"):
            self._answer(
                200,
                '<!doctype html>\n<html><head><meta charset="utf-8"><title>piDeploy gateway stand-in</title></head>\n'
                f'<body><h1>piDeploy gateway stand-in</h1><p>version <span id="version">{gateway.version}</span></p>'
                "</body></html>\n",
                "text/html",
            )
        else:
            self._answer(404, "404 Not Found")

    def _answer(self, status: int, body: str, content_type: str = "text/plain") -> None:
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _GatewayServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, port: int, version: str, healthz_delay: float) -> None:
        self.version = version
        self.healthz_delay = healthz_delay
        self.started = time.monotonic()
        super().__init__(("127.0.0.1", port), _GatewayHandler)


@dataclass
class _Record:
    id: str
    spec: ContainerSpec
    name: str
    image: str
    created: float
    state: str = "created"
    exit_code: int | None = None
    logs: list[str] = field(default_factory=list)
    server: _GatewayServer | None = None
    timer: threading.Timer | None = None
    run: int = 0  # bumped at every start, so a stale crash timer does nothing

    def view(self, listed: bool = False) -> Container:
        return Container(
            id=self.id,
            name=self.name,
            image=self.image,
            state=self.state,
            labels=dict(self.spec.labels),
            host_port=self.spec.host_port,
            exit_code=self.exit_code,
            oom_killed=None if listed else False,
        )


class MemoryEngine:
    """Containers in a dict; a running one serves the gateway's HTTP contract on 127.0.0.1."""

    def __init__(self, images: Iterable[str] = DEFAULT_IMAGES) -> None:
        self.images = {_full_ref(image) for image in images}
        self.calls: collections.Counter[str] = collections.Counter()
        self._containers: dict[str, _Record] = {}
        self._lock = threading.RLock()
        self._subscribers: list[tuple[Mapping[str, str], queue.SimpleQueue[EngineEvent]]] = []

    # -- plumbing ----------------------------------------------------------

    def _count(self, method: str) -> None:
        self.calls[method] += 1  # under self._lock

    def _find(self, ref: str) -> _Record | None:
        if ref in self._containers:
            return self._containers[ref]
        for record in self._containers.values():
            if record.name == ref:
                return record
        matches = [r for r in self._containers.values() if len(ref) >= 3 and r.id.startswith(ref)]
        return matches[0] if len(matches) == 1 else None

    def _get(self, ref: str) -> _Record:
        record = self._find(ref)
        if record is None:
            raise ContainerNotFound(f"no such container: {ref}", ref=ref)
        return record

    def _emit(self, record: _Record, action: str) -> None:
        event = EngineEvent(action, record.id, dict(record.spec.labels), time.time())
        for labels, subscriber in list(self._subscribers):
            if _has_labels(record.spec.labels, labels):
                subscriber.put(event)

    def _halt(self, record: _Record, exit_code: int, *actions: str) -> None:
        """The process ends: close its server, cancel its timer, record the exit (under the lock)."""
        if record.timer is not None:
            record.timer.cancel()
            record.timer = None
        if record.server is not None:
            server, record.server = record.server, None
            server.shutdown()
            server.server_close()
        if record.state == "running":
            record.state = "exited"
            record.exit_code = exit_code
            for action in actions:
                self._emit(record, action)

    def _crash(self, container_id: str, run: int) -> None:
        with self._lock:
            record = self._containers.get(container_id)
            if record is None or record.run != run or record.state != "running":
                return
            record.logs.append(f"gateway {_gateway_version(record.image)}: crashing now (crash_after)")
            self._halt(record, 1, "die")

    # -- reading -----------------------------------------------------------

    def version(self) -> dict[str, str]:
        with self._lock:
            self._count("version")
        return {"api_version": "memory", "version": "1", "name": "MemoryEngine"}

    def image_exists(self, ref: str) -> bool:
        with self._lock:
            self._count("image_exists")
            return _full_ref(ref) in self.images

    def inspect(self, ref: str) -> Container | None:
        with self._lock:
            self._count("inspect")
            record = self._find(ref)
            return record.view() if record else None

    def list(self, labels: Mapping[str, str]) -> list[Container]:
        with self._lock:
            self._count("list")
            return [
                r.view(listed=True) for r in self._containers.values() if _has_labels(r.spec.labels, labels)
            ]

    def logs(self, container_id: str, tail: int) -> str:
        with self._lock:
            self._count("logs")
            lines = self._get(container_id).logs
            return "".join(line + "\n" for line in (lines[-tail:] if tail > 0 else []))

    # -- changing ----------------------------------------------------------

    def tag_image(self, source: str, target: str) -> None:
        with self._lock:
            self._count("tag_image")
            if _full_ref(source) not in self.images:
                raise ImageNotFound(f"image not found: {source}", ref=source)
            self.images.add(_full_ref(target))

    def create(self, spec: ContainerSpec) -> Container:
        with self._lock:
            self._count("create")
            if _full_ref(spec.image) not in self.images:
                raise ImageNotFound(f"image not found: {spec.image} (nothing is pulled)", ref=spec.image)
            if any(r.name == spec.name for r in self._containers.values()):
                raise EngineError(f"engine create {spec.image}: the container name {spec.name!r} is in use")
            record = _Record(
                id=secrets.token_hex(32), spec=spec, name=spec.name, image=spec.image, created=time.time()
            )
            self._containers[record.id] = record
            self._emit(record, "create")
            return record.view()

    def start(self, container_id: str) -> None:
        with self._lock:
            self._count("start")
            record = self._get(container_id)
            if record.state == "running":
                return
            faults = _Faults.read(record.spec)
            version = _gateway_version(record.image)
            record.run += 1
            record.exit_code = None
            if faults.log_message is not None:
                record.logs.append(faults.log_message)
            if faults.crash_at_start:
                record.state, record.exit_code = "exited", 3
                record.logs.append(f"gateway {version}: crash at start requested, exiting with code 3")
                self._emit(record, "start")
                self._emit(record, "die")
                return
            try:
                server = _GatewayServer(record.spec.host_port, version, faults.healthz_delay)
            except OSError as error:
                if error.errno != errno.EADDRINUSE:
                    raise EngineError(f"cannot start container {record.id[:12]}: {error}") from None
                port = record.spec.host_port
                raise EngineError(
                    f"cannot start container {record.id[:12]}: host port {port} is already in use "
                    f"(127.0.0.1:{port}: address already in use)",
                    ref=record.id,
                    port=port,
                ) from None
            threading.Thread(
                target=server.serve_forever,
                kwargs={"poll_interval": 0.05},
                name=f"gateway-{record.name}",
                daemon=True,
            ).start()
            record.server = server
            record.state = "running"
            record.logs.append(f"gateway {version} listening on {record.spec.container_port}")
            if faults.crash_after is not None:
                record.timer = threading.Timer(faults.crash_after, self._crash, (record.id, record.run))
                record.timer.daemon = True
                record.timer.start()
            self._emit(record, "start")

    def stop(self, container_id: str, timeout: float) -> None:
        with self._lock:
            self._count("stop")
            record = self._get(container_id)
            if record.state == "running":
                record.logs.append(f"gateway {_gateway_version(record.image)}: stopping (signal)")
                self._halt(record, 0, "kill", "die", "stop")

    def kill(self, container_id: str) -> None:
        with self._lock:
            self._count("kill")
            record = self._get(container_id)
            if record.state != "running":
                raise EngineError(f"engine kill {container_id}: container is not running", ref=container_id)
            self._halt(record, 137, "kill", "die")

    def remove(self, container_id: str) -> None:
        with self._lock:
            self._count("remove")
            record = self._get(container_id)
            self._halt(record, 137, "kill", "die")
            del self._containers[record.id]
            self._emit(record, "remove")

    def rename(self, container_id: str, new_name: str) -> None:
        with self._lock:
            self._count("rename")
            record = self._get(container_id)
            if any(r.name == new_name and r is not record for r in self._containers.values()):
                raise EngineError(f"engine rename {container_id}: the name {new_name!r} is in use")
            record.name = new_name
            self._emit(record, "rename")

    def events(self, labels: Mapping[str, str], stop: threading.Event) -> Iterator[EngineEvent]:
        subscriber: queue.SimpleQueue[EngineEvent] = queue.SimpleQueue()
        entry = (dict(labels), subscriber)
        with self._lock:
            self._count("events")
            self._subscribers.append(entry)
        return self._read_events(entry, stop)

    def _read_events(
        self, entry: tuple[Mapping[str, str], queue.SimpleQueue[EngineEvent]], stop: threading.Event
    ) -> Iterator[EngineEvent]:
        try:
            while not stop.is_set():
                try:
                    yield entry[1].get(timeout=0.05)
                except queue.Empty:
                    continue
        finally:
            with self._lock:
                self._subscribers.remove(entry)

    def close(self) -> None:
        """Stop every serving thread (tests)."""
        with self._lock:
            for record in self._containers.values():
                self._halt(record, 137)


def engine_from_config(config: Config) -> DockerEngine:
    return DockerEngine(base_url=config.docker_host or None)

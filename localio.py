"""Three small pieces of local I/O that several modules need done the same way.

- `write_atomic`: a file that readers see whole or not at all (nginx's map and conf,
  trace files, an instance's config file, eval reports): write a temp file beside it,
  fsync, rename over it, fsync the folder.
- `LOOPBACK` / `loopback_opener`: urllib openers for calls to 127.0.0.1 that never go
  through an HTTP proxy an operator's environment sets (http_proxy would catch them).
- `free_port`: a loopback TCP port nobody listens on right now.

Each was written four or five times over (proxy, observability, tools, evals, bench,
tests), with small differences nobody chose; this is the one copy.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import urllib.request
from pathlib import Path


def write_atomic(path: Path, data: str | bytes, *, mode: int = 0o666) -> None:
    """Replace `path` with `data` atomically and durably; the folder is made if missing.

    The temp file is `.NAME.HEX.tmp` beside it, created with `mode` (less the umask: the
    default gives what open(path, "w") gives) and removed if anything fails."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data.encode() if isinstance(data, str) else data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


def loopback_opener(*handlers: urllib.request.BaseHandler) -> urllib.request.OpenerDirector:
    """An opener that ignores proxy settings (plus any extra handlers, e.g. one refusing redirects)."""
    return urllib.request.build_opener(urllib.request.ProxyHandler({}), *handlers)


LOOPBACK = loopback_opener()


def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])

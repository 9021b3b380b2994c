"""nginx behind a small Protocol: routes from instance keys to host ports.

Every instance route is `/i/<key>/` on the proxy's base URL, proxied to
`127.0.0.1:<port>/`. `NginxProxy` writes a `map` file atomically beside the
live one, validates it with `nginx -t`, keeps the last good map when that
fails, and reloads. In embedded mode (no PIDEPLOY_NGINX_MAP) it runs its own
nginx under PIDEPLOY_HOME/nginx on loopback; in external mode it writes the map
an operator's nginx includes and runs the configured test and reload commands.
`MemoryProxy` keeps routes in a dict. Both pass tests/test_proxy.py.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Protocol


class Proxy(Protocol):
    def ensure_running(self) -> None:
        """Embedded mode: start nginx if it is not running. External: check the binary."""
        ...

    def apply(self, routes: Mapping[str, int]) -> None:
        """Make the live routes exactly `routes`. ProxyError (last good map kept) if invalid."""
        ...

    def routes(self) -> dict[str, int]:
        """The live route map as nginx has it (read from the map file)."""
        ...

    def url_for(self, key: str) -> str:
        """The public URL of one instance's route, ending in '/'."""
        ...

    def check(self, keys: Iterable[str], timeout: float = 2.0) -> dict[str, bool]:
        """GET <url_for(key)>healthz through the proxy, concurrently; True if 200."""
        ...

    def close(self) -> None: ...

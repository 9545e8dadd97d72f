"""Which requests the explorer answers by their Host and Origin headers: a guard against DNS
rebinding and cross-site posts.

A page on another site can make a browser send requests to the explorer, with a domain name of
its own that it resolves to 127.0.0.1 (DNS rebinding: the Host header holds that name, and the
browser lets the page read the answers) or with a plain form POST (the Origin header names the
other site). :class:`HostCheck` answers 421 to a Host other than ``localhost``, ``127.0.0.1``,
``[::1]`` or the address the explorer is bound to (bound to every address, ``0.0.0.0`` or
``::``: any IP address, which no other site can rebind), and 403 to a request that may change
state (any method but GET, HEAD, OPTIONS) whose Origin is not the explorer's own
``http://<Host>``. Clients that send no Origin (curl, scripts) are served.
"""

from __future__ import annotations

import ipaddress
import json
import re

__all__ = ["HostCheck", "explorer_url", "url_host"]

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")
_SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


def url_host(host: str) -> str:
    """``host`` as a URL writes it: an IPv6 address in brackets."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def explorer_url(host: str, port: int) -> str:
    """The explorer's address, ``http://host:port/``."""
    return f"http://{url_host(host)}:{port}/"


#: a Host header: a name or an IPv4 address, or an IPv6 address in brackets; then an optional port
_HOST = re.compile(r"(\[[0-9a-f:.]+\]|[^:\[\]]+)(?::[0-9]{1,5})?")


def _host_name(value: str) -> str | None:
    """The name of a Host header value without its port, lowercased (``[::1]:8000`` -> ``[::1]``);
    None when it is not of that form."""
    m = _HOST.fullmatch(value.strip().lower())
    return m[1] if m else None


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name[1:-1] if name.startswith("[") and name.endswith("]") else name)
    except ValueError:
        return False
    return True


async def _answer(send, status: int, message: str) -> None:
    body = json.dumps({"detail": message}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


class HostCheck:
    """ASGI middleware: 421 to a foreign Host, 403 to a state-changing request from a foreign Origin."""

    def __init__(self, app, host: str = "127.0.0.1"):
        self.app = app
        self.names = {*LOOPBACK_NAMES, url_host(host).lower()}
        self.any_ip = _is_ip(host) and ipaddress.ip_address(host.strip("[]")).is_unspecified

    def allowed(self, host: str) -> bool:
        """Whether the explorer answers a request with this Host header."""
        name = _host_name(host)
        return name is not None and (name in self.names or (self.any_ip and _is_ip(name)))

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        host = headers.get(b"host", b"").decode("latin-1")
        if not self.allowed(host):
            return await _answer(
                send,
                421,
                f"Host {host!r} is not served here: the explorer answers "
                f"{', '.join(sorted(self.names))} (a guard against DNS rebinding)",
            )
        origin = headers.get(b"origin")
        if scope["method"] not in _SAFE_METHODS and origin is not None:
            origin = origin.decode("latin-1")
            if origin.lower() != f"http://{host.strip().lower()}":
                return await _answer(
                    send,
                    403,
                    f"{scope['method']} from the foreign origin {origin!r} refused: "
                    f"only the explorer's own page (http://{host}) may send it",
                )
        return await self.app(scope, receive, send)

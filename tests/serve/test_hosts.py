"""The Host and Origin guard (DNS rebinding, cross-site posts) and the explorer's URL."""

import asyncio
from urllib.parse import urlsplit

import httpx
import pytest

from glassmetric.serve.hosts import HostCheck, explorer_url


async def _ok(scope, receive, send):
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"served"})


def _statuses(bind: str, requests: list[tuple[str, dict]]) -> list[int]:
    app = HostCheck(_ok, host=bind)

    async def run():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            return [(await client.request(method, "/x", headers=headers)).status_code for method, headers in requests]

    return asyncio.run(run())


@pytest.mark.parametrize(
    "bind, served, refused",
    [
        (
            "127.0.0.1",
            ["localhost", "127.0.0.1:8000", "[::1]:8000", "LOCALHOST:1"],
            [
                "evil.example.com",
                "evil.example.com:8000",
                "192.168.1.5:8000",
                "[::1]evil.com",
                "127.0.0.1:80:80",
                "",
                "localhost.",
                "0.0.0.0:8000",
            ],
        ),
        ("mybox.lan", ["mybox.lan:8000", "MyBox.Lan", "localhost:8000"], ["other.lan:8000", "192.168.1.5"]),
        (
            "0.0.0.0",
            ["192.168.1.5:8000", "10.0.0.1", "[fe80::1]:8000", "localhost"],
            ["evil.example.com:8000", "mybox.lan"],
        ),
        ("::", ["[2001:db8::1]:8000", "192.168.1.5:8000", "[::1]"], ["evil.example.com", "2001:db8::1"]),
        ("::1", ["[::1]:8000", "127.0.0.1"], ["evil.example.com", "192.168.1.5"]),
    ],
)
def test_hosts_served_and_refused(bind, served, refused):
    """Loopback names and the bound address are served (any IP address when bound to all of
    them), every other name gets 421."""
    assert _statuses(bind, [("GET", {"host": h}) for h in served]) == [200] * len(served)
    assert _statuses(bind, [("GET", {"host": h}) for h in refused]) == [421] * len(refused)


def test_state_changing_requests_from_a_foreign_origin_get_403():
    own = {"host": "127.0.0.1:8000"}
    cases = [
        ("POST", {**own, "origin": "http://evil.example.com"}, 403),
        ("PUT", {**own, "origin": "null"}, 403),
        ("DELETE", {**own, "origin": "http://127.0.0.1:9000"}, 403),
        ("PATCH", {**own, "origin": "https://127.0.0.1:8000"}, 403),
        ("POST", {**own, "origin": "http://127.0.0.1:8000"}, 200),
        ("POST", own, 200),
        ("GET", {**own, "origin": "http://evil.example.com"}, 200),
    ]
    assert _statuses("127.0.0.1", [(m, h) for m, h, _ in cases]) == [s for _, _, s in cases]


@pytest.mark.parametrize(
    "host, port",
    [("127.0.0.1", 8000), ("localhost", 1), ("::", 8000), ("::1", 0), ("fe80::1%eth0", 80), ("0.0.0.0", 65535)],
)
def test_the_announced_url_is_a_url_of_the_host_and_port(host, port):
    parts = urlsplit(explorer_url(host, port))
    assert (parts.scheme, parts.hostname, parts.port, parts.path) == ("http", host.lower(), port, "/")

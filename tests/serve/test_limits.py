"""Input limits: refused uploads get their 4xx; the in-flight and body limits of the middleware."""

import asyncio
import io
import socket
import time

import httpx
import pytest
from PIL import Image
from server_thread import ServerThread

from glassmetric.serve.limits import Limits, RequestError, RequestLimits, read_upload


def _png(w, h) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (w, h), (10, 200, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_read_upload_accepts_an_image_and_refuses_the_rest():
    limits = Limits(max_upload_bytes=4000, max_pixels=50 * 50)
    assert read_upload(_png(50, 50), limits).size == (50, 50)
    for data, status, words in (
        (_png(51, 50), 413, "2550 pixels"),
        (b"x" * 4001, 413, "4001 bytes"),
        (b"GIF89a not really", 415, "not an image"),
        (b"", 400, "empty"),
    ):
        with pytest.raises(RequestError, match=words) as err:
            read_upload(data, limits, "q.png")
        assert err.value.status == status and "q.png" in str(err.value)


def test_truncated_image_is_not_an_image():
    with pytest.raises(RequestError) as err:
        read_upload(_png(40, 40)[:60], Limits())
    assert err.value.status == 415


async def _slow_app(scope, receive, send):
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    await asyncio.sleep(0.3)
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": str(len(body)).encode()})


def test_requests_beyond_the_in_flight_limit_get_503_and_then_are_served_again():
    app = RequestLimits(_slow_app, max_in_flight=2, max_body_bytes=100)

    async def run():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            first = await asyncio.gather(*(client.get("/") for _ in range(3)))
            after = await client.get("/")
        return sorted(r.status_code for r in first), after.status_code, app.in_flight

    statuses, after, in_flight = asyncio.run(run())
    assert statuses == [200, 200, 503] and after == 200 and in_flight == 0


def test_bodies_over_the_limit_get_413_with_or_without_a_length():
    app = RequestLimits(_slow_app, max_in_flight=4, max_body_bytes=100)

    async def chunks():
        for _ in range(5):
            yield b"y" * 30

    async def run():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            return [
                (await client.post("/", content=b"x" * 101)),
                (await client.post("/", content=chunks())),
                (await client.post("/", content=b"x" * 100)),
            ]

    declared, streamed, fits = asyncio.run(run())
    assert declared.status_code == 413 and "101 bytes" in declared.json()["detail"]
    assert streamed.status_code == 413 and fits.status_code == 200 and fits.text == "100"


def _send(port: int, data: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(data)
    return sock


def _status(sock: socket.socket) -> int:
    """The status of the HTTP response on ``sock`` (read until the server closes it)."""
    answer = b""
    while chunk := sock.recv(65536):
        answer += chunk
    sock.close()
    return int(answer.split(b" ", 2)[1])


def test_slow_bodies_hold_no_slot_and_time_out_with_408():
    """Slowloris: connections that send headers and part of a body must not hold the
    in-flight slots (a request counts once its body has arrived), and get 408 after the body
    timeout, through a real uvicorn."""
    app = RequestLimits(_slow_app, max_in_flight=2, max_body_bytes=1000, body_timeout_s=1.0)
    with ServerThread(app) as url:
        port = int(url.rsplit(":", 1)[1])
        start = time.monotonic()
        slow = [
            _send(port, b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)
            for _ in range(4)
        ]
        time.sleep(0.2)  # the slow requests are in the middleware before the others arrive
        assert _status(_send(port, b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")) == 200
        whole = b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\nConnection: close\r\n\r\n" + b"y" * 100
        assert _status(_send(port, whole)) == 200
        assert time.monotonic() - start < 1.0  # served while the slow bodies were still arriving
        assert [_status(s) for s in slow] == [408] * 4
        assert 1.0 <= time.monotonic() - start < 8
        assert app.in_flight == 0


def test_a_received_body_reaches_the_app_unchanged():
    """Bodies are received before the app runs (in memory, beyond 1 MiB in a temporary file)
    and handed on byte for byte, with or without a length."""
    import hashlib

    async def digest_app(scope, receive, send):
        h, more = hashlib.sha256(), True
        while more:
            message = await receive()
            h.update(message.get("body", b""))
            more = message.get("more_body", False)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": h.hexdigest().encode()})

    app = RequestLimits(digest_app, max_in_flight=2, max_body_bytes=4 << 20)
    data = bytes(range(256)) * (3 << 12)  # 3 MiB

    async def chunks():
        for i in range(0, len(data), 100_000):
            yield data[i : i + 100_000]

    async def run():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            return [
                (await client.post("/", content=data)).text,
                (await client.post("/", content=chunks())).text,
                (await client.get("/")).text,
            ]

    assert asyncio.run(run()) == [hashlib.sha256(data).hexdigest()] * 2 + [hashlib.sha256(b"").hexdigest()]

"""Input limits: refused uploads get their 4xx; the in-flight and body limits of the middleware."""

import asyncio
import io

import httpx
import pytest
from PIL import Image

from glassmetric.serve.limits import Limits, RequestError, RequestLimits, read_upload


def _png(w, h) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (w, h), (10, 200, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_read_upload_accepts_an_image_and_refuses_the_rest():
    limits = Limits(max_upload_bytes=4000, max_pixels=50 * 50)
    assert read_upload(_png(50, 50), limits).size == (50, 50)
    for data, status, words in ((_png(51, 50), 413, "2550 pixels"), (b"x" * 4001, 413, "4001 bytes"),
                                (b"GIF89a not really", 415, "not an image"), (b"", 400, "empty")):
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
            return [(await client.post("/", content=b"x" * 101)), (await client.post("/", content=chunks())),
                    (await client.post("/", content=b"x" * 100))]

    declared, streamed, fits = asyncio.run(run())
    assert declared.status_code == 413 and "101 bytes" in declared.json()["detail"]
    assert streamed.status_code == 413 and fits.status_code == 200 and fits.text == "100"

"""Input limits of the explorer: upload size, pixel count, image type, requests in flight.

:func:`read_upload` turns uploaded bytes into an RGB image, decoded as every gallery and
evaluation image is (:func:`glassmetric.data.image_io.decode_image`), or raises
:class:`RequestError` with the HTTP status to answer (413 too large, too many pixels or too
elongated; 415 not an image). :class:`RequestLimits` is
an ASGI middleware that answers 503 while ``max_in_flight`` requests are being served and 413
to a request body over ``max_body_bytes`` (counted as it arrives, so a large upload is cut off
early), whatever its Content-Length says.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from PIL import Image

from glassmetric.data.image_io import ImageTooLarge, decode_image
from glassmetric.errors import DataError, GlassmetricError

__all__ = ["Limits", "RequestLimits", "RequestError", "read_upload"]


class RequestError(GlassmetricError):
    """A request the explorer refuses (an upload too large, not an image; a bad value);
    ``status`` is the HTTP status of the answer."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Limits:
    max_upload_bytes: int = 10 * 2**20
    max_pixels: int = 25_000_000
    max_in_flight: int = 32
    max_k: int = 100

    def __post_init__(self) -> None:
        for name in ("max_upload_bytes", "max_pixels", "max_in_flight", "max_k"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


def read_upload(data: bytes, limits: Limits, name: str = "upload") -> Image.Image:
    """Decode an uploaded image after checking its size and (from the header, before decoding)
    its pixels and aspect ratio."""
    if len(data) > limits.max_upload_bytes:
        raise RequestError(413, f"{name}: {len(data)} bytes is over the limit of {limits.max_upload_bytes} bytes")
    if not data:
        raise RequestError(400, f"{name}: the file is empty")
    try:
        return decode_image(data, name, max_pixels=limits.max_pixels)
    except ImageTooLarge as e:
        raise RequestError(413, str(e)) from e
    except DataError as e:
        raise RequestError(415, f"{name}: not an image file PIL can read ({type(e.__cause__).__name__})") from e


async def _answer(send, status: int, message: str) -> None:
    body = json.dumps({"detail": message}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 503:
        headers.append((b"retry-after", b"1"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class _BodyTooLarge(Exception):
    pass


class RequestLimits:
    """ASGI middleware: at most ``max_in_flight`` HTTP requests at once, bodies up to ``max_body_bytes``."""

    def __init__(self, app, max_in_flight: int, max_body_bytes: int):
        self.app, self.max_in_flight, self.max_body_bytes = app, max_in_flight, max_body_bytes
        self.in_flight = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.in_flight >= self.max_in_flight:
            return await _answer(send, 503, f"server busy: {self.in_flight} requests in flight, the limit; try again")
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            return await _answer(send, 413, f"request body of {int(length)} bytes is over the limit of {self.max_body_bytes} bytes")
        self.in_flight += 1
        received, started = 0, False

        async def counted_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise _BodyTooLarge
            return message

        async def tracked_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except _BodyTooLarge:
            if not started:
                await _answer(send, 413, f"request body is over the limit of {self.max_body_bytes} bytes")
        finally:
            self.in_flight -= 1

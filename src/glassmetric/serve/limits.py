"""Input limits of the explorer: upload size, pixel count, image type, requests in flight.

:func:`read_upload` turns uploaded bytes into an RGB image, decoded as every gallery and
evaluation image is (:func:`glassmetric.data.image_io.decode_image`), or raises
:class:`RequestError` with the HTTP status to answer (413 too large, too many pixels or too
elongated; 415 not an image). :class:`RequestLimits` is an ASGI middleware that receives each
request's whole body before the app sees it: 413 to a body over ``max_body_bytes`` (counted as
it arrives, so a large upload is cut off early, whatever its Content-Length says or without
one), 408 to a body that has not arrived within ``body_timeout_s``, and 503 while
``max_in_flight`` requests whose bodies have arrived are being served. A client sending its
body slowly holds no in-flight slot, and not for long.
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass

import anyio
from PIL import Image

from glassmetric.data.image_io import ImageTooLarge, decode_image
from glassmetric.errors import DataError, GlassmetricError

__all__ = ["Limits", "RequestError", "RequestLimits", "read_upload"]


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
    body_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        for name in ("max_upload_bytes", "max_pixels", "max_in_flight", "max_k"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not (self.body_timeout_s > 0 and math.isfinite(self.body_timeout_s)):
            raise ValueError(f"body_timeout_s must be a positive number of seconds, got {self.body_timeout_s}")


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


#: bodies are kept in memory up to this size while they arrive, beyond it in a temporary file
_SPOOL_BYTES = 1 << 20
#: the size of the pieces a received body is handed to the app in
_CHUNK_BYTES = 1 << 16


async def _answer(send, status: int, message: str) -> None:
    body = json.dumps({"detail": message}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 503:
        headers.append((b"retry-after", b"1"))
    if status in (408, 413):  # the rest of the body is not read: the connection cannot be reused
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class RequestLimits:
    """ASGI middleware: bodies up to ``max_body_bytes`` arriving within ``body_timeout_s``,
    then at most ``max_in_flight`` HTTP requests served at once."""

    def __init__(self, app, max_in_flight: int, max_body_bytes: int, body_timeout_s: float = 30.0):
        self.app, self.max_in_flight, self.max_body_bytes = app, max_in_flight, max_body_bytes
        self.body_timeout_s = body_timeout_s
        self.in_flight = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            return await _answer(
                send, 413, f"request body of {int(length)} bytes is over the limit of {self.max_body_bytes} bytes"
            )
        with tempfile.SpooledTemporaryFile(max_size=_SPOOL_BYTES) as body:
            received, complete = 0, False
            with anyio.move_on_after(self.body_timeout_s):
                while not complete:
                    message = await receive()
                    if message["type"] != "http.request":
                        return  # the client went away
                    chunk = message.get("body", b"")
                    received += len(chunk)
                    if received > self.max_body_bytes:
                        break
                    body.write(chunk)
                    complete = not message.get("more_body", False)
            if received > self.max_body_bytes:
                return await _answer(send, 413, f"request body is over the limit of {self.max_body_bytes} bytes")
            if not complete:
                return await _answer(
                    send, 408, f"request body not received within {self.body_timeout_s:g} s ({received} bytes arrived)"
                )
            if self.in_flight >= self.max_in_flight:
                return await _answer(
                    send, 503, f"server busy: {self.in_flight} requests in flight, the limit; try again"
                )
            body.seek(0)
            replayed = False

            async def replay():
                nonlocal replayed
                if replayed:
                    return await receive()  # what follows the body: a disconnect
                chunk = body.read(_CHUNK_BYTES)
                replayed = body.tell() >= received
                return {"type": "http.request", "body": chunk, "more_body": not replayed}

            self.in_flight += 1
            try:
                await self.app(scope, replay, send)
            finally:
                self.in_flight -= 1

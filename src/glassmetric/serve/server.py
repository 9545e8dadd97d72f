"""``glassmetric serve``: check the settings, take the port, open the explorer, announce its
URL and run uvicorn on the port taken."""

from __future__ import annotations

import errno
import ipaddress
import math
import socket
import sys
from collections.abc import Sequence

from glassmetric.errors import ConfigError

__all__ = ["serve"]


def _bind(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` (not yet listening), or a :class:`ConfigError` naming both."""
    from glassmetric.serve.hosts import url_host

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        why = (
            "in use by another program (choose another --port; 0 takes a free one)"
            if e.errno == errno.EADDRINUSE
            else (e.strerror or str(e))
        )
        raise ConfigError(f"cannot listen on {url_host(host)}:{port} (--host {host} --port {port}): {why}") from None
    return sock


def serve(
    checkpoint: str,
    gallery: str | None,
    *,
    split: str = "test",
    host: str = "127.0.0.1",
    port: int = 8000,
    cache_dir: str | None = None,
    device: str = "cpu",
    max_upload_mb: float = 10.0,
    max_megapixels: float = 25.0,
    max_in_flight: int = 32,
    body_timeout: float = 30.0,
    workers: int = 1,
    knn: str = "exact",
    index_dir: str | None = None,
    overrides: Sequence[str] = (),
    upload_store_mb: float = 64.0,
) -> int:
    import uvicorn

    from glassmetric.serve.app import create_app
    from glassmetric.serve.explorer import Explorer
    from glassmetric.serve.hosts import explorer_url
    from glassmetric.serve.limits import Limits

    for name, value in (
        ("--max-upload-mb", max_upload_mb),
        ("--max-megapixels", max_megapixels),
        ("--max-in-flight", max_in_flight),
        ("--body-timeout", body_timeout),
        ("--workers", workers),
        ("--upload-store-mb", upload_store_mb),
    ):
        if not (value > 0 and math.isfinite(value)):
            raise ConfigError(f"{name}: expected a positive finite number, got {value}")
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port: expected 0..65535, got {port}")
    limits = Limits(
        max_upload_bytes=int(max_upload_mb * 2**20),
        max_pixels=int(max_megapixels * 1e6),
        max_in_flight=max_in_flight,
        body_timeout_s=body_timeout,
    )
    with _bind(host, port) as sock:  # before the embedding: a busy port is known at once
        explorer = Explorer.open(
            checkpoint,
            gallery,
            split=split,
            cache_dir=cache_dir,
            device=device,
            knn=knn,
            index_dir=index_dir,
            overrides=list(overrides),
            upload_store_bytes=int(upload_store_mb * 2**20),
        )
        g = explorer.gallery
        print(
            f"gallery {g.source.description}: {len(g)} images, embeddings "
            f"{'loaded from' if g.from_cache else 'cached in'} {g.cache_file}; search: {explorer.search_index!r}",
            flush=True,
        )
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = host == "localhost"
        if not loopback:
            print(f"warning: binding {host}: the explorer is reachable from other machines", file=sys.stderr)
        server = uvicorn.Server(
            uvicorn.Config(
                create_app(explorer, limits, workers=workers, host=host),
                host=host,
                port=sock.getsockname()[1],
                log_level="warning",
            )
        )
        print(
            f"glassmetric explorer on {explorer_url(host, sock.getsockname()[1])} "
            "(API: /docs, schema /openapi.json; Ctrl-C stops it)",
            flush=True,
        )
        server.run(sockets=[sock])
    return 0 if server.started else 3

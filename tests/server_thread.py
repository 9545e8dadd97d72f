"""The explorer's app served in a background thread, for the tests that talk HTTP to it and for
docs/screenshots.py."""

from __future__ import annotations

__all__ = ["ServerThread"]


class ServerThread:
    """uvicorn serving ``app`` on 127.0.0.1 (a free port by default) in a background thread:
    ``with ServerThread(app) as url: ...``."""

    def __init__(self, app, port: int = 0):
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))

    def __enter__(self) -> str:
        import threading
        import time

        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the explorer did not start")
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)

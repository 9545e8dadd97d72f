"""``glassmetric serve`` start-up: bad settings, a busy port and unreadable gallery files end
on one line before any URL is announced; the announced URL is the server's."""

import logging
import socket
import threading
import time
from urllib.parse import urlsplit

import httpx
import pytest
from serve_runs import fit_idml, write_gallery

from glassmetric.cli import main


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return str(fit_idml(tmp_path_factory.mktemp("run")))


def _one_line_error(capsys, *words) -> None:
    out, err = capsys.readouterr()
    lines = [
        line for line in err.replace("\r", "\n").splitlines() if line.strip() and not line.startswith("embedding:")
    ]
    assert "http://" not in out and len(lines) == 1 and lines[0].startswith("glassmetric serve: error: "), (out, err)
    assert all(w in lines[0] for w in words), err


@pytest.mark.parametrize("flag", ["--max-upload-mb", "--max-megapixels", "--body-timeout"])
@pytest.mark.parametrize("value", ["inf", "nan", "-1", "0"])
def test_limits_that_are_not_positive_finite_numbers_are_refused(tmp_path, capsys, flag, value):
    assert main(["serve", "--checkpoint", str(tmp_path / "none.ckpt"), "--port", "0", flag, value]) == 2
    _one_line_error(capsys, flag, value)


def test_a_busy_port_is_named_before_anything_is_announced(checkpoint, tmp_path, capsys):
    """The port is taken before the gallery is embedded: a port another server listens on ends
    on one line, without announcing that server's URL."""
    write_gallery(tmp_path / "gallery", 4)
    with socket.socket() as busy:
        busy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn's
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert (
            main(
                [
                    "serve",
                    "--checkpoint",
                    checkpoint,
                    "--gallery",
                    str(tmp_path / "gallery"),
                    "--port",
                    str(port),
                    "--cache-dir",
                    str(tmp_path / "cache"),
                    "--device",
                    "cpu",
                ]
            )
            == 2
        )
    _one_line_error(capsys, f"--port {port}", f"127.0.0.1:{port}", "in use")
    assert not (tmp_path / "cache").exists()  # nothing embedded


@pytest.mark.parametrize("policy", ["error", "skip"])
def test_a_dangling_symlink_in_the_gallery_follows_the_bad_image_policy(checkpoint, tmp_path, capsys, caplog, policy):
    """``error``: one line naming the link. ``skip``: left out with a warning naming it, the
    other images served."""
    from glassmetric.serve.explorer import Explorer

    paths = write_gallery(tmp_path / "gallery", 6)
    link = paths[2].parent / "gone.png"
    link.symlink_to(tmp_path / "deleted.png")
    if policy == "error":
        argv = [
            "serve",
            "--checkpoint",
            checkpoint,
            "--gallery",
            str(tmp_path / "gallery"),
            "--port",
            "0",
            "--cache-dir",
            str(tmp_path / "cache"),
            "--device",
            "cpu",
        ]
        assert main(argv) == 2
        _one_line_error(capsys, str(link))
        return
    with caplog.at_level(logging.WARNING, logger="glassmetric"):
        explorer = Explorer.open(
            checkpoint,
            tmp_path / "gallery",
            cache_dir=tmp_path / "cache",
            progress=False,
            overrides=["data.on_bad_image=skip"],
        )
    names = [explorer.gallery.name(i) for i in range(len(explorer.gallery))]
    assert sorted(names) == sorted(p.relative_to(tmp_path / "gallery").as_posix() for p in paths)
    assert any(str(link) in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


@pytest.mark.parametrize("host", ["::1", "127.0.0.1"])
def test_the_announced_url_reaches_the_explorer(checkpoint, tmp_path, capsys, monkeypatch, host):
    """``--port 0`` announces the port it got; an IPv6 host is written in brackets; the URL
    answers. The server runs in a thread and is stopped through uvicorn's flag."""
    import uvicorn

    servers = []
    init = uvicorn.Server.__init__
    monkeypatch.setattr(
        uvicorn.Server, "__init__", lambda self, *a, **k: (servers.append(self), init(self, *a, **k))[1]
    )
    gallery = tmp_path / "gallery"
    write_gallery(gallery, 4)
    argv = [
        "serve",
        "--checkpoint",
        checkpoint,
        "--gallery",
        str(gallery),
        "--host",
        host,
        "--port",
        "0",
        "--cache-dir",
        str(tmp_path / "cache"),
        "--device",
        "cpu",
    ]
    result = []
    thread = threading.Thread(target=lambda: result.append(main(argv)), daemon=True)
    thread.start()
    out, deadline = "", time.monotonic() + 60
    try:
        while "http://" not in out:
            assert thread.is_alive() and time.monotonic() < deadline, (out, capsys.readouterr())
            time.sleep(0.05)
            out += capsys.readouterr().out
        url = out[out.index("http://") :].split()[0]
        parts = urlsplit(url)
        assert parts.hostname == host and parts.port > 0
        while not (servers and servers[0].started):
            assert thread.is_alive() and time.monotonic() < deadline
            time.sleep(0.05)
        info = httpx.get(url + "api/info", timeout=10)
        assert info.status_code == 200 and info.json()["gallery_size"] == 4
    finally:
        for server in servers:
            server.should_exit = True
        thread.join(timeout=20)
    assert result == [0]

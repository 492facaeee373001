"""The drift webhook's failure paths, against real loopback HTTP servers: each is one warning that shows the
scheme and host only (the URL's path and query hold its token), never an exception out of the sending thread."""

from __future__ import annotations

import http.server
import json
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest

from fintune.serving.alerts import DriftWebhook

TOKEN = "T000-B000-S3CRETTOKEN"
REPORT = {"state": "drifted", "kl": 0.31}


@contextmanager
def receiver(handle: Callable[[http.server.BaseHTTPRequestHandler], None]) -> Iterator[tuple[int, list]]:
    """A loopback HTTP server calling ``handle`` for every request; yields its port and the requests seen."""
    seen: list[tuple[str, str, bytes]] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def _any(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            seen.append((self.command, self.path, self.rfile.read(length)))
            handle(self)

        do_GET = do_POST = _any  # noqa: N815 (the http.server names)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_port, seen
    finally:
        server.shutdown()
        server.server_close()


def send(url: str) -> None:
    """One synchronous POST, as the webhook's thread makes it."""
    webhook = DriftWebhook(url, timeout_s=5.0, service={"profile": "cpu"})
    webhook._send(json.dumps({"report": REPORT}).encode())


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "fintune.serving.alerts" and r.levelname == "WARNING"]


def test_a_redirect_is_a_failure_not_a_delivery(caplog: pytest.LogCaptureFixture) -> None:
    def moved(handler: http.server.BaseHTTPRequestHandler) -> None:
        if handler.path.startswith("/old"):
            handler.send_response(301)
            handler.send_header("Location", "/new")
        else:
            handler.send_response(200)
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    with receiver(moved) as (port, seen), caplog.at_level("INFO"):
        send(f"http://127.0.0.1:{port}/old?token={TOKEN}")
    # urllib used to follow it with a GET without the body, and log 'drift reported ... (HTTP 200)'
    assert [(method, path.split("?")[0]) for method, path, _ in seen] == [("POST", "/old")]
    assert warnings_of(caplog) == ["drift webhook at http://127.0.0.1 failed: HTTP 301 (a redirect: set "
                                   "drift_webhook_url to the final URL)"]
    assert not any("drift reported" in r.getMessage() for r in caplog.records)


def test_a_garbled_answer_is_a_warning_not_a_thread_traceback(caplog: pytest.LogCaptureFixture) -> None:
    def garbage(handler: http.server.BaseHTTPRequestHandler) -> None:
        handler.wfile.write(b"garbage\r\n\r\n")
        handler.close_connection = True

    with receiver(garbage) as (port, _):
        send(f"http://127.0.0.1:{port}/hook?token={TOKEN}")  # used to raise http.client.BadStatusLine
    assert warnings_of(caplog) == ["drift webhook at http://127.0.0.1 failed: BadStatusLine"]


@pytest.mark.parametrize("url", [f"hooks.example.com/services/{TOKEN}", f"http://127.0.0.1/\n{TOKEN}"])
def test_a_malformed_url_never_reaches_the_log(url: str, caplog: pytest.LogCaptureFixture) -> None:
    send(url)  # used to raise ValueError('unknown url type: ...<the whole URL>') in the thread
    (warning,) = warnings_of(caplog)
    assert warning.startswith("drift webhook at ") and TOKEN not in warning


def test_a_closed_port_names_the_socket_error(caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    send(f"http://127.0.0.1:{port}/hook?token={TOKEN}")
    (warning,) = warnings_of(caplog)
    assert "refused" in warning and TOKEN not in warning


def test_the_thread_it_sends_from_raises_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    escaped: list[BaseException] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: escaped.append(args.exc_value))
    webhook = DriftWebhook(f"hooks.example.com/{TOKEN}", timeout_s=1.0, service={})
    webhook(REPORT)
    for thread in threading.enumerate():
        if thread.name == "fintune-drift-webhook":
            thread.join(5)
    assert escaped == []

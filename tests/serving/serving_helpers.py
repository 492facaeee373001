"""Helpers of the serving tests: a keyword classifier at the model edge, settings, clients, a real server.

The classifier is the only fake: the guard is real Presidio, the breaker, monitor, batcher and TF-IDF baseline
are the real ones, and model faults come from the real ``serving.faults`` setting.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import uvicorn
from fastapi.testclient import TestClient

from fintune.config import Settings, load_settings
from fintune.guardrails import PIIGuard
from fintune.monitoring import SystemMonitor
from fintune.serving import create_app
from fintune.serving.model_adapter import Prediction

PII_TEXT = "Call John at 212-555-0198 or mail john.doe@example.com about card 4111 1111 1111 1111."
PII_VALUES = ("212-555-0198", "john.doe@example.com", "4111 1111 1111 1111", "4111111111111111")


class KeywordClassifier:
    """A deterministic stand-in for the model: keywords decide the label; it remembers what it was shown."""

    name, profile, version = "keyword-test-model", "test", "1"

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.lock = threading.Lock()

    def classify(self, texts: list[str]) -> list[Prediction]:
        """positive for 'rose/increased', negative for 'fell/decreased', else neutral."""
        with self.lock:
            self.batches.append(list(texts))
        return [self._one(t) for t in texts]

    @staticmethod
    def _one(text: str) -> Prediction:
        lowered = text.lower()
        label = ("positive" if any(w in lowered for w in ("rose", "increased")) else
                 "negative" if any(w in lowered for w in ("fell", "decreased")) else "neutral")
        scores = {k: 0.1 for k in ("negative", "neutral", "positive")} | {label: 0.8}
        return Prediction(label, 0.8, scores)

    @property
    def seen(self) -> list[str]:
        """Every text the model was given."""
        return [t for batch in self.batches for t in batch]


def with_serving(settings: Settings, **fields: object) -> Settings:
    """``settings`` with some serving fields replaced (validated)."""
    serving = type(settings.serving).model_validate(settings.serving.model_dump() | fields)
    return settings.model_copy(update={"serving": serving})


def make_client(settings: Settings, guard: PIIGuard, classifier: object | None = None, **kwargs: object) -> TestClient:
    """A TestClient of the app with the keyword classifier (or the one given) and a fresh monitor."""
    app = create_app(settings, classifier=classifier or KeywordClassifier(), guard=guard,
                     monitor=SystemMonitor(settings.monitoring), **kwargs)
    return TestClient(app)


def wait_ready(test_client: TestClient, timeout_s: float = 30.0) -> None:
    """Block until the background model load has finished."""
    services = test_client.app.state.services  # type: ignore[attr-defined]
    test_client.portal.call(services.wait_until_loaded)  # type: ignore[union-attr]
    assert services.pipeline.slot.ready, services.pipeline.slot.error


def tiny_settings(data_dir: Path, tmp: Path) -> Settings:
    """tiny-mistral settings on a tiny PhraseBank (the baseline fits on it in well under a second)."""
    return load_settings("tiny-mistral", data_dir=data_dir, output_dir=tmp / "out", cache_dir=tmp / "cache")


@dataclass
class Server:
    """A `fintune serve` process on a loopback port, its URL and its captured log."""

    url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        """Everything the server printed so far."""
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def stop(self, timeout_s: float = 60.0) -> int:
        """SIGTERM (graceful shutdown) and wait; returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout_s)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def server_env(data_dir: Path, out: Path, cache: Path, **fintune: str) -> dict[str, str]:
    """The environment of a test server: offline hub, tiny data, and FINTUNE_* overrides."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FINTUNE_")}
    env |= {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "FINTUNE_DATA_DIR": str(data_dir),
            "FINTUNE_OUTPUT_DIR": str(out), "FINTUNE_CACHE_DIR": str(cache), "TOKENIZERS_PARALLELISM": "false"}
    return env | {f"FINTUNE_{k.upper()}": v for k, v in fintune.items()}


@contextmanager
def running_server(env: dict[str, str], log_path: Path, profile: str = "tiny-mistral",
                   timeout_s: float = 180.0) -> Iterator[Server]:
    """Start `fintune serve` on a free loopback port, wait until /readyz is 200, stop it afterwards."""
    port = free_port()
    command = [str(Path(sys.executable).parent / "fintune"), "serve", "--profile", profile,
               "--host", "127.0.0.1", "--port", str(port)]
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    server = Server(f"http://127.0.0.1:{port}", process, log_path)
    try:
        _wait_ready(server, timeout_s)
        yield server
    finally:
        server.stop()


def _wait_ready(server: Server, timeout_s: float) -> None:
    """Poll /readyz until it answers 200; fail with the server's log when it dies or times out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise AssertionError(f"server exited with {server.process.returncode}:\n{server.log()}")
        try:
            if httpx.get(server.url + "/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"server not ready after {timeout_s} s:\n{server.log()}")


def start_in_thread(app: object) -> tuple[uvicorn.Server, threading.Thread]:
    """A real uvicorn server for ``app`` on a free loopback port, in a daemon thread, once it accepts requests."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started and thread.is_alive():
        time.sleep(0.05)
    return server, thread

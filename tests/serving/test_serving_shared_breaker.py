"""A real `fintune serve` whose breaker lives in a real Redis: another process opening it stops this service.

The other process is this test, holding a breaker on the same key, as another worker of the service would.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from serving_helpers import running_server, server_env

from fintune.reliability import BreakerState, CircuitBreaker, RedisStorage

pytestmark = pytest.mark.slow


def test_a_breaker_opened_elsewhere_stops_the_service_and_its_reset_frees_it(
    tmp_path: Path, redis_url: str, write_phrasebank: Callable[[Path], Path]
) -> None:
    key = f"test:service:{uuid.uuid4()}"
    env = server_env(write_phrasebank(tmp_path / "data"), tmp_path / "out", tmp_path / "cache",
                     reliability__breaker_storage="redis", reliability__redis_url=redis_url,
                     reliability__redis_key=key)
    with running_server(env, tmp_path / "server.log") as server, httpx.Client(base_url=server.url, timeout=30) as http:
        assert not http.post("/v1/classify", json={"text": "Net sales rose 5 %."}).json()["degraded"]
        breaker = http.get("/metrics/json").json()["serving"]["breaker"]
        assert breaker["storage"] == "RedisStorage" and breaker["successes"] == 1

        elsewhere = CircuitBreaker(storage=RedisStorage.from_url(redis_url, key))
        elsewhere.trip("opened by another worker")
        assert http.get("/readyz").status_code == 503
        assert http.get("/metrics/json").json()["breaker_state"] == "open"  # though no listener here heard it
        assert "fintune_circuit_breaker_state 2.0" in http.get("/metrics").text
        answer = http.post("/v1/classify", json={"text": "Net sales rose 6 %."}).json()
        assert answer["degraded"] and answer["model"]["name"].startswith("tfidf-")  # the model was not called

        elsewhere.reset("the other worker's trial succeeded")
        assert http.get("/readyz").status_code == 200
        assert not http.post("/v1/classify", json={"text": "Net sales rose 7 %."}).json()["degraded"]

        # a process died holding the record's lock: reading the breaker waits until the lock expires (2 s here),
        # in a worker thread, while the event loop goes on answering
        redis_client = elsewhere.storage.client  # type: ignore[attr-defined]
        redis_client.set(f"{key}:lock", "a dead process's token", px=2000)
        finished: list[str] = []
        waiting = threading.Thread(target=lambda: finished.append(f"readyz {http.get('/readyz').status_code}"))
        waiting.start()
        time.sleep(0.3)
        with httpx.Client(base_url=server.url, timeout=30) as other:
            assert other.get("/openapi.json").status_code == 200
        finished.append("openapi")
        waiting.join(timeout=30)
        assert finished == ["openapi", "readyz 200"]
    assert elsewhere.state is BreakerState.CLOSED and elsewhere.snapshot()["successes"] == 2

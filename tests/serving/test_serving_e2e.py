"""End to end: `fintune serve --profile tiny-mistral` in a subprocess on a loopback port, over real HTTP.

tiny-mistral is a random model (its labels mean nothing), which is all the plumbing needs: uvicorn, the real
guard, breaker, batcher, monitor, TF-IDF baseline and the NF4 model path. Faults are injected with the
``FINTUNE_SERVING__FAULTS__*`` environment variables, the same switch the load benchmark uses.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from serving_helpers import PII_TEXT, PII_VALUES, Server, running_server, server_env

pytestmark = pytest.mark.slow
KEY = "e2e-secret-key"
AUTH = {"X-API-Key": KEY}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One model cache for the module's servers (the tiny model is built once)."""
    return tmp_path_factory.mktemp("serving-cache")


@pytest.fixture(scope="module")
def clean_server(
    tmp_path_factory: pytest.TempPathFactory, cache_dir: Path, write_phrasebank: Callable[[Path], Path]
) -> Iterator[Server]:
    """A healthy server with an API key and a small body limit."""
    tmp = tmp_path_factory.mktemp("serving-clean")
    env = server_env(write_phrasebank(tmp / "data"), tmp / "out", cache_dir,
                     serving__api_key=KEY, serving__max_body_bytes="8192")
    with running_server(env, tmp / "server.log") as server:
        yield server


def _no_pii(text: str) -> None:
    for value in PII_VALUES:
        assert value not in text


def test_every_endpoint_over_real_http(clean_server: Server) -> None:
    url = clean_server.url
    with httpx.Client(base_url=url, timeout=30) as http:
        assert http.get("/healthz").json()["status"] == "ok"
        assert http.get("/readyz").json()["model"] == "ready"
        assert http.post("/v1/classify", json={"text": "Sales rose."}).status_code == 401
        one = http.post("/v1/classify", json={"text": PII_TEXT}, headers=AUTH)
        batch = http.post("/v1/classify/batch", headers={"Authorization": f"Bearer {KEY}"},
                          json={"texts": ["Net sales rose.", "", PII_TEXT, "Profit fell."]})
        analyze = http.post("/v1/analyze", headers=AUTH,
                            json={"text": f"Net sales rose 5 %. {PII_TEXT}\n\nProfit fell sharply."})
        too_big = http.post("/v1/classify/batch", headers=AUTH, json={"texts": ["Net sales rose."] * 1000})
        bad_utf8 = http.post("/v1/classify", headers=AUTH | {"content-type": "application/json"},
                             content=b'{"text": "\xc3\x28"}')
        prometheus = http.get("/metrics").text
        snapshot = http.get("/metrics/json").json()
        still = http.post("/v1/classify", json={"text": "Order intake grew."}, headers=AUTH)
    assert one.status_code == 200 and one.json()["degraded"] is False
    assert one.json()["model"] == {"name": "tiny-mistral", "profile": "tiny-mistral", "version": "base-untuned"}
    assert set(one.json()["scores"]) == {"negative", "neutral", "positive"}
    results = batch.json()["results"]
    assert [r["index"] for r in results] == [0, 1, 2, 3] and results[1]["error"]["code"] == "invalid_input"
    assert results[2]["result"]["guardrail"]["pii_count"] == 3
    assert analyze.status_code == 200 and analyze.json()["aggregate"]["sentences"] == 3
    for response in (one, batch, analyze):
        _no_pii(response.text)
        assert response.json()["request_id"] == response.headers["x-request-id"]
    assert too_big.status_code == 413 and bad_utf8.status_code == 400 and still.status_code == 200
    assert 'fintune_pii_detections_total{entity_type="EMAIL_ADDRESS"}' in prometheus
    assert snapshot["requests"]["total"] >= 7 and snapshot["serving"]["batching"]["batches"] >= 1


def test_no_pii_in_the_server_log(clean_server: Server) -> None:
    with httpx.Client(base_url=clean_server.url, timeout=30, headers=AUTH) as http:
        assert http.post("/v1/classify", json={"text": PII_TEXT}).status_code == 200
        assert http.post("/v1/classify", json={"text": PII_TEXT + "\u0000"}).status_code == 422
        # the access log quotes the path as sent: PII in a query string, percent- or plus-encoded
        assert http.post("/v1/classify?card=4111+1111+1111+1111&mail=john.doe%40example.com",
                         json={"text": "Sales rose."}).status_code == 200
    time.sleep(0.3)
    log = clean_server.log()
    assert "Application startup complete" in log and "POST /v1/classify" in log
    assert "card=<CREDIT_CARD>" in log  # the access line is there, masked
    _no_pii(log)
    assert "4111+1111" not in log and "john.doe%40" not in log


def test_degraded_under_injected_faults_then_recovery_and_graceful_shutdown(
    tmp_path: Path, cache_dir: Path, write_phrasebank: Callable[[Path], Path]
) -> None:
    env = server_env(
        write_phrasebank(tmp_path / "data"), tmp_path / "out", cache_dir,
        serving__faults__rate="1.0", serving__faults__stop_s="6", serving__faults__delay_ms="400",
        reliability__failure_threshold="3", reliability__recovery_timeout_s="2",
    )
    with running_server(env, tmp_path / "server.log") as server, httpx.Client(base_url=server.url, timeout=30) as http:
        answers = [http.post("/v1/classify", json={"text": f"Net sales rose {i} %."}) for i in range(4)]
        assert all(a.status_code == 200 and a.json()["degraded"] for a in answers)
        assert answers[-1].json()["model"]["name"] == "tfidf-logistic_regression"
        assert http.get("/readyz").status_code == 503
        _recovers(http, within_s=30)
        assert http.get("/metrics/json").json()["serving"]["breaker"]["state"] == "closed"
        assert _in_flight_request_survives_sigterm(server) == 200
        # uvicorn re-raises the SIGTERM it caught once shut down, so -15 is its clean exit
        assert server.process.wait(30) in (0, -signal.SIGTERM)
    log = server.log()
    assert log.index("Shutting down") < log.rindex('"POST /v1/classify HTTP/1.1" 200') < log.index(
        "Application shutdown complete")


def _recovers(http: httpx.Client, within_s: float) -> None:
    """Keep classifying until the model answers again (faults stopped, breaker closed after a trial)."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if not http.post("/v1/classify", json={"text": "Profit fell."}).json()["degraded"]:
            return
        time.sleep(0.5)
    raise AssertionError("the service did not leave the degraded mode")


def _in_flight_request_survives_sigterm(server: Server) -> int:
    """Send a slow request, SIGTERM the server while it runs; the request still gets its answer."""
    status: list[int] = []
    thread = threading.Thread(target=lambda: status.append(
        httpx.post(server.url + "/v1/classify", json={"text": "Net sales rose."}, timeout=30).status_code))
    thread.start()
    time.sleep(0.15)
    server.process.send_signal(signal.SIGTERM)
    thread.join(30)
    return status[0]


def test_a_profile_given_as_a_file_is_the_one_every_worker_serves(
    tmp_path: Path, cache_dir: Path, write_phrasebank: Callable[[Path], Path]
) -> None:
    profile = tmp_path / "mytiny.yaml"  # not in configs/: workers looked the name up there and found nothing
    shipped = (Path(__file__).resolve().parents[2] / "configs" / "tiny-mistral.yaml").read_text()
    profile.write_text(shipped + "serving:\n  max_text_chars: 50\n")
    env = server_env(write_phrasebank(tmp_path / "data"), tmp_path / "out", cache_dir)
    with running_server(env, tmp_path / "server.log", profile=str(profile)) as server:
        too_long = httpx.post(server.url + "/v1/classify", json={"text": "Net sales rose. " * 5}, timeout=30)
    assert too_long.status_code == 422 and "50" in too_long.json()["error"]["message"]  # the file's own limit

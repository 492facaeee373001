"""The service in-process (TestClient): PII, batch order, item errors, bad input, auth, limits, degraded mode.

The model is the keyword classifier of conftest (the edge); guard, breaker, monitor, batcher and the TF-IDF
baseline are real, and model faults come from the real ``serving.faults`` setting.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr
from serving_helpers import PII_TEXT, PII_VALUES, KeywordClassifier, make_client, wait_ready, with_serving

from fintune.config import Settings
from fintune.guardrails import PIIGuard
from fintune.monitoring import SystemMonitor
from fintune.serving import create_app
from fintune.serving import service as service_module
from fintune.serving.model_adapter import Prediction


def _no_pii(payload: object) -> None:
    """No PII value anywhere in a response."""
    text = json.dumps(payload)
    for value in PII_VALUES:
        assert value not in text


def test_classify_masks_pii_before_the_model_and_in_the_answer(serving_settings: Settings, guard: PIIGuard) -> None:
    model = KeywordClassifier()
    with make_client(serving_settings, guard, model) as client:
        wait_ready(client)
        response = client.post("/v1/classify", json={"text": PII_TEXT}, headers={"X-Request-ID": "req-1"})
        client.post("/v1/classify", json={"text": "SSN 536-22-8145 and SSN 219-09-9999, call 212-555-0198."})
        counted = client.get("/metrics/json").json()["pii_detections"]
    assert counted["US_SSN"] == 2 and counted["PHONE_NUMBER"] == 2  # per span, in a text of mixed types too
    assert response.status_code == 200
    body = response.json()
    _no_pii(body)
    _no_pii(model.seen)
    assert body["request_id"] == response.headers["x-request-id"] == "req-1"
    assert {"CREDIT_CARD", "EMAIL_ADDRESS", "PHONE_NUMBER"} <= set(body["guardrail"]["pii_types"])
    assert body["degraded"] is False and body["model"]["name"] == "keyword-test-model"
    assert body["label"] == "neutral" and body["confidence"] == pytest.approx(0.8)


def test_batch_keeps_order_and_gives_bad_items_their_own_error(client: TestClient) -> None:
    texts = ["Net sales rose 9 %.", "   ", "Operating profit fell.", "x" * 5000, "The AGM is on Monday.", PII_TEXT]
    response = client.post("/v1/classify/batch", json={"texts": texts})
    assert response.status_code == 200
    body = response.json()
    _no_pii(body)
    results = body["results"]
    assert [r["index"] for r in results] == list(range(len(texts)))
    labels = [r["result"]["label"] if r["result"] else None for r in results]
    assert labels == ["positive", None, "negative", None, "neutral", "neutral"]
    assert [r["error"]["code"] for r in results if r["error"]] == ["invalid_input", "invalid_input"]
    assert body["errors"] == 2 and body["degraded"] == 0


def test_analyze_splits_classifies_and_aggregates_redacted(client: TestClient) -> None:
    document = ("Net sales rose 12 % to EUR 31.5 mn. Operating profit fell in Q3. Questions to ir@example.com.\n\n"
                "The board will meet in March. Order intake increased strongly.")
    response = client.post("/v1/analyze", json={"text": document})
    assert response.status_code == 200
    body = response.json()
    assert "ir@example.com" not in json.dumps(body)
    assert [r["label"] for r in body["results"]] == ["positive", "negative", "neutral", "neutral", "positive"]
    aggregate = body["aggregate"]
    assert aggregate["sentences"] == 5
    assert sum(aggregate["label_shares"].values()) == pytest.approx(1.0)
    assert aggregate["score"] == pytest.approx(0.2) and aggregate["label"] == "positive"
    assert aggregate["most_negative"]["text"] == "Operating profit fell in Q3."
    assert aggregate["most_positive"]["label"] == "positive"
    assert "<EMAIL_ADDRESS>" in body["results"][2]["text"]


def test_a_document_without_positive_sentences_has_no_most_positive(client: TestClient) -> None:
    aggregate = client.post("/v1/analyze", json={"text": "Operating profit fell in Q3."}).json()["aggregate"]
    assert aggregate["label"] == "negative"
    assert aggregate["most_negative"]["text"] == "Operating profit fell in Q3."
    assert aggregate["most_positive"] is None


class BullishOnProfit(KeywordClassifier):
    """Answers a label outside the three for sentences about profit (the output check's invalid_label)."""

    def classify(self, texts: list[str]) -> list[Prediction]:
        return [Prediction("bullish", 0.9, {"bullish": 0.9}) if "profit" in t.lower() else p
                for t, p in zip(texts, super().classify(texts), strict=True)]


def test_analyze_reports_failed_sentences_and_fails_when_none_is_classified(
    serving_settings: Settings, guard: PIIGuard
) -> None:
    with make_client(serving_settings, guard, classifier=BullishOnProfit()) as client:
        wait_ready(client)
        mixed = client.post("/v1/analyze", json={"text": "Net sales rose. Operating profit fell. Costs fell."})
        none = client.post("/v1/analyze", json={"text": "Operating profit fell. Profit rose."})
    assert mixed.status_code == 200
    body = mixed.json()
    assert [r["index"] for r in body["results"]] == [0, 2] and body["aggregate"]["sentences"] == 2
    assert [(f["index"], f["error"]["code"]) for f in body["failed"]] == [(1, "invalid_label")]
    assert none.status_code == 502 and none.json()["error"]["code"] == "invalid_label"  # not 200 "neutral"


def test_an_analyze_the_guard_fails_on_is_a_server_error_the_monitor_counts(
    serving_settings: Settings, guard: PIIGuard
) -> None:
    class GuardDown:
        def __init__(self, real: PIIGuard) -> None:
            self.real = real

        def __getattr__(self, name: str) -> object:
            return getattr(self.real, name)

        def detect(self, text: str) -> list:
            raise RuntimeError("guard down")

    with make_client(serving_settings, GuardDown(guard)) as test_client:  # type: ignore[arg-type]
        wait_ready(test_client)
        response = test_client.post("/v1/analyze", json={"text": "Net sales rose. Profit fell."})
        errors = test_client.get("/metrics/json").json()["errors"]
    assert response.status_code == 500 and response.json()["error"]["code"] == "guardrail_failed"
    assert errors["by_type"] == {"guardrail_failed": 1}  # was {}: an analyze-only service looked healthy


def test_a_document_over_the_limit_by_its_pieces_says_so(serving_settings: Settings, guard: PIIGuard) -> None:
    serving = serving_settings.serving.model_copy(update={"max_document_sentences": 4, "max_text_chars": 60})
    with make_client(serving_settings.model_copy(update={"serving": serving}), guard) as test_client:
        wait_ready(test_client)
        long = " ".join(["profit"] * 20) + "."  # 140 characters: three pieces
        response = test_client.post("/v1/analyze", json={"text": f"Net sales rose. Profit fell. {long}"})
    assert response.status_code == 422  # 3 sentences: 'document has 5 sentences' named a count it did not hold
    assert "5 texts to classify (3 of them pieces of sentences over serving.max_text_chars" in (
        response.json()["error"]["message"])


def test_analyze_rejects_bad_characters_with_their_position_in_the_document(client: TestClient) -> None:
    surrogate = client.post("/v1/analyze", content=b'{"text": "Sales rose. Profit \\ud800 fell."}',
                            headers={"content-type": "application/json"})
    control = client.post("/v1/analyze", json={"text": "Sales rose. Profit\u000bfell."})
    assert surrogate.status_code == 422 and "lone surrogate U+D800 at 19" in surrogate.json()["error"]["message"]
    assert control.status_code == 422 and "position 18" in control.json()["error"]["message"]


def test_analyze_classifies_an_over_long_sentence_in_pieces_cut_outside_its_pii(
    serving_settings: Settings, guard: PIIGuard
) -> None:
    model = KeywordClassifier()
    sentence = "x" * 1980 + " mail john.doe@example.com now about sales that rose"
    with make_client(serving_settings, guard, classifier=model) as client:
        wait_ready(client)
        response = client.post("/v1/analyze", json={"text": sentence + ". Costs fell."})
    assert response.status_code == 200
    first, second, after = model.seen
    assert all(len(seen) <= serving_settings.serving.max_text_chars for seen in model.seen)
    # cut before the address that crosses the limit, and nothing dropped
    assert first == "x" * 1980 + " mail" and second == "<EMAIL_ADDRESS> now about sales that rose."
    assert after == "Costs fell."
    results = response.json()["results"]
    assert [r["cut"] for r in results] == [True, True, False] and [r["index"] for r in results] == [0, 1, 2]
    assert "john.doe" not in response.text
    assert [r["pii_types"] for r in results] == [[], ["EMAIL_ADDRESS"], []]


def test_analyze_masks_the_document_before_a_split_parts_a_number_from_its_label(
    serving_settings: Settings, guard: PIIGuard
) -> None:
    model = KeywordClassifier()
    document = ("Wire to account no. 0012345678 today. Soc. Sec. No. 219099999 was filed. Our SSN\n\n536228145 is "
                "on file. " + "Revenue grew " * 160 + "and account 0012345678 was closed.")
    with make_client(serving_settings, guard, classifier=model) as client:
        wait_ready(client)
        response = client.post("/v1/analyze", json={"text": document})
        metrics = client.get("/metrics/json").json()
    assert response.status_code == 200
    for value in ("0012345678", "219099999", "536228145"):
        assert value not in response.text and not any(value in seen for seen in model.seen)
    results = response.json()["results"]
    assert len(results) > 5  # "no." and "No." end sentences, the blank line a paragraph, the long one is cut
    assert sum(r["pii_types"].count("ACCOUNT_NUMBER") + r["pii_types"].count("US_SSN") for r in results) == 4
    assert metrics["pii_detections"]["ACCOUNT_NUMBER"] == 2 and metrics["pii_detections"]["US_SSN"] == 2


BAD_INPUTS = [
    ("empty text", "/v1/classify", {"json": {"text": ""}}, 422),
    ("whitespace text", "/v1/classify", {"json": {"text": " \n\t "}}, 422),
    ("text over the limit", "/v1/classify", {"json": {"text": "a" * 2001}}, 422),
    ("wrong type", "/v1/classify", {"json": {"text": 42}}, 422),
    ("list instead of object", "/v1/classify", {"json": ["text"]}, 422),
    ("missing field", "/v1/classify", {"json": {}}, 422),
    ("unknown field", "/v1/classify", {"json": {"text": "ok", "txt": "typo"}}, 422),
    ("invalid JSON", "/v1/classify", {"content": b'{"text": ', "headers": {"content-type": "application/json"}}, 400),
    ("invalid UTF-8", "/v1/classify", {"content": b'{"text": "\xff\xfe"}',
                                       "headers": {"content-type": "application/json"}}, 400),
    ("control character", "/v1/classify", {"json": {"text": "profit\u0000rose"}}, 422),
    ("raw control character", "/v1/classify", {"content": b'{"text": "a\x01b"}',
                                               "headers": {"content-type": "application/json"}}, 400),
    ("lone surrogate", "/v1/classify", {"content": b'{"text": "profit \\ud800 rose"}',
                                        "headers": {"content-type": "application/json"}}, 422),
    ("batch over the maximum", "/v1/classify/batch", {"json": {"texts": ["Sales rose."] * 257}}, 422),
    ("empty batch", "/v1/classify/batch", {"json": {"texts": []}}, 422),
    ("empty document", "/v1/analyze", {"json": {"text": "  "}}, 422),
    ("only invisible characters", "/v1/classify", {"json": {"text": "\u200b\ufeff\u2060"}}, 422),
    ("only fillers and selectors", "/v1/classify", {"json": {"text": "\u3164\u034f\ufe0f "}}, 422),
    ("document of invisible characters", "/v1/analyze", {"json": {"text": "\u200b \u200d\n\n\ufeff"}}, 422),
    ("big integer", "/v1/classify", {"content": b'{"text": ' + b"1" * 5000 + b"}",
                                     "headers": {"content-type": "application/json"}}, 400),
    ("form content type", "/v1/classify", {"data": {"text": "Sales rose."}}, 415),
    ("JSON without a content type", "/v1/classify", {"content": b'{"text": "Sales rose."}'}, 415),
    ("text content type", "/v1/classify/batch", {"content": b'{"texts": ["a"]}',
                                                 "headers": {"content-type": "text/plain"}}, 415),
    ("JSON nested too deeply", "/v1/classify", {"content": b'{"text": ' + b"[" * 5000 + b"]" * 5000 + b"}",
                                                "headers": {"content-type": "application/json"}}, 400),
]


@pytest.mark.parametrize(("path", "request_kwargs", "status"), [b[1:] for b in BAD_INPUTS],
                         ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_is_a_clear_4xx_and_the_service_stays_healthy(
    client: TestClient, path: str, request_kwargs: dict, status: int
) -> None:
    response = client.post(path, **request_kwargs)
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"]["message"] and body["error"]["code"]
    assert body["request_id"] == response.headers["x-request-id"]
    assert client.get("/healthz").status_code == 200
    assert client.post("/v1/classify", json={"text": "Net sales rose."}).json()["label"] == "positive"


@pytest.mark.parametrize("client_id", ["536-22-8145", "4111111111111111", "212-555-0198", "req_536-22-8145",
                                       "req-212-555-0198", "card_4111111111111111", "acct-12345",
                                       "41111111111111110000000000000000", "53622814-5000-0000-0000-411111111111"])
def test_a_request_id_holding_pii_is_replaced_not_echoed(client: TestClient, client_id: str) -> None:
    response = client.post("/v1/classify", json={"text": "Net sales rose."}, headers={"X-Request-ID": client_id})
    assert response.status_code == 200
    assert response.headers["x-request-id"] == response.json()["request_id"]
    assert client_id not in response.headers["x-request-id"] and len(response.headers["x-request-id"]) == 32


@pytest.mark.parametrize("client_id", ["req-1", "order.2026_b", "0b9a4f1e-5c1d-4a57-9d3e-8f0a2b6c7d1e",
                                       "0b9a4f1e5c1d4a579d3e8f0a2b6c7d1e"])
def test_a_request_id_without_pii_is_echoed(client: TestClient, client_id: str) -> None:
    response = client.get("/healthz", headers={"X-Request-ID": client_id})
    assert response.headers["x-request-id"] == response.json()["request_id"] == client_id


def test_batch_entries_that_are_not_strings_get_their_own_error_and_the_others_an_answer(client: TestClient) -> None:
    secret = {"ssn": "536-22-8145"}
    response = client.post("/v1/classify/batch", json={"texts": ["Net sales rose.", 3, None, True, [1], secret,
                                                                 "Profit fell."]})
    assert response.status_code == 200, response.text
    body = response.json()
    assert [r["result"]["label"] if r["result"] else None for r in body["results"]] == [
        "positive", None, None, None, None, None, "negative"]
    messages = [r["error"]["message"] for r in body["results"][1:6]]
    assert [m.split(",")[0] for m in messages] == [
        "this entry is a number", "this entry is null", "this entry is a boolean", "this entry is an array",
        "this entry is an object"]
    assert {r["error"]["code"] for r in body["results"][1:6]} == {"invalid_input"}
    assert body["errors"] == 5 and "8145" not in response.text


def test_a_batch_of_another_type_than_an_array_is_still_a_422(client: TestClient) -> None:
    response = client.post("/v1/classify/batch", json={"texts": "Net sales rose."})
    assert response.status_code == 422 and response.json()["error"]["code"] == "invalid_request"


def test_a_batch_item_of_invisible_characters_gets_its_own_error(client: TestClient) -> None:
    results = client.post("/v1/classify/batch", json={"texts": ["Net sales rose.", "\u2060\u200d"]}).json()["results"]
    assert results[0]["result"]["label"] == "positive"
    assert results[1]["error"]["code"] == "invalid_input" and "invisible" in results[1]["error"]["message"]


def test_a_media_type_is_quoted_back_only_when_it_looks_like_one(client: TestClient) -> None:
    for header, shown in (("text/plain", "'text/plain'"), ("text/john.doe@example.com", "another media type"),
                          ("text/4111111111111111", "another media type")):
        response = client.post("/v1/classify", content=b'{"text": "ok"}', headers={"content-type": header})
        assert response.status_code == 415
        assert response.json()["error"]["message"].endswith(f"(got {shown})"), response.text


def test_a_body_without_a_content_type_is_told_to_name_one(client: TestClient) -> None:
    response = client.post("/v1/classify", content=b'{"text": "Sales rose."}')
    assert response.status_code == 415
    assert response.json()["error"]["message"].startswith("the request has no Content-Type header")
    for header, shown in ((";charset=utf-8", "another media type"), ("text/x+json", "'text/x+json'"),
                          ("application/a/b+json", "another media type")):
        response = client.post("/v1/classify", content=b'{"text": "ok"}', headers={"content-type": header})
        assert response.status_code == 415, response.text  # FastAPI reads only application/*+json as JSON
        assert response.json()["error"]["message"].endswith(f"(got {shown})")
    empty = client.post("/v1/classify", content=b"")
    assert empty.status_code == 422 and empty.json()["error"]["message"] == "body: Field required"


def test_invalid_json_says_why(client: TestClient) -> None:
    syntax = client.post("/v1/classify", content=b"not json", headers={"content-type": "application/json"})
    control = client.post("/v1/classify", content=b'{"text": "a\x01b"}', headers={"content-type": "application/json"})
    assert syntax.json()["error"]["message"] == "request body is not valid JSON (Expecting value; check its syntax)"
    assert "raw control characters must be escaped" in control.json()["error"]["message"]


class ScoresAsGiven(KeywordClassifier):
    """Keyword labels, but the texts 'nan', 'inf', 'over' and 'rounding' get broken or borderline scores."""

    BROKEN = {"nan": float("nan"), "inf": float("inf"), "over": 1.5, "rounding": 1.0 + 1e-9}

    def classify(self, texts: list[str]) -> list[Prediction]:
        predictions = super().classify(texts)
        return [Prediction(p.label, self.BROKEN.get(t, p.confidence), p.scores | {p.label: self.BROKEN.get(t, 0.8)})
                for t, p in zip(texts, predictions, strict=True)]


def test_a_score_that_is_not_a_probability_is_that_items_502_and_counted(
    serving_settings: Settings, guard: PIIGuard
) -> None:
    with make_client(serving_settings, guard, classifier=ScoresAsGiven()) as test_client:
        wait_ready(test_client)
        batch = test_client.post("/v1/classify/batch", json={"texts": ["Sales rose", "nan", "inf", "over",
                                                                       "rounding"]})
        single = test_client.post("/v1/classify", json={"text": "nan"})
        snapshot = test_client.get("/metrics/json").json()
    assert batch.status_code == 200, batch.text
    results = batch.json()["results"]
    assert results[0]["result"]["label"] == "positive"
    assert [r["error"]["code"] for r in results[1:4]] == ["invalid_output"] * 3
    rounded = results[4]["result"]
    assert rounded["confidence"] == 1.0 and rounded["scores"]["neutral"] == 1.0  # clipped float rounding
    # alone in its batch, a NaN is the model failing (no text got probabilities): counted, the baseline answers
    assert single.status_code == 200 and single.json()["degraded"] is True
    assert snapshot["errors"]["by_type"] == {"invalid_output": 3}
    assert snapshot["fallbacks"] == {"model_error": 1}
    assert snapshot["predictions"]["counts"] == {"positive": 1, "neutral": 1}


class AlwaysNaN(KeywordClassifier):
    """A broken model: NaN for every text."""

    def classify(self, texts: list[str]) -> list[Prediction]:
        return [Prediction("neutral", float("nan"), dict.fromkeys(("negative", "neutral", "positive"), float("nan")))
                for _ in super().classify(texts)]


def test_a_model_answering_nan_everywhere_trips_the_breaker_and_the_baseline_answers(
    serving_settings: Settings, guard: PIIGuard
) -> None:
    with make_client(serving_settings, guard, classifier=AlwaysNaN()) as test_client:
        wait_ready(test_client)
        answers = [test_client.post("/v1/classify", json={"text": f"Net sales rose {i} %."}) for i in range(7)]
        snapshot = test_client.get("/metrics/json").json()
    assert all(a.status_code == 200 and a.json()["degraded"] for a in answers), answers[0].text
    assert snapshot["serving"]["breaker"]["state"] == "open"
    assert snapshot["fallbacks"] == {"model_error": 5, "breaker_open": 2}


def test_a_damaged_baseline_file_leaves_the_service_up_without_a_fallback(
    serving_settings: Settings, guard: PIIGuard, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    truncated = tmp_path / "linear_svc.joblib"
    truncated.write_bytes(b"\x80\x04\x95")  # a copy cut short: unpickling raises struct.error (or EOFError)
    settings = with_serving(serving_settings, baseline_path=truncated)
    with make_client(settings, guard) as test_client:  # the app's startup used to die of it
        wait_ready(test_client)
        answered = test_client.post("/v1/classify", json={"text": "Net sales rose."})
        ready = test_client.get("/readyz").json()
    assert answered.status_code == 200 and not answered.json()["degraded"]
    assert ready["degraded_available"] is False
    assert any("degraded mode unavailable" in r.getMessage() for r in caplog.records)


def test_an_unexpected_error_is_a_500_the_monitor_counts_and_its_request_id_finds_in_the_log(
    serving_settings: Settings, guard: PIIGuard, caplog: pytest.LogCaptureFixture
) -> None:
    app = create_app(serving_settings, classifier=KeywordClassifier(), guard=guard,
                     monitor=SystemMonitor(serving_settings.monitoring))

    async def broken(text: str) -> dict:
        raise RuntimeError("a bug")

    with TestClient(app, raise_server_exceptions=False) as test_client:
        wait_ready(test_client)
        app.state.services.classify = broken
        response = test_client.post("/v1/classify", json={"text": "Net sales rose."},
                                    headers={"X-Request-ID": "abc-1"})
        snapshot = test_client.get("/metrics/json").json()
    assert response.status_code == 500 and response.json()["error"]["code"] == "internal_error"
    assert snapshot["errors"]["by_type"] == {"internal_error": 1}
    # "the request id identifies it in the logs": the 500 lacked the header, and no log line held the id
    assert response.headers["x-request-id"] == response.json()["request_id"] == "abc-1"
    assert any("unexpected error" in r.getMessage() and "abc-1" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(("path", "body", "builder"), [
    ("/v1/classify", {"text": "Net sales rose."}, "classification"),
    ("/v1/classify/batch", {"texts": ["Net sales rose.", "Profit fell."]}, "batch_item"),
    ("/v1/analyze", {"text": "Net sales rose. Profit fell."}, "sentence_result"),
])
def test_an_error_building_the_answer_is_counted_once_not_as_successes_too(
    serving_settings: Settings, guard: PIIGuard, monkeypatch: pytest.MonkeyPatch, path: str, body: dict, builder: str
) -> None:
    def broken(*args: object) -> dict:
        raise RuntimeError("a bug")

    monkeypatch.setattr(service_module, builder, broken)
    app = create_app(serving_settings, classifier=KeywordClassifier(), guard=guard,
                     monitor=SystemMonitor(serving_settings.monitoring))
    with TestClient(app, raise_server_exceptions=False) as test_client:
        wait_ready(test_client)
        response = test_client.post(path, json=body)
        snapshot = test_client.get("/metrics/json").json()
    assert response.status_code == 500
    assert snapshot["requests"]["total"] == 1 and snapshot["errors"]["by_type"] == {"internal_error": 1}


def test_an_unknown_field_is_not_quoted_back_it_may_be_pii(client: TestClient) -> None:
    response = client.post("/v1/classify", json={"text": "ok", "john.doe@example.com 536-22-8145": 1})
    assert response.status_code == 422
    message = response.json()["error"]["message"]
    assert message == "<unknown field>: Extra inputs are not permitted"


def test_api_key_guards_v1_but_not_health(serving_settings: Settings, guard: PIIGuard) -> None:
    settings = with_serving(serving_settings, api_key="s3cret-key")
    with make_client(settings, guard) as client:
        wait_ready(client)
        body = {"text": "Net sales rose."}
        missing = client.post("/v1/classify", json=body)
        wrong = client.post("/v1/classify", json=body, headers={"X-API-Key": "nope"})
        header = client.post("/v1/classify", json=body, headers={"X-API-Key": "s3cret-key"})
        bearer = client.post("/v1/classify", json=body, headers={"Authorization": "Bearer s3cret-key"})
        health = [client.get(p).status_code for p in ("/healthz", "/readyz")]
        probes = [client.head(p) for p in ("/healthz", "/readyz")]  # uptime monitors often send HEAD
        json_headers = {"content-type": "application/json"}
        # the key is judged before the body, though FastAPI parses the body first
        bad_bodies = [client.post("/v1/classify", content=b'{"text": ', headers=json_headers),
                      client.post("/v1/classify", json={"txt": "typo"}),
                      client.post("/v1/analyze", content=b'{"text": "\xff"}', headers=json_headers),
                      client.post("/v1/classify", content=b'{"text": "ok"}')]  # no Content-Type: 401, not 415
        keyed_bad = client.post("/v1/classify", json={"txt": "typo"}, headers={"X-API-Key": "s3cret-key"})
    assert (missing.status_code, wrong.status_code) == (401, 401)
    assert "missing API key" in missing.json()["error"]["message"]
    assert wrong.json()["error"]["message"] == "invalid API key"
    assert missing.headers["www-authenticate"] == "Bearer"
    assert (header.status_code, bearer.status_code) == (200, 200)
    assert health == [200, 200]
    assert [p.status_code for p in probes] == [200, 200] and all(p.content == b"" for p in probes)
    assert [r.status_code for r in bad_bodies] == [401, 401, 401, 401] and keyed_bad.status_code == 422


def test_a_non_ascii_api_key_is_accepted_as_its_utf8_bytes(serving_settings: Settings, guard: PIIGuard) -> None:
    key = "cl\u00e9-secr\u00e8te"
    with make_client(with_serving(serving_settings, api_key=key), guard) as client:
        wait_ready(client)
        right = client.post("/v1/classify", json={"text": "Net sales rose."}, headers={"X-API-Key": key.encode()})
        wrong = client.post("/v1/classify", json={"text": "Net sales rose."}, headers={"X-API-Key": b"cle-secrete"})
    assert (right.status_code, wrong.status_code) == (200, 401)


def test_body_over_the_limit_is_413_unread(serving_settings: Settings, guard: PIIGuard) -> None:
    settings = with_serving(serving_settings, max_body_bytes=1024)
    with make_client(settings, guard) as client:
        response = client.post("/v1/classify/batch", json={"texts": ["Net sales rose."] * 100})
        assert client.get("/healthz").status_code == 200
    assert response.status_code == 413
    assert "1024 bytes" in response.json()["error"]["message"]
    assert response.json()["request_id"] == response.headers["x-request-id"]


def test_a_chunked_body_over_the_limit_is_413_too(serving_settings: Settings, guard: PIIGuard) -> None:
    body = json.dumps({"texts": ["Net sales rose."] * 100}).encode()
    chunks = (body[i:i + 256] for i in range(0, len(body), 256))  # no Content-Length: counted as it streams
    with make_client(with_serving(serving_settings, max_body_bytes=1024), guard) as client:
        response = client.post("/v1/classify/batch", content=chunks, headers={"content-type": "application/json"})
    assert response.status_code == 413, response.text
    assert "1024 bytes" in response.json()["error"]["message"]


def _faulty(settings: Settings, **serving: object) -> Settings:
    """Settings whose model fails every call (the real serving.faults switch)."""
    faults = settings.serving.faults.model_copy(update={"rate": 1.0})
    return with_serving(settings, faults=faults.model_dump(), **serving)


def test_injected_model_failures_open_the_breaker_and_the_baseline_answers(
    serving_settings: Settings, guard: PIIGuard
) -> None:
    settings = _faulty(serving_settings)
    with make_client(settings, guard) as client:
        wait_ready(client)
        answers = [client.post("/v1/classify", json={"text": f"Net sales rose {i} %."}) for i in range(7)]
        ready = client.get("/readyz")
        snapshot = client.get("/metrics/json").json()
    assert all(a.status_code == 200 and a.json()["degraded"] for a in answers)
    assert answers[-1].json()["model"]["name"] == "tfidf-logistic_regression"
    assert ready.status_code == 503 and ready.json()["breaker"] == "open"
    assert snapshot["serving"]["breaker"]["state"] == "open"
    assert snapshot["fallbacks"] == {"model_error": 5, "breaker_open": 2}
    faults = snapshot["serving"]["faults"]  # what a load test times recovery from
    assert faults["injected"] == 5 and 0 <= faults["last_fault_age_s"] < 30


def test_fail_fast_mode_answers_503_with_retry_after(serving_settings: Settings, guard: PIIGuard) -> None:
    settings = _faulty(serving_settings, degraded_mode="fail")
    with make_client(settings, guard) as client:
        wait_ready(client)
        response = client.post("/v1/classify", json={"text": "Net sales rose."})
        batch = client.post("/v1/classify/batch", json={"texts": ["Net sales rose.", "Profit fell."]})
    assert response.status_code == 503 and batch.status_code == 503
    assert response.json()["error"]["code"] == "model_unavailable"
    assert int(response.headers["retry-after"]) >= 1


def test_full_queue_answers_503_with_retry_after(serving_settings: Settings, guard: PIIGuard) -> None:
    faults = serving_settings.serving.faults.model_copy(update={"delay_ms": 400}).model_dump()
    settings = with_serving(serving_settings, max_batch_items=2, max_document_sentences=2, queue_size=2,
                            micro_batch_size=1, faults=faults)
    with make_client(settings, guard) as client:
        wait_ready(client)
        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(lambda i: client.post("/v1/classify/batch", json={"texts": ["a b", "c d"]}),
                                    range(6)))
        assert client.get("/healthz").status_code == 200
    codes = sorted(a.status_code for a in answers)
    assert 200 in codes and 503 in codes
    refused = next(a for a in answers if a.status_code == 503)
    assert refused.json()["error"]["code"] == "overloaded" and int(refused.headers["retry-after"]) >= 1


def test_metrics_in_prometheus_and_json(client: TestClient) -> None:
    client.post("/v1/classify", json={"text": PII_TEXT})
    text = client.get("/metrics")
    snapshot = client.get("/metrics/json").json()
    assert text.headers["content-type"].startswith("text/plain")
    assert 'fintune_requests_total{outcome="ok"} 1.0' in text.text
    assert "fintune_pii_detections_total" in text.text
    assert snapshot["requests"]["total"] == 1 and snapshot["serving"]["batching"]["items"] == 1
    assert snapshot["request_id"]
    stages = snapshot["serving"]["stage_seconds"]
    assert stages["texts"] == 1 and stages["guard_s"] > 0 and 0 < stages["guard_share"] < 1
    assert snapshot["serving"]["faults"] is None  # serving.faults is off


@pytest.mark.parametrize(
    ("spans", "expected"),
    [
        ([], "aaaa bbbb"),  # the last whitespace before the limit
        ([(5, 14)], "aaaa"),  # a span across the limit moves the cut before it
        ([(7, 9), (8, 14)], "aaaa"),  # overlapping spans: before both
    ],
)
def test_cut_sentence_never_splits_a_span(spans: list[tuple[int, int]], expected: str) -> None:
    from types import SimpleNamespace

    from fintune.serving.documents import cut_sentence

    found = [SimpleNamespace(start=a, end=b) for a, b in spans]
    assert cut_sentence("aaaa bbbb cccc dddd", 12, found) == expected
    assert cut_sentence("short", 12, found) == "short"


@pytest.mark.parametrize(
    ("spans", "expected"),
    [
        ([], ["aaaa bbbb", "cccc dddd"]),
        ([(5, 14)], ["aaaa", "bbbb cccc", "dddd"]),  # the span stays in one piece
        ([(0, 14)], ["aaaa bbbb cccc", "dddd"]),  # a value longer than the limit stays whole (then refused)
    ],
)
def test_split_long_keeps_every_character_and_every_span_whole(
    spans: list[tuple[int, int]], expected: list[str]
) -> None:
    from types import SimpleNamespace

    from fintune.serving.documents import split_long

    found = [SimpleNamespace(start=a, end=b) for a, b in spans]
    assert split_long("aaaa bbbb cccc dddd", 12, found) == expected


def test_requests_abandoned_by_their_clients_cost_no_model_time(serving_settings: Settings, guard: PIIGuard) -> None:
    """Over real HTTP (uvicorn on loopback): clients that time out are cancelled before their text is batched."""
    import time

    import httpx
    from serving_helpers import start_in_thread

    from fintune.serving import create_app

    class SlowModel(KeywordClassifier):
        def classify(self, texts: list[str]) -> list[Prediction]:
            time.sleep(1.0)  # far longer than it takes the server to notice a client left
            return super().classify(texts)

    model, settings = SlowModel(), with_serving(serving_settings, micro_batch_size=1)
    app = create_app(settings, classifier=model, guard=guard, monitor=SystemMonitor(settings.monitoring))
    server, thread = start_in_thread(app)
    url = f"http://127.0.0.1:{server.config.port}/v1/classify"
    try:
        assert httpx.post(url, json={"text": "warm-up"}, timeout=30).status_code == 200

        def give_up(i: int) -> None:
            with pytest.raises(httpx.TimeoutException):
                httpx.post(url, json={"text": f"abandoned {i}"}, timeout=0.2)

        with ThreadPoolExecutor(4) as pool:
            list(pool.map(give_up, range(4)))
        assert httpx.post(url, json={"text": "Net sales rose."}, timeout=30).json()["label"] == "positive"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    abandoned = [text for text in model.seen if text.startswith("abandoned")]
    assert len(abandoned) <= 1, abandoned  # at most the one already in the model when its client left


def test_a_model_that_fails_to_load_at_boot_is_loaded_again_and_served(
    serving_settings: Settings, guard: PIIGuard
) -> None:
    recovery = serving_settings.reliability.recovery.model_copy(update={"oom_backoff_s": 0.5})  # then 1 s
    settings = serving_settings.model_copy(update={"reliability": serving_settings.reliability.model_copy(
        update={"recovery": recovery})})
    attempts: list[int] = []

    def flaky_loader() -> KeywordClassifier:
        attempts.append(1)
        if len(attempts) < 3:
            raise MemoryError("out of memory while loading")  # a transient failure at boot
        return KeywordClassifier()

    with make_client(settings, guard, classifier=flaky_loader) as client:
        services = client.app.state.services  # type: ignore[attr-defined]
        client.portal.call(services.wait_until_loaded)  # the first attempt
        first = client.post("/v1/classify", json={"text": "Net sales rose."}).json()

        async def loaded() -> None:
            await asyncio.shield(services._model_task)

        client.portal.call(loaded)  # until the retries have loaded it
        ready = client.get("/readyz")
        answer = client.post("/v1/classify", json={"text": "Net sales rose."}).json()
    assert first["degraded"] is True  # answered from the baseline meanwhile
    assert len(attempts) == 3 and ready.status_code == 200
    assert answer["degraded"] is False and answer["label"] == "positive"


def test_shutdown_does_not_wait_for_a_model_still_loading(serving_settings: Settings, guard: PIIGuard) -> None:
    import threading
    import time

    from serving_helpers import start_in_thread

    from fintune.serving import create_app

    release = threading.Event()

    def slow_loader() -> KeywordClassifier:
        release.wait(timeout=30)  # a multi-minute load, as far as this test can tell
        return KeywordClassifier()

    app = create_app(serving_settings, classifier=slow_loader, guard=guard,
                     monitor=SystemMonitor(serving_settings.monitoring))
    server, thread = start_in_thread(app)
    try:
        started = time.perf_counter()
        server.should_exit = True
        thread.join(timeout=20)
        stopped_in = time.perf_counter() - started
    finally:
        release.set()
    assert not thread.is_alive() and stopped_in < 10, stopped_in  # not the 30 s the load would take


def spike_check_pipeline(serving_settings: Settings, guard: PIIGuard) -> tuple[Any, Callable[[float, bool], None]]:
    """An offline pipeline whose spike check learns from 10 latencies, and a function recording ten answers of
    the given latency (by the model, or degraded) and then running one model call, which runs the check."""
    from fintune.serving.pipeline import ItemOutcome
    from fintune.serving.service import offline_pipeline

    recovery = serving_settings.reliability.recovery.model_copy(update={"latency_window": 10,
                                                                       "latency_min_samples": 10})
    settings = serving_settings.model_copy(update={"reliability": serving_settings.reliability.model_copy(
        update={"recovery": recovery})})
    pipeline = offline_pipeline(settings, KeywordClassifier())
    guarded = guard.redact("Net sales rose.")
    answer = Prediction("positive", 0.9, {"positive": 0.9, "neutral": 0.05, "negative": 0.05})

    def answers(latency_s: float, degraded: bool = False) -> None:
        for _ in range(10):
            pipeline.record(ItemOutcome(prediction=answer, guardrail=guarded, degraded=degraded), latency_s)
        pipeline.process_batch(["Net sales rose."])

    return pipeline, answers


def test_the_latency_spike_baseline_is_learned_from_model_answers_only(
    serving_settings: Settings, guard: PIIGuard
) -> None:
    pipeline, answers = spike_check_pipeline(serving_settings, guard)
    for _ in range(5):  # the baseline's answers while the model was away take a millisecond
        answers(0.001, True)
    answers(0.2)
    assert pipeline.describe()["latency_baseline_p95_s"] == pytest.approx(0.2)  # not 0.001


def test_after_a_reload_the_latency_baseline_is_learned_from_the_new_model(
    serving_settings: Settings, guard: PIIGuard
) -> None:
    pipeline, model_answers = spike_check_pipeline(serving_settings, guard)
    model_answers(0.1)
    assert pipeline.describe()["latency_baseline_p95_s"] == pytest.approx(0.1)
    model_answers(1.0)  # memory pressure slows the model down, then it runs out of memory and is reloaded
    assert pipeline.slot.recovery is not None and pipeline.slot.recovery.reload("out of memory").succeeded
    pipeline.process_batch(["Net sales rose."])  # the first check after the reload: the old latencies are gone
    assert pipeline.describe()["latency_baseline_p95_s"] is None  # was 1.0, learned from the slow spell
    model_answers(0.1)
    assert pipeline.describe()["latency_baseline_p95_s"] == pytest.approx(0.1)


def test_an_unusable_drift_baseline_turns_drift_off_with_a_warning_and_requests_are_answered(
    serving_settings: Settings, guard: PIIGuard, caplog: pytest.LogCaptureFixture
) -> None:
    from fintune.monitoring import BASELINE_FILENAME
    from fintune.serving.model_adapter import model_dir

    folder = model_dir(serving_settings)
    folder.mkdir(parents=True, exist_ok=True)  # a negative count used to make every request past the 5th a 500
    counts = {"negative": -1, "neutral": 5, "positive": 5}
    (folder / BASELINE_FILENAME).write_text(json.dumps({"labels": ["negative", "neutral", "positive"],
                                                        "counts": counts}))
    monitoring = serving_settings.monitoring.model_copy(update={"drift_min_samples": 5, "drift_window": 5})
    with make_client(serving_settings.model_copy(update={"monitoring": monitoring}), guard) as client:
        wait_ready(client)
        codes = {client.post("/v1/classify", json={"text": "Net sales rose."}).status_code for _ in range(10)}
        drift = client.get("/metrics/json").json()["drift"]
    assert codes == {200} and drift["state"] == "no_baseline"
    warned = [r for r in caplog.records if "drift detection is off" in r.getMessage()]
    assert warned and warned[0].levelname == "WARNING" and "not negative" in warned[0].getMessage()


def test_drift_reaches_the_webhook_with_numbers_only(serving_settings: Settings, guard: PIIGuard) -> None:
    import http.server
    import threading

    from fintune.monitoring import DriftBaseline

    received: list[dict] = []

    class Receiver(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (the http.server name)
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monitoring = serving_settings.monitoring.model_copy(update={
        "drift_webhook_url": SecretStr(f"http://127.0.0.1:{server.server_port}/hooks/drift?token=s3cret"),
        "drift_min_samples": 20, "drift_window": 20})
    settings = serving_settings.model_copy(update={"monitoring": monitoring})
    try:
        with make_client(settings, guard) as client:
            wait_ready(client)
            services = client.app.state.services  # type: ignore[attr-defined]
            # the model was validated on mostly neutral sentences; now every answer is positive
            services.monitor.set_drift_baseline(DriftBaseline(("negative", "neutral", "positive"), (10, 80, 10)))
            for _ in range(25):
                client.post("/v1/classify", json={"text": "Net sales rose, mail ir@example.com."})
            deadline = time.monotonic() + 10  # the POST runs in a thread of its own
            while not received and time.monotonic() < deadline:
                time.sleep(0.05)
    finally:
        server.shutdown()
    assert len(received) == 1  # once per episode
    alert = received[0]
    assert alert["event"] == "prediction_drift" and alert["service"]["model"] == "keyword-test-model"
    assert alert["report"]["state"] == "drifted" and alert["report"]["kl"] > 0.15
    assert alert["report"]["current"]["positive"] == 1.0 and "example.com" not in json.dumps(alert)


def test_after_out_of_memory_the_reload_runs_aside_and_requests_are_answered_degraded_meanwhile(
    serving_settings: Settings, guard: PIIGuard
) -> None:
    reloaded = threading.Event()

    class RunsOutOfMemoryOnce(KeywordClassifier):
        def classify(self, texts: list[str]) -> list[Prediction]:
            raise MemoryError("CUDA out of memory")

    def loader() -> KeywordClassifier:
        if not loads:
            loads.append("first")
            return RunsOutOfMemoryOnce()
        time.sleep(1.0)  # loading weights again takes a while
        loads.append("reloaded")
        reloaded.set()
        return KeywordClassifier()

    loads: list[str] = []
    with make_client(serving_settings, guard, classifier=loader) as client:
        wait_ready(client)
        failing = client.post("/v1/classify", json={"text": "Net sales rose."}).json()
        during = client.post("/v1/classify", json={"text": "Net sales rose."}).json()
        readiness = client.get("/readyz")
        answered_before_the_reload = not reloaded.is_set()
        assert reloaded.wait(timeout=30)
        deadline = time.monotonic() + 10
        after = client.post("/v1/classify", json={"text": "Net sales rose."}).json()
        while after["degraded"] and time.monotonic() < deadline:
            time.sleep(0.05)
            after = client.post("/v1/classify", json={"text": "Net sales rose."}).json()
    assert failing["degraded"] and during["degraded"] and answered_before_the_reload  # nobody waited for it
    assert readiness.status_code == 503 and readiness.json()["model"] == "reloading"  # take me out of rotation
    assert after["degraded"] is False and after["label"] == "positive" and loads == ["first", "reloaded"]


def test_a_reloaded_models_fault_injector_goes_on_counting(serving_settings: Settings) -> None:
    from fintune.serving.model_adapter import FaultInjectingClassifier, InjectedFault

    faults = serving_settings.serving.faults.model_copy(update={"rate": 1.0, "start_s": 0.0})
    first = FaultInjectingClassifier(KeywordClassifier(), faults, clock=lambda: 100.0)
    with pytest.raises(InjectedFault):
        first.classify(["Net sales rose."])
    reloaded = FaultInjectingClassifier(KeywordClassifier(), faults, clock=lambda: 103.0, previous=first)
    assert reloaded.describe() == {"injected": 1, "last_fault_age_s": 3.0}  # not a fresh count after a reload

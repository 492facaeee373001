"""Schemathesis against the OpenAPI schema, in-process over ASGI: whatever it sends, no 5xx.

The app runs with its lifespan (schemathesis' ASGI transport starts it) and the keyword classifier at the model
edge; guard, breaker, batcher and baseline are real. Bounded: a few examples per operation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from serving_helpers import KeywordClassifier, tiny_settings

from fintune.guardrails import PIIGuard
from fintune.monitoring import SystemMonitor
from fintune.serving import create_app


@pytest.fixture
def api_schema(tmp_path: Path, write_phrasebank: Any, guard: PIIGuard) -> Any:
    """The service's OpenAPI schema, loaded from the app itself."""
    serving_settings = tiny_settings(write_phrasebank(tmp_path / "data"), tmp_path)
    app = create_app(serving_settings, classifier=KeywordClassifier(), guard=guard,
                     monitor=SystemMonitor(serving_settings.monitoring))
    return schemathesis.openapi.from_asgi("/openapi.json", app)


# schemathesis.pytest.from_fixture breaks on pytest 9 (it reads Function._nodeid), so the operations are
# walked here with a hypothesis test per operation.
def test_no_server_error_whatever_the_input(api_schema: Any) -> None:
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/classify", "/v1/classify/batch", "/v1/analyze", "/readyz"}
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=25, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def no_5xx(case: Any) -> None:
            case.call_and_validate(checks=[not_a_server_error])

        no_5xx()
    batching = api_schema.app.state.services.batcher.stats
    assert batching.items > 10  # the generated bodies did reach the model, not only the validation


def test_schema_documents_auth_errors_and_unique_operations(api_schema: Any) -> None:
    raw = api_schema.raw_schema
    assert set(raw["components"]["securitySchemes"]) == {"ApiKey", "Bearer"}
    api_key, bearer = raw["components"]["securitySchemes"]["ApiKey"], raw["components"]["securitySchemes"]["Bearer"]
    assert (api_key["type"], api_key["in"], api_key["name"]) == ("apiKey", "header", "X-API-Key")
    assert (bearer["type"], bearer["scheme"]) == ("http", "bearer")
    operations = [(path, method, op) for path, item in raw["paths"].items() for method, op in item.items()]
    ids = [op["operationId"] for _, _, op in operations]
    assert len(ids) == len(set(ids)), f"duplicate operationIds: {sorted(i for i in ids if ids.count(i) > 1)}"
    assert {("/healthz", "head"), ("/readyz", "head")} <= {(path, method) for path, method, _ in operations}
    for path, method, op in operations:
        secured = {name for requirement in op.get("security", []) for name in requirement}
        assert secured == ({"ApiKey", "Bearer"} if path.startswith("/v1/") else set()), (path, method)
        if path.startswith("/v1/"):
            assert {"400", "401", "413", "415", "422", "503"} <= set(op["responses"]), (path, op["responses"])
            assert "Retry-After" in op["responses"]["503"]["headers"]
            assert "unsupported_media_type" in op["responses"]["415"]["description"]
    snapshot = raw["paths"]["/metrics/json"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert snapshot == {"$ref": "#/components/schemas/MetricsSnapshot"}
    undocumented = [
        f"{name}.{field}"
        for name, model in raw["components"]["schemas"].items()
        if name not in {"HTTPValidationError", "ValidationError"}
        for field, spec in model.get("properties", {}).items()
        if "description" not in spec
    ]
    assert undocumented == []


def test_schema_states_the_limits_and_each_endpoints_own_errors(api_schema: Any) -> None:
    raw, serving = api_schema.raw_schema, api_schema.app.state.services.settings.serving
    schemas = raw["components"]["schemas"]
    text, document = schemas["ClassifyRequest"]["properties"]["text"], schemas["AnalyzeRequest"]["properties"]["text"]
    texts = schemas["BatchRequest"]["properties"]["texts"]
    assert (text["minLength"], text["maxLength"]) == (1, serving.max_text_chars)
    assert (document["minLength"], document["maxLength"]) == (1, serving.max_document_chars)
    assert (texts["minItems"], texts["maxItems"]) == (1, serving.max_batch_items)
    responses = {path: item["post"]["responses"] for path, item in raw["paths"].items() if path.startswith("/v1/")}
    assert "invalid_output" in responses["/v1/classify"]["502"]["description"]
    assert "502" not in responses["/v1/classify/batch"]  # a bad model output is that item's error in a 200
    assert "batch" in responses["/v1/classify/batch"]["422"]["description"]
    assert "batch" not in responses["/v1/classify"]["422"]["description"]
    assert "max_document_sentences" in responses["/v1/analyze"]["422"]["description"]

"""The HTTP service: FastAPI app factory, routers, micro-batching, degraded mode, security and limits.

Layout (FastAPI's "bigger applications")::

    app.py            create_app(settings, classifier=, guard=, breaker=, monitor=, fallback=) and lifespan
    service.py        Services: the parts of one app and the request operations the routers call
    pipeline.py       validate -> PII guard -> breaker-wrapped model -> output checks -> monitor
    batching.py       MicroBatcher: dynamic micro-batches off the event loop, bounded queue
    model_adapter.py  BatchClassifier protocol; the one place that meets fintune.model and the baselines
    security.py       API key, body size limit, request id
    documents.py      sentence splitting and the /v1/analyze aggregate
    schemas.py        request and response bodies
    dependencies.py   FastAPI dependencies
    routers/          classify, analyze, health, metrics

Nothing outside ``fintune.serving`` and ``fintune.cli`` imports this package.
"""

from fintune.serving.app import app_from_env, create_app

__all__ = ["app_from_env", "create_app"]

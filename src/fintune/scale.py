"""Classification spread over a Ray cluster, for corpora that one process classifies too slowly.

This module owns the fan-out: it cuts a list of texts into chunks, hands them to a pool of Ray actors (each one
replica of a pipeline, built once in its own process by a picklable factory) and yields their records back in
input order. It knows nothing about HTTP or about what the pipeline does: ``fintune classify --engine ray``
passes the offline pipeline of :mod:`fintune.serving.service`, so a record is the same whichever engine made it.

Ray (https://docs.ray.io/en/latest/ray-core/actors.html) does the distributed work: scheduling actors on the
cluster's CPUs, shipping chunks and records, and fault tolerance. An actor whose process dies (out of memory, a
lost node) is restarted up to ``scale.max_restarts`` times and the chunk it held is re-run on the new process
(``max_restarts`` / ``max_task_retries``), so a crash loses nothing; an error the pipeline raises on purpose
(a :class:`~fintune.errors.FinTuneError`, such as a missing model) is a business error, never retried, and reaches
the caller as itself. Without ``scale.address`` a private Ray instance starts on this machine for the run.
"""

from __future__ import annotations

import logging
import math
import socket
from collections.abc import Callable, Generator, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from fintune.config import ScaleSettings
from fintune.errors import FinTuneError, ScaleError

logger = logging.getLogger(__name__)

Records = list[dict[str, Any]]
"""JSON-ready records, one per text, in the order of the texts."""

BatchClassifier = Callable[[list[str]], Records]
"""What a replica runs on each chunk."""

ClassifierFactory = Callable[[], BatchClassifier]
"""Builds a replica's classifier in the actor's process; it is pickled, so it must carry everything it needs."""

_RAY_HINT = "install it with `pip install -e '.[scale]'` (or `pip install ray`)"


class PipelineReplica:
    """One Ray actor's classifier, built by the factory when its first chunk arrives."""

    def __init__(self, factory: ClassifierFactory) -> None:
        self._factory = factory
        self._classify: BatchClassifier | None = None

    def classify(self, texts: list[str]) -> Records:
        """The records of one chunk (the first call also builds the classifier, loading the model)."""
        if self._classify is None:
            self._classify = self._factory()
        return self._classify(texts)


@contextmanager
def ray_cluster(settings: ScaleSettings) -> Iterator[None]:
    """Join the cluster at ``settings.address``, or start a private local instance; a Ray already initialised
    in this process is used as it is. Only an instance started here is shut down on exit."""
    ray = _import_ray()
    if ray.is_initialized():
        yield
        return
    try:
        _check_reachable(settings)
        ray.init(address=settings.address, include_dashboard=False, logging_level=logging.WARNING)
    except (ConnectionError, ValueError) as exc:  # ValueError: Ray's word for a ray:// without ray[client], say
        raise ScaleError(
            f"cannot reach the Ray cluster at {settings.address!r} ({exc}); start one with `ray start --head`, "
            "fix scale.address (FINTUNE_SCALE__ADDRESS), or unset it to run on this machine"
        ) from exc
    try:
        yield
    finally:
        ray.shutdown()


def _check_reachable(settings: ScaleSettings) -> None:
    """ConnectionError unless the cluster at a ``HOST:PORT`` or ``ray://HOST:PORT`` address accepts a connection
    within ``connect_timeout_s``: ``ray.init`` would retry an unreachable one for minutes."""
    if settings.address in (None, "auto", "local"):
        return
    host, _, port = settings.address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=settings.connect_timeout_s).close()
    except OSError as exc:
        raise ConnectionError(f"nothing accepted a connection there within {settings.connect_timeout_s} s: "
                              f"{exc.strerror or exc}") from exc


def classify_on_ray(
    texts: Sequence[str], factory: ClassifierFactory, settings: ScaleSettings
) -> Generator[Records, None, None]:
    """The records of ``texts``, one list per chunk of ``settings.chunk_size``, in input order, computed by up to
    ``settings.actors`` replicas. Needs Ray initialised (:func:`ray_cluster`)."""
    ray = _import_ray()
    from ray.util import ActorPool

    chunks = [list(texts[start : start + settings.chunk_size]) for start in range(0, len(texts), settings.chunk_size)]
    if not chunks:
        return
    replica_class = ray.remote(
        num_cpus=settings.cpus_per_actor, max_restarts=settings.max_restarts, max_task_retries=settings.max_restarts
    )(PipelineReplica)
    replicas = [replica_class.remote(factory) for _ in range(replicas_for(settings, len(texts)))]
    try:
        yield from _gathered(ActorPool(replicas).map(lambda replica, chunk: replica.classify.remote(chunk), chunks),
                             settings)
    finally:
        for replica in replicas:
            ray.kill(replica)


def replicas_for(settings: ScaleSettings, texts: int) -> int:
    """How many replicas :func:`classify_on_ray` starts for ``texts`` texts: what the cluster holds, at most one
    a chunk (needs Ray initialised)."""
    return min(replica_count(settings), math.ceil(texts / settings.chunk_size))


def replica_count(settings: ScaleSettings) -> int:
    """How many of ``settings.actors`` replicas the cluster's nodes can hold at once, counted node by node (a
    replica runs on one node, and one that fits nowhere would wait forever); ScaleError when not even one fits."""
    ray = _import_ray()
    node_cpus = [float(node.get("Resources", {}).get("CPU", 0)) for node in ray.nodes() if node.get("Alive")]
    fits = sum(math.floor(cpus / settings.cpus_per_actor + 1e-9) for cpus in node_cpus)
    if fits < 1:
        raise ScaleError(
            f"no node of the Ray cluster has the CPUs of one replica, scale.cpus_per_actor "
            f"({settings.cpus_per_actor:g}; the largest has {max(node_cpus, default=0):g}): lower it or add "
            "larger nodes"
        )
    if fits < settings.actors:
        logger.warning("the Ray cluster holds %d replicas of %g CPUs, not the %d asked for: running %d",
                       fits, settings.cpus_per_actor, settings.actors, fits)
    return min(fits, settings.actors)


def _gathered(results: Iterator[Records], settings: ScaleSettings) -> Iterator[Records]:
    """Ray's results with its errors translated: the pipeline's own errors as themselves, a replica that kept
    dying as a ScaleError."""
    ray = _import_ray()
    try:
        yield from results
    except ray.exceptions.RayTaskError as exc:
        if isinstance(exc.cause, FinTuneError):
            raise exc.cause from None
        raise ScaleError(f"a pipeline replica failed on its chunk: {exc.cause!r}") from exc
    except ray.exceptions.RayActorError as exc:
        raise ScaleError(
            f"a pipeline replica died more than scale.max_restarts ({settings.max_restarts}) times (out of memory? "
            "a lost node?); its Ray logs are under /tmp/ray/session_latest/logs on that node"
        ) from exc


def _import_ray() -> Any:
    """The ray module; ScaleError saying how to install it when it is missing."""
    try:
        import ray
    except ImportError as exc:
        raise ScaleError(f"the Ray engine needs Ray, which is not installed: {_RAY_HINT}") from exc
    return ray

"""Circuit-breaker overhead and the drift rule's false-alarm rate; writes benchmarks/results/breaker_overhead.json.

Measures, on this machine:

* the latency of a rejected call while the breaker is OPEN (the issue asks for "well under 1 ms"), sync and
  asyncio, as p50/p99 over many single calls timed with ``perf_counter_ns``;
* the overhead the breaker adds to a successful call while CLOSED (breaker.call(f) minus f());
* how often a window drawn from the baseline itself gives KL(current || baseline) above the 0.15 threshold
  at 10 and at 100 predictions, with and without the default smoothing (the reason for the 100 minimum);
* with ``--redis-url``, the first two again for a breaker whose state lives in that Redis (``RedisStorage``,
  one lock, read and write per step), on a fresh key. The Redis is reached before anything is measured, so a
  wrong URL fails at once.

Run: ``.venv/bin/python benchmarks/breaker_overhead.py [--redis-url redis://127.0.0.1:6379/0] [--output F]``
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
from _args import positive_int  # benchmarks/_args.py, beside this script

from fintune.config import MonitoringSettings, ReliabilitySettings
from fintune.errors import CircuitOpenError, ConfigError, FinTuneError
from fintune.evaluation import write_json
from fintune.monitoring.drift import kl_divergence, smoothed
from fintune.provenance import command_line, mask_url_password, provenance
from fintune.reliability import BreakerStorage, CircuitBreaker, RedisStorage

RESULT = Path(__file__).parent / "results" / "breaker_overhead.json"
BASELINE_SHARES = (0.12, 0.60, 0.28)  # about Financial PhraseBank's negative / neutral / positive shares
PACKAGES = ("fintune", "numpy", "prometheus-client", "redis")


def _summary_us(samples_ns: list[int]) -> dict[str, float]:
    """p50 / p99 / max of nanosecond samples, in microseconds."""
    arr = np.asarray(samples_ns) / 1000
    p50, p99 = np.percentile(arr, [50, 99])
    return {"p50_us": round(float(p50), 2), "p99_us": round(float(p99), 2), "max_us": round(float(arr.max()), 2),
            "calls": len(samples_ns)}


def open_breaker(storage: BreakerStorage | None = None) -> CircuitBreaker:
    """A breaker tripped by five real failures (default settings)."""
    breaker = CircuitBreaker.from_settings(ReliabilitySettings(), storage=storage)
    for _ in range(5):
        with contextlib.suppress(ZeroDivisionError):
            breaker.call(lambda: 1 / 0)
    return breaker


def rejection_latency(calls: int, storage: BreakerStorage | None = None) -> dict[str, float]:
    """Time single rejected calls while OPEN."""
    breaker, samples = open_breaker(storage), []
    for _ in range(calls):
        start = time.perf_counter_ns()
        with contextlib.suppress(CircuitOpenError):
            breaker.call(lambda: None)
        samples.append(time.perf_counter_ns() - start)
    return _summary_us(samples)


def rejection_latency_async(calls: int) -> dict[str, float]:
    """Time single rejected ``await breaker.call_async`` calls while OPEN."""

    async def noop() -> None:
        """The guarded coroutine (never reached: the breaker is open)."""
        return None

    async def run() -> list[int]:
        """Time the rejections inside one event loop."""
        breaker, samples = open_breaker(), []
        for _ in range(calls):
            start = time.perf_counter_ns()
            with contextlib.suppress(CircuitOpenError):
                await breaker.call_async(noop)
            samples.append(time.perf_counter_ns() - start)
        return samples

    return _summary_us(asyncio.run(run()))


def closed_overhead(calls: int, storage: BreakerStorage | None = None) -> dict[str, float]:
    """Median cost of breaker.call(f) minus f() for a trivial f while CLOSED."""
    breaker = CircuitBreaker.from_settings(ReliabilitySettings(), storage=storage)
    bare, guarded = [], []
    for _ in range(calls):
        start = time.perf_counter_ns()
        abs(-1)
        bare.append(time.perf_counter_ns() - start)
        start = time.perf_counter_ns()
        breaker.call(abs, -1)
        guarded.append(time.perf_counter_ns() - start)
    bare_p50, guarded_p50 = _summary_us(bare)["p50_us"], _summary_us(guarded)["p50_us"]
    return {"bare_p50_us": bare_p50, "guarded_p50_us": guarded_p50,
            "overhead_p50_us": round(guarded_p50 - bare_p50, 2)}


def false_alarm_rate(n: int, smoothing: float, trials: int, seed: int) -> float:
    """Share of windows of n baseline-drawn predictions whose KL(current || baseline) exceeds 0.15."""
    rng = random.Random(seed)
    threshold = MonitoringSettings().drift_threshold
    q = smoothed([s * 1000 for s in BASELINE_SHARES], smoothing)
    alarms = 0
    for _ in range(trials):
        draw = rng.choices(range(3), weights=BASELINE_SHARES, k=n)
        counts = [draw.count(i) for i in range(3)]
        p = smoothed(counts, smoothing) if smoothing else [c / n for c in counts]
        alarms += kl_divergence(p, q) > threshold
    return alarms / trials


def redis_server(url: str) -> dict[str, Any]:
    """The ``INFO server`` of the Redis at ``url``; ConfigError saying what to fix when the client is missing or
    that Redis cannot be reached."""
    try:
        import redis
    except ImportError:
        raise ConfigError("--redis-url needs redis-py: pip install 'fintune[redis]'") from None
    try:
        client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
        client.ping()
        return client.info("server")
    except (ValueError, redis.RedisError) as exc:
        raise ConfigError(f"cannot reach Redis at --redis-url {mask_url_password(url)} ({exc}); start it "
                          "(redis-server --port 6390 --bind 127.0.0.1) or fix the URL") from None


def redis_figures(url: str, calls: int, server: dict[str, Any]) -> dict[str, Any]:
    """Rejection latency and CLOSED overhead of a breaker on the Redis at ``url`` (fresh keys, removed after)."""
    import redis

    stamp = time.time_ns()
    keys = [f"fintune:benchmark:{stamp}:{what}" for what in ("open", "closed")]
    try:
        return {
            "url": mask_url_password(url), "redis_version": server.get("redis_version"),
            "rejection_while_open": rejection_latency(calls, RedisStorage.from_url(url, keys[0])),
            "closed_call_overhead": closed_overhead(calls, RedisStorage.from_url(url, keys[1])),
        }
    finally:
        redis.Redis.from_url(url).delete(*keys, *(f"{key}:lock" for key in keys))


def build_parser() -> argparse.ArgumentParser:
    """The command line's options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=positive_int, default=100_000, help="timed calls per latency measurement")
    parser.add_argument("--trials", type=positive_int, default=20_000, help="simulated windows per false-alarm rate")
    parser.add_argument("--redis-url", default=None, help="also time a breaker stored in this Redis")
    parser.add_argument("--redis-calls", type=positive_int, default=5_000, help="timed calls per Redis measurement")
    parser.add_argument("--output", type=Path, default=RESULT,
                        help="Where to write the JSON (default: benchmarks/results/breaker_overhead.json).")
    return parser


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Every figure with its provenance; Redis is reached first, so a wrong --redis-url fails before the rest."""
    server = redis_server(args.redis_url) if args.redis_url else None
    smoothing = MonitoringSettings().drift_smoothing
    result: dict[str, Any] = {
        "provenance": provenance(command_line(keep_path=True), packages=PACKAGES),
        "rejection_while_open": rejection_latency(args.calls),
        "rejection_while_open_async": rejection_latency_async(args.calls),
        "closed_call_overhead": closed_overhead(args.calls),
        "drift_false_alarm_rate": {
            "baseline_shares": BASELINE_SHARES,
            "threshold": MonitoringSettings().drift_threshold,
            "trials": args.trials,
            "seed": 0,
            **{f"n{n}_smoothing_{a}": false_alarm_rate(n, a, args.trials, seed=0)
               for n in (10, 100) for a in (0.0, smoothing)},
        },
    }
    if server is not None:
        result["redis_storage"] = redis_figures(args.redis_url, args.redis_calls, server)
    return result


def main() -> None:
    """Run every measurement and write the result file; a configuration error ends in one line and exit code 2."""
    parser = build_parser()
    args = parser.parse_args()
    try:
        result = measure(args)
        write_json(args.output, result)
    except (FinTuneError, OSError) as exc:
        parser.exit(2, f"error: {exc}\n")
    print(json.dumps(result, indent=2))
    print(f"written to {args.output}")


if __name__ == "__main__":
    main()

"""Load benchmark of the HTTP service; writes benchmarks/results/serving_load.json.

Starts the real service (``fintune serve`` under uvicorn, one worker, on a loopback port) and drives it with
closed-loop clients (each sends ``POST /v1/classify`` with the next Financial PhraseBank test sentence as soon as
its previous answer arrives). Measures, per profile and number of concurrent clients:

* throughput (answers/s), latency p50 / p95 / p99 as the client sees it, answers by status, degraded answers;
* the share of the service's batch time spent in the PII guard (from ``/metrics/json``'s ``stage_seconds``);
* dynamic micro-batching (``serving.micro_batch_size``, default 32) against batch size 1 at 32 clients;
* a fault run: 32 clients for 60 s while the model raises on a share of its batch calls for a while
  (``serving.faults``); every request must be answered (a label, degraded or not, or an explicit error
  status with a JSON body: nothing lost), and ``/readyz`` must say healthy again within the breaker's
  recovery timeout after the last fault.

Clients and server share this machine's cores, as they would on one small host.

Writes a plot of throughput and latency against clients beside the result file (``--plot-only RESULT`` redraws
it from a result file without measuring).

Run: ``.venv/bin/python benchmarks/serving_load.py`` (needs the trained models in ``outputs/models/<profile>``:
``fintune train --profile cpu`` and ``fintune train --profile encoder``; without one the service serves the
untrained base, which the result file says).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import matplotlib.pyplot as plt
import numpy as np

from fintune.config import load_settings
from fintune.data import load_splits
from fintune.evaluation import save_figure
from fintune.provenance import provenance

RESULT = Path(__file__).parent / "results" / "serving_load.json"
LOG_DIR = Path(__file__).resolve().parents[1] / "outputs" / "benchmarks" / "serving_load"


@dataclass
class Tally:
    """What the clients of one load level saw."""

    latencies_s: list[float] = field(default_factory=list)
    statuses: Counter[str] = field(default_factory=Counter)
    degraded: int = 0
    lost: int = 0
    lost_reasons: Counter[str] = field(default_factory=Counter)

    def summary(self, seconds: float) -> dict[str, Any]:
        """JSON-ready figures of the level."""
        answered = sum(self.statuses.values())
        ms = np.asarray(self.latencies_s) * 1000 if self.latencies_s else np.zeros(1)
        return {
            "seconds": round(seconds, 2),
            "requests": answered + self.lost,
            "answered": answered,
            "throughput_rps": round(answered / seconds, 2),
            "p50_ms": round(float(np.percentile(ms, 50)), 1),
            "p95_ms": round(float(np.percentile(ms, 95)), 1),
            "p99_ms": round(float(np.percentile(ms, 99)), 1),
            "statuses": dict(sorted(self.statuses.items())),
            "degraded": self.degraded,
            "lost": self.lost,
            "lost_reasons": dict(self.lost_reasons),
        }


# ---- the server ------------------------------------------------------------------------------------------------
def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def service(profile: str, log_name: str, **overrides: str) -> Iterator[str]:
    """`fintune serve --profile P` on a free loopback port with FINTUNE_* overrides; yields its URL when ready."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FINTUNE_")}
    env |= {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "FINTUNE_SERVING__ACCESS_LOG": "false"}
    env |= {f"FINTUNE_{k.upper()}": v for k, v in overrides.items()}
    port = free_port()
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    command = [str(Path(sys.executable).parent / "fintune"), "serve", "--profile", profile, "--port", str(port)]
    with (LOG_DIR / f"{log_name}.log").open("wb") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, process)
        yield url
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(120)


def wait_ready(url: str, process: subprocess.Popen[bytes], timeout_s: float = 300.0) -> None:
    """Poll /readyz until 200; RuntimeError when the server dies or never gets ready."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}; see {LOG_DIR}")
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the server was not ready after {timeout_s} s; see {LOG_DIR}")


# ---- the clients -----------------------------------------------------------------------------------------------
async def drive(url: str, texts: list[str], clients: int, seconds: float) -> tuple[Tally, float]:
    """``clients`` closed-loop clients for ``seconds``; every request is counted as answered or lost."""
    tally = Tally()
    stop_at = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as client:
        started = time.perf_counter()
        await asyncio.gather(*(one_client(client, texts, i, clients, stop_at, tally) for i in range(clients)))
        elapsed = time.perf_counter() - started
    return tally, elapsed


async def one_client(
    client: httpx.AsyncClient, texts: list[str], index: int, stride: int, stop_at: float, tally: Tally
) -> None:
    """Send sentences index, index + stride, ... until ``stop_at``."""
    i = index
    while time.perf_counter() < stop_at:
        text = texts[i % len(texts)]
        i += stride
        sent = time.perf_counter()
        try:
            response = await client.post("/v1/classify", json={"text": text})
        except httpx.HTTPError as exc:
            tally.lost += 1
            tally.lost_reasons[type(exc).__name__] += 1
            continue
        tally.latencies_s.append(time.perf_counter() - sent)
        record_answer(response, tally)


def record_answer(response: httpx.Response, tally: Tally) -> None:
    """Count an answer; one without a label or an explicit JSON error body counts as lost."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if response.status_code == 200 and isinstance(body, dict) and body.get("label"):
        tally.statuses["200"] += 1
        tally.degraded += bool(body.get("degraded"))
    elif isinstance(body, dict) and ("error" in body or "detail" in body):
        tally.statuses[str(response.status_code)] += 1
    else:
        tally.lost += 1
        tally.lost_reasons[f"http {response.status_code} without an error body"] += 1


def stage_seconds(url: str) -> dict[str, float]:
    """The service's cumulative per-stage batch timings."""
    return httpx.get(url + "/metrics/json", timeout=10).json()["serving"]["stage_seconds"]


def guard_share(before: dict[str, float], after: dict[str, float]) -> float:
    """Share of the batch time spent in the PII guard between two snapshots."""
    parts = {k: after[k] - before[k] for k in ("guard_s", "model_s", "checks_s")}
    total = sum(parts.values())
    return round(parts["guard_s"] / total, 4) if total > 0 else 0.0


def measure_level(url: str, texts: list[str], clients: int, seconds: float) -> dict[str, Any]:
    """One load level after a short warm-up, with the guard's share and mean batch size of the level."""
    asyncio.run(drive(url, texts, clients, min(3.0, seconds)))
    before = stage_seconds(url)
    tally, elapsed = asyncio.run(drive(url, texts, clients, seconds))
    after = stage_seconds(url)
    batches = after["batches"] - before["batches"]
    summary = tally.summary(elapsed) | {"clients": clients, "guard_share": guard_share(before, after)}
    summary["mean_batch_size"] = round((after["texts"] - before["texts"]) / batches, 2) if batches else 0.0
    print(f"  {clients:>2} clients: {summary['throughput_rps']:7.1f} req/s, p50 {summary['p50_ms']:.0f} ms, "
          f"p99 {summary['p99_ms']:.0f} ms, batch {summary['mean_batch_size']}, lost {summary['lost']}", flush=True)
    return summary


def served_model(url: str) -> dict[str, Any]:
    """Which model the service answers with (name, profile, version)."""
    body = httpx.post(url + "/v1/classify", json={"text": "Net sales rose 5 %."}, timeout=120).json()
    return body["model"] | {"degraded": body["degraded"]}


# ---- scenarios -------------------------------------------------------------------------------------------------
def profile_levels(profile: str, texts: list[str], levels: list[int], seconds: float, **overrides: str) -> dict:
    """Throughput and latency of one profile at each number of clients."""
    name = f"{profile}-batch{overrides.get('serving__micro_batch_size', 'default')}"
    print(f"{name}:", flush=True)
    with service(profile, name, **overrides) as url:
        model = served_model(url)
        return {"model": model, "overrides": overrides,
                "levels": [measure_level(url, texts, n, seconds) for n in levels]}


async def poll_ready(url: str, stop: asyncio.Event, transitions: list[tuple[float, int]], t0: float) -> None:
    """Record every change of /readyz's status code, with seconds since ``t0``."""
    last = None
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        while not stop.is_set():
            try:
                code = (await client.get("/readyz")).status_code
            except httpx.HTTPError:
                code = 0
            if code != last:
                transitions.append((round(time.perf_counter() - t0, 2), code))
                last = code
            await asyncio.sleep(0.25)


async def fault_load(url: str, texts: list[str], clients: int, seconds: float, settle_s: float) -> dict[str, Any]:
    """The load with /readyz polled throughout and for ``settle_s`` afterwards."""
    stop = asyncio.Event()
    transitions: list[tuple[float, int]] = []
    t0 = time.perf_counter()
    poller = asyncio.create_task(poll_ready(url, stop, transitions, t0))
    tally, elapsed = await drive(url, texts, clients, seconds)
    deadline = time.perf_counter() + settle_s
    while time.perf_counter() < deadline and (not transitions or transitions[-1][1] != 200):
        await asyncio.sleep(0.25)
    stop.set()
    await poller
    return {"tally": tally.summary(elapsed) | {"clients": clients}, "readyz_transitions": transitions}


def fault_run(profile: str, texts: list[str], clients: int, seconds: float, rate: float,
              start_s: float, stop_s: float, **common: str) -> dict[str, Any]:
    """60 s at 32 clients while the model fails a share of its batches between start_s and stop_s."""
    recovery_timeout = load_settings(profile).reliability.recovery_timeout_s
    print(f"fault run: {profile}, {clients} clients, {seconds:.0f} s, faults {rate:.0%} of model calls "
          f"from {start_s:.0f} s to {stop_s:.0f} s after ready", flush=True)
    overrides = common | {"serving__faults__rate": str(rate), "serving__faults__start_s": str(start_s),
                 "serving__faults__stop_s": str(stop_s), "serving__faults__seed": "7"}
    with service(profile, f"{profile}-faults", **overrides) as url:
        ready_at = time.perf_counter()  # faults are counted from the moment the model got ready (about now)
        result = asyncio.run(fault_load(url, texts, clients, seconds, settle_s=recovery_timeout + 30))
        offset = round(time.perf_counter() - ready_at - result["tally"]["seconds"], 2)
        snapshot = httpx.get(url + "/metrics/json", timeout=10).json()
    return summarise_faults(result, snapshot, offset, recovery_timeout, rate, start_s, stop_s)


def summarise_faults(result: dict[str, Any], snapshot: dict[str, Any], offset: float, recovery_timeout: float,
                     rate: float, start_s: float, stop_s: float) -> dict[str, Any]:
    """The fault run's figures: lost requests and the time from the last fault to /readyz 200."""
    transitions = result["readyz_transitions"]
    # readyz times are since the load began; faults are timed from readiness, which came ~offset s earlier
    last_fault_s = stop_s - max(offset, 0.0)
    back = [t for t, code in transitions if code == 200 and t >= last_fault_s]
    healthy_after = round(back[0] - last_fault_s, 2) if back else None
    unhealthy = [t for t, code in transitions if code != 200]
    print(f"  lost {result['tally']['lost']}, readyz {transitions}, healthy {healthy_after} s after the last fault",
          flush=True)
    return {
        "faults": {"rate": rate, "start_s": start_s, "stop_s": stop_s, "seed": 7},
        **result,
        "breaker_recovery_timeout_s": recovery_timeout,
        "breaker_opened": bool(unhealthy),
        "healthy_after_last_fault_s": healthy_after,
        "healthy_within_recovery_timeout": healthy_after is not None and healthy_after <= recovery_timeout,
        "breaker": snapshot["serving"]["breaker"],
        "errors": snapshot.get("errors", {}),
        "fallbacks": snapshot.get("fallbacks", {}),
    }


def main() -> None:
    """Run the scenarios and write the result file."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profiles", nargs="+", default=["cpu", "encoder"], help="Profiles measured per level.")
    parser.add_argument("--levels", nargs="+", type=int, default=[1, 8, 32], help="Concurrent clients.")
    parser.add_argument("--seconds", type=float, default=20.0, help="Length of each load level.")
    parser.add_argument("--fault-seconds", type=float, default=60.0, help="Length of the fault run (0: skip).")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="A setting for every service started, as FINTUNE_<KEY> (model__inference__dtype=float32).")
    parser.add_argument("--output", type=Path, default=RESULT, help="Result JSON; its plot goes beside it (.png).")
    parser.add_argument("--plot-only", type=Path, metavar="RESULT",
                        help="Only redraw the plot of an existing result file (beside it), measuring nothing.")
    args = parser.parse_args()
    if args.plot_only is not None:
        result = json.loads(args.plot_only.read_text(encoding="utf-8"))
        print(f"drawn to {plot_load(result, args.plot_only.with_suffix('.png'))}")
        return
    if any("=" not in item for item in args.overrides):
        parser.error("--set takes KEY=VALUE, e.g. --set model__inference__dtype=float32")
    common = dict(item.split("=", 1) for item in args.overrides)
    settings = load_settings("cpu")
    splits = load_splits(settings)
    texts = [ex.text for ex in splits.test]
    result: dict[str, Any] = {
        "provenance": provenance("python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
                                 packages=("fintune", "torch", "transformers", "fastapi", "uvicorn", "httpx")),
        "data": {"subset": splits.subset, "fingerprint": splits.fingerprint, "sentences": len(texts),
                 "split": "test"},
        "setup": {"server": "fintune serve, 1 uvicorn worker, loopback, access log off",
                  "clients": "closed loop, httpx.AsyncClient in one process on the same 2 cores",
                  "level_seconds": args.seconds, "warmup_seconds": min(3.0, args.seconds), "overrides": common},
        "profiles": {},
    }
    for profile in args.profiles:
        result["profiles"][profile] = profile_levels(profile, texts, args.levels, args.seconds, **common)
    top = max(args.levels)
    unbatched = profile_levels("cpu", texts, [top], args.seconds, **common | {"serving__micro_batch_size": "1"})
    result["unbatched_cpu"] = unbatched
    if "cpu" in result["profiles"]:
        result["batching_gain"] = batching_gain(result["profiles"]["cpu"], unbatched, top)
    if args.fault_seconds > 0:
        result["fault_run"] = fault_run("cpu", texts, top, args.fault_seconds, rate=0.5, start_s=10.0, stop_s=25.0,
                                        **common)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"written to {args.output} and {plot_load(result, args.output.with_suffix('.png'))}")


def plot_load(result: dict[str, Any], path: Path) -> Path:
    """Throughput and p50 / p99 latency against concurrent clients per profile, batch size 1 as a cross."""
    fig, (rate_ax, latency_ax) = plt.subplots(1, 2, figsize=(9.5, 3.8), dpi=120)
    for profile, measured in result["profiles"].items():
        clients = [level["clients"] for level in measured["levels"]]
        (line,) = rate_ax.plot(clients, [lv["throughput_rps"] for lv in measured["levels"]], marker="o", label=profile)
        for key, style in (("p50_ms", "-"), ("p99_ms", ":")):
            latency_ax.plot(clients, [level[key] for level in measured["levels"]], style, marker="o",
                            color=line.get_color(), label=f"{profile} {key[:3]}")
    if "unbatched_cpu" in result:
        level = result["unbatched_cpu"]["levels"][0]
        rate_ax.plot([level["clients"]], [level["throughput_rps"]], "kx", markersize=9, label="cpu, batch size 1")
        latency_ax.plot([level["clients"]], [level["p99_ms"]], "kx", markersize=9, label="cpu, batch size 1, p99")
    rate_ax.set(xscale="log", xlabel="concurrent clients", ylabel="answers / s", title="throughput", ylim=(0, None))
    latency_ax.set(xscale="log", yscale="log", xlabel="concurrent clients", ylabel="ms", title="latency")
    machine, date = result["provenance"]["machine"], result["provenance"]["date"][:10]
    fig.suptitle(f"FinTune service under closed-loop load ({machine['cpu']}, {machine['cores']} cores, {date})",
                 fontsize=10)
    ticks = sorted({level["clients"] for measured in result["profiles"].values() for level in measured["levels"]})
    for ax in (rate_ax, latency_ax):
        ax.set_xticks(ticks)
        ax.get_xaxis().set_major_formatter(plt.ScalarFormatter())
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return save_figure(fig, path)


def batching_gain(batched: dict[str, Any], unbatched: dict[str, Any], clients: int) -> dict[str, Any]:
    """Throughput ratio and p99 of dynamic batching vs batch size 1 at ``clients`` clients."""
    b = next(level for level in batched["levels"] if level["clients"] == clients)
    u = unbatched["levels"][0]
    return {
        "clients": clients,
        "throughput_ratio": round(b["throughput_rps"] / u["throughput_rps"], 2) if u["throughput_rps"] else None,
        "p99_ms_batched": b["p99_ms"],
        "p99_ms_batch_size_1": u["p99_ms"],
        "lower_p99": b["p99_ms"] < u["p99_ms"],
    }


if __name__ == "__main__":
    main()

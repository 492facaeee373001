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
  recovery timeout after the last fault actually injected (faults are drawn on model calls only, and an OPEN
  breaker makes none: the service's ``/metrics/json`` tells how long ago the last one was).

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
from _args import non_negative_float, positive_float, positive_int  # benchmarks/_args.py

from fintune.config import check_override_names, load_settings
from fintune.data import load_splits
from fintune.errors import ArtifactError, FinTuneError
from fintune.evaluation import save_figure, write_json
from fintune.provenance import command_line, provenance

RESULT = Path(__file__).parent / "results" / "serving_load.json"
LOG_DIR = Path(__file__).resolve().parents[1] / "outputs" / "benchmarks" / "serving_load"
PACKAGES = ("fintune", "torch", "transformers", "fastapi", "uvicorn", "httpx")


class ServiceStartError(RuntimeError):
    """A service started for the benchmark exited or never got ready (its log says why)."""


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
        return {
            "seconds": round(seconds, 2),
            "requests": answered + self.lost,
            "answered": answered,
            "throughput_rps": round(answered / seconds, 2),
            **self.percentiles(),
            "statuses": dict(sorted(self.statuses.items())),
            "degraded": self.degraded,
            "lost": self.lost,
            "lost_reasons": dict(self.lost_reasons),
        }

    def percentiles(self) -> dict[str, float | None]:
        """p50 / p95 / p99 latency in ms; None each when no request got an answer to time."""
        if not self.latencies_s:
            return {"p50_ms": None, "p95_ms": None, "p99_ms": None}
        values = np.percentile(np.asarray(self.latencies_s) * 1000, [50, 95, 99])
        return {f"p{q}_ms": round(float(v), 1) for q, v in zip((50, 95, 99), values, strict=True)}


# ---- the server ------------------------------------------------------------------------------------------------
def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def service(profile: str, log_name: str, **overrides: str) -> Iterator[str]:
    """`fintune serve --profile P` on a free loopback port with FINTUNE_* overrides (over this process's own
    FINTUNE_* variables, which the provenance records and the server therefore gets too); yields its URL when
    ready."""
    env = dict(os.environ)
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
    """Poll /readyz until 200; ServiceStartError when the server dies or never gets ready."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ServiceStartError(f"the server exited with {process.returncode}; see its log in {LOG_DIR}")
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise ServiceStartError(f"the server was not ready after {timeout_s} s; see its log in {LOG_DIR}")


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
    print(f"  {clients:>2} clients: {summary['throughput_rps']:7.1f} req/s, p50 {summary['p50_ms']} ms, "
          f"p99 {summary['p99_ms']} ms, batch {summary['mean_batch_size']}, lost {summary['lost']}", flush=True)
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


async def fault_load(
    url: str, texts: list[str], clients: int, seconds: float, settle_s: float
) -> tuple[dict[str, Any], float]:
    """The load with /readyz polled throughout and for ``settle_s`` afterwards, and when it began (``t0``, on
    ``time.perf_counter``: the /readyz transitions are seconds since then)."""
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
    return {"tally": tally.summary(elapsed) | {"clients": clients}, "readyz_transitions": transitions}, t0


def metrics_snapshot(url: str, t0: float) -> tuple[dict[str, Any], float]:
    """GET /metrics/json, and when it was read: seconds since ``t0``, the middle of the request."""
    sent = time.perf_counter()
    body = httpx.get(url + "/metrics/json", timeout=10).json()
    return body, round((sent + time.perf_counter()) / 2 - t0, 3)


def fault_run(profile: str, texts: list[str], clients: int, seconds: float, faults: dict[str, float],
              trial_slack_s: float = 1.0, **common: str) -> dict[str, Any]:
    """``seconds`` at ``clients`` clients while the model fails a share (``faults["rate"]``) of its batches between
    ``faults["start_s"]`` and ``faults["stop_s"]`` after it got ready."""
    print(f"fault run: {profile}, {clients} clients, {seconds:.0f} s, faults {faults['rate']:.0%} of model calls "
          f"from {faults['start_s']:.0f} s to {faults['stop_s']:.0f} s after ready", flush=True)
    overrides = common | {f"serving__faults__{key}": str(value) for key, value in faults.items()}
    with service(profile, f"{profile}-faults", **overrides) as url:
        ready_at = time.perf_counter()  # faults are counted from the moment the model got ready (about now)
        model = served_model(url)
        # the server's own timeout: --set and FINTUNE_* overrides included, which this process's settings lack
        recovery_timeout = httpx.get(url + "/metrics/json", timeout=10).json()["serving"]["breaker"][
            "recovery_timeout_s"]
        result, t0 = asyncio.run(fault_load(url, texts, clients, seconds, settle_s=recovery_timeout + 30))
        # after the load no model call is made, so the snapshot's last fault is the run's last
        snapshot, read_at_s = metrics_snapshot(url, t0)
    summary = summarise_faults(result, snapshot, read_at_s, round(t0 - ready_at, 2), recovery_timeout, faults,
                               trial_slack_s)
    return {"model": model, **summary}


def last_fault_at(snapshot: dict[str, Any], read_at_s: float) -> float | None:
    """When the last injected fault came, in seconds since the load began: the snapshot's ``serving.faults``
    age of it, back from when the snapshot was read; None when injection is off or injected nothing."""
    seen = snapshot.get("serving", {}).get("faults")
    if not seen or seen.get("last_fault_age_s") is None:
        return None
    return round(read_at_s - seen["last_fault_age_s"], 2)


def healthy_after(transitions: list[tuple[float, int]], moment_s: float | None) -> float | None:
    """Seconds from ``moment_s`` until /readyz said 200 for good (0 when it already did then and stayed so); None
    without a moment, or when /readyz did not end at 200."""
    if moment_s is None or not transitions or transitions[-1][1] != 200:
        return None
    return round(max(transitions[-1][0] - moment_s, 0.0), 2)


def breaker_openings(breaker: dict[str, Any]) -> int:
    """How many times the breaker went OPEN (from CLOSED or HALF_OPEN), from its snapshot's transition counts."""
    return sum(count for change, count in breaker.get("transitions", {}).items() if change.endswith("->open"))


def summarise_faults(result: dict[str, Any], snapshot: dict[str, Any], read_at_s: float, offset: float,
                     recovery_timeout: float, faults: dict[str, float], trial_slack_s: float = 1.0) -> dict[str, Any]:
    """The fault run's figures: lost requests, the breaker's openings and the time from the last fault actually
    injected (and from the end of the fault window) to /readyz 200 for good.

    An OPEN breaker lets a trial call through only once ``recovery_timeout`` has passed, so /readyz can say 200
    no sooner than that after the fault that opened it; ``trial_slack_s`` allows for that trial call and the
    0.25 s /readyz poll on top of the timeout ("healthy again within the recovery timeout")."""
    transitions = result["readyz_transitions"]
    # readyz times are since the load began; the fault window is timed from readiness, offset s earlier
    last_fault_s = last_fault_at(snapshot, read_at_s)
    after_last = healthy_after(transitions, last_fault_s)
    breaker = snapshot["serving"]["breaker"]
    seen = snapshot["serving"].get("faults") or {}
    print(f"  lost {result['tally']['lost']}, readyz {transitions}, last fault at {last_fault_s} s, healthy "
          f"{after_last} s after it", flush=True)
    return {
        "faults": dict(faults),
        **result,
        "load_offset_s": offset,
        "faults_injected": seen.get("injected"),
        "last_fault_s": last_fault_s,
        "breaker_recovery_timeout_s": recovery_timeout,
        "breaker_opened": breaker_openings(breaker) > 0,
        "breaker_openings": breaker_openings(breaker),
        "healthy_after_last_fault_s": after_last,
        "healthy_after_fault_window_s": healthy_after(transitions, faults["stop_s"] - offset),
        "seconds_past_recovery_timeout": None if after_last is None else round(after_last - recovery_timeout, 2),
        "trial_slack_s": trial_slack_s,
        "healthy_within_recovery_timeout": None if last_fault_s is None
        else after_last is not None and after_last <= recovery_timeout + trial_slack_s,
        "breaker": breaker,
        "errors": snapshot.get("errors", {}),
        "fallbacks": snapshot.get("fallbacks", {}),
    }


def build_parser() -> argparse.ArgumentParser:
    """The command line's options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profiles", nargs="+", default=["cpu", "encoder"],
                        help="Profiles measured per level. A cpu run at batch size 1 (at the most clients) always "
                        "happens too, and so does a cpu fault run unless --fault-seconds is 0.")
    parser.add_argument("--levels", nargs="+", type=positive_int, default=[1, 8, 32], help="Concurrent clients.")
    parser.add_argument("--seconds", type=positive_float, default=20.0, help="Length of each load level.")
    parser.add_argument("--fault-seconds", type=non_negative_float, default=60.0,
                        help="Length of the fault run (0: skip it).")
    parser.add_argument("--fault-only", action="store_true",
                        help="Only the cpu fault run: no load levels, no batch-size-1 run.")
    parser.add_argument("--trial-slack", type=non_negative_float, default=1.0, metavar="SECONDS",
                        help="Seconds past the breaker's recovery timeout still counted as healthy within it: the "
                        "trial call the timeout lets through, and the /readyz poll.")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="A setting for every service started, as FINTUNE_<KEY> (model__inference__dtype=float32).")
    parser.add_argument("--output", type=Path, default=RESULT, help="Result JSON; its plot goes beside it (.png).")
    parser.add_argument("--plot-only", type=Path, metavar="RESULT",
                        help="Only redraw the plot of an existing result file (beside it), measuring nothing.")
    return parser


def main() -> None:
    """Run the scenarios and write the result file; a configuration error ends in one line and exit code 2."""
    parser = build_parser()
    args = parser.parse_args()
    if any("=" not in item for item in args.overrides):
        parser.error("--set takes KEY=VALUE, e.g. --set model__inference__dtype=float32")
    if args.fault_only and args.fault_seconds == 0:
        parser.error("--fault-only with --fault-seconds 0 measures nothing")
    try:
        if args.plot_only is not None:
            print(f"drawn to {plot_load(read_result(args.plot_only), args.plot_only.with_suffix('.png'))}")
            return
        common = dict(item.split("=", 1) for item in args.overrides)
        check_override_names(f"FINTUNE_{key.upper()}" for key in common)
        for profile in {*args.profiles, "cpu"}:  # a typo fails here, not after minutes of measuring
            load_settings(profile)
        result = measure(args, common)
        write_json(args.output, result)
        plotted = "" if args.fault_only else f" and {plot_load(result, args.output.with_suffix('.png'))}"
        print(f"written to {args.output}{plotted}")
    except (FinTuneError, OSError, ServiceStartError) as exc:
        parser.exit(2, f"error: {exc}\n")


def read_result(path: Path) -> dict[str, Any]:
    """A result file written by this script; ArtifactError when it is not one."""
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ArtifactError(f"{path} is not JSON ({exc}); pass a result file of this script") from None
    if not isinstance(result, dict) or not {"provenance", "profiles"} <= result.keys():
        raise ArtifactError(f"{path} holds no 'provenance' and 'profiles': not a result file of this script")
    if not result["profiles"]:  # a --fault-only run: two empty axes and exit 0 otherwise
        raise ArtifactError(f"{path} holds no load levels (a --fault-only run): there is nothing to plot")
    return result


def measure(args: argparse.Namespace, common: dict[str, str]) -> dict[str, Any]:
    """Every scenario's figures with their provenance."""
    settings = load_settings("cpu")
    splits = load_splits(settings)
    texts = [ex.text for ex in splits.test]
    result: dict[str, Any] = {
        "provenance": provenance(command_line(keep_path=True), packages=PACKAGES),
        "data": {"subset": splits.subset, "fingerprint": splits.fingerprint, "sentences": len(texts),
                 "split": "test"},
        "setup": {"server": "fintune serve, 1 uvicorn worker, loopback, access log off",
                  "clients": f"closed loop, httpx.AsyncClient in one process on the same {os.cpu_count()} cores",
                  "level_seconds": args.seconds, "warmup_seconds": min(3.0, args.seconds), "overrides": common},
        "profiles": {},
    }
    top = max(args.levels)
    if not args.fault_only:
        for profile in args.profiles:
            result["profiles"][profile] = profile_levels(profile, texts, args.levels, args.seconds, **common)
        unbatched = profile_levels("cpu", texts, [top], args.seconds, **common | {"serving__micro_batch_size": "1"})
        result["unbatched_cpu"] = unbatched
        if "cpu" in result["profiles"]:
            result["batching_gain"] = batching_gain(result["profiles"]["cpu"], unbatched, top)
    if args.fault_seconds > 0:
        faults = {"rate": 0.5, "start_s": 10.0, "stop_s": 25.0, "seed": 7}
        result["fault_run"] = fault_run("cpu", texts, top, args.fault_seconds, faults, args.trial_slack, **common)
    return result


def plot_load(result: dict[str, Any], path: Path) -> Path:
    """Throughput and p50 / p99 latency against concurrent clients per profile, batch size 1 as a cross."""
    fig, (rate_ax, latency_ax) = plt.subplots(1, 2, figsize=(9.5, 3.8), dpi=120)
    for profile, measured in result["profiles"].items():
        clients = [level["clients"] for level in measured["levels"]]
        (line,) = rate_ax.plot(clients, [lv["throughput_rps"] for lv in measured["levels"]], marker="o", label=profile)
        for key, style in (("p50_ms", "-"), ("p99_ms", ":")):
            latency_ax.plot(clients, _floats(level[key] for level in measured["levels"]), style, marker="o",
                            color=line.get_color(), label=f"{profile} {key[:3]}")
    if "unbatched_cpu" in result:
        level = result["unbatched_cpu"]["levels"][0]
        rate_ax.plot([level["clients"]], [level["throughput_rps"]], "kx", markersize=9, label="cpu, batch size 1")
        latency_ax.plot([level["clients"]], _floats([level["p99_ms"]]), "kx", markersize=9,
                        label="cpu, batch size 1, p99")
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


def _floats(values: Any) -> list[float]:
    """``values`` as floats for a plot, None (no answer timed) as NaN (a gap)."""
    return [np.nan if value is None else float(value) for value in values]


def batching_gain(batched: dict[str, Any], unbatched: dict[str, Any], clients: int) -> dict[str, Any]:
    """Throughput ratio and p99 of dynamic batching vs batch size 1 at ``clients`` clients."""
    b = next(level for level in batched["levels"] if level["clients"] == clients)
    u = unbatched["levels"][0]
    return {
        "clients": clients,
        "throughput_ratio": round(b["throughput_rps"] / u["throughput_rps"], 2) if u["throughput_rps"] else None,
        "p99_ms_batched": b["p99_ms"],
        "p99_ms_batch_size_1": u["p99_ms"],
        "lower_p99": None if b["p99_ms"] is None or u["p99_ms"] is None else b["p99_ms"] < u["p99_ms"],
    }


if __name__ == "__main__":
    main()

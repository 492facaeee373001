"""fintune.scale on a real local Ray instance: records in input order from several replicas, a replica's crash
survived without losing a text, business errors passed through as themselves, and the CLI's Ray engine writing
what the local engine writes."""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import ray
from ray import cloudpickle

from fintune.cli import main
from fintune.config import ScaleSettings
from fintune.errors import ArtifactError, ScaleError
from fintune.scale import Records, classify_on_ray, ray_cluster, replica_count

# The factories below are defined here, in a module Ray's workers cannot import: ship them by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

PII_TEXT = "Call John at 212-555-0198 about card 4111 1111 1111 1111."


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    """One private Ray instance of 2 CPUs for the module (ray_cluster joins it instead of starting another)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no reporting home from a test run
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    try:
        yield
    finally:
        ray.shutdown()


class TaggingClassifier:
    """A replica that tags each text with its process id; with a marker path, the first replica to get a chunk
    dies (the whole process, as out-of-memory kills it) before answering; the chunk holding ``slow_text`` is late."""

    def __init__(self, crash_marker: Path | None = None, slow_text: str | None = None) -> None:
        self.crash_marker = crash_marker
        self.slow_text = slow_text

    def __call__(self) -> Callable[[list[str]], Records]:
        pid = os.getpid()

        def classify(texts: list[str]) -> Records:
            if self.slow_text in texts:
                time.sleep(0.5)  # its chunk comes back after later ones
            if self.crash_marker is not None and not self.crash_marker.exists():
                self.crash_marker.touch()
                os._exit(1)
            return [{"text": text, "pid": pid} for text in texts]

        return classify


class MissingModel:
    """A replica whose model is not there."""

    def __call__(self) -> Callable[[list[str]], Records]:
        raise ArtifactError("outputs/models/x holds no trained model: train it first")


def test_replicas_answer_in_input_order(local_ray: None) -> None:
    texts = [f"sentence {i}" for i in range(20)]
    chunks = list(classify_on_ray(texts, TaggingClassifier(slow_text="sentence 0"),
                                  ScaleSettings(actors=2, chunk_size=3)))
    assert [len(c) for c in chunks] == [3] * 6 + [2]
    assert [r["text"] for c in chunks for r in c] == texts
    assert len({r["pid"] for c in chunks for r in c}) == 2  # both replicas worked
    assert list(classify_on_ray([], TaggingClassifier(), ScaleSettings())) == []


def test_a_replica_that_dies_is_restarted_and_loses_nothing(local_ray: None, tmp_path: Path) -> None:
    marker = tmp_path / "crashed"
    texts = [f"sentence {i}" for i in range(12)]
    settings = ScaleSettings(actors=2, chunk_size=2, max_restarts=1)
    records = [r for c in classify_on_ray(texts, TaggingClassifier(marker), settings) for r in c]
    assert marker.exists()  # one replica did die mid-chunk
    assert [r["text"] for r in records] == texts


def test_the_pipelines_own_errors_arrive_as_themselves(local_ray: None) -> None:
    with pytest.raises(ArtifactError, match="holds no trained model"):
        list(classify_on_ray(["a", "b"], MissingModel(), ScaleSettings(actors=1)))


def test_replicas_are_capped_by_the_clusters_cpus(local_ray: None) -> None:
    assert replica_count(ScaleSettings(actors=5, cpus_per_actor=1)) == 2
    assert replica_count(ScaleSettings(actors=1, cpus_per_actor=2)) == 1
    with pytest.raises(ScaleError, match="no node of the Ray cluster .* the largest has 2"):
        replica_count(ScaleSettings(cpus_per_actor=3))


def test_replicas_are_counted_node_by_node(local_ray: None, monkeypatch: pytest.MonkeyPatch) -> None:
    nodes = [{"Alive": True, "Resources": {"CPU": 3.0}}, {"Alive": True, "Resources": {"CPU": 3.0}},
             {"Alive": False, "Resources": {"CPU": 8.0}}]
    monkeypatch.setattr(ray, "nodes", lambda: nodes)  # the edge of the world: a cluster of three machines
    assert replica_count(ScaleSettings(actors=3, cpus_per_actor=2)) == 2  # 6 CPUs, but 2 per node hold one each
    assert replica_count(ScaleSettings(actors=8, cpus_per_actor=1)) == 6  # the dead node counts for nothing


def closed_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.parametrize("form", ["127.0.0.1:{port}", "ray://127.0.0.1:{port}"])
def test_an_unreachable_cluster_says_what_to_do(monkeypatch: pytest.MonkeyPatch, form: str) -> None:
    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # as a fresh process, though this one may hold Ray
    address = form.format(port=closed_port())
    started = time.monotonic()  # ray.init retried such an address for minutes, and ray:// lacked ray[client]
    with pytest.raises(ScaleError, match="nothing accepted a connection.*ray start --head"), \
            ray_cluster(ScaleSettings(address=address, connect_timeout_s=2.0)):
        pass
    assert time.monotonic() - started < 60


@pytest.mark.parametrize("address", ["localhost", "ray://host", "10.0.0.9", "http://10.0.0.9:6379"])
def test_an_address_ray_cannot_take_is_refused_by_the_settings(address: str) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="must be 'auto', 'ray://HOST:PORT'"):  # was Ray's ValueError
        ScaleSettings(address=address)
    assert ScaleSettings(address="ray://[::1]:10001").address == "ray://[::1]:10001"


def test_the_cli_refuses_a_bad_ray_address_in_one_line(
    capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("FINTUNE_OUTPUT_DIR", str(tmp_path / "out"))
    (tmp_path / "in.txt").write_text("Net sales rose.\n")
    code = main(["classify", "--engine", "ray", "--ray-address", "localhost", "--input", str(tmp_path / "in.txt"),
                 "--output", str(tmp_path / "out.jsonl")])
    err = capfd.readouterr().err
    assert code == 2 and "error: --ray-address: must be 'auto'" in err and "Traceback" not in err


@pytest.mark.slow
def test_the_cli_ray_engine_writes_what_the_local_engine_writes(
    local_ray: None, monkeypatch: pytest.MonkeyPatch, tiny_data_dir: Path, tmp_path: Path
) -> None:
    monkeypatch.setenv("FINTUNE_DATA_DIR", str(tiny_data_dir))
    monkeypatch.setenv("FINTUNE_OUTPUT_DIR", str(tmp_path / "out"))
    monkeypatch.setenv("FINTUNE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("FINTUNE_SCALE__CHUNK_SIZE", "2")
    texts = ["Net sales rose 5 %.", PII_TEXT, " ", "Operating profit fell.", "The report is out on 3 April."]
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(t) + "\n" for t in texts), encoding="utf-8")
    outputs = {}
    for engine in ("local", "ray"):
        outputs[engine] = tmp_path / f"{engine}.jsonl"
        args = ["classify", "--profile", "tiny-mistral", "--input", str(source), "--output", str(outputs[engine])]
        assert main([*args, "--engine", engine, *(["--actors", "2"] if engine == "ray" else [])]) == 0
    local, distributed = ([json.loads(line) for line in p.read_text().splitlines()] for p in outputs.values())
    assert [r["id"] for r in distributed] == [r["id"] for r in local] == ["1", "2", "3", "4", "5"]
    assert distributed[2]["error"]["code"] == "invalid_input"
    for mine, theirs in zip(distributed, local, strict=True):
        assert mine.get("label") == theirs.get("label") and mine.get("guardrail") == theirs.get("guardrail")
        for label, score in (theirs.get("scores") or {}).items():
            assert mine["scores"][label] == pytest.approx(score, abs=1e-4)
    assert "4111 1111 1111 1111" not in outputs["ray"].read_text() and distributed[1]["guardrail"]["pii_count"] == 2

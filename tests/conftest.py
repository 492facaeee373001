"""Shared fixtures: offline hub, the shared Financial PhraseBank (skip when absent), a tiny PhraseBank on disk, a
real redis-server on loopback (skip when absent)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

# Nothing may need the Hugging Face hub at test time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from fintune.data import SHARED_DATA_DIR  # noqa: E402

TINY_SENTENCES = {
    "negative": "Operating profit fell to EUR {n}.{m} mn from EUR {k}.0 mn in the corresponding period .",
    "neutral": "The company will publish its interim report for period {n} on {m} April .",
    "positive": "Net sales increased by {n} % to EUR {k}.{m} mn , the company said .",
}


@pytest.fixture(autouse=True)
def _isolated_fintune_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No FINTUNE_* variable from the developer's shell leaks into a test."""
    for name in list(os.environ):
        if name.startswith("FINTUNE_"):
            monkeypatch.delenv(name)


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """The real Financial PhraseBank beside the project; the test is skipped when it is absent."""
    if not (SHARED_DATA_DIR / "Sentences_50Agree.txt").is_file():
        pytest.skip(f"Financial PhraseBank is not at {SHARED_DATA_DIR} (CC BY-NC-SA: read by path, never committed)")
    return SHARED_DATA_DIR


def write_tiny_phrasebank(folder: Path, per_label: int = 20) -> Path:
    """A small, well-formed PhraseBank in the original format and encodings, for unit tests."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = [
        f"{template.format(n=i + 1, m=(i * 7) % 10, k=i + 30)}@{label}"
        for label, template in TINY_SENTENCES.items()
        for i in range(per_label)
    ]
    lines.append("Kone 's order intake in Q3 was flat , said Hämäläinen .@neutral")  # a non-ASCII name
    body = "\n".join(lines) + "\n"
    for name in ("Sentences_50Agree.txt", "Sentences_66Agree.txt", "Sentences_75Agree.txt"):
        (folder / name).write_bytes(body.encode("iso-8859-1"))
    (folder / "Sentences_AllAgree.txt").write_bytes(body.encode("utf-8"))
    return folder


@pytest.fixture
def tiny_data_dir(tmp_path: Path) -> Path:
    """A folder holding a tiny PhraseBank (61 unique sentences per subset)."""
    return write_tiny_phrasebank(tmp_path / "phrasebank")


RedisStarter = Callable[[int, Path], "subprocess.Popen[bytes]"]


@pytest.fixture(scope="session")
def start_redis() -> RedisStarter:
    """A function starting a real redis-server on 127.0.0.1:port (no persistence) once it answers PING; the test
    is skipped when redis-server or redis-py is not installed."""
    redis = pytest.importorskip("redis", reason="the shared breaker needs redis-py: pip install 'fintune[redis]'")
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed (Debian: apt-get install redis-server)")

    def start(port: int, folder: Path) -> subprocess.Popen[bytes]:
        process = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(folder)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(port=port, socket_timeout=1)
        for _ in range(100):
            try:
                if client.ping():
                    return process
            except redis.RedisError:
                time.sleep(0.05)
        process.kill()
        raise RuntimeError("redis-server did not answer PING")

    return start


@pytest.fixture(scope="session")
def redis_url(start_redis: RedisStarter, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The URL of a redis-server running for the whole session (give each test its own key)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    process = start_redis(port, tmp_path_factory.mktemp("redis"))
    yield f"redis://127.0.0.1:{port}/0"
    process.terminate()
    process.wait(10)

"""`fintune serve` (the HTTP service under uvicorn) and `fintune classify` (the same pipeline, offline).

``fintune classify TEXT`` prints one JSON line; ``fintune classify --input FILE`` reads ``.txt`` (one text per
line), ``.csv`` (a ``text`` column, optional ``id``) or ``.jsonl`` (objects with ``text``, optional ``id``)
and writes one JSON line per text, with a progress bar on stderr. Records carry the redacted text only.
"""

from __future__ import annotations

import errno
import json
import math
import os
import socket
import sys
from collections import Counter
from collections.abc import Iterable
from contextlib import ExitStack
from pathlib import Path
from typing import Annotated, Any, Literal, TextIO

import typer
from pydantic import ValidationError
from tqdm import tqdm

from fintune.cli._app import ServedProfileOption, app, console, err_console, labelled, output_file
from fintune.cli.inputs import read_texts
from fintune.config import ScaleSettings, Settings, available_profiles, load_settings, profile_path
from fintune.errors import ConfigError, IncompleteRunError, InvalidInputError, ServingError

ServedModelOption = Annotated[
    Path | None,
    typer.Option(
        "--model", "-m",
        help="A folder written by `fintune train` (default: serving.model_dir, else outputs/models/<profile>).",
    ),
]


def settings_with_model(profile: str | None, model: Path | None) -> Settings:
    """The profile's settings, serving ``model`` when given; the folder served (``model``, or ``serving.model_dir``
    from the profile or the environment) must hold a trained model. With ``model`` and no profile named (here or
    in FINTUNE_PROFILE), the profile the model was trained with, as evaluate and calibrate take it: the default
    one would score an encoder or a tiny-mistral folder with another model's inference settings and answer with
    another model's name."""
    from fintune.model.card import read_card

    if model is None:
        settings = load_settings(profile)
        if settings.serving.model_dir is not None:  # a mistyped FINTUNE_SERVING__MODEL_DIR must not serve noise
            read_card(settings.serving.model_dir)
        return settings
    card = read_card(model)  # ArtifactError, with what to do, before anything slow starts
    trained_with = card.get("profile")
    if profile is None and not os.environ.get("FINTUNE_PROFILE") and trained_with in available_profiles():
        profile = trained_with
    settings = load_settings(profile)
    return settings.model_copy(update={"serving": settings.serving.model_copy(update={"model_dir": model})})


@app.command("serve")
def serve_command(
    profile: ServedProfileOption = None,
    model: ServedModelOption = None,
    host: Annotated[str | None, typer.Option(help="Interface to bind (default: serving.host, 127.0.0.1).")] = None,
    port: Annotated[
        int | None, typer.Option(min=1, max=65535, help="TCP port (default: serving.port, 8000).")
    ] = None,
    workers: Annotated[
        int | None, typer.Option(min=1, help="uvicorn worker processes (default: serving.workers).")
    ] = None,
) -> None:
    """Start the HTTP service (OpenAPI at /docs); Ctrl-C or SIGTERM finishes in-flight requests first."""
    import uvicorn

    settings = settings_with_model(profile, model)
    s = settings.serving
    host, port, workers = host or s.host, port if port is not None else s.port, workers or s.workers
    ensure_can_listen(host, port)  # before the model loads: minutes with a 7B model, then uvicorn's bind error
    # each worker builds its app from the same profile file: its path, since a profile given as FILE.yaml is not
    # in configs/ (the name alone made workers load another file of that name, or none)
    os.environ["FINTUNE_PROFILE"] = str(profile_path(profile or os.environ.get("FINTUNE_PROFILE")
                                                     or settings.profile).resolve())
    if model is not None:
        os.environ["FINTUNE_SERVING__MODEL_DIR"] = str(model.resolve())  # ... and serves the same folder
    url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
    console.print(f"FinTune service, profile {settings.profile!r}: {url} (docs: {url}/docs)", highlight=False)
    console.print(example_curl(url, settings), highlight=False, soft_wrap=True)
    uvicorn.run(
        "fintune.serving.app:app_from_env", factory=True, host=host, port=port, workers=workers,
        timeout_graceful_shutdown=math.ceil(s.shutdown_timeout_s),  # whole seconds: 0.5 must not become 0
        access_log=s.access_log, log_config=log_config(),
    )


def ensure_can_listen(host: str, port: int) -> None:
    """Raise :class:`ServingError` saying what to change when ``host:port`` cannot be listened on now."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is no obstacle
            probe.bind((host, port))
    except OSError as exc:
        reason = "is already in use" if exc.errno == errno.EADDRINUSE else f"cannot be bound ({exc.strerror or exc})"
        raise ServingError(
            f"{host}:{port} {reason}; choose another with --port or --host (or FINTUNE_SERVING__PORT)"
        ) from None


def example_curl(url: str, settings: Settings) -> str:
    """A curl command that classifies one sentence (with the key header when a key is set)."""
    key = ' -H "X-API-Key: $FINTUNE_SERVING__API_KEY"' if settings.serving.api_key is not None else ""
    body = json.dumps({"text": "Operating profit rose to EUR 13.1 mn from EUR 8.7 mn."})
    return f"curl -s -X POST {url}/v1/classify -H 'Content-Type: application/json'{key} -d '{body}'"


def log_config() -> dict[str, Any]:
    """uvicorn's logging config plus our own loggers at INFO on the same handler (records are redacted)."""
    from uvicorn.config import LOGGING_CONFIG

    config = json.loads(json.dumps(LOGGING_CONFIG))
    config["loggers"]["fintune"] = {"handlers": ["default"], "level": "INFO", "propagate": False}
    return config


Engine = Literal["local", "ray"]


@app.command("classify")
def classify_command(
    text: Annotated[str | None, typer.Argument(help="The text to classify (or use --input).")] = None,
    input_file: Annotated[
        Path | None, typer.Option("--input", "-i", help="A .txt (one text per line), .csv or .jsonl file.")
    ] = None,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Where to write JSONL (default: stdout).")
    ] = None,
    text_column: Annotated[str, typer.Option(help="Column / key holding the text in .csv and .jsonl.")] = "text",
    profile: ServedProfileOption = None,
    model: ServedModelOption = None,
    engine: Annotated[
        Engine,
        typer.Option(
            help="'local': this process. 'ray': replicas of the pipeline on a Ray cluster (scale.address; none: "
            "a private one on this machine), same records, in the same order.",
        ),
    ] = "local",
    actors: Annotated[
        int | None, typer.Option(min=1, help="Pipeline replicas with --engine ray (default: scale.actors).")
    ] = None,
    ray_address: Annotated[
        str | None,
        typer.Option(help="Ray cluster with --engine ray: 'auto', 'ray://HOST:10001' or 'HOST:6379' "
                     "(default: scale.address)."),
    ] = None,
) -> None:
    """Classify offline through the service's pipeline (guard, breaker, model, checks), writing JSONL.

    TEXT prints one JSON line. --input reads .txt (a text a line), .csv (a 'text' column, optional 'id')
    or .jsonl (objects with 'text' and optional 'id', or bare strings).
    One record per text, in order, with the redacted text only; --output F is renamed from F.part when complete.
    Without a trained model the untrained base answers, and a warning says so.
    Exit 1 when the system left texts unanswered (every record is still written), 2 for bad input.

    Example: fintune classify --input calls.csv --output calls.jsonl
    """
    if (text is None) == (input_file is None):
        raise InvalidInputError("give either a TEXT argument or --input FILE, not both or neither")
    if engine != "ray" and (actors is not None or ray_address is not None):
        raise InvalidInputError("--actors and --ray-address only apply with --engine ray")
    settings = _with_scale(settings_with_model(profile, model), actors, ray_address)
    rows = [("1", text)] if text is not None else list(read_texts(input_file, text_column))  # type: ignore[arg-type]
    if not rows:
        raise InvalidInputError(f"{input_file} holds no text to classify")
    if output is not None:  # checked, and its folder made, before the run, as every command's output
        output_file(output)
    _warn_if_untrained(settings)
    errors: Counter[str] = Counter()
    part = output.with_name(output.name + ".part") if output else None  # renamed to output once complete
    with ExitStack() as stack:
        chunks = _record_chunks([t for _, t in rows], settings, engine, stack)
        sink: TextIO = stack.enter_context(part.open("w", encoding="utf-8")) if part else sys.stdout
        bar = stack.enter_context(tqdm(total=len(rows), desc="classify", unit="text", disable=text is not None))
        done = 0
        for records in chunks:
            for (row_id, _), record in zip(rows[done : done + len(records)], records, strict=True):
                sink.write(json.dumps({"id": row_id, **record}, ensure_ascii=False) + "\n")
                errors.update([record["error"]["code"]] if record.get("error") else [])
            done += len(records)
            bar.update(len(records))
    if part and output:
        os.replace(part, output)
        failed = f" ({sum(errors.values())} with an error: {_counts(errors)})" if errors else ""
        console.print(f"{len(rows)} records written to {output}{failed}")
    _fail_on_system_errors(errors, len(rows))


ROW_ERRORS = frozenset({"invalid_input"})
"""Error codes that are the text's own problem; any other error in a record means the system failed it."""


def _counts(errors: Counter[str]) -> str:
    """``3 model_unavailable, 1 invalid_input``."""
    return ", ".join(f"{n} {code}" for code, n in errors.most_common())


def _fail_on_system_errors(errors: Counter[str], total: int) -> None:
    """IncompleteRunError (exit 1) when the system, not the input, left texts without an answer."""
    system = Counter({code: n for code, n in errors.items() if code not in ROW_ERRORS})
    if system:
        raise IncompleteRunError(
            f"{sum(system.values())} of {total} texts got no answer ({_counts(system)}; each record's error says "
            "why): run them again once the model is healthy"
        )


def _warn_if_untrained(settings: Settings) -> None:
    """Say so on stderr when no trained model is there and the untrained base will answer."""
    from fintune.model.card import CARD_FILE
    from fintune.serving.model_adapter import model_dir

    folder = model_dir(settings)
    if settings.serving.model_dir is None and not (folder / CARD_FILE).is_file():  # a named folder must hold one
        err_console.print(labelled(
            "warning:", "yellow", f"{folder} holds no trained model: the untrained {settings.model.base_model} "
            f"answers (version base-untuned); train one with `fintune train --profile {settings.profile}`"),
            highlight=False, soft_wrap=True,
        )


def _with_scale(settings: Settings, actors: int | None, address: str | None) -> Settings:
    """``settings`` with the command line's Ray options applied."""
    update = {k: v for k, v in (("actors", actors), ("address", address)) if v is not None}
    if not update:
        return settings
    try:  # validated, as the profile's values are (model_copy would take anything)
        scale = ScaleSettings.model_validate({**settings.scale.model_dump(), **update})
    except ValidationError as exc:
        error = exc.errors()[0]
        option = {"address": "--ray-address", "actors": "--actors"}.get(str(error["loc"][0]), str(error["loc"][0]))
        raise ConfigError(f"{option}: {error['msg'].removeprefix('Value error, ')}") from exc
    return settings.model_copy(update={"scale": scale})


def _record_chunks(texts: list[str], settings: Settings, engine: Engine, stack: ExitStack) -> Iterable[list[Any]]:
    """The texts' records chunk by chunk, in order, from this process or from replicas on Ray."""
    from fintune.serving.service import OfflineRecords

    if engine == "ray":
        from fintune.scale import classify_on_ray, ray_cluster

        stack.enter_context(ray_cluster(settings.scale))
        chunks = classify_on_ray(texts, OfflineRecords(settings), settings.scale)
        stack.callback(chunks.close)  # its replicas go before the cluster does, even when writing fails
        return chunks
    classify, undo_log_redaction = OfflineRecords(settings).in_this_process()
    stack.callback(undo_log_redaction)  # main() may run in a longer-lived process (tests, notebooks)
    size = settings.serving.micro_batch_size
    return (classify(texts[start : start + size]) for start in range(0, len(texts), size))



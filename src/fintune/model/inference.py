"""Label-constrained inference: :class:`SentimentClassifier` scores only the three label tokens.

The model reads the training prompt and, at the answer position (the last prompt token), we take the logits of
the first token of `` negative``, `` neutral`` and `` positive`` and softmax them: it can never answer anything
else, and the top probability is its confidence. Batches are length buckets (:mod:`fintune.model.buckets`),
left-padded (position ids come from the attention mask, so padding does not change a sentence's scores), under
``torch.inference_mode()``. With ``inference.packing`` (the default) a batch is instead one padding-free row of
sentences whose attention stays within each sentence (:mod:`fintune.model.packing`): the classifier switches the
model's attention to the packed implementation, and falls back to padded buckets where the model cannot take it.

Only those three logits are computed: the decoder's last hidden state times the three label rows of the output
head, instead of the full-vocabulary head (49,152 rows for SmolLM2). A probe at load time checks that this equals
the model's own logits and falls back to the full head where it does not (soft-capped or scaled logits).

Fast path (``inference.merge_adapter``): de-quantize the NF4 base (``model.dequantize()``) and then merge the
adapter into it. The adapter learnt the NF4-rounded weights, so it must be merged into those, never into the
original full-precision weights. Each layer is merged in fp32 and rounded to ``inference.dtype`` once (one layer
in fp32 at a time): merging in bf16 rounds twice. Against the unmerged NF4 model of the committed cpu profile,
the bf16-rounded merge keeps 99.2 % of the 50agree test labels and the fp32 merge 99.6 %
(``label_agreement`` in ``benchmarks/results/model_inference_cpu.json``).

Decoded path (``inference.dequantize_base``): each 4-bit layer's weights are decoded once at load into a
:class:`~fintune.model.quantization.DecodedLinear` in ``inference.dtype``, and the adapter stays apart. In bf16 (the
compute dtype) every layer then multiplies by the very weights it would decode on each call, in the same dtypes
(with ``upcast_unquantized``, embeddings, norms and head in fp32 as trained), without decoding them per call; in
fp32 it holds the same decoded values and multiplies in fp32, which is faster where the CPU's bf16 products are
slower than its fp32 ones. ``inference.dtype: auto`` picks it from the CPU's features (:mod:`fintune.model.precision`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from safetensors import SafetensorError

from fintune import LABELS
from fintune.config import InferenceSettings, ModelSettings, Settings
from fintune.errors import ModelError
from fintune.model.buckets import length_buckets
from fintune.model.calibration import card_temperature
from fintune.model.card import check_weights, read_card, unreadable_weights
from fintune.model.loading import load_tokenizer, resolve_base
from fintune.model.packing import PackedBatch, enable_packing, pack_groups
from fintune.model.precision import resolve_dtype
from fintune.model.quantization import decode_4bit_layers, load_base, upcast_unquantized

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class Prediction:
    """One sentence's label, its probability (confidence) and all three probabilities."""

    label: str
    confidence: float
    probabilities: dict[str, float]


def label_token_ids(tokenizer: Any, prompt: str, labels: Sequence[str] = LABELS) -> list[int]:
    """For each label, the first token of the completion `` <label>`` after ``prompt``, tokenized in context as
    TRL tokenizes prompt + completion (a SentencePiece tokenizer encodes " positive" alone as "▁", "▁positive",
    so the label's own first token would be the same "▁" for all three); ModelError when two labels share it."""
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    ids = []
    for label in labels:
        full = tokenizer.encode(f"{prompt} {label}", add_special_tokens=False)
        if full[: len(prompt_ids)] != prompt_ids or len(full) == len(prompt_ids):
            raise ModelError(
                f"the prompt's last token merges with ' {label}' ({prompt[-20:]!r}): end the prompt template on a "
                "token boundary, e.g. with ':'"
            )
        ids.append(full[len(prompt_ids)])
    if len(set(ids)) != len(ids):
        raise ModelError(
            f"the tokenizer starts two labels with the same token ({dict(zip(labels, ids, strict=True))}); "
            "label-constrained scoring needs distinct first tokens"
        )
    return ids


class SentimentClassifier:
    """Batched, label-constrained sentiment scoring with a causal LM (+ LoRA adapter)."""

    def __init__(
        self, model: Any, tokenizer: Any, prompt_template: str, inference: InferenceSettings, temperature: float = 1.0
    ) -> None:
        """Wrap a loaded model and tokenizer; use :meth:`from_pretrained` to load a trained adapter."""
        self.model = model.eval()
        self.temperature = temperature
        _drop_training_hooks(model)
        self.tokenizer = tokenizer
        self.tokenizer.padding_side = "left"
        self.prompt_template = prompt_template
        self.settings = inference
        self.label_ids = torch.tensor(label_token_ids(tokenizer, prompt_template.format(text="x")))
        if inference.num_threads:
            torch.set_num_threads(inference.num_threads)
        self.packed = inference.packing and enable_packing(_unwrapped(model))
        self._label_rows: torch.Tensor | None = _label_rows(model, self.label_ids)
        if self._label_rows is not None and not self._label_head_matches():
            logger.warning("the label-only head differs from the model's logits; scoring with the full head")
            self._label_rows = None

    @classmethod
    def from_pretrained(
        cls, model_dir: Path, settings: Settings, merge: bool | None = None, temperature: float | None = None
    ) -> SentimentClassifier:
        """Load a trained adapter folder (written by ``fintune train``) onto its NF4 base, scoring with the card's
        temperature unless ``temperature`` is given (calibrate refits a card's unusable one from 1.0)."""
        card = read_card(model_dir)
        check_weights(model_dir, "qlora")
        temperature = card_temperature(card) if temperature is None else temperature
        model_settings = ModelSettings.model_validate(card["model_settings"])
        inference = settings.model.inference
        merge = inference.merge_adapter if merge is None else merge
        base = load_base(resolve_base(model_settings, settings.cache_dir), model_settings)
        base = prepare_base(base, model_settings, inference, merge)
        try:  # keep the adapter in the dtype it was trained in (TRL trains QLoRA adapters in bf16)
            model = PeftModel.from_pretrained(base, str(model_dir), autocast_adapter_dtype=False)
        except (OSError, ValueError, SafetensorError) as exc:
            raise unreadable_weights(model_dir, exc) from exc
        if merge:
            model = merge_adapter_in_fp32(model, resolve_dtype(inference.dtype))
        tokenizer = load_tokenizer(str(model_dir))
        return cls(model, tokenizer, model_settings.training.prompt_template, inference, temperature)

    @property
    def uses_label_head(self) -> bool:
        """Whether scores come from the three label rows of the output head (else from the full head)."""
        return self._label_rows is not None

    def prompts(self, texts: Sequence[str]) -> list[str]:
        """The training prompt of each sentence."""
        return [self.prompt_template.format(text=text) for text in texts]

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        """An (n, 3) array of label probabilities in :data:`fintune.LABELS` order."""
        out = np.zeros((len(texts), len(LABELS)), dtype=np.float64)
        if not texts:
            return out
        encoded = self.tokenizer(self.prompts(texts))["input_ids"]
        lengths = [len(ids) for ids in encoded]
        with torch.inference_mode():
            for batch in self._batches(lengths):
                out[batch] = self._score([encoded[i] for i in batch])
        return out

    def predict(self, texts: Sequence[str]) -> list[Prediction]:
        """Label, confidence and probabilities of each sentence."""
        return [
            Prediction(LABELS[int(row.argmax())], float(row.max()), dict(zip(LABELS, map(float, row), strict=True)))
            for row in self.predict_proba(texts)
        ]

    def predict_labels(self, texts: Sequence[str]) -> list[str]:
        """Only the labels."""
        return [LABELS[int(i)] for i in self.predict_proba(texts).argmax(axis=1)]

    def _batches(self, lengths: list[int]) -> Iterator[list[int]]:
        """Sentence indices per forward pass: packed groups, or length buckets for padded batches."""
        if self.packed:
            return pack_groups(lengths, self.settings.batch_size, self.settings.pack_tokens)
        return length_buckets(lengths, self.settings.batch_size, self.settings.min_length_ratio)

    def _score(self, sequences: list[list[int]]) -> np.ndarray:
        """Softmax over the label tokens' logits (divided by the temperature) at each sentence's answer position."""
        logits = self._label_logits(sequences, self._label_rows) / self.temperature
        return torch.softmax(logits, dim=-1).cpu().numpy()

    def _label_logits(self, sequences: list[list[int]], label_rows: torch.Tensor | None) -> torch.Tensor:
        """(n, 3) fp32 logits of the label tokens: from the label rows when given, else from the full head."""
        inputs, answers = self._inputs(sequences, self._device())
        if label_rows is None:
            logits = self.model(**inputs, logits_to_keep=answers).logits
            return logits.reshape(-1, logits.shape[-1])[:, self.label_ids.to(answers.device)].float()
        hidden = _decoder(self.model)(**inputs).last_hidden_state[:, answers, :]
        return hidden.reshape(-1, hidden.shape[-1]).float() @ label_rows.T

    def _inputs(self, sequences: list[list[int]], device: torch.device) -> tuple[dict[str, Any], torch.Tensor]:
        """Forward inputs and the answer positions to read: one packed row (each sentence's last token), or a
        left-padded batch with its mask and the position ids the mask implies (the last column)."""
        if self.packed:
            packed = PackedBatch.of(sequences)
            return packed.model_inputs(device), packed.last_positions.to(device)
        batch = self.tokenizer.pad({"input_ids": sequences}, padding=True, return_tensors="pt")
        mask = batch["attention_mask"]
        inputs = {
            "input_ids": batch["input_ids"].to(device),
            "attention_mask": mask.to(device),
            "position_ids": (mask.cumsum(-1) - 1).clamp(min=0).to(device),
        }
        return inputs, torch.tensor([-1], device=device)

    def _label_head_matches(self) -> bool:
        """Whether the label-only head reproduces the model's own label logits on a probe sentence."""
        probe = [self.tokenizer(self.prompts(["Operating profit rose to EUR 13.1 mn ."]))["input_ids"][0]]
        with torch.inference_mode():
            full = self._label_logits(probe, None)
            fast = self._label_logits(probe, self._label_rows)
        return bool(torch.allclose(full, fast, rtol=1e-2, atol=5e-2))

    def _device(self) -> torch.device:
        """Where the model's first parameter lives."""
        return next(self.model.parameters()).device


def prepare_base(base: Any, model_settings: ModelSettings, inference: InferenceSettings, merge: bool) -> Any:
    """A freshly loaded base made ready for the inference path: de-quantized for a merge, else NF4 with
    embeddings, norms and head upcast (``upcast_unquantized``) and 4-bit layers decoded (``dequantize_base``)."""
    if not model_settings.quantization.load_in_4bit:
        return base
    if merge:
        return base.dequantize(dtype=resolve_dtype(inference.dtype))
    if inference.upcast_unquantized:
        base = upcast_unquantized(base)
    if inference.dequantize_base:
        base = decode_4bit_layers(base, resolve_dtype(inference.dtype))
    return base


def merge_adapter_in_fp32(model: PeftModel, dtype: torch.dtype) -> Any:
    """Merge every LoRA layer into its base weight in fp32, cast it back to ``dtype``, and drop the wrappers."""
    for module in model.modules():
        if isinstance(module, LoraLayer):
            module.to(torch.float32)
            module.merge()
            module.get_base_layer().to(dtype)
    return model.unload().to(dtype)


def _unwrapped(model: Any) -> Any:
    """The transformers model inside a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if isinstance(model, PeftModel) else model


def _decoder(model: Any) -> Any:
    """The transformer body under the output head (through a PEFT wrapper)."""
    return _unwrapped(model).get_decoder()


def _label_rows(model: Any, label_ids: torch.Tensor) -> torch.Tensor | None:
    """The output head's rows of the label tokens in fp32, or None when the head is not a plain linear layer."""
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear) or head.bias is not None:
        return None
    return head.weight.detach()[label_ids.to(head.weight.device)].float().clone()


def _drop_training_hooks(model: Any) -> None:
    """Remove the input-gradient hook ``prepare_model_for_kbit_training`` adds: with it every activation
    requires grad and bitsandbytes never takes its faster CPU inference kernel."""
    base = _unwrapped(model)
    if getattr(base, "_require_grads_hook", None) is not None:
        base.disable_input_require_grads()

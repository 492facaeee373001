"""Label-constrained scoring reads the token TRL trains after the prompt, SentencePiece tokenizers included."""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from fintune import LABELS
from fintune.model.inference import label_token_ids

PROMPT = "Profit rose .\nSentiment:"


def sentencepiece_style_tokenizer() -> PreTrainedTokenizerFast:
    """A tiny tokenizer normalised like Llama's and Mistral's (legacy): "▁" prepended, spaces as "▁", pieces
    starting at each "▁", so " positive" alone is "▁", "▁positive"."""
    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    core.pre_tokenizer = pre_tokenizers.Split("\u2581", behavior="merged_with_next")
    core.decoder = decoders.Metaspace()
    corpus = [f"{PROMPT} negative neutral positive the company said"] * 50
    core.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>"], show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>")


def test_sentencepiece_labels_are_the_tokens_trained_after_the_prompt() -> None:
    tokenizer = sentencepiece_style_tokenizer()
    alone = [tokenizer.encode(f" {label}", add_special_tokens=False)[0] for label in LABELS]
    assert len(set(alone)) == 1  # every label alone starts with the same "▁": the old lookup could not work
    ids = label_token_ids(tokenizer, PROMPT)
    prompt_ids = tokenizer.encode(PROMPT, add_special_tokens=False)
    for label, token in zip(LABELS, ids, strict=True):
        assert token == tokenizer.encode(f"{PROMPT} {label}", add_special_tokens=False)[len(prompt_ids)]
    assert len(set(ids)) == 3


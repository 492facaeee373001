"""The QLoRA path end to end on tiny-mistral: NF4 base + LoRA + SFTTrainer, save, reload, identical scores."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from bitsandbytes.nn import Linear4bit
from safetensors.torch import load_file

from fintune import LABELS
from fintune.config import Settings
from fintune.data import load_splits
from fintune.errors import ArtifactError
from fintune.model.card import is_trained
from fintune.model.inference import SentimentClassifier, merge_adapter_in_fp32
from fintune.model.loading import resolve_base
from fintune.model.quantization import load_base
from fintune.model.training import last_checkpoint, run_mean_loss, train

pytestmark = pytest.mark.slow


def test_two_steps_train_save_reload_identical_scores(tiny_settings: Settings) -> None:
    splits = load_splits(tiny_settings)
    result = train(tiny_settings, max_steps=2, splits=splits)
    out = result.output_dir
    card = json.loads((out / "fintune.json").read_text())
    assert card["global_steps"] == 2
    assert card["data"]["fingerprint"] == splits.fingerprint
    assert 0 < card["trainable_params"] < card["total_params"]
    assert card["calibration"]["temperature"] == result.classifier.temperature != 1.0
    assert card["calibration"]["nll_after"] <= card["calibration"]["nll_before"]
    for name in ("adapter_model.safetensors", "adapter_config.json", "README.md", "loss_curve.png",
                 "drift_baseline.json", "validation_report.json"):
        assert (out / name).is_file(), name
    assert last_checkpoint(out) is not None
    assert is_trained(out, "tiny-mistral", splits.fingerprint)
    assert not is_trained(out, "tiny-mistral", "another-fingerprint")

    texts = [ex.text for ex in splits.test]
    unmerged = SentimentClassifier.from_pretrained(out, tiny_settings, merge=False)
    assert any(isinstance(m, Linear4bit) for m in unmerged.model.modules())  # really NF4
    first = unmerged.predict_proba(texts)
    np.testing.assert_array_equal(result.classifier.predict_proba(texts), first)  # in memory == reloaded
    np.testing.assert_allclose(first.sum(axis=1), 1.0, rtol=1e-6)

    merged = SentimentClassifier.from_pretrained(out, tiny_settings, merge=True)
    assert not any(isinstance(m, Linear4bit) for m in merged.model.modules())
    np.testing.assert_allclose(merged.predict_proba(texts), first, atol=0.02)


def test_predictions_are_always_one_of_the_labels_and_padding_does_not_change_scores(
    tiny_settings: Settings,
) -> None:
    out = train(tiny_settings, max_steps=1, splits=load_splits(tiny_settings)).output_dir
    classifier = SentimentClassifier.from_pretrained(out, tiny_settings, merge=False)
    texts = ["Profit rose .", "Operating profit fell to EUR 3.1 mn from EUR 30.0 mn in the corresponding period ."]
    predictions = classifier.predict(texts)
    assert all(p.label in LABELS and p.confidence == max(p.probabilities.values()) for p in predictions)
    alone = classifier.predict_proba(texts[:1])  # no padding
    together = classifier.predict_proba(texts)  # left-padded beside a longer sentence
    np.testing.assert_allclose(together[0], alone[0], atol=1e-3)


def test_resumes_from_its_last_checkpoint(tiny_settings: Settings, tmp_path: Path) -> None:
    splits = load_splits(tiny_settings)
    finished = train(tiny_settings, max_steps=2, splits=splits)
    out = tmp_path / "killed"  # killed after its first checkpoint
    shutil.copytree(finished.output_dir / "checkpoints", out / "checkpoints",
                    ignore=shutil.ignore_patterns("checkpoint-2"))
    resumed = train(tiny_settings, output_dir=out, max_steps=2, splits=splits)
    assert resumed.card["resumed"] is True
    assert resumed.card["global_steps"] == 2
    assert resumed.card["resumed_from_step"] == 1  # its wall time covers step 2 only, and the card says so
    assert "s (this session only: resumed from step 1) |" in (out / "README.md").read_text()
    state = json.loads((out / "checkpoints" / "checkpoint-2" / "trainer_state.json").read_text())
    logged = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
    assert len(logged) == 2 and resumed.card["train_loss"] == round(sum(logged) / 2, 4)  # both calls' steps
    rates = [entry["learning_rate"] for entry in state["log_history"] if "learning_rate" in entry]
    assert rates[-1] > 0  # the second step follows the 2-step schedule it started with

    with pytest.raises(ArtifactError, match="--max-steps"):  # a 3-step schedule differs from step 1 on
        train(tiny_settings, output_dir=out, max_steps=3, splits=splits)
    other_lora = tiny_settings.model.lora.model_copy(update={"r": 4})  # checkpoints of r=16 cannot carry on as r=4
    other = tiny_settings.model_copy(update={"model": tiny_settings.model.model_copy(update={"lora": other_lora})})
    with pytest.raises(ArtifactError, match="checkpoints of another run.*--overwrite"):
        train(other, output_dir=out, max_steps=2, splits=splits)
    with pytest.raises(ArtifactError, match="checkpoints of another run"):
        train(tiny_settings, output_dir=out, max_steps=2, splits=load_splits(tiny_settings, "allagree"))


@pytest.mark.parametrize("plan", [{"max_steps": 2}, {"max_steps": -1, "epochs": 0.25}], ids=["steps", "epochs"])
def test_a_run_killed_after_its_last_checkpoint_ends_there_without_another_step(
    tiny_settings: Settings, tmp_path: Path, plan: dict[str, float]
) -> None:
    training = tiny_settings.model.training.model_copy(update=plan)
    settings = tiny_settings.model_copy(
        update={"model": tiny_settings.model.model_copy(update={"training": training})}
    )
    splits = load_splits(settings)
    finished = train(settings, splits=splits)
    killed = tmp_path / "killed"  # the checkpoints, but not the adapter and card written after the last one
    shutil.copytree(finished.output_dir / "checkpoints", killed / "checkpoints")
    last = last_checkpoint(killed)
    assert last is not None and last.name == f"checkpoint-{finished.card['global_steps']}"

    again = train(settings, output_dir=killed, splits=splits)
    assert again.card["resumed"] is True
    assert again.card["global_steps"] == finished.card["global_steps"]
    assert last_checkpoint(killed) == last  # no step past the plan, so no newer checkpoint
    assert again.card["train_loss"] == finished.card["train_loss"]
    saved, expected = (load_file(str(d / "adapter_model.safetensors")) for d in (killed, finished.output_dir))
    assert saved.keys() == expected.keys()
    assert all(torch.equal(saved[name], expected[name]) for name in expected)
    texts = [ex.text for ex in splits.test]
    np.testing.assert_array_equal(again.classifier.predict_proba(texts), finished.classifier.predict_proba(texts))


def test_run_mean_loss_weights_the_logged_intervals_before_a_resume() -> None:
    history = [{"loss": 4.0, "step": 10}, {"loss": 1.0, "step": 20}, {"loss": 9.0, "step": 30}]
    # resumed at step 20 (step 30's entry belongs to this call), 10 more steps at a mean of 0.5
    assert run_mean_loss(history, 0.5, resumed_from=20, global_step=30) == pytest.approx((40 + 10 + 5) / 30)
    assert run_mean_loss(history, 0.5, resumed_from=0, global_step=30) == 0.5  # not resumed: transformers' figure


def test_loading_a_folder_without_an_adapter_says_what_to_do(tiny_settings: Settings, tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="fintune train"):
        SentimentClassifier.from_pretrained(tiny_settings.output_dir, tiny_settings)
    trained = train(tiny_settings, max_steps=1, splits=load_splits(tiny_settings)).output_dir
    missing, truncated = tmp_path / "missing", tmp_path / "truncated"
    for folder in (missing, truncated):
        shutil.copytree(trained, folder, ignore=shutil.ignore_patterns("checkpoints"))
    (missing / "adapter_model.safetensors").unlink()  # was LocalEntryNotFoundError, or a hub lookup of the path
    with pytest.raises(ArtifactError, match="has a card but no adapter_model.safetensors or adapter_model.bin"):
        SentimentClassifier.from_pretrained(missing, tiny_settings)
    weights = truncated / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # was a SafetensorError traceback
    with pytest.raises(ArtifactError, match="weights in .* are unreadable .*retrain"):
        SentimentClassifier.from_pretrained(truncated, tiny_settings)


def test_label_only_head_equals_the_full_head_and_a_wrong_head_is_caught(tiny_settings: Settings) -> None:
    out = train(tiny_settings, max_steps=1, splits=load_splits(tiny_settings)).output_dir
    classifier = SentimentClassifier.from_pretrained(out, tiny_settings, merge=False)
    assert classifier.uses_label_head
    sequences = [classifier.tokenizer(classifier.prompts(["Sales fell ."]))["input_ids"][0]]
    with torch.inference_mode():
        fast = classifier._label_logits(sequences, classifier._label_rows)
        full = classifier._label_logits(sequences, None)
    torch.testing.assert_close(fast, full, rtol=1e-4, atol=1e-4)
    classifier._label_rows = torch.randn_like(classifier._label_rows)
    assert not classifier._label_head_matches()


def test_compute_dtype_path_keeps_no_fp32_weights_and_scores_like_the_trained_model(
    tiny_settings: Settings,
) -> None:
    out = train(tiny_settings, max_steps=1, splits=load_splits(tiny_settings)).output_dir
    texts = [ex.text for ex in load_splits(tiny_settings).test]
    exact = SentimentClassifier.from_pretrained(out, tiny_settings, merge=False)
    inference = tiny_settings.model.inference.model_copy(update={"upcast_unquantized": False})
    fast_settings = tiny_settings.model_copy(
        update={"model": tiny_settings.model.model_copy(update={"inference": inference})}
    )
    fast = SentimentClassifier.from_pretrained(out, fast_settings, merge=False)
    assert torch.float32 in {p.dtype for p in exact.model.parameters()}
    assert torch.float32 not in {p.dtype for p in fast.model.parameters()}
    np.testing.assert_allclose(fast.predict_proba(texts), exact.predict_proba(texts), atol=0.02)


def test_decoded_path_computes_what_nf4_computes_and_keeps_the_adapter_apart(
    tiny_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    import bitsandbytes.functional as bnb_functional
    import bitsandbytes.nn.modules as bnb_modules
    from peft.tuners.lora import LoraLayer

    from fintune.model.quantization import DecodedLinear

    out = train(tiny_settings, max_steps=1, splits=load_splits(tiny_settings)).output_dir
    texts = [ex.text for ex in load_splits(tiny_settings).test]

    def loaded(**update: object) -> SentimentClassifier:
        inference = tiny_settings.model.inference.model_copy(update=update)
        model = tiny_settings.model.model_copy(update={"inference": inference})
        return SentimentClassifier.from_pretrained(out, tiny_settings.model_copy(update={"model": model}), merge=False)

    # bitsandbytes decodes on every call, then multiplies with torch (its fused AVX512-BF16 kernel, where the
    # CPU has one, sums in another order): the decoded path must give exactly the same scores
    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: False)
    for upcast in (True, False):
        nf4 = loaded(upcast_unquantized=upcast)
        decoded = loaded(upcast_unquantized=upcast, dequantize_base=True)
        assert not any(isinstance(m, Linear4bit) for m in decoded.model.modules())
        assert any(isinstance(m, DecodedLinear) for m in decoded.model.modules())
        assert any(isinstance(m, LoraLayer) for m in decoded.model.modules())  # unmerged
        assert (torch.float32 in {p.dtype for p in decoded.model.parameters()}) is upcast
        reference = nf4.predict_proba(texts)
        np.testing.assert_array_equal(decoded.predict_proba(texts), reference)
        if upcast:
            as_trained = reference  # embeddings, norms and head in fp32, as in training

    source = resolve_base(tiny_settings.model, tiny_settings.cache_dir)
    quantized = load_base(source, tiny_settings.model).model.layers[0].self_attn.q_proj
    expected = bnb_functional.dequantize_4bit(quantized.weight.data, quantized.weight.quant_state)
    assert expected.dtype == torch.bfloat16  # what training multiplied by
    layer = decoded.model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    assert torch.equal(layer.weight, expected)

    # in fp32: the very same decoded values, multiplied in fp32 (close to the trained model, not bit-identical)
    wide = loaded(dequantize_base=True, dtype="float32")
    layer = wide.model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    assert layer.weight.dtype == torch.float32 and torch.equal(layer.weight, expected.float())
    assert torch.bfloat16 not in {p.dtype for n, p in wide.model.named_parameters() if "lora_" not in n}
    np.testing.assert_allclose(wide.predict_proba(texts), as_trained, atol=0.02)


def test_adapter_is_merged_in_fp32_and_rounded_once() -> None:
    from peft import LoraConfig, get_peft_model

    def lora_model() -> torch.nn.Module:
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(64, 64, bias=False)).to(torch.bfloat16)
        model = get_peft_model(net, LoraConfig(r=4, lora_alpha=8, target_modules=["0"]))
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.data = (torch.randn_like(param, dtype=torch.float32) * 0.3).to(torch.bfloat16)
        return model

    layer = lora_model().base_model.model[0]
    a, b = layer.lora_A["default"].weight.float(), layer.lora_B["default"].weight.float()
    expected = (layer.base_layer.weight.float() + (b @ a) * layer.scaling["default"]).to(torch.bfloat16)
    merged = merge_adapter_in_fp32(lora_model(), torch.bfloat16)
    assert torch.equal(merged[0].weight, expected)
    assert not torch.equal(lora_model().merge_and_unload()[0].weight, expected)  # peft's bf16 merge rounds twice


def test_the_attention_setting_picks_the_kernel_and_not_the_scores(tiny_settings: Settings) -> None:
    source = resolve_base(tiny_settings.model, tiny_settings.cache_dir)
    ids = torch.tensor([[5, 17, 42, 8, 99, 3]])
    logits = {}
    for attention in ("sdpa", "eager"):
        model = load_base(source, tiny_settings.model.model_copy(update={"attention": attention}))
        assert model.config._attn_implementation == attention
        with torch.inference_mode():
            logits[attention] = model(input_ids=ids).logits.float()
    torch.testing.assert_close(logits["eager"], logits["sdpa"], rtol=2e-2, atol=2e-2)


def test_a_checkpoint_the_run_was_killed_while_saving_is_not_resumed_from(
    tiny_settings: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    splits = load_splits(tiny_settings)
    finished = train(tiny_settings, max_steps=2, splits=splits)
    out = tmp_path / "killed"  # killed while saving checkpoint-2: its adapter is there, its trainer state not yet
    shutil.copytree(finished.output_dir / "checkpoints", out / "checkpoints")
    (out / "checkpoints" / "checkpoint-2" / "trainer_state.json").unlink()
    assert last_checkpoint(out) == out / "checkpoints" / "checkpoint-1"
    resumed = train(tiny_settings, output_dir=out, max_steps=2, splits=splits)  # was FileNotFoundError
    assert resumed.card["resumed_from_step"] == 1 and resumed.card["global_steps"] == 2
    assert any("checkpoint-2 is incomplete" in r.getMessage() for r in caplog.records)

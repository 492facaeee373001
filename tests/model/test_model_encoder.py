"""The encoder fallback trains (from labels and a teacher's probabilities) and predicts with bitsandbytes, peft and
trl made unimportable."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fintune.config import PROJECT_ROOT
from fintune.monitoring import load_drift_baseline

pytestmark = pytest.mark.slow

SCRIPT = """
import sys
for name in ("bitsandbytes", "peft", "trl"):
    sys.modules[name] = None  # `import name` now raises ImportError
import json
from pathlib import Path
from fintune.config import load_settings
import numpy as np
from fintune.data import load_splits
from fintune.model.distillation import TeacherTargets
from fintune.model.encoder import EncoderClassifier, train_encoder

settings = load_settings("encoder", data_dir=Path(sys.argv[1]), output_dir=Path(sys.argv[2]))
splits = load_splits(settings)
teacher = TeacherTargets(Path("teacher"), {"profile": "cpu"}, np.full((len(splits.train), 3), 1 / 3))
epoch_steps = -(-len(splits.train) // settings.model.encoder.batch_size) * settings.model.encoder.epochs
_, card = train_encoder(settings, Path(sys.argv[2]) / "encoder", max_steps=epoch_steps + 1, splits=splits,
                        teacher=teacher)
reloaded = EncoderClassifier.from_pretrained(Path(sys.argv[2]) / "encoder", settings)
labels = reloaded.predict_labels(["Net sales increased by 5 % .", "Operating profit fell ."])
def with_dtype(name):
    encoder = settings.model.encoder.model_copy(update={"inference_dtype": name})
    return settings.model_copy(update={"model": settings.model.model_copy(update={"encoder": encoder})})
fp32, bf16 = with_dtype("float32"), with_dtype("bfloat16")
texts = ["Net sales increased by 5 % .", "Operating profit fell .", "The company is based in Helsinki ."]
exact = EncoderClassifier.from_pretrained(Path(sys.argv[2]) / "encoder", fp32)
fast = EncoderClassifier.from_pretrained(Path(sys.argv[2]) / "encoder", bf16)
gap = float(abs(exact.predict_proba(texts) - fast.predict_proba(texts)).max())
import shutil
from fintune.errors import ArtifactError
broken = Path(sys.argv[2]) / "broken"
shutil.copytree(Path(sys.argv[2]) / "encoder", broken)
(broken / "model.safetensors").unlink()
try:
    EncoderClassifier.from_pretrained(broken, settings)
    missing = None
except ArtifactError as exc:
    missing = str(exc)
loaded = [m for m in ("bitsandbytes", "peft", "trl") if sys.modules.get(m) is not None]
print(json.dumps({"labels": labels, "steps": card["global_steps"], "epoch_steps": epoch_steps, "heavy": loaded,
                  "bf16_gap": gap, "missing": missing,
                  "distilled": card["distillation"]["teacher_profile"],
                  "dtypes": [str(exact.model.dtype), str(fast.model.dtype)],
                  "temperatures": [card["calibration"]["temperature"], reloaded.temperature]}))
"""


def test_encoder_runs_without_bitsandbytes_peft_or_trl(tiny_data_dir: Path, tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tiny_data_dir), str(tmp_path)],
        capture_output=True, text=True, timeout=300, cwd=PROJECT_ROOT,
        env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["heavy"] == []
    assert "has a card but no model.safetensors or pytorch_model.bin" in result["missing"]  # was an OSError
    assert result["steps"] == result["epoch_steps"] + 1  # --max-steps is exact, past the profile's epochs too
    assert result["distilled"] == "cpu"  # a teacher's probabilities need no QLoRA stack
    assert set(result["labels"]) <= {"negative", "neutral", "positive"} and len(result["labels"]) == 2
    assert (tmp_path / "encoder" / "fintune.json").is_file()
    assert (tmp_path / "encoder" / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    baseline = load_drift_baseline(tmp_path / "encoder")  # the service's drift detection works for it too
    validation = json.loads((tmp_path / "encoder" / "validation_report.json").read_text())
    predicted_per_label = tuple(int(sum(column)) for column in zip(*validation["confusion_matrix"], strict=True))
    assert baseline.counts == predicted_per_label and sum(baseline.counts) > 0
    assert result["dtypes"] == ["torch.float32", "torch.bfloat16"]
    assert result["bf16_gap"] < 0.05  # the bf16 fast path scores like the fp32 model it was trained as
    fitted, applied = result["temperatures"]
    assert fitted == applied and fitted != 1.0  # fitted on validation after training, applied when loaded


def test_the_loss_curve_averages_windows_of_steps_and_keeps_a_short_tail() -> None:
    from fintune.model.encoder import loss_history

    history = loss_history([1.0, 3.0, 2.0, 4.0, 5.0], window=2)
    assert history == [{"step": 2, "loss": 2.0}, {"step": 4, "loss": 3.0}, {"step": 5, "loss": 5.0}]
    assert loss_history([]) == []


def test_the_encoder_path_loads_none_of_the_qlora_stack_even_where_it_is_installed() -> None:
    code = (
        "import json, sys\n"
        "import fintune.model.encoder, fintune.model.assessment\n"
        "print(json.dumps([m for m in ('bitsandbytes', 'peft', 'trl') if m in sys.modules]))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=PROJECT_ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads(run.stdout.strip().splitlines()[-1]) == []

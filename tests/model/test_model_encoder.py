"""The encoder fallback trains and predicts with bitsandbytes, peft and trl made unimportable."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fintune.config import PROJECT_ROOT

pytestmark = pytest.mark.slow

SCRIPT = """
import sys
for name in ("bitsandbytes", "peft", "trl"):
    sys.modules[name] = None  # `import name` now raises ImportError
import json
from pathlib import Path
from fintune.config import load_settings
from fintune.model.encoder import EncoderClassifier, train_encoder

settings = load_settings("encoder", data_dir=Path(sys.argv[1]), output_dir=Path(sys.argv[2]))
_, card = train_encoder(settings, Path(sys.argv[2]) / "encoder", max_steps=3)
reloaded = EncoderClassifier.from_pretrained(Path(sys.argv[2]) / "encoder", settings)
labels = reloaded.predict_labels(["Net sales increased by 5 % .", "Operating profit fell ."])
loaded = [m for m in ("bitsandbytes", "peft", "trl") if sys.modules.get(m) is not None]
print(json.dumps({"labels": labels, "steps": card["global_steps"], "heavy": loaded}))
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
    assert result["steps"] == 3
    assert set(result["labels"]) <= {"negative", "neutral", "positive"} and len(result["labels"]) == 2
    assert (tmp_path / "encoder" / "fintune.json").is_file()

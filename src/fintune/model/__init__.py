"""Fine-tuning and inference: QLoRA (NF4 base + LoRA + TRL SFTTrainer), label-constrained scoring, and the
isolated encoder fallback.

Sub-modules, imported on demand so that this package imports nothing heavy:

- :mod:`fintune.model.loading`: where the base model comes from (hub id, packaged GGUF, random tiny model);
- :mod:`fintune.model.quantization`: 4-bit NF4 loading and analytic memory;
- :mod:`fintune.model.lora`: adapter configuration and the exact parameter report;
- :mod:`fintune.model.training`: SFTTrainer on prompt/completion records, checkpoints, model card;
- :mod:`fintune.model.inference`: :class:`~fintune.model.inference.SentimentClassifier`;
- :mod:`fintune.model.buckets`: length buckets, the batches both classifiers score;
- :mod:`fintune.model.calibration`: temperature scaling of the confidence, and its calibration error;
- :mod:`fintune.model.assessment`: test-split metrics and the comparison against the baselines;
- :mod:`fintune.model.encoder`: the CPU fallback, which never imports bitsandbytes, peft or trl.
"""

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

import logging

BNB_CPU_KERNEL_LOGGER = "bitsandbytes.backends.cpu.ops"
"""The logger bitsandbytes warns on when its optional CPU NF4 kernel cannot be fetched."""


class OptionalKernelNotice(logging.Filter):
    """Turns bitsandbytes' "Failed to load CPU gemm_4bit_forward" warning, printed by every model command on
    AVX512-BF16 CPUs without the `kernels` package or the hub, into a DEBUG line that says nothing failed."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Pass other records as they are; reword this one as DEBUG, shown only where DEBUG is on."""
        if not record.getMessage().startswith("Failed to load CPU gemm_4bit_forward"):
            return True
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        record.msg, record.args = (
            "bitsandbytes runs NF4 with its built-in CPU code; its optional kernel from the hub "
            "(kernels-community, needs `pip install kernels`) is not loaded", None,
        )
        return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)


logging.getLogger(BNB_CPU_KERNEL_LOGGER).addFilter(OptionalKernelNotice())

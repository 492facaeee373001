"""bitsandbytes' warning about its optional CPU kernel becomes a DEBUG line; its other warnings pass unchanged."""

from __future__ import annotations

import logging

import pytest

from fintune.model import BNB_CPU_KERNEL_LOGGER

MESSAGE = "Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you already `pip install`"


def test_the_optional_kernel_warning_is_not_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger(BNB_CPU_KERNEL_LOGGER)
    with caplog.at_level(logging.INFO):
        logger.warning(MESSAGE, "No module named 'kernels'")
        logger.warning("some other bitsandbytes warning")
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [("WARNING", "some other bitsandbytes warning")]
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger=BNB_CPU_KERNEL_LOGGER):
        logger.warning(MESSAGE, "No module named 'kernels'")
    (record,) = caplog.records
    assert record.levelname == "DEBUG" and "built-in CPU code" in record.getMessage()

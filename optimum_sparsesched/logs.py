"""Logging helpers shared by the modules that drive other libraries (accelerate, lm-eval)."""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Iterator


@contextmanager
def quiet(logger_name: str) -> Iterator[None]:
    """Only the errors of logger ``logger_name`` for the duration (its level restored after)."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)

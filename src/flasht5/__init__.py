"""flasht5: the fastest, most correct T5 / UL2 encoder-decoder for PyTorch.

Nothing is registered at import time; call :func:`register` to make ``AutoConfig`` / ``AutoModel*`` know the
``flasht5`` model type. The public classes are imported on first use, so ``import flasht5`` (and every
``flasht5`` command, and every data worker process) does not pay for importing transformers' model code.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "FlashT5Config": "flasht5.config",
    "FlashT5PreTrainedModel": "flasht5.modeling",
    "FlashT5Model": "flasht5.modeling",
    "FlashT5ForConditionalGeneration": "flasht5.modeling",
    "FlashT5EncoderModel": "flasht5.modeling",
    "FlashT5ForSequenceClassification": "flasht5.modeling",
    "FlashT5ForTokenClassification": "flasht5.modeling",
    "FlashT5ForQuestionAnswering": "flasht5.modeling",
}

__all__ = [*_LAZY, "register"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'flasht5' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)


def register() -> None:
    """Register the ``flasht5`` model type with transformers' Auto classes (idempotent)."""
    from transformers import (
        AutoConfig,
        AutoModel,
        AutoModelForQuestionAnswering,
        AutoModelForSeq2SeqLM,
        AutoModelForSequenceClassification,
        AutoModelForTextEncoding,
        AutoModelForTokenClassification,
    )

    from flasht5.config import FlashT5Config
    from flasht5.modeling import (
        FlashT5EncoderModel,
        FlashT5ForConditionalGeneration,
        FlashT5ForQuestionAnswering,
        FlashT5ForSequenceClassification,
        FlashT5ForTokenClassification,
        FlashT5Model,
    )

    AutoConfig.register("flasht5", FlashT5Config, exist_ok=True)
    for auto, cls in (
        (AutoModel, FlashT5Model),
        (AutoModelForSeq2SeqLM, FlashT5ForConditionalGeneration),
        (AutoModelForSequenceClassification, FlashT5ForSequenceClassification),
        (AutoModelForTokenClassification, FlashT5ForTokenClassification),
        (AutoModelForQuestionAnswering, FlashT5ForQuestionAnswering),
        (AutoModelForTextEncoding, FlashT5EncoderModel),
    ):
        auto.register(FlashT5Config, cls, exist_ok=True)

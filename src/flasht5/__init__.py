"""flasht5: the fastest, most correct T5 / UL2 encoder-decoder for PyTorch.

Nothing is registered at import time; call :func:`register` to make ``AutoConfig`` / ``AutoModel*`` know the
``flasht5`` model type.
"""

from flasht5.config import FlashT5Config
from flasht5.modeling import (
    FlashT5EncoderModel,
    FlashT5ForConditionalGeneration,
    FlashT5ForQuestionAnswering,
    FlashT5ForSequenceClassification,
    FlashT5ForTokenClassification,
    FlashT5Model,
    FlashT5PreTrainedModel,
)

__version__ = "0.1.0"

__all__ = [
    "FlashT5Config",
    "FlashT5EncoderModel",
    "FlashT5ForConditionalGeneration",
    "FlashT5ForQuestionAnswering",
    "FlashT5ForSequenceClassification",
    "FlashT5ForTokenClassification",
    "FlashT5Model",
    "FlashT5PreTrainedModel",
    "register",
]


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

"""flasht5: the fastest, most correct T5 / UL2 encoder-decoder for PyTorch.

``import flasht5`` registers the ``flasht5`` model type with transformers' Auto classes (``AutoConfig``,
``AutoModel``, ``AutoModelForSeq2SeqLM``, the task heads, ``AutoModelForTextEncoding``), so a folder flasht5 saved
loads by its path alone, as the ecosystem's convention is (DESIGN.md §2: the one import-time side effect). The
registration is lazy: it runs when transformers' Auto modules are imported (at once if they already are), so
``import flasht5`` itself, every ``flasht5`` command and every data worker process pay for no transformers model
code they do not use. :func:`register` does it eagerly (idempotent). The same hook gives PEFT, when it is imported,
T5's default target modules for the ``flasht5`` model type (LoRA: ``q`` and ``v``). The public classes are imported
on first use.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings
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

# transformers' Auto class -> the flasht5 class it maps the ``flasht5`` model type to.
AUTO_CLASSES = {
    "AutoModel": "FlashT5Model",
    "AutoModelForSeq2SeqLM": "FlashT5ForConditionalGeneration",
    "AutoModelForSequenceClassification": "FlashT5ForSequenceClassification",
    "AutoModelForTokenClassification": "FlashT5ForTokenClassification",
    "AutoModelForQuestionAnswering": "FlashT5ForQuestionAnswering",
    "AutoModelForTextEncoding": "FlashT5EncoderModel",
}
_CONFIG_AUTO = "transformers.models.auto.configuration_auto"
_MODEL_AUTO = "transformers.models.auto.modeling_auto"


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'flasht5' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)


def _register_config(configuration_auto: Any) -> None:
    from flasht5.config import FlashT5Config

    configuration_auto.AutoConfig.register("flasht5", FlashT5Config, exist_ok=True)


def _register_models(modeling_auto: Any) -> None:
    from flasht5 import modeling
    from flasht5.config import FlashT5Config

    _register_config(sys.modules[_CONFIG_AUTO])
    for auto, name in AUTO_CLASSES.items():
        getattr(modeling_auto, auto).register(FlashT5Config, getattr(modeling, name), exist_ok=True)


def register() -> None:
    """Register the ``flasht5`` model type with transformers' Auto classes now (idempotent; ``import flasht5``
    already does it the moment transformers' Auto modules are imported)."""
    _register_models(importlib.import_module(_MODEL_AUTO))


# transformers' T5 module names that PEFT's per-model-type defaults use, and flasht5's (the rest are the same: q, k,
# v, o, wi, wi_0, wi_1, wo).
_PEFT_NAMES = {"layer_norm": ["attn_norm", "cross_norm", "ffn_norm"], "final_layer_norm": ["final_norm"]}


def _register_peft(constants: Any) -> None:
    """PEFT picks default target modules by ``config.model_type`` (LoRA: T5's q and v): give ``flasht5`` the
    defaults of ``t5`` in every such table, translated to flasht5's module names."""
    for name, table in vars(constants).items():
        if not (name.startswith("TRANSFORMERS_MODELS_TO_") and isinstance(table, dict)) or "flasht5" in table:
            continue
        t5 = table.get("t5")
        if isinstance(t5, (list, tuple)) and all(isinstance(m, str) for m in t5):
            table["flasht5"] = [n for m in t5 for n in _PEFT_NAMES.get(m, [m])]


_HOOKS = {_CONFIG_AUTO: _register_config, _MODEL_AUTO: _register_models, "peft.utils.constants": _register_peft}


class _AutoImportHook(importlib.abc.MetaPathFinder):
    """Runs the registration right after transformers imports one of its Auto modules (a post-import hook: the
    module is found by the normal path finder, and its loader's ``exec_module`` is wrapped)."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        hook = _HOOKS.get(fullname)
        if hook is None:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run = spec.loader.exec_module

        def exec_module(module: Any) -> None:
            run(module)
            _safely(hook, module)

        spec.loader.exec_module = exec_module
        return spec


def _safely(hook: Any, module: Any) -> None:
    try:
        hook(module)
    except Exception as e:  # never break the user's transformers import over the registration
        warnings.warn(f"flasht5 could not register with transformers' Auto classes: {e!r}", stacklevel=2)


def _install() -> None:
    if not any(isinstance(f, _AutoImportHook) for f in sys.meta_path):
        sys.meta_path.insert(0, _AutoImportHook())
    for name, hook in _HOOKS.items():
        if name in sys.modules:
            _safely(hook, sys.modules[name])


_install()

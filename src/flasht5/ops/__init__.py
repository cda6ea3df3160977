"""Triton kernels, one file per family; each exposes one public function and its ``*_ref`` reference.

Attributes are imported on first use, so that ``flasht5.ops.relative_position`` (plain PyTorch, used by the model)
does not import Triton, and importing the package registers no custom op until a kernel is asked for.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "flash_attention": "attention",
    "flash_attention_ref": "attention",
    "rms_norm": "rms_norm",
    "rms_norm_ref": "rms_norm",
    "cross_entropy": "cross_entropy",
    "cross_entropy_ref": "cross_entropy",
    "linear_cross_entropy": "linear_cross_entropy",
    "linear_cross_entropy_ref": "linear_cross_entropy",
    "gated_act": "activations",
    "gated_act_ref": "activations",
    "relative_position_bucket": "relative_position",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"flasht5.ops.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'flasht5.ops' has no attribute {name!r}")

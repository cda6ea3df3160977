"""Triton kernels, one file per family: ``attention``, ``norm``, ``activations``, ``loss``; each public function
comes with its plain-PyTorch ``*_ref`` reference.

Attributes are imported on first use, so that ``flasht5.ops.relative_position`` (plain PyTorch, used by the model)
does not import Triton, and importing the package registers no custom op until a kernel is asked for. No submodule
shares a name with a public function (as in flash-attn): importing ``flasht5.ops.<module>`` binds the *module* as an
attribute of this package, which would shadow the lazy ``__getattr__`` below, so ``from flasht5.ops import rms_norm``
returned a module while the file was called ``rms_norm.py``.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "flash_attention": "attention",
    "flash_attention_ref": "attention",
    "flash_decode": "decode",
    "flash_decode_ref": "decode",
    "rms_norm": "norm",
    "rms_norm_ref": "norm",
    "cross_entropy": "loss",
    "cross_entropy_ref": "loss",
    "linear_cross_entropy": "loss",
    "linear_cross_entropy_ref": "loss",
    "gated_act": "activations",
    "gated_act_ref": "activations",
    "relative_position_bucket": "relative_position",
    "t5_bias_lut": "relative_position",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"flasht5.ops.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'flasht5.ops' has no attribute {name!r}")

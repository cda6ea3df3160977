"""Shared by the Triton launchers: where the kernels run (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``,
the CPU tests), the float dtypes they take and the (rows, cols) view they read."""

from __future__ import annotations

import os

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_kernel_device(t: Tensor, name: str) -> None:
    """Raise a ``ValueError`` naming ``name`` when the kernels cannot run on ``t``'s device."""
    if t.device.type != "cuda" and not interpreting():
        raise ValueError(
            f"{name} is on {t.device}: the Triton kernels need a CUDA tensor (or TRITON_INTERPRET=1 on CPU); "
            "the *_ref functions run anywhere"
        )


def check_float_tensor(t: object, name: str) -> None:
    """Raise a ``ValueError`` naming ``name`` unless ``t`` is a float32/float16/bfloat16 tensor."""
    if not isinstance(t, Tensor) or t.dtype not in FLOAT_DTYPES:
        got = t.dtype if isinstance(t, Tensor) else type(t).__name__
        raise ValueError(f"{name} must be a float32/float16/bfloat16 tensor, got {got}")


def rows_2d(t: Tensor, n_cols: int) -> Tensor:
    """``t`` (..., n_cols) as (rows, n_cols) with a unit column stride: a view whenever the strides allow it (any row
    stride, e.g. ``chunk()``/slice views of a fused projection), else one contiguous copy."""
    t2 = t.reshape(-1, n_cols)  # (N, n_cols)
    return t2 if t2.stride(-1) == 1 or t2.numel() == 0 else t2.contiguous()

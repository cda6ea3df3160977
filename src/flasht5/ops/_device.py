"""Where the Triton kernels run: CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1`` (the CPU tests)."""

from __future__ import annotations

import os

from torch import Tensor


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_kernel_device(t: Tensor, name: str) -> None:
    """Raise a ``ValueError`` naming ``name`` when the kernels cannot run on ``t``'s device."""
    if t.device.type != "cuda" and not interpreting():
        raise ValueError(
            f"{name} is on {t.device}: the Triton kernels need a CUDA tensor (or TRITON_INTERPRET=1 on CPU); "
            "the *_ref functions run anywhere"
        )

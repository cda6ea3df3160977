"""The error-ratio rule of DESIGN.md §5 (from flash-attention's tests), shared by the kernel tests."""

from __future__ import annotations

import torch

ATOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}  # times max|ref|


def assert_ratio(out, ref_hi, ref_same, dtype, name):
    """max|out - ref_hi| <= 2 * max|torch_same_dtype - ref_hi| + atol(dtype) * max|ref_hi|."""
    err = (out.double() - ref_hi.double()).abs().max().item()
    base = (ref_same.double() - ref_hi.double()).abs().max().item()
    atol = ATOL[dtype] * max(ref_hi.double().abs().max().item(), 1e-30)
    assert err <= 2 * base + atol, f"{name}: err {err:.3e} > 2 * {base:.3e} + {atol:.3e}"

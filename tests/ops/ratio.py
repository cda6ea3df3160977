"""Helpers shared by the kernel tests: the error-ratio rule of DESIGN.md §5 (from flash-attention's tests) and
random class labels with ignored tokens."""

from __future__ import annotations

import torch

ATOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}  # times max|ref|


def assert_ratio(out, ref_hi, ref_same, dtype, name):
    """max|out - ref_hi| <= 2 * max|torch_same_dtype - ref_hi| + atol(dtype) * max|ref_hi|."""
    err = (out.double() - ref_hi.double()).abs().max().item()
    base = (ref_same.double() - ref_hi.double()).abs().max().item()
    atol = ATOL[dtype] * max(ref_hi.double().abs().max().item(), 1e-30)
    assert err <= 2 * base + atol, f"{name}: err {err:.3e} > 2 * {base:.3e} + {atol:.3e}"


def random_labels(shape, n_classes, device, p_ignore=0.3, seed=0):
    """Labels in [0, n_classes), about ``p_ignore`` of them -100 (ignored); drawn on the CPU, so any device agrees."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, n_classes, shape, generator=g)
    y[torch.rand(shape, generator=g) < p_ignore] = -100
    return y.to(device)

"""Every Triton op names the problem when handed a CPU tensor outside the interpreter (DESIGN.md: clear errors)."""

import pytest
import torch

from flasht5.ops.activations import gated_act
from flasht5.ops.attention import flash_attention
from flasht5.ops.loss import cross_entropy, linear_cross_entropy
from flasht5.ops.norm import rms_norm

CASES = {
    "rms_norm": (lambda: rms_norm(torch.randn(2, 8), torch.ones(8)), "x is on cpu"),
    "cross_entropy": (lambda: cross_entropy(torch.randn(3, 5), torch.tensor([0, 1, 2])), "logits is on cpu"),
    "linear_cross_entropy": (
        lambda: linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 1, 2])),
        "hidden is on cpu",
    ),
    "gated_act": (lambda: gated_act(torch.randn(2, 8), torch.randn(2, 8), "silu"), "gate is on cpu"),
    "flash_attention": (
        lambda: flash_attention(*(torch.randn(1, 4, 2, 16) for _ in range(3))),
        "q is on cpu",
    ),
}


@pytest.mark.parametrize("op", sorted(CASES))
def test_cpu_tensor_without_interpreter_is_a_clear_error(op, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    call, message = CASES[op]
    with pytest.raises(ValueError, match=f"{message}: the Triton kernels need a CUDA tensor"):
        call()

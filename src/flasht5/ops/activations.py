"""Gated activations of T5's gated MLPs in Triton: ``out = act(gate) * up``, forward and backward.

``kind``:
- ``"gelu_tanh"`` (aliases ``"gelu_new"``, ``"gelu_pytorch_tanh"``): T5 v1.1 / FLAN-T5 / mT5 / umT5 "gated-gelu",
  Hugging Face's ``NewGELUActivation``: ``0.5 * x * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 * x**3)))``;
- ``"silu"`` (alias ``"swish"``): UL2's "gated-silu", ``x * sigmoid(x)``.

The kernel reads ``gate`` and ``up`` once, computes in fp32 and rounds the product once to the inputs' dtype (HF
evaluates the same formula op by op in bf16, rounding after each op; the error-ratio test compares both against
fp32). Backward recomputes the activation from the saved inputs (nothing extra is stored) and writes
``dgate = dout * up * act'(gate)`` and ``dup = dout * act(gate)`` in one pass.

Shapes and dtypes: ``gate`` and ``up`` of one shape (..., F) and one dtype (fp32 / fp16 / bf16). Rows may have any
stride (``gate, up = x.chunk(2, -1)`` of a fused projection works without a copy); a non-unit stride along F is
copied to contiguous first. The output is contiguous.

Tuned and tested on an H200 (sm90); plain elementwise code, sm80-safe. Registered as ``torch.library.custom_op``
``flasht5::gated_act_fwd`` / ``flasht5::gated_act_bwd`` with fake implementations and an autograd formula, so
``torch.compile(fullgraph=True)`` traces through it.

Credits: GLU variants (Shazeer, 2020, "GLU Variants Improve Transformer"); the tanh GELU approximation (Hendrycks &
Gimpel, 2016); fused gate-multiply kernels as in Liger-Kernel's GEGLU / SwiGLU.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from flasht5.ops._device import check_float_tensor, check_kernel_device, rows_2d

__all__ = ["gated_act", "gated_act_ref"]

_KINDS = {"gelu_tanh": 0, "gelu_new": 0, "gelu_pytorch_tanh": 0, "silu": 1, "swish": 1}


def _canonical_kind(kind: str) -> str:
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {sorted(_KINDS)}, got {kind!r}")
    return "gelu_tanh" if _KINDS[kind] == 0 else "silu"


def gated_act_ref(gate: Tensor, up: Tensor, kind: str) -> Tensor:
    """Plain PyTorch, evaluated in the inputs' dtype exactly as HF's ``T5DenseGatedActDense`` does."""
    if _canonical_kind(kind) == "gelu_tanh":
        # HF NewGELUActivation, op for op
        act = 0.5 * gate * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (gate + 0.044715 * torch.pow(gate, 3.0))))
    else:
        act = F.silu(gate)
    return act * up


@triton.jit
def _tanh(x):
    # tanh from one exp of a non-positive argument: no overflow for any x (tl has no portable tanh)
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x >= 0, t, -t)


@triton.jit
def _act_and_grad(g, KIND: tl.constexpr, NEED_GRAD: tl.constexpr):
    if KIND == 0:
        k = 0.7978845608028654  # sqrt(2 / pi)
        t = _tanh(k * (g + 0.044715 * g * g * g))
        act = 0.5 * g * (1.0 + t)
        if NEED_GRAD:
            dact = 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * k * (1.0 + 3.0 * 0.044715 * g * g)
        else:
            dact = act
    else:
        s = tl.sigmoid(g)
        act = g * s
        if NEED_GRAD:
            dact = s * (1.0 + g * (1.0 - s))
        else:
            dact = act
    return act, dact


@triton.jit
def _gated_fwd_kernel(
    GATE,
    UP,
    OUT,
    n_rows,
    n_cols,
    stride_g,
    stride_u,
    stride_o,
    KIND: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    r64 = rows.to(tl.int64)[:, None]
    g = tl.load(GATE + r64 * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(UP + r64 * stride_u + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    act, _ = _act_and_grad(g, KIND, False)
    tl.store(OUT + r64 * stride_o + cols[None, :], (act * u).to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _gated_bwd_kernel(
    DOUT,
    GATE,
    UP,
    DGATE,
    DUP,
    n_rows,
    n_cols,
    stride_do,
    stride_g,
    stride_u,
    stride_dg,
    stride_du,
    KIND: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    r64 = rows.to(tl.int64)[:, None]
    do = tl.load(DOUT + r64 * stride_do + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    g = tl.load(GATE + r64 * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(UP + r64 * stride_u + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    act, dact = _act_and_grad(g, KIND, True)
    tl.store(DGATE + r64 * stride_dg + cols[None, :], (do * u * dact).to(DGATE.dtype.element_ty), mask=mask)
    tl.store(DUP + r64 * stride_du + cols[None, :], (do * act).to(DUP.dtype.element_ty), mask=mask)


def _config(n_cols: int) -> tuple[int, int, int]:
    block_n = min(triton.next_power_of_2(n_cols), 1024)
    block_m = max(1, 2048 // block_n)
    return block_m, block_n, 4


@torch.library.custom_op("flasht5::gated_act_fwd", mutates_args=())
def _gated_act_fwd(gate: Tensor, up: Tensor, kind: int) -> Tensor:
    n_cols = gate.shape[-1]
    g2, u2 = rows_2d(gate, n_cols), rows_2d(up, n_cols)
    out = torch.empty(g2.shape, dtype=gate.dtype, device=gate.device)
    if out.numel() > 0:
        block_m, block_n, num_warps = _config(n_cols)
        grid = (triton.cdiv(g2.shape[0], block_m), triton.cdiv(n_cols, block_n))
        _gated_fwd_kernel[grid](
            g2, u2, out, g2.shape[0], n_cols, g2.stride(0), u2.stride(0), out.stride(0),
            KIND=kind, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
        )  # fmt: skip
    return out.view(gate.shape)


@_gated_act_fwd.register_fake
def _(gate: Tensor, up: Tensor, kind: int) -> Tensor:
    return gate.new_empty(gate.shape)


@torch.library.custom_op("flasht5::gated_act_bwd", mutates_args=())
def _gated_act_bwd(dout: Tensor, gate: Tensor, up: Tensor, kind: int) -> tuple[Tensor, Tensor]:
    n_cols = gate.shape[-1]
    d2, g2, u2 = rows_2d(dout, n_cols), rows_2d(gate, n_cols), rows_2d(up, n_cols)
    dgate = torch.empty(g2.shape, dtype=gate.dtype, device=gate.device)
    dup = torch.empty(g2.shape, dtype=up.dtype, device=up.device)
    if dgate.numel() > 0:
        block_m, block_n, num_warps = _config(n_cols)
        grid = (triton.cdiv(g2.shape[0], block_m), triton.cdiv(n_cols, block_n))
        _gated_bwd_kernel[grid](
            d2, g2, u2, dgate, dup, g2.shape[0], n_cols, d2.stride(0), g2.stride(0), u2.stride(0), dgate.stride(0),
            dup.stride(0), KIND=kind, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
        )  # fmt: skip
    return dgate.view(gate.shape), dup.view(up.shape)


@_gated_act_bwd.register_fake
def _(dout: Tensor, gate: Tensor, up: Tensor, kind: int) -> tuple[Tensor, Tensor]:
    return gate.new_empty(gate.shape), up.new_empty(up.shape)


def _setup_context(ctx, inputs, output) -> None:
    gate, up, kind = inputs
    ctx.kind = kind
    ctx.save_for_backward(gate, up)


def _backward(ctx, grad_out: Tensor):
    gate, up = ctx.saved_tensors
    dgate, dup = torch.ops.flasht5.gated_act_bwd(grad_out, gate, up, ctx.kind)
    return dgate, dup, None


torch.library.register_autograd("flasht5::gated_act_fwd", _backward, setup_context=_setup_context)


def gated_act(gate: Tensor, up: Tensor, kind: str) -> Tensor:
    """``act(gate) * up`` for ``kind`` in {"gelu_tanh" (= "gelu_new", "gelu_pytorch_tanh"), "silu" (= "swish")}.

    ``gate`` and ``up``: same shape (..., F) and dtype (fp32/fp16/bf16); differentiable in both. Raises
    ``ValueError`` for an unknown ``kind`` or mismatched shapes/dtypes/devices.
    """
    kind_id = _KINDS[_canonical_kind(kind)]
    check_float_tensor(gate, "gate")
    check_float_tensor(up, "up")
    if gate.shape != up.shape or gate.dim() < 1:
        raise ValueError(f"gate and up must have one shape (..., F); got {tuple(gate.shape)} and {tuple(up.shape)}")
    if gate.dtype != up.dtype:
        raise ValueError(f"up dtype {up.dtype} must match gate dtype {gate.dtype}")
    if gate.device != up.device:
        raise ValueError(f"up is on {up.device} but gate is on {gate.device}")
    check_kernel_device(gate, "gate")
    return torch.ops.flasht5.gated_act_fwd(gate, up, kind_id)

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

Tuned and tested on an H200 (sm90); plain elementwise code, sm80-safe. Two routes, one implementation (the
launchers ``_forward`` / ``_backward``): eager calls go through a ``torch.autograd.Function`` with
:class:`flasht5.ops._launch.FastKernel` launches (no autograd at all without gradients); while ``torch.compile``
traces (or for tensor subclasses) the same launchers run inside the ``torch.library.custom_op``
``flasht5::gated_act_fwd`` / ``flasht5::gated_act_bwd``, with fake implementations and an autograd formula, so
``torch.compile(fullgraph=True)`` traces through it.

Credits: GLU variants (Shazeer, 2020, "GLU Variants Improve Transformer"); the tanh GELU approximation (Hendrycks &
Gimpel, 2016); fused gate-multiply kernels as in Liger-Kernel's GEGLU / SwiGLU.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from flasht5.ops._device import (
    FLOAT_DTYPES,
    allow_inductor_fallback,
    cdiv,
    check_float_tensor,
    check_kernel_device,
    custom_op,
    function_apply,
    next_pow2,
    row_major,
    use_custom_op,
)
from flasht5.ops._launch import FastKernel

__all__ = ["gated_act", "gated_act_ref"]

_KINDS = {"gelu_tanh": 0, "gelu_new": 0, "gelu_pytorch_tanh": 0, "silu": 1, "swish": 1}
KINDS = tuple(_KINDS)  # the activation names the kernel computes (the model falls back to torch for the others)


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


@functools.cache
def _config(n_cols: int) -> tuple[int, int, int]:
    block_n = min(next_pow2(n_cols), 1024)
    block_m = max(1, 2048 // block_n)
    return block_m, block_n, 4


# --------------------------------------------------------------------------------------------------------------
# Launchers: the one implementation, called by the eager autograd.Function and by the custom ops
# --------------------------------------------------------------------------------------------------------------
_FWD = FastKernel(_gated_fwd_kernel)
_BWD = FastKernel(_gated_bwd_kernel)


def _empty_rows(like: Tensor) -> Tensor:
    """A row-major tensor of ``like``'s shape and dtype: ``empty_like`` where ``like`` is contiguous (a third of
    ``torch.empty(shape, dtype=, device=)``'s host cost), else ``torch.empty``."""
    if like.is_contiguous():
        return torch.empty_like(like)
    return torch.empty(like.shape, dtype=like.dtype, device=like.device)


def _forward(gate: Tensor, up: Tensor, kind: int) -> Tensor:
    n_cols = gate.shape[-1]
    g2, stride_g = row_major(gate, n_cols)
    u2, stride_u = row_major(up, n_cols)
    out = _empty_rows(gate)  # row-major: row stride n_cols
    n_rows = out.numel() // n_cols if n_cols else 0
    if n_rows > 0:
        block_m, block_n, num_warps = _config(n_cols)
        _FWD(
            (cdiv(n_rows, block_m), cdiv(n_cols, block_n)),
            (g2, u2, out, n_rows, n_cols, stride_g, stride_u, n_cols),
            (kind, block_m, block_n),
            num_warps=num_warps,
        )
    return out


def _backward(dout: Tensor, gate: Tensor, up: Tensor, kind: int) -> tuple[Tensor, Tensor]:
    n_cols = gate.shape[-1]
    d2, stride_d = row_major(dout, n_cols)
    g2, stride_g = row_major(gate, n_cols)
    u2, stride_u = row_major(up, n_cols)
    dgate = _empty_rows(gate)
    dup = _empty_rows(up)
    n_rows = dgate.numel() // n_cols if n_cols else 0
    if n_rows > 0:
        block_m, block_n, num_warps = _config(n_cols)
        _BWD(
            (cdiv(n_rows, block_m), cdiv(n_cols, block_n)),
            (d2, g2, u2, dgate, dup, n_rows, n_cols, stride_d, stride_g, stride_u, n_cols, n_cols),
            (kind, block_m, block_n),
            num_warps=num_warps,
        )
    return dgate, dup


class _GatedActFn(torch.autograd.Function):
    """The eager route: one Python autograd node around the launchers."""

    @staticmethod
    def forward(ctx, gate, up, kind):
        ctx.kind = kind
        ctx.save_for_backward(gate, up)
        return _forward(gate, up, kind)

    @staticmethod
    def backward(ctx, grad_out):
        gate, up = ctx.saved_tensors
        dgate, dup = _backward(grad_out, gate, up, ctx.kind)
        return dgate, dup, None


_apply = function_apply(_GatedActFn)


# --------------------------------------------------------------------------------------------------------------
# Custom ops (the route torch.compile traces)
# --------------------------------------------------------------------------------------------------------------
@custom_op("flasht5::gated_act_fwd", mutates_args=())
def _gated_act_fwd(gate: Tensor, up: Tensor, kind: int) -> Tensor:
    return _forward(gate, up, kind)


@_gated_act_fwd.register_fake
def _(gate: Tensor, up: Tensor, kind: int) -> Tensor:
    allow_inductor_fallback()
    return gate.new_empty(gate.shape)


@custom_op("flasht5::gated_act_bwd", mutates_args=())
def _gated_act_bwd(dout: Tensor, gate: Tensor, up: Tensor, kind: int) -> tuple[Tensor, Tensor]:
    return _backward(dout, gate, up, kind)


@_gated_act_bwd.register_fake
def _(dout: Tensor, gate: Tensor, up: Tensor, kind: int) -> tuple[Tensor, Tensor]:
    allow_inductor_fallback()
    return gate.new_empty(gate.shape), up.new_empty(up.shape)


def _setup_context(ctx, inputs, output) -> None:
    gate, up, kind = inputs
    ctx.kind = kind
    ctx.save_for_backward(gate, up)


def _op_backward(ctx, grad_out: Tensor):
    gate, up = ctx.saved_tensors
    dgate, dup = torch.ops.flasht5.gated_act_bwd(grad_out, gate, up, ctx.kind)
    return dgate, dup, None


torch.library.register_autograd("flasht5::gated_act_fwd", _op_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------------------------
# Public function
# --------------------------------------------------------------------------------------------------------------
def gated_act(gate: Tensor, up: Tensor, kind: str) -> Tensor:
    """``act(gate) * up`` for ``kind`` in {"gelu_tanh" (= "gelu_new", "gelu_pytorch_tanh"), "silu" (= "swish")}.

    ``gate`` and ``up``: same shape (..., F) and dtype (fp32/fp16/bf16); differentiable in both. Raises
    ``ValueError`` for an unknown ``kind`` or mismatched shapes/dtypes/devices.
    """
    kind_id = _KINDS.get(kind)
    if not (  # the usual call in one expression; anything else goes through the checks that name the problem
        kind_id is not None
        and type(gate) is Tensor
        and type(up) is Tensor
        and gate.is_cuda
        and gate.dtype in FLOAT_DTYPES
        and gate.dtype == up.dtype
        and gate.shape == up.shape
        and gate.dim() >= 1
        and gate.device == up.device
    ):
        _check(gate, up, kind_id, kind)
    if use_custom_op(gate):
        return torch.ops.flasht5.gated_act_fwd(gate, up, kind_id)
    if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
        return _apply(gate, up, kind_id)
    return _forward(gate, up, kind_id)  # inference: no autograd node at all


def _check(gate: Tensor, up: Tensor, kind_id: int | None, kind: str) -> None:
    if kind_id is None:
        raise ValueError(f"kind must be one of {sorted(_KINDS)}, got {kind!r}")
    check_float_tensor(gate, "gate")
    check_float_tensor(up, "up")
    if gate.shape != up.shape or gate.dim() < 1:
        raise ValueError(f"gate and up must have one shape (..., F); got {tuple(gate.shape)} and {tuple(up.shape)}")
    if gate.dtype != up.dtype:
        raise ValueError(f"up dtype {up.dtype} must match gate dtype {gate.dtype}")
    if gate.device != up.device:
        raise ValueError(f"up is on {up.device} but gate is on {gate.device}")
    check_kernel_device(gate, "gate")

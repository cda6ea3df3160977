"""T5 RMSNorm (no mean, no bias) in Triton, optionally fused with the residual add.

What it computes, exactly as Hugging Face's ``T5LayerNorm`` does it::

    var = x.float().pow(2).mean(-1)          # fp32, whatever x's dtype
    y   = x.float() * rsqrt(var + eps)       # fp32 (bf16/fp16 * fp32 promotes to fp32)
    if weight.dtype in (fp16, bf16):
        y = y.to(weight.dtype)               # rounded to the weight's dtype *before* the multiply
    out = weight * y

Output dtype (HF's, reproduced on purpose): ``weight.dtype`` when the weight is fp16/bf16, **fp32** when the
weight is fp32 -- also for bf16/fp16 ``x``, because HF's ``weight * y`` promotes to fp32 there. Callers that keep
the norm weight in fp32 under a bf16 model (mixed precision) therefore get an fp32 activation, as with HF.

With ``residual`` given, ``h = x + residual`` is formed first (in ``torch.promote_types(x.dtype,
residual.dtype)``, rounded once as torch's add rounds) and the call returns ``(rms_norm(h), h)``: one read of
each input and one write of each output instead of a separate add kernel.

Backward returns dx, dweight and d residual (dweight accumulated in fp32 per program over a persistent grid,
then summed; dx/d residual are ``dL/dh`` in the input's dtype). Forward saves only the normalised input and one
fp32 rstd per row.

Shapes and dtypes: ``x`` (..., D) fp32/fp16/bf16 with any leading dims (D up to 65536; tested 64..8192 and
D=3000, which is not a power of two), ``weight`` (D,) fp32/fp16/bf16, ``residual`` shaped like ``x``. Rows may
have any stride; a non-unit stride along D is copied to contiguous first.

Tuned and tested on an H200 (sm90): one row block in registers per program, and a backward loop software-pipelined
through shared memory (at most 96 KB per program). Nothing beyond sm80 is used, so A100s run the same code
(untested there). Registered as ``torch.library.custom_op`` ``flasht5::rms_norm_fwd`` /
``flasht5::rms_norm_bwd`` with fake implementations and an autograd formula, so ``torch.compile(fullgraph=True)``
traces through it. Defining the ops is the only thing that happens at import (needed for the compiler to see
them); nothing is launched and no global setting changes.

Credits: RMSNorm (Zhang & Sennrich, 2019, "Root Mean Square Layer Normalization"); the persistent-grid dweight
reduction follows Triton's layer-norm tutorial and Liger-Kernel's RMSNorm; the residual fusion follows FAT5 and
Liger's fused add + RMSNorm.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from flasht5.ops._device import check_float_tensor, check_kernel_device, rows_2d

__all__ = ["rms_norm", "rms_norm_ref"]

_MAX_D = 65536

# Set by benchmarks to sweep launch settings: forward (BLOCK_M, num_warps); backward (BLOCK_M, num_warps,
# num_stages, programs per SM).
_FWD_OVERRIDE: tuple[int, int] | None = None
_BWD_OVERRIDE: tuple[int, int, int, int] | None = None


# --------------------------------------------------------------------------------------------------------------
# Reference (plain PyTorch, HF T5LayerNorm semantics)
# --------------------------------------------------------------------------------------------------------------
def rms_norm_ref(
    x: Tensor, weight: Tensor, eps: float = 1e-6, residual: Tensor | None = None
) -> Tensor | tuple[Tensor, Tensor]:
    """Plain-PyTorch T5 RMSNorm, line for line Hugging Face's ``T5LayerNorm.forward`` (plus the residual add)."""
    h = x if residual is None else x + residual
    variance = h.to(torch.float32).pow(2).mean(-1, keepdim=True)
    y = h * torch.rsqrt(variance + eps)
    if weight.dtype in (torch.float16, torch.bfloat16):
        y = y.to(weight.dtype)
    out = weight * y
    return out if residual is None else (out, h)


def _out_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    # HF: y is fp32 after the rsqrt multiply; a half weight casts it down, an fp32 weight keeps fp32.
    return weight_dtype if weight_dtype in (torch.float16, torch.bfloat16) else torch.float32


# --------------------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------------------
@triton.jit
def _rms_norm_fwd_kernel(
    X,
    R,
    W,
    Y,
    H,
    RSTD,
    n_rows,
    n_cols,
    stride_x,
    stride_r,
    stride_y,
    stride_h,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    CAST_Y: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    col_mask = cols < n_cols
    mask = row_mask[:, None] & col_mask[None, :]
    rows64 = rows.to(tl.int64)[:, None]  # int64: rows * stride can pass 2**31

    x = tl.load(X + rows64 * stride_x + cols[None, :], mask=mask, other=0.0, eviction_policy="evict_first")
    x = x.to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(R + rows64 * stride_r + cols[None, :], mask=mask, other=0.0, eviction_policy="evict_first")
        r = r.to(tl.float32)
        # round once to h's dtype, exactly like torch's x + residual, and normalise the rounded value
        h = (x + r).to(H.dtype.element_ty)
        tl.store(H + rows64 * stride_h + cols[None, :], h, mask=mask)
        x = h.to(tl.float32)

    var = tl.sum(x * x, axis=1) / n_cols
    rstd = tl.rsqrt(var + eps)
    tl.store(RSTD + rows, rstd, mask=row_mask)

    y = x * rstd[:, None]
    w = tl.load(W + cols, mask=col_mask, other=0.0)
    if CAST_Y:
        # HF rounds the normalised value to the (half) weight dtype before multiplying
        y = y.to(W.dtype.element_ty).to(tl.float32)
    out = y * w.to(tl.float32)
    tl.store(Y + rows64 * stride_y + cols[None, :], out.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_bwd_kernel(
    DY,
    H,
    W,
    RSTD,
    DH_IN,
    DH,
    DW_PART,
    n_rows,
    n_cols,
    stride_dy,
    stride_h,
    stride_dhin,
    stride_dh,
    HAS_DH_IN: tl.constexpr,
    CAST_Y: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    # Persistent grid: each program walks row blocks pid, pid + P, ... and keeps its dweight partial in
    # registers, so dweight costs one (P, D) fp32 write instead of an (N, D) one. The loop is software-pipelined
    # (NUM_STAGES row blocks of h and dy in flight through shared memory): without it a program waits for each
    # block's loads before its reduction, and fwd+bwd ran 10-18% slower on the H200 at d_model 768/1024.
    pid = tl.program_id(0)
    n_progs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < n_cols
    w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for start in tl.range(pid * BLOCK_M, n_rows, n_progs * BLOCK_M, num_stages=NUM_STAGES):
        rows = start + tl.arange(0, BLOCK_M)
        row_mask = rows < n_rows
        mask = row_mask[:, None] & col_mask[None, :]
        rows64 = rows.to(tl.int64)[:, None]
        h = tl.load(H + rows64 * stride_h + cols[None, :], mask=mask, other=0.0, eviction_policy="evict_first")
        dy = tl.load(DY + rows64 * stride_dy + cols[None, :], mask=mask, other=0.0, eviction_policy="evict_first")
        h = h.to(tl.float32)
        dy = dy.to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)
        xhat = h * rstd[:, None]
        if CAST_Y:
            dw_acc += dy * xhat.to(W.dtype.element_ty).to(tl.float32)
        else:
            dw_acc += dy * xhat
        g = dy * w[None, :]  # dL/d xhat (the cast to the weight dtype passes gradients through unchanged)
        c = tl.sum(g * xhat, axis=1) / n_cols
        dh = (g - xhat * c[:, None]) * rstd[:, None]
        if HAS_DH_IN:
            dh += tl.load(DH_IN + rows64 * stride_dhin + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(DH + rows64 * stride_dh + cols[None, :], dh.to(DH.dtype.element_ty), mask=mask)
    tl.store(DW_PART + pid.to(tl.int64) * n_cols + cols, tl.sum(dw_acc, axis=0), mask=col_mask)


@triton.jit
def _dw_sum_kernel(DW_PART, DW, n_parts, n_cols, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    # dweight = sum of the backward programs' partials, cast to the weight's dtype: one launch, and with
    # BLOCK_P >= n_parts one load per program (~2 us on the H200, against ~10 us for torch's sum + cast).
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < n_cols
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    for p in range(0, n_parts, BLOCK_P):
        parts = p + tl.arange(0, BLOCK_P)
        mask = (parts < n_parts)[:, None] & col_mask[None, :]
        acc += tl.sum(tl.load(DW_PART + parts[:, None] * n_cols + cols[None, :], mask=mask, other=0.0), axis=0)
    tl.store(DW + cols, acc.to(DW.dtype.element_ty), mask=col_mask)


# --------------------------------------------------------------------------------------------------------------
# Launch configuration
# --------------------------------------------------------------------------------------------------------------
def _block_config(n_cols: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps): ~2048 elements per program (a row block), 16 per thread.

    H200 sweeps (d_model 768/1024/4096, bf16; benchmarks/bench_ops.py --only sweep): within 2% of the best of ~40
    forward shapes at each size, and the best backward shape at 768/1024 (1% off at 4096); twice the rows per
    program (32 elements per thread) made fwd+bwd 11-17% slower, and a persistent forward was never faster.
    """
    block_n = triton.next_power_of_2(n_cols)
    block_m = max(1, min(16, 2048 // block_n))
    return block_m, block_n, max(2, min(32, block_m * block_n // 512))


def _fwd_config(n_cols: int) -> tuple[int, int, int]:
    if _FWD_OVERRIDE is not None:
        return _FWD_OVERRIDE[0], triton.next_power_of_2(n_cols), _FWD_OVERRIDE[1]
    return _block_config(n_cols)


def _bwd_config(n_cols: int, bytes_per_col: int, device: torch.device) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages, programs) of the persistent, software-pipelined backward.

    ``bytes_per_col``: bytes one row element brings in through the pipelined loads (h, dy, and dh_in if any).
    Three stages while they take at most 96 KB of shared memory, and as many programs per SM as fit in 200 KB of
    its shared memory, at most 4 (the H200 has 228 KB): at d_model 4096 that is 4 programs of 48 KB (fwd+bwd
    0.68 ms, against 0.71 with 3).
    """
    if _BWD_OVERRIDE is not None:
        block_m, num_warps, num_stages, per_sm = _BWD_OVERRIDE
        block_n = triton.next_power_of_2(n_cols)
    else:
        block_m, block_n, num_warps = _block_config(n_cols)
        stage_bytes = block_m * block_n * bytes_per_col
        num_stages = 3 if 3 * stage_bytes <= 96 * 1024 else 1
        per_sm = max(1, min(4, (200 * 1024) // (num_stages * stage_bytes)))
    if device.type == "cuda":
        n_progs = torch.cuda.get_device_properties(device).multi_processor_count * per_sm
    else:
        n_progs = 4  # interpreter: few programs keep CPU tests fast
    return block_m, block_n, num_warps, num_stages, n_progs


# --------------------------------------------------------------------------------------------------------------
# Custom ops
# --------------------------------------------------------------------------------------------------------------
@torch.library.custom_op("flasht5::rms_norm_fwd", mutates_args=())
def _rms_norm_fwd(x: Tensor, weight: Tensor, residual: Tensor | None, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (y, h, rstd); h is x + residual, or an empty tensor without residual (outputs may not alias x)."""
    n_cols = x.shape[-1]
    x2 = rows_2d(x, n_cols)
    weight = weight.contiguous()
    n_rows = x2.shape[0]
    y = torch.empty((n_rows, n_cols), dtype=_out_dtype(weight.dtype), device=x.device)
    rstd = torch.empty((n_rows,), dtype=torch.float32, device=x.device)
    if residual is not None:
        r2 = rows_2d(residual, n_cols)
        h = torch.empty((n_rows, n_cols), dtype=torch.promote_types(x.dtype, residual.dtype), device=x.device)
    else:
        r2, h = x2, x.new_empty(0)
    if n_rows > 0:
        block_m, block_n, num_warps = _fwd_config(n_cols)
        _rms_norm_fwd_kernel[(triton.cdiv(n_rows, block_m),)](
            x2,
            r2,
            weight,
            y,
            h if residual is not None else y,
            rstd,
            n_rows,
            n_cols,
            x2.stride(0),
            r2.stride(0),
            y.stride(0),
            h.stride(0) if residual is not None else 0,
            eps,
            HAS_RESIDUAL=residual is not None,
            CAST_Y=weight.dtype in (torch.float16, torch.bfloat16),
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            num_warps=num_warps,
        )
    y = y.view(x.shape)
    h = h.view(x.shape) if residual is not None else h
    return y, h, rstd.view(x.shape[:-1])


@_rms_norm_fwd.register_fake
def _(x: Tensor, weight: Tensor, residual: Tensor | None, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    y = x.new_empty(x.shape, dtype=_out_dtype(weight.dtype))
    if residual is not None:
        h = x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, residual.dtype))
    else:
        h = x.new_empty(0)
    return y, h, x.new_empty(x.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("flasht5::rms_norm_bwd", mutates_args=())
def _rms_norm_bwd(dy: Tensor, h: Tensor, weight: Tensor, rstd: Tensor, dh_in: Tensor | None) -> tuple[Tensor, Tensor]:
    """Returns (dL/dh in h's dtype, dL/dweight in weight's dtype); dh_in is the gradient flowing into h itself."""
    n_cols = h.shape[-1]
    h2 = rows_2d(h, n_cols)
    weight = weight.contiguous()
    dy2 = rows_2d(dy, n_cols)
    n_rows = h2.shape[0]
    rstd1 = rstd.reshape(-1).contiguous()
    dh = torch.empty((n_rows, n_cols), dtype=h.dtype, device=h.device)
    dhin2 = rows_2d(dh_in, n_cols) if dh_in is not None else dh
    bytes_per_col = h.element_size() + dy.element_size() + (dh_in.element_size() if dh_in is not None else 0)
    block_m, block_n, num_warps, num_stages, n_progs = _bwd_config(n_cols, bytes_per_col, h.device)
    n_progs = max(1, min(n_progs, triton.cdiv(n_rows, block_m)))
    dw_part = torch.empty((n_progs, n_cols), dtype=torch.float32, device=h.device)
    dweight = torch.empty_like(weight)
    if n_rows > 0:
        _rms_norm_bwd_kernel[(n_progs,)](
            dy2,
            h2,
            weight,
            rstd1,
            dhin2,
            dh,
            dw_part,
            n_rows,
            n_cols,
            dy2.stride(0),
            h2.stride(0),
            dhin2.stride(0),
            dh.stride(0),
            HAS_DH_IN=dh_in is not None,
            CAST_Y=weight.dtype in (torch.float16, torch.bfloat16),
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            NUM_STAGES=num_stages,
            num_warps=num_warps,
        )
        block_p = min(1024, triton.next_power_of_2(n_progs))
        block_c = 16 if h.is_cuda else block_n  # interpreter: one program
        _dw_sum_kernel[(triton.cdiv(n_cols, block_c),)](
            dw_part, dweight, n_progs, n_cols, BLOCK_P=block_p, BLOCK_C=block_c, num_warps=8
        )
    else:
        dweight.zero_()
    return dh.view(h.shape), dweight


@_rms_norm_bwd.register_fake
def _(dy: Tensor, h: Tensor, weight: Tensor, rstd: Tensor, dh_in: Tensor | None) -> tuple[Tensor, Tensor]:
    return h.new_empty(h.shape), weight.new_empty(weight.shape)


def _setup_context(ctx, inputs, output) -> None:
    x, weight, residual, _eps = inputs
    _y, h, rstd = output
    ctx.set_materialize_grads(False)  # no zero-filled grads for rstd, or for y / h when only one is used
    ctx.has_residual = residual is not None
    ctx.x_dtype = x.dtype
    ctx.res_dtype = residual.dtype if residual is not None else None
    ctx.save_for_backward(h if residual is not None else x, weight, rstd)


def _backward(ctx, grad_y: Tensor, grad_h: Tensor, _grad_rstd: Tensor):
    h, weight, rstd = ctx.saved_tensors
    dh_in = grad_h if ctx.has_residual and grad_h is not None else None
    if grad_y is None:  # only h = x + residual was used: its gradient passes straight through
        if dh_in is None:
            return None, None, None, None
        return dh_in.to(ctx.x_dtype), None, dh_in.to(ctx.res_dtype), None
    dh, dweight = torch.ops.flasht5.rms_norm_bwd(grad_y, h, weight, rstd, dh_in)
    dx = dh.to(ctx.x_dtype)
    dres = dh.to(ctx.res_dtype) if ctx.has_residual else None
    return dx, dweight, dres, None


torch.library.register_autograd("flasht5::rms_norm_fwd", _backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------------------------
# Public function
# --------------------------------------------------------------------------------------------------------------
def _check(x: Tensor, weight: Tensor, residual: Tensor | None) -> None:
    check_float_tensor(x, "x")
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (..., d_model)")
    if not isinstance(weight, Tensor) or weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"weight must have shape ({x.shape[-1]},) to match x's last dim, got {tuple(weight.shape)}")
    check_float_tensor(weight, "weight")
    if x.shape[-1] > _MAX_D:
        raise ValueError(f"x's last dim (d_model={x.shape[-1]}) exceeds the supported maximum {_MAX_D}")
    if weight.device != x.device:
        raise ValueError(f"weight is on {weight.device} but x is on {x.device}")
    if residual is not None:
        if not isinstance(residual, Tensor) or residual.shape != x.shape:
            raise ValueError(f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
        check_float_tensor(residual, "residual")
        if residual.device != x.device:
            raise ValueError(f"residual is on {residual.device} but x is on {x.device}")
    check_kernel_device(x, "x")


def rms_norm(
    x: Tensor, weight: Tensor, eps: float = 1e-6, residual: Tensor | None = None
) -> Tensor | tuple[Tensor, Tensor]:
    """T5 RMSNorm of ``x`` (..., D) with ``weight`` (D,); see the module docstring for the exact dtype rules.

    Returns ``weight * x / rms(x)``; with ``residual`` it returns ``(rms_norm(x + residual), x + residual)``.
    Differentiable in ``x``, ``weight`` and ``residual``. Raises ``ValueError`` for wrong shapes/dtypes/devices.
    """
    _check(x, weight, residual)
    y, h, _ = torch.ops.flasht5.rms_norm_fwd(x, weight, residual, float(eps))
    return y if residual is None else (y, h)

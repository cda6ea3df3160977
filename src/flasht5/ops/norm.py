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

``out_dtype`` overrides that dtype and nothing else: ``out`` is computed as above (the product in fp32; with a half
weight the normalised value is rounded to the weight's dtype before it) and rounded once to ``out_dtype``. The use:
under bf16 autocast HF keeps fp32 norm weights and an fp32 residual stream, its norm returns fp32 and the next
``Linear`` casts that to bf16; ``out_dtype=torch.bfloat16`` writes the bf16 directly, the same rounding of the same
fp32 value (up to the order of the fp32 sum of squares), without the extra cast kernel. With the default dtype the
result is HF's bit for bit where HF's half ``weight * y`` is one correctly rounded product, which it is.

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
(untested there).

Two routes, one implementation (the launchers ``_forward`` / ``_backward``): eager calls go through a
``torch.autograd.Function`` whose launches skip Triton's per-call binding (:class:`flasht5.ops._launch.FastKernel`),
and calls without any gradient skip autograd too; while ``torch.compile`` traces (or for tensor subclasses) the
same launchers run inside the ``torch.library.custom_op`` ``flasht5::rms_norm_fwd`` / ``flasht5::rms_norm_bwd``,
with fake implementations and an autograd formula, so ``torch.compile(fullgraph=True)`` traces through it. No
host synchronisation and no device query per call (launch configs and the SM count are cached). Defining the ops
is the only thing that happens at import (needed for the compiler to see them); nothing is launched and no global
setting changes.

Credits: RMSNorm (Zhang & Sennrich, 2019, "Root Mean Square Layer Normalization"); the persistent-grid dweight
reduction follows Triton's layer-norm tutorial and Liger-Kernel's RMSNorm; the residual fusion follows FAT5 and
Liger's fused add + RMSNorm.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from flasht5.ops._device import (
    FLOAT_DTYPES,
    HALF_DTYPES,
    allow_inductor_fallback,
    cdiv,
    check_float_tensor,
    check_kernel_device,
    custom_op,
    function_apply,
    next_pow2,
    row_major,
    sm_count,
    use_custom_op,
)
from flasht5.ops._launch import FastKernel

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
    """Plain-PyTorch T5 RMSNorm, line for line Hugging Face's ``T5LayerNorm.forward`` (plus the residual add).

    No ``out_dtype``: HF's output cast with ``.to(out_dtype)`` is the reference for :func:`rms_norm`'s
    (the same single rounding whenever the default output dtype is fp32)."""
    h = x if residual is None else x + residual
    variance = h.to(torch.float32).pow(2).mean(-1, keepdim=True)
    y = h * torch.rsqrt(variance + eps)
    if weight.dtype in (torch.float16, torch.bfloat16):
        y = y.to(weight.dtype)
    out = weight * y
    return out if residual is None else (out, h)


@functools.cache
def _promote(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    return torch.promote_types(a, b)  # an aten op, dispatched on every call: cached


def _default_out_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    # HF: y is fp32 after the rsqrt multiply; a half weight casts it down, an fp32 weight keeps fp32.
    return weight_dtype if weight_dtype in HALF_DTYPES else torch.float32


_DEFAULT_OUT_DTYPE = {dt: _default_out_dtype(dt) for dt in FLOAT_DTYPES}


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
# Launch configuration (cached: it runs on every call)
# --------------------------------------------------------------------------------------------------------------
@functools.cache
def _block_config(n_cols: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps): ~2048 elements per program (a row block), 16 per thread.

    H200 sweeps (d_model 768/1024/4096, bf16; benchmarks/bench_ops.py --only sweep): within 2% of the best of ~40
    forward shapes at each size, and the best backward shape at 768/1024 (1% off at 4096); twice the rows per
    program (32 elements per thread) made fwd+bwd 11-17% slower, and a persistent forward was never faster.
    """
    block_n = next_pow2(n_cols)
    block_m = max(1, min(16, 2048 // block_n))
    return block_m, block_n, max(2, min(32, block_m * block_n // 512))


def _fwd_config(n_cols: int) -> tuple[int, int, int]:
    if _FWD_OVERRIDE is not None:
        return _FWD_OVERRIDE[0], next_pow2(n_cols), _FWD_OVERRIDE[1]
    return _block_config(n_cols)


@functools.cache
def _bwd_config_default(n_cols: int, bytes_per_col: int, device_index: int) -> tuple[int, int, int, int, int]:
    block_m, block_n, num_warps = _block_config(n_cols)
    stage_bytes = block_m * block_n * bytes_per_col
    num_stages = 3 if 3 * stage_bytes <= 96 * 1024 else 1
    per_sm = max(1, min(4, (200 * 1024) // (num_stages * stage_bytes)))
    # device_index -1: the interpreter on CPU, where few programs keep the tests fast
    n_progs = sm_count(device_index) * per_sm if device_index >= 0 else 4
    return block_m, block_n, num_warps, num_stages, n_progs


def _bwd_config(n_cols: int, bytes_per_col: int, device_index: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages, programs) of the persistent, software-pipelined backward.

    ``bytes_per_col``: bytes one row element brings in through the pipelined loads (h, dy, and dh_in if any).
    Three stages while they take at most 96 KB of shared memory, and as many programs per SM as fit in 200 KB of
    its shared memory, at most 4 (the H200 has 228 KB): at d_model 4096 that is 4 programs of 48 KB (fwd+bwd
    0.68 ms, against 0.71 with 3).
    """
    if _BWD_OVERRIDE is None:
        return _bwd_config_default(n_cols, bytes_per_col, device_index)
    block_m, num_warps, num_stages, per_sm = _BWD_OVERRIDE
    n_progs = sm_count(device_index) * per_sm if device_index >= 0 else 4
    return block_m, next_pow2(n_cols), num_warps, num_stages, n_progs


# --------------------------------------------------------------------------------------------------------------
# Launchers: the one implementation, called by the eager autograd.Function and by the custom ops
# --------------------------------------------------------------------------------------------------------------
_FWD = FastKernel(_rms_norm_fwd_kernel)
_BWD = FastKernel(_rms_norm_bwd_kernel)
_DW_SUM = FastKernel(_dw_sum_kernel)


def _forward(
    x: Tensor, weight: Tensor, residual: Tensor | None, eps: float, out_dtype: torch.dtype
) -> tuple[Tensor, Tensor | None, Tensor]:
    """(y (x.shape, out_dtype), h = x + residual (x.shape, promoted dtype) or None, rstd (rows,) fp32).

    Allocations: ``empty_like`` where ``x`` is contiguous (a third of ``torch.empty(shape, dtype=, device=)``'s
    host cost: no shape or device to parse), and the rstd flat."""
    n_cols = x.shape[-1]
    n_rows = x.numel() // n_cols
    if x.is_contiguous():
        x2, stride_x = x, n_cols
        y = torch.empty_like(x, dtype=out_dtype)  # row-major like x: row stride n_cols
    else:
        x2, stride_x = row_major(x, n_cols)
        y = torch.empty(x.shape, dtype=out_dtype, device=x.device)  # row-major: row stride n_cols
    if weight.stride(0) != 1:
        weight = weight.contiguous()
    rstd = x.new_empty(n_rows, dtype=torch.float32)  # an int, not a tuple: ~0.6 us less to parse
    if residual is not None:
        r2, stride_r = row_major(residual, n_cols)
        h_dtype = _promote(x.dtype, residual.dtype)
        h = torch.empty_like(y, dtype=h_dtype) if h_dtype != out_dtype else torch.empty_like(y)
    else:
        r2, stride_r, h = x2, stride_x, None
    if n_rows > 0:
        block_m, block_n, num_warps = _fwd_config(n_cols)
        _FWD(
            (cdiv(n_rows, block_m),),
            (x2, r2, weight, y, y if h is None else h, rstd, n_rows, n_cols, stride_x, stride_r, n_cols,
             0 if h is None else n_cols, eps),
            (h is not None, weight.dtype in HALF_DTYPES, block_m, block_n),
            num_warps=num_warps,
        )  # fmt: skip
    return y, h, rstd


def _backward(dy: Tensor, h: Tensor, weight: Tensor, rstd: Tensor, dh_in: Tensor | None) -> tuple[Tensor, Tensor]:
    """(dL/dh in h's dtype and shape, dL/dweight in weight's dtype); ``dh_in`` is the gradient flowing into h
    itself. ``dy`` may have any float dtype (the gradient of y in its ``out_dtype``)."""
    n_cols = h.shape[-1]
    n_rows = h.numel() // n_cols
    if h.is_contiguous():
        h2, stride_h = h, n_cols
        dh = torch.empty_like(h)  # row-major: row stride n_cols
    else:
        h2, stride_h = row_major(h, n_cols)
        dh = torch.empty(h.shape, dtype=h.dtype, device=h.device)
    dy2, stride_dy = row_major(dy, n_cols)
    if weight.stride(0) != 1:
        weight = weight.contiguous()
    if not rstd.is_contiguous():
        rstd = rstd.contiguous()
    if dh_in is not None:
        dhin2, stride_dhin = row_major(dh_in, n_cols)
        bytes_per_col = h.element_size() + dy.element_size() + dh_in.element_size()
    else:
        dhin2, stride_dhin = dh, n_cols
        bytes_per_col = h.element_size() + dy.element_size()
    block_m, block_n, num_warps, num_stages, n_progs = _bwd_config(n_cols, bytes_per_col, h.get_device())
    n_progs = max(1, min(n_progs, cdiv(n_rows, block_m)))
    dw_part = h.new_empty(n_progs * n_cols, dtype=torch.float32)  # (n_progs, n_cols), flat: cheaper to allocate
    dweight = torch.empty_like(weight)  # 1-D with unit stride
    if n_rows > 0:
        cast_y = weight.dtype in HALF_DTYPES
        _BWD(
            (n_progs,),
            (dy2, h2, weight, rstd, dhin2, dh, dw_part, n_rows, n_cols, stride_dy, stride_h, stride_dhin, n_cols),
            (dh_in is not None, cast_y, block_m, block_n, num_stages),
            num_warps=num_warps,
        )
        block_p = min(1024, next_pow2(n_progs))
        block_c = 16 if h.is_cuda else block_n  # interpreter: one program
        _DW_SUM((cdiv(n_cols, block_c),), (dw_part, dweight, n_progs, n_cols), (block_p, block_c), num_warps=8)
    else:
        dweight.zero_()
    return dh, dweight


def _grads(
    bwd,
    h: Tensor,
    weight: Tensor,
    rstd: Tensor,
    grad_y: Tensor | None,
    grad_h: Tensor | None,
    x_dtype: torch.dtype,
    res_dtype: torch.dtype | None,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """(dx, dweight, d residual) from the grads of y and h (either may be None: materialised grads are off);
    ``bwd`` is :func:`_backward` (eager) or the ``rms_norm_bwd`` custom op (traced)."""
    dh_in = grad_h if res_dtype is not None else None
    if grad_y is None:  # only h = x + residual was used: its gradient passes straight through
        if dh_in is None:
            return None, None, None
        return _cast(dh_in, x_dtype), None, _cast(dh_in, res_dtype)
    dh, dweight = bwd(grad_y, h, weight, rstd, dh_in)
    return _cast(dh, x_dtype), dweight, (_cast(dh, res_dtype) if res_dtype is not None else None)


def _cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t if t.dtype == dtype else t.to(dtype)  # .to() of the same dtype is still a dispatched call


class _RMSNormFn(torch.autograd.Function):
    """The eager route: one Python autograd node around the launchers. The non-tensor arguments come as one tuple:
    ``apply`` walks every argument, ~0.5 us each."""

    @staticmethod
    def forward(ctx, x, weight, residual, cfg):
        eps, out_dtype = cfg
        y, h, rstd = _forward(x, weight, residual, eps, out_dtype)
        ctx.set_materialize_grads(False)  # no zero-filled grad for y or h when only one of them is used
        ctx.x_dtype = x.dtype
        ctx.res_dtype = None if residual is None else residual.dtype
        ctx.save_for_backward(x if h is None else h, weight, rstd)
        return y if h is None else (y, h)

    @staticmethod
    def backward(ctx, grad_y, grad_h=None):
        h, weight, rstd = ctx.saved_tensors
        dx, dw, dres = _grads(_backward, h, weight, rstd, grad_y, grad_h, ctx.x_dtype, ctx.res_dtype)
        return dx, dw, dres, None


_apply = function_apply(_RMSNormFn)


# --------------------------------------------------------------------------------------------------------------
# Custom ops (the route torch.compile traces)
# --------------------------------------------------------------------------------------------------------------
@custom_op("flasht5::rms_norm_fwd", mutates_args=())
def _rms_norm_fwd(
    x: Tensor, weight: Tensor, residual: Tensor | None, eps: float, out_dtype: torch.dtype
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (y, h, rstd); h is x + residual, or an empty tensor without residual (outputs may not alias x)."""
    y, h, rstd = _forward(x, weight, residual, eps, out_dtype)
    return y, (x.new_empty(0) if h is None else h), rstd.view(x.shape[:-1])


@_rms_norm_fwd.register_fake
def _(
    x: Tensor, weight: Tensor, residual: Tensor | None, eps: float, out_dtype: torch.dtype
) -> tuple[Tensor, Tensor, Tensor]:
    allow_inductor_fallback()
    y = x.new_empty(x.shape, dtype=out_dtype)
    if residual is not None:
        h = x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, residual.dtype))
    else:
        h = x.new_empty(0)
    return y, h, x.new_empty(x.shape[:-1], dtype=torch.float32)


@custom_op("flasht5::rms_norm_bwd", mutates_args=())
def _rms_norm_bwd(dy: Tensor, h: Tensor, weight: Tensor, rstd: Tensor, dh_in: Tensor | None) -> tuple[Tensor, Tensor]:
    """Returns (dL/dh in h's dtype, dL/dweight in weight's dtype); dh_in is the gradient flowing into h itself."""
    return _backward(dy, h, weight, rstd, dh_in)


@_rms_norm_bwd.register_fake
def _(dy: Tensor, h: Tensor, weight: Tensor, rstd: Tensor, dh_in: Tensor | None) -> tuple[Tensor, Tensor]:
    allow_inductor_fallback()
    return h.new_empty(h.shape), weight.new_empty(weight.shape)


def _setup_context(ctx, inputs, output) -> None:
    x, weight, residual, _eps, _out_dtype = inputs
    _y, h, rstd = output
    ctx.set_materialize_grads(False)  # no zero-filled grads for rstd, or for y / h when only one is used
    ctx.x_dtype = x.dtype
    ctx.res_dtype = residual.dtype if residual is not None else None
    ctx.save_for_backward(h if residual is not None else x, weight, rstd)


def _op_backward(ctx, grad_y: Tensor, grad_h: Tensor, _grad_rstd: Tensor):
    h, weight, rstd = ctx.saved_tensors
    bwd = torch.ops.flasht5.rms_norm_bwd
    dx, dw, dres = _grads(bwd, h, weight, rstd, grad_y, grad_h, ctx.x_dtype, ctx.res_dtype)
    return dx, dw, dres, None, None


torch.library.register_autograd("flasht5::rms_norm_fwd", _op_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------------------------
# Public function
# --------------------------------------------------------------------------------------------------------------
def _valid_fast(x: Tensor, weight: Tensor, residual: Tensor | None, out_dtype: torch.dtype | None) -> bool:
    """The usual call (plain CUDA tensors, valid arguments), in one expression; ``False`` sends the call to
    :func:`_check`, which names the problem (or accepts what this conservative test does not cover, e.g. CPU
    tensors under the interpreter)."""
    return (
        type(x) is Tensor
        and type(weight) is Tensor
        and x.is_cuda
        and x.dtype in FLOAT_DTYPES
        and weight.dtype in FLOAT_DTYPES
        and x.dim() >= 1
        and weight.dim() == 1
        and 0 < x.shape[-1] == weight.shape[0] <= _MAX_D
        and weight.device == x.device
        and (out_dtype is None or out_dtype in FLOAT_DTYPES)
        and (
            residual is None
            or (
                type(residual) is Tensor
                and residual.dtype in FLOAT_DTYPES
                and residual.shape == x.shape
                and residual.device == x.device
            )
        )
    )


def _check(x: Tensor, weight: Tensor, residual: Tensor | None, out_dtype: torch.dtype | None) -> None:
    check_float_tensor(x, "x")
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must have shape (..., d_model) with d_model >= 1, got {tuple(x.shape)}")
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
    if out_dtype is not None and out_dtype not in FLOAT_DTYPES:
        raise ValueError(f"out_dtype must be None or torch.float32/float16/bfloat16, got {out_dtype!r}")
    check_kernel_device(x, "x")


def rms_norm(
    x: Tensor,
    weight: Tensor,
    eps: float = 1e-6,
    residual: Tensor | None = None,
    *,
    out_dtype: torch.dtype | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """T5 RMSNorm of ``x`` (..., D) with ``weight`` (D,); see the module docstring for the exact dtype rules.

    Returns ``weight * x / rms(x)``; with ``residual`` it returns ``(rms_norm(x + residual), x + residual)``, the
    sum in ``torch.promote_types(x.dtype, residual.dtype)``. ``out_dtype`` (fp32/fp16/bf16) is the dtype of the
    normalised output, rounded once from the same value; default: the weight's dtype if it is half, else fp32 (HF).
    Differentiable in ``x``, ``weight`` and ``residual`` (the output's gradient may come in ``out_dtype``). Raises
    ``ValueError`` for wrong shapes/dtypes/devices.
    """
    if not _valid_fast(x, weight, residual, out_dtype):
        _check(x, weight, residual, out_dtype)
    if type(eps) is not float:
        eps = float(eps)
    if out_dtype is None:
        out_dtype = _DEFAULT_OUT_DTYPE[weight.dtype]
    if use_custom_op(x):
        y, h, _ = torch.ops.flasht5.rms_norm_fwd(x, weight, residual, eps, out_dtype)
        return y if residual is None else (y, h)
    if torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or (residual is not None and residual.requires_grad)
    ):
        return _apply(x, weight, residual, (eps, out_dtype))
    y, h, _ = _forward(x, weight, residual, eps, out_dtype)  # inference: no autograd node at all
    return y if h is None else (y, h)

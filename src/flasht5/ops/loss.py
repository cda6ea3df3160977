"""The losses in Triton: cross-entropy with ignore_index, label smoothing and z-loss without an fp32 copy of the
logits (:func:`cross_entropy`), and the LM head fused with it without ever holding the full (N, V) logits
(:func:`linear_cross_entropy`). One file, so that the fused head shares the cross-entropy's kernel and helpers
directly; ``cross_entropy_ref`` / ``linear_cross_entropy_ref`` are the plain-PyTorch references.

cross_entropy
-------------
What it computes, per token i with label y_i != ignore_index (fp32 math inside, any input dtype):

    lse_i  = logsumexp_j logits[i, j]
    ce_i   = (1 - eps) * (lse_i - logits[i, y_i]) + eps * (lse_i - mean_j logits[i, j])
    z_i    = z_loss * lse_i ** 2
    loss_i = ce_i + z_i                      (tokens with y_i == ignore_index contribute 0)

``reduction="mean"`` divides the sums by the number of non-ignored tokens (so padding never changes the loss),
``"sum"`` sums, ``"none"`` returns loss_i per token. The label-smoothing term is exactly
``torch.nn.functional.cross_entropy(..., label_smoothing=eps, ignore_index=...)``'s; the z-loss is PaLM's /
T5X's ``z_loss * mean(logsumexp**2)`` over the same tokens. A batch whose every label is ignored gives loss 0 and
zero gradients (torch's mean gives NaN there). ``return_z_loss=True`` returns ``(loss, z_term)``; ``loss``
already includes ``z_term``; ``z_term`` is detached (it is for logging: gradients flow through ``loss`` only).
The loss is returned in fp32 whatever the logits' dtype.

How: forward runs one Triton program per token that streams its row: an online max / sum-of-exp pass (Milakov &
Gimelshein 2018) that also gathers the label's logit and the row sum for smoothing; it stores the loss terms and
the row's logsumexp (4 bytes per token). Backward is one tiled pass over (tokens, vocab) that reads the logits once
and writes ``(softmax * (1 + 2 z lse) - eps / V - (1 - eps) * onehot) * grad_output (/ n)`` in the logits' dtype
(bf16 / fp16 / fp32; never an fp32 (N, V) buffer), as flash-attention's cross-entropy does. ``grad_output`` is
applied in fp32 before the single rounding, so fp16 logits under a loss scaler keep their small gradients, and
``retain_graph`` / double backward calls stay correct.

In place: Liger-Kernel writes the gradient into the logits buffer during the forward pass and skips backward work
when ``grad_output == 1``. Here the standalone op does not, on purpose: the caller may still hold the logits (HF
returns them as ``outputs.logits``), a custom op that silently mutated its input would break ``torch.compile``'s
functionalisation, and the ``grad_output == 1`` test needs a host sync. Against a gradient precomputed into a
separate buffer (which backward must still scale by ``grad_output``), the recompute moves fewer bytes (2 reads + 1
read/write instead of 2 reads + 1 write + 1 read/write) at the same peak memory (logits + one gradient buffer of
the logits' dtype). Where the logits are private -- inside ``linear_cross_entropy``'s chunks -- the forward kernel
writes the gradient in place (its pass-2 path, ``HAS_GRAD``), which is where the memory matters most.

Shapes and dtypes: ``logits`` (..., V) fp32/fp16/bf16 (any V: 32100, 32128, 250112 are tested), ``labels`` (...)
of an integer dtype. Rows may have any stride; a non-unit stride along V is copied to contiguous first. Labels
outside [0, V) that are not ``ignore_index`` raise ``ValueError`` where they are checked: always for CPU tensors,
for CUDA tensors only with ``FLASHT5_DEBUG=1`` (the check reads the labels on the host, a device sync; it is also
skipped while a CUDA graph is being captured). The kernel clamps the label's address, so an unchecked bad label
gives a wrong loss but never an out-of-bounds read.

Tuned and tested on an H200 (sm90); the launch configs use nothing beyond sm80. Host overhead: the mean's
1 / n_kept comes from one tiny exact kernel (``_inv_count_kernel``, bit for bit torch's
``1 / (labels != ignore_index).sum().clamp(min=1)``) instead of five torch ops, the z-term is reduced only when
``return_z_loss=True``, and nothing synchronises with the GPU.

Two routes, one implementation (the launchers ``_ce_forward`` / ``_ce_backward`` here, ``_lce_forward`` /
``_lce_backward_none`` below): eager calls go through a ``torch.autograd.Function`` with
:class:`flasht5.ops._launch.FastKernel` launches (no autograd at all without gradients); while ``torch.compile``
traces (or for tensor subclasses) the same launchers run inside the ``torch.library.custom_op``
``flasht5::cross_entropy_fwd`` / ``_bwd`` and ``flasht5::scale_rows``, with fake implementations and an autograd
formula, so ``torch.compile(fullgraph=True)`` traces through it (defining the ops is the only thing done at
import).

Credits: Liger-Kernel (Hsu et al. 2024) for the gradient-in-the-forward-pass and in-place tricks (used by the fused
linear + CE); flash-attention's cross-entropy (Dao et al.) for saving lse and recomputing in backward; FAT5 for its
Triton CE + z-loss (whose mean over ignored tokens this file fixes); z-loss from PaLM (Chowdhery et al. 2022) /
ST-MoE (Zoph et al. 2022); online softmax from Milakov & Gimelshein (2018).

linear_cross_entropy
--------------------
What it computes: exactly :func:`cross_entropy` of the logits ``(scale * hidden) @ weight.T`` (same
``ignore_index`` / ``label_smoothing`` / ``z_loss`` / ``reduction`` / ``return_z_loss`` semantics; fp32 loss).
``scale`` multiplies ``hidden`` before the matmul, in ``hidden``'s dtype, as T5 v1.0 does with ``d_model ** -0.5``
before its tied LM head; the gradient includes it. ``weight`` (V, d) may be a tied input embedding: its gradient is
returned through autograd and accumulates with the embedding's as usual.

How (mean / sum): the tokens are processed in chunks of C rows. For each chunk the logits (C, V) come from one
cuBLAS matmul in the hidden's dtype, the cross-entropy kernel turns them *in place* into their per-token gradient
(safe: the chunk is private), then ``grad_hidden[chunk] = G @ weight`` and ``grad_weight += G.T @ (scale *
hidden[chunk])``, accumulated in an fp32 buffer across chunks (cuBLAS adds each product in fp32 where torch has
``addmm(out_dtype=float32)``, else each product is rounded once, like the unfused path's single matmul; a bf16
running sum, as Liger does by default, came out at ~3x the unfused path's grad_weight error in a CPU simulation).
Gradients are therefore finished in the forward pass and stored; backward only multiplies them by ``grad_output``
(/ n for the mean, * scale for hidden). ``reduction="none"`` cannot fold the per-token ``grad_output`` into
``grad_weight`` ahead of time, so there the forward computes the loss only and the backward recomputes the chunks
(one extra matmul).

Memory: one chunk of logits plus the fp32 ``grad_weight`` accumulator (V x d x 4 bytes), with C = N / 5 - 2 d
tokens (at least 1024) so that both stay within 1/5 of the bf16 logits' size at N = 32k tokens and d_model up to
2048; below ~10 d_model tokens the accumulator alone is larger than that. The gradients themselves come on top
(and, in backward, their copy scaled by ``grad_output``). Throughput: the three matmuls of the unfused path plus
one streaming pass and one accumulator read-modify-write per chunk (more tokens per step amortise the latter).

Dtypes and shapes: ``hidden`` (..., d) and ``weight`` (V, d) of one dtype (fp32 / fp16 / bf16), ``labels``
``hidden.shape[:-1]`` of an integer dtype; labels outside [0, V) other than ``ignore_index`` raise ``ValueError``
(value check on CPU tensors or with ``FLASHT5_DEBUG=1``, as in ``cross_entropy``). fp16 note: gradients are
formed in the forward pass assuming ``grad_output == 1`` (the mean's 1/n is applied to ``grad_weight`` before it is
rounded to fp16); with fp16 and a loss scaler, gradient entries below fp16's range can flush to zero before the
scale arrives (as with Liger). bf16 and fp32 are unaffected.

Tuned and tested on an H200 (sm90); the Triton kernel and cuBLAS paths run on sm80 unchanged. Eager calls go
through a ``torch.autograd.Function``; ``torch.compile`` traces the ``torch.library.custom_op``
``flasht5::linear_cross_entropy_fwd`` / ``_bwd`` (fake implementations and an autograd formula), both around the
same launchers.

Credits: Liger-Kernel (Hsu et al. 2024) for the chunked fused linear + cross-entropy with gradients computed in the
forward pass and the in-place CE gradient (after mgmalek/efficient_cross_entropy); Apple's Cut Cross-Entropy
(Wijmans et al. 2024, "Cut Your Losses in Large-Vocabulary Language Models") for the case against materialising
logits; FAT5 for the T5 framing.
"""

from __future__ import annotations

import functools

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
    debug_checks,
    function_apply,
    next_pow2,
    row_major,
    use_custom_op,
)
from flasht5.ops._launch import FastKernel

__all__ = ["cross_entropy", "cross_entropy_ref", "linear_cross_entropy", "linear_cross_entropy_ref"]

_REDUCTIONS = ("mean", "sum", "none")
_FAST_LABEL_DTYPES = (torch.int64, torch.int32)  # the public functions' one-expression check; others: full check

# Set by benchmarks to sweep (BLOCK_V, num_warps); None means the built-in choice below.
_CONFIG_OVERRIDE: tuple[int, int] | None = None


# --------------------------------------------------------------------------------------------------------------
# Reference (plain PyTorch, fp32 math)
# --------------------------------------------------------------------------------------------------------------
def cross_entropy_ref(
    logits: Tensor,
    labels: Tensor,
    *,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    reduction: str = "mean",
    return_z_loss: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Plain-PyTorch reference: the usual fp32 upcast + ``F.cross_entropy``, plus z-loss, mean over kept tokens.

    Same semantics as :func:`cross_entropy` (all-ignored batch -> 0, z_term detached), but it materialises the fp32
    logits, their log-softmax and an fp32 gradient.
    """
    v = logits.shape[-1]
    x = logits.reshape(-1, v).to(torch.promote_types(logits.dtype, torch.float32))  # (N, V) fp32 (fp64 stays)
    y = labels.reshape(-1)
    keep = y != ignore_index
    per_tok = F.cross_entropy(x, y, ignore_index=ignore_index, label_smoothing=label_smoothing, reduction="none")
    z_tok = z_loss * torch.logsumexp(x, dim=-1).pow(2) * keep
    per_tok = per_tok + z_tok
    if reduction == "none":
        loss, z_term = per_tok.view(labels.shape), z_tok.view(labels.shape)
    elif reduction == "sum":
        loss, z_term = per_tok.sum(), z_tok.sum()
    else:
        n = keep.sum().clamp(min=1)
        loss, z_term = per_tok.sum() / n, z_tok.sum() / n
    return (loss, z_term.detach()) if return_z_loss else loss


# --------------------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------------------
@triton.jit
def _ce_fwd_kernel(
    X,
    G,
    Y,
    LOSS,
    Z,
    LSE,
    ROW_SCALE,
    stride_x,
    stride_g,
    n_cols,
    ignore_index,
    smoothing,
    z_coef,
    HAS_GRAD: tl.constexpr,
    HAS_ROW_SCALE: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    HAS_Z: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    # HAS_Z: store the z-term per row (only when the caller reads it: one allocation fewer otherwise)
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_x
    g_row = G + row * stride_g
    cols = tl.arange(0, BLOCK_V)
    label = tl.load(Y + row).to(tl.int64)

    if label == ignore_index:
        tl.store(LOSS + row, 0.0)
        if HAS_Z:
            tl.store(Z + row, 0.0)
        tl.store(LSE + row, 0.0)
        if HAS_GRAD:
            for start in range(0, n_cols, BLOCK_V):
                offs = start + cols
                tl.store(g_row + offs, tl.zeros([BLOCK_V], dtype=G.dtype.element_ty), mask=offs < n_cols)
        return

    # Pass 1: running max m and sum of exp(x - m) (one exp per element), plus the row sum for smoothing.
    m = -3.0e38  # finite start: exp(m_old - m_new) is never exp(-inf + inf) = NaN
    s = 0.0
    row_sum = 0.0
    for start in range(0, n_cols, BLOCK_V):
        offs = start + cols
        mask = offs < n_cols
        x = tl.load(x_row + offs, mask=mask, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
        if HAS_SMOOTHING:
            row_sum += tl.sum(tl.where(mask, x, 0.0), axis=0)
    lse = m + tl.log(s)

    safe_label = tl.minimum(tl.maximum(label, 0), n_cols - 1)  # never read out of bounds
    x_label = tl.load(x_row + safe_label).to(tl.float32)
    loss = lse - x_label
    if HAS_SMOOTHING:
        loss = (1.0 - smoothing) * loss + smoothing * (lse - row_sum / n_cols)
    z_term = z_coef * lse * lse
    tl.store(LOSS + row, loss + z_term)
    if HAS_Z:
        tl.store(Z + row, z_term)
    tl.store(LSE + row, lse)

    # Pass 2: d loss_i / d x_ij = p_ij * (1 + 2 z lse) - eps / V - (1 - eps) * [j == y]
    if HAS_GRAD:
        p_scale = 1.0 + 2.0 * z_coef * lse
        scale = 1.0
        if HAS_ROW_SCALE:
            scale = tl.load(ROW_SCALE + row)
        uniform = smoothing / n_cols
        for start in range(0, n_cols, BLOCK_V):
            offs = start + cols
            mask = offs < n_cols
            x = tl.load(x_row + offs, mask=mask, other=float("-inf")).to(tl.float32)
            g = tl.exp(x - lse) * p_scale - uniform
            g = tl.where(offs == label, g - (1.0 - smoothing), g)
            tl.store(g_row + offs, (g * scale).to(G.dtype.element_ty), mask=mask)


@triton.jit
def _ce_bwd_kernel(
    X,
    G,
    Y,
    LSE,
    FACTOR,
    INV_N,
    n_rows,
    n_cols,
    stride_x,
    stride_g,
    ignore_index,
    smoothing,
    z_coef,
    PER_ROW: tl.constexpr,
    HAS_INV_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # One read of the logits and one write of the gradient, tiled over (rows, vocab): the same formula as pass 2
    # of the forward kernel, with the saved lse and grad_output (/ n) folded in as a per-row factor. FACTOR is
    # grad_output (fp32; per row with PER_ROW); HAS_INV_N multiplies it by the mean's 1/n here, the one fp32
    # rounding torch's `grad_output * inv_n` would make, without that torch op.
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    mask = row_mask[:, None] & (cols < n_cols)[None, :]
    r64 = rows.to(tl.int64)[:, None]
    label = tl.load(Y + rows, mask=row_mask, other=ignore_index).to(tl.int64)
    lse = tl.load(LSE + rows, mask=row_mask, other=0.0)
    if PER_ROW:
        f = tl.load(FACTOR + rows, mask=row_mask, other=0.0)
    else:
        f = tl.load(FACTOR)
        if HAS_INV_N:
            f = f * tl.load(INV_N)
    x = tl.load(X + r64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    g = tl.exp(x - lse[:, None]) * (1.0 + 2.0 * z_coef * lse)[:, None] - smoothing / n_cols
    g = tl.where(cols[None, :] == label[:, None], g - (1.0 - smoothing), g)
    # ignored rows: exactly 0 (their lse is a placeholder, so exp(x - lse) may be inf there)
    g = tl.where((label == ignore_index)[:, None], 0.0, g * f[:, None])
    tl.store(G + r64 * stride_g + cols[None, :], g.to(G.dtype.element_ty), mask=mask)


@triton.jit
def _scale_rows_kernel(
    X,
    OUT,
    FACTOR,
    INV_N,
    n_rows,
    n_cols,
    stride_x,
    stride_o,
    scale,
    PER_ROW: tl.constexpr,
    HAS_INV_N: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # out = x * f, f = FACTOR[row] (PER_ROW) or FACTOR [* INV_N] [* scale], each product one fp32 rounding in that
    # order: what torch's `(factor * inv_n) * scale` on 0-d fp32 tensors gives, without those torch ops.
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    mask = row_mask[:, None] & (cols < n_cols)[None, :]
    r64 = rows.to(tl.int64)[:, None]
    if PER_ROW:
        f = tl.load(FACTOR + rows, mask=row_mask, other=0.0)[:, None]
    else:
        f = tl.load(FACTOR)
        if HAS_INV_N:
            f = f * tl.load(INV_N)
        if HAS_SCALE:
            f = f * scale
    x = tl.load(X + r64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + r64 * stride_o + cols[None, :], (x * f).to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _inv_count_kernel(Y, INV_N, TOTAL, TOTAL_Z, n_rows, ignore_index, N_TOTALS: tl.constexpr, BLOCK: tl.constexpr):
    # 1 / max(#{i : labels[i] != ignore_index}, 1) in fp32, by one program: the count is exact and div_rn rounds
    # correctly, as torch's reciprocal does, so this is bit for bit `1.0 / (y != ii).sum().clamp(min=1).float()`.
    # N_TOTALS = 1 or 2: also TOTAL (and TOTAL_Z) *= that 1/n in place, one fp32 rounding each as torch's
    # `total * inv_n`: the mean of the loss (and z) sums in this same launch.
    acc = tl.zeros([BLOCK], dtype=tl.int32)
    for start in range(0, n_rows, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < n_rows
        y = tl.load(Y + offs, mask=mask, other=0).to(tl.int64)
        acc += ((y != ignore_index) & mask).to(tl.int32)
    n = tl.maximum(tl.sum(acc, axis=0), 1)
    inv_n = tl.math.div_rn(1.0, n.to(tl.float32))
    tl.store(INV_N, inv_n)
    if N_TOTALS >= 1:
        tl.store(TOTAL, tl.load(TOTAL) * inv_n)
    if N_TOTALS >= 2:
        tl.store(TOTAL_Z, tl.load(TOTAL_Z) * inv_n)


# --------------------------------------------------------------------------------------------------------------
# Launchers: the one implementation, called by the eager autograd.Functions and by the custom ops
# --------------------------------------------------------------------------------------------------------------
_CE_FWD = FastKernel(_ce_fwd_kernel)
_CE_BWD = FastKernel(_ce_bwd_kernel)
_SCALE_ROWS = FastKernel(_scale_rows_kernel)
_INV_COUNT = FastKernel(_inv_count_kernel)

_COUNT_BLOCK = 4096
_COUNT_MAX_ROWS = 16 * _COUNT_BLOCK  # one program loops over at most 16 blocks; torch's ops above that


def _ce_config(n_cols: int) -> tuple[int, int]:
    if _CONFIG_OVERRIDE is not None:
        return _CONFIG_OVERRIDE
    return _ce_config_default(n_cols)


@functools.cache
def _ce_config_default(n_cols: int) -> tuple[int, int]:
    block_v = min(next_pow2(n_cols), 8192)
    return block_v, 8 if block_v >= 4096 else 4


def _launch_ce(
    logits: Tensor,
    stride_x: int,
    n_rows: int,
    n_cols: int,
    labels: Tensor,
    loss_rows: Tensor,
    z_rows: Tensor | None,
    lse_rows: Tensor,
    grad: Tensor | None,
    row_scale: Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
) -> None:
    """Per-row loss (ce + z) into ``loss_rows``, z-term into ``z_rows`` (None: not stored), logsumexp into
    ``lse_rows`` and, optionally, the per-row gradient into ``grad`` (contiguous rows of ``n_cols``; it may be
    ``logits`` itself: each element is read before it is overwritten), scaled by ``row_scale``. ``logits``' row r
    starts ``r * stride_x`` elements after its data pointer; ``labels`` and the row outputs are contiguous."""
    if n_rows == 0:
        return
    block_v, num_warps = _ce_config(n_cols)
    _CE_FWD(
        (n_rows,),
        (logits, logits if grad is None else grad, labels, loss_rows, loss_rows if z_rows is None else z_rows,
         lse_rows, loss_rows if row_scale is None else row_scale, stride_x, 0 if grad is None else n_cols, n_cols,
         ignore_index, label_smoothing, z_loss),
        (grad is not None, row_scale is not None, label_smoothing != 0.0, z_rows is not None, block_v),
        num_warps=num_warps,
    )  # fmt: skip


def _scale_rows_into(
    x: Tensor, factor: Tensor, out: Tensor, per_row: bool, inv_n: Tensor | None = None, scale: float = 1.0
) -> Tensor:
    """out[i, :] = x[i, :] * f with f = factor[i] (``per_row``) or factor (0-d) [* inv_n] [* scale], computed in
    fp32 and rounded to out's dtype; ``x`` and ``out`` are (N, M) with unit column stride, ``factor`` and ``inv_n``
    contiguous fp32."""
    n_rows, n_cols = x.shape
    if n_rows * n_cols > 0:
        block_n = min(next_pow2(n_cols), 1024)
        # big tiles under the CPU interpreter (its cost is per program), 4k elements per program on the GPU
        block_m = max(1, (4096 if x.is_cuda else 65536) // block_n)
        _SCALE_ROWS(
            (cdiv(n_rows, block_m), cdiv(n_cols, block_n)),
            (x, out, factor, factor if inv_n is None else inv_n, n_rows, n_cols, x.stride(0), out.stride(0), scale),
            (per_row, inv_n is not None, scale != 1.0, block_m, block_n),
            num_warps=4,
        )
    return out


def _scale_rows_impl(x: Tensor, factor: Tensor, inv_n: Tensor | None = None, scale: float = 1.0) -> Tensor:
    """x (N, ...) times a 0-d or (N,) factor [* inv_n (0-d)] [* scale], in fp32, rounded to x's dtype, as a new
    tensor of x's shape."""
    x2 = x if x.dim() == 2 and x.stride(-1) == 1 else x.reshape(x.shape[0], -1).contiguous()
    if factor.dtype != torch.float32 or not factor.is_contiguous():
        factor = factor.to(torch.float32).contiguous()
    out = torch.empty_like(x2) if x2.is_contiguous() else torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    return _scale_rows_into(x2, factor, out, factor.dim() == 1, inv_n, scale).view(x.shape)


def _check_labels(labels: Tensor, n_classes: int, ignore_index: int, arg: str = "labels") -> None:
    """Value check: labels in [0, n_classes) or equal to ``ignore_index``. It reads the labels on the host, so it
    runs for CPU tensors, and for CUDA tensors only with ``FLASHT5_DEBUG=1`` (one device sync; skipped during CUDA
    graph capture, where a sync is not allowed). Unchecked bad labels cannot read out of bounds (the kernel clamps
    the label's address) but give a wrong loss."""
    if labels.is_cuda and (not debug_checks() or torch.cuda.is_current_stream_capturing()):
        return
    if labels.numel() == 0:
        return
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= n_classes))
    if bool(bad.any()):
        first = labels[bad][0].item()
        raise ValueError(f"{arg} must be in [0, {n_classes}) or equal ignore_index={ignore_index}; found {first}")


def _count_kernel_ok(labels: Tensor, n_rows: int) -> bool:
    return n_rows <= _COUNT_MAX_ROWS and labels.dtype in (torch.int64, torch.int32) and labels.is_contiguous()


def _inv_count(labels: Tensor, n_rows: int, ignore_index: int) -> Tensor:
    """1 / (number of kept tokens), 0-d fp32 on the device, no host sync; an all-ignored batch divides by 1.

    Bit for bit ``1.0 / (labels != ignore_index).sum().clamp(min=1).to(torch.float32)``: for contiguous int64 /
    int32 labels up to 65536 tokens one single-program launch (:func:`_inv_count_kernel`) replaces those five torch
    ops (host overhead); above that, or for other label dtypes, it is those torch ops."""
    if _count_kernel_ok(labels, n_rows):
        inv_n = labels.new_empty((), dtype=torch.float32)
        _INV_COUNT((1,), (labels, inv_n, inv_n, inv_n, n_rows, ignore_index), (0, _COUNT_BLOCK), num_warps=4)
        return inv_n
    return 1.0 / (labels != ignore_index).sum().clamp(min=1).to(torch.float32)


def _mean_(labels: Tensor, n_rows: int, ignore_index: int, total: Tensor, total_z: Tensor | None) -> Tensor:
    """Divide the 0-d fp32 sums ``total`` (and ``total_z``) in place by the number of kept tokens; returns that
    1/n (:func:`_inv_count`). Bit for bit ``total * _inv_count(...)``; with the count kernel it is the same launch,
    instead of a count launch and a torch multiply per sum."""
    if _count_kernel_ok(labels, n_rows):
        inv_n = labels.new_empty((), dtype=torch.float32)
        _INV_COUNT(
            (1,),
            (labels, inv_n, total, total if total_z is None else total_z, n_rows, ignore_index),
            (1 if total_z is None else 2, _COUNT_BLOCK),
            num_warps=4,
        )
        return inv_n
    inv_n = _inv_count(labels, n_rows, ignore_index)
    total.mul_(inv_n)
    if total_z is not None:
        total_z.mul_(inv_n)
    return inv_n


def _reduce(
    rows: Tensor, z_rows: Tensor | None, labels: Tensor, ignore_index: int, reduction: str
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """(loss, z_term or None, 1/n_kept for the mean else None) from the per-row fp32 terms: the rows themselves
    ("none"), their torch sums ("sum"), or those sums times 1/n ("mean", :func:`_mean_`)."""
    if reduction == "none":
        return rows, z_rows, None
    total = rows.sum()
    total_z = None if z_rows is None else z_rows.sum()
    if reduction == "sum":
        return total, total_z, None
    return total, total_z, _mean_(labels, labels.numel(), ignore_index, total, total_z)


def _grad_output32(grad_output: Tensor, reduction: str) -> Tensor:
    """grad_output as fp32: 0-d for "mean"/"sum", contiguous (labels' shape) for "none". The mean's 1/n is applied
    by the kernels that use it (``HAS_INV_N``)."""
    go = grad_output if grad_output.dtype == torch.float32 else grad_output.to(torch.float32)
    if reduction == "none":
        return go if go.is_contiguous() else go.contiguous()
    return go if go.dim() == 0 else go.reshape(())


def _ce_forward(
    logits: Tensor,
    labels: Tensor,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    reduction: str,
    want_z: bool,
) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None]:
    """logits (..., V), labels logits.shape[:-1] -> (loss, z_term or None, per-token logsumexp (N,) flat,
    1/n_kept for the mean else None). Loss and z_term: 0-d, or labels' shape for reduction "none"."""
    n_cols = logits.shape[-1]
    x, stride_x = (logits, n_cols) if logits.is_contiguous() else row_major(logits, n_cols)
    y = labels if labels.is_contiguous() else labels.contiguous()
    _check_labels(y, n_cols, ignore_index)
    n_rows = y.numel()
    # per-row terms: flat unless returned as they are ("none"); the z-terms only when the caller reads them
    rows_shape = y.shape if reduction == "none" else n_rows
    loss_rows = y.new_empty(rows_shape, dtype=torch.float32)
    z_rows = y.new_empty(rows_shape, dtype=torch.float32) if want_z else None
    lse = y.new_empty(n_rows, dtype=torch.float32)
    _launch_ce(
        x, stride_x, n_rows, n_cols, y, loss_rows, z_rows, lse, None, None, ignore_index, label_smoothing, z_loss
    )
    loss, z_term, inv_n = _reduce(loss_rows, z_rows, y, ignore_index, reduction)
    return loss, z_term, lse, inv_n


def _ce_backward(
    logits: Tensor,
    labels: Tensor,
    lse: Tensor,
    grad_output: Tensor,
    inv_n: Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
) -> Tensor:
    """d loss / d logits (logits' shape, logits' dtype, contiguous); ``grad_output`` is fp32, 0-d or one per token
    (:func:`_grad_output32`), ``inv_n`` the mean's 1/n (0-d) or None."""
    n_cols = logits.shape[-1]
    if logits.is_contiguous():
        x, stride_x = logits, n_cols
        grad = torch.empty_like(logits)
    else:
        x, stride_x = row_major(logits, n_cols)
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    y = labels if labels.is_contiguous() else labels.contiguous()
    if not lse.is_contiguous():
        lse = lse.contiguous()
    n_rows = y.numel()
    if n_rows > 0:
        block_n = min(next_pow2(n_cols), 4096 if logits.is_cuda else 32768)
        block_m = 1 if logits.is_cuda else 8  # the interpreter's cost is per program
        per_row = grad_output.dim() > 0
        _CE_BWD(
            (cdiv(n_rows, block_m), cdiv(n_cols, block_n)),
            (x, grad, y, lse, grad_output, grad_output if inv_n is None else inv_n, n_rows, n_cols, stride_x, n_cols,
             ignore_index, label_smoothing, z_loss),
            (per_row, inv_n is not None and not per_row, block_m, block_n),
            num_warps=8 if block_n >= 4096 else 4,
        )  # fmt: skip
    return grad


class _CrossEntropyFn(torch.autograd.Function):
    """The eager route: one Python autograd node around the launchers. The non-tensor arguments come as one tuple:
    ``apply`` walks every argument, ~0.5 us each."""

    @staticmethod
    def forward(ctx, logits, labels, cfg):
        ignore_index, label_smoothing, z_loss, reduction, want_z = cfg
        loss, z_term, lse, inv_n = _ce_forward(logits, labels, ignore_index, label_smoothing, z_loss, reduction, want_z)
        ctx.set_materialize_grads(False)  # the z_term gets no zero-filled grad
        ctx.cfg = cfg
        ctx.save_for_backward(logits, labels, lse, inv_n)
        if z_term is None:
            return loss, None
        ctx.mark_non_differentiable(z_term)  # for logging: gradients flow through the loss only
        return loss, z_term

    @staticmethod
    def backward(ctx, grad_loss, _grad_z):
        if grad_loss is None:
            return None, None, None
        logits, labels, lse, inv_n = ctx.saved_tensors
        ignore_index, label_smoothing, z_loss, reduction, _ = ctx.cfg
        go = _grad_output32(grad_loss, reduction)
        grad = _ce_backward(logits, labels, lse, go, inv_n, ignore_index, label_smoothing, z_loss)
        return grad, None, None


_ce_apply = function_apply(_CrossEntropyFn)


# --------------------------------------------------------------------------------------------------------------
# Custom ops (the route torch.compile traces)
# --------------------------------------------------------------------------------------------------------------
@custom_op("flasht5::scale_rows", mutates_args=())
def _scale_rows(x: Tensor, factor: Tensor, inv_n: Tensor | None, scale: float) -> Tensor:
    """x (N, M) times a 0-d or (N,) fp32 factor [* inv_n] [* scale], in x's dtype (the backward of the precomputed
    gradients)."""
    return _scale_rows_impl(x, factor, inv_n, scale)


@_scale_rows.register_fake
def _(x: Tensor, factor: Tensor, inv_n: Tensor | None, scale: float) -> Tensor:
    allow_inductor_fallback()
    return x.new_empty(x.shape)


@custom_op("flasht5::cross_entropy_fwd", mutates_args=())
def _cross_entropy_fwd(
    logits: Tensor,
    labels: Tensor,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    reduction: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """logits (N, V), labels (N,) -> (loss, z_term, per-token logsumexp (N,), 1/n_kept (empty unless "mean"))."""
    loss, z_term, lse, inv_n = _ce_forward(logits, labels, ignore_index, label_smoothing, z_loss, reduction, True)
    return loss, z_term, lse, (lse.new_empty(0) if inv_n is None else inv_n)


@_cross_entropy_fwd.register_fake
def _(logits, labels, ignore_index, label_smoothing, z_loss, reduction):
    allow_inductor_fallback()
    shape = (logits.shape[0],) if reduction == "none" else ()
    loss = logits.new_empty(shape, dtype=torch.float32)
    lse = logits.new_empty((logits.shape[0],), dtype=torch.float32)
    inv_n = logits.new_empty(() if reduction == "mean" else (0,), dtype=torch.float32)
    return loss, loss.new_empty(shape), lse, inv_n


@custom_op("flasht5::cross_entropy_bwd", mutates_args=())
def _cross_entropy_bwd(
    logits: Tensor,
    labels: Tensor,
    lse: Tensor,
    grad_output: Tensor,
    inv_n: Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
) -> Tensor:
    """d loss / d logits (N, V) in the logits' dtype; ``grad_output`` is 0-d or per row (N,), ``inv_n`` the mean's
    1/n or None."""
    if grad_output.dtype != torch.float32 or not grad_output.is_contiguous():
        grad_output = grad_output.to(torch.float32).contiguous()
    return _ce_backward(logits, labels, lse, grad_output, inv_n, ignore_index, label_smoothing, z_loss)


@_cross_entropy_bwd.register_fake
def _(logits, labels, lse, grad_output, inv_n, ignore_index, label_smoothing, z_loss):
    allow_inductor_fallback()
    return logits.new_empty(logits.shape)


def _ce_setup_context(ctx, inputs, output) -> None:
    logits, labels, ignore_index, label_smoothing, z_loss, reduction = inputs
    _loss, _z_term, lse, inv_n = output
    ctx.set_materialize_grads(False)  # z_term / lse / 1/n get no zero-filled grads
    ctx.reduction = reduction
    ctx.ce_args = (ignore_index, label_smoothing, z_loss)
    ctx.save_for_backward(logits, labels, lse, inv_n)


def _ce_op_backward(ctx, grad_loss: Tensor, _grad_z: Tensor, _grad_lse: Tensor, _grad_inv: Tensor):
    logits, labels, lse, inv_n = ctx.saved_tensors
    if grad_loss is None:  # only z_term was used downstream, and it is detached by the public function
        return None, None, None, None, None, None
    go = _grad_output32(grad_loss, ctx.reduction)
    inv = inv_n if ctx.reduction == "mean" else None
    grad = torch.ops.flasht5.cross_entropy_bwd(logits, labels, lse, go, inv, *ctx.ce_args)
    return grad, None, None, None, None, None


torch.library.register_autograd("flasht5::cross_entropy_fwd", _ce_op_backward, setup_context=_ce_setup_context)


# --------------------------------------------------------------------------------------------------------------
# Public function
# --------------------------------------------------------------------------------------------------------------
def _check_common(labels: Tensor, label_smoothing: float, z_loss: float, reduction: str) -> None:
    if not isinstance(labels, Tensor) or labels.dtype.is_floating_point or labels.dtype.is_complex:
        raise ValueError(f"labels must be an integer tensor, got {getattr(labels, 'dtype', type(labels))}")
    if labels.dtype == torch.bool:
        raise ValueError("labels must be an integer tensor, got torch.bool")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if z_loss < 0.0:
        raise ValueError(f"z_loss must be >= 0, got {z_loss}")


def _check_ce(logits: Tensor, labels: Tensor, label_smoothing: float, z_loss: float, reduction: str) -> None:
    check_float_tensor(logits, "logits")
    _check_common(labels, label_smoothing, z_loss, reduction)
    if logits.dim() < 1 or logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"logits must have shape labels.shape + (V,); got logits {tuple(logits.shape)}, "
            f"labels {tuple(labels.shape)}"
        )
    if logits.shape[-1] == 0:
        raise ValueError("logits must have at least one class (V >= 1)")
    if labels.device != logits.device:
        raise ValueError(f"labels are on {labels.device} but logits are on {logits.device}")
    check_kernel_device(logits, "logits")


def cross_entropy(
    logits: Tensor,
    labels: Tensor,
    *,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    reduction: str = "mean",
    return_z_loss: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Cross-entropy of ``logits`` (..., V) against integer ``labels`` (...); see the module docstring.

    Returns the fp32 loss (0-d for "mean"/"sum", ``labels.shape`` for "none"), or ``(loss, z_term)`` with
    ``return_z_loss=True`` (``loss`` includes ``z_term``; ``z_term`` is detached). Raises ``ValueError`` for wrong
    shapes or dtypes, an unknown ``reduction``, and labels outside [0, V) other than ``ignore_index`` (a value
    check: always for CPU tensors, for CUDA tensors with ``FLASHT5_DEBUG=1``).
    """
    label_smoothing, z_loss, ignore_index = float(label_smoothing), float(z_loss), int(ignore_index)
    if not (  # the usual call in one expression; anything else goes through the checks that name the problem
        type(logits) is Tensor
        and type(labels) is Tensor
        and logits.is_cuda
        and logits.dtype in FLOAT_DTYPES
        and labels.dtype in _FAST_LABEL_DTYPES
        and reduction in _REDUCTIONS
        and 0.0 <= label_smoothing <= 1.0
        and z_loss >= 0.0
        and logits.dim() >= 1
        and logits.shape[-1] > 0
        and logits.shape[:-1] == labels.shape
        and labels.device == logits.device
    ):
        _check_ce(logits, labels, label_smoothing, z_loss, reduction)
    if use_custom_op(logits):
        n_cols = logits.shape[-1]
        loss, z_term, _, _ = torch.ops.flasht5.cross_entropy_fwd(
            logits.reshape(-1, n_cols),  # (N, V)
            labels.reshape(-1),  # (N,)
            ignore_index,
            label_smoothing,
            z_loss,
            reduction,
        )
        if reduction == "none":
            loss, z_term = loss.view(labels.shape), z_term.view(labels.shape)
        return (loss, z_term.detach()) if return_z_loss else loss
    if torch.is_grad_enabled() and logits.requires_grad:
        loss, z_term = _ce_apply(logits, labels, (ignore_index, label_smoothing, z_loss, reduction, return_z_loss))
    else:  # no gradient: no autograd node at all
        loss, z_term, _, _ = _ce_forward(
            logits, labels, ignore_index, label_smoothing, z_loss, reduction, return_z_loss
        )
    return (loss, z_term) if return_z_loss else loss


# ==============================================================================================================
# linear_cross_entropy: the LM head fused with its cross-entropy
# ==============================================================================================================


def linear_cross_entropy_ref(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    reduction: str = "mean",
    return_z_loss: bool = False,
    scale: float | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Plain PyTorch: ``cross_entropy_ref((hidden * scale) @ weight.T, labels)`` with the full logits."""
    h = hidden * scale if scale is not None else hidden
    logits = h @ weight.t()  # (..., V)
    return cross_entropy_ref(
        logits,
        labels,
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        reduction=reduction,
        return_z_loss=return_z_loss,
    )


def _default_chunk_tokens(n_tokens: int, n_classes: int, d_model: int) -> int:
    """Rows per chunk, from the memory budget: the chunk's logits (2 C V bytes) plus the fp32 grad_weight
    accumulator (4 V d bytes) stay within 1/5 of the bf16 logits (2 N V bytes), i.e. C <= N / 5 - 2 d, but at
    least 1024 rows (smaller matmuls lose efficiency; for small N or large d the budget then does not hold). Larger
    chunks mean fewer read-modify-writes of the accumulator. (Tests monkeypatch this to force many chunks.)"""
    del n_classes  # both terms scale with V, so the budget in tokens does not depend on it
    budget = (n_tokens // 5 - 2 * d_model) // 128 * 128
    return max(1, min(n_tokens, max(1024, budget)))


_SLABS = 8  # fallback path: grad_weight updated in 8 vocabulary slabs, so its rounded temporary is 1/8 of it


@functools.cache
def _has_fp32_out_addmm(device_index: int) -> bool:
    """Whether cuBLAS ``addmm(out_dtype=float32)`` accepts an fp32 accumulator with bf16 operands here (newer torch
    on CUDA): the product is added in the GEMM epilogue, without a temporary or an extra rounding.

    Probed once per device on tiny tensors, without reading the result back: no host sync, so that a first call
    under ``torch.cuda.set_sync_debug_mode("error")`` gets the same answer as any other (a value check here would
    raise there, be caught, and silently select the slower fallback). The GPU tests check the gradients it gives.
    """
    try:
        dev = torch.device("cuda", device_index)
        a = torch.ones(16, 16, device=dev, dtype=torch.bfloat16)
        acc = torch.zeros(16, 16, device=dev, dtype=torch.float32)
        torch.addmm(acc, a, a, out_dtype=torch.float32, out=acc)
        return True
    except (RuntimeError, TypeError):
        return False


def _accumulate_grad_weight(acc: Tensor, grad_logits: Tensor, hs: Tensor) -> None:
    """acc (V, d) fp32 += grad_logits.T (V, C) @ hs (C, d); the running sum is never rounded to bf16.

    fp32 inputs: ``addmm_``. Half inputs on CUDA: ``addmm(out_dtype=float32, out=acc)`` where torch supports it
    (measured on the H200 with torch 2.11: no temporary). Otherwise each vocabulary slab's product is rounded once
    to the input dtype and added into the fp32 accumulator (a temporary of 1/8 of grad_weight; on the H200 this
    path measured ~10% slower end to end at d_model 2048).
    """
    if grad_logits.dtype == torch.float32:
        acc.addmm_(grad_logits.t(), hs)
        return
    if acc.is_cuda and _has_fp32_out_addmm(acc.device.index or 0):
        torch.addmm(acc, grad_logits.t(), hs, out_dtype=torch.float32, out=acc)
        return
    n_classes = acc.shape[0]
    slab = -(-n_classes // _SLABS)
    for v0 in range(0, n_classes, slab):
        v1 = min(v0 + slab, n_classes)
        acc[v0:v1].add_(torch.mm(grad_logits[:, v0:v1].t(), hs))  # (slab, d)


def _chunks(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    scale: float,
    loss_rows: Tensor | None,
    z_rows: Tensor | None,
    row_scale: Tensor | None,
    grad_hidden: Tensor | None,
    grad_weight32: Tensor | None,
) -> None:
    """Walk the token chunks: logits, CE (loss rows and/or in-place gradient), then grad_hidden / grad_weight."""
    n_tokens, n_classes = hidden.shape[0], weight.shape[0]
    need_grad = grad_hidden is not None or grad_weight32 is not None
    chunk = _default_chunk_tokens(n_tokens, n_classes, weight.shape[1])
    # loss rows are needed by the kernel even when only gradients are wanted; z rows only when asked for
    scratch_loss = loss_rows if loss_rows is not None else labels.new_empty(n_tokens, dtype=torch.float32)
    scratch_lse = labels.new_empty(n_tokens, dtype=torch.float32)
    for start in range(0, n_tokens, chunk):
        end = min(start + chunk, n_tokens)
        whole = start == 0 and end == n_tokens  # one chunk: no slicing (each slice is a torch call)
        hs = hidden if whole else hidden[start:end]
        if scale != 1.0:
            hs = hs * scale  # in hidden's dtype, exactly like the unfused model
        logits = torch.mm(hs, weight.t())  # (C, V), the only logits alive
        rows = (labels, scratch_loss, z_rows, scratch_lse, row_scale)
        if not whole:
            rows = tuple(None if t is None else t[start:end] for t in rows)
        _launch_ce(
            logits,
            n_classes,
            end - start,
            n_classes,
            rows[0],
            rows[1],
            rows[2],
            rows[3],
            logits if need_grad else None,  # in place: the chunk is private
            rows[4],
            ignore_index,
            label_smoothing,
            z_loss,
        )
        if grad_hidden is not None:
            torch.mm(logits, weight, out=grad_hidden if whole else grad_hidden[start:end])  # (C, d)
        if grad_weight32 is not None:
            _accumulate_grad_weight(grad_weight32, logits, hs)  # (V, d)
        del logits, hs  # free this chunk before the next one is allocated


def _rows(hidden: Tensor, weight: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    h = hidden.reshape(-1, hidden.shape[-1])  # (N, d)
    if h.stride(-1) != 1:
        h = h.contiguous()
    w = weight if weight.stride(-1) == 1 else weight.contiguous()
    y = labels.reshape(-1)  # (N,)
    if not y.is_contiguous():
        y = y.contiguous()
    return h, w, y


def _lce_forward(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    reduction: str,
    scale: float,
    need_grad_hidden: bool,
    need_grad_weight: bool,
    want_z: bool,
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """hidden (..., d), weight (V, d), labels hidden.shape[:-1] -> (loss, z_term or None, dL/d(scale*hidden) per
    token (N, d) or None, grad_weight (V, d) already divided by n for the mean or None, 1/n_kept for the mean or
    None). Loss and z_term are 0-d, or (N,) for "none", where no gradient is formed here (the backward recomputes)."""
    h, w, y = _rows(hidden, weight, labels)
    n_tokens, n_classes = h.shape[0], w.shape[0]
    _check_labels(y, n_classes, ignore_index)
    precompute = reduction != "none"
    grad_hidden = torch.empty_like(h) if precompute and need_grad_hidden else None  # h: unit column stride...
    if grad_hidden is not None and not grad_hidden.is_contiguous():  # ...but maybe a row stride: row-major here
        grad_hidden = torch.empty(h.shape, dtype=h.dtype, device=h.device)
    grad_weight32 = torch.zeros_like(w, dtype=torch.float32) if precompute and need_grad_weight else None
    if grad_weight32 is not None and not grad_weight32.is_contiguous():
        grad_weight32 = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
    loss_rows = y.new_empty(n_tokens, dtype=torch.float32)
    z_rows = y.new_empty(n_tokens, dtype=torch.float32) if want_z else None
    _chunks(h, w, y, ignore_index, label_smoothing, z_loss, scale, loss_rows, z_rows, None, grad_hidden, grad_weight32)
    loss, z_term, inv_n = _reduce(loss_rows, z_rows, y, ignore_index, reduction)
    grad_weight = None
    if grad_weight32 is not None:
        if inv_n is not None:
            grad_weight = torch.empty_like(grad_weight32, dtype=w.dtype)
            _scale_rows_into(grad_weight32, inv_n, grad_weight, False)
        else:  # "sum": x * 1.0 rounded once, which is what the cast does
            grad_weight = grad_weight32.to(w.dtype)
        del grad_weight32
    return loss, z_term, grad_hidden, grad_weight, inv_n


def _lce_backward_none(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    grad_rows: Tensor,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    scale: float,
    need_grad_hidden: bool,
    need_grad_weight: bool,
) -> tuple[Tensor | None, Tensor | None]:
    """Recomputing backward for reduction "none": per-token grad_rows (N,) fp32 -> (grad_hidden (N, d), grad_weight)."""
    h, w, y = _rows(hidden, weight, labels)
    dev = h.device
    grad_hidden = torch.empty(h.shape, dtype=h.dtype, device=dev) if need_grad_hidden else None
    grad_weight32 = torch.zeros(w.shape, dtype=torch.float32, device=dev) if need_grad_weight else None
    _chunks(h, w, y, ignore_index, label_smoothing, z_loss, scale, None, None, grad_rows, grad_hidden, grad_weight32)
    if grad_hidden is not None and scale != 1.0:
        _scale_rows_into(grad_hidden, torch.full((), scale, device=dev), grad_hidden, False)
    grad_weight = grad_weight32.to(w.dtype) if grad_weight32 is not None else None
    return grad_hidden, grad_weight


def _lce_grads(scale_rows, saved, grad_loss: Tensor, reduction: str, scale: float, need_gh: bool, need_gw: bool):
    """(grad_hidden (N, d) or None, grad_weight or None) for reduction "mean"/"sum" from the gradients stored by the
    forward: grad_hidden * ((go [* 1/n]) [* scale]), grad_weight * go (its 1/n was applied in the forward), each
    factor formed inside the scaling kernel; ``scale_rows`` is :func:`_scale_rows_impl` (eager) or the
    ``scale_rows`` custom op (traced)."""
    grad_hidden, grad_weight, inv_n = saved
    go = _grad_output32(grad_loss, reduction)
    gh = scale_rows(grad_hidden, go, inv_n if reduction == "mean" else None, scale) if need_gh else None
    gw = scale_rows(grad_weight, go, None, 1.0) if need_gw else None
    return gh, gw


class _LinearCrossEntropyFn(torch.autograd.Function):
    """The eager route: one Python autograd node around the launchers (non-tensor arguments as one tuple)."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, cfg):
        ignore_index, label_smoothing, z_loss, reduction, scale, want_z = cfg
        need_gh, need_gw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        ce_args = (ignore_index, label_smoothing, z_loss)
        loss, z_term, grad_hidden, grad_weight, inv_n = _lce_forward(
            hidden, weight, labels, *ce_args, reduction, scale, need_gh, need_gw, want_z
        )
        ctx.set_materialize_grads(False)  # the z_term gets no zero-filled grad
        ctx.reduction, ctx.scale, ctx.need_gh, ctx.need_gw = reduction, scale, need_gh, need_gw
        ctx.ce_args, ctx.hidden_shape = ce_args, hidden.shape
        if reduction == "none":
            ctx.save_for_backward(hidden, weight, labels)
        else:
            ctx.save_for_backward(grad_hidden, grad_weight, inv_n)
        if z_term is None:
            return loss, None
        ctx.mark_non_differentiable(z_term)
        return loss, z_term

    @staticmethod
    def backward(ctx, grad_loss, _grad_z):
        if grad_loss is None:
            return None, None, None, None
        if ctx.reduction == "none":
            hidden, weight, labels = ctx.saved_tensors
            grad_rows = _grad_output32(grad_loss, "none").reshape(-1)
            gh, gw = _lce_backward_none(
                hidden, weight, labels, grad_rows, *ctx.ce_args, ctx.scale, ctx.need_gh, ctx.need_gw
            )
        else:
            gh, gw = _lce_grads(
                _scale_rows_impl, ctx.saved_tensors, grad_loss, ctx.reduction, ctx.scale, ctx.need_gh, ctx.need_gw
            )
        if gh is not None:
            gh = gh.view(ctx.hidden_shape)
        return gh, gw, None, None


_lce_apply = function_apply(_LinearCrossEntropyFn)


@custom_op("flasht5::linear_cross_entropy_fwd", mutates_args=())
def _lce_fwd(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    reduction: str,
    scale: float,
    need_grad_hidden: bool,
    need_grad_weight: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """hidden (N, d), weight (V, d), labels (N,) -> (loss, z_term, dL/d(scale*hidden) per token (N, d) or empty,
    grad_weight already divided by n for the mean (V, d) or empty, 1/n_kept or empty). For reduction "none" no
    gradient is formed here (the backward recomputes)."""
    loss, z_term, gh, gw, inv_n = _lce_forward(
        hidden, weight, labels, ignore_index, label_smoothing, z_loss, reduction, scale, need_grad_hidden,
        need_grad_weight, True,
    )  # fmt: skip
    empty = loss.new_empty(0)
    return (
        loss,
        z_term,
        hidden.new_empty(0) if gh is None else gh,
        weight.new_empty(0) if gw is None else gw,
        empty if inv_n is None else inv_n,
    )


@_lce_fwd.register_fake
def _(hidden, weight, labels, ignore_index, label_smoothing, z_loss, reduction, scale, need_gh, need_gw):
    allow_inductor_fallback()
    shape = (hidden.shape[0],) if reduction == "none" else ()
    loss = hidden.new_empty(shape, dtype=torch.float32)
    precompute = reduction != "none"
    gh = hidden.new_empty(hidden.shape) if precompute and need_gh else hidden.new_empty(0)
    gw = weight.new_empty(weight.shape) if precompute and need_gw else weight.new_empty(0)
    inv_n = hidden.new_empty(() if reduction == "mean" else (0,), dtype=torch.float32)
    return loss, loss.new_empty(shape), gh, gw, inv_n


@custom_op("flasht5::linear_cross_entropy_bwd", mutates_args=())
def _lce_bwd(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    grad_rows: Tensor,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    scale: float,
    need_grad_hidden: bool,
    need_grad_weight: bool,
) -> tuple[Tensor, Tensor]:
    """Recomputing backward for reduction "none": per-token grad_rows (N,) fp32 -> (grad_hidden, grad_weight)."""
    gh, gw = _lce_backward_none(
        hidden, weight, labels, grad_rows, ignore_index, label_smoothing, z_loss, scale, need_grad_hidden,
        need_grad_weight,
    )  # fmt: skip
    return (hidden.new_empty(0) if gh is None else gh), (weight.new_empty(0) if gw is None else gw)


@_lce_bwd.register_fake
def _(hidden, weight, labels, grad_rows, ignore_index, label_smoothing, z_loss, scale, need_gh, need_gw):
    allow_inductor_fallback()
    gh = hidden.new_empty(hidden.shape) if need_gh else hidden.new_empty(0)
    gw = weight.new_empty(weight.shape) if need_gw else weight.new_empty(0)
    return gh, gw


def _lce_setup_context(ctx, inputs, output) -> None:
    hidden, weight, labels, ii, ls, z, reduction, scale, need_gh, need_gw = inputs
    _loss, _z, grad_hidden, grad_weight, inv_n = output
    # Outputs nobody differentiates (z_term, the stored gradients, 1/n) must not get zero-filled grads in
    # backward: for the stored (N, d) and (V, d) gradients that would be one more copy of each (measured: +1/8 of
    # the bf16 logits' size at d_model 2048, vocab 32k).
    ctx.set_materialize_grads(False)
    ctx.reduction, ctx.scale, ctx.need_gh, ctx.need_gw = reduction, scale, need_gh, need_gw
    ctx.ce_args = (ii, ls, z)
    if reduction == "none":
        ctx.save_for_backward(hidden, weight, labels)
    else:
        ctx.save_for_backward(grad_hidden, grad_weight, inv_n)


def _lce_op_backward(ctx, grad_loss: Tensor, _gz: Tensor, _ggh: Tensor, _ggw: Tensor, _ginv: Tensor):
    if grad_loss is None:  # only the (detached) z_term was used downstream
        return (None,) * 10
    if ctx.reduction == "none":
        hidden, weight, labels = ctx.saved_tensors
        grad_rows = grad_loss.reshape(-1).to(torch.float32).contiguous()
        gh, gw = torch.ops.flasht5.linear_cross_entropy_bwd(
            hidden, weight, labels, grad_rows, *ctx.ce_args, ctx.scale, ctx.need_gh, ctx.need_gw
        )
    else:
        scale_rows = torch.ops.flasht5.scale_rows
        gh, gw = _lce_grads(
            scale_rows, ctx.saved_tensors, grad_loss, ctx.reduction, ctx.scale, ctx.need_gh, ctx.need_gw
        )
    gh = gh if ctx.need_gh else None
    gw = gw if ctx.need_gw else None
    return gh, gw, None, None, None, None, None, None, None, None


torch.library.register_autograd("flasht5::linear_cross_entropy_fwd", _lce_op_backward, setup_context=_lce_setup_context)


def _check_lce(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    label_smoothing: float,
    z_loss: float,
    reduction: str,
    scale: float | None,
) -> None:
    check_float_tensor(hidden, "hidden")
    check_float_tensor(weight, "weight")
    _check_common(labels, label_smoothing, z_loss, reduction)
    if weight.dim() != 2 or hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"weight must be (V, d) with d = hidden.shape[-1]; got hidden {tuple(hidden.shape)}, weight "
            f"{tuple(weight.shape)}"
        )
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight dtype {weight.dtype} must match hidden dtype {hidden.dtype}")
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"labels must have shape {tuple(hidden.shape[:-1])}, got {tuple(labels.shape)}")
    if weight.shape[0] == 0:
        raise ValueError("weight must have at least one row (V >= 1)")
    if not (weight.device == hidden.device == labels.device):
        raise ValueError(
            f"hidden, weight and labels must share a device; got {hidden.device}, {weight.device}, {labels.device}"
        )
    check_kernel_device(hidden, "hidden")
    if scale is not None and not isinstance(scale, (int, float)):
        raise ValueError(f"scale must be a Python float or None, got {type(scale)}")


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    reduction: str = "mean",
    return_z_loss: bool = False,
    scale: float | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Fused ``cross_entropy((hidden * scale) @ weight.T, labels, ...)``; see the module docstring.

    ``hidden`` (..., d), ``weight`` (V, d), ``labels`` ``hidden.shape[:-1]``. Returns the fp32 loss (0-d, or
    ``labels.shape`` for "none"), or ``(loss, z_term)`` with ``return_z_loss=True`` (z_term detached). Raises
    ``ValueError`` for wrong shapes, dtypes, devices, reduction, and for labels outside [0, V) other than
    ``ignore_index`` (a value check: always for CPU tensors, for CUDA tensors with ``FLASHT5_DEBUG=1``).
    """
    label_smoothing, z_loss, ignore_index = float(label_smoothing), float(z_loss), int(ignore_index)
    if not (  # the usual call in one expression; anything else goes through the checks that name the problem
        type(hidden) is Tensor
        and type(weight) is Tensor
        and type(labels) is Tensor
        and hidden.is_cuda
        and hidden.dtype in FLOAT_DTYPES
        and weight.dtype == hidden.dtype
        and labels.dtype in _FAST_LABEL_DTYPES
        and reduction in _REDUCTIONS
        and 0.0 <= label_smoothing <= 1.0
        and z_loss >= 0.0
        and weight.dim() == 2
        and hidden.dim() >= 1
        and weight.shape[0] > 0
        and hidden.shape[-1] == weight.shape[1]
        and hidden.shape[:-1] == labels.shape
        and weight.device == hidden.device
        and labels.device == hidden.device
        and (scale is None or type(scale) is float)
    ):
        _check_lce(hidden, weight, labels, label_smoothing, z_loss, reduction, scale)
    scale = 1.0 if scale is None else float(scale)
    grad_on = torch.is_grad_enabled()
    need_gh, need_gw = grad_on and hidden.requires_grad, grad_on and weight.requires_grad
    if use_custom_op(hidden):
        loss, z_term, _, _, _ = torch.ops.flasht5.linear_cross_entropy_fwd(
            hidden.reshape(-1, hidden.shape[-1]),  # (N, d)
            weight,
            labels.reshape(-1),  # (N,)
            ignore_index,
            label_smoothing,
            z_loss,
            reduction,
            scale,
            need_gh,
            need_gw,
        )
        if reduction == "none":
            loss, z_term = loss.view(labels.shape), z_term.view(labels.shape)
        return (loss, z_term.detach()) if return_z_loss else loss
    args = (ignore_index, label_smoothing, z_loss, reduction, scale)
    if need_gh or need_gw:
        loss, z_term = _lce_apply(hidden, weight, labels, (*args, return_z_loss))
    else:  # no gradient: no autograd node at all
        loss, z_term, _, _, _ = _lce_forward(hidden, weight, labels, *args, False, False, return_z_loss)
    if reduction == "none":
        loss = loss.view(labels.shape)
        z_term = None if z_term is None else z_term.view(labels.shape)
    return (loss, z_term) if return_z_loss else loss

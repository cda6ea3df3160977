"""The LM head fused with its cross-entropy: ``cross_entropy((scale * hidden) @ weight.T, labels)`` without ever
holding the full (N, V) logits.

What it computes: exactly :func:`flasht5.ops.cross_entropy.cross_entropy` of the logits ``(scale * hidden) @
weight.T`` (same ``ignore_index`` / ``label_smoothing`` / ``z_loss`` / ``reduction`` / ``return_z_loss``
semantics; fp32 loss). ``scale`` multiplies ``hidden`` before the matmul, in ``hidden``'s dtype, as T5 v1.0 does
with ``d_model ** -0.5`` before its tied LM head; the gradient includes it. ``weight`` (V, d) may be a tied input
embedding: its gradient is returned through autograd and accumulates with the embedding's as usual.

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
(host check, as in ``cross_entropy``). fp16 note: gradients are formed in the forward pass assuming
``grad_output == 1`` (the mean's 1/n is applied to ``grad_weight`` before it is rounded to fp16); with fp16 and a
loss scaler, gradient entries below fp16's range can flush to zero before the scale arrives (as with Liger).
bf16 and fp32 are unaffected.

Tuned and tested on an H200 (sm90); the Triton kernel and cuBLAS paths run on sm80 unchanged. Registered as
``torch.library.custom_op`` ``flasht5::linear_cross_entropy_fwd`` / ``_bwd`` with fake implementations and an
autograd formula, so ``torch.compile(fullgraph=True)`` traces through it.

Credits: Liger-Kernel (Hsu et al. 2024) for the chunked fused linear + cross-entropy with gradients computed in the
forward pass and the in-place CE gradient (after mgmalek/efficient_cross_entropy); Apple's Cut Cross-Entropy
(Wijmans et al. 2024, "Cut Your Losses in Large-Vocabulary Language Models") for the case against materialising
logits; FAT5 for the T5 framing.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from flasht5.ops._device import check_float_tensor, check_kernel_device
from flasht5.ops.cross_entropy import (
    _check_common,
    _check_labels,
    _grad_factor,
    _inv_count,
    _launch_ce,
    _reduce,
    _scale_rows_into,
    cross_entropy_ref,
)

__all__ = ["linear_cross_entropy", "linear_cross_entropy_ref"]


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
    on CUDA): the product is added in the GEMM epilogue, without a temporary or an extra rounding."""
    try:
        dev = torch.device("cuda", device_index)
        a = torch.randn(64, 32, device=dev, dtype=torch.bfloat16)
        b = torch.randn(32, 48, device=dev, dtype=torch.bfloat16)
        acc = torch.ones(64, 48, device=dev, dtype=torch.float32)
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
        return bool(torch.allclose(acc, 1 + a.float() @ b.float(), atol=1e-2, rtol=1e-2))
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
    n_tokens = hidden.shape[0]
    need_grad = grad_hidden is not None or grad_weight32 is not None
    chunk = _default_chunk_tokens(n_tokens, weight.shape[0], weight.shape[1])
    # loss rows are needed by the kernel even when only gradients are wanted
    scratch_loss = loss_rows if loss_rows is not None else torch.empty(n_tokens, device=hidden.device)
    scratch_z = z_rows if z_rows is not None else torch.empty(n_tokens, device=hidden.device)
    scratch_lse = torch.empty(n_tokens, device=hidden.device)
    for start in range(0, n_tokens, chunk):
        end = min(start + chunk, n_tokens)
        hs = hidden[start:end]
        if scale != 1.0:
            hs = hs * scale  # in hidden's dtype, exactly like the unfused model
        logits = torch.mm(hs, weight.t())  # (C, V), the only logits alive
        _launch_ce(
            logits,
            labels[start:end],
            scratch_loss[start:end],
            scratch_z[start:end],
            scratch_lse[start:end],
            logits if need_grad else None,  # in place: the chunk is private
            row_scale[start:end] if row_scale is not None else None,
            ignore_index,
            label_smoothing,
            z_loss,
        )
        if grad_hidden is not None:
            torch.mm(logits, weight, out=grad_hidden[start:end])  # (C, d) = dL/d(scale * hidden)
        if grad_weight32 is not None:
            _accumulate_grad_weight(grad_weight32, logits, hs)  # (V, d)
        del logits, hs  # free this chunk before the next one is allocated


def _rows(hidden: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    h = hidden if hidden.stride(-1) == 1 else hidden.contiguous()
    w = weight if weight.stride(-1) == 1 else weight.contiguous()
    return h, w


@torch.library.custom_op("flasht5::linear_cross_entropy_fwd", mutates_args=())
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
    grad_weight already divided by n for the mean (V, d) or empty, 1/n_kept). For reduction "none" no gradient is
    formed here (the backward recomputes)."""
    h, w = _rows(hidden, weight)
    y = labels.contiguous()
    n_tokens, n_classes = h.shape[0], w.shape[0]
    _check_labels(y, n_classes, ignore_index)
    precompute = reduction != "none"
    grad_hidden = torch.empty(h.shape, dtype=h.dtype, device=h.device) if precompute and need_grad_hidden else None
    grad_weight32 = (
        torch.zeros(w.shape, dtype=torch.float32, device=w.device) if precompute and need_grad_weight else None
    )
    loss_rows = torch.empty(n_tokens, dtype=torch.float32, device=h.device)
    z_rows = torch.empty(n_tokens, dtype=torch.float32, device=h.device)
    _chunks(h, w, y, ignore_index, label_smoothing, z_loss, scale, loss_rows, z_rows, None, grad_hidden, grad_weight32)
    inv_n = _inv_count(y, ignore_index)
    if grad_weight32 is not None:
        grad_weight = torch.empty(w.shape, dtype=w.dtype, device=w.device)
        factor = inv_n if reduction == "mean" else torch.ones((), device=w.device)
        _scale_rows_into(grad_weight32, factor, grad_weight)
        del grad_weight32
    else:
        grad_weight = w.new_empty(0)
    grad_hidden = grad_hidden if grad_hidden is not None else h.new_empty(0)
    return _reduce(loss_rows, inv_n, reduction), _reduce(z_rows, inv_n, reduction), grad_hidden, grad_weight, inv_n


@_lce_fwd.register_fake
def _(hidden, weight, labels, ignore_index, label_smoothing, z_loss, reduction, scale, need_gh, need_gw):
    shape = (hidden.shape[0],) if reduction == "none" else ()
    loss = hidden.new_empty(shape, dtype=torch.float32)
    precompute = reduction != "none"
    gh = hidden.new_empty(hidden.shape) if precompute and need_gh else hidden.new_empty(0)
    gw = weight.new_empty(weight.shape) if precompute and need_gw else weight.new_empty(0)
    return loss, loss.new_empty(shape), gh, gw, hidden.new_empty((), dtype=torch.float32)


@torch.library.custom_op("flasht5::linear_cross_entropy_bwd", mutates_args=())
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
    h, w = _rows(hidden, weight)
    y = labels.contiguous()
    grad_hidden = torch.empty(h.shape, dtype=h.dtype, device=h.device) if need_grad_hidden else None
    grad_weight32 = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need_grad_weight else None
    _chunks(h, w, y, ignore_index, label_smoothing, z_loss, scale, None, None, grad_rows, grad_hidden, grad_weight32)
    if grad_hidden is not None and scale != 1.0:
        _scale_rows_into(grad_hidden, torch.full((), scale, device=h.device), grad_hidden)
    grad_weight = grad_weight32.to(w.dtype) if grad_weight32 is not None else w.new_empty(0)
    return (grad_hidden if grad_hidden is not None else h.new_empty(0)), grad_weight


@_lce_bwd.register_fake
def _(hidden, weight, labels, grad_rows, ignore_index, label_smoothing, z_loss, scale, need_gh, need_gw):
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


def _lce_backward(ctx, grad_loss: Tensor, _gz: Tensor, _ggh: Tensor, _ggw: Tensor, _ginv: Tensor):
    if grad_loss is None:  # only the (detached) z_term was used downstream
        return (None,) * 10
    if ctx.reduction == "none":
        hidden, weight, labels = ctx.saved_tensors
        grad_rows = grad_loss.reshape(-1).to(torch.float32).contiguous()
        gh, gw = torch.ops.flasht5.linear_cross_entropy_bwd(
            hidden, weight, labels, grad_rows, *ctx.ce_args, ctx.scale, ctx.need_gh, ctx.need_gw
        )
    else:
        grad_hidden, grad_weight, inv_n = ctx.saved_tensors
        factor = _grad_factor(grad_loss, inv_n, ctx.reduction)  # go / n (mean) or go (sum)
        gh = torch.ops.flasht5.scale_rows(grad_hidden, factor * ctx.scale) if ctx.need_gh else None
        gw = torch.ops.flasht5.scale_rows(grad_weight, grad_loss.to(torch.float32).reshape(())) if ctx.need_gw else None
    gh = gh if ctx.need_gh else None
    gw = gw if ctx.need_gw else None
    return gh, gw, None, None, None, None, None, None, None, None


torch.library.register_autograd("flasht5::linear_cross_entropy_fwd", _lce_backward, setup_context=_lce_setup_context)


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
    ``ValueError`` for wrong shapes, dtypes, devices, labels, reduction.
    """
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
    grad_on = torch.is_grad_enabled()
    loss, z_term, _, _, _ = torch.ops.flasht5.linear_cross_entropy_fwd(
        hidden.reshape(-1, hidden.shape[-1]),  # (N, d)
        weight,
        labels.reshape(-1),  # (N,)
        int(ignore_index),
        float(label_smoothing),
        float(z_loss),
        reduction,
        1.0 if scale is None else float(scale),
        grad_on and hidden.requires_grad,
        grad_on and weight.requires_grad,
    )
    if reduction == "none":
        loss, z_term = loss.view(labels.shape), z_term.view(labels.shape)
    return (loss, z_term.detach()) if return_z_loss else loss

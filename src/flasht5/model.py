"""The T5 / UL2 encoder-decoder in plain PyTorch: a complete model (no transformers import here; DESIGN.md §2-3).

``T5(config)`` is trainable on its own: :meth:`T5.forward` takes token ids, labels (shifted right per document
into decoder inputs) and the batch layouts (:mod:`flasht5.layout`) and returns the LM loss, its z-loss term and/or
the logits; every module initialises itself with Mesh TensorFlow's scheme (``reset_parameters``). It computes
exactly what Hugging Face's T5 computes, for every public family (T5 v1.0, v1.1 / FLAN, mT5, umT5, ByT5, UL2),
chosen by config fields alone (any object with ``FlashT5Config``'s fields), plus ALiBi, RoPE and FIRE positions.

Numerics that matter (DESIGN.md §3): attention has no 1/sqrt(d) scale; RMSNorm has no mean and no bias and takes
its variance in fp32; the residual stream keeps the embedding's dtype (fp32 under autocast, as in Hugging Face);
the position bias is owned by each stack (:class:`PositionBias`: one table, or one per layer for umT5) and computed
once per stack forward; a query at row i of a block whose keys are longer sits at position i + Lk - Lq; positions
restart in every document; ``wo`` keeps its own dtype (fp32 where Hugging Face keeps it).

The backend is resolved once, at construction or :meth:`T5.set_backend`, into a :class:`Kernels` bundle that the
modules call: ``"eager"`` (the reference: fp32 softmax over a materialised bias), ``"sdpa"``
(``scaled_dot_product_attention`` with the same bias) and ``"flash"`` (the Triton kernels of :mod:`flasht5.ops`:
flash attention with the bias in-kernel, fused residual add + RMSNorm, gated activation, fused LM head + loss).
The reference backends run every stack on rows (varlen documents become padded rows, once per stack); flash runs
every stack padding-free (padded rows lose their padding once per stack), so the linear layers skip padding too.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten
from torch.utils.checkpoint import checkpoint

from flasht5.layout import Layout, _readable, gather_tokens, scatter_tokens, shift_right
from flasht5.ops.relative_position import relative_position_bucket, t5_bias_lut

BACKENDS = ("eager", "sdpa", "flash")


def default_backend(head_dim: int | None = None) -> str:
    """The one default: ``flash`` where a CUDA GPU and Triton are present (and the flash kernels take the model's
    ``head_dim``), ``sdpa`` otherwise."""
    if torch.cuda.is_available():
        try:
            from flasht5.ops.attention import SUPPORTED_HEAD_DIMS

            if head_dim is None or head_dim in SUPPORTED_HEAD_DIMS:
                return "flash"
        except ImportError:
            pass
    return "sdpa"


def check_backend(backend: str, head_dim: int) -> None:
    """Raise a clear error for a backend that cannot run a model of this head dim (``d_kv``)."""
    if backend not in BACKENDS:
        raise ValueError(f"attn_implementation={backend!r} is not supported; choose one of {BACKENDS}.")
    if backend == "flash":
        from flasht5.ops.attention import SUPPORTED_HEAD_DIMS

        if head_dim not in SUPPORTED_HEAD_DIMS:
            raise ValueError(
                f"attn_implementation='flash' needs a head dim (d_kv) its kernels take, one of {SUPPORTED_HEAD_DIMS}; "
                f"this model has d_kv={head_dim}: use attn_implementation='sdpa' or 'eager'."
            )


def _gelu_tanh(x: Tensor) -> Tensor:
    # Hugging Face's NewGELUActivation ("gelu_new"), written out so results match it bit for bit.
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


# The activation names a config may use (config.py validates against these keys).
ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_new": _gelu_tanh,
    "gelu_tanh": _gelu_tanh,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "swish": F.silu,
}


@functools.cache
def _warn_once(message: str) -> None:
    warnings.warn(message, stacklevel=3)


# --------------------------------------------------------------------------------------------------------------
# The kernel bundle: the backend, resolved once
# --------------------------------------------------------------------------------------------------------------


class Kernels(NamedTuple):
    """The functions the modules call; built by :func:`kernels_for`.

    flat:          stacks run padding-free (flash) rather than on rows (the reference paths).
    attend:        (q, k, v, bias, q_layout, k_layout, causal, dropout, training) -> (B, Lq, H, D):
                   :func:`attend_reference` or :func:`attend_flash`.
    rms_norm:      (x, weight, eps, residual=None) -> y, or (y, x + residual) with a residual.
    gated_act:     (gate, up, name) -> act(gate) * up.
    lm_loss:       (hidden, weight, scale, labels, z_loss) -> (loss, z-term or None): the LM head fused into the
                   loss; None when the loss is taken from logits.
    cross_entropy: (logits, labels, z_loss) -> (loss, z-term or None).
    decode:        the single-query attention over a static key/value cache (flash decoding), or None.
    """

    backend: str
    flat: bool
    attend: Callable[..., Tensor]
    rms_norm: Callable[..., Any]
    gated_act: Callable[[Tensor, Tensor, str], Tensor]
    lm_loss: Callable[..., tuple[Tensor, Tensor | None]] | None
    cross_entropy: Callable[..., tuple[Tensor, Tensor | None]]
    decode: Callable[..., Tensor] | None = None


def kernels_for(backend: str) -> Kernels:
    """The kernel bundle of a backend :func:`check_backend` accepted."""
    if backend != "flash":
        return Kernels(backend, False, functools.partial(attend_reference, impl=backend), norm_reference,
                       gated_reference, None, cross_entropy_reference)  # fmt: skip
    # Imported here, once: the modules then call plain functions (no per-call import or backend test).
    from flasht5.ops import activations, attention, decode, loss, norm

    fused = set(activations.KINDS)

    def gated(gate: Tensor, up: Tensor, name: str) -> Tensor:
        return activations.gated_act(gate, up, name) if name in fused else gated_reference(gate, up, name)

    return Kernels(
        "flash", True, functools.partial(attend_flash, attention.flash_attention, decode.flash_decode),
        functools.partial(norm_kernel, norm.rms_norm), gated,
        functools.partial(lm_loss_kernel, loss.linear_cross_entropy),
        functools.partial(cross_entropy_kernel, loss.cross_entropy), decode.flash_decode,
    )  # fmt: skip


def norm_reference(x: Tensor, weight: Tensor, eps: float, residual: Tensor | None = None):
    """Hugging Face's ``T5LayerNorm`` (variance in fp32; cast to a half weight's dtype before the multiply), after
    the residual add ``h = residual + x`` (clamped in fp16 as Hugging Face clamps)."""
    h = x if residual is None else _clamp_fp16(residual + x)
    variance = h.float().pow(2).mean(-1, keepdim=True)
    y = h * torch.rsqrt(variance + eps)
    if weight.dtype in (torch.float16, torch.bfloat16):
        y = y.to(weight.dtype)
    y = weight * y
    return y if residual is None else (y, h)


def norm_kernel(rms_norm: Callable, x: Tensor, weight: Tensor, eps: float, residual: Tensor | None = None):
    """The Triton RMSNorm, fused with the residual add. Under autocast it writes the autocast dtype directly: the
    value Hugging Face's fp32 norm output takes when the next Linear casts it, without that extra cast."""
    out_dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None
    if residual is not None and (x.dtype == torch.float16 or residual.dtype == torch.float16):
        h = _clamp_fp16(residual + x)  # Hugging Face clamps the fp16 sum before the norm: not fused
        return rms_norm(h, weight, eps, out_dtype=out_dtype), h
    return rms_norm(x, weight, eps, residual=residual, out_dtype=out_dtype)


def _clamp_fp16(x: Tensor) -> Tensor:
    """Hugging Face clamps inf after every fp16 sub-layer; keep that so fp16 checkpoints behave the same."""
    if x.dtype != torch.float16:
        return x
    big = torch.finfo(torch.float16).max
    limit = torch.where(torch.isinf(x).any(), big - 1000, big)
    return torch.clamp(x, min=-limit, max=limit)


def gated_reference(gate: Tensor, up: Tensor, name: str) -> Tensor:
    return ACTIVATIONS[name](gate) * up


def cross_entropy_reference(logits: Tensor, labels: Tensor, z_loss: float) -> tuple[Tensor, Tensor | None]:
    """(loss, z-term): mean fp32 cross-entropy over labels != -100 (0, not NaN, when there are none), plus
    ``z_loss * mean(logsumexp**2)`` over the same tokens, returned detached for logging (None when ``z_loss`` is 0)."""
    flat_logits, flat = logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1)
    keep = flat != -100
    count = keep.sum().clamp(min=1)
    loss = F.cross_entropy(flat_logits, flat, ignore_index=-100, reduction="sum") / count
    if not z_loss:
        return loss, None
    z = z_loss * (torch.logsumexp(flat_logits, dim=-1).pow(2) * keep).sum() / count
    return loss + z, z.detach()


def cross_entropy_kernel(
    cross_entropy: Callable, logits: Tensor, labels: Tensor, z_loss: float
) -> tuple[Tensor, Tensor | None]:
    loss, z = cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), z_loss=z_loss,
                            return_z_loss=True)  # fmt: skip
    return loss, (z if z_loss else None)


def lm_loss_kernel(
    linear_cross_entropy: Callable, hidden: Tensor, weight: Tensor, scale: float | None, labels: Tensor, z_loss: float
) -> tuple[Tensor, Tensor | None]:
    """LM head and loss fused: the (tokens, vocab) logits are never materialised."""
    dt = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else hidden.dtype
    loss, z = linear_cross_entropy(
        hidden.reshape(-1, hidden.shape[-1]).to(dt), weight.to(dt), labels.reshape(-1), z_loss=z_loss, scale=scale,
        return_z_loss=True,
    )  # fmt: skip
    return loss, (z if z_loss else None)


# --------------------------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------------------------


def _allowed(ql: Layout, kl: Layout, causal: bool, device: torch.device) -> Tensor | None:
    """(B or 1, 1, Lq, Lk) bool: which keys each query may see, or None when all (row layouts)."""
    allowed = None
    qs, ks = ql.segments(), kl.segments()
    if qs is not None and ks is not None:
        allowed = (qs[:, :, None] == ks[:, None, :]) & (ks[:, None, :] != 0)
    elif kl.key_mask() is not None:
        allowed = kl.key_mask()[:, None, :]
    if causal:
        c = kl.positions(device)[:, None, :] <= ql.positions(device)[:, :, None]
        allowed = c if allowed is None else allowed & c
    return None if allowed is None else allowed[:, None]


def attend_reference(
    q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, ql: Layout, kl: Layout, *, causal: bool, dropout: float,
    training: bool, impl: str, record: list[Tensor] | None = None,
) -> Tensor:  # fmt: skip
    """Attention of q (B, Lq, H, D) over k, v (B, Lk, H, D) on row layouts; ``bias`` is the materialised
    (B or 1, H, Lq, Lk) fp32 position bias. ``impl``: "eager" (fp32 softmax, Hugging Face's ops) or "sdpa".
    ``record`` (eager only): a list that receives the attention weights (B, H, Lq, Lk), after dropout as Hugging
    Face returns them for ``output_attentions``."""
    allowed = _allowed(ql, kl, causal, q.device)
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, L, D)
    if impl == "eager":
        scores = torch.matmul(qh, kh.transpose(-1, -2))
        scores = scores.float() if scores.dtype in (torch.float16, torch.bfloat16) else scores  # softmax in >= fp32
        if bias is not None:
            scores = scores + bias
        if allowed is not None:
            scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
        probs = F.dropout(torch.softmax(scores, dim=-1).to(vh.dtype), p=dropout, training=training)
        if record is not None:
            record.append(probs)
        out = torch.matmul(probs, vh)
    else:
        if bias is None and causal and ql.kind == kl.kind == "dense" and q.shape[1] == k.shape[1]:
            mask, is_causal = None, True  # SDPA's own causal path (top-left == bottom-right when Lq == Lk)
        else:
            mask, is_causal = (None if bias is None else bias.to(q.dtype)), False
            if allowed is not None:
                base = torch.zeros((), dtype=q.dtype, device=q.device) if mask is None else mask
                mask = torch.where(allowed, base, torch.finfo(q.dtype).min)
        out = F.scaled_dot_product_attention(
            qh, kh, vh, attn_mask=mask, dropout_p=dropout if training else 0.0, is_causal=is_causal, scale=1.0
        )
    return out.transpose(1, 2)


def attend_flash(
    flash_attention: Callable, flash_decode: Callable, q: Tensor, k: Tensor, v: Tensor, bias: dict[str, Any],
    ql: Layout, kl: Layout, *, causal: bool, dropout: float, training: bool,
) -> Tensor:  # fmt: skip
    """The flash kernels on padding-free layouts: q (B, Lq, H, D) dense or (1, T, H, D) varlen; k, v likewise, or
    padded rows (cached decoding: the kept keys are gathered). One query row over keys given by per-row lengths (a
    static cache, or the encoder rows during generation) takes the split-KV decode kernel, whose query sits at the
    last valid key. ``bias``: the kernels' position-bias arguments."""
    if q.shape[1] == 1 and kl.kind == "padded" and kl.lengths is not None and "bias" not in bias:
        return flash_decode(q[:, 0], k, v, kl.lengths, **bias)[:, None]
    if training and dropout > 0:
        _warn_once(
            "attn_implementation='flash' applies no dropout to attention probabilities (hidden-state dropout is "
            f"applied); dropout_rate={dropout} affects attention only with 'eager' or 'sdpa'."
        )
    if ql.kind == kl.kind == "dense":
        return flash_attention(q, k, v, scale=1.0, causal=causal, **bias)
    if "bias" in bias:
        raise ValueError(
            "position_encoding='fire' with attn_implementation='flash' needs dense batches (no padding or packing): "
            "use attn_implementation='sdpa' for padded or packed batches."
        )
    B, Lq, H, D = q.shape
    fq, fk = ql.flat(q.device), kl.flat(q.device)
    cu_q, cu_k = fq.cu_seqlens, fk.cu_seqlens
    nq, nk = cu_q.numel() - 1, cu_k.numel() - 1
    if nq != nk and nq - fq.pad_docs == nk - fk.pad_docs:  # the same real documents, padding ones on one side
        cu_q, cu_k = _empty_docs(cu_q, max(nk - nq, 0)), _empty_docs(cu_k, max(nq - nk, 0))
    elif nq != nk:
        raise ValueError(
            "cross-attention needs the same documents on both sides: packed batches must be packed on both sides "
            f"(encoder {fk.cu_seqlens.numel() - 1} documents, decoder {fq.cu_seqlens.numel() - 1})."
        )
    k, v = k.reshape(-1, H, D), v.reshape(-1, H, D)
    if fk.index is not None:
        k, v = k.index_select(0, fk.index), v.index_select(0, fk.index)
    out = flash_attention(
        q.reshape(-1, H, D), k, v, scale=1.0, causal=causal, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
        max_seqlen_q=fq.max_seqlen, max_seqlen_k=fk.max_seqlen, **bias,
    )  # fmt: skip
    return out.view(B, Lq, H, D)


def _empty_docs(cu: Tensor, n: int) -> Tensor:
    """``cu_seqlens`` with ``n`` empty documents appended (they pair with the other side's padding documents)."""
    return cu if n == 0 else torch.cat([cu, cu[-1:].expand(n)])


# --------------------------------------------------------------------------------------------------------------
# Position encodings
# --------------------------------------------------------------------------------------------------------------


def alibi_slopes(num_heads: int) -> Tensor:
    """ALiBi head slopes (Press et al. 2022): a geometric sequence; non-powers of 2 interleave the next power."""

    def power_of_2(n: int) -> list[float]:
        start = 2.0 ** (-(2.0 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(num_heads).is_integer():
        slopes = power_of_2(num_heads)
    else:
        closest = 2 ** math.floor(math.log2(num_heads))
        slopes = power_of_2(closest) + power_of_2(2 * closest)[0::2][: num_heads - closest]
    return torch.tensor(slopes, dtype=torch.float32)


def rope_angles(positions: Tensor, rot_dims: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos, sin of shape (B, L, 1, rot_dims // 2) for rotary embeddings (Su et al. 2021) at integer positions."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, rot_dims, 2, device=positions.device, dtype=torch.float32) / rot_dims))
    angles = positions.float()[..., None] * inv_freq  # (B, L, rot/2)
    return angles.cos()[:, :, None], angles.sin()[:, :, None]


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the first ``2 * cos.shape[-1]`` dims of each head of x (B, L, H, D), GPT-NeoX half-split layout."""
    half = cos.shape[-1]
    x1, x2, rest = x[..., :half].float(), x[..., half : 2 * half].float(), x[..., 2 * half :]
    rotated = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)
    return torch.cat([rotated, rest], dim=-1) if rest.shape[-1] else rotated


class FIRE(nn.Module):
    """FIRE relative-position bias (Li et al. 2023, "Functional Interpolation for Relative Positions Improves Long
    Context Transformers"): ``b(i, j) = f(psi(i - j) / psi(max(L, i)))`` with ``psi(x) = log(c x + 1)``, a learned
    MLP ``f`` (1 -> hidden -> heads) and learned ``c`` and threshold ``L``.

    The paper defines the causal case. For bidirectional (encoder) attention the distance keeps its sign,
    ``sign(j - i) psi(|j - i|)``, and is normalised by ``psi(max(L, i, j))`` so that both directions are learnt.
    """

    def __init__(self, num_heads: int, hidden: int = 32, init_length: int = 512, factor: float = 1.0):
        super().__init__()
        self.mlp_in = nn.Linear(1, hidden)
        self.mlp_out = nn.Linear(hidden, num_heads)
        self.log_c = nn.Parameter(torch.zeros(()))  # c = exp(log_c) > 0, init 1
        self.threshold = nn.Parameter(torch.tensor(float(init_length)))
        self.init_length, self.factor = float(init_length), factor
        self.reset_parameters()

    def reset_parameters(self, init: Any = nn.init) -> None:
        init.normal_(self.mlp_in.weight, mean=0.0, std=self.factor)
        init.zeros_(self.mlp_in.bias)
        init.normal_(self.mlp_out.weight, mean=0.0, std=self.factor * self.mlp_out.in_features**-0.5)
        init.zeros_(self.mlp_out.bias)
        init.zeros_(self.log_c)
        init.constant_(self.threshold, self.init_length)

    def forward(self, q_pos: Tensor, k_pos: Tensor, bidirectional: bool) -> Tensor:
        """Bias (B, H, Lq, Lk) in fp32 for positions q_pos (B, Lq) and k_pos (B, Lk)."""
        c = self.log_c.exp()
        psi = lambda x: torch.log(c * x + 1.0)
        dtype = self.mlp_in.weight.dtype if self.mlp_in.weight.dtype == torch.float64 else torch.float32
        qp, kp = q_pos.to(dtype)[:, :, None], k_pos.to(dtype)[:, None, :]
        rel = kp - qp
        if bidirectional:
            num = torch.sign(rel) * psi(rel.abs())
            den = psi(torch.maximum(torch.maximum(qp, kp), self.threshold.abs()))
        else:
            num = psi(torch.clamp(-rel, min=0))
            den = psi(torch.maximum(qp, self.threshold.abs()))
        x = (num / den)[..., None].to(self.mlp_in.weight.dtype)  # (B, Lq, Lk, 1)
        return self.mlp_out(F.relu(self.mlp_in(x))).permute(0, 3, 1, 2).to(dtype)


class PositionBias(nn.Module):
    """The position bias of one stack's self-attention, owned by the stack and computed once per stack forward.

    ``t5``: a bucket table (``tables.0``, shared by all layers; umT5: ``tables.i`` per layer) of (num_buckets, H);
    ``alibi``: fixed slopes (a non-persistent buffer); ``fire``: the FIRE MLP. ``rope`` has no bias (Attention
    rotates q and k). Bidirectional in the encoder, causal in the decoder.
    """

    def __init__(self, cfg: Any, *, is_decoder: bool, num_layers: int):
        super().__init__()
        self.kind = cfg.position_encoding
        self.bidirectional = not is_decoder
        self.max_distance = cfg.relative_attention_max_distance
        self.num_layers, self.std = num_layers, cfg.initializer_factor * cfg.d_model**-0.5
        if self.kind == "t5":
            n = num_layers if cfg.relative_attention_per_layer else min(num_layers, 1)
            self.tables = nn.ModuleList(
                [nn.Embedding(cfg.relative_attention_num_buckets, cfg.num_heads) for _ in range(n)]
            )
        elif self.kind == "alibi":
            self.register_buffer("slopes", alibi_slopes(cfg.num_heads), persistent=False)
        elif self.kind == "fire":
            self.fire = FIRE(cfg.num_heads, cfg.fire_hidden_size, cfg.fire_init_length, cfg.initializer_factor)
        self.reset_parameters()

    def reset_parameters(self, init: Any = nn.init) -> None:
        for table in getattr(self, "tables", ()):
            init.normal_(table.weight, mean=0.0, std=self.std)

    def forward(self, ql: Layout, kl: Layout, kernels: Kernels, device: torch.device) -> list[Any]:
        """Per layer, what ``kernels.attend`` takes as ``bias``: the flash kernel's keyword arguments, or the
        materialised (B or 1, H, Lq, Lk) fp32 bias (None without one) for the reference paths."""
        if self.kind == "rope":
            return [{} if kernels.flat else None] * self.num_layers
        if kernels.flat and self.kind == "t5":
            # The per-head distance lookup the kernel reads, gathered from the table once per stack forward (its
            # gradient flows back to the table through autograd, once, not once per layer).
            per = [dict(rel_lut=t5_bias_lut(t.weight, self.bidirectional, self.max_distance)) for t in self.tables]
        elif kernels.flat and self.kind == "alibi":
            per = [dict(alibi_slopes=self.slopes)]
        elif kernels.flat:  # FIRE: its MLP's bias, materialised (dense batches only)
            per = [dict(bias=self.fire(ql.positions(device), kl.positions(device), self.bidirectional))]
        else:
            per = self._materialised(ql, kl, device)
        return per * self.num_layers if len(per) == 1 else per

    def _materialised(self, ql: Layout, kl: Layout, device: torch.device) -> list[Tensor]:
        qp, kp = ql.positions(device), kl.positions(device)
        if self.kind == "fire":
            return [self.fire(qp, kp, self.bidirectional)]
        rel = kp[:, None, :] - qp[:, :, None]  # (B, Lq, Lk) = key_pos - query_pos
        if self.kind == "alibi":
            return [-self.slopes.float()[None, :, None, None] * rel.abs()[:, None].float()]
        buckets = relative_position_bucket(rel, self.bidirectional, self.tables[0].num_embeddings, self.max_distance)
        return [F.embedding(buckets, t.weight).permute(0, 3, 1, 2).float() for t in self.tables]


# --------------------------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------------------------


class KVCache(Protocol):
    """What the decoder needs from a key/value cache; ``flasht5.generation`` implements it (also over HF caches).

    Tensors are (B, L, H, D); cross-attention keys are stored for the encoder's row (outer) layout.
    """

    def past_length(self) -> int: ...

    def key_layout(self) -> Layout | None:
        """The self-attention keys' layout after this step's update (None: every cached key is real)."""

    def update_self(self, layer_idx: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]: ...

    def get_cross(self, layer_idx: int) -> tuple[Tensor, Tensor] | None: ...

    def set_cross(self, layer_idx: int, k: Tensor, v: Tensor) -> None: ...

    def qkv_weight(self, layer_idx: int) -> Tensor | None:
        """This layer's self-attention q, k, v weights concatenated, (3 inner, d_model): one matmul instead of three
        in a decode step (None: the three projections run as usual)."""


@dataclass
class StackContext:
    """What every layer of one stack forward shares: the kernels, the layouts, the bias, the cross inputs, the cache."""

    kernels: Kernels
    q: Layout  # this stack's tokens (inner layout)
    k: Layout  # self-attention keys (q's layout, or the cached keys' during decoding)
    bias: list[Any]  # per layer, from PositionBias
    encoded: Encoded | None = None  # cross-attention input
    cache: KVCache | None = None
    hidden_states: list[Tensor] | None = None  # filled with every layer's input and the output when a list

    @property
    def enc(self) -> Layout:
        """Cross-attention keys: the encoder's inner layout, or its rows when a cache holds them (as HF's does)."""
        return self.encoded.view.outer if self.cache is not None else self.encoded.view.inner

    def enc_hidden(self) -> Tensor:
        return self.encoded.hidden if self.cache is not None else self.encoded.hidden_inner


class RMSNorm(nn.Module):
    """T5's LayerNorm: no mean, no bias, variance in fp32 (the backend's ``rms_norm``, fused with the residual)."""

    def __init__(self, dim: int, eps: float = 1e-6, factor: float = 1.0):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps, self.factor = eps, factor

    def reset_parameters(self, init: Any = nn.init) -> None:
        init.constant_(self.weight, self.factor)

    def forward(self, x: Tensor, kernels: Kernels, residual: Tensor | None = None):
        """``norm(x)``, or with ``residual``: ``(norm(residual + x), residual + x)``."""
        return kernels.rms_norm(x, self.weight, self.eps, residual)


class MLP(nn.Module):
    """T5's feed-forward: ``wo(act(wi x))`` or, gated (v1.1, UL2), ``wo(act(wi_0 x) * wi_1 x)``."""

    def __init__(self, cfg: Any):
        super().__init__()
        self.gated, self.act_name, self.p = cfg.is_gated_act, cfg.dense_act_fn, float(cfg.dropout_rate)
        if self.gated:
            self.wi_0 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
            self.wi_1 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        else:
            self.wi = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wo = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)
        f = cfg.initializer_factor
        self.std_in, self.std_out = f * cfg.d_model**-0.5, f * cfg.d_ff**-0.5

    def reset_parameters(self, init: Any = nn.init) -> None:
        for lin in (self.wi_0, self.wi_1) if self.gated else (self.wi,):
            init.normal_(lin.weight, mean=0.0, std=self.std_in)
        init.normal_(self.wo.weight, mean=0.0, std=self.std_out)

    def forward(self, x: Tensor, kernels: Kernels) -> Tensor:
        if self.gated:
            if FUSED_PROJ and fusable_linears(self.wi_0, self.wi_1):  # gate and up: views of one matmul's output
                gate, up = F.linear(x, _stack(self.wi_0, self.wi_1)).view(*x.shape[:-1], 2, -1).unbind(-2)
            else:
                gate, up = self.wi_0(x), self.wi_1(x)
            h = kernels.gated_act(gate, up, self.act_name)
        else:
            h = ACTIVATIONS[self.act_name](self.wi(x))
        if self.p:
            h = F.dropout(h, self.p, self.training)
        # wo may be kept in fp32 (FLAN-T5-XXL in half precision): compute it in its own dtype, as Hugging Face does
        # (under autocast the Linear casts by itself).
        wdt = self.wo.weight.dtype
        if h.dtype != wdt and wdt != torch.int8 and not torch.is_autocast_enabled(h.device.type):
            h = h.to(wdt)
        return self.wo(h)


# The self-attention's q, k, v, the cross-attention's k, v and a gated feed-forward's wi_0, wi_1 each come from one
# matmul over the concatenated weights (a cat of small weights per step): 84 fewer linear calls in a T5-base step, and
# the backward's input gradients come out of one matmul instead of 2-3 plus autograd's adds. Measured on the H200 at
# 32 x 512 (benchmarks/results/2026-12-02-h200-e/): the graph-captured step 1.2 % shorter (the 98 adds were 1.7 ms of
# 63.7), peak memory 0.3 GiB higher (the concatenated weights the backward keeps). Layers that are not plain bias-free
# Linears (PEFT adapters, quantised layers, hooks) keep their own calls. FLASHT5_FUSED_PROJ=0 turns it off.
FUSED_PROJ = os.environ.get("FLASHT5_FUSED_PROJ", "1") not in ("", "0", "false", "False")


def fusable_linears(*mods: nn.Module) -> bool:
    """Plain bias-free ``nn.Linear`` layers without hooks: one matmul over their stacked weights gives what their
    own calls would (a PEFT adapter, a quantised layer or a hook computes or observes more)."""
    return all(
        type(m) is nn.Linear and m.bias is None and not m._forward_hooks and not m._forward_pre_hooks for m in mods
    )


def _stacked(x: Tensor, weight: Tensor, n: int, heads: int, head_dim: int) -> tuple[Tensor, ...]:
    """The ``n`` (..., heads, head_dim) projections of ``x`` by ``weight``, n projections' weights stacked: views of
    one matmul's output."""
    return F.linear(x, weight).view(*x.shape[:-1], n, heads, head_dim).unbind(-3)


def _stack(*mods: nn.Linear) -> Tensor:
    return torch.cat([m.weight for m in mods])


class Attention(nn.Module):
    """Multi-head attention without 1/sqrt(d) scaling (self-attention, or cross-attention over the encoder)."""

    def __init__(self, cfg: Any, *, layer_idx: int, is_decoder: bool, is_cross: bool = False):
        super().__init__()
        self.layer_idx, self.is_cross = layer_idx, is_cross
        self.causal = is_decoder and not is_cross
        self.num_heads, self.head_dim, self.p = cfg.num_heads, cfg.d_kv, float(cfg.dropout_rate)
        inner = cfg.num_heads * cfg.d_kv
        self.q = nn.Linear(cfg.d_model, inner, bias=False)
        self.k = nn.Linear(cfg.d_model, inner, bias=False)
        self.v = nn.Linear(cfg.d_model, inner, bias=False)
        self.o = nn.Linear(inner, cfg.d_model, bias=False)
        self.rope = None
        if cfg.position_encoding == "rope" and not is_cross:
            self.rope = (int(cfg.d_kv * cfg.rope_fraction), float(cfg.rope_theta))
        f = cfg.initializer_factor
        self.stds = (f * (cfg.d_model * cfg.d_kv) ** -0.5, f * cfg.d_model**-0.5, f * inner**-0.5)
        self.record: list[Tensor] | None = None  # a list: the eager backend appends the attention weights to it

    def reset_parameters(self, init: Any = nn.init) -> None:
        std_q, std_kv, std_o = self.stds
        init.normal_(self.q.weight, mean=0.0, std=std_q)
        init.normal_(self.k.weight, mean=0.0, std=std_kv)
        init.normal_(self.v.weight, mean=0.0, std=std_kv)
        init.normal_(self.o.weight, mean=0.0, std=std_o)

    def forward(self, x: Tensor, ctx: StackContext) -> Tensor:
        B, Lq, _ = x.shape
        H, D = self.num_heads, self.head_dim
        cache = ctx.cache
        fused = None if cache is None or self.is_cross else cache.qkv_weight(self.layer_idx)
        stacked = fused is None and FUSED_PROJ and not self.is_cross and fusable_linears(self.q, self.k, self.v)
        if fused is not None or stacked:  # q, k, v as views of one matmul's output
            q, k, v = _stacked(x, fused if fused is not None else _stack(self.q, self.k, self.v), 3, H, D)
        else:
            q = self.q(x).view(B, Lq, H, D)
        if self.is_cross:
            cached = cache.get_cross(self.layer_idx) if cache is not None else None
            if cached is None:
                kv = ctx.enc_hidden()
                if FUSED_PROJ and fusable_linears(self.k, self.v):
                    k, v = _stacked(kv, _stack(self.k, self.v), 2, H, D)
                else:
                    k, v = self.k(kv).view(*kv.shape[:2], H, D), self.v(kv).view(*kv.shape[:2], H, D)
                if cache is not None:
                    cache.set_cross(self.layer_idx, k, v)
            else:
                k, v = cached
            kl, bias = ctx.enc, ({} if ctx.kernels.flat else None)
        else:
            if fused is None and not stacked:
                k, v = self.k(x).view(B, Lq, H, D), self.v(x).view(B, Lq, H, D)
            if self.rope is not None:
                cos, sin = rope_angles(ctx.q.positions(x.device), *self.rope)
                q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            if cache is not None:
                k, v = cache.update_self(self.layer_idx, k, v)
            kl, bias = ctx.k, ctx.bias[self.layer_idx]
        extra = {} if self.record is None else {"record": self.record}  # output_attentions (eager backend)
        out = ctx.kernels.attend(
            q, k, v, bias, ctx.q, kl, causal=self.causal, dropout=self.p, training=self.training, **extra
        )
        return self.o(out.reshape(B, Lq, H * D))


class Block(nn.Module):
    """Pre-norm residual block: self-attention, cross-attention (decoder), feed-forward.

    ``forward(h, pending)``: ``h`` is the residual stream and ``pending`` the previous sub-layer's output not yet
    added to it (None before the first sub-layer); each norm adds it in the same (fused) call.
    """

    def __init__(self, cfg: Any, *, layer_idx: int, is_decoder: bool):
        super().__init__()
        self.is_decoder, self.p = is_decoder, float(cfg.dropout_rate)
        eps, f = cfg.layer_norm_epsilon, cfg.initializer_factor
        self.attn_norm = RMSNorm(cfg.d_model, eps, f)
        self.attn = Attention(cfg, layer_idx=layer_idx, is_decoder=is_decoder)
        if is_decoder:
            self.cross_norm = RMSNorm(cfg.d_model, eps, f)
            self.cross_attn = Attention(cfg, layer_idx=layer_idx, is_decoder=True, is_cross=True)
        self.ffn_norm = RMSNorm(cfg.d_model, eps, f)
        self.mlp = MLP(cfg)

    def _sub(self, norm: RMSNorm, fn: Callable[[Tensor], Tensor], h: Tensor, pending: Tensor | None, kernels: Kernels):
        if pending is None:
            x = norm(h, kernels)
        else:
            x, h = norm(pending, kernels, residual=h)
        out = fn(x)
        return h, (F.dropout(out, self.p, self.training) if self.p else out)

    def forward(self, h: Tensor, pending: Tensor | None, ctx: StackContext) -> tuple[Tensor, Tensor]:
        k = ctx.kernels
        h, pending = self._sub(self.attn_norm, lambda x: self.attn(x, ctx), h, pending, k)
        if self.is_decoder:
            h, pending = self._sub(self.cross_norm, lambda x: self.cross_attn(x, ctx), h, pending, k)
        return self._sub(self.ffn_norm, lambda x: self.mlp(x, k), h, pending, k)


_CHECKPOINT = functools.partial(checkpoint, use_reentrant=False)


def _checkpointed(run: Callable, layer: nn.Module, h: Tensor, pending: Tensor | None, ctx: StackContext):
    """One layer under a checkpoint function (``run``: torch's ``checkpoint`` with its kwargs bound, e.g. by
    transformers' ``gradient_checkpointing_enable``). The tensors the layer reads from ``ctx`` (the position bias,
    the encoder output) go in as explicit inputs: reentrant checkpointing only gives gradients to its arguments."""
    leaves, spec = tree_flatten(ctx.bias)
    enc = ctx.encoded.hidden_inner if ctx.encoded is not None else None

    def fn(h: Tensor, pending: Tensor | None, enc: Tensor | None, *leaves: Any):
        encoded = None if enc is None else dataclasses.replace(ctx.encoded, hidden_inner=enc)
        return layer(h, pending, dataclasses.replace(ctx, bias=tree_unflatten(list(leaves), spec), encoded=encoded))

    return run(fn, h, pending, enc, *leaves)


class Stack(nn.Module):
    """The encoder or the decoder: its position bias, blocks, final norm and dropout."""

    def __init__(self, cfg: Any, *, is_decoder: bool):
        super().__init__()
        self.is_decoder, self.p = is_decoder, float(cfg.dropout_rate)
        n = cfg.num_decoder_layers if is_decoder else cfg.num_layers
        self.pos_bias = PositionBias(cfg, is_decoder=is_decoder, num_layers=n)
        self.layers = nn.ModuleList([Block(cfg, layer_idx=i, is_decoder=is_decoder) for i in range(n)])
        self.final_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon, cfg.initializer_factor)
        self.gradient_checkpointing = False

    def forward(self, embeds: Tensor, ctx: StackContext) -> Tensor:
        """Hidden states after the final norm, in the inner layout ``ctx.q``; ``ctx.bias`` is filled here, once,
        outside any checkpointed layer (recomputation must see the same bias)."""
        ctx.bias = self.pos_bias(ctx.q, ctx.k, ctx.kernels, embeds.device)
        h = F.dropout(embeds, self.p, self.training) if self.p else embeds
        pending = None
        for layer in self.layers:
            if ctx.hidden_states is not None:  # Hugging Face's hidden_states: each layer's input (the sum pending)
                ctx.hidden_states.append(h if pending is None else _clamp_fp16(h + pending))
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                # transformers' gradient_checkpointing_enable sets _gradient_checkpointing_func (its kwargs bound)
                run = getattr(self, "_gradient_checkpointing_func", None) or _CHECKPOINT
                h, pending = _checkpointed(run, layer, h, pending, ctx)
            else:
                h, pending = layer(h, pending, ctx)
        out = self.final_norm(h, ctx.kernels) if pending is None else self.final_norm(pending, ctx.kernels, h)[0]
        out = F.dropout(out, self.p, self.training) if self.p else out
        if ctx.hidden_states is not None:
            ctx.hidden_states.append(out)
        return out


# --------------------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------------------


@dataclass
class View:
    """One side's tokens as a backend eats them: the ``inner`` layout, reached from the ``outer`` one (the token
    tensor's) by gathering the real tokens (flash: padded rows -> padding-free) or scattering into rows (reference
    paths: varlen documents -> padded rows); ``index`` is None when the two are the same."""

    outer: Layout
    inner: Layout
    index: Tensor | None
    flat: bool

    @classmethod
    def of(cls, layout: Layout, kernels: Kernels, device: torch.device) -> View:
        inner, index = layout.unpadded(device) if kernels.flat else layout.rows()
        return cls(layout, inner, index, kernels.flat)

    def enter(self, x: Tensor, fill: float = 0) -> Tensor:
        """(outer batch, outer length, ...) -> the inner layout's shape; ``fill`` where rows are padding."""
        if self.index is None:
            return x
        if not self.flat:
            return scatter_tokens(x, self.index, self.inner.batch, self.inner.length, fill)
        if self.inner.pad_docs:  # the static view keeps the padding: it holds ``fill`` (labels: -100, never counted)
            real = self.outer.key_mask()
            x = x.masked_fill(~real.view(*real.shape, *[1] * (x.dim() - 2)), fill)
        return gather_tokens(x, self.index)

    def exit(self, x: Tensor) -> Tensor:
        """The inverse of :meth:`enter` (zeros where the outer layout has tokens the inner one dropped, or keeps
        as padding documents in its static view)."""
        if self.index is None:
            return x
        if not self.flat:
            return gather_tokens(x, self.index)
        out = scatter_tokens(x, self.index, self.outer.batch, self.outer.length)
        if self.inner.pad_docs:
            real = self.outer.key_mask()
            out = out.masked_fill(~real.view(*real.shape, *[1] * (x.dim() - 2)), 0)
        return out


@dataclass
class Encoded:
    """The encoder's output: hidden states in the inner layout (what the decoder's cross-attention reads)."""

    hidden_inner: Tensor
    view: View
    hidden_states: tuple[Tensor, ...] | None = None  # embeddings and every layer's output, outer layout

    @functools.cached_property
    def hidden(self) -> Tensor:
        """(B, L, d_model) in the token tensor's own layout (zeros at padding on the flash path)."""
        return self.view.exit(self.hidden_inner)


@dataclass
class T5Output:
    """loss (incl. the z-term), z_loss (the detached z-term, None without z-loss), logits (None when not asked for
    or computed by the fused LM head), the decoder's hidden states, the encoder output."""

    loss: Tensor | None
    z_loss: Tensor | None
    logits: Tensor | None
    hidden_inner: Tensor
    view: View
    encoded: Encoded
    decoder_hidden_states: tuple[Tensor, ...] | None = None  # embeddings and every layer's output, outer layout

    @functools.cached_property
    def hidden(self) -> Tensor:
        """Decoder hidden states (before the LM head) in the decoder tokens' own layout."""
        return self.view.exit(self.hidden_inner)


class T5(nn.Module):
    """Shared embedding, encoder, optional decoder and LM head. See the module docstring.

    ``backend``: "eager", "sdpa" or "flash" (default :func:`default_backend`); change it with :meth:`set_backend`.
    """

    def __init__(self, cfg: Any, *, decoder: bool = True, lm_head: bool = True, backend: str | None = None):
        super().__init__()
        self.cfg = cfg
        self.shared = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.encoder = Stack(cfg, is_decoder=False)
        self.decoder = Stack(cfg, is_decoder=True) if decoder else None
        # A tied model (T5 v1.0) reads its output projection from the shared embedding.
        untied = decoder and lm_head and not cfg.tie_word_embeddings
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False) if untied else None
        self.set_backend(backend or default_backend(cfg.d_kv))
        self.init_weights()

    # -- set-up -----------------------------------------------------------------------------------------------
    def set_backend(self, backend: str) -> None:
        check_backend(backend, self.cfg.d_kv)
        self.kernels = kernels_for(backend)

    @property
    def backend(self) -> str:
        return self.kernels.backend

    def reset_parameters(self, init: Any = nn.init) -> None:
        f = self.cfg.initializer_factor
        init.normal_(self.shared.weight, mean=0.0, std=f * 1.0)
        if self.lm_head is not None:
            # Mesh TensorFlow's fan-in init of an untied logits layer: unit-variance logits, so training starts at
            # loss ~ln(vocab). (transformers uses std 1.0 here, i.e. logits of std sqrt(d_model).)
            std = f * (1.0 if self.cfg.scale_decoder_outputs else self.cfg.d_model**-0.5)
            init.normal_(self.lm_head.weight, mean=0.0, std=std)

    def init_weights(self, init: Any = nn.init) -> None:
        """T5's (Mesh TensorFlow's) initialisation, each module setting what it owns. ``init`` is a module with
        ``normal_`` / ``constant_`` / ``zeros_`` (``torch.nn.init``, or ``transformers.initialization``, which leaves
        loaded tensors alone)."""
        for m in self.modules():
            if isinstance(m, OWN_INIT):
                m.reset_parameters(init)

    # -- the stacks -------------------------------------------------------------------------------------------
    def embed(self, input_ids: Tensor, name: str = "input_ids") -> Tensor:
        if not isinstance(input_ids, Tensor) or input_ids.dtype not in (torch.int32, torch.int64):
            got = input_ids.dtype if isinstance(input_ids, Tensor) else type(input_ids).__name__
            raise ValueError(f"{name} must hold integer token ids, got {got}.")
        if input_ids.dim() != 2:
            raise ValueError(f"{name} must have shape (batch, length), got {tuple(input_ids.shape)}.")
        if input_ids.numel() and _readable(input_ids):  # free on CPU tensors; GPU ones only under FLASHT5_DEBUG
            lo, hi = (int(v) for v in torch.aminmax(input_ids))
            if lo < 0 or hi >= self.shared.num_embeddings:
                raise ValueError(
                    f"{name} holds token ids outside the vocabulary [0, {self.shared.num_embeddings}): "
                    f"min {lo}, max {hi}."
                )
        return self.shared(input_ids)

    def _embeds(self, ids: Tensor | None, embeds: Tensor | None, name: str) -> Tensor:
        if (ids is None) == (embeds is None):
            raise ValueError(f"pass exactly one of {name} and its *_embeds.")
        return self.embed(ids, name) if embeds is None else embeds

    def encode(
        self, input_ids: Tensor | None = None, layout: Layout | None = None, *, inputs_embeds: Tensor | None = None,
        output_hidden_states: bool = False,
    ) -> Encoded:  # fmt: skip
        """Run the encoder on token ids (B, L) (or embeddings (B, L, d_model)) laid out as ``layout`` (dense if
        None); ``output_hidden_states`` also keeps every layer's input and the output (Hugging Face's tuple)."""
        embeds = self._embeds(input_ids, inputs_embeds, "input_ids")
        layout = Layout.dense(*embeds.shape[:2]) if layout is None else layout
        layout.check_tokens(embeds.shape, "input_ids")
        view = View.of(layout, self.kernels, embeds.device)
        ctx = StackContext(self.kernels, view.inner, view.inner, [], hidden_states=[] if output_hidden_states else None)
        hidden = self.encoder(view.enter(embeds), ctx)
        states = None if ctx.hidden_states is None else tuple(view.exit(t) for t in ctx.hidden_states)
        return Encoded(hidden, view, states)

    def decode(
        self,
        input_ids: Tensor | None,
        encoded: Encoded,
        layout: Layout | None = None,
        *,
        inputs_embeds: Tensor | None = None,
        cache: KVCache | None = None,
        key_mask: Tensor | None = None,
        hidden_states: list[Tensor] | None = None,
    ) -> tuple[Tensor, View]:
        """Decoder hidden states (before the LM head) in the inner layout, and the view that maps them back.

        With a ``cache`` the new rows follow the cached ones (dense rows; ``key_mask`` optionally masks the cached
        and new keys, (B, past + Lq)); cross-attention then reads the encoder output in its row layout. A
        ``hidden_states`` list receives every layer's input and the output (inner layout).
        """
        if self.decoder is None:
            raise ValueError("this model has no decoder (encoder-only).")
        embeds = self._embeds(input_ids, inputs_embeds, "decoder_input_ids")
        B, Lq = embeds.shape[:2]
        if cache is None:
            layout = Layout.dense(B, Lq) if layout is None else layout
            layout.check_tokens(embeds.shape, "decoder_input_ids")
            _check_pairing(encoded.view.outer, layout)
            view = View.of(layout, self.kernels, embeds.device)
            keys = view.inner
        else:
            if layout is not None and layout.kind != "dense":
                raise ValueError("a key/value cache needs dense decoder rows (no packed or padded decoder layout).")
            _check_pairing(encoded.view.outer, Layout.dense(B, Lq))
            past = cache.past_length()
            q = Layout.dense(B, Lq, offset=past)
            view = View(q, q, None, self.kernels.flat)
            keys = cache.key_layout()
            if keys is None:
                keys = Layout.dense(B, past + Lq) if key_mask is None else Layout.padded(key_mask, name="decoder keys")
        ctx = StackContext(self.kernels, view.inner, keys, [], encoded, cache, hidden_states)
        return self.decoder(view.enter(embeds), ctx), view

    def encoded_from(self, hidden: Tensor, layout: Layout | None = None) -> Encoded:
        """An :class:`Encoded` for encoder hidden states (B, L, d_model) given in their own (outer) layout."""
        layout = Layout.dense(*hidden.shape[:2]) if layout is None else layout
        layout.check_tokens(hidden.shape, "encoder hidden states")
        view = View.of(layout, self.kernels, hidden.device)
        return Encoded(view.enter(hidden), view)

    # -- the head and the loss --------------------------------------------------------------------------------
    def output_weight(self) -> Tensor:
        return self.shared.weight if self.lm_head is None else self.lm_head.weight

    def output_scale(self) -> float | None:
        return self.cfg.d_model**-0.5 if self.cfg.scale_decoder_outputs else None

    def logits(self, hidden: Tensor) -> Tensor:
        scale = self.output_scale()
        return F.linear(hidden if scale is None else hidden * scale, self.output_weight())

    def forward(
        self,
        input_ids: Tensor | None = None,
        decoder_input_ids: Tensor | None = None,
        labels: Tensor | None = None,
        *,
        enc: Layout | None = None,
        dec: Layout | None = None,
        inputs_embeds: Tensor | None = None,
        decoder_inputs_embeds: Tensor | None = None,
        encoded: Encoded | None = None,
        cache: KVCache | None = None,
        key_mask: Tensor | None = None,
        return_logits: bool | None = None,
        output_hidden_states: bool = False,
    ) -> T5Output:
        """Encode (unless ``encoded`` is given), decode, and compute the LM loss when ``labels`` are given.

        ``labels`` (B, Ld) use -100 for ignored tokens; without ``decoder_input_ids`` they are shifted right per
        document (:func:`flasht5.layout.shift_right`, with the config's decoder start and pad ids). The loss is the
        mean cross-entropy over the kept tokens plus ``cfg.z_loss * mean(logsumexp**2)``. ``return_logits`` (default:
        not in training) also returns the (B, Ld, vocab) logits; without it the flash backend fuses the LM head
        into the loss and never materialises them. ``cache`` / ``key_mask``: cached decoding (:meth:`decode`).
        ``output_hidden_states``: both stacks' per-layer states (Hugging Face's tuples) in the output.
        """
        if encoded is None:
            encoded = self.encode(
                input_ids, enc, inputs_embeds=inputs_embeds, output_hidden_states=output_hidden_states
            )
        if decoder_input_ids is None and decoder_inputs_embeds is None:
            if labels is None:
                raise ValueError("pass decoder_input_ids, decoder_inputs_embeds or labels.")
            dec = Layout.dense(*labels.shape) if dec is None else dec
            decoder_input_ids = shift_right(labels, dec, self.cfg.decoder_start_token_id, self.cfg.pad_token_id)
        states: list[Tensor] | None = [] if output_hidden_states else None
        hidden, view = self.decode(
            decoder_input_ids, encoded, dec, inputs_embeds=decoder_inputs_embeds, cache=cache, key_mask=key_mask,
            hidden_states=states,
        )  # fmt: skip
        return_logits = (not self.training) if return_logits is None else return_logits
        loss = z = logits = None
        # The loss is taken in the inner layout: over the decoder's real tokens (padding never counts on the flash
        # path, even where a label is not -100), and over the documents' rows on the reference paths.
        inner_labels = None if labels is None else view.enter(labels, fill=-100)
        if labels is not None and not return_logits and self.kernels.lm_loss is not None:
            loss, z = self.kernels.lm_loss(hidden, self.output_weight(), self.output_scale(), inner_labels,
                                           float(self.cfg.z_loss))  # fmt: skip
        elif return_logits or labels is not None:
            inner_logits = self.logits(hidden)
            if labels is not None:
                loss, z = self.kernels.cross_entropy(inner_logits, inner_labels, float(self.cfg.z_loss))
            logits = view.exit(inner_logits) if return_logits else None
        states = None if states is None else tuple(view.exit(t) for t in states)
        return T5Output(loss, z, logits, hidden, view, encoded, states)


def _check_pairing(enc: Layout, dec: Layout) -> None:
    """Encoder and decoder sides must pair up document by document (shape-level checks only)."""
    if (enc.kind == "packed") != (dec.kind == "packed") or (enc.kind == "varlen") != (dec.kind == "varlen"):
        raise ValueError(
            "packed batches must be packed on both sides: pass segment_ids / cu_seqlens for the encoder and "
            "decoder_segment_ids / decoder_cu_seqlens for the decoder."
        )
    if enc.kind == "varlen":
        if enc.num_docs != dec.num_docs:
            raise ValueError(f"the encoder batch holds {enc.num_docs} documents, the decoder batch {dec.num_docs}.")
    elif enc.batch != dec.batch:
        raise ValueError(f"the encoder batch has {enc.batch} rows, the decoder batch {dec.batch}.")


OWN_INIT = (T5, PositionBias, FIRE, RMSNorm, MLP, Attention)

"""The T5 / UL2 encoder-decoder in plain PyTorch (no transformers import here; DESIGN.md §2-3).

It computes exactly what Hugging Face's T5 computes, for every public family (T5 v1.0, v1.1 / FLAN, mT5, umT5,
ByT5, UL2), chosen by config fields alone, plus ALiBi, RoPE and FIRE position encodings. The config is duck-typed
(any object with ``FlashT5Config``'s fields).

Numerics that matter (DESIGN.md §3): attention has no 1/sqrt(d) scale; RMSNorm has no mean and no bias and takes
its variance in fp32; the relative-position bias is computed once per stack (layer 0 owns the table, or every
layer for umT5); a query at row i of a block whose keys are longer sits at position i + Lk - Lq; positions restart
in every packed document; ``wo`` keeps its own dtype (fp32 where Hugging Face keeps it).

Attention backends are chosen at one place, :func:`attend`, from the model-level ``attn_implementation``:
``"eager"`` (the reference: fp32 softmax over a materialised bias), ``"sdpa"`` (``scaled_dot_product_attention``
with the same materialised bias) and ``"flash"`` (:func:`flasht5.ops.attention.flash_attention`, bias in-kernel).

Batch layouts (:class:`Seqs`): dense rows, padded rows (an HF ``attention_mask``), rows packed with several
documents (``segment_ids`` + ``position_ids``), or flattened padding-free tokens with ``cu_seqlens``.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from flasht5.ops.relative_position import relative_position_bucket

# --------------------------------------------------------------------------------------------------------------
# Batch layout
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Seqs:
    """How the tokens of one side of an attention are laid out.

    positions:   (B or 1, L) int64 position of each token inside its document.
    mask:        (B, L) bool, True for real tokens; None when every token is real. Only keys are masked (HF
                 semantics: a padded query still attends, its output is ignored downstream).
    segment_ids: (B, L) int, document id of each token inside its row, 0 for padding; set for packed rows and
                 for flattened varlen batches. Tokens attend only within their own document.
    cu_seqlens:  (N + 1,) int32 document boundaries of a flattened batch (B == 1); None otherwise.
    """

    positions: torch.Tensor
    mask: torch.Tensor | None = None
    segment_ids: torch.Tensor | None = None
    cu_seqlens: torch.Tensor | None = None
    max_seqlen: int | None = None
    batch: int = 1
    _varlen: tuple | None = field(default=None, repr=False)
    _padded: tuple | None = field(default=None, repr=False)

    @property
    def packed(self) -> bool:
        return self.segment_ids is not None

    @property
    def dense(self) -> bool:
        """Every row is one document with no padding: the kernel can take the (B, L, H, D) layout as is."""
        return self.mask is None and self.segment_ids is None

    @classmethod
    def build(
        cls,
        batch: int,
        length: int,
        device: torch.device,
        *,
        attention_mask: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        offset: int = 0,
        name: str = "input_ids",
    ) -> Seqs:
        """Validate one stack's layout arguments and describe it. ``offset`` shifts default positions (cache)."""
        if cu_seqlens is not None:
            if batch != 1:
                raise ValueError(f"cu_seqlens needs flattened tokens of shape (1, T) in {name}, got batch {batch}.")
            if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
                raise ValueError(
                    f"cu_seqlens must be 1-D with num_seqs + 1 >= 2 entries, got {tuple(cu_seqlens.shape)}."
                )
            if attention_mask is not None or segment_ids is not None:
                raise ValueError("pass either cu_seqlens or attention_mask/segment_ids, not both.")
            cu = cu_seqlens.to(device=device, dtype=torch.int32)
            lengths = cu.diff()
            bounds = torch.stack([cu[0], cu[-1], lengths.min()]).tolist()
            if bounds[0] != 0 or bounds[1] != length or bounds[2] < 0:
                raise ValueError(
                    f"cu_seqlens must start at 0, be non-decreasing and end at the number of tokens ({length}); "
                    f"got start {bounds[0]}, end {bounds[1]}, smallest length {bounds[2]}."
                )
            seg = torch.repeat_interleave(
                torch.arange(1, lengths.numel() + 1, device=device), lengths.long(), output_size=length
            )[None]
            starts = torch.repeat_interleave(cu[:-1].long(), lengths.long(), output_size=length)
            pos = (torch.arange(length, device=device) - starts)[None]
            max_len = int(max_seqlen) if max_seqlen is not None else int(lengths.max())
            return cls(positions=pos, segment_ids=seg, cu_seqlens=cu, max_seqlen=max_len)

        for arg, value in (
            ("attention_mask", attention_mask),
            ("segment_ids", segment_ids),
            ("position_ids", position_ids),
        ):
            if value is not None and tuple(value.shape) != (batch, length):
                raise ValueError(
                    f"{arg} has shape {tuple(value.shape)} but {name} has shape {(batch, length)}; they must match."
                )
        mask = None
        if segment_ids is not None:
            segment_ids = segment_ids.to(device)
            mask = segment_ids != 0
        elif attention_mask is not None:
            mask = attention_mask.to(device=device) != 0
            if bool(mask.all()):  # one host sync; an all-ones mask takes the dense (no unpadding) path
                mask = None
        if position_ids is None:
            if segment_ids is not None:
                raise ValueError("segment_ids (packed rows) need position_ids that restart in every document.")
            positions = (torch.arange(length, device=device) + offset)[None]
        else:
            positions = position_ids.to(device=device, dtype=torch.long)
        return cls(positions=positions, mask=mask, segment_ids=segment_ids, max_seqlen=length, batch=batch)

    def padded(self) -> tuple[Seqs, torch.Tensor | None]:
        """For the reference paths: a flattened batch as (num_seqs, max_seqlen) rows, and the flat index of each
        token in those rows (None when the layout is already rows). Attention then costs sum(L_i^2), not T^2."""
        if self.cu_seqlens is None:
            return self, None
        if self._padded is None:
            cu = self.cu_seqlens.long()
            n, width = cu.numel() - 1, max(int(self.max_seqlen), 1)
            doc = self.segment_ids[0] - 1  # (T,) document of each token
            index = doc * width + self.positions[0]
            mask = torch.zeros(n * width, dtype=torch.bool, device=cu.device).index_fill_(0, index, True)
            rows = Seqs(positions=torch.arange(width, device=cu.device)[None], mask=mask.view(n, width))
            self._padded = (rows, index)
        return self._padded

    def varlen(self) -> tuple[torch.Tensor | None, torch.Tensor, int]:
        """(indices of real tokens in the flattened (B*L) rows or None, cu_seqlens int32, max_seqlen), cached."""
        if self._varlen is None:
            if self.cu_seqlens is not None:
                self._varlen = (None, self.cu_seqlens, int(self.max_seqlen))
            elif self.mask is None:  # full rows (the other side of a cross-attention is padded)
                length, device = self.positions.shape[1], self.positions.device
                cu = torch.arange(self.batch + 1, device=device, dtype=torch.int32) * length
                self._varlen = (None, cu, length)
            elif self.segment_ids is None:  # padded rows: one document per row
                lengths = self.mask.sum(1, dtype=torch.int32)
                idx = self.mask.flatten().nonzero().squeeze(1)
                cu = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
                self._varlen = (idx, cu, int(lengths.max()))
            else:  # packed rows: documents are contiguous runs of one segment id
                B, L = self.segment_ids.shape
                seg = self.segment_ids.long() + torch.arange(B, device=self.segment_ids.device)[:, None] * (L + 1)
                flat = seg.flatten()[self.mask.flatten()]
                _, counts = torch.unique_consecutive(flat, return_counts=True)
                idx = self.mask.flatten().nonzero().squeeze(1)
                cu = F.pad(counts.cumsum(0).to(torch.int32), (1, 0))
                self._varlen = (idx, cu, int(counts.max()) if counts.numel() else 0)
        return self._varlen


# --------------------------------------------------------------------------------------------------------------
# Position encodings
# --------------------------------------------------------------------------------------------------------------


def alibi_slopes(num_heads: int) -> torch.Tensor:
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


def rope_angles(positions: torch.Tensor, rot_dims: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (B, L, 1, rot_dims // 2) for rotary embeddings (Su et al. 2021) at integer positions."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, rot_dims, 2, device=positions.device, dtype=torch.float32) / rot_dims))
    angles = positions.float()[..., None] * inv_freq  # (B, L, rot/2)
    return angles.cos()[:, :, None], angles.sin()[:, :, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
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

    def __init__(self, num_heads: int, hidden: int = 32, init_length: int = 512):
        super().__init__()
        self.mlp_in = nn.Linear(1, hidden)
        self.mlp_out = nn.Linear(hidden, num_heads)
        self.log_c = nn.Parameter(torch.zeros(()))  # c = exp(log_c) > 0, init 1
        self.threshold = nn.Parameter(torch.tensor(float(init_length)))

    def forward(self, q_pos: torch.Tensor, k_pos: torch.Tensor, bidirectional: bool) -> torch.Tensor:
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


# --------------------------------------------------------------------------------------------------------------
# Attention: the one dispatch point
# --------------------------------------------------------------------------------------------------------------


class KVCache(Protocol):
    """What the decoder needs from a key/value cache; ``flasht5.generation`` implements it (also over HF caches).

    Tensors are (B, L, H, D).
    """

    def past_length(self) -> int: ...

    def update_self(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def get_cross(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor] | None: ...

    def set_cross(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> None: ...


@dataclass
class PositionSpec:
    """The position encoding of one attention call (cross-attention has kind None)."""

    kind: str | None  # "t5", "alibi", "fire" or None (RoPE is applied to q and k before attention)
    bidirectional: bool = True
    table: torch.Tensor | None = None  # t5: (num_buckets, H)
    max_distance: int = 128
    slopes: torch.Tensor | None = None  # alibi: (H,)
    fire: FIRE | None = None
    key: Any = None  # identifies the owner, so the materialised bias is built once per stack forward


@dataclass
class StackContext:
    """Per-forward state shared by all layers of a stack."""

    impl: str
    q: Seqs
    k: Seqs
    enc: Seqs | None = None
    cache: KVCache | None = None
    dropout: float = 0.0
    bias_cache: dict = field(default_factory=dict)

    @property
    def kernels(self) -> bool:
        """The Triton kernels (RMSNorm, gated activation) ride on the same switch as the attention backend."""
        return self.impl == "flash"


def _materialised_bias(pos: PositionSpec, q: Seqs, k: Seqs, cache: dict) -> torch.Tensor | None:
    """(B or 1, H, Lq, Lk) fp32 position bias for the reference paths, built once per owner and stack forward."""
    if pos.kind is None:
        return None
    if pos.key in cache:
        return cache[pos.key]
    rel = k.positions[:, None, :] - q.positions[:, :, None]  # (B, Lq, Lk) = key_pos - query_pos
    if pos.kind == "t5":
        buckets = relative_position_bucket(rel, pos.bidirectional, pos.table.shape[0], pos.max_distance)
        bias = F.embedding(buckets, pos.table).permute(0, 3, 1, 2).float()
    elif pos.kind == "alibi":
        bias = -pos.slopes.float().to(rel.device)[None, :, None, None] * rel.abs()[:, None].float()
    else:
        bias = pos.fire(q.positions, k.positions, pos.bidirectional)
    cache[pos.key] = bias
    return bias


def _allowed(q: Seqs, k: Seqs, causal: bool) -> torch.Tensor | None:
    """(B or 1, 1, Lq, Lk) bool: which keys each query may see, or None when all."""
    allowed = None
    if q.segment_ids is not None and k.segment_ids is not None:
        allowed = (q.segment_ids[:, :, None] == k.segment_ids[:, None, :]) & (k.segment_ids[:, None, :] != 0)
    elif k.mask is not None:
        allowed = k.mask[:, None, :]
    if causal:
        c = k.positions[:, None, :] <= q.positions[:, :, None]
        allowed = c if allowed is None else allowed & c
    return None if allowed is None else allowed[:, None]


def _to_rows(x: torch.Tensor, rows: Seqs, index: torch.Tensor) -> torch.Tensor:
    """(1, T, H, D) flattened tokens -> (N, L, H, D) zero-padded rows."""
    flat = x.new_zeros(rows.mask.numel(), *x.shape[2:]).index_copy_(0, index, x[0])
    return flat.view(*rows.mask.shape, *x.shape[2:])


def _attend_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: PositionSpec, ctx_q: Seqs, ctx_k: Seqs, *,
    causal: bool, impl: str, dropout: float, bias_cache: dict, training: bool,
) -> torch.Tensor:  # fmt: skip
    (ctx_q, q_index), (ctx_k, k_index) = ctx_q.padded(), ctx_k.padded()
    if q_index is not None:  # flattened documents -> one padded row each, and back at the end
        q, k, v = _to_rows(q, ctx_q, q_index), _to_rows(k, ctx_k, k_index), _to_rows(v, ctx_k, k_index)
    bias = _materialised_bias(pos, ctx_q, ctx_k, bias_cache)
    allowed = _allowed(ctx_q, ctx_k, causal)
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, L, D)
    if impl == "eager":
        scores = torch.matmul(qh, kh.transpose(-1, -2))
        scores = scores.float() if scores.dtype in (torch.float16, torch.bfloat16) else scores  # softmax in >= fp32
        if bias is not None:
            scores = scores + bias
        if allowed is not None:
            scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
        probs = torch.softmax(scores, dim=-1).to(vh.dtype)
        probs = F.dropout(probs, p=dropout, training=training)
        out = torch.matmul(probs, vh)
    else:
        Lq, Lk = q.shape[1], k.shape[1]
        if bias is None and causal and ctx_q.dense and ctx_k.dense and Lq == Lk:
            mask, is_causal = None, True  # SDPA's own causal path (top-left == bottom-right when Lq == Lk)
        else:
            mask, is_causal = (None if bias is None else bias.to(q.dtype)), False
            if allowed is not None:
                base = torch.zeros((), dtype=q.dtype, device=q.device) if mask is None else mask
                mask = torch.where(allowed, base, torch.finfo(q.dtype).min)
        out = F.scaled_dot_product_attention(
            qh, kh, vh, attn_mask=mask, dropout_p=dropout if training else 0.0, is_causal=is_causal, scale=1.0
        )
    out = out.transpose(1, 2)  # (B, Lq, H, D)
    if q_index is not None:
        out = out.reshape(-1, *out.shape[2:]).index_select(0, q_index)[None]
    return out


@functools.cache
def _warn_once(message: str) -> None:
    warnings.warn(message, stacklevel=3)


def _attend_flash(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: PositionSpec, ctx_q: Seqs, ctx_k: Seqs, *, causal: bool,
    bias_cache: dict,
) -> torch.Tensor:  # fmt: skip
    from flasht5.ops.attention import flash_attention

    kwargs: dict[str, Any] = dict(scale=1.0, causal=causal)
    if pos.kind == "t5":
        kwargs.update(rel_table=pos.table, rel_bidirectional=pos.bidirectional, rel_max_distance=pos.max_distance)
    elif pos.kind == "alibi":
        kwargs.update(alibi_slopes=pos.slopes)
    if ctx_q.dense and ctx_k.dense:
        if pos.kind == "fire":  # the MLP's (B, H, Lq, Lk) bias, built once per stack forward like the references'
            kwargs.update(bias=_materialised_bias(pos, ctx_q, ctx_k, bias_cache))
        return flash_attention(q, k, v, **kwargs)
    if pos.kind == "fire":
        raise ValueError(
            "position_encoding='fire' with attn_implementation='flash' needs dense batches (no padding or packing): "
            "use attn_implementation='sdpa' for padded or packed batches."
        )
    B, Lq, H, D = q.shape
    q_idx, cu_q, max_q = ctx_q.varlen()
    k_idx, cu_k, max_k = ctx_k.varlen()
    flat = lambda x, idx: x.reshape(-1, H, D) if idx is None else x.reshape(-1, H, D).index_select(0, idx)
    out = flash_attention(
        flat(q, q_idx), flat(k, k_idx), flat(v, k_idx),
        cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max_q, max_seqlen_k=max_k, **kwargs,
    )  # fmt: skip
    if q_idx is None:
        return out.view(B, Lq, H, D)
    return out.new_zeros(B * Lq, H, D).index_copy(0, q_idx, out).view(B, Lq, H, D)


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: PositionSpec, ctx_q: Seqs, ctx_k: Seqs, *,
    causal: bool, impl: str, dropout: float = 0.0, bias_cache: dict | None = None, training: bool = False,
) -> torch.Tensor:  # fmt: skip
    """Attention of q (B, Lq, H, D) over k, v (B, Lk, H, D) with T5 semantics (scale 1.0); returns (B, Lq, H, D)."""
    bias_cache = {} if bias_cache is None else bias_cache
    if impl == "flash":
        if training and dropout > 0:
            _warn_once(
                "attn_implementation='flash' applies no dropout to attention probabilities (hidden-state dropout is "
                f"applied); dropout_rate={dropout} affects attention only with 'eager' or 'sdpa'."
            )
        return _attend_flash(q, k, v, pos, ctx_q, ctx_k, causal=causal, bias_cache=bias_cache)
    if impl not in ("eager", "sdpa"):
        raise ValueError(f"attn_implementation={impl!r} is not one of 'eager', 'sdpa', 'flash'.")
    return _attend_reference(
        q, k, v, pos, ctx_q, ctx_k, causal=causal, impl=impl, dropout=dropout, bias_cache=bias_cache,
        training=training,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """T5's LayerNorm: no mean, no bias, variance in fp32, cast to the weight's dtype when that is half precision."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, kernels: bool = False) -> torch.Tensor:
        if kernels and x.is_cuda:
            from flasht5.ops.rms_norm import rms_norm

            return rms_norm(x, self.weight, self.eps)
        variance = x.float().pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return self.weight * x


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    # Hugging Face's NewGELUActivation ("gelu_new"), written out so results match it bit for bit.
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


ACTIVATIONS = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_new": _gelu_tanh,
    "gelu_tanh": _gelu_tanh,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "swish": F.silu,
}


# Activations the fused Triton gated kernel computes exactly as ACTIVATIONS does.
FUSED_GATED_ACTS = ("gelu_new", "gelu_tanh", "gelu_pytorch_tanh", "silu", "swish")


class MLP(nn.Module):
    """T5's feed-forward: ``wo(act(wi x))`` or, gated (v1.1, UL2), ``wo(act(wi_0 x) * wi_1 x)``."""

    def __init__(self, cfg: Any):
        super().__init__()
        self.gated = cfg.is_gated_act
        if self.gated:
            self.wi_0 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
            self.wi_1 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        else:
            self.wi = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wo = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)
        self.act_name = cfg.dense_act_fn
        self.act = ACTIVATIONS[cfg.dense_act_fn]
        self.dropout = nn.Dropout(cfg.dropout_rate)

    def forward(self, x: torch.Tensor, kernels: bool = False) -> torch.Tensor:
        if self.gated and kernels and x.is_cuda and self.act_name in FUSED_GATED_ACTS:
            from flasht5.ops.activations import gated_act

            h = gated_act(self.wi_0(x), self.wi_1(x), self.act_name)
        elif self.gated:
            h = self.act(self.wi_0(x)) * self.wi_1(x)
        else:
            h = self.act(self.wi(x))
        h = self.dropout(h)
        # wo may be kept in fp32 (FLAN-T5-XXL in bf16): compute it in its own dtype, as Hugging Face does.
        if h.dtype != self.wo.weight.dtype and self.wo.weight.dtype != torch.int8:
            h = h.to(self.wo.weight.dtype)
        return self.wo(h)


class Attention(nn.Module):
    """Multi-head attention without 1/sqrt(d) scaling; optionally owns the stack's position encoding."""

    def __init__(self, cfg: Any, *, is_decoder: bool, is_cross: bool = False, owns_position: bool = False):
        super().__init__()
        self.is_decoder, self.is_cross = is_decoder, is_cross
        self.num_heads, self.head_dim = cfg.num_heads, cfg.d_kv
        inner = cfg.num_heads * cfg.d_kv
        self.q = nn.Linear(cfg.d_model, inner, bias=False)
        self.k = nn.Linear(cfg.d_model, inner, bias=False)
        self.v = nn.Linear(cfg.d_model, inner, bias=False)
        self.o = nn.Linear(inner, cfg.d_model, bias=False)
        self.dropout = cfg.dropout_rate
        self.position_encoding = None if is_cross else cfg.position_encoding
        self.max_distance = cfg.relative_attention_max_distance
        if owns_position and self.position_encoding == "t5":
            self.relative_attention_bias = nn.Embedding(cfg.relative_attention_num_buckets, cfg.num_heads)
        if owns_position and self.position_encoding == "fire":
            self.fire = FIRE(cfg.num_heads, cfg.fire_hidden_size, cfg.fire_init_length)
        if self.position_encoding == "alibi":
            # A constant, not state (never saved or loaded); kept on the CPU and copied once per device.
            self._alibi = {torch.device("cpu"): alibi_slopes(cfg.num_heads)}
        if self.position_encoding == "rope":
            self.rot_dims = int(cfg.d_kv * cfg.rope_fraction)
            self.rope_theta = float(cfg.rope_theta)

    def position_spec(self, owner: Attention | None) -> PositionSpec:
        """The bias spec of this layer; ``owner`` is the layer whose table/MLP is shared across the stack."""
        kind = self.position_encoding
        if kind in (None, "rope"):
            return PositionSpec(None)
        bidirectional = not self.is_decoder
        if kind == "alibi":
            device = self.q.weight.device
            if device not in self._alibi:
                self._alibi[device] = self._alibi[torch.device("cpu")].to(device)
            return PositionSpec("alibi", bidirectional, slopes=self._alibi[device], key="alibi")
        src = self if (hasattr(self, "relative_attention_bias") or hasattr(self, "fire")) else owner
        if kind == "t5":
            table = src.relative_attention_bias.weight
            return PositionSpec("t5", bidirectional, table=table, max_distance=self.max_distance, key=id(src))
        return PositionSpec("fire", bidirectional, fire=src.fire, key=id(src))

    def forward(
        self, x: torch.Tensor, ctx: StackContext, layer_idx: int, owner: Attention | None,
        kv_input: torch.Tensor | None = None,
    ) -> torch.Tensor:  # fmt: skip
        B, Lq, _ = x.shape
        H, D = self.num_heads, self.head_dim
        q = self.q(x).view(B, Lq, H, D)
        cache = ctx.cache
        if self.is_cross:
            cached = cache.get_cross(layer_idx) if cache is not None else None
            if cached is None:
                Lk = kv_input.shape[1]
                k, v = self.k(kv_input).view(B, Lk, H, D), self.v(kv_input).view(B, Lk, H, D)
                if cache is not None:
                    cache.set_cross(layer_idx, k, v)
            else:
                k, v = cached
            ctx_q, ctx_k, causal = ctx.q, ctx.enc, False
        else:
            k, v = self.k(x).view(B, Lq, H, D), self.v(x).view(B, Lq, H, D)
            if self.position_encoding == "rope":
                cos, sin = rope_angles(ctx.q.positions, self.rot_dims, self.rope_theta)
                q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            if cache is not None:
                k, v = cache.update_self(layer_idx, k, v)
            ctx_q, ctx_k, causal = ctx.q, ctx.k, self.is_decoder
        out = attend(
            q, k, v, self.position_spec(owner), ctx_q, ctx_k, causal=causal, impl=ctx.impl,
            dropout=self.dropout, bias_cache=ctx.bias_cache, training=self.training,
        )  # fmt: skip
        return self.o(out.reshape(B, Lq, H * D))


def _clamp_fp16(x: torch.Tensor) -> torch.Tensor:
    """Hugging Face clamps inf after every fp16 sub-layer; keep that so fp16 checkpoints behave the same."""
    if x.dtype != torch.float16:
        return x
    big = torch.finfo(torch.float16).max
    limit = torch.where(torch.isinf(x).any(), big - 1000, big)
    return torch.clamp(x, min=-limit, max=limit)


class Block(nn.Module):
    """Pre-norm residual block: self-attention, cross-attention (decoder), feed-forward."""

    def __init__(self, cfg: Any, *, is_decoder: bool, owns_position: bool):
        super().__init__()
        self.is_decoder = is_decoder
        self.attn_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)
        self.attn = Attention(cfg, is_decoder=is_decoder, owns_position=owns_position)
        if is_decoder:
            self.cross_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)
            self.cross_attn = Attention(cfg, is_decoder=True, is_cross=True)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)
        self.mlp = MLP(cfg)
        self.dropout = nn.Dropout(cfg.dropout_rate)

    def forward(
        self, h: torch.Tensor, ctx: StackContext, layer_idx: int, owner: Attention | None,
        enc_hidden: torch.Tensor | None = None,
    ) -> torch.Tensor:  # fmt: skip
        k = ctx.kernels
        h = _clamp_fp16(h + self.dropout(self.attn(self.attn_norm(h, k), ctx, layer_idx, owner)))
        if self.is_decoder:
            h = _clamp_fp16(h + self.dropout(self.cross_attn(self.cross_norm(h, k), ctx, layer_idx, None, enc_hidden)))
        return _clamp_fp16(h + self.dropout(self.mlp(self.ffn_norm(h, k), k)))


class Stack(nn.Module):
    """The encoder or the decoder: blocks, final norm, dropout."""

    def __init__(self, cfg: Any, *, is_decoder: bool):
        super().__init__()
        self.is_decoder = is_decoder
        n = cfg.num_decoder_layers if is_decoder else cfg.num_layers
        self.per_layer = cfg.relative_attention_per_layer
        self.layers = nn.ModuleList(
            [Block(cfg, is_decoder=is_decoder, owns_position=self.per_layer or i == 0) for i in range(n)]
        )
        self.final_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)
        self.dropout = nn.Dropout(cfg.dropout_rate)
        self.gradient_checkpointing = False

    def forward(self, embeds: torch.Tensor, ctx: StackContext, enc_hidden: torch.Tensor | None = None) -> torch.Tensor:
        h = self.dropout(embeds)
        owner = self.layers[0].attn if len(self.layers) else None
        if owner is not None and not self.per_layer and (ctx.impl != "flash" or owner.position_encoding == "fire"):
            # Materialise the shared bias once (the flash kernel computes T5/ALiBi biases itself), outside any
            # checkpointed layer (recomputation must not differ).
            _materialised_bias(owner.position_spec(owner), ctx.q.padded()[0], ctx.k.padded()[0], ctx.bias_cache)
        for i, layer in enumerate(self.layers):
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                h = checkpoint(layer, h, ctx, i, owner, enc_hidden, use_reentrant=False)
            else:
                h = layer(h, ctx, i, owner, enc_hidden)
        return self.dropout(self.final_norm(h, ctx.kernels))


# --------------------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------------------


class T5(nn.Module):
    """Shared embedding, encoder, optional decoder and LM head. Inputs are token ids; see :class:`Seqs` for layouts.

    ``attn_implementation`` is the one model-level backend switch ("eager", "sdpa", "flash").
    """

    def __init__(self, cfg: Any, *, decoder: bool = True, lm_head: bool = True):
        super().__init__()
        self.cfg = cfg
        self.shared = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.encoder = Stack(cfg, is_decoder=False)
        self.decoder = Stack(cfg, is_decoder=True) if decoder else None
        # A tied model (T5 v1.0) reads its output projection from the shared embedding.
        untied = decoder and lm_head and not cfg.tie_word_embeddings
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False) if untied else None

    @property
    def attn_implementation(self) -> str:
        """The backend switch; Hugging Face's ``config._attn_implementation`` when the config has one."""
        return getattr(self.cfg, "_attn_implementation", None) or "sdpa"

    def embed(self, input_ids: torch.Tensor, name: str = "input_ids") -> torch.Tensor:
        if input_ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{name} must hold integer token ids, got dtype {input_ids.dtype}.")
        if input_ids.numel() and not torch.compiler.is_compiling():  # one host sync; skipped inside compiled graphs
            lo, hi = torch.aminmax(input_ids)
            lo, hi = int(lo), int(hi)
            if lo < 0 or hi >= self.shared.num_embeddings:
                raise ValueError(
                    f"{name} holds token ids outside the vocabulary [0, {self.shared.num_embeddings}): "
                    f"min {lo}, max {hi}."
                )
        return self.shared(input_ids)

    def encode(
        self,
        input_ids: torch.Tensor | None = None,
        *,
        inputs_embeds: torch.Tensor | None = None,
        seqs: Seqs | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, Seqs]:
        """Encoder hidden states (B, L, d_model) and the layout (built from ``attention_mask`` if not given)."""
        embeds = self._embeds(input_ids, inputs_embeds, "input_ids")
        if seqs is None:
            B, L = embeds.shape[:2]
            seqs = Seqs.build(B, L, embeds.device, attention_mask=attention_mask)
        ctx = StackContext(self.attn_implementation, seqs, seqs)
        return self.encoder(embeds, ctx), seqs

    def decode(
        self,
        input_ids: torch.Tensor | None,
        enc_hidden: torch.Tensor,
        enc_seqs: Seqs,
        *,
        inputs_embeds: torch.Tensor | None = None,
        seqs: Seqs | None = None,
        cache: KVCache | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Decoder hidden states (B, Ld, d_model) before the LM head."""
        if self.decoder is None:
            raise ValueError("this model has no decoder (encoder-only).")
        embeds = self._embeds(input_ids, inputs_embeds, "decoder_input_ids")
        B, Lq = embeds.shape[:2]
        past = cache.past_length() if cache is not None else 0
        key_mask = None
        if past and attention_mask is not None:
            # During cached decoding the mask may cover the cache and the new rows, or the new rows only.
            if attention_mask.shape[-1] == past + Lq:
                key_mask, attention_mask = attention_mask, attention_mask[:, past:]
            else:
                key_mask = torch.cat([attention_mask.new_ones(B, past), attention_mask], dim=1)
        if seqs is None:
            seqs = Seqs.build(
                B, Lq, embeds.device, attention_mask=attention_mask, offset=past, name="decoder_input_ids"
            )
        k_seqs = seqs
        if past:
            if seqs.packed:
                raise ValueError("a key/value cache cannot be combined with packed decoder batches.")
            k_seqs = Seqs.build(B, past + Lq, embeds.device, attention_mask=key_mask, name="decoder keys")
        ctx = StackContext(self.attn_implementation, seqs, k_seqs, enc=enc_seqs, cache=cache)
        return self.decoder(embeds, ctx, enc_hidden)

    def _embeds(self, ids: torch.Tensor | None, embeds: torch.Tensor | None, name: str) -> torch.Tensor:
        if (ids is None) == (embeds is None):
            raise ValueError(f"pass exactly one of {name} and its *_embeds.")
        if embeds is not None:
            return embeds
        if ids.dim() != 2:
            raise ValueError(f"{name} must have shape (batch, length), got {tuple(ids.shape)}.")
        return self.embed(ids, name)

    def output_weight(self) -> torch.Tensor:
        return self.shared.weight if self.lm_head is None else self.lm_head.weight

    def output_scale(self) -> float | None:
        return self.cfg.d_model**-0.5 if self.cfg.scale_decoder_outputs else None

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        scale = self.output_scale()
        if scale is not None:
            hidden = hidden * scale
        return F.linear(hidden, self.output_weight())

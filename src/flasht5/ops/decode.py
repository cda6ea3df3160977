"""Flash-decoding in Triton: one new query per (row, head) against a static, preallocated KV cache, split over keys.

What it computes
----------------
``out[b, h] = softmax(scale * k[b, :n, h] @ q[b, h] + bias) @ v[b, :n, h]`` with ``n = seqlens_k[b]``: the decode
step of T5 generation. q ``(B, H, D)`` (the new query of each row), k_cache / v_cache ``(B, Lmax, H, D)``
preallocated once (any batch / row / head strides, unit head-dim stride), ``seqlens_k`` ``(B,)`` int32 on the
device: keys ``j < seqlens_k[b]`` are attended, the rest of the buffer is never read. The query sits at position
``seqlens_k[b] - 1``, after every valid key (decoder self-attention is causal by construction; cross-attention over
the encoder output passes the encoder lengths and no bias). The score term is one of

* the T5 relative-position bias ``rel_lut[h, clamp(j - q_pos, -R, R) + R]`` (``rel_lut = t5_bias_lut(table,
  bidirectional=False, max_distance)`` from ``ops/relative_position.py``, fp32 ``(H, 2R+1)``; distances are <= 0),
* ALiBi ``-slope[h] * |j - q_pos|`` (``alibi_slopes``: ``(H,)``, any float dtype),
* nothing (cross-attention).

A row with ``seqlens_k[b] == 0`` outputs 0. Values outside ``[0, Lmax]`` are clamped into it by the kernel (never an
out-of-bounds read); they raise a ``ValueError`` for CPU tensors, and for CUDA tensors with ``FLASHT5_DEBUG=1``.
Shapes never depend on values, so a decode step that calls this is CUDA-graph capturable: no host sync, no
allocation whose size depends on ``seqlens_k``. Inference only: the backward raises.

Dtypes and limits: q/k/v one dtype, fp16/bf16/fp32 on the GPU (fp32 accumulation; fp32 inputs take IEEE fp32
dots, not tf32), fp32/fp16 under ``TRITON_INTERPRET=1``. Head dims 16, 32, 64, 128, 256. The output is a new
contiguous ``(B, H, D)`` tensor in q's dtype.

How (Flash-Decoding)
--------------------
Grid ``(B * H, num_splits)``. Program ``(bh, s)`` takes the ``s``-th of ``num_splits`` equal slices of row b's
*valid* keys (slice length ``ceil(n / num_splits)`` rounded up to the key block, computed in the kernel from
``seqlens_k[b]``, so a short row in a long buffer spreads over every split rather than leaving most of them idle),
streams it in blocks of ``BLOCK_N`` keys and keeps an online softmax; a slice past ``n`` (a short row, or more
splits than blocks) runs no iteration and writes an empty partial. A second kernel per (row, head) merges the
partials ``(out_s, lse_s)`` with the usual log-sum-exp weights. With one split the first kernel writes the output
itself (one launch). The split kernel runs on the tensor cores: the query is repeated in all 16 rows of an MMA tile
(the smallest M), the loop is FlashAttention-2's forward, and row 0 is stored. 15 of 16 rows are wasted matmul
work, but the step is bound by reading K/V, and tile loads that feed ``tl.dot`` are what Triton's software
pipeliner prefetches. The first version kept the online softmax per key lane on the CUDA cores (elementwise loop
body, no matmul); its loads were not pipelined (num_stages changed nothing) and it reached 1.7 TB/s, against 4.1
TB/s for this kernel (H200, batch 32, 16384 keys, T5 lookup; ``benchmarks/results/2026-12-02-h200-d``). Scores are
in the exp2 domain (``log2 e`` folded into the scale and the bias).

``num_splits=None`` picks ``ceil(2 * SMs / (B * H))`` splits (about two programs per SM, the SM count cached per
device), at most 128 and at most ``Lmax / 64`` (every split streams at least one key block); ``B * H >= 2 * SMs``
gives one split (at batch 32 x 12 heads one split was 5-12 % faster than two). It depends on B, H, Lmax and the
device only, never on values.

Tuning and hardware: tiles and the split heuristic measured on one H200 (``benchmarks/bench_decode.py``, which times
the kernel under CUDA graphs against the previous decode path, ``flash_attention`` with Lq = 1, and SDPA, and sweeps
``num_splits`` and the tiles; ``_CFG_OVERRIDE`` replaces the tile choice for tests and benchmarks): 64 keys per
block, 4 warps, 3 stages. Not measured on sm80 (the same code compiles there: ``tl.dot`` with M = 16 is an
mma.sync). The lse partials are fp32, ``(B * H * num_splits * (D + 1))`` floats.

Host path: the public function does cheap checks (shapes, dtypes, devices, Python types), then calls the launcher
directly when no input needs a gradient (``FastKernel`` launches, launch configs and split counts cached), through
a ``torch.autograd.Function`` whose backward raises when one does, and through the ``torch.library.custom_op``
``flasht5::flash_decode`` (with a fake implementation) while ``torch.compile`` traces, so ``fullgraph=True`` works.

Credits: Flash-Decoding (Dao, Haziza, Massa, Sizov, 2023, "Flash-Decoding for long-context inference"); the online
softmax of FlashAttention (Dao et al., 2022) and Milakov & Gimelshein (2018); T5 relative positions (Raffel et al.,
2020); ALiBi (Press et al., 2022).
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from flasht5.ops._device import (
    FLOAT_DTYPES,
    allow_inductor_fallback,
    cdiv,
    check_kernel_device,
    custom_op,
    debug_checks,
    function_apply,
    next_pow2,
    sm_count,
    use_custom_op,
)
from flasht5.ops._launch import FastKernel
from flasht5.ops.attention import _gather_f32

__all__ = ["flash_decode", "flash_decode_ref"]

LOG2E = 1.4426950408889634
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128, 256)
MAX_SPLITS_ARG = 65535  # the grid's second dimension

# num_splits=None: programs per SM to aim for, the fewest keys per split, the most splits (bench_decode.py's sweep).
_PROGRAMS_PER_SM = 2
_MIN_KEYS_PER_SPLIT = 64
_MAX_AUTO_SPLITS = 128
_INTERPRET_SMS = 2  # the "SM count" under the interpreter (CPU tests): few programs

# Tests and benchmarks: (BLOCK_N, num_warps, num_stages) of the split kernel instead of the table.
_CFG_OVERRIDE: tuple[int, int, int] | None = None


# --------------------------------------------------------------------------------------------------------------
# Reference (plain PyTorch)
# --------------------------------------------------------------------------------------------------------------
def flash_decode_ref(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    seqlens_k: Tensor,
    *,
    rel_lut: Tensor | None = None,
    alibi_slopes: Tensor | None = None,
    scale: float = 1.0,
    num_splits: int | None = None,
) -> Tensor:
    """Plain-PyTorch :func:`flash_decode`, computed in q's dtype (pass fp32/fp64 inputs for an accurate reference);
    materialises the ``(B, H, Lmax)`` scores. ``num_splits`` is ignored. Keys at or past ``seqlens_k[b]`` are masked
    out and their values zeroed first, so garbage (NaN) in the unused part of the cache does not leak in."""
    del num_splits
    dtype, dev = q.dtype, q.device
    B, Lmax = k_cache.shape[:2]
    lens = seqlens_k.to(device=dev, dtype=torch.long)
    j = torch.arange(Lmax, device=dev)
    valid = j[None, :] < lens[:, None]  # (B, Lmax)
    k = k_cache.to(dtype).masked_fill(~valid[:, :, None, None], 0.0)
    v = v_cache.to(dtype).masked_fill(~valid[:, :, None, None], 0.0)
    s = torch.einsum("bhd,blhd->bhl", q, k) * scale  # (B, H, Lmax)
    rel = j[None, :] - (lens[:, None] - 1)  # key_pos - query_pos, (B, Lmax)
    if rel_lut is not None:
        R = (rel_lut.shape[1] - 1) // 2
        s = s + rel_lut.to(dtype)[:, rel.clamp(-R, R) + R].permute(1, 0, 2)  # (H, B, Lmax) -> (B, H, Lmax)
    if alibi_slopes is not None:
        s = s - alibi_slopes.to(dtype)[None, :, None] * rel.abs().to(dtype)[:, None, :]
    s = s.masked_fill(~valid[:, None, :], float("-inf"))
    seen = valid.any(-1)[:, None, None]  # rows with no valid key output 0
    p = torch.softmax(s.masked_fill(~seen, 0.0), dim=-1).masked_fill(~valid[:, None, :], 0.0)
    return torch.einsum("bhl,blhd->bhd", p, v)


# --------------------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["H", "LMAX", "R", "LSE_OFF"])
def _decode_split_kernel(
    Q, K, V, SEQ, LUT, ALIBI, OUT, PART,
    sqb, sqh, skb, skm, skh, svb, svm, svh, s_seq, s_luth, s_lutw, s_alibi,
    H, LMAX, R, LSE_OFF, scale2,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, HAS_REL: tl.constexpr, HAS_ALIBI: tl.constexpr,
    SPLIT: tl.constexpr, DOT_PREC: tl.constexpr, ASM_GATHER: tl.constexpr,
):  # fmt: skip
    """One (row, head, split): the query repeated in all 16 rows of an MMA tile (the smallest M), FlashAttention-2's
    forward over this split's slice of keys, row 0 stored (see the module docstring)."""
    bh = tl.program_id(0)
    split = tl.program_id(1)
    n_splits = tl.num_programs(1)
    b = bh // H
    h = bh - b * H
    n = tl.load(SEQ + b * s_seq)
    n = tl.minimum(tl.maximum(n, 0), LMAX)  # out-of-range lengths never read outside the cache
    per_split = tl.cdiv(tl.cdiv(n, n_splits), BLOCK_N) * BLOCK_N  # this row's valid keys, in equal slices
    start = split * per_split
    end = tl.minimum(start + per_split, n)
    q_pos = n - 1

    offs_r = tl.arange(0, 16)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_N)
    b64 = b.to(tl.int64)
    q = tl.load(Q + b64 * sqb + h * sqh + offs_r[:, None] * 0 + offs_d[None, :])  # (16, D): q in every row
    rows = (start + offs_n).to(tl.int64)[:, None]  # (BLOCK_N, 1); int64: row * stride can pass 2**31
    k_ptrs = K + b64 * skb + h * skh + rows * skm + offs_d[None, :]
    v_ptrs = V + b64 * svb + h * svh + rows * svm + offs_d[None, :]
    if HAS_REL:
        lut_base = LUT + h * s_luth
    if HAS_ALIBI:
        alibi2 = tl.load(ALIBI + h * s_alibi).to(tl.float32) * 1.4426950408889634

    m_i = tl.full([16], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([16], dtype=tl.float32)
    acc = tl.zeros([16, HEAD_DIM], dtype=tl.float32)
    for n0 in range(start, end, BLOCK_N):
        keys = n0 + offs_n
        valid = keys < end
        k = tl.load(k_ptrs, mask=valid[:, None], other=0.0)
        v = tl.load(v_ptrs, mask=valid[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * scale2  # (16, BLOCK_N), log2 units
        rel = (keys - q_pos)[None, :] + offs_r[:, None] * 0  # key_pos - query_pos, as a (16, BLOCK_N) tile
        if HAS_REL:
            idx = tl.minimum(tl.maximum(rel, -R), R) + R
            s += _gather_f32(lut_base + idx * s_lutw, ASM_GATHER) * 1.4426950408889634
        if HAS_ALIBI:
            s -= alibi2 * tl.abs(rel).to(tl.float32)
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a slice that has seen only -inf so far
        p = tl.math.exp2(s - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
        m_i = m_new
        k_ptrs += BLOCK_N * skm
        v_ptrs += BLOCK_N * svm

    empty = l_i == 0.0  # no valid key in this slice (or in the row): output 0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    row0 = offs_r == 0
    if SPLIT:
        part = bh.to(tl.int64) * n_splits + split
        tl.store(PART + part * HEAD_DIM + offs_r[:, None] * 0 + offs_d[None, :], out, mask=row0[:, None])
        lse = tl.where(empty, float("-inf"), m_i + tl.math.log2(tl.where(empty, 1.0, l_i)))
        tl.store(PART + LSE_OFF + part + offs_r * 0, lse, mask=row0)
    else:
        o_ptrs = OUT + bh.to(tl.int64) * HEAD_DIM + offs_r[:, None] * 0 + offs_d[None, :]
        tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=row0[:, None])


@triton.jit(do_not_specialize=["LSE_OFF", "NUM_SPLITS"])
def _decode_combine_kernel(PART, OUT, LSE_OFF, NUM_SPLITS, HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr):
    # out = sum_s 2^lse_s out_s / sum_s 2^lse_s, with a running max per lane of splits (no reduction in the loop).
    bh = tl.program_id(0).to(tl.int64)
    row0 = bh * NUM_SPLITS
    offs_d = tl.arange(0, HEAD_DIM)
    offs_s = tl.arange(0, BLOCK_S)
    m = tl.full([BLOCK_S], float("-inf"), dtype=tl.float32)
    l = tl.zeros([BLOCK_S], dtype=tl.float32)  # noqa: E741
    acc = tl.zeros([BLOCK_S, HEAD_DIM], dtype=tl.float32)
    for s0 in range(0, NUM_SPLITS, BLOCK_S):
        idx = s0 + offs_s
        smask = idx < NUM_SPLITS
        lse = tl.load(PART + LSE_OFF + row0 + idx, mask=smask, other=float("-inf"))
        o = tl.load(PART + (row0 + idx)[:, None] * HEAD_DIM + offs_d[None, :], mask=smask[:, None], other=0.0)
        m_new = tl.maximum(m, lse)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m - m_use)
        wt = tl.math.exp2(lse - m_use)
        l = l * alpha + wt  # noqa: E741
        acc = acc * alpha[:, None] + wt[:, None] * o
        m = m_new
    m_max = tl.max(m, 0)
    w = tl.math.exp2(m - tl.where(m_max == float("-inf"), 0.0, m_max))
    l_sum = tl.sum(l * w, 0)
    out = tl.sum(acc * w[:, None], 0) / tl.where(l_sum == 0.0, 1.0, l_sum)
    tl.store(OUT + bh * HEAD_DIM + offs_d, out.to(OUT.dtype.element_ty))


# --------------------------------------------------------------------------------------------------------------
# Launch configuration (cached: it runs on every call)
# --------------------------------------------------------------------------------------------------------------
@functools.cache
def _split_config(head_dim: int, elem_size: int, on_gpu: bool) -> tuple[int, int, int]:
    """(BLOCK_N, num_warps, num_stages) of the split kernel: 64 keys, 4 warps, 3 stages, the best or within 5 % of
    the best tile at every (B, Lk) of ``bench_decode.py``'s sweep on the H200 (D=64, bf16; 2026-12-02); 32 keys at
    D=256 and 2 stages for fp32 keep the stage buffers small. Under the interpreter 16 keys, so the small CPU test
    shapes still take several iterations per split."""
    if not on_gpu:
        return 16, 4, 1
    return (64 if head_dim <= 128 else 32), 4, (2 if elem_size == 4 else 3)


def _cfg(head_dim: int, elem_size: int, on_gpu: bool) -> tuple[int, int, int]:
    return _CFG_OVERRIDE if _CFG_OVERRIDE is not None else _split_config(head_dim, elem_size, on_gpu)


@functools.cache
def _combine_block(num_splits: int, head_dim: int, on_gpu: bool) -> int:
    """Splits merged per iteration of the combine kernel: all of them up to a (BLOCK_S, D) tile of 4096 floats
    (2 under the interpreter, so that the tests cover the loop)."""
    cap = max(1, 4096 // head_dim) if on_gpu else 2
    return min(next_pow2(num_splits), cap)


@functools.cache
def auto_num_splits(bh: int, lmax: int, n_sm: int) -> int:
    """The ``num_splits=None`` choice for ``bh = B * H`` (row, head) pairs, ``Lmax`` cached keys and ``n_sm`` SMs:
    enough programs for about ``_PROGRAMS_PER_SM`` per SM, at most ``_MAX_AUTO_SPLITS`` splits and at most one per
    ``_MIN_KEYS_PER_SPLIT`` keys of the buffer."""
    if bh <= 0 or lmax <= 0:
        return 1
    want = cdiv(_PROGRAMS_PER_SM * n_sm, bh)
    return max(1, min(want, _MAX_AUTO_SPLITS, lmax // _MIN_KEYS_PER_SPLIT))


def _device_sms(t: Tensor) -> int:
    index = t.get_device()
    return sm_count(index) if index >= 0 else _INTERPRET_SMS


# --------------------------------------------------------------------------------------------------------------
# Launcher: the one implementation, called by the eager path and by the custom op
# --------------------------------------------------------------------------------------------------------------
_SPLIT = FastKernel(_decode_split_kernel)
_COMBINE = FastKernel(_decode_combine_kernel)


def _forward(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    seqlens_k: Tensor,
    rel_lut: Tensor | None,
    alibi_slopes: Tensor | None,
    scale: float,
    num_splits: int,
) -> Tensor:
    """out ``(B, H, D)`` contiguous in q's dtype; ``num_splits`` 0 picks it (:func:`auto_num_splits`)."""
    B, H, D = q.shape
    Lmax = k_cache.shape[1]
    out = torch.empty_like(q) if q.is_contiguous() else q.new_empty((B, H, D))  # (B, H, D), row-major
    bh = B * H
    if bh == 0:
        return out
    if Lmax == 0:
        return out.zero_()
    if q.stride(-1) != 1:
        q = q.contiguous()
    if num_splits == 0:
        num_splits = auto_num_splits(bh, Lmax, _device_sms(q))
    on_gpu = q.is_cuda
    block_n, num_warps, num_stages = _cfg(D, q.element_size(), on_gpu)
    has_rel, has_alibi = rel_lut is not None, alibi_slopes is not None
    lut = rel_lut if has_rel else seqlens_k  # any pointer where the flag is off (never read)
    alibi = alibi_slopes if has_alibi else seqlens_k
    lut_strides = rel_lut.stride() if has_rel else (0, 0)
    R = (rel_lut.shape[1] - 1) // 2 if has_rel else 0
    split = num_splits > 1
    lse_off = bh * num_splits * D
    # (B*H*num_splits, D) partial outputs, then B*H*num_splits lse values; one flat fp32 buffer (one allocation)
    part = q.new_empty(lse_off + bh * num_splits, dtype=torch.float32) if split else out
    args = (
        q, k_cache, v_cache, seqlens_k, lut, alibi, out, part,
        q.stride(0), q.stride(1), *k_cache.stride()[:3], *v_cache.stride()[:3], seqlens_k.stride(0),
        *lut_strides, alibi_slopes.stride(0) if has_alibi else 0,
        H, Lmax, R, lse_off, scale * LOG2E,
    )  # fmt: skip
    consts = (D, block_n, has_rel, has_alibi, split, "ieee" if q.dtype == torch.float32 else "tf32", on_gpu)
    _SPLIT((bh, num_splits), args, consts, num_warps=num_warps, num_stages=num_stages)
    if split:
        _COMBINE(
            (bh,), (part, out, lse_off, num_splits), (D, _combine_block(num_splits, D, on_gpu)), num_warps=4,
            num_stages=1,
        )  # fmt: skip
    return out


class _FlashDecodeFn(torch.autograd.Function):
    """The eager route when an input requires a gradient: the forward as usual, a backward that says why not."""

    @staticmethod
    def forward(ctx, q, k_cache, v_cache, seqlens_k, rel_lut, alibi_slopes, cfg):
        return _forward(q, k_cache, v_cache, seqlens_k, rel_lut, alibi_slopes, *cfg)

    @staticmethod
    def backward(ctx, grad_out):
        raise RuntimeError("flash_decode is inference only (no backward); train with flash_attention")


_apply = function_apply(_FlashDecodeFn)


# --------------------------------------------------------------------------------------------------------------
# Custom op (the route torch.compile traces)
# --------------------------------------------------------------------------------------------------------------
@custom_op("flasht5::flash_decode", mutates_args=())
def _flash_decode_op(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    seqlens_k: Tensor,
    rel_lut: Tensor | None,
    alibi_slopes: Tensor | None,
    scale: float,
    num_splits: int,
) -> Tensor:
    """:func:`_forward` (``num_splits`` 0: chosen at run time from the shapes and the device)."""
    return _forward(q, k_cache, v_cache, seqlens_k, rel_lut, alibi_slopes, scale, num_splits)


@_flash_decode_op.register_fake
def _(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    seqlens_k: Tensor,
    rel_lut: Tensor | None,
    alibi_slopes: Tensor | None,
    scale: float,
    num_splits: int,
) -> Tensor:
    allow_inductor_fallback()
    return q.new_empty(q.shape)


# --------------------------------------------------------------------------------------------------------------
# Public function
# --------------------------------------------------------------------------------------------------------------
def _valid_fast(q, k_cache, v_cache, seqlens_k, rel_lut, alibi_slopes, num_splits) -> bool:
    """The usual call (plain CUDA tensors, valid arguments) in one expression; ``False`` sends the call to
    :func:`_check`, which names the problem (or accepts what this conservative test does not cover)."""
    if not (
        type(q) is Tensor
        and type(k_cache) is Tensor
        and type(v_cache) is Tensor
        and type(seqlens_k) is Tensor
        and q.is_cuda
        and q.dtype in FLOAT_DTYPES
        and q.dim() == 3
        and k_cache.dim() == 4
        and k_cache.shape == v_cache.shape
        and k_cache.dtype == q.dtype
        and v_cache.dtype == q.dtype
        and seqlens_k.dtype == torch.int32
        and seqlens_k.dim() == 1
        and k_cache.stride(-1) == 1
        and v_cache.stride(-1) == 1
        and q.shape[2] in SUPPORTED_HEAD_DIMS
    ):
        return False
    B, H, D = q.shape
    kb, _, kh, kd = k_cache.shape
    dev = q.device
    return (
        kb == B
        and kh == H
        and kd == D
        and seqlens_k.shape[0] == B
        and k_cache.device == dev
        and v_cache.device == dev
        and seqlens_k.device == dev
        and (num_splits is None or (type(num_splits) is int and 1 <= num_splits <= MAX_SPLITS_ARG))
        and (
            (rel_lut is None and alibi_slopes is None)
            or (
                rel_lut is not None
                and alibi_slopes is None
                and type(rel_lut) is Tensor
                and rel_lut.dtype == torch.float32
                and rel_lut.dim() == 2
                and rel_lut.shape[0] == H
                and rel_lut.shape[1] & 1 == 1
                and rel_lut.device == dev
            )
            or (
                rel_lut is None
                and type(alibi_slopes) is Tensor
                and alibi_slopes.dtype in FLOAT_DTYPES
                and alibi_slopes.shape == (H,)
                and alibi_slopes.device == dev
            )
        )
    )


def _shape(t: object) -> object:
    return tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__


def _check(q, k_cache, v_cache, seqlens_k, rel_lut, alibi_slopes, scale, num_splits) -> None:
    """Raise a ``ValueError`` naming the argument for anything the kernels cannot take."""
    if not isinstance(q, Tensor) or q.dim() != 3:
        raise ValueError(f"q must be a (B, H, D) tensor (one query per row), got {_shape(q)}")
    if q.dtype not in FLOAT_DTYPES:
        raise ValueError(f"q must be float32/float16/bfloat16, got {q.dtype}")
    B, H, D = q.shape
    dev = q.device
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(t, Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a (B, Lmax, H, D) tensor, got {_shape(t)}")
        if t.shape[0] != B or t.shape[2] != H or t.shape[3] != D:
            raise ValueError(f"{name} of shape {tuple(t.shape)} does not match q's (B, H, D) = {(B, H, D)}")
        if t.dtype != q.dtype:
            raise ValueError(f"{name}.dtype {t.dtype} must match q.dtype {q.dtype}")
        if t.device != dev:
            raise ValueError(f"{name} is on {t.device} but q is on {dev}")
        if t.stride(-1) != 1 and t.numel() > 0:
            raise ValueError(f"{name} must have a unit head-dim stride, got strides {t.stride()} (no copy per step)")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache and v_cache must have the same shape, got {_shape(k_cache)} and {_shape(v_cache)}")
    if D not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"q: head dim {D} is not supported (supported: {SUPPORTED_HEAD_DIMS})")
    if not isinstance(seqlens_k, Tensor) or seqlens_k.dim() != 1 or seqlens_k.shape[0] != B:
        raise ValueError(f"seqlens_k must be a ({B},) tensor (valid keys per row), got {_shape(seqlens_k)}")
    if seqlens_k.dtype != torch.int32:
        raise ValueError(f"seqlens_k must be int32, got {seqlens_k.dtype}")
    if seqlens_k.device != dev:
        raise ValueError(f"seqlens_k is on {seqlens_k.device} but q is on {dev}")
    if rel_lut is not None and alibi_slopes is not None:
        raise ValueError("rel_lut and alibi_slopes are exclusive: pass one position bias")
    if rel_lut is not None:
        if not isinstance(rel_lut, Tensor) or rel_lut.dim() != 2 or rel_lut.shape[0] != H:
            raise ValueError(f"rel_lut must be (H={H}, 2R+1) (see t5_bias_lut), got {_shape(rel_lut)}")
        if rel_lut.shape[1] % 2 != 1:
            raise ValueError(f"rel_lut must have an odd width 2R+1 (distances -R..R), got {rel_lut.shape[1]}")
        if rel_lut.dtype != torch.float32:
            raise ValueError(f"rel_lut must be float32, got {rel_lut.dtype}")
        if rel_lut.device != dev:
            raise ValueError(f"rel_lut is on {rel_lut.device} but q is on {dev}")
    if alibi_slopes is not None:
        if not isinstance(alibi_slopes, Tensor) or alibi_slopes.shape != (H,):
            raise ValueError(f"alibi_slopes must have shape ({H},), got {_shape(alibi_slopes)}")
        if alibi_slopes.dtype not in FLOAT_DTYPES:
            raise ValueError(f"alibi_slopes must be float32/float16/bfloat16, got {alibi_slopes.dtype}")
        if alibi_slopes.device != dev:
            raise ValueError(f"alibi_slopes is on {alibi_slopes.device} but q is on {dev}")
    if type(scale) not in (float, int) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite float, got {scale!r}")
    if num_splits is not None and (type(num_splits) is not int or not 1 <= num_splits <= MAX_SPLITS_ARG):
        raise ValueError(f"num_splits must be None or an int in [1, {MAX_SPLITS_ARG}], got {num_splits!r}")
    check_kernel_device(q, "q")
    if not q.is_cuda and q.dtype == torch.bfloat16:
        raise ValueError("q: bfloat16 is not supported by the Triton interpreter (use float32/float16 on CPU)")


def _check_seqlens_values(seqlens_k: Tensor, lmax: int) -> None:
    """Value check (reads the tensor): CPU tensors always, CUDA tensors with FLASHT5_DEBUG=1 (one sync), never while
    torch.compile traces or a CUDA graph is captured."""
    if seqlens_k.numel() == 0 or (seqlens_k.is_cuda and torch.cuda.is_current_stream_capturing()):
        return
    lo, hi = int(seqlens_k.min()), int(seqlens_k.max())
    if lo < 0 or hi > lmax:
        raise ValueError(f"seqlens_k values must be in [0, Lmax={lmax}], got min {lo}, max {hi}")


def flash_decode(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    seqlens_k: Tensor,
    *,
    rel_lut: Tensor | None = None,
    alibi_slopes: Tensor | None = None,
    scale: float = 1.0,
    num_splits: int | None = None,
) -> Tensor:
    """One decode step: the query ``q`` (B, H, D) of each row against its first ``seqlens_k[b]`` cached keys.

    ``k_cache`` / ``v_cache``: ``(B, Lmax, H, D)`` preallocated (unit head-dim stride, any other strides);
    ``seqlens_k``: int32 ``(B,)`` on q's device. Optional position bias (the query at position ``seqlens_k[b] - 1``):
    ``rel_lut`` (fp32 ``(H, 2R+1)``, from ``t5_bias_lut(table, bidirectional=False, max_distance)``) or
    ``alibi_slopes`` ``(H,)``. T5 uses ``scale=1.0``. ``num_splits``: key splits per (row, head) (None: picked from
    B * H, Lmax and the SM count). Returns a new ``(B, H, D)`` tensor in q's dtype; rows without keys give 0.
    Inference only. Raises ``ValueError`` naming the argument for bad shapes, dtypes, devices or options.
    """
    if not (
        type(scale) is float
        and math.isfinite(scale)
        and _valid_fast(q, k_cache, v_cache, seqlens_k, rel_lut, alibi_slopes, num_splits)
    ):
        _check(q, k_cache, v_cache, seqlens_k, rel_lut, alibi_slopes, scale, num_splits)
        scale = float(scale)
    if not torch.compiler.is_compiling() and (not seqlens_k.is_cuda or debug_checks()):
        _check_seqlens_values(seqlens_k, k_cache.shape[1])
    splits = 0 if num_splits is None else num_splits
    if use_custom_op(q):
        return torch.ops.flasht5.flash_decode(q, k_cache, v_cache, seqlens_k, rel_lut, alibi_slopes, scale, splits)
    if torch.is_grad_enabled() and (
        q.requires_grad
        or k_cache.requires_grad
        or v_cache.requires_grad
        or (rel_lut is not None and rel_lut.requires_grad)
        or (alibi_slopes is not None and alibi_slopes.requires_grad)
    ):
        return _apply(q, k_cache, v_cache, seqlens_k, rel_lut, alibi_slopes, (scale, splits))
    return _forward(q, k_cache, v_cache, seqlens_k, rel_lut, alibi_slopes, scale, splits)

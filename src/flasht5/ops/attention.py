"""Flash attention for T5 in Triton: the relative-position bias inside the kernel, with its gradient.

What it computes
----------------
``out = softmax(scale * q @ k^T + B) @ v`` per (batch, head), where the additive score term ``B`` is any sum of

* the T5 relative-position bias ``rel_table[bucket(key_pos - query_pos), h]`` (``rel_table``: ``(num_buckets, H)``,
  buckets exactly as Hugging Face's ``T5Attention._relative_position_bucket``, bidirectional or causal),
* ALiBi ``-slope[h] * |key_pos - query_pos|`` (``alibi_slopes``: ``(H,)``; exclusive with ``rel_table``),
* an arbitrary additive tensor ``bias`` broadcastable to ``(B, H, Lq, Lk)`` (dense layout only),

plus an optional causal mask. Positions restart at 0 in every sequence; when ``Lq != Lk`` the queries sit
bottom-right (query ``i`` is at position ``i + Lk - Lq``) for the causal mask and the distance alike. A query row
that sees no key (causal with ``Lq > Lk``, an empty key sequence, or an all ``-inf`` bias row) returns 0, and its
gradients are 0 (never NaN). Gradients: ``q``, ``k``, ``v``, ``rel_table`` (in the table's own dtype) and ``bias``
(in the bias's dtype, reduced over its broadcast dims). ``alibi_slopes`` gets no gradient (rejected if it
requires one). No dropout.

Layouts and dtypes
------------------
Dense: q ``(B, Lq, H, D)``, k/v ``(B, Lk, H, D)``; varlen (padding-free packed batches, the flash-attention
convention): q ``(Tq, H, D)``, k/v ``(Tk, H, D)``, int32 ``cu_seqlens_q``/``cu_seqlens_k`` of length
``num_seqs + 1`` (they may differ: packed seq2seq cross-attention); sequences of length 0 and 1 are legal.
Any strides are accepted as long as the head dim is contiguous (stride 1); otherwise the tensor is copied once.
``out`` is a new contiguous tensor shaped like ``q``. q/k/v: fp16 or bf16 on the GPU (fp32 accumulation,
fp32 also accepted there with IEEE fp32 dots, slow); fp32/fp16 under ``TRITON_INTERPRET=1`` on the CPU.
Head dims 16, 32, 64, 128, 256. ``rel_table``/``bias`` may be any float dtype (a fp32 table under bf16 autocast
is the usual case); they are read as fp32.

How the T5 bias is computed exactly, without ``log`` in the kernel
-------------------------------------------------------------------
Triton's ``tl.log`` is not bit-identical to ``torch.log`` and T5's bucket boundaries fall exactly on integers
(distances 16, 32, 64 for 32 buckets / max distance 128), so an in-kernel log would flip buckets. Instead, the
custom op computes, eagerly with Hugging Face's formula verbatim on the same device (cached per configuration;
one host sync the first time), the bucket of every distance in ``[-Re, Re]``, where ``Re <= rel_max_distance``
is the radius beyond which the bucket is constant on both sides (91 for T5's bidirectional 32 buckets / 128, 113
for the causal ones). It gathers a per-head table ``lut[h, r + Re] = rel_table[bucket(r), h]`` (fp32,
``(H, 2Re+1)``) that the kernels read at ``clamp(key_pos - query_pos, -Re, Re)``. The backward reduces ``dS``
into ``d_lut`` in-kernel and the op scatters it to ``d_rel_table`` with ``index_add`` (2Re+1 rows). No
``(Lq, Lk)`` tensor is ever materialised. Tests check the clamped lookup against HF up to 11x the max distance.

Speed structure (FlashAttention-2 with a banded bias)
-----------------------------------------------------
Forward: online softmax in the exp2 domain (``log2(e)`` folded into the scale and the bias), fp32 accumulators,
log-sum-exp stored for the backward. Each program walks its key blocks in *one* software-pipelined loop and
branches per tile at run time: a far tile (every distance ``<= -Re`` or ``>= Re``) adds one per-head scalar and
needs no mask; a near tile (the band ``|d| < Re``, the causal diagonal, the partial last block) does the
per-element lookup and masks. Separate loops per segment (tried first) doubled shared memory, since Triton gives
each pipelined loop its own stage buffers. The per-element lookup is an elementwise inline ``ld.global.nc``: a
``tl.load`` gather anchors a blocked layout and made Triton round-trip *every* score tile through shared memory
(2.5x slower forward on the H200); the inline load keeps the scores in the MMA layout. Without a T5 table the
band is just the causal diagonal, as in FlashAttention-2; ALiBi is computed per element (three flops).
Backward (FlashAttention-2 form): ``delta = rowsum(dO * O)``, one kernel per key block looping over queries for
dK/dV, one kernel per query block looping over keys for dQ, both recomputing P from the LSE; no atomics on
dQ/dK/dV (deterministic). The dQ kernel also reduces the table gradient: far tiles add row sums of ``dS``
(warp-level, like a softmax row max) into two per-program scalars; near tiles skew ``dS`` with ``tl.gather`` so
every relative offset becomes one row or column and add its ``BLOCK_M + BLOCK_N - 1`` diagonal sums to ``d_lut``
with relaxed fp32 atomics (one atomic per score element instead was 2.3x slower end to end). ``d_lut`` and a
broadcast ``d_bias`` are therefore summed in a nondeterministic order (fp32 rounding only).

Tuning, hardware, measured speed
--------------------------------
Tiles come from a static per-architecture table keyed on the head dim, measured on one H200 (sm90) with
``benchmarks/bench_attention.py --sweep/--shape-sweep`` over candidates pre-screened offline (sm90 cubins compiled
without a GPU: no register spills, shared memory within 227 KB). No runtime autotuning: it would cost seconds of
compilation and benchmarking per shape in every process and give run-to-run varying tiles (and numerics). The
sm80 table fits A100's 164 KB and is run on the H200 by the tests, but was not measured on Ampere hardware.
On the H200 (bf16, H=12, 32k tokens/batch, same-run SDPA flash without bias as the ceiling), for L >= 1024:
forward with the T5 table 0.85-1.24x the ceiling (D=64 at L=1024 noisy: one 0.57x reading), forward+backward
with the table gradient 0.61-0.91x, peak memory at L=16k 0.68x the ceiling's; at L=512 every tile is in the
band and the forward drops to 0.26-0.83x. See benchmarks/results/2026-11-29-h200.md. Under the Triton
interpreter one 16x16 configuration is used.

Validation never syncs the GPU on the hot path: shapes, dtypes and devices are checked always; the *values* of
``cu_seqlens`` (start at 0, monotone, end at the token count) are checked on CPU tensors, or on the GPU when
``FLASHT5_DEBUG=1`` (one sync). ``max_seqlen_*`` may be ``None``, in which case it is computed (one sync, and a
graph break under ``torch.compile``); a ``max_seqlen`` smaller than the true maximum silently drops rows (as in
flash-attention), so pass exact values.

Credits: FlashAttention-2 (Dao, 2023) for the algorithm and the backward split; the Triton fused-attention
tutorial (Tillet et al.) for the Triton structure; T5 (Raffel et al., 2020) for the relative-position buckets;
ALiBi (Press et al., 2022) for the linear bias.
"""

import math
import os
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from flasht5.ops._device import check_kernel_device, interpreting
from flasht5.ops.relative_position import relative_position_bucket

__all__ = ["flash_attention", "flash_attention_ref", "relative_position_bucket"]

LOG2E = 1.4426950408889634
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128, 256)


# ----------------------------------------------------------------------------------------------------------------
# T5 buckets (Hugging Face's formula, copied verbatim so ops/ never imports transformers)
# ----------------------------------------------------------------------------------------------------------------


_BUCKET_CACHE: dict[tuple, tuple[torch.Tensor, int]] = {}


def _lut_buckets(
    device: torch.device, bidirectional: bool, num_buckets: int, max_distance: int
) -> tuple[torch.Tensor, int]:
    """Buckets of the distances ``-Re..Re`` (int64, ``(2 Re + 1,)``) and ``Re``, the radius beyond which the bucket
    is constant on both sides (``Re <= max_distance``; 91 for T5's 32 buckets / 128, whose last log bucket starts
    at 91). Computed with HF's formula on ``device``, once per configuration (one host sync, then cached)."""
    key = (str(device), bidirectional, num_buckets, max_distance)
    hit = _BUCKET_CACHE.get(key)
    if hit is None:
        R = max_distance
        r = torch.arange(-11 * R, 11 * R + 1, device=device)
        full = relative_position_bucket(r, bidirectional, num_buckets, max_distance).cpu()
        if bool((full < 0).any() | (full >= num_buckets).any()):  # pragma: no cover - excluded by validation
            raise ValueError("rel_max_distance: degenerate bucket formula for this num_buckets / max distance")
        # the kernel clamps |distance| to Re: exact only where the bucket has saturated on both sides
        left = full[: 10 * R + 1]  # distances -11R .. -R
        right = full[12 * R :]  # distances R .. 11R
        if bool((left != left[0]).any() | (right != right[-1]).any()):  # pragma: no cover
            raise ValueError("rel_max_distance: the bucket formula does not saturate at rel_max_distance")
        mid = full[10 * R : 12 * R + 1]  # distances -R .. R
        lo_change = int((mid != mid[0]).nonzero().min()) if bool((mid != mid[0]).any()) else R
        hi_change = int((mid != mid[-1]).nonzero().max()) if bool((mid != mid[-1]).any()) else R
        Re = max(1, R - lo_change + 1, hi_change + 1 - R)  # buckets constant for d <= -Re and d >= Re
        hit = (mid[R - Re : R + Re + 1].to(device), Re)
        _BUCKET_CACHE[key] = hit
    return hit


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _gather_f32(ptrs, ASM_GATHER: tl.constexpr):
    """Per-element fp32 load of a small table. On the GPU an elementwise inline ``ld.global.nc`` keeps the result
    in the layout of ``ptrs`` (the MMA accumulator layout); a ``tl.load`` would anchor a blocked layout and make
    Triton move every score tile through shared memory (2.5x slower forward, measured on H200)."""
    if ASM_GATHER:
        return tl.inline_asm_elementwise(
            "ld.global.nc.f32 $0, [$1];", "=r,l", [ptrs], dtype=tl.float32, is_pure=True, pack=1
        )
    else:
        return tl.load(ptrs)


@triton.jit
def _bias_and_mask(
    s, mi, nj, off, far_const, lut_base, alibi2, bias_base, sbm, sbn, Lq, Lk, R,
    NEAR: tl.constexpr, CAUSAL: tl.constexpr, HAS_REL: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_BIAS: tl.constexpr, ASM_GATHER: tl.constexpr,
):  # fmt: skip
    """Add the bias terms (log2 units) to scores ``s`` and mask. ``mi``/``nj``: broadcastable query-row / key
    indices inside the sequence, so the same code serves ``(M, N)`` and transposed ``(N, M)`` tiles. Far tiles
    (``NEAR=False``) need no mask and take the T5 bias as one scalar."""
    if HAS_REL:
        if NEAR:
            rel = nj - (mi + off)
            idx = tl.minimum(tl.maximum(rel, -R), R) + R
            s += _gather_f32(lut_base + idx, ASM_GATHER) * 1.4426950408889634
        else:
            s += far_const
    if HAS_ALIBI:
        s -= alibi2 * tl.abs(nj - (mi + off)).to(tl.float32)
    if HAS_BIAS:
        bmask = (mi < Lq) & (nj < Lk)
        s += tl.load(bias_base + mi * sbm + nj * sbn, mask=bmask, other=0.0).to(tl.float32) * 1.4426950408889634
    if NEAR:
        valid = nj < Lk
        if CAUSAL:
            valid = valid & (nj <= mi + off)
        s = tl.where(valid, s, float("-inf"))
    return s


@triton.jit
def _scores(
    s, near, blk_is_first_far, mi, nj, off, c_first, c_second, lut_base, alibi2, bias_base, sbm, sbn, Lq, Lk, R,
    CAUSAL: tl.constexpr, HAS_REL: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_BIAS: tl.constexpr,
    ASM_GATHER: tl.constexpr,
):  # fmt: skip
    """Runtime near/far split of one tile (a single pipelined loop per kernel keeps shared memory to one set of
    stage buffers; separate loops per segment doubled it)."""
    if near:
        s = _bias_and_mask(
            s, mi, nj, off, c_first, lut_base, alibi2, bias_base, sbm, sbn, Lq, Lk, R,
            True, CAUSAL, HAS_REL, HAS_ALIBI, HAS_BIAS, ASM_GATHER,
        )  # fmt: skip
    else:
        s = _bias_and_mask(
            s, mi, nj, off, tl.where(blk_is_first_far, c_first, c_second), lut_base, alibi2, bias_base, sbm, sbn,
            Lq, Lk, R, False, CAUSAL, HAS_REL, HAS_ALIBI, HAS_BIAS, ASM_GATHER,
        )  # fmt: skip
    return s


@triton.jit
def _kv_segments(m0, off, Lk, R, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                 HAS_REL: tl.constexpr):  # fmt: skip
    """Key-block segments for the query block starting at row ``m0``:
    far-left ``[0, n_a)``, near ``[n_a, n_b)``, far-right ``[n_b, n_full)``, masked tail ``[n_full, n_end)``."""
    pos_lo = m0 + off
    pos_hi = m0 + BLOCK_M - 1 + off
    if CAUSAL:
        kv_end = tl.minimum(tl.maximum(pos_hi + 1, 0), Lk)
    else:
        kv_end = Lk
    n_end = tl.cdiv(kv_end, BLOCK_N)
    if HAS_REL:
        # far-left: every distance <= -R  <=>  (n + 1) * BLOCK_N <= pos_lo - R + 1
        n_a = tl.maximum(pos_lo - R + 1, 0) // BLOCK_N
        # far-right from the first block whose smallest distance is >= R
        n_b = tl.cdiv(tl.maximum(pos_hi + R, 0), BLOCK_N)
    elif CAUSAL:
        n_a = tl.maximum(pos_lo + 1, 0) // BLOCK_N
        n_b = n_end
    else:
        n_a = n_end * 0
        n_b = n_end * 0
    n_a = tl.minimum(n_a, n_end)
    n_b = tl.minimum(tl.maximum(n_b, n_a), n_end)
    n_full = tl.maximum(tl.minimum(Lk // BLOCK_N, n_end), n_b)
    return n_a, n_b, n_full, n_end


@triton.jit
def _seq_info(CU_Q, CU_K, b, LQ, LK, VARLEN: tl.constexpr):
    """Sequence ``b``: (first query row, first key row, first LSE row, Lq, Lk). Dense tensors are addressed with
    their batch stride (rows start at 0); the LSE is (H, total query tokens) for both layouts."""
    if VARLEN:
        q0 = tl.load(CU_Q + b)
        k0 = tl.load(CU_K + b)
        Lq = tl.load(CU_Q + b + 1) - q0
        Lk = tl.load(CU_K + b + 1) - k0
        r0 = q0
    else:
        q0 = b * 0
        k0 = b * 0
        Lq = LQ + b * 0
        Lk = LK + b * 0
        r0 = b * LQ
    return q0, k0, r0, Lq, Lk


@triton.jit
def _head_consts(LUT, ALIBI, h, R, HAS_REL: tl.constexpr, HAS_ALIBI: tl.constexpr):
    """Per-head scalars in log2 units: the T5 bias of the far-left / far-right tiles, the ALiBi slope."""
    lut_base = LUT + h * (2 * R + 1)
    c_left = 0.0
    c_right = 0.0
    if HAS_REL:
        c_left = tl.load(lut_base) * 1.4426950408889634
        c_right = tl.load(lut_base + 2 * R) * 1.4426950408889634
    alibi2 = 0.0
    if HAS_ALIBI:
        alibi2 = tl.load(ALIBI + h).to(tl.float32) * 1.4426950408889634
    return lut_base, c_left, c_right, alibi2


# Lengths and counts are not specialised (divisibility by 16 buys nothing for them): one compile serves all shapes.
_NO_SPEC = ["H", "LQ", "LK", "T_LSE", "R", "MAX_Q", "MAX_K", "NUM_BH", "L"]


@triton.jit(do_not_specialize=[n for n in _NO_SPEC if n not in ("MAX_K", "L")])
def _attn_fwd(
    Q, K, V, O, LSE, LUT, ALIBI, BIAS, CU_Q, CU_K,
    sqb, sqm, sqh, skb, skm, skh, svb, svm, svh, sob, som, soh, sbb, sbh, sbm, sbn,
    H, LQ, LK, T_LSE, R, scale2, MAX_Q, NUM_BH,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
    HAS_REL: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_BIAS: tl.constexpr, VARLEN: tl.constexpr,
    DOT_PREC: tl.constexpr, ASM_GATHER: tl.constexpr,
):  # fmt: skip
    # 1-D grid (no 65535 limit on batch * heads for many short packed sequences)
    pid = tl.program_id(0)
    num_m = tl.cdiv(MAX_Q, BLOCK_M)
    if CAUSAL:  # heavy (late) query blocks first: better tail balance
        pid_m = num_m - 1 - pid // NUM_BH
        bh = pid % NUM_BH
    else:
        pid_m = pid % num_m
        bh = pid // num_m
    b = bh // H
    h = bh % H
    q0, k0, r0, Lq, Lk = _seq_info(CU_Q, CU_K, b, LQ, LK, VARLEN)
    m0 = pid_m * BLOCK_M
    if m0 >= Lq:
        return
    off = Lk - Lq
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q_base = Q + b.to(tl.int64) * sqb + q0.to(tl.int64) * sqm + h * sqh
    k_base = K + b.to(tl.int64) * skb + k0.to(tl.int64) * skm + h * skh
    v_base = V + b.to(tl.int64) * svb + k0.to(tl.int64) * svm + h * svh
    q = tl.load(q_base + offs_m[:, None] * sqm + offs_d[None, :], mask=offs_m[:, None] < Lq, other=0.0)
    lut_base, c_left, c_right, alibi2 = _head_consts(LUT, ALIBI, h, R, HAS_REL, HAS_ALIBI)
    bias_base = BIAS + b.to(tl.int64) * sbb + h.to(tl.int64) * sbh

    n_a, n_b, n_full, n_end = _kv_segments(m0, off, Lk, R, BLOCK_M, BLOCK_N, CAUSAL, HAS_REL)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    for start_n in range(0, n_end * BLOCK_N, BLOCK_N):
        blk = start_n // BLOCK_N
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kmask = offs_n[:, None] < Lk
        k = tl.load(k_base + offs_n[:, None] * skm + offs_d[None, :], mask=kmask, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * svm + offs_d[None, :], mask=kmask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * scale2  # (BLOCK_M, BLOCK_N), log2 units
        near = ((blk >= n_a) & (blk < n_b)) | (blk >= n_full)
        s = _scores(
            s, near, blk < n_a, offs_m[:, None], offs_n[None, :], off, c_left, c_right, lut_base, alibi2,
            bias_base, sbm, sbn, Lq, Lk, R, CAUSAL, HAS_REL, HAS_ALIBI, HAS_BIAS, ASM_GATHER,
        )  # fmt: skip
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen only -inf so far
        p = tl.math.exp2(s - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
        m_i = m_new

    empty = l_i == 0.0  # no visible key: output 0, LSE +inf (so the backward's P is exactly 0)
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("inf"), m_i + tl.math.log2(tl.where(empty, 1.0, l_i)))
    o_base = O + b.to(tl.int64) * sob + q0.to(tl.int64) * som + h * soh
    rmask = offs_m < Lq
    tl.store(o_base + offs_m[:, None] * som + offs_d[None, :], out.to(O.dtype.element_ty), mask=rmask[:, None])
    tl.store(LSE + h * T_LSE + r0 + offs_m, lse, mask=rmask)


@triton.jit(do_not_specialize=["L", "T_LSE"])
def _bwd_delta(
    O, DO, DELTA, sob, som, soh, sdob, sdom, sdoh, L, T_LSE,
    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """delta[h, b * L + row] = sum_d dO * O (FlashAttention-2 preprocessing); varlen: one batch of T rows."""
    pid = tl.program_id(0)
    b = tl.program_id(1)
    h = tl.program_id(2)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM)
    mask = offs[:, None] < L
    o = tl.load(O + b.to(tl.int64) * sob + offs[:, None].to(tl.int64) * som + h * soh + offs_d[None, :], mask=mask,
                other=0.0)  # fmt: skip
    do = tl.load(DO + b.to(tl.int64) * sdob + offs[:, None].to(tl.int64) * sdom + h * sdoh + offs_d[None, :],
                 mask=mask, other=0.0)  # fmt: skip
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + h * T_LSE + b * L + offs, delta, mask=offs < L)


@triton.jit(do_not_specialize=[n for n in _NO_SPEC if n not in ("MAX_Q", "NUM_BH", "L")])
def _attn_bwd_dkdv(
    Q, K, V, DO, DK, DV, LSE, DELTA, LUT, ALIBI, BIAS, CU_Q, CU_K,
    sqb, sqm, sqh, skb, skm, skh, svb, svm, svh, sdob, sdom, sdoh, sdkb, sdkm, sdkh, sdvb, sdvm, sdvh,
    sbb, sbh, sbm, sbn,
    H, LQ, LK, T_LSE, R, scale2, scale, MAX_K,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
    HAS_REL: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_BIAS: tl.constexpr, VARLEN: tl.constexpr,
    DOT_PREC: tl.constexpr, ASM_GATHER: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    num_n = tl.cdiv(MAX_K, BLOCK_N)
    pid_n = pid % num_n
    bh = pid // num_n
    b = bh // H
    h = bh % H
    q0, k0, r0, Lq, Lk = _seq_info(CU_Q, CU_K, b, LQ, LK, VARLEN)
    n0 = pid_n * BLOCK_N
    if n0 >= Lk:
        return
    off = Lk - Lq
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    kmask = offs_n[:, None] < Lk
    k_base = K + b.to(tl.int64) * skb + k0.to(tl.int64) * skm + h * skh
    v_base = V + b.to(tl.int64) * svb + k0.to(tl.int64) * svm + h * svh
    k = tl.load(k_base + offs_n[:, None] * skm + offs_d[None, :], mask=kmask, other=0.0)
    v = tl.load(v_base + offs_n[:, None] * svm + offs_d[None, :], mask=kmask, other=0.0)
    q_base = Q + b.to(tl.int64) * sqb + q0.to(tl.int64) * sqm + h * sqh
    do_base = DO + b.to(tl.int64) * sdob + q0.to(tl.int64) * sdom + h * sdoh
    lse_base = LSE + h * T_LSE + r0
    delta_base = DELTA + h * T_LSE + r0
    lut_base, c_left, c_right, alibi2 = _head_consts(LUT, ALIBI, h, R, HAS_REL, HAS_ALIBI)
    bias_base = BIAS + b.to(tl.int64) * sbb + h.to(tl.int64) * sbh

    # Query-block segments for this key block: far-right [m_start, m_a) (every distance >= R), near [m_a, m_b),
    # far-left [m_b, m_full) (every distance <= -R, or fully visible when causal), masked tail [m_full, m_end).
    m_end = tl.cdiv(Lq, BLOCK_M)
    if CAUSAL:
        m_start = tl.minimum(tl.maximum(n0 - off, 0), Lq) // BLOCK_M
    else:
        m_start = m_end * 0
    if HAS_REL:
        m_a = tl.maximum(n0 - R - off + 1, 0) // BLOCK_M
        m_b = tl.cdiv(tl.maximum(n0 + BLOCK_N - 1 + R - off, 0), BLOCK_M)
    elif CAUSAL:
        m_a = m_start
        m_b = tl.cdiv(tl.maximum(n0 + BLOCK_N - 1 - off, 0), BLOCK_M)
    else:
        m_a = m_start
        m_b = m_start
    m_a = tl.minimum(tl.maximum(m_a, m_start), m_end)
    m_b = tl.minimum(tl.maximum(m_b, m_a), m_end)
    m_full = tl.maximum(tl.minimum(Lq // BLOCK_M, m_end), m_b)

    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    for start_m in range(m_start * BLOCK_M, m_end * BLOCK_M, BLOCK_M):
        blk = start_m // BLOCK_M
        offs_m = start_m + tl.arange(0, BLOCK_M)
        rmask = offs_m < Lq
        q = tl.load(q_base + offs_m[:, None] * sqm + offs_d[None, :], mask=rmask[:, None], other=0.0)
        do = tl.load(do_base + offs_m[:, None] * sdom + offs_d[None, :], mask=rmask[:, None], other=0.0)
        lse = tl.load(lse_base + offs_m, mask=rmask, other=float("inf"))  # +inf: P = 0 for padding rows
        delta = tl.load(delta_base + offs_m, mask=rmask, other=0.0)
        st = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * scale2  # (BLOCK_N, BLOCK_M): S^T, log2 units
        near = ((blk >= m_a) & (blk < m_b)) | (blk >= m_full)
        st = _scores(
            st, near, blk < m_a, offs_m[None, :], offs_n[:, None], off, c_right, c_left, lut_base, alibi2,
            bias_base, sbm, sbn, Lq, Lk, R, CAUSAL, HAS_REL, HAS_ALIBI, HAS_BIAS, ASM_GATHER,
        )  # fmt: skip
        pt = tl.math.exp2(st - lse[None, :])
        dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=DOT_PREC)
        dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
        dst = pt * (dpt - delta[None, :])
        dk = tl.dot(dst.to(q.dtype), q, dk, input_precision=DOT_PREC)
    dk *= scale
    dk_base = DK + b.to(tl.int64) * sdkb + k0.to(tl.int64) * sdkm + h * sdkh
    dv_base = DV + b.to(tl.int64) * sdvb + k0.to(tl.int64) * sdvm + h * sdvh
    tl.store(dk_base + offs_n[:, None] * sdkm + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=kmask)
    tl.store(dv_base + offs_n[:, None] * sdvm + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=kmask)


@triton.jit
def _diag_sums_to_lut(ds, c, R, dlut_base, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      DIAG_GATHER: tl.constexpr, mi, nj, off):  # fmt: skip
    """Add ``ds[i, j]`` into ``d_lut[clamp(c + j - i, -R, R) + R]`` for a near tile.

    With ``DIAG_GATHER`` the tile is skewed by ``tl.gather`` (a shared-memory shuffle) so every diagonal becomes a
    row (or column); its sum goes out as one atomic per diagonal. Otherwise one atomic per element (fallback)."""
    if DIAG_GATHER:
        if BLOCK_M >= BLOCK_N:
            W: tl.constexpr = 2 * BLOCK_M  # next power of two >= BLOCK_M + BLOCK_N - 1
            t = tl.arange(0, W)
            jj = tl.arange(0, BLOCK_N)
            ii = jj[None, :] - t[:, None] + (BLOCK_M - 1)  # (W, BLOCK_N): row of diagonal t in column j
            ok = (ii >= 0) & (ii < BLOCK_M)
            g = tl.gather(ds, tl.where(ok, ii, 0), 0)
            d = tl.sum(tl.where(ok, g, 0.0), 1)  # (W,)
        else:
            W: tl.constexpr = 2 * BLOCK_N
            t = tl.arange(0, W)
            ii = tl.arange(0, BLOCK_M)
            jj = t[None, :] + ii[:, None] - (BLOCK_M - 1)  # (BLOCK_M, W): column of diagonal t in row i
            ok = (jj >= 0) & (jj < BLOCK_N)
            g = tl.gather(ds, tl.where(ok, jj, 0), 1)
            d = tl.sum(tl.where(ok, g, 0.0), 0)  # (W,)
        rel = c + t - (BLOCK_M - 1)
        idx = tl.minimum(tl.maximum(rel, -R), R) + R
        tl.atomic_add(dlut_base + idx, d, mask=t < BLOCK_M + BLOCK_N - 1, sem="relaxed")
    else:
        rel = nj - (mi + off)
        idx = tl.minimum(tl.maximum(rel, -R), R) + R
        tl.atomic_add(dlut_base + idx, ds, sem="relaxed")


@triton.jit(do_not_specialize=[n for n in _NO_SPEC if n not in ("MAX_K", "L")])
def _attn_bwd_dq(
    Q, K, V, DO, DQ, LSE, DELTA, LUT, DLUT, ALIBI, BIAS, DBIAS, CU_Q, CU_K,
    sqb, sqm, sqh, skb, skm, skh, svb, svm, svh, sdob, sdom, sdoh, sdqb, sdqm, sdqh,
    sbb, sbh, sbm, sbn, sdbb, sdbh, sdbm, sdbn,
    H, LQ, LK, T_LSE, R, scale2, scale, MAX_Q, NUM_BH,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
    HAS_REL: tl.constexpr, REL_GRAD: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_BIAS: tl.constexpr,
    BIAS_GRAD: tl.constexpr, DB_BM: tl.constexpr, DB_BN: tl.constexpr, DB_ATOMIC: tl.constexpr,
    VARLEN: tl.constexpr, DIAG_GATHER: tl.constexpr, DOT_PREC: tl.constexpr, ASM_GATHER: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    num_m = tl.cdiv(MAX_Q, BLOCK_M)
    if CAUSAL:
        pid_m = num_m - 1 - pid // NUM_BH
        bh = pid % NUM_BH
    else:
        pid_m = pid % num_m
        bh = pid // num_m
    b = bh // H
    h = bh % H
    q0, k0, r0, Lq, Lk = _seq_info(CU_Q, CU_K, b, LQ, LK, VARLEN)
    m0 = pid_m * BLOCK_M
    if m0 >= Lq:
        return
    off = Lk - Lq
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    rmask = offs_m < Lq
    q_base = Q + b.to(tl.int64) * sqb + q0.to(tl.int64) * sqm + h * sqh
    do_base = DO + b.to(tl.int64) * sdob + q0.to(tl.int64) * sdom + h * sdoh
    q = tl.load(q_base + offs_m[:, None] * sqm + offs_d[None, :], mask=rmask[:, None], other=0.0)
    do = tl.load(do_base + offs_m[:, None] * sdom + offs_d[None, :], mask=rmask[:, None], other=0.0)
    lse = tl.load(LSE + h * T_LSE + r0 + offs_m, mask=rmask, other=float("inf"))
    delta = tl.load(DELTA + h * T_LSE + r0 + offs_m, mask=rmask, other=0.0)
    k_base = K + b.to(tl.int64) * skb + k0.to(tl.int64) * skm + h * skh
    v_base = V + b.to(tl.int64) * svb + k0.to(tl.int64) * svm + h * svh
    lut_base, c_left, c_right, alibi2 = _head_consts(LUT, ALIBI, h, R, HAS_REL, HAS_ALIBI)
    dlut_base = DLUT + h * (2 * R + 1)
    bias_base = BIAS + b.to(tl.int64) * sbb + h.to(tl.int64) * sbh
    db_base = DBIAS + b.to(tl.int64) * sdbb + h.to(tl.int64) * sdbh

    n_a, n_b, n_full, n_end = _kv_segments(m0, off, Lk, R, BLOCK_M, BLOCK_N, CAUSAL, HAS_REL)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    dl_left = tl.zeros([BLOCK_M], dtype=tl.float32)
    dl_right = tl.zeros([BLOCK_M], dtype=tl.float32)
    db_rows = tl.zeros([BLOCK_M], dtype=tl.float32)
    for start_n in range(0, n_end * BLOCK_N, BLOCK_N):
        blk = start_n // BLOCK_N
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kmask = offs_n[:, None] < Lk
        k = tl.load(k_base + offs_n[:, None] * skm + offs_d[None, :], mask=kmask, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * svm + offs_d[None, :], mask=kmask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * scale2
        near = ((blk >= n_a) & (blk < n_b)) | (blk >= n_full)
        s = _scores(
            s, near, blk < n_a, offs_m[:, None], offs_n[None, :], off, c_left, c_right, lut_base, alibi2,
            bias_base, sbm, sbn, Lq, Lk, R, CAUSAL, HAS_REL, HAS_ALIBI, HAS_BIAS, ASM_GATHER,
        )  # fmt: skip
        p = tl.math.exp2(s - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        ds = p * (dp - delta[:, None])  # dL/dS in natural units (S = scale * q k^T + bias)
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PREC)
        if REL_GRAD:
            if near:
                c = start_n - (m0 + off)  # distance of tile element (0, 0)
                _diag_sums_to_lut(
                    ds, c, R, dlut_base, BLOCK_M, BLOCK_N, DIAG_GATHER, offs_m[:, None], offs_n[None, :], off
                )
            else:  # the whole far tile shares the bucket of distance -R (left) or +R (right): row sums suffice
                rs = tl.sum(ds, 1)
                dl_left += tl.where(blk < n_a, rs, 0.0)
                dl_right += tl.where(blk < n_a, 0.0, rs)
        if BIAS_GRAD:
            if DB_BN:
                db_rows += tl.sum(ds, 1)
            elif DB_BM:
                tl.atomic_add(db_base + offs_n * sdbn, tl.sum(ds, 0), mask=offs_n < Lk, sem="relaxed")
            else:
                db_ptrs = db_base + offs_m[:, None] * sdbm + offs_n[None, :] * sdbn
                db_mask = (offs_m[:, None] < Lq) & (offs_n[None, :] < Lk)
                if DB_ATOMIC:
                    tl.atomic_add(db_ptrs, ds, mask=db_mask, sem="relaxed")
                else:
                    tl.store(db_ptrs, ds, mask=db_mask)
    dq *= scale
    dq_base = DQ + b.to(tl.int64) * sdqb + q0.to(tl.int64) * sdqm + h * sdqh
    tl.store(dq_base + offs_m[:, None] * sdqm + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=rmask[:, None])
    if REL_GRAD:
        # far tiles: two atomics per program
        tl.atomic_add(dlut_base, tl.sum(dl_left, 0), sem="relaxed")
        if not CAUSAL:
            tl.atomic_add(dlut_base + 2 * R, tl.sum(dl_right, 0), sem="relaxed")
    if BIAS_GRAD and DB_BN:  # bias broadcast over keys: row sums were accumulated over the whole key loop
        if DB_BM:
            tl.atomic_add(db_base, tl.sum(db_rows, 0), sem="relaxed")
        elif DB_ATOMIC:
            tl.atomic_add(db_base + offs_m * sdbm, db_rows, mask=rmask, sem="relaxed")
        else:
            tl.store(db_base + offs_m * sdbm, db_rows, mask=rmask)


# ----------------------------------------------------------------------------------------------------------------
# Launch configuration
# ----------------------------------------------------------------------------------------------------------------


class _Cfg(NamedTuple):
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


# (kernel, head_dim) -> config. fwd: BLOCK_M queries owned, BLOCK_N keys streamed; dkdv: BLOCK_N keys owned,
# BLOCK_M queries streamed; dq: BLOCK_M queries owned, BLOCK_N keys streamed. D=64/128: measured on one H200
# (bench_attention.py --sweep / --shape-sweep; candidates pre-screened offline for spills and shared memory);
# D=16/32 reuse D=64's, D=256 chosen to fit (GPU-tested, not tuned).
_SM90: dict[tuple[str, int], _Cfg] = {
    ("fwd", 16): _Cfg(64, 64, 4, 3),
    ("fwd", 32): _Cfg(64, 64, 4, 3),
    ("fwd", 64): _Cfg(64, 64, 4, 3),
    ("fwd", 128): _Cfg(64, 64, 4, 3),
    ("fwd", 256): _Cfg(64, 64, 8, 2),
    ("dkdv", 16): _Cfg(64, 64, 4, 3),
    ("dkdv", 32): _Cfg(64, 64, 4, 3),
    ("dkdv", 64): _Cfg(64, 64, 4, 3),
    ("dkdv", 128): _Cfg(32, 64, 4, 4),
    ("dkdv", 256): _Cfg(32, 64, 8, 2),
    ("dq", 16): _Cfg(64, 32, 4, 4),
    ("dq", 32): _Cfg(64, 32, 4, 4),
    ("dq", 64): _Cfg(64, 32, 4, 4),
    ("dq", 128): _Cfg(64, 32, 4, 3),
    ("dq", 256): _Cfg(64, 32, 8, 2),
}
# Ampere (164 KB shared memory on A100; 100 KB on sm86/89 -> these small tiles fit both).
_SM80: dict[tuple[str, int], _Cfg] = {
    ("fwd", 16): _Cfg(128, 64, 8, 2),
    ("fwd", 32): _Cfg(128, 64, 8, 2),
    ("fwd", 64): _Cfg(128, 64, 8, 2),
    ("fwd", 128): _Cfg(128, 32, 4, 2),
    ("fwd", 256): _Cfg(64, 32, 4, 2),
    ("dkdv", 16): _Cfg(32, 64, 4, 2),
    ("dkdv", 32): _Cfg(32, 64, 4, 2),
    ("dkdv", 64): _Cfg(32, 64, 4, 2),
    ("dkdv", 128): _Cfg(32, 64, 4, 2),
    ("dkdv", 256): _Cfg(16, 32, 4, 1),
    ("dq", 16): _Cfg(64, 32, 4, 2),
    ("dq", 32): _Cfg(64, 32, 4, 2),
    ("dq", 64): _Cfg(64, 32, 4, 2),
    ("dq", 128): _Cfg(64, 32, 4, 2),
    ("dq", 256): _Cfg(32, 32, 4, 1),
}
_INTERPRET_CFG = _Cfg(16, 16, 4, 1)
# Tests may force configurations: {"fwd": _Cfg, "dkdv": _Cfg, "dq": _Cfg} or {"arch": 8} to use the sm80 table.
_FORCE: dict[str, object] = {}


def _arch(device: torch.device) -> int:
    if "arch" in _FORCE:
        return int(_FORCE["arch"])  # type: ignore[arg-type]
    return torch.cuda.get_device_capability(device)[0]


def _config(kernel: str, head_dim: int, device: torch.device, dtype: torch.dtype) -> _Cfg:
    if kernel in _FORCE:
        return _FORCE[kernel]  # type: ignore[return-value]
    if interpreting():
        return _INTERPRET_CFG
    if dtype == torch.float32:  # 4-byte tiles: the small Ampere tiles, single-stage at D=256 (shared memory)
        cfg = _SM80[(kernel, head_dim)]
        return cfg._replace(num_stages=1) if head_dim == 256 else cfg
    table = _SM90 if _arch(device) >= 9 else _SM80
    return table[(kernel, head_dim)]


# ----------------------------------------------------------------------------------------------------------------
# Launchers (plain functions on tensors; the custom ops below wrap them)
# ----------------------------------------------------------------------------------------------------------------


def _rowview(x: torch.Tensor) -> torch.Tensor:
    """The kernels need a unit head-dim stride; any other strides are passed through (copy only if needed)."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _strides(x: torch.Tensor, varlen: bool) -> tuple[int, int, int]:
    """(batch, row, head) strides of a (B, L, H, D) or (T, H, D) tensor; varlen has batch stride 0."""
    if varlen:
        return 0, x.stride(0), x.stride(1)
    return x.stride(0), x.stride(1), x.stride(2)


class _Geo(NamedTuple):
    varlen: bool
    nb: int  # batch size or number of sequences
    H: int
    D: int
    Lq: int  # dense lengths (0 for varlen)
    Lk: int
    Tq: int  # total query tokens (columns of the LSE)
    max_q: int
    max_k: int


def _geometry(q: torch.Tensor, k: torch.Tensor, cu_q, max_q: int, max_k: int) -> _Geo:
    if cu_q is not None:
        Tq, H, D = q.shape
        return _Geo(True, cu_q.numel() - 1, H, D, 0, 0, Tq, max_q, max_k)
    B, Lq, H, D = q.shape
    return _Geo(False, B, H, D, Lq, k.shape[1], B * Lq, Lq, k.shape[1])


def _bias4(bias: torch.Tensor | None) -> torch.Tensor | None:
    """View ``bias`` as 4-D (leading size-1 dims)."""
    if bias is None or bias.dim() == 4:
        return bias
    return bias.reshape((1,) * (4 - bias.dim()) + tuple(bias.shape))


def _bcast_strides(t: torch.Tensor | None) -> tuple[int, int, int, int]:
    """Strides of a 4-D tensor read as broadcast to (B, H, Lq, Lk): size-1 dims get stride 0."""
    if t is None:
        return (0, 0, 0, 0)
    return tuple(0 if n == 1 else s for n, s in zip(t.shape, t.stride()))  # type: ignore[return-value]


def _build_lut(rel_table: torch.Tensor, bidirectional: bool, R: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(H, 2Re+1) fp32 lookup of the T5 bias by distance -Re..Re, the buckets it was gathered with, and Re."""
    buckets, Re = _lut_buckets(rel_table.device, bidirectional, rel_table.shape[0], R)
    lut = rel_table[buckets].t().to(torch.float32).contiguous()  # (2Re+1, H) -> (H, 2Re+1)
    return lut, buckets, Re


def _launch(name: str, fn, x: torch.Tensor, n_programs, args: dict) -> None:
    """Launch ``fn`` with the table config of ``x``'s head dim / device / dtype; ``n_programs(BLOCK_M, BLOCK_N)``
    sizes the 1-D grid."""
    cfg = _config(name, x.shape[-1], x.device, x.dtype)
    n = n_programs(cfg.block_m, cfg.block_n)
    if n > 0:
        fn[(n,)](**args, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _fwd_impl(q, k, v, rel_table, alibi, bias, cu_q, cu_k, max_q, max_k, scale, causal, rel_bidir, R):
    varlen = cu_q is not None
    g = _geometry(q, k, cu_q, max_q, max_k)
    q, k, v = _rowview(q), _rowview(k), _rowview(v)
    out = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    lse = torch.empty((g.H, g.Tq), device=q.device, dtype=torch.float32)
    if g.Tq == 0 or g.H == 0:
        return out, lse
    lut, _, R = _build_lut(rel_table.detach(), rel_bidir, R) if rel_table is not None else (None, None, R)
    bias4 = _bias4(bias)
    sb = _bcast_strides(bias4)
    (sqb, sqm, sqh), (skb, skm, skh), (svb, svm, svh), (sob, som, soh) = (_strides(x, varlen) for x in (q, k, v, out))
    dummy = lse
    args = dict(
        Q=q, K=k, V=v, O=out, LSE=lse, LUT=lut if lut is not None else dummy,
        ALIBI=alibi if alibi is not None else dummy, BIAS=bias4 if bias4 is not None else dummy,
        CU_Q=cu_q if varlen else dummy, CU_K=cu_k if varlen else dummy,
        sqb=sqb, sqm=sqm, sqh=sqh, skb=skb, skm=skm, skh=skh, svb=svb, svm=svm, svh=svh, sob=sob, som=som, soh=soh,
        sbb=sb[0], sbh=sb[1], sbm=sb[2], sbn=sb[3],
        H=g.H, LQ=g.Lq, LK=g.Lk, T_LSE=g.Tq, R=R, scale2=scale * LOG2E, MAX_Q=g.max_q, NUM_BH=g.nb * g.H,
        HEAD_DIM=g.D, CAUSAL=causal, HAS_REL=lut is not None, HAS_ALIBI=alibi is not None,
        HAS_BIAS=bias4 is not None, VARLEN=varlen, DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32",
        ASM_GATHER=not interpreting(),
    )  # fmt: skip
    _launch("fwd", _attn_fwd, q, lambda bm, bn: triton.cdiv(g.max_q, bm) * g.nb * g.H, args)
    return out, lse


def _bwd_impl(
    dout, q, k, v, out, lse, rel_table, alibi, bias, cu_q, cu_k, max_q, max_k, scale, causal, rel_bidir, R,
    need_dtable, need_dbias,
):  # fmt: skip
    varlen = cu_q is not None
    g = _geometry(q, k, cu_q, max_q, max_k)
    # no kernel runs when either side is empty: the (possibly non-empty) other side's gradients are then 0
    alloc = torch.zeros if q.numel() == 0 or k.numel() == 0 else torch.empty
    dq, dk, dv = (alloc(x.shape, device=x.device, dtype=x.dtype) for x in (q, k, v))
    rel_grad = rel_table is not None and need_dtable
    bias_grad = bias is not None and need_dbias
    dtable = torch.zeros(rel_table.shape, device=q.device, dtype=rel_table.dtype) if rel_grad else q.new_empty(0)
    dbias = torch.zeros(bias.shape, device=q.device, dtype=bias.dtype) if bias_grad else q.new_empty(0)
    if q.numel() == 0 or k.numel() == 0:
        return dq, dk, dv, dtable, dbias
    q, k, v, out, dout = (_rowview(x) for x in (q, k, v, out, dout))
    (sqb, sqm, sqh), (skb, skm, skh), (svb, svm, svh) = (_strides(x, varlen) for x in (q, k, v))
    (sob, som, soh), (sdob, sdom, sdoh) = _strides(out, varlen), _strides(dout, varlen)
    (sdqb, sdqm, sdqh), (sdkb, sdkm, sdkh), (sdvb, sdvm, sdvh) = (_strides(x, varlen) for x in (dq, dk, dv))
    dot_prec = "ieee" if q.dtype == torch.float32 else "tf32"

    # FlashAttention-2 preprocessing: delta = rowsum(dO * O), laid out like the LSE
    delta = torch.empty_like(lse)
    blk = 16 if interpreting() else 64
    rows, nbat = (g.Tq, 1) if varlen else (g.Lq, g.nb)
    _bwd_delta[(triton.cdiv(rows, blk), nbat, g.H)](
        out, dout, delta, sob, som, soh, sdob, sdom, sdoh, rows, g.Tq, HEAD_DIM=g.D, BLOCK=blk, num_warps=4,
    )  # fmt: skip

    lut, buckets, R = _build_lut(rel_table.detach(), rel_bidir, R) if rel_table is not None else (None, None, R)
    unused = torch.zeros(1, device=q.device, dtype=torch.float32)  # placeholder for DLUT/DBIAS when not needed
    dlut = torch.zeros_like(lut) if rel_grad else unused
    bias4 = _bias4(bias)
    sb = _bcast_strides(bias4)
    if bias_grad:
        dbias32 = torch.zeros(bias4.shape, device=q.device, dtype=torch.float32)
        sdb = _bcast_strides(dbias32)
        bc = [n == 1 and full > 1 for n, full in zip(bias4.shape, (g.nb, g.H, g.Lq, g.Lk))]
        db_atomic, db_bm, db_bn = bc[0] or bc[1], bc[2], bc[3]
    else:
        dbias32, sdb, db_atomic, db_bm, db_bn = unused, (0, 0, 0, 0), False, False, False
    dummy = lse
    common = dict(
        Q=q, K=k, V=v, DO=dout, LSE=lse, DELTA=delta, LUT=lut if lut is not None else dummy,
        ALIBI=alibi if alibi is not None else dummy, BIAS=bias4 if bias4 is not None else dummy,
        CU_Q=cu_q if varlen else dummy, CU_K=cu_k if varlen else dummy,
        sqb=sqb, sqm=sqm, sqh=sqh, skb=skb, skm=skm, skh=skh, svb=svb, svm=svm, svh=svh,
        sdob=sdob, sdom=sdom, sdoh=sdoh, sbb=sb[0], sbh=sb[1], sbm=sb[2], sbn=sb[3],
        H=g.H, LQ=g.Lq, LK=g.Lk, T_LSE=g.Tq, R=R, scale2=scale * LOG2E, scale=scale,
        HEAD_DIM=g.D, CAUSAL=causal, HAS_REL=lut is not None, HAS_ALIBI=alibi is not None,
        HAS_BIAS=bias4 is not None, VARLEN=varlen, DOT_PREC=dot_prec, ASM_GATHER=not interpreting(),
    )  # fmt: skip
    # dK, dV: one program per key block, looping over queries
    dkdv_args = dict(
        DK=dk, DV=dv, sdkb=sdkb, sdkm=sdkm, sdkh=sdkh, sdvb=sdvb, sdvm=sdvm, sdvh=sdvh, MAX_K=g.max_k, **common
    )
    _launch("dkdv", _attn_bwd_dkdv, q, lambda bm, bn: triton.cdiv(g.max_k, bn) * g.nb * g.H, dkdv_args)
    # dQ (+ d_lut, d_bias): one program per query block, looping over keys
    dq_args = dict(
        DQ=dq, DLUT=dlut, DBIAS=dbias32, sdqb=sdqb, sdqm=sdqm, sdqh=sdqh,
        sdbb=sdb[0], sdbh=sdb[1], sdbm=sdb[2], sdbn=sdb[3], MAX_Q=g.max_q, NUM_BH=g.nb * g.H,
        REL_GRAD=rel_grad, BIAS_GRAD=bias_grad, DB_BM=db_bm, DB_BN=db_bn, DB_ATOMIC=db_atomic,
        DIAG_GATHER=bool(_FORCE.get("diag_gather", True)), **common,
    )  # fmt: skip
    _launch("dq", _attn_bwd_dq, q, lambda bm, bn: triton.cdiv(g.max_q, bm) * g.nb * g.H, dq_args)

    if rel_grad:
        # d_lut (H, 2R+1) -> d_rel_table (num_buckets, H): scatter-add of 2R+1 rows, returned in the table's dtype
        dt32 = torch.zeros(rel_table.shape, device=q.device, dtype=torch.float32)
        dt32.index_add_(0, buckets, dlut.t())
        dtable = dt32.to(rel_table.dtype)
    if bias_grad:
        dbias = dbias32.to(bias.dtype).reshape(bias.shape)
    return dq, dk, dv, dtable, dbias


# ----------------------------------------------------------------------------------------------------------------
# torch.library custom ops (opaque to torch.compile, with fake implementations) and autograd
# ----------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("flasht5::flash_attn_fwd", mutates_args=())
def _flash_attn_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rel_table: Optional[torch.Tensor],  # noqa: UP045 (torch.library schema inference)
    alibi_slopes: Optional[torch.Tensor],  # noqa: UP045 (torch.library schema inference)
    bias: Optional[torch.Tensor],  # noqa: UP045 (torch.library schema inference)
    cu_seqlens_q: Optional[torch.Tensor],  # noqa: UP045 (torch.library schema inference)
    cu_seqlens_k: Optional[torch.Tensor],  # noqa: UP045 (torch.library schema inference)
    max_seqlen_q: int,
    max_seqlen_k: int,
    scale: float,
    causal: bool,
    rel_bidirectional: bool,
    rel_max_distance: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _fwd_impl(
        q, k, v, rel_table, alibi_slopes, bias, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
        causal, rel_bidirectional, rel_max_distance,
    )  # fmt: skip


@_flash_attn_fwd.register_fake
def _flash_attn_fwd_fake(
    q, k, v, rel_table, alibi_slopes, bias, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, causal,
    rel_bidirectional, rel_max_distance,
):  # fmt: skip
    tq = q.shape[0] if cu_seqlens_q is not None else q.shape[0] * q.shape[1]
    return q.new_empty(q.shape), q.new_empty((q.shape[-2], tq), dtype=torch.float32)


@torch.library.custom_op("flasht5::flash_attn_bwd", mutates_args=())
def _flash_attn_bwd(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    rel_table: Optional[torch.Tensor],  # noqa: UP045 (torch.library schema inference)
    alibi_slopes: Optional[torch.Tensor],  # noqa: UP045 (torch.library schema inference)
    bias: Optional[torch.Tensor],  # noqa: UP045 (torch.library schema inference)
    cu_seqlens_q: Optional[torch.Tensor],  # noqa: UP045 (torch.library schema inference)
    cu_seqlens_k: Optional[torch.Tensor],  # noqa: UP045 (torch.library schema inference)
    max_seqlen_q: int,
    max_seqlen_k: int,
    scale: float,
    causal: bool,
    rel_bidirectional: bool,
    rel_max_distance: int,
    need_dtable: bool,
    need_dbias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _bwd_impl(
        dout, q, k, v, out, lse, rel_table, alibi_slopes, bias, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
        max_seqlen_k, scale, causal, rel_bidirectional, rel_max_distance, need_dtable, need_dbias,
    )  # fmt: skip


@_flash_attn_bwd.register_fake
def _flash_attn_bwd_fake(
    dout, q, k, v, out, lse, rel_table, alibi_slopes, bias, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
    scale, causal, rel_bidirectional, rel_max_distance, need_dtable, need_dbias,
):  # fmt: skip
    dtable = rel_table.new_empty(rel_table.shape) if rel_table is not None and need_dtable else q.new_empty(0)
    dbias = bias.new_empty(bias.shape) if bias is not None and need_dbias else q.new_empty(0)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dtable, dbias


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, rel_table, alibi, bias, cu_q, cu_k, max_q, max_k, scale, causal, rel_bidir, R = inputs
    out, lse = output
    ctx.set_materialize_grads(False)  # the LSE is never differentiated: no zero-filled (H, T) grad per backward
    ctx.save_for_backward(q, k, v, out, lse, rel_table, alibi, bias, cu_q, cu_k)
    ctx.params = (max_q, max_k, scale, causal, rel_bidir, R)


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, rel_table, alibi, bias, cu_q, cu_k = ctx.saved_tensors
    max_q, max_k, scale, causal, rel_bidir, R = ctx.params
    need_dtable = rel_table is not None and ctx.needs_input_grad[3]
    need_dbias = bias is not None and ctx.needs_input_grad[5]
    if dout is None:  # only the LSE was used downstream (not reachable through flash_attention)
        dout = torch.zeros_like(out)
    dq, dk, dv, dtable, dbias = _flash_attn_bwd(
        dout, q, k, v, out, lse, rel_table, alibi, bias, cu_q, cu_k, max_q, max_k, scale, causal, rel_bidir, R,
        need_dtable, need_dbias,
    )  # fmt: skip
    return (
        dq, dk, dv, dtable if need_dtable else None, None, dbias if need_dbias else None,
        None, None, None, None, None, None, None, None,
    )  # fmt: skip


_flash_attn_fwd.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------------


def _debug_checks() -> bool:
    return os.environ.get("FLASHT5_DEBUG", "0") not in ("", "0", "false", "False")


def _check_cu_seqlens(name: str, cu: torch.Tensor, tokens: int, ref: torch.Tensor, count_name: str) -> None:
    if not isinstance(cu, torch.Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(cu).__name__}")
    if cu.dtype != torch.int32:
        raise ValueError(f"{name} must be int32, got {cu.dtype}")
    if cu.dim() != 1 or cu.numel() < 1:
        raise ValueError(f"{name} must be 1-D with num_seqs + 1 >= 1 entries, got shape {tuple(cu.shape)}")
    if cu.device != ref.device:
        raise ValueError(f"{name} must be on {ref.device}, got {cu.device}")
    # Value checks read the tensor: free on the CPU, a GPU sync otherwise (only with FLASHT5_DEBUG=1).
    if (cu.device.type == "cpu" or _debug_checks()) and not torch.compiler.is_compiling():
        vals = cu.tolist()
        if vals[0] != 0:
            raise ValueError(f"{name} must start at 0, got {vals[0]}")
        if any(b < a for a, b in zip(vals, vals[1:])):
            raise ValueError(f"{name} must be non-decreasing (monotone)")
        if vals[-1] != tokens:
            raise ValueError(f"{name}[-1] = {vals[-1]} must equal the number of {count_name} tokens ({tokens})")


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float = 1.0,
    causal: bool = False,
    rel_table: torch.Tensor | None = None,
    rel_bidirectional: bool = True,
    rel_max_distance: int = 128,
    alibi_slopes: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
) -> torch.Tensor:
    """Flash attention with T5 relative-position bias / ALiBi / additive bias, causal and varlen (module docstring).

    Dense: q ``(B, Lq, H, D)``, k/v ``(B, Lk, H, D)``. Varlen: q ``(Tq, H, D)``, k/v ``(Tk, H, D)`` with int32
    ``cu_seqlens_q``/``cu_seqlens_k`` (``num_seqs + 1``) and ``max_seqlen_q``/``max_seqlen_k`` (computed with a
    sync when None). Returns a new tensor shaped like ``q``. T5 uses ``scale=1.0``.
    """
    varlen = cu_seqlens_q is not None or cu_seqlens_k is not None
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
        if t.dim() != (3 if varlen else 4):
            layout = "(T, H, D) with cu_seqlens" if varlen else "(B, L, H, D)"
            raise ValueError(f"{name} must be {layout}, got shape {tuple(t.shape)}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"q: unsupported dtype {q.dtype} (float16, bfloat16 or float32)")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise ValueError(f"{name}.dtype {t.dtype} must match q.dtype {q.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    check_kernel_device(q, "q")
    if q.device.type != "cuda" and q.dtype == torch.bfloat16:
        raise ValueError("q: bfloat16 is not supported by the Triton interpreter (use float32/float16 on CPU)")
    H, D = q.shape[-2], q.shape[-1]
    if D not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"q: head dim {D} is not supported (supported: {SUPPORTED_HEAD_DIMS})")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[-2:] != q.shape[-2:]:
        raise ValueError(f"k: heads/head dim {tuple(k.shape[-2:])} must match q's {tuple(q.shape[-2:])}")
    if not varlen and k.shape[0] != q.shape[0]:
        raise ValueError(f"k: batch size {k.shape[0]} must match q's {q.shape[0]}")
    if not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite float, got {scale!r}")

    if varlen:
        if cu_seqlens_q is None or cu_seqlens_k is None:
            raise ValueError("cu_seqlens_q and cu_seqlens_k must be given together (varlen layout)")
        _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], q, "query")
        _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], q, "key")
        if cu_seqlens_q.numel() != cu_seqlens_k.numel():
            raise ValueError(
                f"cu_seqlens_k has {cu_seqlens_k.numel()} entries but cu_seqlens_q has {cu_seqlens_q.numel()}"
            )
        if max_seqlen_q is None:  # a GPU sync (and a graph break under torch.compile): pass it when you can
            max_seqlen_q = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max().item()) if cu_seqlens_q.numel() > 1 else 0
        if max_seqlen_k is None:
            max_seqlen_k = int((cu_seqlens_k[1:] - cu_seqlens_k[:-1]).max().item()) if cu_seqlens_k.numel() > 1 else 0
        for name, val in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
            if not isinstance(val, int) or val < 0:
                raise ValueError(f"{name} must be a non-negative int, got {val!r}")
        if bias is not None:
            raise ValueError("bias is only supported for the dense layout (not with cu_seqlens)")
        Lq = Lk = None
    else:
        Lq, Lk = q.shape[1], k.shape[1]
        max_seqlen_q, max_seqlen_k = Lq, Lk

    if rel_table is not None and alibi_slopes is not None:
        raise ValueError("rel_table and alibi_slopes are exclusive: pass one position bias")
    if rel_table is not None:
        if not isinstance(rel_table, torch.Tensor) or rel_table.dim() != 2 or rel_table.shape[1] != H:
            shape = tuple(rel_table.shape) if isinstance(rel_table, torch.Tensor) else type(rel_table).__name__
            raise ValueError(f"rel_table must be (num_buckets, H={H}), got {shape}")
        if not rel_table.is_floating_point():
            raise ValueError(f"rel_table must be floating point, got {rel_table.dtype}")
        if rel_table.device != q.device:
            raise ValueError(f"rel_table is on {rel_table.device} but q is on {q.device}")
        nb = rel_table.shape[0]
        max_exact = (nb // 2 if rel_bidirectional else nb) // 2
        if max_exact < 1:
            raise ValueError(f"rel_table: num_buckets={nb} too small (need >= {4 if rel_bidirectional else 2})")
        if not isinstance(rel_max_distance, int) or rel_max_distance <= max_exact:
            raise ValueError(
                f"rel_max_distance must be an int > {max_exact} (num_buckets={nb}), got {rel_max_distance!r}"
            )
    if alibi_slopes is not None:
        if not isinstance(alibi_slopes, torch.Tensor) or tuple(alibi_slopes.shape) != (H,):
            shape = tuple(alibi_slopes.shape) if isinstance(alibi_slopes, torch.Tensor) else alibi_slopes
            raise ValueError(f"alibi_slopes must have shape ({H},), got {shape}")
        if not alibi_slopes.is_floating_point() or alibi_slopes.device != q.device:
            raise ValueError(f"alibi_slopes must be a float tensor on {q.device}")
        if alibi_slopes.requires_grad and torch.is_grad_enabled():
            raise ValueError("alibi_slopes: gradients are not supported (detach the slopes)")
        alibi_slopes = alibi_slopes.contiguous()
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or not bias.is_floating_point():
            raise ValueError("bias must be a floating-point tensor")
        if bias.device != q.device:
            raise ValueError(f"bias is on {bias.device} but q is on {q.device}")
        full = (q.shape[0], H, Lq, Lk)
        if bias.dim() > 4 or any(n not in (1, f) for n, f in zip(bias.shape[::-1], full[::-1])):
            raise ValueError(f"bias of shape {tuple(bias.shape)} is not broadcastable to (B, H, Lq, Lk) = {full}")

    out, _ = _flash_attn_fwd(
        q, k, v, rel_table, alibi_slopes, bias, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k),
        float(scale), bool(causal), bool(rel_bidirectional), int(rel_max_distance),
    )  # fmt: skip
    return out


# ----------------------------------------------------------------------------------------------------------------
# Reference (plain PyTorch, materialised bias)
# ----------------------------------------------------------------------------------------------------------------


def _ref_dense(q, k, v, scale, causal, rel_table, rel_bidirectional, rel_max_distance, alibi_slopes, bias, dtype):
    Lq, Lk = q.shape[1], k.shape[1]
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale  # (B, H, Lq, Lk)
    qpos = torch.arange(Lq, device=q.device) + (Lk - Lq)  # bottom-right aligned queries
    rel = torch.arange(Lk, device=q.device)[None, :] - qpos[:, None]  # key_pos - query_pos, (Lq, Lk)
    if rel_table is not None:
        buckets = relative_position_bucket(rel, rel_bidirectional, rel_table.shape[0], rel_max_distance)
        s = s + rel_table.to(dtype)[buckets].permute(2, 0, 1)[None]  # (Lq, Lk, H) -> (1, H, Lq, Lk)
    if alibi_slopes is not None:
        s = s - alibi_slopes.to(dtype)[None, :, None, None] * rel.abs().to(dtype)
    if bias is not None:
        s = s + bias.to(dtype)
    if causal:
        s = s.masked_fill(rel > 0, float("-inf"))
    seen = (s > float("-inf")).any(-1, keepdim=True)  # rows with no visible key output 0
    p = torch.softmax(s.masked_fill(~seen, 0.0), dim=-1).masked_fill(~seen, 0.0)
    return torch.einsum("bhqk,bkhd->bqhd", p, v)


def flash_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float = 1.0,
    causal: bool = False,
    rel_table: torch.Tensor | None = None,
    rel_bidirectional: bool = True,
    rel_max_distance: int = 128,
    alibi_slopes: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    upcast: bool = True,
) -> torch.Tensor:
    """Plain-PyTorch reference of :func:`flash_attention` (materialises the (Lq, Lk) scores and bias).

    Computes in fp32 when ``upcast`` (the accuracy reference), else in the inputs' dtype (the "same dtype" term of
    the error-ratio rule). Returns the result in that compute dtype.
    """
    dtype = torch.float32 if upcast else q.dtype
    kw = dict(
        scale=scale, causal=causal, rel_table=rel_table, rel_bidirectional=rel_bidirectional,
        rel_max_distance=rel_max_distance, alibi_slopes=alibi_slopes,
    )  # fmt: skip
    if cu_seqlens_q is None:
        return _ref_dense(q, k, v, bias=bias, dtype=dtype, **kw)
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    outs = []
    for i in range(len(cq) - 1):
        qs, ks = slice(cq[i], cq[i + 1]), slice(ck[i], ck[i + 1])
        outs.append(_ref_dense(q[qs][None], k[ks][None], v[ks][None], bias=None, dtype=dtype, **kw)[0])
    return torch.cat(outs, 0) if outs else q.new_empty(q.shape, dtype=dtype)

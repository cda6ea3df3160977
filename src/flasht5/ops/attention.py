"""Flash attention for T5 in Triton: the relative-position bias inside the kernel, with its gradient.

What it computes
----------------
``out = softmax(scale * q @ k^T + B) @ v`` per (batch, head), where the additive score term ``B`` is any sum of

* the T5 relative-position bias ``rel_table[bucket(key_pos - query_pos), h]`` (``rel_table``: ``(num_buckets, H)``,
  buckets exactly as Hugging Face's ``T5Attention._relative_position_bucket``, bidirectional or causal), given
  either as the table or as its precomputed per-head lookup ``rel_lut = t5_bias_lut(rel_table, ...)``,
* ALiBi ``-slope[h] * |key_pos - query_pos|`` (``alibi_slopes``: ``(H,)``; exclusive with the T5 bias),
* an arbitrary additive tensor ``bias`` broadcastable to ``(B, H, Lq, Lk)`` (dense layout only),

plus an optional causal mask. Positions restart at 0 in every sequence; when ``Lq != Lk`` the queries sit
bottom-right (query ``i`` is at position ``i + Lk - Lq``) for the causal mask and the distance alike. A query row
that sees no key (causal with ``Lq > Lk``, an empty key sequence, or an all ``-inf`` bias row) returns 0, and its
gradients are 0 (never NaN). Gradients: ``q``, ``k``, ``v``, ``rel_table`` (in the table's own dtype) or
``rel_lut`` (fp32), and ``bias`` (in the bias's dtype, reduced over its broadcast dims). ``alibi_slopes`` gets no
gradient (rejected if it requires one). No dropout.

Layouts and dtypes
------------------
Dense: q ``(B, Lq, H, D)``, k/v ``(B, Lk, H, D)``; varlen (padding-free packed batches, the flash-attention
convention): q ``(Tq, H, D)``, k/v ``(Tk, H, D)``, int32 ``cu_seqlens_q``/``cu_seqlens_k`` of length
``num_seqs + 1`` (they may differ: packed seq2seq cross-attention); sequences of length 0 and 1 are legal.
Any strides are accepted as long as the head dim is contiguous (stride 1); otherwise the tensor is copied once.
``out`` is a new contiguous tensor shaped like ``q``. q/k/v: fp16 or bf16 on the GPU (fp32 accumulation,
fp32 also accepted there with IEEE fp32 dots, slow); fp32/fp16 under ``TRITON_INTERPRET=1`` on the CPU.
Head dims 16, 32, 64, 128, 256. ``rel_table``/``bias`` may be any float dtype (a fp32 table under bf16 autocast
is the usual case); they are read as fp32. ``rel_lut`` must be fp32 ``(H, 2R+1)``.

``max_seqlen_q``/``max_seqlen_k`` (varlen) only size the grid: each program walks its (query or key) blocks with a
grid stride, ``for start in range(pid * BLOCK, seqlen, n_programs * BLOCK)``, so one pass covers every sequence
up to the given maximum and a longer one (an understated max_seqlen) is still computed in full, only with less
parallelism; never a wrong answer. Empty and short sequences cost their programs a few loads. ``None`` computes
the maxima from cu_seqlens (one host sync for both, and a graph break under ``torch.compile``).

How the T5 bias is computed exactly, without ``log`` in the kernel
-------------------------------------------------------------------
Triton's ``tl.log`` is not bit-identical to ``torch.log`` and T5's bucket boundaries fall exactly on integers
(distances 16, 32, 64 for 32 buckets / max distance 128), so an in-kernel log would flip buckets. Instead
:func:`t5_bias_lut` (``ops/relative_position.py``, plain PyTorch) computes, eagerly with Hugging Face's formula
verbatim on the table's device (cached per configuration; one host sync the first time), the bucket of every
distance in ``[-Re, Re]``, where ``Re <= rel_max_distance`` is the radius beyond which the bucket is constant on
both sides (91 for T5's bidirectional 32 buckets / 128, 113 for the causal ones), and gathers a per-head lookup
``lut[h, r + Re] = rel_table[bucket(r), h]`` (fp32, ``(H, 2Re+1)``; differentiable by plain autograd) that the
kernels read at ``clamp(key_pos - query_pos, -Re, Re)``. The backward reduces ``dS`` into ``d_lut`` in-kernel;
autograd's index_select backward scatters it into the table. ``rel_table=`` is exactly ``t5_bias_lut`` + the
``rel_lut=`` path; a model whose layers share a table builds the lookup once per stack forward, so the gather and
its scatter run once per stack instead of once per layer. No ``(Lq, Lk)`` tensor is ever materialised. Tests check
the clamped lookup against HF up to 11x the max distance.

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

Backward, in one of four variants (``BWD_VARIANTS``; ``FLASHT5_ATTN_BWD``, read once at import, picks the default;
``_FORCE["bwd"]`` selects one for tests and benchmarks). "fused" and "split" start with a preprocessing kernel
(``delta = rowsum(dO * O)``, which also zeroes the accumulators); "split2" and "split3" fuse it into their first
kernel:

* ``"fused"``: FlashAttention-2's original scheme. One program per key block loops over the query
  blocks, recomputes P from the LSE, accumulates dK/dV in registers and adds each tile's dQ contribution into an
  fp32 accumulator with relaxed atomics (zeroed by the prep kernel, cast to the input dtype at the end): 5 matmuls
  per tile instead of 7. On sm90 the contribution is computed transposed, ``dQ^T = K^T dS^T``, so that its M is the
  head dim and Hopper's wgmma (M >= 64) serves tiles with ``BLOCK_M = 32`` too (``_Cfg.dq_t``; the sm80 table
  uses ``dS^T``'s transpose times K). The T5 table gradient is reduced in the same pass (far tiles: sums of
  ``dS^T`` into two per-program scalars; near tiles: diagonal sums, see below).
* ``"split"`` (default): one kernel per key block for dK/dV and one per query block for dQ (which also reduces
  ``d_lut`` and ``d_bias``), no atomics on dQ/dK/dV: deterministic gradients of q/k/v, 7 matmuls per tile. Measured
  on the H200 (bf16, 32k tokens, T5 table and its gradient): backward 3.4-4.5x the forward, against 4.8-7.5x for
  "fused", whose dQ atomics and 32-row tiles cost more than the two matmuls they save.
* ``"split3"``: "split"'s two kernels and tiles in the other order, without the prep kernel: the dQ kernel
  runs first and computes delta for its own query rows before its loop (it loads dO anyway; O once more), storing it
  for the dK/dV kernel; d_lut is zeroed by a memset. Meant to save one launch and one pass over O and dO; measured
  on the H200 (2026-12-02, ``bench_attention.py --compare --quick``): without a bias 2-4 % faster than "split"
  forward + backward, but the T5-table rows were measured only together with the "kernel" table route (below),
  2.1x slower at L=512; kept selectable, not the default until it is measured on its own with the table.
* ``"split2"``: split3's order with d_lut reduced in the dK/dV kernel (zeroed by the dQ kernel's program 0): the dQ
  kernel drops to 104 registers at D=64 (from 194), the dK/dV kernel rises to 254 ((64, 64) tiles need 8 warps:
  with 4 they spill 456 B) — which side wins is for the GPU to say (``bench_attention.py --compare``).

Near-tile diagonal sums for ``d_lut``: every row of the ``dS`` tile is rotated by its own index (``tl.gather``
within rows: warp shuffles), so that each column holds one residue of the in-tile offset ``j - i`` modulo the
column count; masked column sums per "wrap" are then the ``BLOCK_M + BLOCK_N - 1`` diagonal sums, each added to
``d_lut`` with one fp32 atomic. (Skewing the tile into diagonals-as-rows, the first version, needs a gathered tile
twice the tile's size and spilled registers in the fused kernel.) ``d_lut`` and a broadcast ``d_bias`` are summed
by atomics in both variants (nondeterministic order, fp32 rounding only), as is dQ in the fused one. Measured cost
(H200, kernel time, T5 v1.1-base shapes, 16k tokens, 2026-12-02): the reduction doubles the dQ kernel (220 against
109 us at L=512, a quarter of the backward). It is not the atomics: carrying each tile's partial diagonal sums to
the next key blocks (one atomic per distance and block instead of per wrap, 3x fewer) made the kernel 9 % slower at
L=512 and 20 % at 2048 (four more loop-carried vectors); the rotation and the masked column sums are the cost.
Rotating the tile in the matmul's dtype (bf16, half the shuffle's bytes) instead of fp32 was slower too: 251 against
220 us at L=512, 690 against 568 at 2048 (not analysed further: the fp32 rotation stays).

Host path
---------
The eager call is ``flash_attention`` -> one ``_check_inputs`` (shapes, dtypes, devices, Python types) ->
``torch.autograd.Function`` (called without ``Function.apply``'s Python layer, non-tensor arguments in one tuple;
or the forward launcher directly when no input needs a gradient) -> launchers that call the compiled kernels
through ``FastKernel`` (``ops/_launch.py``); launch configs are cached per (kernel, head dim, device, dtype).
A ``rel_table`` that needs a gradient takes the table route (``TABLE_ROUTES``, ``FLASHT5_ATTN_TABLE``): the
Function receives the table itself, gathers the lookup without an autograd node, and the backward kernels add
every d_lut contribution straight into the table's gradient row ``bucket[slot]`` (one int load per diagonal
atomic, not per score), so one autograd node replaces four (index_select, cast, transpose and ours) and no scatter
op runs after the kernels; "autograd" keeps t5_bias_lut + rel_lut. Gradients that are not needed are not allocated.
Under ``torch.compile`` the same launchers run inside the ``flasht5::flash_attn_fwd`` / ``flash_attn_bwd`` custom
ops (fake implementations + registered autograd, the "autograd" table form), so ``fullgraph=True`` traces.

Tuning, hardware, measured speed
--------------------------------
Tiles come from a static per-architecture table keyed on the head dim, measured on one H200 (sm90) with
``benchmarks/bench_attention.py --sweep/--shape-sweep`` over candidates pre-screened offline
(``bench_attention.py --screen`` compiles sm90 cubins on a machine without a GPU, through Triton's bundled ptxas,
and reports registers, spills and shared memory). The fused backward's tiles ("kv") are so far only screened:
at D=64 the largest spill-free one is (BLOCK_M, BLOCK_N) = (32, 128) with 8 warps; (64, 128) and (64, 64) spill
0.7-0.9 KB. No runtime autotuning: it would cost seconds of compilation and benchmarking per shape in every
process and give run-to-run varying tiles (and numerics). The sm80 table fits A100's 164 KB and is run on the H200
by the tests, but was not measured on Ampere hardware. On the H200 (bf16, H=12, 32k tokens/batch, same-run SDPA
flash backend without bias as the then ceiling; before the fused backward), for L >= 1024: forward with the T5
table 0.85-1.24x that ceiling, forward+backward with the table gradient 0.61-0.91x (split backward), peak memory
at L=16k 0.68x the ceiling's; at L=512 every tile is in the band and the forward drops to 0.26-0.83x. See
benchmarks/results/2026-11-29-h200.md (the benchmark's ceiling is now SDPA's default dispatch). Under the Triton
interpreter one 16x16 configuration is used.

Opt-in, for measurement (off by default until the GPU says otherwise): an autotuner keyed on (kernel, head dim,
dtype, constexpr flags, power-of-two length buckets) over screened sm90 candidates (``FLASHT5_ATTN_AUTOTUNE=1``;
``_TUNE_SM90``, ``_TUNE_LOG``), and TMA loads of the forward's K/V tiles through device-side tensor descriptors
(``FLASHT5_ATTN_TMA=1``). Triton 3.6's automatic warp specialisation (``tl.range(..., warp_specialize=True)``) is
not applied to these loops on sm90 (the compiled TTGIR has no warp_specialize op: Blackwell only), so it is not
used. ``bench_attention.py --compare [--quick]`` measures every variant against the ceiling in one process.

Validation never syncs the GPU on the hot path: shapes, dtypes and devices are checked always; the *values* of
``cu_seqlens`` (start at 0, monotone, end at the token count) are checked on CPU tensors, or on the GPU when
``FLASHT5_DEBUG=1`` (one sync).

Credits: FlashAttention-2 (Dao, 2023) for the algorithm and both backward schemes; the Triton fused-attention
tutorial (Tillet et al.) for the Triton structure; T5 (Raffel et al., 2020) for the relative-position buckets;
ALiBi (Press et al., 2022) for the linear bias.
"""

import math
import os
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from flasht5.ops._device import (
    allow_inductor_fallback,
    check_kernel_device,
    custom_op,
    function_apply,
    interpreting,
    next_pow2,
    use_custom_op,
)
from flasht5.ops._launch import FastKernel
from flasht5.ops.relative_position import lut_buckets, relative_position_bucket, t5_bias_lut

__all__ = ["flash_attention", "flash_attention_ref", "t5_bias_lut", "relative_position_bucket"]

LOG2E = 1.4426950408889634
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128, 256)
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_lut_buckets = lut_buckets  # the buckets behind t5_bias_lut (tests compare them with HF's)


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
def _q_segments(n0, off, Lq, R, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                HAS_REL: tl.constexpr):  # fmt: skip
    """Query-block segments for the key block starting at ``n0``: far-right ``[m_start, m_a)`` (every distance
    >= R), near ``[m_a, m_b)``, far-left ``[m_b, m_full)`` (every distance <= -R, or fully visible when causal),
    masked tail ``[m_full, m_end)``. Causal: ``m_start`` is the first query block that sees a key of the block."""
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
    return m_start, m_a, m_b, m_full, m_end


@triton.jit
def _seq_info(CU_Q, CU_K, b, LQ, LK, VARLEN: tl.constexpr):
    """Sequence ``b``: (first query row, first key row, Lq, Lk) for the user's q/k/v, which are addressed with their
    own strides (dense: batch stride, rows from 0), and (first query row, first key row) of the flat contiguous
    layout of everything the op allocates (out, dO, dQ, dK, dV: ``(tokens, H, D)``; LSE, delta: ``(H, tokens)``)."""
    if VARLEN:
        q0 = tl.load(CU_Q + b)
        k0 = tl.load(CU_K + b)
        Lq = tl.load(CU_Q + b + 1) - q0
        Lk = tl.load(CU_K + b + 1) - k0
        r0 = q0
        kr0 = k0
    else:
        q0 = b * 0
        k0 = b * 0
        Lq = LQ + b * 0
        Lk = LK + b * 0
        r0 = b * LQ
        kr0 = b * LK
    return q0, k0, r0, kr0, Lq, Lk


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


@triton.jit
def _block_order(NUM_BLK, HEAVY_FIRST: tl.constexpr):
    """(block index, batch * head) of this program; the 1-D grid is NUM_BLK blocks x (batch * heads) (no 65535
    limit on batch * heads for many short packed sequences). ``HEAVY_FIRST`` (causal): block-major, the blocks with
    the most work first (better tail balance); otherwise (batch, head)-major, so that the programs running together
    share the (batch, head)'s K/V (or Q/dO) in L2."""
    pid = tl.program_id(0)
    NUM_BH = tl.num_programs(0) // NUM_BLK
    if HEAVY_FIRST:
        return pid // NUM_BH, pid % NUM_BH
    else:
        return pid % NUM_BLK, pid // NUM_BLK


# Lengths and counts are not specialised (divisibility by 16 buys nothing for them): one compile serves all shapes.
_NO_SPEC = ["H", "LQ", "LK", "T_LSE", "R", "NUM_M", "NUM_N"]


@triton.jit
def _fwd_block(
    m0, q_base, k_base, v_base, o_base, lse_base, lut_base, c_left, c_right, alibi2, bias_base,
    sqm, skm, svm, som, sbm, sbn, Lq, Lk, R, scale2,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
    HAS_REL: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_PREC: tl.constexpr,
    ASM_GATHER: tl.constexpr, TMA: tl.constexpr,
):  # fmt: skip
    """Forward of the query block starting at row ``m0`` of one (sequence, head). ``TMA``: K and V tiles come
    through device-side tensor descriptors of this sequence's ``(Lk, D)`` rows (Hopper's TMA engine: no address
    arithmetic or masks in the loop; rows past Lk read as zeros, as the masked loads give)."""
    off = Lk - Lq
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(q_base + offs_m[:, None] * sqm + offs_d[None, :], mask=offs_m[:, None] < Lq, other=0.0)
    if TMA:
        rows = tl.maximum(Lk, 1)  # a descriptor needs a non-empty box (no tile is loaded when Lk = 0)
        k_desc = tl.make_tensor_descriptor(k_base, [rows, HEAD_DIM], [skm, 1], [BLOCK_N, HEAD_DIM])
        v_desc = tl.make_tensor_descriptor(v_base, [rows, HEAD_DIM], [svm, 1], [BLOCK_N, HEAD_DIM])
    n_a, n_b, n_full, n_end = _kv_segments(m0, off, Lk, R, BLOCK_M, BLOCK_N, CAUSAL, HAS_REL)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    for start_n in range(0, n_end * BLOCK_N, BLOCK_N):
        blk = start_n // BLOCK_N
        offs_n = start_n + tl.arange(0, BLOCK_N)
        if TMA:
            k = k_desc.load([start_n, 0])
            v = v_desc.load([start_n, 0])
        else:
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
    rmask = offs_m < Lq
    tl.store(o_base + offs_m[:, None] * som + offs_d[None, :], out.to(o_base.dtype.element_ty), mask=rmask[:, None])
    tl.store(lse_base + offs_m, lse, mask=rmask)


@triton.jit(do_not_specialize=_NO_SPEC[:6])
def _attn_fwd(
    Q, K, V, O, LSE, LUT, ALIBI, BIAS, CU_Q, CU_K,
    sqb, sqm, sqh, skb, skm, skh, svb, svm, svh, sbb, sbh, sbm, sbn,
    H, LQ, LK, T_LSE, R, NUM_M, scale2,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
    HAS_REL: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_BIAS: tl.constexpr, VARLEN: tl.constexpr,
    DOT_PREC: tl.constexpr, ASM_GATHER: tl.constexpr, TMA: tl.constexpr,
):  # fmt: skip
    pid_m, bh = _block_order(NUM_M, CAUSAL)
    if CAUSAL:
        pid_m = NUM_M - 1 - pid_m  # late query blocks see the most keys
    b = bh // H
    h = bh % H
    q0, k0, r0, kr0, Lq, Lk = _seq_info(CU_Q, CU_K, b, LQ, LK, VARLEN)
    HD = H * HEAD_DIM  # row stride of the flat (tokens, H, D) outputs
    q_base = Q + b.to(tl.int64) * sqb + q0.to(tl.int64) * sqm + h * sqh
    k_base = K + b.to(tl.int64) * skb + k0.to(tl.int64) * skm + h * skh
    v_base = V + b.to(tl.int64) * svb + k0.to(tl.int64) * svm + h * svh
    o_base = O + r0.to(tl.int64) * HD + h * HEAD_DIM
    lse_base = LSE + h.to(tl.int64) * T_LSE + r0
    lut_base, c_left, c_right, alibi2 = _head_consts(LUT, ALIBI, h, R, HAS_REL, HAS_ALIBI)
    bias_base = BIAS + b.to(tl.int64) * sbb + h.to(tl.int64) * sbh
    if VARLEN:
        # Grid stride: NUM_M comes from max_seqlen_q; a longer sequence (an understated max_seqlen_q) is still
        # computed in full by further passes, an empty one costs its programs three loads.
        for m0 in range(pid_m * BLOCK_M, Lq, NUM_M * BLOCK_M):
            _fwd_block(
                m0, q_base, k_base, v_base, o_base, lse_base, lut_base, c_left, c_right, alibi2, bias_base,
                sqm, skm, svm, HD, sbm, sbn, Lq, Lk, R, scale2,
                HEAD_DIM, BLOCK_M, BLOCK_N, CAUSAL, HAS_REL, HAS_ALIBI, HAS_BIAS, DOT_PREC, ASM_GATHER, TMA,
            )  # fmt: skip
    else:  # dense: the grid has exactly cdiv(Lq, BLOCK_M) query blocks per head
        _fwd_block(
            pid_m * BLOCK_M, q_base, k_base, v_base, o_base, lse_base, lut_base, c_left, c_right, alibi2,
            bias_base, sqm, skm, svm, HD, sbm, sbn, Lq, Lk, R, scale2,
            HEAD_DIM, BLOCK_M, BLOCK_N, CAUSAL, HAS_REL, HAS_ALIBI, HAS_BIAS, DOT_PREC, ASM_GATHER, TMA,
        )  # fmt: skip


@triton.jit(do_not_specialize=["H", "T", "W"])
def _bwd_prep(
    O, DO, DELTA, DQ, DLUT, H, T, W,
    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, ZERO_DQ: tl.constexpr, ZERO_DLUT: tl.constexpr,
    BLOCK_W: tl.constexpr,
):  # fmt: skip
    """delta[h, t] = sum_d dO[t, h] * O[t, h] over the T query tokens of the flat (T, H, D) layout (FlashAttention-2
    preprocessing). Also zeroes the fp32 dQ accumulator of the fused backward and d_lut (saves two memsets)."""
    pid = tl.program_id(0)
    h = tl.program_id(1)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM)
    mask = offs[:, None] < T
    ptrs = offs[:, None].to(tl.int64) * (H * HEAD_DIM) + h * HEAD_DIM + offs_d[None, :]
    o = tl.load(O + ptrs, mask=mask, other=0.0)
    do = tl.load(DO + ptrs, mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + h.to(tl.int64) * T + offs, delta, mask=offs < T)
    if ZERO_DQ:
        tl.store(DQ + ptrs, tl.zeros([BLOCK, HEAD_DIM], dtype=tl.float32), mask=mask)
    if ZERO_DLUT:  # noqa: SIM102 (a constexpr test, then a runtime one: Triton traces them separately)
        if pid == 0:
            for w0 in range(0, W, BLOCK_W):
                offs_w = w0 + tl.arange(0, BLOCK_W)
                tl.store(DLUT + h * W + offs_w, tl.zeros([BLOCK_W], dtype=tl.float32), mask=offs_w < W)


@triton.jit
def _dl_ptr(dlut_base, idx, BKT, NH, BUCKETS: tl.constexpr):
    """Where the gradient of lookup slot ``idx`` (distance ``idx - R``) goes: ``d_lut[h, idx]`` or, with
    ``BUCKETS`` (the table route), straight into the table's gradient ``d_table[bucket[idx], h]`` (row stride
    ``NH`` = heads): the lookup's index_select backward done by the kernel's own atomics, no scatter op after it."""
    if BUCKETS:
        return dlut_base + tl.load(BKT + idx) * NH
    else:
        return dlut_base + idx


@triton.jit
def _diag_sums_to_lut(ds, c, R, dlut_base, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      TRANSPOSED: tl.constexpr, DIAG_GATHER: tl.constexpr, mi, nj, off, BKT, NH,
                      BUCKETS: tl.constexpr):  # fmt: skip
    """Add every element of a near tile of ``dS`` into ``d_lut[clamp(distance, -R, R) + R]``.

    ``ds`` is ``(BLOCK_M, BLOCK_N)`` (rows = queries; element ``(i, j)`` at distance ``c + j - i``) or, with
    ``TRANSPOSED``, ``(BLOCK_N, BLOCK_M)`` (rows = keys; element ``(a, b)`` at distance ``c + a - b``); ``c`` is the
    distance of the (first query, first key) element.

    With ``DIAG_GATHER``: every row of the tile is rotated by its own index (``tl.gather`` along the columns, a
    shared-memory shuffle), so that each column holds one residue ``u mod C`` of the in-tile offset ``u`` (``C`` =
    the number of columns) and each of its elements one "wrap" ``w = u // C``; the column sums per wrap are the
    diagonal sums, one atomic each (``BLOCK_M + BLOCK_N - 1`` valid ones). The rotated tile has the tile's own size
    (skewing the tile into diagonals-as-rows needs twice the registers, which spilled in the fused backward).
    Otherwise one atomic per element (fallback)."""
    if DIAG_GATHER:
        if TRANSPOSED:  # ds (BLOCK_N, BLOCK_M); in-tile offset u = a - b in [-(BLOCK_M - 1), BLOCK_N - 1]
            ROWS: tl.constexpr = BLOCK_N
            COLS: tl.constexpr = BLOCK_M
            U_LO: tl.constexpr = -(BLOCK_M - 1)
        else:  # ds (BLOCK_M, BLOCK_N); u = j - i in [-(BLOCK_M - 1), BLOCK_N - 1] (so the sign of the shift flips)
            ROWS: tl.constexpr = BLOCK_M
            COLS: tl.constexpr = BLOCK_N
            U_LO: tl.constexpr = -(BLOCK_M - 1)
        r = tl.arange(0, ROWS)[:, None]
        col = tl.arange(0, COLS)[None, :]  # the residue column: u = col (mod COLS)
        if TRANSPOSED:
            src = (r - col) & (COLS - 1)  # b with a - b = col (mod COLS)
            u = r - src
        else:
            src = (r + col) & (COLS - 1)  # j with j - i = col (mod COLS)
            u = src - r
        g = tl.gather(ds, src, 1)  # (ROWS, COLS): g[row, col] = ds[row, src]
        wrap = (u - col) // COLS  # exact: u = col + COLS * wrap
        W_LO: tl.constexpr = -((-U_LO + COLS - 1) // COLS)  # floor(U_LO / COLS)
        W_HI: tl.constexpr = (BLOCK_N - 1) // COLS
        cols = tl.arange(0, COLS)
        for w in tl.static_range(W_HI - W_LO + 1):
            d = tl.sum(tl.where(wrap == W_LO + w, g, 0.0), 0)  # (COLS,): the diagonal u = col + COLS * w
            uu = cols + COLS * (W_LO + w)
            idx = tl.minimum(tl.maximum(c + uu, -R), R) + R
            tl.atomic_add(
                _dl_ptr(dlut_base, idx, BKT, NH, BUCKETS), d, mask=(uu >= U_LO) & (uu <= BLOCK_N - 1), sem="relaxed"
            )
    else:
        rel = nj - (mi + off)
        idx = tl.minimum(tl.maximum(rel, -R), R) + R
        tl.atomic_add(_dl_ptr(dlut_base, idx, BKT, NH, BUCKETS), ds, sem="relaxed")


@triton.jit
def _bwd_kv_block(
    n0, q_base, k_base, v_base, do_base, dk_base, dv_base, dq_base, lse_base, delta_base, lut_base, dlut_base,
    c_left, c_right, alibi2, bias_base, db_base,
    sqm, skm, svm, sdom, sdkm, sdvm, sdqm, sbm, sbn, sdbm, sdbn, Lq, Lk, R, scale2, scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
    HAS_REL: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_BIAS: tl.constexpr, DQ_ATOMIC: tl.constexpr,
    REL_GRAD: tl.constexpr, BIAS_GRAD: tl.constexpr, DB_BM: tl.constexpr, DB_BN: tl.constexpr,
    DB_ATOMIC: tl.constexpr, DIAG_GATHER: tl.constexpr, DOT_PREC: tl.constexpr, ASM_GATHER: tl.constexpr,
    DQ_T: tl.constexpr, BKT, NH, BUCKETS: tl.constexpr,
):  # fmt: skip
    """Backward of the key block starting at ``n0``: dK, dV (stored), and with ``DQ_ATOMIC`` also dQ (fp32 atomics
    into the accumulator), d_lut and d_bias, in one pass over the query blocks (5 matmuls per tile)."""
    off = Lk - Lq
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    kmask = offs_n[:, None] < Lk
    k = tl.load(k_base + offs_n[:, None] * skm + offs_d[None, :], mask=kmask, other=0.0)
    v = tl.load(v_base + offs_n[:, None] * svm + offs_d[None, :], mask=kmask, other=0.0)
    m_start, m_a, m_b, m_full, m_end = _q_segments(n0, off, Lq, R, BLOCK_M, BLOCK_N, CAUSAL, HAS_REL)
    # with reductions over keys (d_lut, row sums of d_bias) a partial key block is masked in every tile: its padding
    # keys would otherwise enter the far tiles' sums (dK/dV/dQ need no mask there: padding rows are never stored and
    # their zero-loaded K adds nothing to dQ)
    if REL_GRAD or (BIAS_GRAD and DB_BN):
        kv_tail = n0 + BLOCK_N > Lk
    else:
        kv_tail = False

    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dl_left = tl.zeros([BLOCK_N], dtype=tl.float32)
    dl_right = tl.zeros([BLOCK_N], dtype=tl.float32)
    db_cols = tl.zeros([BLOCK_N], dtype=tl.float32)
    for start_m in range(m_start * BLOCK_M, m_end * BLOCK_M, BLOCK_M):
        blk = start_m // BLOCK_M
        offs_m = start_m + tl.arange(0, BLOCK_M)
        rmask = offs_m < Lq
        q = tl.load(q_base + offs_m[:, None] * sqm + offs_d[None, :], mask=rmask[:, None], other=0.0)
        do = tl.load(do_base + offs_m[:, None] * sdom + offs_d[None, :], mask=rmask[:, None], other=0.0)
        lse = tl.load(lse_base + offs_m, mask=rmask, other=float("inf"))  # +inf: P = 0 for padding rows
        delta = tl.load(delta_base + offs_m, mask=rmask, other=0.0)
        st = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * scale2  # (BLOCK_N, BLOCK_M): S^T, log2 units
        near = ((blk >= m_a) & (blk < m_b)) | (blk >= m_full) | kv_tail
        st = _scores(
            st, near, blk < m_a, offs_m[None, :], offs_n[:, None], off, c_right, c_left, lut_base, alibi2,
            bias_base, sbm, sbn, Lq, Lk, R, CAUSAL, HAS_REL, HAS_ALIBI, HAS_BIAS, ASM_GATHER,
        )  # fmt: skip
        pt = tl.math.exp2(st - lse[None, :])
        dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=DOT_PREC)
        dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
        dst = pt * (dpt - delta[None, :])  # dL/dS^T in natural units (S = scale * q k^T + bias)
        dk = tl.dot(dst.to(q.dtype), q, dk, input_precision=DOT_PREC)
        if DQ_ATOMIC:
            if DQ_T:  # dQ^T = K^T dS^T: M = HEAD_DIM, so Hopper's wgmma (M >= 64) also serves BLOCK_M < 64
                dqt = tl.dot(tl.trans(k), dst.to(k.dtype), input_precision=DOT_PREC)  # (HEAD_DIM, BLOCK_M)
                dq_ptrs = dq_base + offs_m[None, :] * sdqm + offs_d[:, None]
                tl.atomic_add(dq_ptrs, dqt, mask=rmask[None, :], sem="relaxed")
            else:
                dq = tl.dot(tl.trans(dst.to(k.dtype)), k, input_precision=DOT_PREC)  # (BLOCK_M, HEAD_DIM)
                dq_ptrs = dq_base + offs_m[:, None] * sdqm + offs_d[None, :]
                tl.atomic_add(dq_ptrs, dq, mask=rmask[:, None], sem="relaxed")
        if REL_GRAD:
            if near:
                c = n0 - (start_m + off)  # distance of tile element (key n0, query start_m)
                _diag_sums_to_lut(
                    dst, c, R, dlut_base, BLOCK_M, BLOCK_N, True, DIAG_GATHER, offs_m[None, :], offs_n[:, None], off,
                    BKT, NH, BUCKETS,
                )  # fmt: skip
            else:  # a far tile shares the bucket of distance +R (right, blk < m_a) or -R (left): sums suffice
                cs = tl.sum(dst, 1)
                dl_right += tl.where(blk < m_a, cs, 0.0)
                dl_left += tl.where(blk < m_a, 0.0, cs)
        if BIAS_GRAD:
            if DB_BM:  # bias broadcast over queries: column sums, written once after the loop
                db_cols += tl.sum(dst, 1)
            elif DB_BN:  # bias broadcast over keys: row sums of this key block, one atomic per query row
                tl.atomic_add(db_base + offs_m * sdbm, tl.sum(dst, 0), mask=rmask, sem="relaxed")
            else:
                db_ptrs = db_base + offs_m[None, :] * sdbm + offs_n[:, None] * sdbn
                db_mask = rmask[None, :] & (offs_n[:, None] < Lk)
                if DB_ATOMIC:
                    tl.atomic_add(db_ptrs, dst, mask=db_mask, sem="relaxed")
                else:
                    tl.store(db_ptrs, dst, mask=db_mask)
    dk *= scale
    tl.store(dk_base + offs_n[:, None] * sdkm + offs_d[None, :], dk.to(dk_base.dtype.element_ty), mask=kmask)
    tl.store(dv_base + offs_n[:, None] * sdvm + offs_d[None, :], dv.to(dv_base.dtype.element_ty), mask=kmask)
    if REL_GRAD:
        tl.atomic_add(_dl_ptr(dlut_base, 0, BKT, NH, BUCKETS), tl.sum(dl_left, 0), sem="relaxed")
        if not CAUSAL:
            tl.atomic_add(_dl_ptr(dlut_base, 2 * R, BKT, NH, BUCKETS), tl.sum(dl_right, 0), sem="relaxed")
    if BIAS_GRAD and DB_BM:
        if DB_BN:
            tl.atomic_add(db_base, tl.sum(db_cols, 0), sem="relaxed")
        elif DB_ATOMIC:
            tl.atomic_add(db_base + offs_n * sdbn, db_cols, mask=offs_n < Lk, sem="relaxed")
        else:
            tl.store(db_base + offs_n * sdbn, db_cols, mask=offs_n < Lk)


@triton.jit(do_not_specialize=_NO_SPEC[:5] + ["NUM_N"])
def _attn_bwd_kv(
    Q, K, V, DO, DK, DV, DQ, LSE, DELTA, LUT, DLUT, ALIBI, BIAS, DBIAS, CU_Q, CU_K, BKT,
    sqb, sqm, sqh, skb, skm, skh, svb, svm, svh, sbb, sbh, sbm, sbn, sdbb, sdbh, sdbm, sdbn,
    H, LQ, LK, T_LSE, R, NUM_N, scale2, scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
    HAS_REL: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_BIAS: tl.constexpr, VARLEN: tl.constexpr,
    DQ_ATOMIC: tl.constexpr, REL_GRAD: tl.constexpr, BIAS_GRAD: tl.constexpr, DB_BM: tl.constexpr,
    DB_BN: tl.constexpr, DB_ATOMIC: tl.constexpr, DIAG_GATHER: tl.constexpr, DOT_PREC: tl.constexpr,
    ASM_GATHER: tl.constexpr, DQ_T: tl.constexpr, BUCKETS: tl.constexpr,
):  # fmt: skip
    """One program per key block (NUM_N per head): the "split" backward's dK/dV kernel, or with ``DQ_ATOMIC`` the
    whole "fused" backward (dQ by fp32 atomics, d_lut, d_bias)."""
    # causal: key block 0 sees every query, the heaviest first
    pid_n, bh = _block_order(NUM_N, CAUSAL)
    b = bh // H
    h = bh % H
    q0, k0, r0, kr0, Lq, Lk = _seq_info(CU_Q, CU_K, b, LQ, LK, VARLEN)
    HD = H * HEAD_DIM  # row stride of the flat (tokens, H, D) dO, dQ, dK, dV
    k_base = K + b.to(tl.int64) * skb + k0.to(tl.int64) * skm + h * skh
    v_base = V + b.to(tl.int64) * svb + k0.to(tl.int64) * svm + h * svh
    dk_base = DK + kr0.to(tl.int64) * HD + h * HEAD_DIM
    dv_base = DV + kr0.to(tl.int64) * HD + h * HEAD_DIM
    q_base = Q + b.to(tl.int64) * sqb + q0.to(tl.int64) * sqm + h * sqh
    do_base = DO + r0.to(tl.int64) * HD + h * HEAD_DIM
    dq_base = DQ + r0.to(tl.int64) * HD + h * HEAD_DIM
    lse_base = LSE + h.to(tl.int64) * T_LSE + r0
    delta_base = DELTA + h.to(tl.int64) * T_LSE + r0
    lut_base, c_left, c_right, alibi2 = _head_consts(LUT, ALIBI, h, R, HAS_REL, HAS_ALIBI)
    dlut_base = DLUT + h if BUCKETS else DLUT + h * (2 * R + 1)
    bias_base = BIAS + b.to(tl.int64) * sbb + h.to(tl.int64) * sbh
    db_base = DBIAS + b.to(tl.int64) * sdbb + h.to(tl.int64) * sdbh
    if VARLEN:  # grid stride over key blocks (see _attn_fwd)
        for n0 in range(pid_n * BLOCK_N, Lk, NUM_N * BLOCK_N):
            _bwd_kv_block(
                n0, q_base, k_base, v_base, do_base, dk_base, dv_base, dq_base, lse_base, delta_base, lut_base,
                dlut_base, c_left, c_right, alibi2, bias_base, db_base,
                sqm, skm, svm, HD, HD, HD, HD, sbm, sbn, sdbm, sdbn, Lq, Lk, R, scale2, scale,
                HEAD_DIM, BLOCK_M, BLOCK_N, CAUSAL, HAS_REL, HAS_ALIBI, HAS_BIAS, DQ_ATOMIC, REL_GRAD, BIAS_GRAD,
                DB_BM, DB_BN, DB_ATOMIC, DIAG_GATHER, DOT_PREC, ASM_GATHER, DQ_T, BKT, H, BUCKETS,
            )  # fmt: skip
    else:
        _bwd_kv_block(
            pid_n * BLOCK_N, q_base, k_base, v_base, do_base, dk_base, dv_base, dq_base, lse_base, delta_base,
            lut_base, dlut_base, c_left, c_right, alibi2, bias_base, db_base,
            sqm, skm, svm, HD, HD, HD, HD, sbm, sbn, sdbm, sdbn, Lq, Lk, R, scale2, scale,
            HEAD_DIM, BLOCK_M, BLOCK_N, CAUSAL, HAS_REL, HAS_ALIBI, HAS_BIAS, DQ_ATOMIC, REL_GRAD, BIAS_GRAD,
            DB_BM, DB_BN, DB_ATOMIC, DIAG_GATHER, DOT_PREC, ASM_GATHER, DQ_T, BKT, H, BUCKETS,
        )  # fmt: skip


@triton.jit
def _bwd_q_block(
    m0, q_base, k_base, v_base, do_base, dq_base, lse_base, delta_base, lut_base, dlut_base,
    c_left, c_right, alibi2, bias_base, db_base,
    sqm, skm, svm, sdom, sdqm, sbm, sbn, sdbm, sdbn, Lq, Lk, R, scale2, scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
    HAS_REL: tl.constexpr, REL_GRAD: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_BIAS: tl.constexpr,
    BIAS_GRAD: tl.constexpr, DB_BM: tl.constexpr, DB_BN: tl.constexpr, DB_ATOMIC: tl.constexpr,
    DIAG_GATHER: tl.constexpr, DOT_PREC: tl.constexpr, ASM_GATHER: tl.constexpr, BKT, NH, BUCKETS: tl.constexpr,
    o_base, COMPUTE_DELTA: tl.constexpr,
):  # fmt: skip
    """dQ (+ d_lut, d_bias) of the query block starting at ``m0`` (the "split" backward's second kernel)."""
    off = Lk - Lq
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    rmask = offs_m < Lq
    q = tl.load(q_base + offs_m[:, None] * sqm + offs_d[None, :], mask=rmask[:, None], other=0.0)
    do = tl.load(do_base + offs_m[:, None] * sdom + offs_d[None, :], mask=rmask[:, None], other=0.0)
    lse = tl.load(lse_base + offs_m, mask=rmask, other=float("inf"))
    if COMPUTE_DELTA:  # "split2": this kernel runs first and does FlashAttention-2's preprocessing for its rows
        o = tl.load(o_base + offs_m[:, None] * sdom + offs_d[None, :], mask=rmask[:, None], other=0.0)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        tl.store(delta_base + offs_m, delta, mask=rmask)
    else:
        delta = tl.load(delta_base + offs_m, mask=rmask, other=0.0)

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
                    ds, c, R, dlut_base, BLOCK_M, BLOCK_N, False, DIAG_GATHER, offs_m[:, None], offs_n[None, :], off,
                    BKT, NH, BUCKETS,
                )  # fmt: skip
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
    tl.store(dq_base + offs_m[:, None] * sdqm + offs_d[None, :], dq.to(dq_base.dtype.element_ty), mask=rmask[:, None])
    if REL_GRAD:
        # far tiles: two atomics per program
        tl.atomic_add(_dl_ptr(dlut_base, 0, BKT, NH, BUCKETS), tl.sum(dl_left, 0), sem="relaxed")
        if not CAUSAL:
            tl.atomic_add(_dl_ptr(dlut_base, 2 * R, BKT, NH, BUCKETS), tl.sum(dl_right, 0), sem="relaxed")
    if BIAS_GRAD and DB_BN:  # bias broadcast over keys: row sums were accumulated over the whole key loop
        if DB_BM:
            tl.atomic_add(db_base, tl.sum(db_rows, 0), sem="relaxed")
        elif DB_ATOMIC:
            tl.atomic_add(db_base + offs_m * sdbm, db_rows, mask=rmask, sem="relaxed")
        else:
            tl.store(db_base + offs_m * sdbm, db_rows, mask=rmask)


@triton.jit(do_not_specialize=_NO_SPEC[:6] + ["WZ"])
def _attn_bwd_dq(
    Q, K, V, DO, DQ, LSE, DELTA, LUT, DLUT, ALIBI, BIAS, DBIAS, CU_Q, CU_K, BKT, O,
    sqb, sqm, sqh, skb, skm, skh, svb, svm, svh, sbb, sbh, sbm, sbn, sdbb, sdbh, sdbm, sdbn,
    H, LQ, LK, T_LSE, R, NUM_M, WZ, scale2, scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
    HAS_REL: tl.constexpr, REL_GRAD: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_BIAS: tl.constexpr,
    BIAS_GRAD: tl.constexpr, DB_BM: tl.constexpr, DB_BN: tl.constexpr, DB_ATOMIC: tl.constexpr,
    VARLEN: tl.constexpr, DIAG_GATHER: tl.constexpr, DOT_PREC: tl.constexpr, ASM_GATHER: tl.constexpr,
    BUCKETS: tl.constexpr, COMPUTE_DELTA: tl.constexpr, ZERO_DLUT: tl.constexpr, BLOCK_W: tl.constexpr,
):  # fmt: skip
    """One program per query block: the split backwards' dQ kernel (+ d_bias, and d_lut for "split"). "split2" runs
    it first: it computes delta for its rows (no preprocessing kernel) and its program 0 zeroes the ``WZ`` fp32
    entries of d_lut that the dK/dV kernel, launched after it, accumulates into."""
    if ZERO_DLUT:  # noqa: SIM102 (a constexpr test, then a runtime one)
        if tl.program_id(0) == 0:
            for w0 in range(0, WZ, BLOCK_W):
                offs_w = w0 + tl.arange(0, BLOCK_W)
                tl.store(DLUT + offs_w, tl.zeros([BLOCK_W], dtype=tl.float32), mask=offs_w < WZ)
    pid_m, bh = _block_order(NUM_M, CAUSAL)
    if CAUSAL:
        pid_m = NUM_M - 1 - pid_m
    b = bh // H
    h = bh % H
    q0, k0, r0, kr0, Lq, Lk = _seq_info(CU_Q, CU_K, b, LQ, LK, VARLEN)
    HD = H * HEAD_DIM
    q_base = Q + b.to(tl.int64) * sqb + q0.to(tl.int64) * sqm + h * sqh
    do_base = DO + r0.to(tl.int64) * HD + h * HEAD_DIM
    o_base = O + r0.to(tl.int64) * HD + h * HEAD_DIM
    dq_base = DQ + r0.to(tl.int64) * HD + h * HEAD_DIM
    k_base = K + b.to(tl.int64) * skb + k0.to(tl.int64) * skm + h * skh
    v_base = V + b.to(tl.int64) * svb + k0.to(tl.int64) * svm + h * svh
    lse_base = LSE + h.to(tl.int64) * T_LSE + r0
    delta_base = DELTA + h.to(tl.int64) * T_LSE + r0
    lut_base, c_left, c_right, alibi2 = _head_consts(LUT, ALIBI, h, R, HAS_REL, HAS_ALIBI)
    dlut_base = DLUT + h if BUCKETS else DLUT + h * (2 * R + 1)
    bias_base = BIAS + b.to(tl.int64) * sbb + h.to(tl.int64) * sbh
    db_base = DBIAS + b.to(tl.int64) * sdbb + h.to(tl.int64) * sdbh
    if VARLEN:  # grid stride over query blocks (see _attn_fwd)
        for m0 in range(pid_m * BLOCK_M, Lq, NUM_M * BLOCK_M):
            _bwd_q_block(
                m0, q_base, k_base, v_base, do_base, dq_base, lse_base, delta_base, lut_base, dlut_base,
                c_left, c_right, alibi2, bias_base, db_base,
                sqm, skm, svm, HD, HD, sbm, sbn, sdbm, sdbn, Lq, Lk, R, scale2, scale,
                HEAD_DIM, BLOCK_M, BLOCK_N, CAUSAL, HAS_REL, REL_GRAD, HAS_ALIBI, HAS_BIAS, BIAS_GRAD,
                DB_BM, DB_BN, DB_ATOMIC, DIAG_GATHER, DOT_PREC, ASM_GATHER, BKT, H, BUCKETS, o_base, COMPUTE_DELTA,
            )  # fmt: skip
    else:
        _bwd_q_block(
            pid_m * BLOCK_M, q_base, k_base, v_base, do_base, dq_base, lse_base, delta_base, lut_base, dlut_base,
            c_left, c_right, alibi2, bias_base, db_base,
            sqm, skm, svm, HD, HD, sbm, sbn, sdbm, sdbn, Lq, Lk, R, scale2, scale,
            HEAD_DIM, BLOCK_M, BLOCK_N, CAUSAL, HAS_REL, REL_GRAD, HAS_ALIBI, HAS_BIAS, BIAS_GRAD,
            DB_BM, DB_BN, DB_ATOMIC, DIAG_GATHER, DOT_PREC, ASM_GATHER, BKT, H, BUCKETS, o_base, COMPUTE_DELTA,
        )  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# Launch configuration
# ----------------------------------------------------------------------------------------------------------------


class _Cfg(NamedTuple):
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    dq_t: bool = True  # fused backward: compute dQ^T = K^T dS^T (M = head dim: wgmma on sm90 even for BLOCK_M < 64)


# (kernel, head_dim) -> config. fwd: BLOCK_M queries owned, BLOCK_N keys streamed; dkdv (split backward) and kv
# (fused backward): BLOCK_N keys owned, BLOCK_M queries streamed; dq (split backward): BLOCK_M queries owned,
# BLOCK_N keys streamed. fwd/dkdv/dq at D=64/128: measured on one H200 (bench_attention.py --sweep /
# --shape-sweep; candidates pre-screened offline for spills and shared memory); D=16/32 reuse D=64's, D=256 chosen
# to fit (GPU-tested, not tuned). kv: the largest tiles without register spills in bench_attention.py --screen
# (sm90 cubins compiled offline: BLOCK_M=64 spills at D=64 because of the d_lut reduction), not yet timed on a GPU;
# kv_nolut: the same kernel without a T5 table gradient to reduce (no bias, ALiBi, a bias, a lut without grad),
# which fits larger tiles.
_SM90: dict[tuple[str, int], _Cfg] = {
    ("fwd", 16): _Cfg(64, 64, 4, 3),
    ("fwd", 32): _Cfg(64, 64, 4, 3),
    ("fwd", 64): _Cfg(64, 64, 4, 3),
    ("fwd", 128): _Cfg(64, 64, 4, 3),
    ("fwd", 256): _Cfg(64, 64, 8, 2),
    ("dkdv", 16): _Cfg(64, 64, 4, 3),
    ("dkdv", 32): _Cfg(64, 64, 4, 3),
    ("dkdv", 64): _Cfg(32, 128, 4, 3),  # 6 % faster than (64, 64, 4, 3) at L=512 and 2048 (kernel-timed, 2026-12-02)
    ("dkdv", 128): _Cfg(32, 64, 4, 4),
    ("dkdv", 256): _Cfg(32, 64, 8, 2),
    # the causal dK/dV kernel (5-7 % faster than (64, 64, 4, 3) at L=512 and 2048); other head dims take dkdv's
    ("dkdv_causal", 64): _Cfg(16, 128, 4, 3),
    # split2's dK/dV kernel, which also reduces d_lut (more registers: the rotated dS^T tile and its sums)
    ("dkdv_lut", 16): _Cfg(64, 64, 4, 3),
    ("dkdv_lut", 32): _Cfg(64, 64, 4, 3),
    ("dkdv_lut", 64): _Cfg(64, 64, 8, 3),  # (64, 64, 4, 3) spills 456 B (--screen)
    ("dkdv_lut", 128): _Cfg(32, 64, 4, 4),
    ("dkdv_lut", 256): _Cfg(32, 64, 8, 2),
    ("dq", 16): _Cfg(64, 32, 4, 4),
    ("dq", 32): _Cfg(64, 32, 4, 4),
    ("dq", 64): _Cfg(64, 32, 4, 4),
    ("dq", 128): _Cfg(64, 32, 4, 3),
    ("dq", 256): _Cfg(64, 32, 8, 2),
    # split2's dQ kernel (no d_lut reduction: 104 instead of 194 registers at D=64, so larger tiles fit)
    ("dq2", 16): _Cfg(64, 32, 4, 4),
    ("dq2", 32): _Cfg(64, 32, 4, 4),
    ("dq2", 64): _Cfg(64, 32, 4, 4),
    ("dq2", 128): _Cfg(64, 32, 4, 3),
    ("dq2", 256): _Cfg(64, 32, 8, 2),
    ("kv", 16): _Cfg(32, 128, 8, 3),
    ("kv", 32): _Cfg(32, 128, 8, 3),
    ("kv", 64): _Cfg(32, 128, 8, 3),
    ("kv", 128): _Cfg(32, 64, 8, 3),
    ("kv", 256): _Cfg(16, 32, 8, 2),
    ("kv_nolut", 16): _Cfg(64, 128, 8, 2),
    ("kv_nolut", 32): _Cfg(64, 128, 8, 2),
    ("kv_nolut", 64): _Cfg(64, 128, 8, 2),
    ("kv_nolut", 128): _Cfg(32, 128, 8, 2),
    ("kv_nolut", 256): _Cfg(16, 32, 8, 2),
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
    ("dkdv_lut", 16): _Cfg(32, 64, 4, 2),
    ("dkdv_lut", 32): _Cfg(32, 64, 4, 2),
    ("dkdv_lut", 64): _Cfg(32, 64, 4, 2),
    ("dkdv_lut", 128): _Cfg(32, 64, 4, 2),
    ("dkdv_lut", 256): _Cfg(16, 32, 4, 1),
    ("dq", 16): _Cfg(64, 32, 4, 2),
    ("dq", 32): _Cfg(64, 32, 4, 2),
    ("dq", 64): _Cfg(64, 32, 4, 2),
    ("dq", 128): _Cfg(64, 32, 4, 2),
    ("dq", 256): _Cfg(32, 32, 4, 1),
    ("dq2", 16): _Cfg(64, 32, 4, 2),
    ("dq2", 32): _Cfg(64, 32, 4, 2),
    ("dq2", 64): _Cfg(64, 32, 4, 2),
    ("dq2", 128): _Cfg(64, 32, 4, 2),
    ("dq2", 256): _Cfg(32, 32, 4, 1),
    ("kv", 16): _Cfg(16, 64, 4, 2, False),
    ("kv", 32): _Cfg(16, 64, 4, 2, False),
    ("kv", 64): _Cfg(16, 64, 4, 2, False),
    ("kv", 128): _Cfg(32, 64, 8, 2, False),
    ("kv", 256): _Cfg(16, 32, 8, 1, False),
    ("kv_nolut", 16): _Cfg(16, 64, 4, 2, False),
    ("kv_nolut", 32): _Cfg(16, 64, 4, 2, False),
    ("kv_nolut", 64): _Cfg(16, 64, 4, 2, False),
    ("kv_nolut", 128): _Cfg(32, 64, 8, 2, False),
    ("kv_nolut", 256): _Cfg(16, 32, 8, 1, False),
}
_INTERPRET_CFG = _Cfg(16, 16, 4, 1)
# Tests and benchmarks may force configurations: {"fwd" / "dkdv" / "dkdv_lut" / "dq" / "kv": _Cfg} ("kv" also
# forces "kv_nolut", "dkdv" also "dkdv_lut" and "dkdv_causal"), {"arch": 8} (the sm80 table), {"diag_gather":
# False} (per-element d_lut atomics), {"bwd": "fused" | "split" | "split2"} (backward variant), {"table": "kernel" |
# "autograd"} (table route).
_FORCE: dict[str, object] = {}
_CFG_CACHE: dict[tuple, _Cfg] = {}

# The backward: "fused" = one kernel per key block, dQ accumulated by fp32 atomics (FlashAttention-2's original
# scheme: 5 matmuls per tile), d_lut/d_bias reduced in the same pass; "split" = a prep kernel (delta), a dK/dV kernel
# per key block, then a dQ (+ d_lut, d_bias) kernel per query block (7 matmuls per tile, no atomics on dQ/dK/dV:
# deterministic); "split2" = the same two kernels in the other order and no prep kernel: the dQ kernel computes
# delta = rowsum(dO * O) for its own rows before its loop (and zeroes d_lut), the dK/dV kernel then reads delta and
# reduces d_lut (three launches become two, the prep's extra pass over O and dO is gone); "split3" = split2's order
# with d_lut reduced in the dQ kernel as in "split" (zeroed by a memset first): the dK/dV kernel keeps its registers.
# FLASHT5_ATTN_BWD (read once, at import) picks the default; torch.use_deterministic_algorithms(True) keeps the
# deterministic split ones.
BWD_VARIANTS = ("fused", "split", "split2", "split3")
# Default "split": measured on the H200 faster than "fused" at every shape (2026-12-01) and, with the T5 table,
# than "split2" and than "split3" + the "kernel" table route at every shape but L=4096 D=128 (within 3 %); 1.6-2.4x
# at L=512 (bench_attention.py --compare, 2026-12-02).
_BWD_DEFAULT = os.environ.get("FLASHT5_ATTN_BWD", "split")
if _BWD_DEFAULT not in BWD_VARIANTS:
    raise ValueError(f"FLASHT5_ATTN_BWD={_BWD_DEFAULT!r}: expected one of {BWD_VARIANTS}")

# How a rel_table reaches the kernels on the eager path. "kernel": the autograd.Function takes the table; its forward
# gathers the lookup (one index_select, no autograd node) and the backward kernels add every d_lut contribution
# straight into the table's gradient row bucket[slot] (an int load per diagonal atomic, not per element), so
# the fp32 table's gradient needs no op after the kernels. "autograd": t5_bias_lut with autograd, then the rel_lut
# path (its index_select backward scatters d_lut into the table: three more autograd nodes and two more ops).
# FLASHT5_ATTN_TABLE (read once) picks the default: "autograd". The "kernel" route (with split3) measured 2.1x slower
# forward + backward at L=512 on the H200 (2026-12-02): all its atomics land on the table's <= 32 bucket rows.
# torch.compile always traces the "autograd" form.
TABLE_ROUTES = ("kernel", "autograd")
_TABLE_DEFAULT = os.environ.get("FLASHT5_ATTN_TABLE", "autograd")
if _TABLE_DEFAULT not in TABLE_ROUTES:
    raise ValueError(f"FLASHT5_ATTN_TABLE={_TABLE_DEFAULT!r}: expected one of {TABLE_ROUTES}")


def _bwd_variant() -> str:
    v = _FORCE.get("bwd") if _FORCE else None
    if v is not None:
        return v  # type: ignore[return-value]
    if _BWD_DEFAULT == "fused" and torch.are_deterministic_algorithms_enabled():
        return "split"  # no atomics on dQ/dK/dV
    return _BWD_DEFAULT


def _table_route() -> str:
    v = _FORCE.get("table") if _FORCE else None
    return _TABLE_DEFAULT if v is None else v  # type: ignore[return-value]


# A kernel's family: forcing the family's config forces the kernel's too (_FORCE), and a (kernel, head dim) that a
# table does not list takes the family's entry.
_FAMILY = {"kv_nolut": "kv", "dkdv_lut": "dkdv", "dkdv_causal": "dkdv", "dq2": "dq"}


def _pick(kernel: str, head_dim: int, dtype: torch.dtype, arch: int) -> _Cfg:
    if interpreting():
        return _INTERPRET_CFG
    fp32 = dtype == torch.float32  # 4-byte tiles: the small Ampere tiles, single-stage at D=256 (shared memory)
    table = _SM80 if fp32 or arch < 9 else _SM90
    cfg = table.get((kernel, head_dim)) or table[(_FAMILY.get(kernel, kernel), head_dim)]
    return cfg._replace(num_stages=1) if fp32 and head_dim == 256 else cfg


def _config(kernel: str, head_dim: int, device: torch.device, dtype: torch.dtype) -> _Cfg:
    """The table's config, cached per (kernel, head dim, device, dtype): no device query per call."""
    if _FORCE:
        forced = _FORCE.get(kernel)
        if forced is None:
            forced = _FORCE.get(_FAMILY.get(kernel, kernel))
        if forced is not None:
            return forced  # type: ignore[return-value]
        if "arch" in _FORCE:
            return _pick(kernel, head_dim, dtype, int(_FORCE["arch"]))  # type: ignore[arg-type]
    key = (kernel, head_dim, device, dtype)
    cfg = _CFG_CACHE.get(key)
    if cfg is None:
        arch = torch.cuda.get_device_capability(device)[0] if device.type == "cuda" else 0
        cfg = _CFG_CACHE[key] = _pick(kernel, head_dim, dtype, arch)
    return cfg


# Opt-in autotuning: FLASHT5_ATTN_AUTOTUNE=1 (read once; ``_FORCE["autotune"]`` for benchmarks and tests). The first
# call of each (kernel, head dim, dtype, device, constexpr flags, power-of-two bucket of the lengths) on an sm90 GPU
# times every candidate below on the call's own tensors (CUDA events, best of 2 x 3 launches, after a compile launch)
# and keeps the fastest for the process; the accumulators the timing launches dirtied are zeroed again and the winner
# runs. Costs the candidates' compilation (seconds per key, once: Triton's disk cache keeps it) and host syncs on
# those first calls only; never runs while a CUDA graph is captured (the table's config is used and cached then).
# Off by default: tiles would vary from run to run (and so would the rounding of the reductions); the table above
# holds the winners measured on the H200. ``_TUNE_LOG`` records every choice (the benchmark prints it).
_AUTOTUNE = os.environ.get("FLASHT5_ATTN_AUTOTUNE", "0") == "1"
_TUNED: dict[tuple, _Cfg] = {}
_TUNE_LOG: list[dict] = []
# Candidates (sm90, 2-byte dtypes), free of register spills and within shared memory in bench_attention.py --screen
# (sm90 cubins compiled offline with the T5 lookup; see benchmarks/results).
_TUNE_SM90: dict[tuple[str, int], tuple[_Cfg, ...]] = {
    ("fwd", 64): (_Cfg(64, 64, 4, 3), _Cfg(128, 64, 8, 3), _Cfg(128, 64, 8, 4), _Cfg(128, 128, 8, 3),
                  _Cfg(64, 64, 4, 4), _Cfg(128, 64, 4, 3), _Cfg(64, 128, 4, 3)),
    ("fwd", 128): (_Cfg(64, 64, 4, 3), _Cfg(128, 64, 8, 3), _Cfg(128, 32, 4, 3), _Cfg(128, 64, 8, 2),
                   _Cfg(64, 32, 4, 3)),
    ("dkdv", 64): (_Cfg(64, 64, 4, 3), _Cfg(32, 64, 4, 3), _Cfg(32, 128, 8, 3), _Cfg(64, 128, 8, 3),
                   _Cfg(32, 64, 4, 4)),
    ("dkdv", 128): (_Cfg(32, 64, 4, 4), _Cfg(32, 64, 4, 3), _Cfg(32, 128, 8, 3), _Cfg(64, 64, 8, 3)),
    ("dkdv_lut", 64): (_Cfg(32, 64, 4, 3), _Cfg(32, 128, 8, 3), _Cfg(64, 64, 8, 3)),
    ("dkdv_lut", 128): (_Cfg(32, 64, 4, 4), _Cfg(32, 64, 4, 3), _Cfg(64, 64, 8, 3), _Cfg(32, 128, 8, 2)),
    ("dq", 64): (_Cfg(64, 32, 4, 4), _Cfg(64, 32, 4, 3), _Cfg(128, 32, 8, 3), _Cfg(64, 64, 8, 3)),
    ("dq", 128): (_Cfg(64, 32, 4, 3), _Cfg(128, 32, 8, 3), _Cfg(64, 64, 8, 3), _Cfg(64, 32, 4, 4)),
    ("dq2", 64): (_Cfg(64, 32, 4, 4), _Cfg(64, 32, 4, 3), _Cfg(128, 32, 8, 3), _Cfg(64, 64, 4, 3),
                  _Cfg(128, 64, 8, 3), _Cfg(64, 64, 8, 3)),
    ("dq2", 128): (_Cfg(64, 32, 4, 3), _Cfg(128, 32, 8, 3), _Cfg(64, 64, 8, 3), _Cfg(64, 32, 4, 4)),
}  # fmt: skip


# TMA (tensor descriptors) for the forward's K/V tiles: FLASHT5_ATTN_TMA=1 (read once) or _FORCE["tma"]; sm90+
# (and the interpreter). The descriptors are built on the device, which needs Triton's scratch allocator (set once,
# lazily, to a torch allocation) and takes FastKernel's slower launch path (the launcher allocates the scratch).
_TMA = os.environ.get("FLASHT5_ATTN_TMA", "0") == "1"
_TMA_READY: list[bool] = []


def _tma_ok(q, k, v) -> bool:
    """TMA on for this call: asked for, a Hopper-or-newer GPU (or the interpreter), 2-byte dtypes (fp32 keeps the
    IEEE path), and 16-byte aligned bases and row strides (TMA's rules; a stride of H * D elements always is)."""
    v_ = _FORCE.get("tma") if _FORCE else None
    if not (_TMA if v_ is None else v_) or q.dtype == torch.float32:
        return False
    for t in (k, v):
        if t.data_ptr() % 16 or any(st % 8 for st in t.stride()[:-1]):
            return False
    if q.is_cuda:
        if _major(q.device) < 9:
            return False
        if not _TMA_READY:  # device-side descriptors live in a per-launch global scratch buffer
            triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
            _TMA_READY.append(True)
    return True


_MAJOR: dict[torch.device, int] = {}


def _major(device: torch.device) -> int:
    m = _MAJOR.get(device)
    if m is None:
        m = _MAJOR[device] = torch.cuda.get_device_capability(device)[0]
    return m


def _autotune_on() -> bool:
    v = _FORCE.get("autotune") if _FORCE else None
    return _AUTOTUNE if v is None else bool(v)


def _tuned(kernel: str, head_dim: int, t: torch.Tensor, flags: tuple, lens: tuple, launch, default: _Cfg):
    """(config, dirty): the autotuned config of this key (see ``_AUTOTUNE``); ``dirty`` when this call timed the
    candidates (their launches wrote the outputs and added into the accumulators: the caller zeroes the latter
    and launches the winner)."""
    key = (kernel, head_dim, t.device, t.dtype, flags, tuple(next_pow2(max(1, n)) for n in lens))
    cfg = _TUNED.get(key)
    if cfg is not None:
        return cfg, False
    cands = _TUNE_SM90.get((kernel, head_dim))
    if (
        not cands
        or not t.is_cuda
        or t.dtype == torch.float32
        or torch.cuda.is_current_stream_capturing()
        or torch.cuda.get_device_capability(t.device)[0] != 9
    ):
        _TUNED[key] = default
        return default, False
    times = {}
    for c in dict.fromkeys((default, *cands)):
        try:
            launch(c)  # compile (or load from the disk cache) and warm up
            torch.cuda.synchronize()
        except Exception:  # noqa: BLE001 (a candidate that does not compile or launch here is skipped)
            continue
        best = float("inf")
        for _ in range(2):
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            for _ in range(3):
                launch(c)
            e1.record()
            e1.synchronize()
            best = min(best, e0.elapsed_time(e1) / 3)
        times[c] = best
    cfg = min(times, key=times.get) if times else default
    _TUNED[key] = cfg
    _TUNE_LOG.append(dict(kernel=kernel, D=head_dim, flags=flags, lens=key[-1], cfg=tuple(cfg),
                          ms=times.get(cfg), default_ms=times.get(default)))  # fmt: skip
    return cfg, True


# ----------------------------------------------------------------------------------------------------------------
# Launchers (plain functions on tensors, shared by the autograd.Function and the custom ops)
# ----------------------------------------------------------------------------------------------------------------

_FWD = FastKernel(_attn_fwd)
_PREP = FastKernel(_bwd_prep)
_KV = FastKernel(_attn_bwd_kv)
_DQ = FastKernel(_attn_bwd_dq)


def _rowview(x: torch.Tensor) -> torch.Tensor:
    """The kernels need a unit head-dim stride; any other strides are passed through (copy only if needed)."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _bias4(bias: torch.Tensor) -> torch.Tensor:
    """View ``bias`` as 4-D (leading size-1 dims)."""
    return bias if bias.dim() == 4 else bias.reshape((1,) * (4 - bias.dim()) + tuple(bias.shape))


def _bcast_strides(t: torch.Tensor) -> tuple[int, int, int, int]:
    """Strides of a 4-D tensor read as broadcast to (B, H, Lq, Lk): size-1 dims get stride 0."""
    return tuple(0 if n == 1 else s for n, s in zip(t.shape, t.stride()))  # type: ignore[return-value]


_NO_BIAS_STRIDES = (0, 0, 0, 0)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _qkv_strides(q, k, v, varlen: bool) -> tuple[int, ...]:
    """(batch, row, head) strides of q, k, v (dense ``(B, L, H, D)``; varlen ``(T, H, D)``, batch stride 0)."""
    if varlen:
        (sqm, sqh, _), (skm, skh, _), (svm, svh, _) = q.stride(), k.stride(), v.stride()
        return 0, sqm, sqh, 0, skm, skh, 0, svm, svh
    return (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3])


def _fwd_impl(q, k, v, lut, alibi, bias, cu_q, cu_k, max_q, max_k, scale, causal):
    """(out, lse): out like q (contiguous), lse ``(H, total query tokens)`` fp32 in log2 units."""
    varlen = cu_q is not None
    if varlen:
        Tq, H, D = q.shape
        nb, LQ, LK = cu_q.shape[0] - 1, 0, 0
    else:
        nb, LQ, H, D = q.shape
        LK, Tq, max_q = k.shape[1], nb * LQ, LQ
    out = q.new_empty(q.shape)
    lse = q.new_empty((H, Tq), dtype=torch.float32)
    if Tq == 0 or H == 0:
        return out, lse
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        q, k, v = _rowview(q), _rowview(k), _rowview(v)
    cfg = _config("fwd", D, q.device, q.dtype)
    if bias is None:
        bias4, sb = lse, _NO_BIAS_STRIDES
    else:
        bias4 = _bias4(bias)
        sb = _bcast_strides(bias4)
    flags = (causal, lut is not None, alibi is not None, bias is not None, varlen)
    tma = (_TMA or bool(_FORCE)) and _tma_ok(q, k, v)

    def launch(cfg):
        num_m = max(1, _cdiv(max_q, cfg.block_m))  # >= 1: a zero max_seqlen_q still covers every row (grid stride)
        _FWD(
            (num_m * nb * H,),
            (
                q, k, v, out, lse, lse if lut is None else lut, lse if alibi is None else alibi, bias4,
                cu_q if varlen else lse, cu_k if varlen else lse, *_qkv_strides(q, k, v, varlen), *sb,
                H, LQ, LK, Tq, 0 if lut is None else lut.shape[1] >> 1, num_m, scale * LOG2E,
            ),
            (D, cfg.block_m, cfg.block_n, *flags, "ieee" if q.dtype == torch.float32 else "tf32", q.is_cuda, tma),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )  # fmt: skip

    if (_AUTOTUNE or _FORCE) and _autotune_on() and "fwd" not in _FORCE:
        cfg = _tuned("fwd", D, q, (*flags, tma), (max_q, max_k), launch, cfg)[0]
    launch(cfg)
    return out, lse


def _bwd_impl(
    dout, q, k, v, out, lse, lut, alibi, bias, cu_q, cu_k, max_q, max_k, scale, causal, need_dlut, need_dbias,
    bkt=None, n_buckets=0,
):  # fmt: skip
    """(dq, dk, dv, d_lut, d_bias); d_lut fp32 ``(H, 2R+1)`` or, with ``bkt`` (the buckets of the lookup's slots)
    and ``n_buckets`` (the table route), the table's gradient in fp32 ``(num_buckets, H)``; d_bias in the bias's
    dtype and shape. Gradients that are not needed are ``None``."""
    varlen = cu_q is not None
    if varlen:
        Tq, H, D = q.shape
        nb, LQ, LK = cu_q.shape[0] - 1, 0, 0
    else:
        nb, LQ, H, D = q.shape
        LK, Tq, max_q, max_k = k.shape[1], nb * LQ, LQ, k.shape[1]
    rel_grad = lut is not None and need_dlut
    bias_grad = bias is not None and need_dbias
    buckets = rel_grad and bkt is not None
    if q.numel() == 0 or k.numel() == 0:  # no kernel runs: the (possibly non-empty) other side's gradients are 0
        dlut = None
        if rel_grad:
            dlut = lut.new_zeros((n_buckets, H)) if buckets else torch.zeros_like(lut)
        dbias = torch.zeros_like(bias) if bias_grad else None
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), dlut, dbias
    variant = _bwd_variant()
    fused = variant == "fused"
    # split2/split3: the dQ kernel first (it computes delta), then dK/dV: no prep kernel. d_lut is reduced by the
    # dK/dV kernel in split2 (zeroed by the dQ kernel), by the dQ kernel in split3 (zeroed by a memset before it).
    dq_first = variant in ("split2", "split3")
    lut_in_kv = variant == "split2"
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        q, k, v = _rowview(q), _rowview(k), _rowview(v)
    if not dout.is_contiguous():  # the kernels address dO like out: flat (tokens, H, D)
        dout = dout.contiguous()
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    # fused: dQ is accumulated by atomics in fp32 (zeroed by the prep kernel) and cast at the end
    dq = q.new_empty(q.shape, dtype=torch.float32) if fused else torch.empty_like(q)
    delta = torch.empty_like(lse)
    W = 1 if lut is None else lut.shape[1]
    if not rel_grad:
        dlut = lse
        wz = 0
    elif buckets:  # the table's gradient, fp32 (num_buckets, H), reduced in-kernel through the buckets
        dlut = lut.new_empty((n_buckets, H))
        wz = dlut.numel()
    else:
        dlut = torch.empty_like(lut)
        wz = dlut.numel()
    if rel_grad and variant == "split3":
        dlut.zero_()
    interp = not q.is_cuda
    if not dq_first:  # delta = rowsum(dO * O); zeroes the fused dQ accumulator and d_lut
        blk = 16 if interp else 64
        _PREP(
            (_cdiv(Tq, blk), H), (out, dout, delta, dq, dlut, H, Tq, wz // H),
            (D, blk, fused, rel_grad, min(1024, next_pow2(max(1, wz // H)))), num_warps=4, num_stages=1,
        )  # fmt: skip

    if bias is None:
        bias4, sb = lse, _NO_BIAS_STRIDES
    else:
        bias4 = _bias4(bias)
        sb = _bcast_strides(bias4)
    if bias_grad:
        dbias32 = torch.zeros(bias4.shape, device=q.device, dtype=torch.float32)
        sdb = _bcast_strides(dbias32)
        bc = [n == 1 and full > 1 for n, full in zip(bias4.shape, (nb, H, LQ, LK))]
        db_atomic, db_bm, db_bn = bc[0] or bc[1], bc[2], bc[3]
    else:
        dbias32, sdb, db_atomic, db_bm, db_bn = lse, _NO_BIAS_STRIDES, False, False, False
    dot_prec = "ieee" if q.dtype == torch.float32 else "tf32"
    diag = bool(_FORCE.get("diag_gather", True)) if _FORCE else True
    lut_ = lse if lut is None else lut
    alibi_ = lse if alibi is None else alibi
    bkt_ = bkt if buckets else lse
    cq, ck = (cu_q, cu_k) if varlen else (lse, lse)
    sqkv = _qkv_strides(q, k, v, varlen)
    R, scale2 = W >> 1, scale * LOG2E
    has = (lut is not None, alibi is not None, bias is not None)

    tune = (_AUTOTUNE or bool(_FORCE)) and _autotune_on()
    flags = (causal, *has, rel_grad, bias_grad, varlen, variant, bkt is not None, db_bm, db_bn, db_atomic)

    def reset():  # zero what the autotuner's timing launches added into (only after they ran)
        if fused:
            dq.zero_()
        if rel_grad:
            dlut.zero_()
        if bias_grad:
            dbias32.zero_()

    def launch_dq(cfg):  # dQ (+ d_bias; + d_lut unless split2): one program per query block, looping over keys
        num_m = max(1, _cdiv(max_q, cfg.block_m))
        _DQ(
            (num_m * nb * H,),
            (
                q, k, v, dout, dq, lse, delta, lut_, dlut, alibi_, bias4, dbias32, cq, ck, bkt_, out, *sqkv, *sb,
                *sdb, H, LQ, LK, Tq, R, num_m, wz, scale2, scale,
            ),
            (
                D, cfg.block_m, cfg.block_n, causal, has[0], rel_grad and not lut_in_kv, has[1], has[2], bias_grad,
                db_bm, db_bn, db_atomic, varlen, diag, dot_prec, not interp, buckets, dq_first,
                lut_in_kv and rel_grad, min(1024, next_pow2(max(1, wz))),
            ),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )  # fmt: skip

    def run_dq():
        name = "dq2" if lut_in_kv else "dq"
        cfg = _config(name, D, q.device, q.dtype)
        if tune and "dq" not in _FORCE and name not in _FORCE:
            cfg, dirty = _tuned(name, D, q, flags, (max_q, max_k), launch_dq, cfg)
            if dirty:
                reset()
        launch_dq(cfg)

    if dq_first:
        run_dq()
    # dK, dV (fused: + dQ, d_lut, d_bias; split2: + d_lut): one program per key block, looping over queries
    kv_rel = rel_grad and (fused or lut_in_kv)
    if fused:
        kname = "kv" if rel_grad else "kv_nolut"
    else:
        kname = "dkdv_lut" if kv_rel else ("dkdv_causal" if causal else "dkdv")

    def launch_kv(cfg):
        num_n = max(1, _cdiv(max_k, cfg.block_n))  # >= 1 (grid stride, see _attn_fwd)
        _KV(
            (num_n * nb * H,),
            (
                q, k, v, dout, dk, dv, dq, lse, delta, lut_, dlut, alibi_, bias4, dbias32, cq, ck, bkt_, *sqkv, *sb,
                *sdb, H, LQ, LK, Tq, R, num_n, scale2, scale,
            ),
            (
                D, cfg.block_m, cfg.block_n, causal, *has, varlen, fused, kv_rel, bias_grad and fused,
                db_bm, db_bn, db_atomic, diag, dot_prec, not interp, cfg.dq_t, buckets,
            ),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )  # fmt: skip

    cfg = _config(kname, D, q.device, q.dtype)
    if tune and not fused and "dkdv" not in _FORCE and kname not in _FORCE:
        cfg, dirty = _tuned(kname, D, q, flags, (max_q, max_k), launch_kv, cfg)
        if dirty and kv_rel:  # split2: d_lut (zeroed by the dQ kernel) is reduced here; split: dK/dV are stores
            dlut.zero_()
    launch_kv(cfg)
    if fused:
        if scale != 1.0:
            dq.mul_(scale)
        dq = dq.to(q.dtype)
    elif not dq_first:
        run_dq()
    dbias = dbias32.to(bias.dtype).reshape(bias.shape) if bias_grad else None
    return dq, dk, dv, dlut if rel_grad else None, dbias


# ----------------------------------------------------------------------------------------------------------------
# Autograd: a torch.autograd.Function on the eager path (cheap), torch.library custom ops under torch.compile
# (opaque to Dynamo, with fake implementations); both call the launchers above.
# ----------------------------------------------------------------------------------------------------------------


class _FlashAttention(torch.autograd.Function):
    """The eager route. ``table`` (with ``lut`` None) is the table route (see ``TABLE_ROUTES``): the lookup is
    gathered here without an autograd node and the kernels reduce its gradient into the table's rows. The non-tensor
    arguments come as one tuple (``apply`` walks every argument)."""

    @staticmethod
    def forward(ctx, q, k, v, lut, table, alibi, bias, cu_q, cu_k, params):
        max_q, max_k, scale, causal, bkt = params
        if table is not None:
            lut = table.t().to(torch.float32).index_select(1, bkt)  # (H, 2R+1): t5_bias_lut without autograd
        out, lse = _fwd_impl(q, k, v, lut, alibi, bias, cu_q, cu_k, max_q, max_k, scale, causal)
        ctx.save_for_backward(q, k, v, out, lse, lut, alibi, bias, cu_q, cu_k)
        ctx.params = params
        ctx.table = None if table is None else (table.dtype, table.shape[0])
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, lut, alibi, bias, cu_q, cu_k = ctx.saved_tensors
        max_q, max_k, scale, causal, bkt = ctx.params
        need = ctx.needs_input_grad
        tab = ctx.table
        dq, dk, dv, dlut, dbias = _bwd_impl(
            dout, q, k, v, out, lse, lut, alibi, bias, cu_q, cu_k, max_q, max_k, scale, causal,
            need[4] if tab else need[3], need[6], bkt if tab else None, tab[1] if tab else 0,
        )  # fmt: skip
        if tab is None:
            return dq, dk, dv, dlut, None, None, dbias, None, None, None
        if dlut is not None and tab[0] != torch.float32:
            dlut = dlut.to(tab[0])
        return dq, dk, dv, None, dlut, None, dbias, None, None, None


_apply = function_apply(_FlashAttention)


@custom_op("flasht5::flash_attn_fwd", mutates_args=())
def _flash_attn_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rel_lut: Optional[torch.Tensor],  # noqa: UP045 (torch.library schema inference)
    alibi_slopes: Optional[torch.Tensor],  # noqa: UP045 (torch.library schema inference)
    bias: Optional[torch.Tensor],  # noqa: UP045 (torch.library schema inference)
    cu_seqlens_q: Optional[torch.Tensor],  # noqa: UP045 (torch.library schema inference)
    cu_seqlens_k: Optional[torch.Tensor],  # noqa: UP045 (torch.library schema inference)
    max_seqlen_q: int,
    max_seqlen_k: int,
    scale: float,
    causal: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _fwd_impl(
        q, k, v, rel_lut, alibi_slopes, bias, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, causal
    )


@_flash_attn_fwd.register_fake
def _flash_attn_fwd_fake(
    q, k, v, rel_lut, alibi_slopes, bias, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, causal
):  # fmt: skip
    allow_inductor_fallback()
    tq = q.shape[0] if cu_seqlens_q is not None else q.shape[0] * q.shape[1]
    return q.new_empty(q.shape), q.new_empty((q.shape[-2], tq), dtype=torch.float32)


@custom_op("flasht5::flash_attn_bwd", mutates_args=())
def _flash_attn_bwd(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    rel_lut: Optional[torch.Tensor],  # noqa: UP045 (torch.library schema inference)
    alibi_slopes: Optional[torch.Tensor],  # noqa: UP045 (torch.library schema inference)
    bias: Optional[torch.Tensor],  # noqa: UP045 (torch.library schema inference)
    cu_seqlens_q: Optional[torch.Tensor],  # noqa: UP045 (torch.library schema inference)
    cu_seqlens_k: Optional[torch.Tensor],  # noqa: UP045 (torch.library schema inference)
    max_seqlen_q: int,
    max_seqlen_k: int,
    scale: float,
    causal: bool,
    need_dlut: bool,
    need_dbias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, dv, dlut, dbias = _bwd_impl(
        dout, q, k, v, out, lse, rel_lut, alibi_slopes, bias, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
        max_seqlen_k, scale, causal, need_dlut, need_dbias,
    )  # fmt: skip
    # a custom op returns tensors: empty ones for the gradients that are not needed
    return dq, dk, dv, q.new_empty(0) if dlut is None else dlut, q.new_empty(0) if dbias is None else dbias


@_flash_attn_bwd.register_fake
def _flash_attn_bwd_fake(
    dout, q, k, v, out, lse, rel_lut, alibi_slopes, bias, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
    scale, causal, need_dlut, need_dbias,
):  # fmt: skip
    allow_inductor_fallback()
    dlut = rel_lut.new_empty(rel_lut.shape) if rel_lut is not None and need_dlut else q.new_empty(0)
    dbias = bias.new_empty(bias.shape) if bias is not None and need_dbias else q.new_empty(0)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dlut, dbias


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, lut, alibi, bias, cu_q, cu_k, max_q, max_k, scale, causal = inputs
    out, lse = output
    ctx.set_materialize_grads(False)  # the LSE is never differentiated: no zero-filled (H, T) grad per backward
    ctx.save_for_backward(q, k, v, out, lse, lut, alibi, bias, cu_q, cu_k)
    ctx.params = (max_q, max_k, scale, causal)


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, lut, alibi, bias, cu_q, cu_k = ctx.saved_tensors
    need_dlut = lut is not None and ctx.needs_input_grad[3]
    need_dbias = bias is not None and ctx.needs_input_grad[5]
    if dout is None:  # only the LSE was used downstream (not reachable through flash_attention)
        dout = torch.zeros_like(out)
    dq, dk, dv, dlut, dbias = _flash_attn_bwd(
        dout, q, k, v, out, lse, lut, alibi, bias, cu_q, cu_k, *ctx.params, need_dlut, need_dbias
    )
    return (
        dq, dk, dv, dlut if need_dlut else None, None, dbias if need_dbias else None,
        None, None, None, None, None, None,
    )  # fmt: skip


_flash_attn_fwd.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------------


def _debug_checks() -> bool:
    return os.environ.get("FLASHT5_DEBUG", "0") not in ("", "0", "false", "False")


def _check_cu_seqlens(name: str, cu: object, tokens: int, device: torch.device, count_name: str) -> None:
    if not isinstance(cu, torch.Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(cu).__name__}")
    if cu.dtype != torch.int32:
        raise ValueError(f"{name} must be int32, got {cu.dtype}")
    if cu.dim() != 1 or cu.shape[0] < 1:
        raise ValueError(f"{name} must be 1-D with num_seqs + 1 >= 1 entries, got shape {tuple(cu.shape)}")
    if cu.device != device:
        raise ValueError(f"{name} must be on {device}, got {cu.device}")
    # Value checks read the tensor: free on the CPU, a GPU sync otherwise (only with FLASHT5_DEBUG=1).
    if (not cu.is_cuda or _debug_checks()) and not torch.compiler.is_compiling():
        vals = cu.tolist()
        if vals[0] != 0:
            raise ValueError(f"{name} must start at 0, got {vals[0]}")
        if any(b < a for a, b in zip(vals, vals[1:])):
            raise ValueError(f"{name} must be non-decreasing (monotone)")
        if vals[-1] != tokens:
            raise ValueError(f"{name}[-1] = {vals[-1]} must equal the number of {count_name} tokens ({tokens})")


def _max_seqlens(cu_q: torch.Tensor, cu_k: torch.Tensor, max_q, max_k) -> tuple[int, int]:
    """Fill in a ``None`` max_seqlen from cu_seqlens (one host sync for both; a graph break under torch.compile)."""
    if max_q is None or max_k is None:
        if cu_q.shape[0] < 2:
            mq = mk = 0
        else:
            mq, mk = torch.stack(((cu_q[1:] - cu_q[:-1]).max(), (cu_k[1:] - cu_k[:-1]).max())).tolist()
        max_q = mq if max_q is None else max_q
        max_k = mk if max_k is None else max_k
    for name, val in (("max_seqlen_q", max_q), ("max_seqlen_k", max_k)):
        if not isinstance(val, int) or val < 0:
            raise ValueError(f"{name} must be a non-negative int, got {val!r}")
    return max_q, max_k


def _check_inputs(
    q, k, v, scale, causal, rel_table, rel_bidirectional, rel_max_distance, rel_lut, alibi_slopes, bias, cu_q, cu_k,
    max_q, max_k,
):  # fmt: skip
    """Validate :func:`flash_attention`'s arguments (shapes, dtypes, devices, Python types; values only of CPU
    tensors or under FLASHT5_DEBUG=1) and return the launchers' arguments ``(q, k, v, lut, alibi, bias, cu_q, cu_k,
    max_q, max_k, scale, causal)`` and ``bkt``, the buckets of the lookup's slots when ``rel_table`` is given
    (``lut`` is then None: :func:`flash_attention` builds it by the chosen route), else None."""
    varlen = cu_q is not None or cu_k is not None
    nd = 3 if varlen else 4
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
        if t.dim() != nd:
            layout = "(T, H, D) with cu_seqlens" if varlen else "(B, L, H, D)"
            raise ValueError(f"{name} must be {layout}, got shape {tuple(t.shape)}")
    dtype, device = q.dtype, q.device
    if dtype not in _DTYPES:
        raise ValueError(f"q: unsupported dtype {dtype} (float16, bfloat16 or float32)")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != dtype:
            raise ValueError(f"{name}.dtype {t.dtype} must match q.dtype {dtype}")
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but q is on {device}")
    if not q.is_cuda:
        check_kernel_device(q, "q")
        if dtype == torch.bfloat16:
            raise ValueError("q: bfloat16 is not supported by the Triton interpreter (use float32/float16 on CPU)")
    qs, ks = q.shape, k.shape
    H, D = qs[-2], qs[-1]
    if D not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"q: head dim {D} is not supported (supported: {SUPPORTED_HEAD_DIMS})")
    if ks != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(ks)} and {tuple(v.shape)}")
    if ks[-2] != H or ks[-1] != D:
        raise ValueError(f"k: heads/head dim {tuple(ks[-2:])} must match q's {(H, D)}")
    if not varlen and ks[0] != qs[0]:
        raise ValueError(f"k: batch size {ks[0]} must match q's {qs[0]}")
    if not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite float, got {scale!r}")

    if varlen:
        if cu_q is None or cu_k is None:
            raise ValueError("cu_seqlens_q and cu_seqlens_k must be given together (varlen layout)")
        _check_cu_seqlens("cu_seqlens_q", cu_q, qs[0], device, "query")
        _check_cu_seqlens("cu_seqlens_k", cu_k, ks[0], device, "key")
        if cu_q.shape[0] != cu_k.shape[0]:
            raise ValueError(f"cu_seqlens_k has {cu_k.shape[0]} entries but cu_seqlens_q has {cu_q.shape[0]}")
        if cu_q.stride(0) != 1 or cu_k.stride(0) != 1:  # the kernels read them with unit stride
            cu_q, cu_k = cu_q.contiguous(), cu_k.contiguous()
        max_q, max_k = _max_seqlens(cu_q, cu_k, max_q, max_k)
        if bias is not None:
            raise ValueError("bias is only supported for the dense layout (not with cu_seqlens)")
    else:
        max_q, max_k = qs[1], ks[1]

    n_pos = (rel_table is not None) + (rel_lut is not None) + (alibi_slopes is not None)
    if n_pos > 1:
        raise ValueError("rel_table, rel_lut and alibi_slopes are exclusive: pass one position bias")
    lut, bkt = rel_lut, None
    if rel_table is not None:
        if not isinstance(rel_table, torch.Tensor) or rel_table.dim() != 2 or rel_table.shape[1] != H:
            shape = tuple(rel_table.shape) if isinstance(rel_table, torch.Tensor) else type(rel_table).__name__
            raise ValueError(f"rel_table must be (num_buckets, H={H}), got {shape}")
        if not rel_table.is_floating_point():
            raise ValueError(f"rel_table must be floating point, got {rel_table.dtype}")
        if rel_table.device != device:
            raise ValueError(f"rel_table is on {rel_table.device} but q is on {device}")
        # validates num_buckets / max distance; the lookup itself is built by the chosen route (flash_attention)
        bkt = lut_buckets(device, bool(rel_bidirectional), rel_table.shape[0], rel_max_distance)[0]
    elif rel_lut is not None:
        if not isinstance(rel_lut, torch.Tensor) or rel_lut.dim() != 2 or rel_lut.shape[0] != H:
            shape = tuple(rel_lut.shape) if isinstance(rel_lut, torch.Tensor) else type(rel_lut).__name__
            raise ValueError(f"rel_lut must be (H={H}, 2R+1) (see t5_bias_lut), got {shape}")
        if rel_lut.shape[1] % 2 != 1:
            raise ValueError(f"rel_lut must have an odd width 2R+1 (distances -R..R), got {rel_lut.shape[1]}")
        if not rel_lut.is_floating_point():
            raise ValueError(f"rel_lut must be floating point, got {rel_lut.dtype}")
        if rel_lut.device != device:
            raise ValueError(f"rel_lut is on {rel_lut.device} but q is on {device}")
        # The kernels read fp32. A half lookup (FSDP2's mixed precision casts the forward inputs of every block,
        # the lookup among them) is widened here; autograd casts its gradient back.
        if rel_lut.dtype != torch.float32 or not rel_lut.is_contiguous():
            lut = rel_lut.float().contiguous()
    if alibi_slopes is not None:
        if not isinstance(alibi_slopes, torch.Tensor) or alibi_slopes.shape != (H,):
            shape = tuple(alibi_slopes.shape) if isinstance(alibi_slopes, torch.Tensor) else alibi_slopes
            raise ValueError(f"alibi_slopes must have shape ({H},), got {shape}")
        if not alibi_slopes.is_floating_point() or alibi_slopes.device != device:
            raise ValueError(f"alibi_slopes must be a float tensor on {device}")
        if alibi_slopes.requires_grad and torch.is_grad_enabled():
            raise ValueError("alibi_slopes: gradients are not supported (detach the slopes)")
        if alibi_slopes.stride(0) != 1:
            alibi_slopes = alibi_slopes.contiguous()
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or not bias.is_floating_point():
            raise ValueError("bias must be a floating-point tensor")
        if bias.device != device:
            raise ValueError(f"bias is on {bias.device} but q is on {device}")
        full = (qs[0], H, qs[1], ks[1])
        if bias.dim() > 4 or any(n not in (1, f) for n, f in zip(bias.shape[::-1], full[::-1])):
            raise ValueError(f"bias of shape {tuple(bias.shape)} is not broadcastable to (B, H, Lq, Lk) = {full}")
    scale = scale if type(scale) is float else float(scale)
    return q, k, v, lut, alibi_slopes, bias, cu_q, cu_k, max_q, max_k, scale, bool(causal), bkt


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
    rel_lut: torch.Tensor | None = None,
    alibi_slopes: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
) -> torch.Tensor:
    """Flash attention with T5 relative-position bias / ALiBi / additive bias, causal and varlen (module docstring).

    Dense: q ``(B, Lq, H, D)``, k/v ``(B, Lk, H, D)``. Varlen: q ``(Tq, H, D)``, k/v ``(Tk, H, D)`` with int32
    ``cu_seqlens_q``/``cu_seqlens_k`` (``num_seqs + 1``) and ``max_seqlen_q``/``max_seqlen_k`` (computed with one
    sync when None; an understated value is slower, never wrong). The T5 bias comes either as ``rel_table``
    (``(num_buckets, H)``, with ``rel_bidirectional``/``rel_max_distance``) or precomputed as
    ``rel_lut = t5_bias_lut(rel_table, rel_bidirectional, rel_max_distance)`` (build it once, pass it to every layer
    that shares the table). Returns a new tensor shaped like ``q``. T5 uses ``scale=1.0``.
    """
    q, k, v, lut, alibi, bias, cu_q, cu_k, max_q, max_k, scale, causal, bkt = _check_inputs(
        q, k, v, scale, causal, rel_table, rel_bidirectional, rel_max_distance, rel_lut, alibi_slopes, bias,
        cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
    )  # fmt: skip
    custom = use_custom_op(q)
    grad = torch.is_grad_enabled()
    table = None
    if bkt is not None:
        if grad and rel_table.requires_grad and not custom and _table_route() == "kernel":
            table = rel_table
        else:  # t5_bias_lut's body (differentiable by autograd when the table needs a gradient)
            lut = rel_table.t().to(torch.float32).index_select(1, bkt)
    if custom:
        return _flash_attn_fwd(q, k, v, lut, alibi, bias, cu_q, cu_k, max_q, max_k, scale, causal)[0]
    if grad and (
        table is not None
        or q.requires_grad
        or k.requires_grad
        or v.requires_grad
        or (lut is not None and lut.requires_grad)
        or (bias is not None and bias.requires_grad)
    ):
        return _apply(q, k, v, lut, table, alibi, bias, cu_q, cu_k, (max_q, max_k, scale, causal, bkt))
    return _fwd_impl(q, k, v, lut, alibi, bias, cu_q, cu_k, max_q, max_k, scale, causal)[0]


# ----------------------------------------------------------------------------------------------------------------
# Reference (plain PyTorch, materialised bias)
# ----------------------------------------------------------------------------------------------------------------


def _ref_dense(q, k, v, scale, causal, rel_table, rel_bidirectional, rel_max_distance, rel_lut, alibi_slopes, bias,
               dtype):  # fmt: skip
    Lq, Lk = q.shape[1], k.shape[1]
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale  # (B, H, Lq, Lk)
    qpos = torch.arange(Lq, device=q.device) + (Lk - Lq)  # bottom-right aligned queries
    rel = torch.arange(Lk, device=q.device)[None, :] - qpos[:, None]  # key_pos - query_pos, (Lq, Lk)
    if rel_table is not None:
        buckets = relative_position_bucket(rel, rel_bidirectional, rel_table.shape[0], rel_max_distance)
        s = s + rel_table.to(dtype)[buckets].permute(2, 0, 1)[None]  # (Lq, Lk, H) -> (1, H, Lq, Lk)
    if rel_lut is not None:
        R = (rel_lut.shape[1] - 1) // 2
        s = s + rel_lut.to(dtype)[:, rel.clamp(-R, R) + R][None]  # (H, Lq, Lk) -> (1, H, Lq, Lk)
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
    rel_lut: torch.Tensor | None = None,
    alibi_slopes: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    upcast: bool = True,
) -> torch.Tensor:
    """Plain-PyTorch reference of :func:`flash_attention` (materialises the (Lq, Lk) scores and bias; the T5 bias
    from HF's bucket formula for ``rel_table``, from the clamped lookup for ``rel_lut``). ``max_seqlen_*`` are
    ignored (every sequence is computed in full).

    Computes in fp32 when ``upcast`` (the accuracy reference), else in the inputs' dtype (the "same dtype" term of
    the error-ratio rule). Returns the result in that compute dtype.
    """
    dtype = torch.float32 if upcast else q.dtype
    kw = dict(
        scale=scale, causal=causal, rel_table=rel_table, rel_bidirectional=rel_bidirectional,
        rel_max_distance=rel_max_distance, rel_lut=rel_lut, alibi_slopes=alibi_slopes,
    )  # fmt: skip
    if cu_seqlens_q is None:
        return _ref_dense(q, k, v, bias=bias, dtype=dtype, **kw)
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    outs = []
    for i in range(len(cq) - 1):
        qs, ks = slice(cq[i], cq[i + 1]), slice(ck[i], ck[i + 1])
        outs.append(_ref_dense(q[qs][None], k[ks][None], v[ks][None], bias=None, dtype=dtype, **kw)[0])
    return torch.cat(outs, 0) if outs else q.new_empty(q.shape, dtype=dtype)

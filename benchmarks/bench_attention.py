"""Benchmark: flash attention with the T5 bias (flasht5) against SDPA and FlexAttention, in one process.

Rows of the main table (bf16, H=12, ~32k tokens per batch: batch = 32768 // L), ratios against the ceiling:
  sdpa         CEILING: SDPA's default dispatch without any bias (what users get; cuDNN attention on the H200)
  sdpa-flash   SDPA pinned to the FlashAttention-2 backend (``sdpa_kernel(SDPBackend.FLASH_ATTENTION)``)
  sdpa-cudnn   SDPA pinned to cuDNN attention (``SDPBackend.CUDNN_ATTENTION``)
  ours-t5      flasht5 ``flash_attention`` with the T5 bucket table (fp32 table; fwd+bwd includes its gradient,
               i.e. t5_bias_lut's gather and scatter as well)
  ours-alibi   flasht5 with ALiBi
  ours-nobias  flasht5 without any bias (the kernel itself; target >= 0.95x the ceiling)
  sdpa-bias    the T5 path without a fused kernel: gather table[buckets] -> (1, H, L, L) bias (requires grad), then
               SDPA (its backward computes the bias gradient, the gather's backward scatters it into the table)
  flex-t5      FlexAttention (torch.compile) with the same bias as a score_mod (table captured, requires grad)
Plus: cross-attention shapes (Lq x Lk = 114 x 512, 512 x 2048, no bias), packed varlen documents of mixed lengths
vs dense batches of the same work, and peak memory of fwd+bwd at L=16384.

Modes (each a separate run):
  (default)        the sections above; --quick: D=64, L in {1024, 4096}, fewer competitors
  --bwd-variants   the two backward schemes ("fused": one kernel, atomic dQ; "split": dK/dV + dQ kernels) at
                   32k tokens, D in {64, 128}, L in {512, 1024, 4096}, causal and not, T5 lookup with its gradient:
                   forward, backward-only and fwd+bwd times, backward / forward ratio, and each variant's error
                   against the fp32 reference on the GPU (max error, error ratio of the test rule)
  --host           host overhead per call (tiny inputs, wall time): ours vs SDPA, forward and forward+backward
  --screen         (no GPU needed) compile the candidate tiles for sm90 and report registers / spills / shared mem
  --sweep          tile sweep of every kernel at L=2048 (then the main table with the winners)
  --shape-sweep    forward tiles per (causal, L), D=64, T5 bias

Slow competitors are timed once (a single call after a warm-up) when one call exceeds 100 ms; some are skipped at
long L because a single backward takes seconds (the table's scatter gradient): the table says so.

  PYTHONPATH=src python3 benchmarks/bench_attention.py [--quick] [--bwd-variants] [--host] [--screen] [--sweep]
                                                       [--out results.md] [--plot attention.png]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import utils  # noqa: E402

from flasht5.ops import attention as A  # noqa: E402

H = 12
TOKENS = 32768
SLOW_MS = 100.0
CEILING = "sdpa"
CROSS_SHAPES = ((114, 512), (512, 2048))  # T5 pretraining (114 targets / 512 inputs) and a long-input one
VARIANT_LENGTHS = (512, 1024, 4096)


def _time(fn) -> tuple[float, str]:
    """Median ms via do_bench, or one timed call when a call is slower than SLOW_MS (note '1x')."""
    fn()  # warm-up / compile
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    once = (time.perf_counter() - t0) * 1e3
    if once > SLOW_MS:
        return once, "1x"
    return utils.bench(fn, warmup=10, rep=40), ""


def _inputs(B: int, L: int, D: int, requires_grad: bool = True, seed: int = 0, Lk: int | None = None):
    Lk = L if Lk is None else Lk
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(B, L, H, D, device="cuda", dtype=torch.bfloat16, generator=g)
    k, v = (torch.randn(B, Lk, H, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
    for x in (q, k, v):
        x.requires_grad_(requires_grad)
    table = (torch.randn(32, H, device="cuda", generator=g) * 0.5).requires_grad_(requires_grad)
    dout = torch.randn(B, L, H, D, device="cuda", dtype=torch.bfloat16, generator=g)
    return q, k, v, table, dout


def _fwd_bwd(f, inputs, dout):
    def run():
        o = f()
        torch.autograd.grad(o, inputs, dout)

    return run


def _bwd_only(f, inputs, dout):
    """Backward alone: one forward kept alive, its graph differentiated again on every call."""
    o = f()

    def run():
        torch.autograd.grad(o, inputs, dout, retain_graph=True)

    return run


def _ours_setup(B, L, D, causal, kind, Lk=None):
    q, k, v, table, dout = _inputs(B, L, D, Lk=Lk)
    if kind == "t5":
        kw = dict(rel_table=table, rel_bidirectional=not causal, rel_max_distance=128)
        ins = [q, k, v, table]
    elif kind == "t5-lut":  # the model's way: the lookup built once per stack, handed to every layer
        lut = A.t5_bias_lut(table, not causal, 128).detach().requires_grad_()
        kw = dict(rel_lut=lut)
        ins = [q, k, v, lut]
    elif kind == "alibi":
        kw = dict(alibi_slopes=torch.tensor([2 ** (-8 * (i + 1) / H) for i in range(H)], device="cuda"))
        ins = [q, k, v]
    else:
        kw = {}
        ins = [q, k, v]
    f = lambda: A.flash_attention(q, k, v, causal=causal, **kw)
    return f, ins, dout


def make_ours(B, L, D, causal, kind, Lk=None):
    f, ins, dout = _ours_setup(B, L, D, causal, kind, Lk)
    return f, _fwd_bwd(f, ins, dout)


def _t5_bias(table, L, causal):
    r = torch.arange(L, device="cuda")
    buckets = A.relative_position_bucket(r[None, :] - r[:, None], not causal, 32, 128)  # (L, L), computed once
    return lambda: table[buckets].permute(2, 0, 1)[None]  # (1, H, L, L) fp32 gather, differentiable


def make_sdpa_bias(B, L, D, causal):
    import torch.nn.functional as F

    q, k, v, table, dout = _inputs(B, L, D)
    bias_fn = _t5_bias(table, L, causal)
    mask = torch.ones(L, L, dtype=torch.bool, device="cuda").tril() if causal else None

    def f():
        b = bias_fn()
        if mask is not None:
            b = b.masked_fill(~mask, float("-inf"))
        qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
        return F.scaled_dot_product_attention(qt, kt, vt, attn_mask=b.to(q.dtype), scale=1.0).transpose(1, 2)

    return f, _fwd_bwd(f, [q, k, v, table], dout)


_FLEX_CACHE: dict = {}


def make_flex(B, L, D, causal):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    q, k, v, table, dout = _inputs(B, L, D)
    r = torch.arange(-(L - 1), L, device="cuda")
    buckets = A.relative_position_bucket(r, not causal, 32, 128)  # bucket of distance kv - q, offset by L - 1

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + table[buckets[kv_idx - q_idx + (L - 1)], h]

    block_mask = None
    if causal:
        block_mask = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, L, L, device="cuda")
    if "fn" not in _FLEX_CACHE:
        _FLEX_CACHE["fn"] = torch.compile(flex_attention, dynamic=False)
    flex = _FLEX_CACHE["fn"]
    opts = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_M1": 32, "BLOCK_N1": 64, "BLOCK_M2": 64, "BLOCK_N2": 32}

    def f():
        qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
        o = flex(qt, kt, vt, score_mod=score_mod, block_mask=block_mask, scale=1.0, kernel_options=opts)
        return o.transpose(1, 2)

    return f, _fwd_bwd(f, [q, k, v, table], dout)


def _sdpa_backend(backend: str | None):
    """Context manager pinning SDPA to ``backend`` ("flash", "cudnn"), or SDPA's own choice (None)."""
    import contextlib

    from torch.nn.attention import SDPBackend, sdpa_kernel

    if backend is None:
        return contextlib.nullcontext()
    return sdpa_kernel({"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[backend])


def make_sdpa(B, L, D, causal, backend=None, Lk=None):
    """SDPA without bias: default dispatch (the ceiling) or a pinned backend. Bottom-right causal when Lq != Lk is
    not what is_causal does (top-left), so causal rows are only built for Lq == Lk."""
    import torch.nn.functional as F

    q, k, v, _, dout = _inputs(B, L, D, Lk=Lk)

    def f():
        with _sdpa_backend(backend):
            qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
            return F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal, scale=1.0).transpose(1, 2)

    return f, _fwd_bwd(f, [q, k, v], dout)


def _kernel_names(fn, n: int = 2) -> str:
    """The longest-running CUDA kernels of one call of ``fn`` (which backend SDPA's default dispatch picked)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    evts = [e for e in prof.key_averages() if getattr(e, "self_device_time_total", 0.0) > 0]
    evts.sort(key=lambda e: -e.self_device_time_total)
    return "; ".join(e.key[:48] for e in evts[:n])


def measure(rows, method, maker, B, L, D, causal, *extra, modes=("fwd", "fwd_bwd"), Lk=None, **kw):
    """Time ``maker(B, L, D, causal, *extra, **kw)`` -> (fwd, fwd+bwd) closures; append a row (errors are
    recorded). ``Lk``: key length (cross-attention), default L."""
    Lk_ = L if Lk is None else Lk
    row = dict(method=method, D=D, causal=causal, L=L if Lk is None else f"{L}x{Lk}", B=B)
    try:
        fwd, fb = maker(B, L, D, causal, *extra, **({"Lk": Lk} if Lk is not None else {}), **kw)
        for mode, fn in (("fwd", fwd), ("fwd_bwd", fb)):
            if mode not in modes:
                continue
            ms, note = _time(fn)
            row[f"{mode}_ms"] = ms
            row[f"{mode}_tflops"] = utils.tflops(utils.attention_flops(B, H, L, Lk_, D, causal=causal, mode=mode), ms)
            if note:
                row["note"] = (row.get("note", "") + f" {mode}:{note}").strip()
        if method == CEILING:
            row["note"] = (row.get("note", "") + " kernels: " + _kernel_names(fwd)).strip()
    except Exception as e:  # record the failure (e.g. FlexAttention out of shared memory) and go on
        row["note"] = f"FAILED: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
        traceback.print_exc()
    torch.cuda.empty_cache()
    rows.append(row)
    print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    return row


def add_ratios(rows: list[dict]) -> None:
    """``*_x_ceiling`` = TFLOP/s relative to the ceiling row of the same (D, causal, L)."""
    ceil = {(r["D"], r["causal"], r["L"]): r for r in rows if r["method"] == CEILING}
    for r in rows:
        c = ceil.get((r["D"], r["causal"], r["L"]), {})
        for m in ("fwd", "fwd_bwd"):
            if f"{m}_tflops" in r and f"{m}_tflops" in c:
                r[f"{m}_x_ceiling"] = r[f"{m}_tflops"] / c[f"{m}_tflops"]


THROUGHPUT_COLS = ["method", "D", "causal", "L", "B", "fwd_ms", "fwd_tflops", "fwd_x_ceiling", "fwd_bwd_ms",
                   "fwd_bwd_tflops", "fwd_bwd_x_ceiling", "note"]  # fmt: skip


def throughput_rows(quick: bool) -> list[dict]:
    if quick:
        grid = [(64, L) for L in (1024, 4096)]
    else:
        grid = [(D, L) for D in (64, 128) for L in (512, 1024, 2048, 4096, 8192, 16384)]
    rows: list[dict] = []
    for D, L in grid:
        B = TOKENS // L
        for causal in (False, True):
            measure(rows, CEILING, make_sdpa, B, L, D, causal)
            measure(rows, "sdpa-flash", make_sdpa, B, L, D, causal, "flash")
            measure(rows, "sdpa-cudnn", make_sdpa, B, L, D, causal, "cudnn")
            measure(rows, "ours-nobias", make_ours, B, L, D, causal, "none")
            measure(rows, "ours-t5", make_ours, B, L, D, causal, "t5")
            measure(rows, "ours-alibi", make_ours, B, L, D, causal, "alibi")
            if D == 64 and L <= 8192:  # its backward takes seconds beyond
                bwd_max = 1024 if quick else 4096
                modes = ("fwd", "fwd_bwd") if bwd_max >= L else ("fwd",)
                measure(rows, "sdpa-bias", make_sdpa_bias, B, L, D, causal, modes=modes)
            # FlexAttention compiles per shape (tens of seconds each): one L only
            flex_L = 1024 if quick else 2048
            if D == 64 and flex_L == L and not (quick and causal):
                measure(rows, "flex-t5", make_flex, B, L, D, causal)
    add_ratios(rows)
    return rows


def cross_rows(quick: bool) -> list[dict]:
    """Cross-attention (no position bias in T5), Lq != Lk, 32k key tokens per batch."""
    rows: list[dict] = []
    for D in (64,) if quick else (64, 128):
        for Lq, Lk in CROSS_SHAPES:
            B = TOKENS // Lk
            measure(rows, CEILING, make_sdpa, B, Lq, D, False, Lk=Lk)
            measure(rows, "sdpa-flash", make_sdpa, B, Lq, D, False, "flash", Lk=Lk)
            measure(rows, "sdpa-cudnn", make_sdpa, B, Lq, D, False, "cudnn", Lk=Lk)
            measure(rows, "ours-nobias", make_ours, B, Lq, D, False, "none", Lk=Lk)
    add_ratios(rows)
    return rows


# Candidate tiles (BLOCK_M, BLOCK_N, warps, stages) per head dim for the sweep (the first entry of each list is
# the table default); `--screen` compiles them for sm90 offline (registers, spills, shared memory).
SWEEP = {
    64: {
        "fwd": [
            (64, 64, 4, 3),
            (128, 64, 8, 3),
            (128, 64, 8, 4),
            (128, 128, 8, 3),
            (64, 64, 4, 4),
            (128, 64, 4, 3),
            (64, 128, 4, 3),
            (128, 32, 4, 3),
        ],
        "dkdv": [(64, 64, 4, 3), (32, 64, 4, 3), (32, 128, 8, 3), (64, 128, 8, 3), (32, 64, 4, 4)],
        "dq": [(64, 32, 4, 3), (128, 32, 8, 3), (64, 32, 4, 4), (64, 64, 8, 3), (128, 64, 8, 3)],
        "kv": [(32, 128, 8, 3), (32, 128, 8, 2), (32, 64, 4, 3), (64, 128, 8, 2), (64, 64, 4, 3), (16, 128, 4, 3)],
        "kv_nolut": [(64, 128, 8, 2), (64, 128, 8, 3), (32, 128, 8, 3), (64, 64, 4, 3), (128, 128, 8, 2)],
        "fwd_tma": [(64, 64, 4, 3), (128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 3), (128, 64, 4, 3)],
        "dkdv_lut": [(64, 64, 4, 3), (32, 64, 4, 3), (32, 128, 8, 3), (64, 128, 8, 3), (64, 64, 8, 3), (64, 64, 4, 4)],
        "dq2": [(64, 32, 4, 4), (64, 32, 4, 3), (128, 32, 8, 3), (64, 64, 4, 3), (128, 64, 8, 3)],
        "dq3": [(64, 32, 4, 4), (64, 32, 4, 3), (128, 32, 8, 3), (64, 64, 8, 3)],
    },
    128: {
        "fwd": [
            (128, 64, 8, 3),
            (64, 64, 4, 3),
            (128, 32, 4, 3),
            (128, 64, 8, 2),
            (64, 32, 4, 3),
            (128, 64, 4, 3),
            (128, 128, 8, 2),
        ],
        "dkdv": [(32, 64, 4, 3), (32, 128, 8, 3), (64, 64, 8, 3), (32, 64, 4, 4), (64, 128, 8, 2)],
        "dq": [(64, 32, 4, 3), (128, 32, 8, 3), (64, 64, 8, 3), (64, 32, 4, 4), (128, 64, 8, 3)],
        "kv": [(32, 64, 8, 3), (32, 64, 8, 2), (32, 128, 8, 2), (64, 64, 8, 2), (16, 64, 4, 3), (32, 64, 4, 3)],
        "kv_nolut": [(32, 128, 8, 2), (64, 64, 8, 2), (32, 64, 8, 3), (64, 128, 8, 2)],
        "fwd_tma": [(64, 64, 4, 3), (128, 64, 8, 3), (128, 32, 4, 3), (128, 64, 8, 2)],
        "dkdv_lut": [(32, 64, 4, 4), (32, 64, 4, 3), (64, 64, 8, 3), (32, 128, 8, 2), (64, 128, 8, 2)],
        "dq2": [(64, 32, 4, 3), (128, 32, 8, 3), (64, 64, 8, 3), (64, 32, 4, 4), (128, 64, 8, 3)],
        "dq3": [(64, 32, 4, 3), (128, 32, 8, 3), (64, 64, 8, 3), (64, 32, 4, 4)],
    },
}
# backward variant of a kernel; the _FORCE key / table key of a kernel name of the sweep
_VARIANT_OF = {
    "dkdv": "split",
    "dq": "split",
    "kv": "fused",
    "kv_nolut": "fused",
    "dkdv_lut": "split2",
    "dq2": "split2",
}
_TABLE_KEY = {"fwd_tma": "fwd", "dq3": "dq"}
_FORCE_KEY = {"kv_nolut": "kv"}


def sweep_configs(D: int, L: int = 2048, kernels: list[str] | None = None) -> list[dict]:
    """Time fwd (forward only) and fwd+bwd with each kernel's candidate tiles forced (T5 bias, bidirectional;
    kv_nolut: no bias)."""
    cands = {k: c for k, c in SWEEP[D].items() if kernels is None or k in kernels}
    B = TOKENS // L
    out = []
    for kernel, cfgs in cands.items():
        for c in cfgs:
            A._FORCE.clear()
            A._FORCE[_FORCE_KEY.get(kernel, kernel)] = A._Cfg(*c)
            if kernel in _VARIANT_OF:
                A._FORCE["bwd"] = _VARIANT_OF[kernel]
            row = dict(kernel=kernel, D=D, cfg=str(c))
            try:
                fwd, fb = make_ours(B, L, D, False, "none" if kernel == "kv_nolut" else "t5")
                ms = utils.bench(fwd if kernel == "fwd" else fb, warmup=10, rep=40)
                row["ms"] = ms
                mode = "fwd" if kernel == "fwd" else "fwd_bwd"
                row["tflops"] = utils.tflops(utils.attention_flops(B, H, L, L, D, causal=False, mode=mode), ms)
            except Exception as e:
                row["note"] = f"FAILED: {type(e).__name__}: {str(e).splitlines()[0][:100]}"
            A._FORCE.clear()
            out.append(row)
            print(row, flush=True)
    # the d_lut reduction's fallback (one atomic per score element in near tiles) against tl.gather
    for variant in [v for v in A.BWD_VARIANTS if kernels is None or {"fused": "kv", "split": "dq"}[v] in kernels]:
        A._FORCE.update(diag_gather=False, bwd=variant)
        fwd, fb = make_ours(B, L, D, False, "t5")
        ms = utils.bench(fb, warmup=10, rep=40)
        A._FORCE.clear()
        tf = utils.tflops(utils.attention_flops(B, H, L, L, D, causal=False, mode="fwd_bwd"), ms)
        out.append(dict(kernel=variant, D=D, cfg="default, per-element d_lut atomics", ms=ms, tflops=tf))
        print(out[-1], flush=True)
    return out


def shape_sweep(D: int = 64) -> list[dict]:
    """Forward tiles per (causal, L) with the T5 bias, against the ceiling measured alongside."""
    rows = []
    for causal in (False, True):
        for L in (512, 1024, 2048, 4096):
            B = TOKENS // L
            fwd, _ = make_sdpa(B, L, D, causal)
            ceil_ms = utils.bench(fwd, warmup=10, rep=40)
            flops = utils.attention_flops(B, H, L, L, D, causal=causal, mode="fwd")
            for c in SWEEP[D]["fwd"]:
                A._FORCE.clear()
                A._FORCE["fwd"] = A._Cfg(*c)
                row = dict(D=D, causal=causal, L=L, cfg=str(c), ceiling_tflops=utils.tflops(flops, ceil_ms))
                try:
                    fwd, _ = make_ours(B, L, D, causal, "t5")
                    ms = utils.bench(fwd, warmup=10, rep=40)
                    row.update(ms=ms, tflops=utils.tflops(flops, ms), x_ceiling=ceil_ms / ms)
                except Exception as e:
                    row["note"] = f"FAILED: {type(e).__name__}"
                A._FORCE.clear()
                rows.append(row)
                print(row, flush=True)
    return rows


VARLEN_DOCS = [4096, 512, 2048, 1024, 512, 4096, 1024, 2048, 512, 1024, 4096, 2048, 512, 1024, 2048, 2048, 1024]


def varlen_rows(D: int) -> list[dict]:
    """Packed documents of mixed lengths (32k tokens) vs dense batches doing the same work (T5 bias, bidir); the
    ceiling (SDPA default, no bias) on dense batches of the same documents for scale."""
    lengths = VARLEN_DOCS + [512] * ((TOKENS - sum(VARLEN_DOCS)) // 512)
    assert sum(lengths) == TOKENS
    g = torch.Generator(device="cuda").manual_seed(0)
    T = TOKENS
    q, k, v = (torch.randn(T, H, D, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_() for _ in "qkv")
    table = (torch.randn(32, H, device="cuda", generator=g) * 0.5).requires_grad_()
    dout = torch.randn(T, H, D, device="cuda", dtype=torch.bfloat16, generator=g)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    kw = dict(rel_table=table, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max(lengths), max_seqlen_k=max(lengths))
    f = lambda: A.flash_attention(q, k, v, **kw)
    flops = {
        m: sum(utils.attention_flops(1, H, n, n, D, causal=False, mode=m) for n in lengths) for m in ("fwd", "fwd_bwd")
    }
    rows = []
    vl = {"fwd": _time(f)[0], "fwd_bwd": _time(_fwd_bwd(f, [q, k, v, table], dout))[0]}
    dense = {"fwd": 0.0, "fwd_bwd": 0.0}
    ceil = {"fwd": 0.0, "fwd_bwd": 0.0}
    for n in sorted(set(lengths)):
        cnt = lengths.count(n)
        for acc, (fwd, fb) in ((dense, make_ours(cnt, n, D, False, "t5")), (ceil, make_sdpa(cnt, n, D, False))):
            acc["fwd"] += _time(fwd)[0]
            acc["fwd_bwd"] += _time(fb)[0]
    for m in ("fwd", "fwd_bwd"):
        rows.append(
            dict(
                mode=m,
                D=D,
                docs=len(lengths),
                varlen_ms=vl[m],
                dense_same_work_ms=dense[m],
                varlen_tflops=utils.tflops(flops[m], vl[m]),
                dense_tflops=utils.tflops(flops[m], dense[m]),
                varlen_x_dense=dense[m] / vl[m],
                ceiling_dense_ms=ceil[m],
                varlen_x_ceiling=ceil[m] / vl[m],
            )  # fmt: skip
        )
        print(rows[-1], flush=True)
    return rows


def memory_rows(L: int = 16384, D: int = 64) -> list[dict]:
    B = TOKENS // L
    rows = []
    for method, maker in (
        (CEILING, lambda: make_sdpa(B, L, D, False)),
        ("sdpa-flash", lambda: make_sdpa(B, L, D, False, "flash")),
        ("ours-nobias", lambda: make_ours(B, L, D, False, "none")),
        ("ours-t5", lambda: make_ours(B, L, D, False, "t5")),
    ):
        fwd, fb = maker()
        fb()
        peak = utils.peak_memory(fb)
        rows.append(dict(method=method, L=L, B=B, D=D, peak_fwd_bwd_MiB=peak / 2**20))
        print(rows[-1], flush=True)
    for r in rows:
        r["x_ceiling"] = r["peak_fwd_bwd_MiB"] / rows[0]["peak_fwd_bwd_MiB"]
    return rows


# ------------------------------------------------------------------------------------------------ backward variants


def _errors(got: torch.Tensor, ref32: torch.Tensor, ref_same: torch.Tensor, atol: float = 1e-2) -> dict:
    """max|got - ref32|, its ratio to max|torch_bf16 - ref32|, and the test rule err <= 2 base + atol * max|ref|."""
    err = (got.float() - ref32).abs().max().item()
    base = (ref_same.float() - ref32).abs().max().item()
    return dict(err=err, ratio=err / max(base, 1e-30), ok=err <= 2 * base + atol * max(1.0, ref32.abs().max().item()))


def variant_correctness(D: int, L: int, causal: bool) -> list[dict]:
    """Each variant against the fp32 reference (materialised bias; HF buckets) on one shape, T5 table gradient
    through the lookup. Batch 2 (1 at L >= 4096) so that the reference's (B, H, L, L) scores fit."""
    B = 2 if L < 4096 else 1
    q, k, v, table, dout = _inputs(B, L, D, seed=1)
    kw = dict(causal=causal, rel_table=table, rel_bidirectional=not causal, rel_max_distance=128)
    refs = {}
    for upcast in (True, False):
        ins = [
            x.detach().float().requires_grad_() if upcast else x.detach().clone().requires_grad_() for x in (q, k, v)
        ]
        tab = table.detach().clone().requires_grad_()
        o = A.flash_attention_ref(*ins, **{**kw, "rel_table": tab}, upcast=upcast)
        refs[upcast] = (o.detach(), *torch.autograd.grad(o, [*ins, tab], dout.float() if upcast else dout))
        del o
    rows = []
    for variant in A.BWD_VARIANTS:
        A._FORCE["bwd"] = variant
        lut = A.t5_bias_lut(table, not causal, 128)
        o = A.flash_attention(q, k, v, rel_lut=lut, causal=causal)
        got = (o.detach(), *torch.autograd.grad(o, [q, k, v, table], dout))
        A._FORCE.clear()
        row = dict(variant=variant, D=D, L=L, B=B, causal=causal)
        for name, g, r32, rs in zip(("out", "dq", "dk", "dv", "dtable"), got, refs[True], refs[False]):
            e = _errors(g, r32, rs)
            row[f"{name}_err"], row[f"{name}_ratio"] = e["err"], e["ratio"]
            row["ok"] = row.get("ok", True) and e["ok"]
        rows.append(row)
        print(row, flush=True)
    del refs
    torch.cuda.empty_cache()
    return rows


def bwd_variant_rows(head_dims=(64, 128), lengths=VARIANT_LENGTHS) -> tuple[list[dict], list[dict]]:
    timing, correct = [], []
    for D in head_dims:
        for L in lengths:
            B = TOKENS // L
            for causal in (False, True):
                flops = {m: utils.attention_flops(B, H, L, L, D, causal=causal, mode=m) for m in ("fwd", "bwd")}
                for variant in A.BWD_VARIANTS:
                    A._FORCE["bwd"] = variant
                    row = dict(variant=variant, D=D, L=L, B=B, causal=causal)
                    try:
                        f, ins, dout = _ours_setup(B, L, D, causal, "t5-lut")
                        row["fwd_ms"] = utils.bench(f, warmup=10, rep=40)
                        row["bwd_ms"] = utils.bench(_bwd_only(f, ins, dout), warmup=10, rep=40)
                        row["fwd_bwd_ms"] = utils.bench(_fwd_bwd(f, ins, dout), warmup=10, rep=40)
                        row["bwd_x_fwd"] = row["bwd_ms"] / row["fwd_ms"]
                        row["fwd_tflops"] = utils.tflops(flops["fwd"], row["fwd_ms"])
                        row["bwd_tflops"] = utils.tflops(flops["bwd"], row["bwd_ms"])
                    except Exception as e:
                        row["note"] = f"FAILED: {type(e).__name__}: {str(e).splitlines()[0][:100]}"
                        traceback.print_exc()
                    A._FORCE.clear()
                    torch.cuda.empty_cache()
                    timing.append(row)
                    print(row, flush=True)
                correct += variant_correctness(D, L, causal)
    return timing, correct


# ------------------------------------------------------------------------------------------------ host overhead


def host_rows() -> list[dict]:
    """Wall time per call with tiny inputs (the GPU is idle: host overhead), best of 3 x 500 calls."""
    import torch.nn.functional as F

    q = torch.randn(1, 16, 2, 64, device="cuda", dtype=torch.bfloat16)
    qg, kg, vg = (q.clone().requires_grad_() for _ in range(3))
    table = torch.randn(32, 2, device="cuda", requires_grad=True)
    lut = A.t5_bias_lut(table, True, 128).detach().requires_grad_()
    lut_ng, table_ng = lut.detach(), table.detach()
    cu = torch.tensor([0, 16], dtype=torch.int32, device="cuda")
    qv, kv, vv = (x.view(16, 2, 64) for x in (qg, kg, vg))
    qh, qhg, khg, vhg = q.transpose(1, 2), qg.transpose(1, 2), kg.transpose(1, 2), vg.transpose(1, 2)
    sdpa = F.scaled_dot_product_attention
    fa = A.flash_attention
    varlen = dict(cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=16, max_seqlen_k=16)
    cases = [
        ("sdpa", "fwd", lambda: sdpa(qh, qh, qh)),
        ("sdpa", "fwd_bwd", lambda: sdpa(qhg, khg, vhg).sum().backward()),
        ("ours-nobias", "fwd", lambda: fa(q, q, q)),
        ("ours-nobias", "fwd_bwd", lambda: fa(qg, kg, vg).sum().backward()),
        ("ours-t5-lut", "fwd", lambda: fa(q, q, q, rel_lut=lut_ng)),
        ("ours-t5-lut", "fwd_bwd", lambda: fa(qg, kg, vg, rel_lut=lut).sum().backward()),
        ("ours-t5-table", "fwd", lambda: fa(q, q, q, rel_table=table_ng)),
        ("ours-t5-table", "fwd_bwd", lambda: fa(qg, kg, vg, rel_table=table).sum().backward()),
        ("ours-varlen-t5-lut", "fwd_bwd", lambda: fa(qv, kv, vv, rel_lut=lut, **varlen).sum().backward()),
    ]
    us = {}
    rows = []
    for method, mode, fn in cases:
        for variant in A.BWD_VARIANTS if mode == "fwd_bwd" and method != "sdpa" else (None,):
            A._FORCE.clear()
            if variant:
                A._FORCE["bwd"] = variant
            t = utils.host_us(fn)
            us[(method, mode, variant)] = t
            ref = us[("sdpa", mode, None)]
            rows.append(dict(method=method, mode=mode, bwd=variant or "", us_per_call=t, x_sdpa=t / ref))
            print(rows[-1], flush=True)
    A._FORCE.clear()
    import cProfile
    import io
    import pstats

    fn = cases[5][2]
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(300):
        fn()
    torch.cuda.synchronize()
    pr.disable()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(18)
    print("cProfile of ours-t5-lut fwd+bwd (300 calls):\n" + s.getvalue(), flush=True)
    return rows


# ------------------------------------------------------------------------------------------------ offline screen


_POINTERS = {"Q", "K", "V", "O", "DO", "DQ", "DK", "DV", "LSE", "DELTA", "LUT", "DLUT", "ALIBI", "BIAS", "DBIAS"} | {
    "CU_Q",
    "CU_K",
    "BKT",
}


def _screen_source(
    kernel: str, D: int, cfg: tuple, causal: bool, dq_t: bool = True, rel: bool = True, bucket_grad: bool = False
):
    """A Triton ASTSource of ``kernel`` specialised as on the GPU for bf16 q/k/v (16-byte aligned pointers and
    16-divisible q/k/v strides; counts unspecialised) with the T5 lookup and its gradient (``rel``) or no bias.
    Kernels: fwd (fwd_tma: K/V through tensor descriptors), dkdv / dq (split), dq2 / dkdv_lut (split2: dQ +
    delta, dK/dV + d_lut), dq3 (split3: dQ + delta + d_lut; its dK/dV kernel is dkdv), kv / kv_nolut (fused);
    ``bucket_grad``: d_lut added into the table's bucket rows (the table route)."""
    from triton.compiler import ASTSource

    fn = {"fwd": A._attn_fwd, "fwd_tma": A._attn_fwd, "dq": A._attn_bwd_dq, "dq2": A._attn_bwd_dq}.get(
        kernel, A._attn_bwd_dq if kernel == "dq3" else A._attn_bwd_kv
    )
    fused = kernel in ("kv", "kv_nolut")
    rel = rel and kernel != "kv_nolut"
    consts = dict(
        HEAD_DIM=D, BLOCK_M=cfg[0], BLOCK_N=cfg[1], CAUSAL=causal, HAS_REL=rel, HAS_ALIBI=False, HAS_BIAS=False,
        VARLEN=False, DOT_PREC="tf32", ASM_GATHER=True, DQ_ATOMIC=fused,
        REL_GRAD=rel and kernel in ("kv", "dq", "dq3", "dkdv_lut"), BIAS_GRAD=False, DB_BM=False, DB_BN=False,
        DB_ATOMIC=False, DIAG_GATHER=True, DQ_T=dq_t, BUCKETS=bucket_grad, COMPUTE_DELTA=kernel in ("dq2", "dq3"),
        ZERO_DLUT=kernel == "dq2" and rel, BLOCK_W=256, TMA=kernel == "fwd_tma",
    )  # fmt: skip
    bf16 = {"Q", "K", "V", "O", "DO", "DK", "DV"} | (set() if fused else {"DQ"})
    strides16 = {"sqb", "sqm", "sqh", "skb", "skm", "skh", "svb", "svm", "svh"}
    sig, attrs, const_vals = {}, {}, {}
    for i, p in enumerate(fn.params):
        if p.is_constexpr:
            sig[p.name] = "constexpr"
            const_vals[p.name] = consts[p.name]
        elif p.name in _POINTERS:
            sig[p.name] = (
                "*bf16" if p.name in bf16 else "*i32" if p.name.startswith("CU_") else "*i64" if p.name == "BKT"
                else "*fp32"
            )  # fmt: skip
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif p.name.startswith("scale"):
            sig[p.name] = "fp32"
        else:
            sig[p.name] = "i32"
            if p.name in strides16:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return ASTSource(fn, sig, const_vals, attrs)


def screen(kernels: list[str], head_dims: list[int], arch: int = 90, causals=(False, True)) -> list[dict]:
    """Compile candidate tiles for ``sm_<arch>`` on this machine (no GPU needed: Triton's bundled ptxas) and report
    registers, spills (``ptxas -v``) and shared memory, so that the GPU sweep only times configs that fit."""
    import re
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget

    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    rows = []
    for kernel in kernels:
        for D in head_dims:
            table = A._SM90[(_TABLE_KEY.get(kernel, kernel), D)]
            for cfg in dict.fromkeys([table] + [A._Cfg(*c) for c in SWEEP.get(D, {}).get(kernel, [])]):
                for causal in causals:
                    row = dict(kernel=kernel, D=D, cfg=str(tuple(cfg)), table=cfg == table, causal=causal)
                    t0 = time.perf_counter()
                    try:
                        opts = dict(num_warps=cfg[2], num_stages=cfg[3])
                        src = _screen_source(kernel, D, cfg, causal, cfg.dq_t and arch >= 90)
                        c = triton.compile(src, GPUTarget("cuda", arch, 32), opts)
                        with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
                            f.write(c.asm["ptx"])
                            f.flush()
                            cmd = [str(ptxas), "-v", f"--gpu-name=sm_{arch}a", "-o", os.devnull, f.name]
                            log = subprocess.run(cmd, capture_output=True, text=True).stderr
                        row["regs"] = int(re.search(r"Used (\d+) registers", log).group(1))
                        row["spill_B"] = sum(int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))
                        row["smem_KB"] = round(c.metadata.shared / 1024, 1)
                        row["fits"] = row["spill_B"] == 0 and c.metadata.shared <= 227 * 1024
                    except Exception as e:  # e.g. out of shared memory at compile time
                        row["note"] = f"FAILED: {type(e).__name__}: {str(e).splitlines()[0][:100]}"
                    row["compile_s"] = round(time.perf_counter() - t0, 1)
                    rows.append(row)
                    print(row, flush=True)
    return rows


# ------------------------------------------------------------------------------------------------ variant comparison

# Selectable implementations compared in one process (``--compare``): the A._FORCE settings of each. "base" is the
# previous defaults (split backward, table through t5_bias_lut's autograd); "split3" with the table route is the new
# default; the host-path changes that are not selectable apply to every variant.
COMPARE_VARIANTS = {
    "base": dict(bwd="split", table="autograd"),
    "split3": dict(bwd="split3", table="kernel"),
    "split-ktab": dict(bwd="split", table="kernel"),  # the table route's GPU cost alone (no-bias rows skipped)
    "split2": dict(bwd="split2", table="kernel"),
    "split3-tma": dict(bwd="split3", table="kernel", tma=True),
    "split3-tune": dict(bwd="split3", table="kernel", autotune=True),
    "split2-tune": dict(bwd="split2", table="kernel", autotune=True),
    "split3-tma-tune": dict(bwd="split3", table="kernel", tma=True, autotune=True),
}
QUICK_VARIANTS = ("base", "split3", "split2", "split3-tma", "split3-tune")
HOST_VARIANTS = ("base", "split3", "split2", "split3-tma")  # host overhead differs by route/variant, not by tiles
MEMORY_VARIANTS_QUICK = ("base", "split3")
COMPARE_LENGTHS = (512, 1024, 4096)
QUICK_LENGTHS = (512, 4096)


def _variant(name: str) -> None:
    A._FORCE.clear()
    A._FORCE.update(COMPARE_VARIANTS[name])


def _ms(fn) -> float:
    fn()  # warm-up (and the autotuner's first call)
    torch.cuda.synchronize()
    return utils.bench(fn, warmup=5, rep=25)


def compare_rows(variants: list[str], head_dims=(64, 128), lengths=COMPARE_LENGTHS) -> list[dict]:
    """Per (D, causal, L), 32k tokens: the ceiling's fwd and fwd+bwd, then per variant ours with the T5 table (and its
    gradient) and without bias: fwd and fwd+bwd ratios to the ceiling, the T5 backward alone and its ratio to the
    T5 forward."""
    rows = []
    for D in head_dims:
        for L in lengths:
            B = TOKENS // L
            for causal in (False, True):
                fl = {m: utils.attention_flops(B, H, L, L, D, causal=causal, mode=m) for m in ("fwd", "fwd_bwd")}
                A._FORCE.clear()
                cf, cfb = make_sdpa(B, L, D, causal)
                ceil = {"fwd": _ms(cf), "fwd_bwd": _ms(cfb)}
                del cf, cfb
                for name in variants:
                    _variant(name)
                    row = dict(
                        variant=name, D=D, L=L, causal=causal, ceil_fwd_tflops=utils.tflops(fl["fwd"], ceil["fwd"])
                    )
                    try:
                        f, ins, dout = _ours_setup(B, L, D, causal, "t5")
                        t5 = {
                            "fwd": _ms(f),
                            "fwd_bwd": _ms(_fwd_bwd(f, ins, dout)),
                            "bwd": _ms(_bwd_only(f, ins, dout)),
                        }
                        del f, ins, dout
                        row.update(
                            t5_fwd_x=ceil["fwd"] / t5["fwd"], t5_fb_x=ceil["fwd_bwd"] / t5["fwd_bwd"],
                            t5_bwd_x_fwd=t5["bwd"] / t5["fwd"], t5_fwd_ms=t5["fwd"], t5_bwd_ms=t5["bwd"],
                            t5_fb_tflops=utils.tflops(fl["fwd_bwd"], t5["fwd_bwd"]),
                        )  # fmt: skip
                        if name != "split-ktab":  # same kernels as split without a table
                            nf, nfb = make_ours(B, L, D, causal, "none")
                            nb = {"fwd": _ms(nf), "fwd_bwd": _ms(nfb)}
                            del nf, nfb
                            row.update(
                                nobias_fwd_x=ceil["fwd"] / nb["fwd"], nobias_fb_x=ceil["fwd_bwd"] / nb["fwd_bwd"]
                            )
                    except Exception as e:
                        row["note"] = f"FAILED: {type(e).__name__}: {str(e).splitlines()[0][:100]}"
                        traceback.print_exc()
                    A._FORCE.clear()
                    torch.cuda.empty_cache()
                    rows.append(row)
                    print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    return rows


def compare_cross_rows(variants: list[str], head_dims=(64, 128), shapes=CROSS_SHAPES) -> list[dict]:
    """Cross-attention shapes (no bias, 32k key tokens): ratios to the ceiling per variant."""
    rows = []
    for D in head_dims:
        for Lq, Lk in shapes:
            B = TOKENS // Lk
            A._FORCE.clear()
            cf, cfb = make_sdpa(B, Lq, D, False, Lk=Lk)
            ceil = {"fwd": _ms(cf), "fwd_bwd": _ms(cfb)}
            for name in variants:
                _variant(name)
                f, fb = make_ours(B, Lq, D, False, "none", Lk=Lk)
                row = dict(variant=name, D=D, shape=f"{Lq}x{Lk}", B=B, fwd_x=ceil["fwd"] / _ms(f),
                           fb_x=ceil["fwd_bwd"] / _ms(fb))  # fmt: skip
                A._FORCE.clear()
                rows.append(row)
                print(row, flush=True)
    return rows


def compare_varlen_rows(variants: list[str], D: int = 64) -> list[dict]:
    """Packed mixed-length documents (T5 table, bidirectional) vs dense batches of the same documents, per
    variant; plus the ceiling on the dense batches."""
    lengths = VARLEN_DOCS + [512] * ((TOKENS - sum(VARLEN_DOCS)) // 512)
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (
        torch.randn(TOKENS, H, D, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_() for _ in "qkv"
    )
    table = (torch.randn(32, H, device="cuda", generator=g) * 0.5).requires_grad_()
    dout = torch.randn(TOKENS, H, D, device="cuda", dtype=torch.bfloat16, generator=g)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    kw = dict(rel_table=table, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max(lengths), max_seqlen_k=max(lengths))
    f = lambda: A.flash_attention(q, k, v, **kw)
    counts = {n: lengths.count(n) for n in sorted(set(lengths))}
    A._FORCE.clear()
    ceil = {"fwd": 0.0, "fwd_bwd": 0.0}
    for n, cnt in counts.items():
        cf, cfb = make_sdpa(cnt, n, D, False)
        ceil["fwd"] += _ms(cf)
        ceil["fwd_bwd"] += _ms(cfb)
    rows = []
    for name in variants:
        _variant(name)
        vl = {"fwd": _ms(f), "fwd_bwd": _ms(_fwd_bwd(f, [q, k, v, table], dout))}
        dense = {"fwd": 0.0, "fwd_bwd": 0.0}
        for n, cnt in counts.items():
            df, dfb = make_ours(cnt, n, D, False, "t5")
            dense["fwd"] += _ms(df)
            dense["fwd_bwd"] += _ms(dfb)
        A._FORCE.clear()
        for m in ("fwd", "fwd_bwd"):
            rows.append(dict(variant=name, mode=m, D=D, varlen_ms=vl[m], dense_ms=dense[m],
                             varlen_x_dense=dense[m] / vl[m], varlen_x_ceiling=ceil[m] / vl[m]))  # fmt: skip
            print(rows[-1], flush=True)
    return rows


def compare_memory_rows(variants: list[str], L: int = 4096, D: int = 64) -> list[dict]:
    """Peak memory of one fwd+bwd (bidirectional, T5 table) per variant vs the ceiling's."""
    B = TOKENS // L
    A._FORCE.clear()
    _, fb = make_sdpa(B, L, D, False)
    fb()
    ceil = utils.peak_memory(fb)
    del fb
    rows = [dict(variant="ceiling", L=L, D=D, peak_MiB=ceil / 2**20, x_ceiling=1.0)]
    for name in variants:
        _variant(name)
        _, fb = make_ours(B, L, D, False, "t5")
        fb()
        peak = utils.peak_memory(fb)
        del fb
        A._FORCE.clear()
        rows.append(dict(variant=name, L=L, D=D, peak_MiB=peak / 2**20, x_ceiling=peak / ceil))
        print(rows[-1], flush=True)
    torch.cuda.empty_cache()
    return rows


def compare_host_rows(variants: list[str]) -> list[dict]:
    """Host overhead per call (tiny inputs, wall time) per variant vs SDPA, as bench_overhead.py measures it: inputs
    that require grad, "fwd" builds and drops the graph, "fwd_bwd" = torch.autograd.grad with a fixed upstream
    gradient (no .grad accumulation)."""
    import torch.nn.functional as F

    qg, kg, vg = (torch.randn(2, 16, 4, 64, device="cuda", dtype=torch.bfloat16).requires_grad_() for _ in range(3))
    qs, ks, vs = (torch.randn(2, 4, 16, 64, device="cuda", dtype=torch.bfloat16).requires_grad_() for _ in range(3))
    g = torch.randn(2, 16, 4, 64, device="cuda", dtype=torch.bfloat16)
    gs = g.transpose(1, 2).contiguous()
    table = torch.randn(32, 4, device="cuda", requires_grad=True)
    lut = A.t5_bias_lut(table, True, 128).detach().requires_grad_()
    qv, kv, vv = (torch.randn(32, 4, 64, device="cuda", dtype=torch.bfloat16).requires_grad_() for _ in range(3))
    gv = g.reshape(32, 4, 64)
    cu = torch.tensor([0, 10, 32], dtype=torch.int32, device="cuda")
    sdpa, fa, grad = F.scaled_dot_product_attention, A.flash_attention, torch.autograd.grad
    vlk = dict(cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=22, max_seqlen_k=22)
    ref = {
        "fwd": utils.host_us(lambda: sdpa(qs, ks, vs, scale=1.0), n=300),
        "fwd_bwd": utils.host_us(lambda: grad(sdpa(qs, ks, vs, scale=1.0), [qs, ks, vs], gs), n=300),
    }
    cases = [
        ("nobias", "fwd", lambda: fa(qg, kg, vg)),
        ("nobias", "fwd_bwd", lambda: grad(fa(qg, kg, vg), [qg, kg, vg], g)),
        ("t5-table", "fwd", lambda: fa(qg, kg, vg, rel_table=table)),
        ("t5-table", "fwd_bwd", lambda: grad(fa(qg, kg, vg, rel_table=table), [qg, kg, vg, table], g)),
        ("t5-lut", "fwd", lambda: fa(qg, kg, vg, rel_lut=lut)),
        ("t5-lut", "fwd_bwd", lambda: grad(fa(qg, kg, vg, rel_lut=lut), [qg, kg, vg, lut], g)),
        ("varlen", "fwd", lambda: fa(qv, kv, vv, **vlk)),
        ("varlen", "fwd_bwd", lambda: grad(fa(qv, kv, vv, **vlk), [qv, kv, vv], gv)),
        ("varlen-t5-lut", "fwd_bwd", lambda: grad(fa(qv, kv, vv, rel_lut=lut, **vlk), [qv, kv, vv, lut], gv)),
    ]
    rows = [dict(variant="sdpa", case="-", mode=m, us=t, x_sdpa=1.0) for m, t in ref.items()]
    for name in [v for v in variants if v in HOST_VARIANTS] or variants[:1]:
        _variant(name)
        for case, mode, fn in cases:
            t = utils.host_us(fn, n=300)
            rows.append(dict(variant=name, case=case, mode=mode, us=t, x_sdpa=t / ref[mode]))
            print(rows[-1], flush=True)
        A._FORCE.clear()
    # where the time goes: cProfile of the T5-table fwd+bwd with the last variant
    import cProfile
    import io
    import pstats

    prof_variant = "split2" if "split2" in variants else variants[-1]
    _variant(prof_variant)
    fn = cases[3][2]
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(300):
        fn()
    torch.cuda.synchronize()
    pr.disable()
    A._FORCE.clear()
    out = io.StringIO()
    pstats.Stats(pr, stream=out).sort_stats("tottime").print_stats(16)
    print(f"cProfile of t5-table fwd+bwd ({prof_variant}, 300 calls):\n" + out.getvalue(), flush=True)
    return rows


def compare_correctness(variants: list[str]) -> list[dict]:
    """Each variant's output and gradients (q, k, v, table) against the fp32 reference, bf16, two shapes."""
    rows = []
    for D, L, causal in ((64, 512, False), (128, 1024, True)):
        B = 2
        q, k, v, table, dout = _inputs(B, L, D, seed=1)
        kw = dict(causal=causal, rel_table=table, rel_bidirectional=not causal, rel_max_distance=128)
        refs = {}
        for upcast in (True, False):
            ins = [
                x.detach().float().requires_grad_() if upcast else x.detach().clone().requires_grad_()
                for x in (q, k, v)
            ]
            tab = table.detach().clone().requires_grad_()
            o = A.flash_attention_ref(*ins, **{**kw, "rel_table": tab}, upcast=upcast)
            refs[upcast] = (o.detach(), *torch.autograd.grad(o, [*ins, tab], dout.float() if upcast else dout))
            del o
        for name in variants:
            _variant(name)
            o = A.flash_attention(q, k, v, **kw)
            got = (o.detach(), *torch.autograd.grad(o, [q, k, v, table], dout))
            A._FORCE.clear()
            row = dict(variant=name, D=D, L=L, causal=causal, ok=True)
            for n, g_, r32, rs in zip(("out", "dq", "dk", "dv", "dtable"), got, refs[True], refs[False]):
                e = _errors(g_, r32, rs)
                row[f"{n}_ratio"] = e["ratio"]
                row["ok"] = row["ok"] and e["ok"]
            rows.append(row)
            print(row, flush=True)
        del refs
        torch.cuda.empty_cache()
    return rows


def compare_main(args, t_start: float) -> None:
    variants = args.variants.split(",")
    q = args.quick
    lengths = QUICK_LENGTHS if q else COMPARE_LENGTHS
    shapes = CROSS_SHAPES[:1] if q else CROSS_SHAPES
    mem_variants = [v for v in variants if v in MEMORY_VARIANTS_QUICK] or variants[:1] if q else variants
    sections = []
    parts = [
        ("Correctness per variant (bf16; ratio = err / bf16-torch err; ok = the test rule)", compare_correctness),
        ("Throughput per variant vs the ceiling (SDPA default dispatch, no bias), bf16, H=12, 32k tokens; t5 = the "
         "T5 table with its gradient; *_x = TFLOP/s ratio to the ceiling; t5_bwd_x_fwd = backward alone / forward",
         lambda v: compare_rows(v, lengths=lengths)),
        ("Cross-attention per variant (no bias)", lambda v: compare_cross_rows(v, shapes=shapes)),
        ("Varlen vs dense per variant (T5 table, D=64)", compare_varlen_rows),
        ("Peak memory fwd+bwd per variant (L=4096, D=64, T5 table)", lambda v: compare_memory_rows(mem_variants)),
        ("Host overhead per call per variant (tiny inputs)", compare_host_rows),
    ]  # fmt: skip
    for title, fn in parts:
        try:
            sections.append((title, utils.markdown_table(fn(variants))))
        except Exception as e:  # one broken section must not cost the others
            traceback.print_exc()
            sections.append((title, f"FAILED: {type(e).__name__}: {e}\n"))
        A._FORCE.clear()
        print(f"[{time.perf_counter() - t_start:.0f} s] {title.split('(')[0]}", flush=True)
    if A._TUNE_LOG:
        sections.append(
            ("Autotuner choices (kernel, flags, length buckets -> config)", utils.markdown_table(A._TUNE_LOG))
        )
    utils.write_sections(
        "flash attention: variants compared (bench_attention.py --compare)", sections, args.out, t_start
    )


# ------------------------------------------------------------------------------------------------ driver


def _precompile(shard: int, nshards: int, mode: str, quick: bool, args=None) -> None:
    """Run each distinct kernel specialisation once at a tiny batch so that Triton's disk cache is warm."""
    jobs = []
    dims = (64,) if quick else (64, 128)
    if mode == "compare":
        for name in args.variants.split(","):
            for D in (64, 128):
                for causal in (False, True):
                    for kind in ("t5", "none"):
                        jobs.append(("ours", D, causal, kind, ("variant", name)))
                for Lq, Lk in CROSS_SHAPES[:1] if quick else CROSS_SHAPES:
                    jobs.append(("cross", D, False, "none", ("variant", name, Lq, Lk)))
            jobs.append(("varlen", 64, False, "t5", ("variant", name)))
    elif mode == "bwd-variants":
        dims = tuple(int(d) for d in args.head_dims.split(",")) if args else (64, 128)
        jobs = [("ours", D, c, "t5-lut", ("bwd", v)) for D in dims for c in (False, True) for v in A.BWD_VARIANTS]
    elif mode in ("sweep", "shape-sweep"):
        for D in (64,) if mode == "shape-sweep" else dims:
            for kernel, cfgs in SWEEP[D].items():
                if mode == "shape-sweep" and kernel != "fwd":
                    continue
                if mode == "sweep" and args and args.sweep_kernels and kernel not in args.sweep_kernels.split(","):
                    continue
                for c in cfgs:
                    for causal in (False, True) if mode == "shape-sweep" else (False,):
                        jobs.append(("ours", D, causal, "none" if kernel == "kv_nolut" else "t5", (kernel, c)))
    else:
        for D in dims:
            for causal in (False, True):
                for kind in ("t5", "alibi", "none"):
                    jobs.append(("ours", D, causal, kind, None))
            for Lq, Lk in CROSS_SHAPES:
                jobs.append(("cross", D, False, "none", (Lq, Lk)))
        jobs.append(("varlen", 64, False, "t5", None))
    for i, (what, D, causal, kind, force) in enumerate(jobs):
        if i % nshards != shard:
            continue
        A._FORCE.clear()
        if force and force[0] == "variant":
            _variant(force[1])
            force = (None, None, *force[2:]) if what == "cross" else None
        if what == "ours" and force:
            key = _FORCE_KEY.get(force[0], force[0])
            A._FORCE[key] = A._Cfg(*force[1]) if isinstance(force[1], tuple) else force[1]
            if force[0] in _VARIANT_OF:
                A._FORCE["bwd"] = _VARIANT_OF[force[0]]
        try:
            if what == "varlen":
                q = torch.randn(1024, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                tab = torch.randn(32, H, device="cuda", requires_grad=True)
                cu = torch.tensor([0, 512, 1024], dtype=torch.int32, device="cuda")
                A.flash_attention(q, q, q, rel_table=tab, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=512,
                                  max_seqlen_k=512).sum().backward()  # fmt: skip
            elif what == "cross":
                make_ours(1, force[-2], D, False, "none", Lk=force[-1])[1]()
            else:
                make_ours(1, 512, D, causal, kind)[1]()
        except Exception:
            traceback.print_exc()
    A._FORCE.clear()
    torch.cuda.synchronize()


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if isinstance(r.get("L"), int)]
    combos = sorted({(r["D"], r["causal"]) for r in rows})
    fig, axes = plt.subplots(len(combos), 2, figsize=(11, 3.3 * len(combos)), squeeze=False)
    methods = ("ours-t5", "ours-alibi", "ours-nobias", "sdpa-bias", "flex-t5", CEILING, "sdpa-flash", "sdpa-cudnn")
    for i, (D, causal) in enumerate(combos):
        for j, mode in enumerate(("fwd", "fwd_bwd")):
            ax = axes[i][j]
            for method in methods:
                pts = [
                    (r["L"], r[f"{mode}_tflops"])
                    for r in rows
                    if r.get("method") == method and r["D"] == D and r["causal"] == causal and f"{mode}_tflops" in r
                ]
                if pts:
                    ax.plot(*zip(*sorted(pts)), marker="o", label=method + (" (ceiling)" if method == CEILING else ""))
            ax.set_xscale("log", base=2)
            ax.set_title(f"D={D} {'causal' if causal else 'bidirectional'} {mode}")
            ax.set_xlabel("L (batch = 32768 / L)")
            ax.set_ylabel("TFLOP/s")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="D=64, L in {1024, 4096}; fewer competitors")
    p.add_argument("--bwd-variants", action="store_true", help="only: time and check the two backward schemes")
    p.add_argument("--host", action="store_true", help="only: host overhead per call (tiny inputs)")
    p.add_argument("--screen", action="store_true", help="only (no GPU needed): compile candidate tiles for sm90")
    p.add_argument("--screen-kernels", default="kv,kv_nolut,dkdv,dq,fwd", help="kernels for --screen (comma-separated)")
    p.add_argument("--sweep", action="store_true", help="also sweep tile configurations (L=2048, D=64/128)")
    p.add_argument("--sweep-kernels", default=None, help="--sweep only these kernels (e.g. kv,kv_nolut), no main table")
    p.add_argument("--head-dims", default="64,128", help="--bwd-variants: head dims (comma-separated)")
    p.add_argument("--shape-sweep", action="store_true", help="only: forward tiles per (causal, L), D=64, T5 bias")
    p.add_argument("--compare", action="store_true", help="only: the selectable variants side by side (see --variants)")
    p.add_argument(
        "--variants",
        default=None,
        help="--compare: variants (comma-separated; default: all, --quick: "
        + ",".join(QUICK_VARIANTS)
        + f"; known: {','.join(COMPARE_VARIANTS)})",
    )
    p.add_argument("--out", default=None, help="markdown results file to append to (default: results/<date>-<gpu>.md)")
    p.add_argument("--plot", default=None, help="PNG path for the TFLOP/s-vs-L plot")
    p.add_argument("--jobs", type=int, default=8, help="parallel processes that pre-compile the kernels (0: none)")
    p.add_argument("--_precompile", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.mode = (
        "compare" if args.compare else "bwd-variants" if args.bwd_variants else "host" if args.host
        else "screen" if args.screen
        else "shape-sweep" if args.shape_sweep else "sweep" if args.sweep else "main"
    )  # fmt: skip
    if args.variants is None:
        args.variants = ",".join(QUICK_VARIANTS if args.quick else COMPARE_VARIANTS)
    unknown = set(args.variants.split(",")) - set(COMPARE_VARIANTS)
    if unknown:
        p.error(f"--variants: unknown {sorted(unknown)} (known: {', '.join(COMPARE_VARIANTS)})")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args._precompile:
        shard, n = map(int, args._precompile.split("/"))
        _precompile(shard, n, args.mode, args.quick, args)
        return
    t_start = time.perf_counter()
    if args.mode == "screen":
        rows = screen(args.screen_kernels.split(","), [64, 128])
        return utils.write_sections("flash attention: sm90 tile screen (bench_attention.py --screen)",
                      [("Registers, spills, shared memory (T5 lookup + gradient, bf16)", utils.markdown_table(rows))],
                      args.out, t_start)  # fmt: skip
    if not torch.cuda.is_available():
        raise SystemExit("this mode needs a CUDA GPU (only --screen runs without one)")
    if args.mode == "host":
        rows = host_rows()
        return utils.write_sections("flash attention: host overhead per call (bench_attention.py --host)",
                      [("Wall time per call, tiny inputs (1 x 16 x 2 x 64, bf16)", utils.markdown_table(rows))],
                      args.out, t_start)  # fmt: skip
    if args.jobs > 0 and args.mode != "host":  # compile in parallel processes (Triton's disk cache is shared)
        flags = {"bwd-variants": ["--bwd-variants"], "sweep": ["--sweep"], "shape-sweep": ["--shape-sweep"],
                 "compare": ["--compare", "--variants", args.variants]}  # fmt: skip
        base = [sys.executable, __file__] + (["--quick"] if args.quick else []) + flags.get(args.mode, [])
        base += ["--head-dims", args.head_dims] + (
            ["--sweep-kernels", args.sweep_kernels] if args.sweep_kernels else []
        )
        procs = [subprocess.Popen(base + ["--_precompile", f"{i}/{args.jobs}"]) for i in range(args.jobs)]
        for pr in procs:
            pr.wait()
        print(f"precompile: {time.perf_counter() - t_start:.1f} s", flush=True)

    if args.mode == "compare":
        return compare_main(args.out, t_start)
    sections = []
    if args.mode == "bwd-variants":
        timing, correct = bwd_variant_rows(tuple(int(d) for d in args.head_dims.split(",")))
        sections.append(("Backward variants: time (bf16, H=12, 32k tokens, T5 lookup + gradient)",
                         utils.markdown_table(timing)))  # fmt: skip
        sections.append(("Backward variants: error vs fp32 reference (ratio = err / bf16-torch err; ok = test rule)",
                         utils.markdown_table(correct)))  # fmt: skip
        return utils.write_sections(
            "flash attention: backward variants (bench_attention.py --bwd-variants)", sections, args.out, t_start
        )
    if args.mode == "shape-sweep":
        ss = shape_sweep(64)
        sections.append(("Forward tiles per shape (T5 bias, D=64, bf16, H=12, 32k tokens)", utils.markdown_table(ss)))
        return utils.write_sections(
            "flash attention: per-shape forward tiles (bench_attention.py)", sections, args.out, t_start
        )
    if args.mode == "sweep":
        kernels = args.sweep_kernels.split(",") if args.sweep_kernels else None
        sw = sweep_configs(64, kernels=kernels) + (sweep_configs(128, kernels=kernels) if not args.quick else [])
        chosen = []
        for D in sorted({r["D"] for r in sw}):
            for kernel in SWEEP[D]:
                ok = [r for r in sw if r["D"] == D and r["kernel"] == kernel and "ms" in r and r["cfg"].startswith("(")]
                if not ok:
                    continue
                best = min(ok, key=lambda r: r["ms"])
                A._SM90[(kernel, D)] = A._Cfg(*eval(best["cfg"]))  # the rows below use the winners
                A._CFG_CACHE.clear()
                chosen.append(dict(kernel=kernel, D=D, cfg=best["cfg"], ms=best["ms"]))
        sections.append(("Tile sweep (T5 bias, bidirectional, L=2048, B=16)", utils.markdown_table(sw)))
        sections.append(("Tiles used below (sweep winners)", utils.markdown_table(chosen)))
        print(chosen, flush=True)
        if kernels:  # a partial sweep: only its tables
            return utils.write_sections(
                "flash attention: tile sweep (bench_attention.py --sweep)", sections, args.out, t_start
            )

    rows = throughput_rows(args.quick)
    sections.append((f"Throughput (bf16, H=12, 32k tokens per batch; ceiling = {CEILING}, default dispatch)",
                     utils.markdown_table(rows, THROUGHPUT_COLS)))  # fmt: skip
    cross = cross_rows(args.quick)
    sections.append(("Cross-attention shapes (no bias, 32k key tokens per batch)",
                     utils.markdown_table(cross, THROUGHPUT_COLS)))  # fmt: skip
    mem = memory_rows(L=4096 if args.quick else 16384)
    sections.append(("Peak memory of fwd+bwd (bidirectional, D=64)", utils.markdown_table(mem)))
    vl = varlen_rows(64)
    sections.append(
        ("Varlen: packed mixed-length documents vs dense batches of the same work", utils.markdown_table(vl))
    )
    utils.write_sections("flash attention with T5 bias (bench_attention.py)", sections, args.out, t_start)
    if args.plot:
        plot(rows, args.plot)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()

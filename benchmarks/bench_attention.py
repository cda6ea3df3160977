"""Benchmark: flash attention with the T5 bias (flasht5) against SDPA and FlexAttention, in one run.

Rows (bf16, H=12, ~32k tokens per batch: batch = 32768 // L):
  ours-t5      flasht5 ``flash_attention`` with the T5 bucket table (fp32 table; fwd+bwd includes its gradient)
  ours-alibi   flasht5 with ALiBi
  ours-nobias  flasht5 without any bias (isolates the kernel from the bias cost)
  sdpa-bias    the real T5 path without a fused kernel: gather table[buckets] -> (1, H, L, L) bias (requires grad),
               then SDPA (memory-efficient backend; its backward computes the bias gradient, the gather's backward
               scatters it into the table)
  flex-t5      FlexAttention (torch.compile) with the same bias as a score_mod (table captured, requires grad)
  sdpa-nobias  SDPA flash backend without any bias: the ceiling
Plus: peak memory at L=16384 (ours-t5 vs the ceiling), varlen packed documents vs dense batches of the same work,
and (``--sweep``) a tile-configuration sweep of the three kernels.

Slow competitors are timed once (a single call after a warm-up) when one call exceeds 100 ms; some are skipped at
long L because a single backward takes seconds (the table's scatter gradient): the table says so.

  python3 benchmarks/bench_attention.py [--quick] [--sweep] [--out results.md] [--plot attention.png]
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


def _inputs(B: int, L: int, D: int, requires_grad: bool = True, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v = (torch.randn(B, L, H, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
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


def make_ours(B, L, D, causal, kind):
    q, k, v, table, dout = _inputs(B, L, D)
    if kind == "t5":
        kw = dict(rel_table=table, rel_bidirectional=not causal, rel_max_distance=128)
        ins = [q, k, v, table]
    elif kind == "alibi":
        slopes = torch.tensor([2 ** (-8 * (i + 1) / H) for i in range(H)], device="cuda")
        kw = dict(alibi_slopes=slopes)
        ins = [q, k, v]
    else:
        kw = {}
        ins = [q, k, v]
    f = lambda: A.flash_attention(q, k, v, causal=causal, **kw)
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


def make_sdpa_nobias(B, L, D, causal):
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v, _, dout = _inputs(B, L, D)

    def f():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
            return F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal, scale=1.0).transpose(1, 2)

    return f, _fwd_bwd(f, [q, k, v], dout)


def measure(rows, method, maker, B, L, D, causal, *extra, modes=("fwd", "fwd_bwd")):
    """Time ``maker(B, L, D, causal, *extra)`` -> (fwd, fwd+bwd) closures; append a row (errors are recorded)."""
    row = dict(method=method, D=D, causal=causal, L=L, B=B)
    try:
        fwd, fb = maker(B, L, D, causal, *extra)
        for mode, fn in (("fwd", fwd), ("fwd_bwd", fb)):
            if mode not in modes:
                continue
            ms, note = _time(fn)
            row[f"{mode}_ms"] = ms
            row[f"{mode}_tflops"] = utils.tflops(utils.attention_flops(B, H, L, L, D, causal=causal, mode=mode), ms)
            if note:
                row["note"] = (row.get("note", "") + f" {mode}:{note}").strip()
    except Exception as e:  # record the failure (e.g. FlexAttention out of shared memory) and go on
        row["note"] = f"FAILED: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
        traceback.print_exc()
    torch.cuda.empty_cache()
    rows.append(row)
    print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    return row


# Candidate tiles (BLOCK_M, BLOCK_N, warps, stages) per head dim, pre-screened offline on sm90 cubins (no register
# spills, shared memory within 227 KB). The first entry is the table default.
SWEEP = {
    64: {
        "fwd": [(64, 64, 4, 3), (128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 3), (64, 64, 4, 4)],
        "dkdv": [(64, 64, 4, 3), (32, 64, 4, 3), (32, 128, 8, 3), (64, 128, 8, 3), (32, 64, 4, 4)],
        "dq": [(64, 32, 4, 3), (128, 32, 8, 3), (64, 32, 4, 4), (64, 64, 8, 3), (128, 64, 8, 3)],
    },
    128: {
        "fwd": [(128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 4, 3), (128, 64, 8, 2), (64, 32, 4, 3)],
        "dkdv": [(32, 64, 4, 3), (32, 128, 8, 3), (64, 64, 8, 3), (32, 64, 4, 4), (64, 128, 8, 2)],
        "dq": [(64, 32, 4, 3), (128, 32, 8, 3), (64, 64, 8, 3), (64, 32, 4, 4), (128, 64, 8, 3)],
    },
}


def sweep_configs(D: int, L: int = 2048) -> list[dict]:
    """Time fwd (forward only) and fwd+bwd with each kernel's candidate tiles forced (T5 bias, bidirectional)."""
    cands = SWEEP[D]
    B = TOKENS // L
    out = []
    for kernel, cfgs in cands.items():
        for c in cfgs:
            A._FORCE.clear()
            A._FORCE[kernel] = A._Cfg(*c)
            row = dict(kernel=kernel, D=D, cfg=str(c))
            try:
                fwd, fb = make_ours(B, L, D, False, "t5")
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
    A._FORCE["diag_gather"] = False
    fwd, fb = make_ours(B, L, D, False, "t5")
    ms = utils.bench(fb, warmup=10, rep=40)
    A._FORCE.clear()
    tf = utils.tflops(utils.attention_flops(B, H, L, L, D, causal=False, mode="fwd_bwd"), ms)
    out.append(dict(kernel="dq", D=D, cfg="default, per-element atomics", ms=ms, tflops=tf))
    print(out[-1], flush=True)
    return out


def shape_sweep(D: int = 64) -> list[dict]:
    """Forward tiles per (causal, L) with the T5 bias, against the no-bias ceiling measured alongside."""
    rows = []
    for causal in (False, True):
        for L in (512, 1024, 2048, 4096):
            B = TOKENS // L
            fwd, _ = make_sdpa_nobias(B, L, D, causal)
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


def varlen_rows(D: int) -> list[dict]:
    """Packed documents of mixed lengths (32k tokens) vs dense batches doing the same work (T5 bias, bidir)."""
    lengths = [4096, 512, 2048, 1024, 512, 4096, 1024, 2048, 512, 1024, 4096, 2048, 512, 1024, 2048, 2048, 1024]
    lengths += [512] * ((TOKENS - sum(lengths)) // 512)
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
    for n in sorted(set(lengths)):
        cnt = lengths.count(n)
        fwd, fb = make_ours(cnt, n, D, False, "t5")
        dense["fwd"] += _time(fwd)[0]
        dense["fwd_bwd"] += _time(fb)[0]
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
                ratio=dense[m] / vl[m],
            )  # fmt: skip
        )
        print(rows[-1], flush=True)
    return rows


def memory_rows(L: int = 16384, D: int = 64) -> list[dict]:
    B = TOKENS // L
    rows = []
    for method, maker in (
        ("ours-t5", lambda: make_ours(B, L, D, False, "t5")),
        ("sdpa-nobias", lambda: make_sdpa_nobias(B, L, D, False)),
    ):
        fwd, fb = maker()
        fb()
        peak = utils.peak_memory(fb)
        rows.append(dict(method=method, L=L, B=B, D=D, peak_fwd_bwd_MiB=peak / 2**20))
        print(rows[-1], flush=True)
    rows.append(dict(method="ratio", peak_fwd_bwd_MiB=rows[0]["peak_fwd_bwd_MiB"] / rows[1]["peak_fwd_bwd_MiB"]))
    return rows


def _precompile(shard: int, nshards: int, quick: bool, sweep: bool, shape_sweep_: bool = False) -> None:
    """Run each distinct kernel specialisation once at a tiny batch so that Triton's disk cache is warm."""
    jobs = []
    for D in (64,) if quick else (64, 128):
        for causal in (False, True):
            for kind in ("t5", "alibi", "none"):
                jobs.append(("ours", D, causal, kind, None))
                if sweep:  # the sweep winners become the tiles of the main rows: compile them all
                    for kernel, cfgs in SWEEP[D].items():
                        for c in cfgs[1:]:
                            jobs.append(("ours", D, causal, kind, (kernel, c)))
    if sweep:
        for D in (64, 128):
            jobs.append(("ours", D, False, "t5", ("diag_gather", False)))
    if shape_sweep_:
        jobs = [("ours", 64, causal, "t5", ("fwd", c)) for c in SWEEP[64]["fwd"] for causal in (False, True)]
    jobs.append(("varlen", 64, False, "t5", None))
    for i, (what, D, causal, kind, force) in enumerate(jobs):
        if i % nshards != shard:
            continue
        A._FORCE.clear()
        if force:
            A._FORCE[force[0]] = A._Cfg(*force[1]) if isinstance(force[1], tuple) else force[1]
        try:
            if what == "varlen":
                q = torch.randn(1024, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                tab = torch.randn(32, H, device="cuda", requires_grad=True)
                cu = torch.tensor([0, 512, 1024], dtype=torch.int32, device="cuda")
                A.flash_attention(q, q, q, rel_table=tab, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=512,
                                  max_seqlen_k=512).sum().backward()  # fmt: skip
            else:
                make_ours(1, 512, D, causal, kind)[1]()
        except Exception:
            traceback.print_exc()
    torch.cuda.synchronize()


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    combos = sorted({(r["D"], r["causal"]) for r in rows if "L" in r})
    fig, axes = plt.subplots(len(combos), 2, figsize=(11, 3.3 * len(combos)), squeeze=False)
    for i, (D, causal) in enumerate(combos):
        for j, mode in enumerate(("fwd", "fwd_bwd")):
            ax = axes[i][j]
            for method in ("ours-t5", "ours-alibi", "ours-nobias", "sdpa-bias", "flex-t5", "sdpa-nobias"):
                pts = [
                    (r["L"], r[f"{mode}_tflops"])
                    for r in rows
                    if r.get("method") == method and r["D"] == D and r["causal"] == causal and f"{mode}_tflops" in r
                ]
                if pts:
                    ax.plot(*zip(*sorted(pts)), marker="o", label=method)
            ax.set_xscale("log", base=2)
            ax.set_title(f"D={D} {'causal' if causal else 'bidirectional'} {mode}")
            ax.set_xlabel("L (batch = 32768 / L)")
            ax.set_ylabel("TFLOP/s")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="D=64, L in {1024, 4096}; fewer competitors")
    p.add_argument("--sweep", action="store_true", help="also sweep tile configurations (L=2048, D=64/128)")
    p.add_argument("--out", default=None, help="markdown results file to append to (default: results/<date>-<gpu>.md)")
    p.add_argument("--plot", default=None, help="PNG path for the TFLOP/s-vs-L plot")
    p.add_argument("--shape-sweep", action="store_true", help="only: forward tiles per (causal, L), D=64, T5 bias")
    p.add_argument("--jobs", type=int, default=8, help="parallel processes that pre-compile the kernels (0: none)")
    p.add_argument("--_precompile", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._precompile:
        shard, n = map(int, args._precompile.split("/"))
        _precompile(shard, n, args.quick, args.sweep, args.shape_sweep)
        return

    t_start = time.perf_counter()
    if args.jobs > 0:  # compile in parallel processes (Triton's disk cache is shared), time in this one
        base = [sys.executable, __file__] + (["--quick"] if args.quick else []) + (["--sweep"] if args.sweep else [])
        base += ["--shape-sweep"] if args.shape_sweep else []
        procs = [subprocess.Popen(base + ["--_precompile", f"{i}/{args.jobs}"]) for i in range(args.jobs)]
        for pr in procs:
            pr.wait()
        print(f"precompile: {time.perf_counter() - t_start:.1f} s", flush=True)

    sections = []
    if args.shape_sweep:
        ss = shape_sweep(64)
        body = "### Forward tiles per shape (T5 bias, D=64, bf16, H=12, 32k tokens)\n\n" + utils.markdown_table(ss)
        path = utils.write_results("flash attention: per-shape forward tiles (bench_attention.py)", body, out=args.out)
        print(body)
        print(f"wrote {path}")
        return
    if args.sweep:
        sw = sweep_configs(64) + (sweep_configs(128) if not args.quick else [])
        chosen = []
        for D in sorted({r["D"] for r in sw}):
            for kernel in ("fwd", "dkdv", "dq"):
                ok = [r for r in sw if r["D"] == D and r["kernel"] == kernel and "ms" in r and r["cfg"].startswith("(")]
                if not ok:
                    continue
                best = min(ok, key=lambda r: r["ms"])
                A._SM90[(kernel, D)] = A._Cfg(*eval(best["cfg"]))  # the rows below use the winners
                chosen.append(dict(kernel=kernel, D=D, cfg=best["cfg"], ms=best["ms"]))
        sections.append(("Tile sweep (T5 bias, bidirectional, L=2048, B=16)", utils.markdown_table(sw)))
        sections.append(("Tiles used below (sweep winners)", utils.markdown_table(chosen)))
        print(chosen, flush=True)

    if args.quick:
        grid = [(64, L) for L in (1024, 4096)]
    else:
        grid = [(D, L) for D in (64, 128) for L in (512, 1024, 2048, 4096, 8192, 16384)]
    rows: list[dict] = []
    for D, L in grid:
        B = TOKENS // L
        for causal in (False, True):
            measure(rows, "ours-t5", make_ours, B, L, D, causal, "t5")
            measure(rows, "ours-alibi", make_ours, B, L, D, causal, "alibi")
            measure(rows, "ours-nobias", make_ours, B, L, D, causal, "none")
            measure(rows, "sdpa-nobias", make_sdpa_nobias, B, L, D, causal)
            if D == 64 and L <= 8192:  # its backward takes seconds beyond
                bwd_max = 1024 if args.quick else 4096
                modes = ("fwd", "fwd_bwd") if bwd_max >= L else ("fwd",)
                measure(rows, "sdpa-bias", make_sdpa_bias, B, L, D, causal, modes=modes)
            # FlexAttention compiles per shape (tens of seconds each): one L only
            flex_L = 1024 if args.quick else 2048
            if D == 64 and flex_L == L and not (args.quick and causal):
                measure(rows, "flex-t5", make_flex, B, L, D, causal)
    # ratios to the ceiling
    ceil = {(r["D"], r["causal"], r["L"]): r for r in rows if r["method"] == "sdpa-nobias"}
    for r in rows:
        c = ceil.get((r["D"], r["causal"], r["L"]), {})
        for m in ("fwd", "fwd_bwd"):
            if f"{m}_tflops" in r and f"{m}_tflops" in c:
                r[f"{m}_x_ceiling"] = r[f"{m}_tflops"] / c[f"{m}_tflops"]
    cols = ["method", "D", "causal", "L", "B", "fwd_ms", "fwd_tflops", "fwd_x_ceiling", "fwd_bwd_ms",
            "fwd_bwd_tflops", "fwd_bwd_x_ceiling", "note"]  # fmt: skip
    sections.append(("Throughput (bf16, H=12, 32k tokens per batch)", utils.markdown_table(rows, cols)))

    mem = memory_rows(L=4096 if args.quick else 16384)
    sections.append(("Peak memory of fwd+bwd (T5 bias vs no-bias flash)", utils.markdown_table(mem)))
    vl = varlen_rows(64)
    sections.append(
        ("Varlen: packed mixed-length documents vs dense batches of the same work", utils.markdown_table(vl))
    )

    body = "\n".join(f"### {t}\n\n{b}" for t, b in sections)
    body += f"\nTotal benchmark wall time: {time.perf_counter() - t_start:.0f} s\n"
    path = utils.write_results("flash attention with T5 bias (bench_attention.py)", body, out=args.out)
    print(f"wrote {path}")
    if args.plot:
        plot(rows, args.plot)
        print(f"wrote {args.plot}")
    print(body)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()

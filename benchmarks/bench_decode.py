"""Benchmark: flash-decoding (``flasht5.ops.flash_decode``) against today's decode path and SDPA, CUDA-graph timed.

One decode step of one attention layer: a single new query per (row, head) against a KV cache, bf16, H=12, D=64,
B in {1, 8, 32}, Lk in {512, 2048, 16384}, with the T5 lookup of a v1.1 decoder (32 causal buckets, max distance
128) and without any bias (cross-attention). Columns, all in microseconds per call:

  ours         flash_decode(q, k_cache, v_cache, seqlens_k, rel_lut=lut): cache of Lk keys, all valid,
               num_splits from the heuristic
  ours-static  the same call on a cache preallocated for 16384 keys of which Lk are valid (generation with a
               static cache: the splits are chosen from Lmax, the slices from the valid length)
  current      flash_attention(q[:, None], k[:, :Lk], v[:, :Lk], causal=True, rel_lut=lut): today's decode path
  sdpa         F.scaled_dot_product_attention(q, k, v) default dispatch *without* bias (the bias-free ceiling; not
               causal: with one query bottom-right, causal would mask nothing, and SDPA's top-left causal mask is
               wrong here)

Every timing captures the calls in one CUDA graph and replays it (launch overhead out of the picture, as in a
captured decode step), rotating over copies of the cache that together exceed twice the L2 cache, so that each call
reads its K/V from HBM as a decoder layer does (all layers' caches together never fit in L2). Reported: median over
replays, per call. ``max|ours - current|`` is the largest output difference (bf16; both are checked against fp32
references by the tests).

Then (skipped with --quick), at B in {1, 8, 32} and Lk in {512, 2048, 16384} with the T5 lookup: a sweep of
num_splits and one of the split kernel's tiles (BLOCK_N, num_warps, num_stages); and the host overhead of eager
calls (wall time per call, tiny cache, no graph) of ours, current and sdpa.

--screen (no GPU needed) compiles every kernel variant for sm90 with Triton's bundled ptxas and reports registers,
spills and shared memory.

  PYTHONPATH=src python3 benchmarks/bench_decode.py [--quick] [--screen] [--out results.md]
"""

from __future__ import annotations

import argparse
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import utils  # noqa: E402

from flasht5.ops import decode as DEC  # noqa: E402
from flasht5.ops.attention import flash_attention  # noqa: E402
from flasht5.ops.relative_position import t5_bias_lut  # noqa: E402

H, D = 12, 64
BATCHES = (1, 8, 32)
LENGTHS = (512, 2048, 16384)
LMAX_STATIC = 16384
DTYPE = torch.bfloat16
TARGET = 3.0  # issue 11: >= 3x our current kernel at Lk=16384, B=1


# ------------------------------------------------------------------------------------------------ timing


def n_copies(bytes_per_copy: int) -> int:
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20)
    return max(1, min(64, math.ceil(2 * l2 / max(bytes_per_copy, 1))))


# ------------------------------------------------------------------------------------------------ cases


def make_lut() -> torch.Tensor:
    g = torch.Generator(device="cuda").manual_seed(0)
    table = torch.randn(32, H, device="cuda", generator=g) * 0.5
    return t5_bias_lut(table, bidirectional=False, max_distance=128)


def make_caches(B: int, Lmax: int, L: int, copies: int, seed: int = 0):
    """``copies`` x (q (B, H, D), k (B, Lmax, H, D), v, seqlens (B,) = L)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    out = []
    for _ in range(copies):
        q = torch.randn(B, H, D, device="cuda", dtype=DTYPE, generator=g)
        k = torch.randn(B, Lmax, H, D, device="cuda", dtype=DTYPE, generator=g)
        v = torch.randn(B, Lmax, H, D, device="cuda", dtype=DTYPE, generator=g)
        seq = torch.full((B,), L, dtype=torch.int32, device="cuda")
        out.append((q, k, v, seq))
    return out


def ours_call(case, lut, **kw):
    q, k, v, seq = case
    return lambda: DEC.flash_decode(q, k, v, seq, rel_lut=lut, **kw)


def current_call(case, lut, L):
    q, k, v, _ = case
    q4, k4, v4 = q[:, None], k[:, :L], v[:, :L]  # (B, 1, H, D), (B, L, H, D): today's decode-step call
    return lambda: flash_attention(q4, k4, v4, causal=True, rel_lut=lut)


def sdpa_call(case, L):
    q, k, v, _ = case
    q4, k4, v4 = q[:, :, None], k[:, :L].transpose(1, 2), v[:, :L].transpose(1, 2)  # (B, H, 1|L, D)
    return lambda: F.scaled_dot_product_attention(q4, k4, v4)


def _safe(fn, *args) -> tuple[float, str]:
    try:
        return fn(*args), ""
    except Exception as e:  # noqa: BLE001 - report and go on (e.g. a backend that cannot be captured)
        return float("nan"), f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"


def main_rows(batches, lengths) -> list[dict]:
    rows = []
    lut_t5 = make_lut()
    for B in batches:
        for L in lengths:
            bytes_kv = 2 * B * L * H * D * 2
            cases = make_caches(B, L, L, n_copies(bytes_kv))
            static = None
            if L < LMAX_STATIC:
                static = make_caches(B, LMAX_STATIC, L, n_copies(2 * B * LMAX_STATIC * H * D * 2))
            sdpa, sdpa_note = _safe(utils.graph_us, [sdpa_call(c, L) for c in cases])
            for bias, lut in (("t5", lut_t5), ("none", None)):
                row = dict(B=B, Lk=L, bias=bias)
                sms = DEC._device_sms(cases[0][0])
                row["splits"] = DEC.auto_num_splits(B * H, L, sms)
                row["splits-static"] = DEC.auto_num_splits(B * H, LMAX_STATIC, sms)
                row["ours"], n1 = _safe(utils.graph_us, [ours_call(c, lut) for c in cases])
                if static is not None:
                    row["ours-static"], n2 = _safe(utils.graph_us, [ours_call(c, lut) for c in static])
                else:
                    row["ours-static"], n2 = row["ours"], ""
                row["current"], n3 = _safe(utils.graph_us, [current_call(c, lut, L) for c in cases])
                row["sdpa (no bias)"] = sdpa
                row["current/ours"] = row["current"] / row["ours"]
                row["sdpa/ours"] = sdpa / row["ours"]
                row["GB/s ours"] = bytes_kv / (row["ours"] * 1e-6) / 1e9
                with torch.no_grad():
                    a, b = ours_call(cases[0], lut)(), current_call(cases[0], lut, L)()[:, 0]
                    row["max|ours - current|"] = (a.float() - b.float()).abs().max().item()
                row["note"] = "; ".join(n for n in (n1, n2, n3, sdpa_note) if n)
                rows.append(row)
                print(row, flush=True)
            cases = static = None  # free the caches before the next shape
            torch.cuda.empty_cache()
    return rows


# Tile candidates (BLOCK_N, num_warps, num_stages); the num_splits sweep uses the default tile.
SWEEP_TILES = ((32, 4, 3), (64, 4, 3), (64, 4, 4), (128, 4, 3), (128, 4, 4), (128, 8, 3), (256, 8, 3))


def sweep_rows() -> list[dict]:
    """B in {1, 8, 32}, Lk in {512, 2048, 16384}, T5 lookup: num_splits (default tile) and the tiles (the
    heuristic's num_splits)."""
    lut = make_lut()
    rows = []
    for B in (1, 8, 32):
        for L in (512, 2048, 16384):
            cases = make_caches(B, L, L, n_copies(2 * B * L * H * D * 2))
            auto = DEC.auto_num_splits(B * H, L, DEC._device_sms(cases[0][0]))
            sweeps = [("num_splits", s, None) for s in sorted({1, 2, 4, 8, 16, 32, 64, auto}) if s == 1 or L // s >= 64]
            sweeps += [("BLOCK_N, warps, stages", None, t) for t in SWEEP_TILES]
            for what, s, tile in sweeps:
                DEC._CFG_OVERRIDE = tile
                try:
                    us, note = _safe(utils.graph_us, [ours_call(c, lut, num_splits=s) for c in cases])
                finally:
                    DEC._CFG_OVERRIDE = None
                default = tile in (None, DEC._split_config(D, 2, True))
                value = s if s is not None else ", ".join(map(str, tile))
                rows.append(dict(B=B, Lk=L, what=what, value=value, auto=s in (None, auto) and default, us=us,
                                 note=note))  # fmt: skip
                print(rows[-1], flush=True)
            cases = None
            torch.cuda.empty_cache()
    return rows


def host_rows() -> list[dict]:
    lut = make_lut()
    (case,) = make_caches(1, 128, 128, 1)
    rows = []
    for name, fn in (
        ("ours (t5)", ours_call(case, lut)),
        ("ours (no bias)", ours_call(case, None)),
        ("ours (t5, 1 split)", ours_call(case, lut, num_splits=1)),
        ("current (t5)", current_call(case, lut, 128)),
        ("sdpa (no bias)", sdpa_call(case, 128)),
    ):
        with torch.no_grad():
            rows.append(dict(call=name, us_per_call=utils.host_us(fn, n=300)))
        print(rows[-1], flush=True)
    return rows


# ------------------------------------------------------------------------------------------------ offline screen


def screen(arch: int = 90) -> list[dict]:
    """Compile every kernel variant for ``sm_<arch>`` on this machine (Triton's bundled ptxas; no GPU needed) and
    report registers, spills and shared memory."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    strides16 = {"sqb", "sqh", "skb", "skm", "skh", "svb", "svm", "svh"}

    def source(fn, consts: dict, ptrs: dict):
        sig, attrs, const_vals = {}, {}, {}
        for i, p in enumerate(fn.params):
            if p.is_constexpr:
                sig[p.name] = "constexpr"
                const_vals[p.name] = consts[p.name]
            elif p.name in ptrs:
                sig[p.name] = ptrs[p.name]
                attrs[(i,)] = [["tt.divisibility", 16]]
            elif p.name.startswith("scale"):
                sig[p.name] = "fp32"
            else:
                sig[p.name] = "i32"
                if p.name in strides16:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        return ASTSource(fn, sig, const_vals, attrs)

    jobs = []
    for dt in ("bf16", "fp32"):
        for hd in DEC.SUPPORTED_HEAD_DIMS:
            block_n, warps, stages = DEC._split_config(hd, 4 if dt == "fp32" else 2, True)
            for bias in ("t5", "alibi", "none"):
                for split in (True, False):
                    consts = dict(HEAD_DIM=hd, BLOCK_N=block_n, HAS_REL=bias == "t5", HAS_ALIBI=bias == "alibi",
                                  SPLIT=split, DOT_PREC="ieee" if dt == "fp32" else "tf32",
                                  ASM_GATHER=True)  # fmt: skip
                    ptrs = dict(Q=f"*{dt}", K=f"*{dt}", V=f"*{dt}", SEQ="*i32", LUT="*fp32", ALIBI="*fp32",
                                OUT=f"*{dt}", PART="*fp32")  # fmt: skip
                    name = f"split {dt} D={hd} {bias} {'partial' if split else 'direct'}"
                    jobs.append((name, DEC._decode_split_kernel, consts, ptrs, warps, stages))
            block_s = DEC._combine_block(128, hd, True)
            ptrs = dict(PART="*fp32", OUT=f"*{dt}")
            jobs.append((f"combine {dt} D={hd}", DEC._decode_combine_kernel, dict(HEAD_DIM=hd, BLOCK_S=block_s), ptrs,
                         4, 1))  # fmt: skip
    rows = []
    for name, fn, consts, ptrs, warps, stages in jobs:
        row = dict(kernel=name, BLOCK=consts.get("BLOCK_N", consts.get("BLOCK_S")), warps=warps)
        try:
            c = triton.compile(
                source(fn, consts, ptrs), GPUTarget("cuda", arch, 32), dict(num_warps=warps, num_stages=stages)
            )
            with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
                f.write(c.asm["ptx"])
                f.flush()
                cmd = [str(ptxas), "-v", f"--gpu-name=sm_{arch}a", "-o", os.devnull, f.name]
                log = subprocess.run(cmd, capture_output=True, text=True).stderr
            row["regs"] = int(re.search(r"Used (\d+) registers", log).group(1))
            row["spill_B"] = sum(int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))
            row["smem_KB"] = round(c.metadata.shared / 1024, 1)
        except Exception as e:  # noqa: BLE001
            row["note"] = f"FAILED: {type(e).__name__}: {str(e).splitlines()[0][:100]}"
        rows.append(row)
        print(row, flush=True)
    return rows


# ------------------------------------------------------------------------------------------------ driver


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="main table only (no sweeps, no host overhead)")
    p.add_argument("--screen", action="store_true", help="only (no GPU needed): compile every variant for sm90")
    p.add_argument("--batches", default=",".join(map(str, BATCHES)), help="batch sizes (comma-separated)")
    p.add_argument("--lengths", default=",".join(map(str, LENGTHS)), help="key lengths (comma-separated)")
    p.add_argument("--out", default=None, help="markdown results file to append to (default: results/<date>-<gpu>.md)")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    t_start = time.perf_counter()
    if args.screen:
        if os.environ.get("TRITON_INTERPRET", "0") == "1":
            raise SystemExit("--screen compiles the kernels: run it without TRITON_INTERPRET=1")
        rows = screen()
        sections = [("Registers, spills, shared memory", utils.markdown_table(rows))]
        return utils.write_sections("flash decode: sm90 compile screen (bench_decode.py --screen)", sections, args.out,
                                    t_start)  # fmt: skip
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU (only --screen runs without one)")
    batches = tuple(int(x) for x in args.batches.split(","))
    lengths = tuple(int(x) for x in args.lengths.split(","))
    sections = []
    rows = main_rows(batches, lengths)
    sections.append((
        f"One decode step, us per call (CUDA graph, cold L2; bf16, H={H}, D={D}; ours-static: cache of "
        f"{LMAX_STATIC} keys, Lk valid)",
        utils.markdown_table(rows),
    ))  # fmt: skip
    hit = [r for r in rows if r["B"] == 1 and r["Lk"] == 16384 and r["bias"] == "t5"]
    if hit:
        ratio = hit[0]["current/ours"]
        verdict = "met" if ratio >= TARGET else "NOT met"
        text = f"B=1, Lk=16384, T5 lookup: {ratio:.2f}x the current path (target >= {TARGET:.0f}x: {verdict})\n"
        sections.append(("Target", text))
    if not args.quick:
        sections.append(("Sweeps, T5 lookup (us per call, CUDA graph)", utils.markdown_table(sweep_rows())))
        sections.append(("Host overhead: eager wall time per call (B=1, Lk=128)", utils.markdown_table(host_rows())))
    utils.write_sections(
        "flash decode vs the current decode path and SDPA (bench_decode.py)", sections, args.out, t_start
    )


if __name__ == "__main__":
    main()

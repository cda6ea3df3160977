"""Host overhead per call of every flasht5 op against the torch op it replaces.

Tiny inputs, so the GPU finishes each kernel long before the host has issued the next one: the wall time per call
is the host's cost of issuing it (Python, autograd, allocations, launches). Each row times N back-to-back calls
between two ``torch.cuda.synchronize()``, after a warm-up (Triton compiles on the first call), repeated and reported
as the fastest repeat (noise only ever adds time, as ``timeit`` argues). Two passes per op, as in training:
"fwd" (inputs require grad, so the autograd graph is built and dropped) and "fwd+bwd" (``torch.autograd.grad`` of
every output with a fixed upstream gradient). ``ratio`` = flasht5 / torch; the target is ratio <= 1.5 (DESIGN.md
§4: eager per-op overhead kept to what a launch costs). ``nn.Linear`` is a calibration row (a cuBLAS call through
autograd) to compare hosts; the "floor" rows price the pieces every flasht5 op is made of on this host: one
``torch.empty_like``, one FastKernel launch, one ``Tensor.sum`` (the losses' torch reduction), and the eager route's
skeleton, an ``autograd.Function`` (called as the ops call theirs) whose forward and backward each allocate one
tensor and launch one trivial kernel.

    PYTHONPATH=src python3 benchmarks/bench_overhead.py --out $OUT/overhead.md
    PYTHONPATH=src python3 benchmarks/bench_overhead.py --only rms_norm,cross_entropy --profile  # + cProfile tops

Needs a CUDA GPU (on the CPU the Triton interpreter's cost, not the host overhead, would be measured).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from utils import host_us, markdown_table, versions, write_results  # noqa: E402

TARGET = 1.5


def _leaf(*shape, dtype=torch.bfloat16, scale=1.0) -> torch.Tensor:
    return (torch.randn(*shape, device="cuda") * scale).to(dtype).requires_grad_()


def _labels(n: int, n_classes: int) -> torch.Tensor:
    y = torch.randint(0, n_classes, (n,), device="cuda")
    y[::4] = -100  # some ignored tokens, as with padding
    return y


def cases() -> list[tuple[str, Callable | None, Callable | None, list[torch.Tensor], list[torch.Tensor] | None]]:
    """(op, torch call, flasht5 call, leaves that require grad, the torch call's leaves if they differ). Inputs are
    built once, outside the timing."""
    from flasht5.ops.activations import gated_act
    from flasht5.ops.attention import flash_attention
    from flasht5.ops.loss import cross_entropy, linear_cross_entropy
    from flasht5.ops.norm import rms_norm

    torch.manual_seed(0)
    out = []
    d = 512
    x, w, r = _leaf(4, 16, d), _leaf(d), _leaf(4, 16, d)
    out.append(("rms_norm", lambda: F.rms_norm(x, (d,), w, 1e-6), lambda: rms_norm(x, w, 1e-6), [x, w], None))

    def add_norm():
        h = x + r
        return F.rms_norm(h, (d,), w, 1e-6), h

    out.append(("rms_norm + residual", add_norm, lambda: rms_norm(x, w, 1e-6, r), [x, w, r], None))
    g, u = _leaf(4, 16, 1024), _leaf(4, 16, 1024)
    out.append(
        (
            "gated_act (gelu_tanh)",
            lambda: F.gelu(g, approximate="tanh") * u,
            lambda: gated_act(g, u, "gelu_tanh"),
            [g, u],
            None,
        )
    )
    n_tok, vocab = 64, 1000
    logits, y = _leaf(n_tok, vocab, scale=2.0), _labels(n_tok, vocab)
    out.append(("cross_entropy", lambda: F.cross_entropy(logits, y), lambda: cross_entropy(logits, y), [logits], None))
    hid, emb = _leaf(n_tok, 64), _leaf(vocab, 64, scale=0.1)
    out.append(
        (
            "linear_cross_entropy",
            lambda: F.cross_entropy(F.linear(hid, emb), y),
            lambda: linear_cross_entropy(hid, emb, y),
            [hid, emb],
            None,
        )
    )
    # attention: flasht5's (B, L, H, D) layout, SDPA's (B, H, L, D) given ready-made (the layout is the model's
    # business); SDPA at its default dispatch and without a bias: the ceiling, not a like-for-like op.
    B, L, H, D = 2, 16, 4, 64
    q, k, v = (_leaf(B, L, H, D) for _ in range(3))
    qs, ks, vs = (_leaf(B, H, L, D) for _ in range(3))
    table = _leaf(32, H, dtype=torch.float32)

    def sdpa():
        return F.scaled_dot_product_attention(qs, ks, vs, scale=1.0)

    out.append(
        (
            "flash_attention + T5 table (dense)",
            sdpa,
            lambda: flash_attention(q, k, v, rel_table=table),
            [q, k, v, table],
            [qs, ks, vs],
        )
    )
    qv, kv, vv = (_leaf(B * L, H, D) for _ in range(3))
    cu = torch.tensor([0, 10, B * L], device="cuda", dtype=torch.int32)

    def varlen():
        return flash_attention(qv, kv, vv, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=22, max_seqlen_k=22)

    out.append(("flash_attention (varlen)", sdpa, varlen, [qv, kv, vv], [qs, ks, vs]))
    lin = torch.nn.Linear(d, d, device="cuda", dtype=torch.bfloat16)
    xl = _leaf(4, 16, d)
    out.append(("nn.Linear (calibration)", lambda: lin(xl), None, [xl, *lin.parameters()], None))
    out.extend(_floor_cases(x))
    return out


@triton.jit
def _copy_kernel(X, Y, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(Y + offs, tl.load(X + offs, mask=offs < n), mask=offs < n)


def _floor_cases(x: torch.Tensor) -> list:
    """Calibration: what the parts of an eager flasht5 op cost here (leaves None: no fwd+bwd row)."""
    from flasht5.ops._device import function_apply
    from flasht5.ops._launch import FastKernel

    copy = FastKernel(_copy_kernel)

    def launch(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
        copy((-(-src.numel() // 1024),), (src, dst, src.numel()), (1024,))
        return dst

    class _Floor(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t, cfg):
            return launch(t, torch.empty_like(t))

        @staticmethod
        def backward(ctx, g):
            return launch(g, torch.empty_like(g)), None

    apply = function_apply(_Floor)
    xd = x.detach()
    rows = xd.float().reshape(-1)
    return [
        ("floor: torch.empty_like", None, lambda: torch.empty_like(xd), None, None),
        ("floor: FastKernel launch", None, lambda: launch(xd, xd), None, None),
        ("floor: Tensor.sum (fp32 rows)", None, lambda: rows.sum(), None, None),
        ("floor: autograd.Function, 1 alloc + 1 launch each way", None, lambda: apply(x, (1e-6,)), [x], None),
    ]


def _fwd_bwd(fn: Callable, leaves: list[torch.Tensor]) -> Callable:
    first = fn()
    outs = first if isinstance(first, tuple) else (first,)
    grads = [torch.ones_like(o) for o in outs]
    used = [t for t in leaves if t.requires_grad]

    def step():
        res = fn()
        torch.autograd.grad(res if isinstance(res, tuple) else (res,), used, grads)

    return step


def per_call_us(step: Callable, n: int, warmup: int, repeats: int) -> float:
    return host_us(step, n=n, warmup=warmup, repeats=repeats)


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)  # strings: markdown_table writes floats as .3g (1.76e+03)


def _profile(name: str, step: Callable, n: int) -> str:
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(n):
        step()
    prof.disable()
    torch.cuda.synchronize()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(15)
    # cProfile sees the calling thread only; on CUDA the autograd engine runs backward nodes on its device thread.
    # torch.profiler records the aten ops of every thread: which allocations / torch ops / launches each call makes.
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as tprof:
        for _ in range(n):
            step()
        torch.cuda.synchronize()
    table = tprof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20)
    return (
        f"### cProfile: {name} ({n} calls)\n\n```\n{buf.getvalue()}\n```\n\n"
        f"### torch.profiler (all threads): {name} ({n} calls)\n\n```\n{table}\n```\n"
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1000, help="calls per timed repeat")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats per row (the fastest is reported)")
    ap.add_argument("--warmup", type=int, default=50, help="untimed calls first (Triton compiles on the first)")
    ap.add_argument("--only", default="", help="comma-separated substrings of op names to run (default: all)")
    ap.add_argument("--profile", action="store_true", help="also print cProfile tops of each flasht5 fwd+bwd")
    ap.add_argument("--out", default=None, help="results markdown file (default benchmarks/results/<date>-<gpu>.md)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_overhead.py measures host overhead of CUDA launches: it needs a CUDA GPU (none found)")

    only = [s.strip() for s in args.only.split(",") if s.strip()]
    rows, profiles, over = [], [], []
    for name, torch_fn, ft5_fn, leaves, torch_leaves in cases():
        if only and not any(s in name for s in only) and not name.startswith("floor"):  # floors: always
            continue
        for mode in ("fwd", "fwd+bwd") if leaves is not None else ("call",):
            t = f = None
            if torch_fn is not None:
                step = torch_fn if mode != "fwd+bwd" else _fwd_bwd(torch_fn, torch_leaves or leaves)
                t = per_call_us(step, args.n, args.warmup, args.repeats)
            if ft5_fn is not None:
                step = ft5_fn if mode != "fwd+bwd" else _fwd_bwd(ft5_fn, leaves)
                f = per_call_us(step, args.n, args.warmup, args.repeats)
                if args.profile and mode == "fwd+bwd":
                    profiles.append(_profile(f"{name} {mode}", step, min(args.n, 300)))
            ratio = f / t if t and f else None
            rows.append(
                {
                    "op": f"{name} {mode}",
                    "torch us": _fmt(t, ".1f"),
                    "flasht5 us": _fmt(f, ".1f"),
                    "ratio": _fmt(ratio, ".2f"),
                }
            )
            if ratio is not None and ratio > TARGET:
                over.append(f"{name} {mode}")
            print(
                f"[overhead] {name + ' ' + mode:45s} torch {_fmt(t, '8.1f')} us  flasht5 {_fmt(f, '8.1f')} us",
                flush=True,
            )
    table = markdown_table(rows, ["op", "torch us", "flasht5 us", "ratio"])
    note = (
        f"Wall time per call on tiny inputs (host overhead), fastest of {args.repeats} x {args.n} calls after "
        f"{args.warmup} warm-up calls; bf16 inputs requiring grad. ratio = flasht5 / torch, target <= {TARGET}. "
        "Torch ops: F.rms_norm, x + r then F.rms_norm, F.gelu(tanh) * up, F.cross_entropy, F.linear + "
        "F.cross_entropy, F.scaled_dot_product_attention (default dispatch, no bias, (B, H, L, D) inputs) for both "
        "attention rows. The floor rows (flasht5 column only) price one allocation, one FastKernel launch, one "
        "torch sum and the autograd.Function route itself on this host.\n\n"
        + (f"Over the target: {', '.join(over)}.\n" if over else "Every row is within the target.\n")
    )
    text = note + "\n" + table + "".join("\n" + p for p in profiles)
    print(text)
    path = write_results("flasht5 ops: host overhead per call", text, out=args.out)
    print(f"[overhead] {versions()}\n[overhead] results appended to {path}")


if __name__ == "__main__":
    main()

"""Benchmark flasht5's fused ops (RMSNorm, cross-entropy, linear + cross-entropy, gated activation), forward + backward.

Every row is measured in the same process against: plain PyTorch eager (the ``*_ref`` references: fp32 upcast for
the loss), ``torch.compile`` of the same reference, and Liger-Kernel's kernel where it is importable (carried as a
wheel to the GPU machine). Bandwidth-bound ops report achieved GB/s against a device-to-device copy measured in the
same run; the losses report peak memory above the inputs.

    PYTHONPATH=src python3 benchmarks/bench_ops.py --out benchmarks/results/2026-11-29-h200.md
    python3 benchmarks/bench_ops.py --quick          # tiny shapes, CPU-friendly smoke run of the script itself
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from utils import bench, markdown_table, peak_memory, write_results  # noqa: E402

import flasht5.ops.loss as loss_mod  # noqa: E402
import flasht5.ops.norm as norm_mod  # noqa: E402
from flasht5.ops.activations import gated_act, gated_act_ref  # noqa: E402
from flasht5.ops.loss import (  # noqa: E402
    cross_entropy,
    cross_entropy_ref,
    linear_cross_entropy,
    linear_cross_entropy_ref,
)
from flasht5.ops.norm import rms_norm, rms_norm_ref  # noqa: E402

GB = 1e9
_QUICK = False  # --quick: one repetition per measurement (the run only checks the script)


def _div(a: float, b: float) -> float:
    return a / b if b and b == b else float("nan")


def _liger():
    """Liger-Kernel's autograd functions, or None when it is not installed."""
    try:
        from liger_kernel.ops.cross_entropy import LigerCrossEntropyFunction
        from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction
        from liger_kernel.ops.geglu import LigerGELUMulFunction
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction
    except Exception as e:  # noqa: BLE001 - any import problem just means "no Liger in this run"
        print(f"[liger] not available: {type(e).__name__}: {e}", flush=True)
        return None
    import importlib.metadata

    print(f"[liger] liger-kernel {importlib.metadata.version('liger-kernel')}", flush=True)
    return {
        "ce": LigerCrossEntropyFunction,
        "flce": LigerFusedLinearCrossEntropyFunction,
        "geglu": LigerGELUMulFunction,
        "rms": LigerRMSNormFunction,
        "swiglu": LigerSiLUMulFunction,
    }


def _fwd_bwd(fn: Callable, inputs: list[torch.Tensor], grad_out: torch.Tensor | None = None) -> Callable[[], None]:
    """One forward + backward; torch.autograd.grad so no .grad accumulation kernel is timed."""
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]

    def run() -> None:
        out = fn(*inputs)
        torch.autograd.grad(out, leaves, grad_out)

    return run


def _measure(
    name: str, run: Callable[[], None], *, memory: bool = False, graph: bool = False, warmup: int = 10, rep: int = 50
) -> dict:
    """Median ms (inside a CUDA graph when ``graph``: kernel time without Python/launch overhead, which otherwise
    dominates the small bandwidth-bound ops on this machine's CPU), optional peak memory; OOM/errors become rows."""
    try:
        run()  # compile / first-call costs out of the timing
        if _QUICK:
            ms, mode = bench(run, warmup=0, rep=0), "quick"
        elif graph and torch.cuda.is_available():
            import triton.testing

            ms, mode = float(triton.testing.do_bench_cudagraph(run, rep=20, return_mode="median")), "graph"
        else:
            ms, mode = bench(run, warmup=warmup, rep=rep), "launch"
        mem = peak_memory(run) if memory else 0
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
        print(f"  {name}: OOM", flush=True)
        return {"impl": name, "ms": float("nan"), "mem": float("nan"), "note": "OOM"}
    except Exception as e:  # noqa: BLE001 - a competitor failing must not end the run
        print(f"  {name}: FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)
        return {"impl": name, "ms": float("nan"), "mem": float("nan"), "note": f"error: {type(e).__name__}"}
    gc.collect()
    print(f"  {name}: {ms:.3f} ms ({mode}), peak {mem / GB:.2f} GB", flush=True)
    return {"impl": name, "ms": ms, "mem": mem, "note": mode}


def copy_bandwidth(device: str, quick: bool) -> float:
    n = (1 << 20) if quick else (1 << 30)  # 2 GiB of bf16 each way on the GPU
    x = torch.randn(n, device=device).to(torch.bfloat16)
    y = torch.empty_like(x)
    ms = bench(lambda: y.copy_(x))
    gbs = 2 * x.numel() * x.element_size() / (ms * 1e-3) / GB
    print(f"copy bandwidth: {gbs:.0f} GB/s (read + write)", flush=True)
    return gbs


def _compile(fn: Callable, backend: str) -> Callable:
    return torch.compile(fn, dynamic=False, backend=backend)


def _bandwidth_rows(op: str, shape: str, res: dict[str, dict], bytes_moved: int, copy_gbs: float) -> list[dict]:
    """Table rows of a bandwidth-bound op: achieved GB/s, its share of the copy bandwidth, time vs flasht5's."""
    rows = []
    for k, r in res.items():
        gbs = bytes_moved / (r["ms"] * 1e-3) / GB
        rows.append(
            {
                "op": op,
                "shape": shape,
                "impl": k,
                "ms": r["ms"],
                "GB/s": gbs,
                "% copy BW": 100 * gbs / copy_gbs,
                "flasht5 speedup": r["ms"] / res["flasht5"]["ms"],
                "note": r["note"],
            }
        )
    return rows


def bench_rms_norm(device, quick, backend, liger, copy_gbs) -> list[dict]:
    rows = []
    n_tokens = 16 if quick else 65536
    for d_model in (768, 1024, 4096):
        print(f"[rms_norm] tokens={n_tokens} d_model={d_model}", flush=True)
        x = torch.randn(n_tokens, d_model, device=device, dtype=torch.bfloat16, requires_grad=True)
        w = (1 + 0.1 * torch.randn(d_model, device=device)).to(torch.bfloat16).requires_grad_()
        dy = torch.randn_like(x)
        impls = {
            "flasht5": lambda x, w: rms_norm(x, w, 1e-6),
            "eager": lambda x, w: rms_norm_ref(x, w, 1e-6),
            "torch.compile": _compile(lambda x, w: rms_norm_ref(x, w, 1e-6), backend),
        }
        if liger:
            impls["liger"] = lambda x, w: liger["rms"].apply(x, w, 1e-6, 0.0, "llama", False)
        bytes_moved = 5 * x.numel() * x.element_size()  # fwd: read x, write y; bwd: read x, dy, write dx
        res = {k: _measure(k, _fwd_bwd(f, [x, w], dy), graph=True) for k, f in impls.items()}
        res["flasht5 (no graph)"] = _measure("flasht5 (no graph)", _fwd_bwd(impls["flasht5"], [x, w], dy))
        rows += _bandwidth_rows("rms_norm fwd+bwd", f"{n_tokens}x{d_model}", res, bytes_moved, copy_gbs)
    # the fused residual add at one size (eager = separate add + norm)
    d_model = 1024
    x = torch.randn(n_tokens, d_model, device=device, dtype=torch.bfloat16, requires_grad=True)
    r_ = torch.randn_like(x, requires_grad=True)
    w = torch.ones(d_model, device=device, dtype=torch.bfloat16, requires_grad=True)
    dy = (torch.randn_like(x), torch.randn_like(x))
    bytes_moved = 8 * x.numel() * x.element_size()  # fwd: r x, r, w y, h; bwd: r h, dy, dh_in, w dh (= dx = dres)
    res = {
        k: _measure(f"{k} (+residual)", _fwd_bwd(f, [x, w, r_], dy), graph=True)
        for k, f in {
            "flasht5": lambda x, w, r: rms_norm(x, w, 1e-6, r),
            "eager": lambda x, w, r: rms_norm_ref(x, w, 1e-6, r),
        }.items()
    }
    return rows + _bandwidth_rows("add+rms_norm fwd+bwd", f"{n_tokens}x{d_model}", res, bytes_moved, copy_gbs)


def _labels(n_tokens: int, n_classes: int, device: str) -> torch.Tensor:
    y = torch.randint(0, n_classes, (n_tokens,), device=device)
    y[torch.rand(n_tokens, device=device) < 0.1] = -100  # some padding, as in real batches
    return y


def bench_cross_entropy(device, quick, backend, liger) -> list[dict]:
    rows = []
    shapes = [(4, 32128), (4, 250112)] if quick else [(16384, 32128), (65536, 32128), (16384, 250112), (32768, 250112)]
    z = 1e-4
    for n_tokens, n_classes in shapes:
        print(f"[cross_entropy] tokens={n_tokens} vocab={n_classes}", flush=True)
        logits = (2 * torch.randn(n_tokens, n_classes, device=device)).to(torch.bfloat16).requires_grad_()
        labels = _labels(n_tokens, n_classes, device)
        logit_bytes = logits.numel() * logits.element_size()
        impls = {"flasht5": lambda x, y=labels: cross_entropy(x, y, z_loss=z)}
        big = n_tokens * n_classes > 5e9  # eager's fp32 copies of an 8e9-element batch do not fit in 141 GB
        if not big:
            impls["eager (fp32 upcast)"] = lambda x, y=labels: cross_entropy_ref(x, y, z_loss=z)
        impls["torch.compile"] = _compile(lambda x, y=labels: cross_entropy_ref(x, y, z_loss=z), backend)
        res = {k: _measure(k, _fwd_bwd(f, [logits]), memory=True, graph=True) for k, f in impls.items()}
        if liger:  # Liger overwrites its input with the gradient: give it its own copy, measured last
            own = logits.detach().clone().requires_grad_()
            fn = lambda x, y=labels: liger["ce"].apply(x, y, None, -100, z, 0.0, "mean", None, False, False, False)[0]  # noqa: E731
            # (no CUDA graph: Liger's backward syncs on grad_output == 1)
            res["liger"] = _measure("liger", _fwd_bwd(fn, [own]), memory=True)
            del own
        eager_ms = res.get("eager (fp32 upcast)", {}).get("ms", float("nan"))
        eager_mem = res.get("eager (fp32 upcast)", {}).get("mem", float("nan"))
        for k, r in res.items():
            rows.append(
                {
                    "op": "cross_entropy fwd+bwd",
                    "shape": f"{n_tokens}x{n_classes}",
                    "impl": k,
                    "ms": r["ms"],
                    "eff. GB/s (read logits + write grad)": 2 * logit_bytes / (r["ms"] * 1e-3) / GB,
                    "peak GB": r["mem"] / GB,
                    "peak / logits": _div(r["mem"], logit_bytes),
                    "speedup vs eager": _div(eager_ms, r["ms"]),
                    "mem vs eager": _div(r["mem"], eager_mem),
                    "note": r["note"],
                }
            )
        del logits
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return rows


def bench_linear_cross_entropy(device, quick, liger) -> list[dict]:
    rows = []
    n_tokens = 8 if quick else 32768
    z = 1e-4
    for d_model, n_classes in ((768, 32128), (2048, 32128), (768, 250112), (2048, 250112)):
        chunk = loss_mod._default_chunk_tokens(n_tokens, n_classes, d_model)
        print(f"[linear_cross_entropy] tokens={n_tokens} d_model={d_model} vocab={n_classes} chunk={chunk}", flush=True)
        hidden = torch.randn(n_tokens, d_model, device=device, dtype=torch.bfloat16, requires_grad=True)
        weight = (torch.randn(n_classes, d_model, device=device) * d_model**-0.5).to(torch.bfloat16)
        weight.requires_grad_()
        labels = _labels(n_tokens, n_classes, device)
        logit_bytes = n_tokens * n_classes * 2
        grad_bytes = (hidden.numel() + weight.numel()) * 2  # the two gradients every implementation returns
        impls = {
            "flasht5 fused": lambda h, w, y=labels: linear_cross_entropy(h, w, y, z_loss=z),
            "matmul + flasht5 CE": lambda h, w, y=labels: cross_entropy(h @ w.t(), y, z_loss=z),
        }
        if n_classes * n_tokens < 2e9:
            impls["matmul + eager CE"] = lambda h, w, y=labels: linear_cross_entropy_ref(h, w, y, z_loss=z)
        if liger:
            impls["liger FLCE"] = lambda h, w, y=labels: liger["flce"].apply(h, w, y, None, None, -100, z, 0.0, "mean")[
                0
            ]
        res = {k: _measure(k, _fwd_bwd(f, [hidden, weight]), memory=True, warmup=5, rep=30) for k, f in impls.items()}
        unfused = res["matmul + flasht5 CE"]["ms"]
        flops = 3 * 2 * n_tokens * n_classes * d_model
        for k, r in res.items():
            rows.append(
                {
                    "op": "linear+CE fwd+bwd",
                    "shape": f"{n_tokens}x{d_model}->{n_classes}",
                    "impl": k,
                    "ms": r["ms"],
                    "TFLOP/s (3 matmuls)": flops / (r["ms"] * 1e-3) / 1e12,
                    "throughput vs matmul+CE": unfused / r["ms"],
                    "peak GB": r["mem"] / GB,
                    "extra (peak - grads) / bf16 logits": _div(r["mem"] - grad_bytes, logit_bytes)
                    if r["mem"]
                    else float("nan"),
                    "note": r["note"],
                }
            )
        del hidden, weight
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return rows


def bench_gated_act(device, quick, backend, liger, copy_gbs) -> list[dict]:
    rows = []
    n_tokens, d_ff = (16, 2816) if quick else (32768, 2816)
    for kind in ("gelu_tanh", "silu"):
        print(f"[gated_act] {kind} tokens={n_tokens} d_ff={d_ff}", flush=True)
        gate = torch.randn(n_tokens, d_ff, device=device, dtype=torch.bfloat16, requires_grad=True)
        up = torch.randn_like(gate, requires_grad=True)
        dout = torch.randn_like(gate)
        impls = {
            "flasht5": lambda g, u, k=kind: gated_act(g, u, k),
            "eager": lambda g, u, k=kind: gated_act_ref(g, u, k),
            "torch.compile": _compile(lambda g, u, k=kind: gated_act_ref(g, u, k), backend),
        }
        if liger:
            impls["liger"] = lambda g, u, k=kind: (liger["geglu"] if k == "gelu_tanh" else liger["swiglu"]).apply(g, u)
        bytes_moved = 8 * gate.numel() * gate.element_size()  # fwd r g, u, w out; bwd r dout, g, u, w dg, du
        res = {k: _measure(k, _fwd_bwd(f, [gate, up], dout), graph=True) for k, f in impls.items()}
        rows += _bandwidth_rows(f"gated_act {kind} fwd+bwd", f"{n_tokens}x{d_ff}", res, bytes_moved, copy_gbs)
    return rows


def sweep_configs(device, quick) -> list[dict]:
    """Launch-setting sweeps for the bandwidth kernels that have knobs (informs the defaults; `None` = the default)."""
    rows = []
    n_tokens, n_classes = (4, 32128) if quick else (16384, 32128)
    logits = torch.randn(n_tokens, n_classes, device=device).to(torch.bfloat16).requires_grad_()
    labels = _labels(n_tokens, n_classes, device)
    for cfg in [None, (4096, 8), (8192, 8), (8192, 16), (16384, 16), (32768, 32)]:
        loss_mod._CONFIG_OVERRIDE = cfg
        r = _measure(f"ce {cfg}", _fwd_bwd(lambda x: cross_entropy(x, labels), [logits]))
        rows.append({"kernel": "cross_entropy", "shape": f"{n_tokens}x{n_classes}", "config": str(cfg), "ms": r["ms"]})
    loss_mod._CONFIG_OVERRIDE = None
    # RMSNorm: forward (BLOCK_M, warps) timed alone; backward (BLOCK_M, warps, stages, programs/SM) as fwd+bwd
    fwd_cfgs = [None, (1, 2), (4, 4), (4, 16), (1, 16)]
    bwd_cfgs = [None, (1, 2, 3, 8), (2, 4, 1, 4), (4, 4, 3, 4), (2, 8, 3, 2), (1, 8, 3, 4), (1, 16, 3, 4)]
    for d_model in (768, 1024, 4096):
        x = torch.randn(16 if quick else 65536, d_model, device=device, dtype=torch.bfloat16, requires_grad=True)
        w = torch.ones(d_model, device=device, dtype=torch.bfloat16, requires_grad=True)
        dy = torch.randn_like(x)
        shape = f"{x.shape[0]}x{d_model}"
        for cfg in fwd_cfgs:
            norm_mod._FWD_OVERRIDE = cfg
            r = _measure(f"rms fwd {d_model} {cfg}", lambda x=x, w=w: rms_norm(x, w), graph=True)
            rows.append({"kernel": "rms_norm fwd", "shape": shape, "config": str(cfg), "ms": r["ms"]})
        norm_mod._FWD_OVERRIDE = None
        for cfg in bwd_cfgs:
            norm_mod._BWD_OVERRIDE = cfg
            r = _measure(f"rms fwd+bwd {d_model} {cfg}", _fwd_bwd(lambda x, w: rms_norm(x, w), [x, w], dy), graph=True)
            rows.append({"kernel": "rms_norm fwd+bwd (bwd config)", "shape": shape, "config": str(cfg), "ms": r["ms"]})
        norm_mod._BWD_OVERRIDE = None
    return rows


def _plot(rows: list[dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[str, dict[str, float]] = {}
    for r in rows:
        if r.get("ms") == r.get("ms"):  # skip NaN (OOM / error)
            groups.setdefault(f"{r['op']}\n{r['shape']}", {})[r["impl"]] = r["ms"]
    impls = sorted({k for g in groups.values() for k in g})
    fig, ax = plt.subplots(figsize=(max(10, 1.2 * len(groups)), 5))
    width = 0.8 / max(1, len(impls))
    for i, impl in enumerate(impls):
        xs, ys = [], []
        for j, g in enumerate(groups.values()):
            ref = g.get("flasht5", g.get("flasht5 fused"))
            if impl in g and ref:
                xs.append(j + i * width)
                ys.append(g[impl] / ref)  # time relative to flasht5: > 1 means flasht5 is faster
        ax.bar(xs, ys, width, label=impl)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))])
    ax.set_xticklabels(list(groups), fontsize=6, rotation=30, ha="right")
    ax.set_ylabel("time / flasht5 time (fwd+bwd)")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    ax.set_title("flasht5 ops vs competitors (higher bar = slower than flasht5)")
    fig.tight_layout()
    fig.savefig(png, dpi=130)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="results markdown file to append to (default: results/<date>-<gpu>.md)")
    p.add_argument("--png", default=None, help="bar chart path (default: next to --out)")
    p.add_argument("--quick", action="store_true", help="tiny shapes: checks the script, numbers mean nothing")
    p.add_argument("--only", default="rms,ce,lce,act", help="comma list of sections: rms,ce,lce,act,sweep")
    p.add_argument("--compile-backend", default=None, help="torch.compile backend (default inductor; aot_eager on CPU)")
    args = p.parse_args(argv)
    global _QUICK
    _QUICK = args.quick

    device = "cuda" if torch.cuda.is_available() else "cpu"
    backend = args.compile_backend or ("inductor" if device == "cuda" else "aot_eager")
    torch.manual_seed(0)
    liger = _liger() if device == "cuda" else None
    sections = set(args.only.split(","))
    t0 = time.time()
    copy_gbs = copy_bandwidth(device, args.quick)
    tables: list[tuple[str, list[dict]]] = []
    if "rms" in sections:
        tables.append(
            ("RMSNorm (bf16 x and weight, T5 semantics)", bench_rms_norm(device, args.quick, backend, liger, copy_gbs))
        )
    if "ce" in sections:
        tables.append(
            (
                "Cross-entropy (bf16 logits, z_loss=1e-4, 10% ignored)",
                bench_cross_entropy(device, args.quick, backend, liger),
            )
        )
    if "lce" in sections:
        tables.append(
            ("Linear + cross-entropy (bf16, z_loss=1e-4)", bench_linear_cross_entropy(device, args.quick, liger))
        )
    if "act" in sections:
        tables.append(("Gated activation (bf16)", bench_gated_act(device, args.quick, backend, liger, copy_gbs)))
    sweep = sweep_configs(device, args.quick) if "sweep" in sections else []
    print(f"total benchmark time {time.time() - t0:.0f} s", flush=True)

    out = Path(args.out) if args.out else None
    png = Path(args.png) if args.png else (out.with_suffix(".ops.png") if out else Path("bench_ops.png"))
    all_rows = [r for _, rows in tables for r in rows]
    _plot(all_rows, png)
    body = [
        f"Device-to-device copy bandwidth measured in this run: **{copy_gbs:.0f} GB/s** (read + write). "
        f"torch.compile backend: {backend}. Liger-Kernel: {'yes' if liger else 'not available'}. "
        "Speedup columns: competitor time / flasht5 time. `note` says how a row was timed: `graph` = median of "
        "CUDA-graph replays (kernel time, no Python/launch overhead; no L2 flush between replays), `launch` = "
        f"do_bench with normal launches (includes host overhead when it exceeds GPU time). Plot: `{png.name}`.\n"
    ]
    for title, rows in tables:
        body.append(f"### {title}\n\n{markdown_table(rows)}")
    if sweep:
        body.append(f"### Launch-config sweep (ms; `None` = the shipped default)\n\n{markdown_table(sweep)}")
    text = "\n".join(body)
    print(text, flush=True)
    path = write_results("flasht5 ops: RMSNorm, cross-entropy, linear+CE, gated act (issue 5)", text, out=out)
    print(f"wrote {path} and {png}", flush=True)


if __name__ == "__main__":
    main()

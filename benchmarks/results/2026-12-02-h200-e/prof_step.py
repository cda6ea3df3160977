"""Where the training step's GPU time goes: kernel time per step by category and the top kernels.

T5 v1.1-base, enc = dec = 512, batch 32, the bench_model.py step (fused AdamW, clipping), bf16 weights, CUDA graph
and eager. Kernel records of a torch.profiler trace of 3 steps (graph replays are traced kernel by kernel).
prof_step.md was written by the first version of the categories, which counted clipping's foreach norm (0.23 ms) as
"norm" and the norm's dweight sums (0.22 ms) as "other"; the README's table has them where they belong.

    PYTHONPATH=src python3 benchmarks/results/2026-12-02-h200-e/prof_step.py [L B]
"""

import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench_model import dense, flasht5_reference_state, flasht5_step, make_data  # noqa: E402

from flasht5.config import FlashT5Config  # noqa: E402

CATS = [
    ("attn bwd dq", ("_attn_bwd_dq",)),
    ("attn bwd dkdv", ("_attn_bwd_kv",)),
    ("attn bwd prep", ("_bwd_prep",)),
    ("attn fwd", ("_attn_fwd",)),
    ("matmul", ("gemm", "xmma", "cutlass", "nvjet", "sm90_", "splitk", "cublas")),
    ("optimizer", ("adam", "multi_tensor", "foreach")),  # before "norm": clipping's foreach norm is multi_tensor
    ("norm", ("_rms_norm", "_dw_sum")),
    ("gated act", ("gated", "gelu", "_act")),
    ("loss", ("ce_", "cross", "_lm", "loss", "logsumexp")),
    ("embedding", ("embed", "index", "scatter", "gather")),
]


def cat(name: str) -> str:
    low = name.lower()
    for c, keys in CATS:
        if any(k in low for k in keys):
            return c
    return "other"


def profile(graph: bool, L: int, B: int, steps: int = 3) -> None:
    cfg = FlashT5Config.from_preset("t5-v1_1-base", dropout_rate=0.0)
    ours, _ = flasht5_reference_state(cfg)
    data = make_data(dense(L, B), cfg.vocab_size)
    step, keep = flasht5_step(cfg, ours, data, graph=graph, bf16_weights=True)
    for _ in range(4):
        step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    per = defaultdict(float)
    calls = defaultdict(int)
    for e in prof.profiler.kineto_results.events():
        if e.device_type() != torch.autograd.DeviceType.CUDA:
            continue
        per[e.name()] += (e.end_ns() - e.start_ns()) / 1e6 / steps
        calls[e.name()] += 1
    total = sum(per.values())
    bycat = defaultdict(float)
    for n, t in per.items():
        bycat[cat(n)] += t
    print(f"\n## {'CUDA graph' if graph else 'eager'}, L={L} B={B}: kernel time {total:.2f} ms per step")
    print("| category | ms/step | share |\n|---|---|---|")
    for c, t in sorted(bycat.items(), key=lambda x: -x[1]):
        print(f"| {c} | {t:.2f} | {100 * t / total:.1f} % |")
    print("\n| kernel | category | ms/step | calls/step |\n|---|---|---|---|")
    for n, t in sorted(per.items(), key=lambda x: -x[1])[:45]:
        print(f"| `{n[:90]}` | {cat(n)} | {t:.3f} | {calls[n] // steps} |")
    del step, keep
    torch.cuda.empty_cache()


if __name__ == "__main__":
    L, B = (int(sys.argv[1]), int(sys.argv[2])) if len(sys.argv) > 2 else (512, 32)
    profile(True, L, B)
    profile(False, L, B)

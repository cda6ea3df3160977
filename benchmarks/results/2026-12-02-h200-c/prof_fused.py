"""Eager flasht5 step, 32x512 T5-base: CPU self time per op and op counts (FLASHT5_FUSED_PROJ from the environment)."""

import time

import torch
from torch.profiler import ProfilerActivity, profile

from flasht5 import FlashT5Config
from flasht5.layout import Batch
from flasht5.model import FUSED_PROJ, T5
from flasht5.train.step import TrainStep

cfg = FlashT5Config.from_preset("t5-v1_1-base", dropout_rate=0.0)
torch.manual_seed(0)
model = T5(cfg).cuda().train()
opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True, capturable=True)
step = TrainStep(model, opt, grad_clip=1.0, amp_dtype=torch.bfloat16, cuda_graph=False)
b = Batch.dense(torch.randint(2, 32000, (32, 512), device="cuda"), torch.randint(2, 32000, (32, 512), device="cuda"))
for _ in range(5):
    step(b)
torch.cuda.synchronize()
t = time.perf_counter()
for _ in range(10):
    step(b)
host = (time.perf_counter() - t) / 10
torch.cuda.synchronize()
wall = (time.perf_counter() - t) / 10
print(f"FUSED_PROJ={FUSED_PROJ}: host (enqueue) {host * 1e3:.1f} ms/step, wall {wall * 1e3:.1f} ms/step")

with profile(activities=[ProfilerActivity.CPU]) as prof:
    for _ in range(3):
        step(b)
    torch.cuda.synchronize()
ka = prof.key_averages()
tot = sum(e.self_cpu_time_total for e in ka)
print(f"ops: {sum(e.count for e in ka) // 3} per step, CPU self total {tot / 3 / 1e3:.1f} ms/step")
for e in sorted(ka, key=lambda e: -e.self_cpu_time_total)[:22]:
    per_step, per_call = e.self_cpu_time_total / 3 / 1e3, e.self_cpu_time_total / max(e.count, 1)
    print(f"{e.key[:60]:60s} n/step {e.count // 3:5d}  self ms/step {per_step:7.2f}  us/call {per_call:7.1f}")

"""Eager flasht5 step, 32x512 T5-base, FUSED_PROJ off / on alternated in one process (host speed drifts between
runs). Device call D: ``PYTHONPATH=src python3 ab_fused.py``."""

import statistics as st
import time

import torch

import flasht5.model as M
from flasht5 import FlashT5Config
from flasht5.layout import Batch
from flasht5.model import T5
from flasht5.train.step import TrainStep

cfg = FlashT5Config.from_preset("t5-v1_1-base", dropout_rate=0.0)
torch.manual_seed(0)
model = T5(cfg).cuda().train()
opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True, capturable=True)
step = TrainStep(model, opt, grad_clip=1.0, amp_dtype=torch.bfloat16, cuda_graph=False)
b = Batch.dense(torch.randint(2, 32000, (32, 512), device="cuda"), torch.randint(2, 32000, (32, 512), device="cuda"))
res = {False: [], True: []}
for flag in (False, True):
    M.FUSED_PROJ = flag
    for _ in range(4):
        step(b)
torch.cuda.synchronize()
for rnd in range(8):
    for flag in (False, True) if rnd % 2 == 0 else (True, False):
        M.FUSED_PROJ = flag
        step(b)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(6):
            step(b)
        torch.cuda.synchronize()
        res[flag].append((time.perf_counter() - t) / 6 * 1e3)
for flag, v in res.items():
    print(f"FUSED_PROJ={flag}: median {st.median(v):.1f} ms/step  all {[round(x, 1) for x in v]}")
print(f"on / off: {st.median(res[True]) / st.median(res[False]):.3f}")

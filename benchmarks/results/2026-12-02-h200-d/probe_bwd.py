"""Probe: where the attention time goes at T5 training lengths (issue 9: backward <= 2.5x forward at L <= 1024).

T5 v1.1-base attention shapes (bf16, H=12, D=64, 16k tokens: B = 16384 // L), bidirectional (encoder) and causal
(decoder). Every figure is *kernel* time from torch.profiler (the sum of the GPU kernels of one call, averaged over
20 calls), so host noise does not enter; gradients by ``torch.autograd.grad`` (no accumulation kernels). Rows: SDPA's
default dispatch without bias; ours as the model calls it (a rel_lut that needs its gradient), without the lut
gradient, without a bias; then tile sweeps of each kernel (fwd, dkdv, dq) with the others at their defaults.

  PYTHONPATH=src python3 benchmarks/results/2026-12-02-h200-d/probe_bwd.py [LENGTHS [KERNELS]]
  (defaults: 512,1024,2048 and fwd,dkdv,dq)
"""

import collections
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import utils  # noqa: E402

from flasht5.ops import attention as A  # noqa: E402
from flasht5.ops.relative_position import t5_bias_lut  # noqa: E402

H, D, TOKENS = 12, 64, 16384
C = A._Cfg
SWEEP = {
    "fwd": [C(64, 64, 4, 3), C(128, 64, 8, 3), C(128, 64, 8, 4), C(128, 128, 8, 3), C(64, 64, 4, 4), C(128, 64, 4, 3),
            C(64, 128, 4, 3), C(64, 32, 4, 3), C(128, 32, 4, 3)],
    "dkdv": [C(64, 64, 4, 3), C(32, 64, 4, 3), C(32, 128, 8, 3), C(64, 128, 8, 3), C(32, 64, 4, 4), C(64, 64, 4, 2),
             C(32, 128, 4, 3), C(16, 64, 4, 4), C(16, 128, 4, 3), C(32, 32, 4, 3)],
    "dq": [C(64, 32, 4, 4), C(64, 32, 4, 3), C(128, 32, 8, 3), C(64, 64, 4, 3), C(128, 32, 4, 3), C(64, 16, 4, 4),
           C(32, 32, 4, 4), C(128, 16, 4, 3), C(128, 64, 8, 3)],
}  # fmt: skip
KERNEL = {"fwd": "_attn_fwd", "dkdv": "_attn_bwd_kv", "dq": "_attn_bwd_dq"}


def kernel_us(fn, n=20) -> dict[str, float]:
    """{kernel name: us per call} and 'total'."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
    per = collections.defaultdict(float)
    for e in prof.key_averages():
        t = getattr(e, "self_device_time_total", 0.0)
        if t > 0:
            per[e.key] += t / n
    per["total"] = sum(per.values())
    return dict(per)


def inputs(L, causal):
    B = TOKENS // L
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, do = (torch.randn(B, L, H, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(4))
    for x in (q, k, v):
        x.requires_grad_()
    table = torch.randn(32, H, device="cuda", generator=g) * 0.5
    lut = t5_bias_lut(table, bidirectional=not causal, max_distance=128).detach()
    return q, k, v, lut, do


def ours(L, causal, lut_mode="grad", force=None):
    q, k, v, lut, do = inputs(L, causal)
    if lut_mode == "grad":
        lut = lut.clone().requires_grad_()
    elif lut_mode == "none":
        lut = None
    wrt = (q, k, v) + ((lut,) if lut_mode == "grad" else ())
    A._FORCE.clear()
    A._FORCE.update(force or {})
    try:

        def fwd():
            with torch.no_grad():
                return A.flash_attention(q, k, v, causal=causal, rel_lut=lut)

        def fb():
            out = A.flash_attention(q, k, v, causal=causal, rel_lut=lut)
            torch.autograd.grad(out, wrt, do)

        return kernel_us(fwd), kernel_us(fb)
    finally:
        A._FORCE.clear()


def sdpa(L, causal):
    q, k, v, _, do = inputs(L, causal)
    qt, kt, vt = (x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))
    dot = do.transpose(1, 2).contiguous()

    def fwd():
        with torch.no_grad():
            return F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)

    def fb():
        torch.autograd.grad(F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal), (qt, kt, vt), dot)

    return kernel_us(fwd), kernel_us(fb)


def row(rows, name, L, causal, f, fb):
    fwd, tot = f["total"], fb["total"]
    r = dict(case=name, L=L, causal=causal, fwd_us=round(fwd, 1), fwdbwd_us=round(tot, 1), bwd_us=round(tot - fwd, 1),
             bwd_x_fwd=round((tot - fwd) / fwd, 2), dkdv_us=round(fb.get("_attn_bwd_kv", 0), 1),
             dq_us=round(fb.get("_attn_bwd_dq", 0), 1), prep_us=round(fb.get("_bwd_prep", 0), 1))  # fmt: skip
    rows.append(r)
    print(r, flush=True)


def main():
    print("torch", torch.__version__, torch.cuda.get_device_name(), flush=True)
    lengths = tuple(int(x) for x in (sys.argv[1] if len(sys.argv) > 1 else "512,1024,2048").split(","))
    kernels = (sys.argv[2] if len(sys.argv) > 2 else "fwd,dkdv,dq").split(",")
    rows, sweep = [], []
    for L in lengths:
        for causal in (False, True):
            row(rows, "sdpa default, no bias", L, causal, *sdpa(L, causal))
            row(rows, "ours, t5 lut + grad (model)", L, causal, *ours(L, causal))
            row(rows, "ours, t5 lut, no grad", L, causal, *ours(L, causal, "nograd"))
            row(rows, "ours, no bias", L, causal, *ours(L, causal, "none"))
    print(utils.markdown_table(rows), flush=True)
    for L in lengths:
        for causal in (False, True):
            for kname in kernels:
                cands = SWEEP[kname]
                for c in cands:
                    try:
                        f, fb = ours(L, causal, force={kname: c})
                        us = (f if kname == "fwd" else fb)[KERNEL[kname]]
                        sweep.append(dict(kernel=kname, L=L, causal=causal, cfg=tuple(c)[:4], us=round(us, 1)))
                    except Exception as e:  # noqa: BLE001
                        sweep.append(dict(kernel=kname, L=L, causal=causal, cfg=tuple(c)[:4], us=float("nan"),
                                          note=f"{type(e).__name__}: {str(e)[:80]}"))  # fmt: skip
                    print(sweep[-1], flush=True)
    print(utils.markdown_table(sweep), flush=True)


if __name__ == "__main__":
    main()

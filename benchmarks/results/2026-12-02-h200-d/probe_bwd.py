"""Probe: where the attention backward's time goes at L=512 (issue 9: backward <= 2.5x forward).

T5 v1.1-base attention shapes (bf16, H=12, D=64, B=32, L=512), bidirectional (encoder) and causal (decoder):
forward / forward + backward / backward-only ms (``utils.bench``, median) of the model's call (a rel_lut that needs
its gradient, as a stack passes it to every layer) against the same call without the lut gradient, without any
bias, with the per-element d_lut atomics, the other backward variants, and SDPA's default dispatch without bias;
then tile sweeps of the two backward kernels and a per-kernel profile.

  PYTHONPATH=src python3 benchmarks/results/2026-12-02-h200-d/probe_bwd.py
"""

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import utils  # noqa: E402

from flasht5.ops import attention as A  # noqa: E402
from flasht5.ops.relative_position import t5_bias_lut  # noqa: E402

B, L, H, D = 32, 512, 12, 64


def inputs(causal):
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (
        torch.randn(B, L, H, D, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_() for _ in range(3)
    )
    table = torch.randn(32, H, device="cuda", generator=g) * 0.5
    lut = t5_bias_lut(table, bidirectional=not causal, max_distance=128).detach()
    do = torch.randn(B, L, H, D, device="cuda", dtype=torch.bfloat16, generator=g)
    return q, k, v, lut, do


def time_case(causal, lut_mode, force=None):
    q, k, v, lut, do = inputs(causal)
    if lut_mode == "grad":
        lut = lut.clone().requires_grad_()
    elif lut_mode == "none":
        lut = None
    A._FORCE.clear()
    A._FORCE.update(force or {})
    try:

        def fwd():
            with torch.no_grad():
                return A.flash_attention(q, k, v, causal=causal, rel_lut=lut)

        def fb():
            out = A.flash_attention(q, k, v, causal=causal, rel_lut=lut)
            out.backward(do)

        f, t = utils.bench(fwd), utils.bench(fb)
    finally:
        A._FORCE.clear()
    return f, t


def sdpa_case(causal):
    q, k, v, _, do = inputs(causal)
    qt, kt, vt = (x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))
    dot = do.transpose(1, 2).contiguous()

    def fwd():
        with torch.no_grad():
            return F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)

    def fb():
        F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal).backward(dot)

    return utils.bench(fwd), utils.bench(fb)


def row(name, causal, f, t, base=None):
    r = dict(case=name, causal=causal, fwd_ms=round(f, 4), fwdbwd_ms=round(t, 4), bwd_ms=round(t - f, 4),
             bwd_x_fwd=round((t - f) / f, 2))  # fmt: skip
    print(r, flush=True)
    return r


def main():
    print("torch", torch.__version__, torch.cuda.get_device_name(), flush=True)
    rows = []
    for causal in (False, True):
        rows.append(row("sdpa default, no bias", causal, *sdpa_case(causal)))
        rows.append(row("t5 lut + grad (model)", causal, *time_case(causal, "grad")))
        rows.append(row("t5 lut, no grad", causal, *time_case(causal, "nograd")))
        rows.append(row("no bias", causal, *time_case(causal, "none")))
        rows.append(row("t5 + grad, per-element atomics", causal, *time_case(causal, "grad", {"diag_gather": False})))
        for var in ("split2", "split3", "fused"):
            rows.append(row(f"t5 + grad, bwd={var}", causal, *time_case(causal, "grad", {"bwd": var})))
    print("\n## tile sweeps (t5 + grad, split)", flush=True)
    C = A._Cfg
    dkdv = [C(64, 64, 4, 3), C(32, 64, 4, 3), C(32, 128, 8, 3), C(64, 128, 8, 3), C(32, 64, 4, 4), C(64, 64, 4, 2),
            C(64, 64, 8, 3), C(128, 64, 8, 3), C(32, 128, 4, 3), C(16, 64, 4, 4)]  # fmt: skip
    dq = [C(64, 32, 4, 4), C(64, 32, 4, 3), C(128, 32, 8, 3), C(64, 64, 8, 3), C(64, 64, 4, 3), C(128, 64, 8, 3),
          C(64, 16, 4, 4), C(32, 32, 4, 4), C(128, 32, 4, 3)]  # fmt: skip
    for causal in (False, True):
        for kname, cands in (("dkdv", dkdv), ("dq", dq)):
            for c in cands:
                try:
                    f, t = time_case(causal, "grad", {kname: c})
                    rows.append(row(f"{kname}={tuple(c)[:4]}", causal, f, t))
                except Exception as e:  # noqa: BLE001
                    print(kname, c, "FAILED", type(e).__name__, str(e)[:120], flush=True)
    print("\n## profile (t5 + grad, split), 5 fwd+bwd", flush=True)
    for causal in (False, True):
        q, k, v, lut, do = inputs(causal)
        lut = lut.clone().requires_grad_()
        for _ in range(3):
            A.flash_attention(q, k, v, causal=causal, rel_lut=lut).backward(do)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                A.flash_attention(q, k, v, causal=causal, rel_lut=lut).backward(do)
            torch.cuda.synchronize()
        print(f"causal={causal}", flush=True)
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60), flush=True)
    print(utils.markdown_table(rows), flush=True)


if __name__ == "__main__":
    main()

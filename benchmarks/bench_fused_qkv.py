"""Benchmark: does fusing the q, k, v projections into one matmul pay? (issue 11: "fused QKV projections where that
pays").

T5 v1.1-base's attention projections (d_model 768 -> 12 heads x 64), bf16, no bias: three ``F.linear`` calls
against one over the concatenated (3 x 768, 768) weight (the q / k / v outputs are then views, as a fused model
would use them). Shapes: the encoder's 32 x 512 tokens and the decoder step of generation (1, 8, 32, 128 rows: one
new token per row; its self-attention's q, k, v; the cross-attention's query reads another input, the output of
the self-attention sub-block, and its K/V are computed once per request, so only the self-attention fuses).

Timed as generation runs them: calls captured in one CUDA graph and replayed (``utils.graph_us``, launch overhead
out of the picture; per call = one layer's projections). Reported: microseconds per layer, the ratio, and what the
saving would be per generated token for the 12 decoder layers of T5-base.

  PYTHONPATH=src python3 benchmarks/bench_fused_qkv.py [--out results.md]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import utils  # noqa: E402

D, INNER, LAYERS = 768, 768, 12


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_fused_qkv needs a CUDA GPU (the timings are CUDA-graph replays)")
    t0 = time.perf_counter()
    dev, dt = torch.device("cuda"), torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    w = [torch.randn(INNER, D, device=dev, dtype=dt, generator=g) * D**-0.5 for _ in range(3)]
    fused = torch.cat(w)  # (3 x inner, d): one matmul, q / k / v as views of its output
    rows = []
    for name, tokens in [("encoder 32 x 512", 32 * 512), *[(f"decode step, {b} rows", b) for b in (1, 8, 32, 128)]]:
        x = torch.randn(tokens, D, device=dev, dtype=dt, generator=g)
        us3 = utils.graph_us([lambda x=x: [F.linear(x, wi) for wi in w]])
        us1 = utils.graph_us([lambda x=x: F.linear(x, fused).split(INNER, dim=-1)])
        per_step = "" if tokens > 128 else (us3 - us1) * LAYERS
        rows.append({"shape": name, "3 matmuls (us)": us3, "1 fused (us)": us1, "fused / 3": us1 / us3,
                     "saved per decode step, 12 layers (us)": per_step})  # fmt: skip
        print(rows[-1], flush=True)
    body = (
        "bf16, T5 v1.1-base projections (768 -> 768 each, no bias); microseconds per layer, CUDA-graph replay "
        "(launch overhead excluded, as in the captured decode step).\n\n" + utils.markdown_table(rows)
    )
    utils.write_sections("Fused QKV projections: measured", [("Result", body)], args.out, t0)


if __name__ == "__main__":
    main()

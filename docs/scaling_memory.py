"""Check docs/scaling.md's memory arithmetic on one GPU: peak memory of a T5 training step against the formula.

    PYTHONPATH=src python docs/scaling_memory.py --preset t5-v1_1-large --out $OUT/scaling_memory.md

For each (encoder tokens, decoder tokens, gradient checkpointing) it builds the model (fp32 weights, bf16 autocast,
flash backend, AdamWScale), runs three eager training steps on a packed varlen batch of documents of
``--doc-len`` / ``--doc-len // 4`` tokens, and reports torch.cuda's peak allocation next to the arithmetic of
docs/scaling.md: 16 bytes per parameter of state (fp32 weights, gradients and two moments) plus activations

    encoder: T_enc * L_enc * (8 d + 3 d_ff) * 2 bytes     (+ T_enc * L_dec * 2 d * 2: the decoder's cross K/V)
    decoder: T_dec * L_dec * (12 d + 3 d_ff) * 2 bytes
    checkpointed: the blocks' inputs only, (T_enc * L_enc + T_dec * L_dec) * d * 2 bytes, plus one block's live set

(d_inner = heads * d_kv = d for the T5 v1.1 family). Not a test: a measurement for the document.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch


def act_bytes(cfg, t_enc: int, t_dec: int, checkpointed: bool) -> int:
    d, ff = cfg.d_model, cfg.d_ff
    inner = cfg.num_heads * cfg.d_kv
    le, ld = cfg.num_layers, cfg.num_decoder_layers
    if checkpointed:
        one = max(t_enc * (4 * d + 4 * inner + 3 * ff), t_dec * (6 * d + 6 * inner + 3 * ff)) * 2
        return (t_enc * le + t_dec * ld) * d * 2 + one
    enc = t_enc * le * (4 * d + 4 * inner + 3 * ff) * 2
    cross_kv = t_enc * ld * 2 * inner * 2
    dec = t_dec * ld * (6 * d + 6 * inner + 3 * ff) * 2
    return enc + cross_kv + dec


def batch(t_enc: int, t_dec: int, doc_len: int, vocab: int, device):
    from flasht5.layout import Batch

    n = t_enc // doc_len
    dl = t_dec // n
    cu = torch.arange(n + 1, dtype=torch.int32, device=device)
    ids = torch.randint(3, vocab, (n * doc_len,), device=device)
    labels = torch.randint(3, vocab, (n * dl,), device=device)
    return Batch.varlen(ids, labels, cu * doc_len, doc_len, cu * dl, dl)


def measure(preset: str, t_enc: int, t_dec: int, doc_len: int, checkpointed: bool) -> dict:
    from flasht5.config import FlashT5Config
    from flasht5.model import T5
    from flasht5.train.optim import AdamWScale
    from flasht5.train.step import TrainStep

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    cfg = FlashT5Config.from_preset(preset)
    core = T5(cfg).cuda()
    if checkpointed:
        core.encoder.gradient_checkpointing = core.decoder.gradient_checkpointing = True
    n_params = sum(p.numel() for p in core.parameters())
    opt = AdamWScale(core.parameters(), lr=1e-3)
    step = TrainStep(core, opt, cuda_graph=False)
    b = batch(t_enc, t_dec, doc_len, cfg.vocab_size, "cuda")
    t0 = time.perf_counter()
    for _ in range(3):
        out = step(b)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    state = 16 * n_params
    act = act_bytes(cfg, b.input_ids.shape[1], b.labels.shape[1], checkpointed)
    del core, opt, step, out
    return dict(
        preset=preset, params=n_params, t_enc=b.input_ids.shape[1], t_dec=b.labels.shape[1], ckpt=checkpointed,
        peak=peak, state=state, act=act, secs=(time.perf_counter() - t0) / 3,
    )  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="t5-v1_1-large")
    ap.add_argument("--tokens", default="4096,16384,32768", help="encoder tokens per batch (comma-separated)")
    ap.add_argument("--doc-len", type=int, default=512)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    gib = 2**30
    rows = [
        "| preset | params | enc tok | dec tok | grad ckpt | peak GiB | state 16P GiB | act (formula) GiB | "
        "formula total GiB | peak / formula |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for t in (int(x) for x in args.tokens.split(",")):
        for ck in (False, True):
            r = measure(args.preset, t, t // 4, args.doc_len, ck)
            total = r["state"] + r["act"]
            rows.append(
                f"| {r['preset']} | {r['params'] / 1e6:.0f}M | {r['t_enc']} | {r['t_dec']} | {ck} | "
                f"{r['peak'] / gib:.2f} | {r['state'] / gib:.2f} | {r['act'] / gib:.2f} | {total / gib:.2f} | "
                f"{r['peak'] / total:.2f} |"
            )
            print(rows[-1], flush=True)
    text = "\n".join(rows) + "\n"
    text += f"\ntorch {torch.__version__}, {torch.cuda.get_device_name()}\n"
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()

"""CPU throughput of the data pipeline: ``flasht5 pretokenize`` and store -> denoise -> pack -> tensors.

The whole path is measured in one process with one torch thread, so "tokens/s" is per CPU core. "tokens in" are
the raw tokens read from the store (every one ends up in a batch). The competitor, measured in the same run, is a
per-example T5 span-corruption collator in the style of Hugging Face's ``run_t5_mlm_flax.py`` (noise mask ->
sentinel ids by cumsum -> filter -> pad to fixed rows, re-implemented here for the comparison), fed the same chunks.

    python benchmarks/bench_data.py --out benchmarks/results/2026-11-29-cpu.md
"""

from __future__ import annotations

import argparse
import gzip
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from utils import markdown_table, write_results

from flasht5.data.packing import UL2Dataset
from flasht5.data.store import TokenStore, build_store, pretokenize
from flasht5.data.tokenizer import load_tokenizer, mode_token_ids, sentinel_ids, train_tokenizer
from flasht5.data.ul2 import MODE_TOKENS, random_spans_noise_mask

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "data" / "corpus" / "kjv_train.txt.gz"


def hf_style_t5_batch(
    chunks: list[np.ndarray], rng: np.random.Generator, sentinel0: int, eos: int, pad: int, in_len: int, tgt_len: int
) -> dict[str, torch.Tensor]:
    """The competitor: one mask per example, sentinels by cumsum over mask starts, filter, pad rows."""
    ins, tgts = [], []
    for tokens in chunks:
        mask = random_spans_noise_mask(len(tokens), 0.15, 3.0, rng)
        for m in (mask, ~mask):
            starts = m & ~np.concatenate([[False], m[:-1]])
            sent = np.where(starts, sentinel0 + 1 - np.cumsum(starts), 0)
            sent = np.where(m & ~starts, -1, sent)  # continuation of a span: dropped
            ids = np.where(sent != 0, sent, tokens)
            out = np.concatenate([ids[ids >= 0], [eos]])
            (ins if m is mask else tgts).append(out)
    x = np.full((len(chunks), in_len), pad, dtype=np.int64)
    y = np.full((len(chunks), tgt_len), -100, dtype=np.int64)
    for i, (a, b) in enumerate(zip(ins, tgts)):
        x[i, : len(a)] = a[:in_len]
        y[i, : len(b)] = b[:tgt_len]
    return {
        "input_ids": torch.from_numpy(x),
        "attention_mask": torch.from_numpy((x != pad).astype(np.int64)),
        "labels": torch.from_numpy(y),
    }


def run_ours(
    store: TokenStore, tok_info: dict, mixture: str, mode: str, args: argparse.Namespace, row_len: int | None = None
) -> dict:
    ds = UL2Dataset(
        store,
        denoisers=mixture,
        sentinel_ids=tok_info["sentinels"],
        prefix_ids=tok_info["prefixes"],
        eos_id=1,
        max_input_len=args.max_input_len,
        max_target_len=args.max_target_len,
        max_tokens=args.max_tokens,
        mode=mode,
        seed=0,
        row_len=row_len,
    )
    it = iter(ds)
    for _ in range(3):  # warm-up: first pool fill
        next(it)
    raw = enc = n = 0
    fills, pads, tpads = [], [], []
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < args.seconds:
        b = next(it)
        s = b["stats"]
        raw += s["raw_tokens"]
        enc += s["input_tokens"]
        n += 1
        fills.append(s["input_fill"])
        pads.append(s["padding_frac"])
        tpads.append(s["target_padding_frac"])
    dt = time.perf_counter() - t0
    if mode == "padded":
        mode = f"padded {ds.row_len}/{ds.row_target_len}"
    return {
        "pipeline": "flasht5 UL2Dataset",
        "objective": mixture,
        "mode": mode,
        "batches": n,
        "tokens in/s/core": raw / dt,
        "encoder tok/s": enc / dt,
        "encoder fill": float(np.mean(fills)),
        "padding": float(np.mean(pads)),
        "target padding": float(np.mean(tpads)),
    }


def run_competitor(store: TokenStore, tok_info: dict, args: argparse.Namespace) -> dict:
    # The same chunks the t5 denoiser would take (T5's random_spans_helper length), 16 rows per batch.
    from flasht5.data.ul2 import PRESETS, max_chunk_length

    chunk = max_chunk_length(PRESETS["t5"][0][0], max_input_len=args.max_input_len, max_target_len=args.max_target_len)
    rows = max(1, args.max_tokens // args.max_input_len)
    rng = np.random.default_rng(0)
    doc, pos, raw, n = 0, 0, 0, 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < args.seconds:
        chunks = []
        while len(chunks) < rows:
            tokens = store.read(doc, pos, pos + chunk)
            pos += len(tokens)
            if pos >= store.lengths[doc]:
                doc, pos = (doc + 1) % len(store), 0
            if len(tokens):
                chunks.append(tokens)
        hf_style_t5_batch(chunks, rng, int(tok_info["sentinels"][0]), 1, 0, args.max_input_len, args.max_target_len)
        raw += sum(len(c) for c in chunks)
        n += 1
    dt = time.perf_counter() - t0
    return {
        "pipeline": "HF run_t5_mlm_flax-style collator",
        "objective": "t5",
        "mode": "padded (1 example/row)",
        "batches": n,
        "tokens in/s/core": raw / dt,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokenizer", help="tokenizer folder (default: train one on the shipped corpus)")
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--max-input-len", type=int, default=512)
    p.add_argument("--max-target-len", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=16384, help="encoder tokens per batch")
    p.add_argument("--seconds", type=float, default=4.0, help="measuring time per configuration")
    p.add_argument("--workers", type=int, default=2, help="pretokenize processes for the multi-worker run")
    p.add_argument("--out", default=None, help="results markdown file (appended)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tok_dir = (
            Path(args.tokenizer)
            if args.tokenizer
            else train_tokenizer([CORPUS], tmp / "tok", vocab_size=args.vocab_size, seed=0)
        )
        tok = load_tokenizer(tok_dir)
        tok_info = {"sentinels": sentinel_ids(tok), "prefixes": mode_token_ids(tok, MODE_TOKENS)}

        pre_rows = []
        for workers in (1, args.workers):
            s = pretokenize([CORPUS], tok_dir, tmp / f"store{workers}", workers=workers, progress=False)
            pre_rows.append(
                {
                    "workers": workers,
                    "documents": s["documents"],
                    "tokens": s["tokens"],
                    "seconds": s["seconds"],
                    "tokens/s": s["tokens_per_s"],
                    "MB of text/s": s["bytes"] / s["seconds"] / 1e6,
                }
            )
        store = TokenStore(tmp / "store1")
        # Short documents (64 tokens) stress the per-document costs.
        rng = np.random.default_rng(0)
        short = build_store(
            tmp / "short", (rng.integers(10, len(tok) - 200, size=64) for _ in range(20000)), vocab_size=len(tok)
        )

        rows = [run_competitor(store, tok_info, args)]
        for mixture in ("t5", "ul2", "fat5"):
            rows.append(run_ours(store, tok_info, mixture, "varlen", args))
            rows.append(run_ours(store, tok_info, mixture, "padded", args))
            rows.append(run_ours(store, tok_info, mixture, "padded", args, row_len=4 * args.max_input_len))
        for mixture in ("t5", "ul2"):
            r = run_ours(short, tok_info, mixture, "varlen", args)
            r["objective"] += " (64-token docs)"
            rows.append(r)
        base = rows[0]["tokens in/s/core"]
        for r in rows:
            r["vs competitor"] = r["tokens in/s/core"] / base
        with gzip.open(CORPUS, "rt") as f:
            words = sum(len(line.split()) for line in f)

    cols = [
        "pipeline",
        "objective",
        "mode",
        "batches",
        "tokens in/s/core",
        "vs competitor",
        "encoder fill",
        "padding",
        "target padding",
    ]
    body = (
        f"Machine: {os.cpu_count()} CPUs shared with other jobs; load average at the end "
        f"{', '.join(f'{x:.1f}' for x in os.getloadavg())} (absolute numbers move with it).\n\n"
        f"Corpus: shipped KJV training split ({words} words, {store.num_tokens} tokens, {len(store)} documents), "
        f"tokenizer: SentencePiece unigram, {len(tok)} ids. Limits: max_input_len={args.max_input_len}, "
        f"max_target_len={args.max_target_len}, max_tokens={args.max_tokens} (padded: "
        f"{args.max_tokens // args.max_input_len} rows). One process, torch threads = 1.\n\n"
        "### store -> denoise -> pack -> tensors\n\n"
        + markdown_table(rows, cols)
        + "\n'encoder fill' is encoder tokens / encoder budget; '(target) padding' is the share of pad tokens in "
        "the encoder (decoder) rows of 'padded A/B' batches (rows of A encoder and B decoder tokens); varlen has "
        "none. Target: >= 150k tokens in/s/core.\n\n"
        "### flasht5 pretokenize (tokenizer load excluded, worker start-up included)\n\n" + markdown_table(pre_rows)
    )
    print(body)
    if args.out:
        write_results("Data pipeline (CPU)", body, out=args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

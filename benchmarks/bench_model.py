"""Whole-model training step (forward + backward, bf16 autocast): flasht5 against transformers' T5, same run.

Scenarios (T5 v1.1-base shapes unless --preset says otherwise):
  full:     every example exactly --input-len / --target-len tokens (pre-training with fixed-length chunks)
  ragged:   lengths uniform in [L/8, L] (fine-tuning data): transformers pads, flasht5 unpads or packs
  long:     --long-len input tokens (long-context), fewer examples

Rows: transformers T5 with attn_implementation eager and sdpa (the competitor; its best is the baseline),
flasht5 sdpa (materialised bias), flasht5 flash on the padded batch, flasht5 flash on the packed (varlen) batch.
Throughput counts real (non-padding) encoder + decoder tokens. Writes a table to the results file.
"""

from __future__ import annotations

import argparse
import functools
import gc

import torch
from utils import bench, markdown_table, peak_memory, write_results


def _batches(scenario: str, args, vocab: int, g: torch.Generator):
    L, T = (args.long_len, args.long_target) if scenario == "long" else (args.input_len, args.target_len)
    n = max(1, args.tokens // L)
    if scenario == "ragged":
        enc_lens = torch.randint(L // 8, L + 1, (n,), generator=g)
        dec_lens = torch.randint(max(1, T // 8), T + 1, (n,), generator=g)
    else:
        enc_lens, dec_lens = torch.full((n,), L), torch.full((n,), T)
    ids = torch.randint(2, vocab, (n, L), generator=g)
    labels = torch.randint(2, vocab, (n, T), generator=g)
    mask = torch.arange(L)[None] < enc_lens[:, None]
    dmask = torch.arange(T)[None] < dec_lens[:, None]
    ids[~mask] = 0
    labels[~dmask] = -100
    padded = dict(input_ids=ids, attention_mask=mask.long(), labels=labels, decoder_attention_mask=dmask.long())
    cu = lambda lens: torch.nn.functional.pad(lens.cumsum(0), (1, 0)).to(torch.int32)
    packed = dict(
        input_ids=ids[mask][None], cu_seqlens=cu(enc_lens), max_seqlen=int(enc_lens.max()),
        labels=labels[dmask][None], decoder_cu_seqlens=cu(dec_lens), decoder_max_seqlen=int(dec_lens.max()),
    )  # fmt: skip
    real = int(enc_lens.sum() + dec_lens.sum())
    return padded, packed, real, n, L, T


def _train_step(model: torch.nn.Module, inputs: dict) -> None:
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(**inputs).loss
    loss.backward()
    for p in model.parameters():
        p.grad = None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="t5-v1_1-base")
    parser.add_argument("--tokens", type=int, default=32768, help="encoder tokens per batch (padded size)")
    parser.add_argument("--input-len", type=int, default=512)
    parser.add_argument("--target-len", type=int, default=114)
    parser.add_argument("--long-len", type=int, default=4096)
    parser.add_argument("--long-target", type=int, default=512)
    parser.add_argument("--scenarios", default="full,ragged,long")
    parser.add_argument(
        "--out", default=None, help="results markdown file (default benchmarks/results/<date>-<gpu>.md)"
    )
    args = parser.parse_args()

    import transformers

    from flasht5 import FlashT5Config, FlashT5ForConditionalGeneration
    from flasht5.convert import config_to_hf

    device = "cuda"
    cfg = FlashT5Config.from_preset(args.preset, dropout_rate=0.0)
    hf_kwargs = {k: v for k, v in config_to_hf(cfg, "T5ForConditionalGeneration").items() if k != "model_type"}
    rows = []
    g = torch.Generator().manual_seed(0)
    for scenario in args.scenarios.split(","):
        padded, packed, real, n, L, T = _batches(scenario, args, cfg.vocab_size, g)
        variants = [
            ("transformers T5 eager", "hf", "eager", padded),
            ("transformers T5 sdpa", "hf", "sdpa", padded),
            ("flasht5 sdpa", "ours", "sdpa", padded),
            ("flasht5 flash (padded batch)", "ours", "flash", padded),
            ("flasht5 flash (packed varlen)", "ours", "flash", packed),
        ]
        results = {}
        for name, kind, impl, batch in variants:
            torch.manual_seed(0)
            if kind == "hf":
                # The implementation goes into the config before the stacks deep-copy it.
                hf_cfg = transformers.T5Config(**hf_kwargs, attn_implementation=impl)
                model = transformers.T5ForConditionalGeneration(hf_cfg).to(device)
            else:
                cfg._attn_implementation = impl
                model = FlashT5ForConditionalGeneration(cfg).to(device)
            model.train()
            inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

            step = functools.partial(_train_step, model, inputs)
            try:
                step()  # compile / autotune outside the timing
                ms = bench(step, warmup=100, rep=1000)
                mem = peak_memory(step) / 2**30
                results[name] = (ms, mem)
            except torch.OutOfMemoryError:
                results[name] = (float("nan"), float("nan"))
            del model, inputs
            gc.collect()
            torch.cuda.empty_cache()
        best_hf = min(results[v][0] for v in ("transformers T5 eager", "transformers T5 sdpa"))
        for name, (ms, mem) in results.items():
            rows.append({
                "scenario": f"{scenario} ({n}x{L}/{T})", "variant": name, "ms/step": ms,
                "real tok/s (k)": real / ms, "speedup vs best transformers": best_hf / ms, "peak GiB": mem,
            })  # fmt: skip
            print(rows[-1], flush=True)
    with torch.device("meta"):  # shapes only: no second full model initialised on the host
        n_params = sum(p.numel() for p in FlashT5ForConditionalGeneration(cfg).parameters()) / 1e6
    body = (
        f"Model: `{args.preset}` shapes ({n_params:.0f}M parameters), bf16 autocast, forward + backward, dropout 0; "
        "throughput counts non-padding tokens.\n\n" + markdown_table(rows)
    )
    print(write_results("Whole-model training step vs transformers T5", body, args.out))


if __name__ == "__main__":
    main()

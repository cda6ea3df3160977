"""Fine-tuning parity: `flasht5 finetune` against transformers' `Seq2SeqTrainer`, same weights, same batches.

What it does, in one process:

1. builds a random T5 v1.1-shaped model (``--preset``: base, small or tiny) with dropout 0 and writes it as a stock
   transformers T5 folder (``flasht5.convert.to_hf``; stock ``T5ForConditionalGeneration.from_pretrained`` reads it);
2. takes the shipped demo task (``configs/finetune/demo.yaml``: restore the masked words of King James Bible
   passages, ``configs/finetune/demo_data/``) and its tokenizer building (a SentencePiece model trained on the
   training examples, as ``flasht5 finetune`` does);
3. fine-tunes with ``flasht5.train.finetune.finetune`` from that folder: ``optim.name=adamw`` (torch.optim.AdamW's
   update), linear decay to 0 after a linear warm-up, gradient clipping, padding-free packed batches (``--mode``)
   and ``train.record_steps=true``, which writes ``steps.jsonl``: per step its loss, lr and the examples it trained
   on;
4. fine-tunes the same folder with transformers' ``Seq2SeqTrainer`` (bf16 autocast on CUDA, fp32 on the CPU, its
   default AdamW, the same lr, betas, eps, weight decay 0, grad clip, warm-up and linear decay) on exactly those
   examples in that order: a batch sampler yields the recorded groups, a collator pads them (the per-token mean loss
   of a padded batch is the same quantity as that of the packed one; padding is not counted as tokens);
5. writes ``parity.json``, ``parity.md`` and ``parity.png`` (both curves, their difference) under ``--out``: per-step
   max / mean |loss difference|, final-50-step mean losses, wall time and tokens/s of each side over steps
   ``--skip``..N (start-up and compilation excluded), the speed ratio, GPU peak memory, and the differences between
   what the two sides compute (``notes``).

On the CPU with ``--preset tiny`` it is a smoke test (fp32 on both sides: the curves agree to rounding;
``tests/test_finetune_parity.py`` runs it). On an H200, from the repo root::

    PYTHONPATH=src python benchmarks/finetune_parity.py --preset base --steps 300 --out $OUT/parity
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import shutil
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "finetune" / "demo.yaml"

# T5 v1.1 shapes (flasht5.config.PRESETS names) and a tiny one for the CPU
PRESETS = {
    "base": ("t5-v1_1-base", {}),
    "small": ("t5-v1_1-small", {}),
    "tiny": ("t5-v1_1-small", dict(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4)),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="base", help="model shape (default: base)")
    p.add_argument(
        "--vocab-size",
        type=int,
        default=None,
        help="model vocabulary (default: 32128 for base/small, the tokenizer's rounded up to 128 for tiny)",
    )
    p.add_argument("--steps", type=int, default=300, help="optimizer steps of each side (default: 300)")
    p.add_argument(
        "--skip",
        type=int,
        default=20,
        help="steps excluded from the timing (start-up, compilation, CUDA-graph capture); a multiple of 10",
    )
    p.add_argument("--lr", type=float, default=5e-4, help="peak learning rate, both sides (default: 5e-4)")
    p.add_argument("--warmup", type=int, default=30, help="linear warm-up steps (default: 30)")
    p.add_argument("--grad-clip", type=float, default=1.0, help="max global gradient norm (default: 1.0)")
    p.add_argument(
        "--max-tokens",
        type=int,
        default=2048,
        help="encoder-token budget of one flasht5 batch (~36 tokens per demo example; default: 2048)",
    )
    p.add_argument("--max-input-len", type=int, default=64, help="encoder tokens per example (default: 64)")
    p.add_argument("--max-target-len", type=int, default=12, help="decoder tokens per example (default: 12)")
    p.add_argument("--mode", choices=["varlen", "padded"], default="varlen", help="flasht5's batch layout")
    p.add_argument("--train-examples", type=int, default=None, help="use the first N demo training examples")
    p.add_argument(
        "--tokenizer-pieces", type=int, default=2000, help="SentencePiece pieces (default: 2000, the demo's)"
    )
    p.add_argument("--hf-attn", default="sdpa", help="transformers' attn_implementation (default: sdpa)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument(
        "--precision",
        choices=["auto", "bf16", "fp32"],
        default="auto",
        help="both sides: bf16 autocast (fp32 weights) or fp32; auto = bf16 on CUDA, fp32 on the CPU",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/finetune-parity", help="output folder (default: runs/finetune-parity)")
    args = p.parse_args(argv)
    if args.skip % 10 or not 0 <= args.skip < args.steps:
        p.error(f"--skip must be a multiple of 10 (flasht5 logs every 10 steps) below --steps, got {args.skip}")
    return args


# ----------------------------------------------------------------------------------------------------------------
# Set-up: data, tokenizer, the initial weights
# ----------------------------------------------------------------------------------------------------------------


def flasht5_config(args: argparse.Namespace, out: Path, init: Path | None, train_file: Path, device: str):
    """The fine-tuning config of the flasht5 side: the demo task, AdamW, linear schedule, no evaluation."""
    from flasht5.train.config import FinetuneConfig, load_config

    overrides = [
        f"--data.train=[{train_file}]", "--data.eval=[]", f"--data.tokenizer={out / 'tokenizer'}",
        f"--data.vocab_size={args.tokenizer_pieces}", f"--data.max_input_len={args.max_input_len}",
        f"--data.max_target_len={args.max_target_len}", f"--data.max_tokens={args.max_tokens}",
        f"--data.mode={args.mode}", "--optim.name=adamw", f"--optim.lr={args.lr}", "--optim.weight_decay=0",
        "--optim.betas=[0.9, 0.999]", "--optim.eps=1e-8", f"--optim.warmup_steps={args.warmup}",
        "--optim.schedule=linear", "--optim.final_lr_ratio=0", f"--optim.grad_clip={args.grad_clip}",
        "--optim.precision=fp32", f"--train.out_dir={out / 'flasht5'}", f"--train.steps={args.steps}",
        f"--train.device={device}", f"--train.precision={args.precision}", f"--train.seed={args.seed}",
        "--train.log_every=10",
        "--train.save_every=0", "--train.keep_checkpoints=1", "--train.resume=false", "--train.samples=0",
        "--train.progress=false", "--train.record_steps=true", "--log.tensorboard=false",
        "--eval.metrics=[exact_match]", "--eval.keep_best=false", "--eval.predictions=false",
    ]  # fmt: skip
    if init is not None:
        overrides.append(f"--model.init_from={init}")
    return load_config(DEMO, overrides, schema=FinetuneConfig, check_paths_too=init is not None)


def prepare(args: argparse.Namespace, out: Path, device: str) -> tuple[Any, Path, Path]:
    """(the tokenized training examples, the initial-weights folder, the training file)."""
    import gzip

    from flasht5.config import FlashT5Config
    from flasht5.convert import to_hf
    from flasht5.modeling import FlashT5ForConditionalGeneration
    from flasht5.train.finetune import load_task_tokenizer, read_examples, tokenize_examples

    demo_train = ROOT / "configs" / "finetune" / "demo_data" / "train.jsonl.gz"
    train_file = demo_train
    if args.train_examples is not None:  # a prefix of the demo data (CPU smoke runs)
        with gzip.open(demo_train, "rt", encoding="utf-8") as f:
            lines = [line for _, line in zip(range(args.train_examples), f)]
        train_file = out / "train.jsonl"
        train_file.write_text("".join(lines))
    cfg = flasht5_config(args, out, None, train_file, device)
    d = cfg.data
    pairs = read_examples(d.train, d.input_key, d.target_key)
    tokenizer = load_task_tokenizer(cfg, [d.prefix + x for x, _ in pairs] + [y for _, y in pairs])
    examples, _ = tokenize_examples(tokenizer, pairs, cfg)  # exactly what FinetuneTask.prepare makes

    name, shape = PRESETS[args.preset]
    vocab = args.vocab_size or (-(-len(tokenizer) // 128) * 128 if args.preset == "tiny" else 32128)
    if vocab < len(tokenizer):
        raise SystemExit(f"--vocab-size {vocab} < the tokenizer's {len(tokenizer)} ids")
    init = out / "init"
    torch.manual_seed(args.seed)
    config = FlashT5Config.from_preset(name, **shape, vocab_size=vocab, dropout_rate=0.0)
    with torch.device(device):  # initialised where it trains (fast on a GPU), written from the CPU
        model = FlashT5ForConditionalGeneration(config)
    to_hf(model, init)  # a stock transformers T5 folder
    del model
    tokenizer.save_pretrained(init)
    return examples, init, train_file


# ----------------------------------------------------------------------------------------------------------------
# The two sides
# ----------------------------------------------------------------------------------------------------------------


def _reset_gpu() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def run_flasht5(args: argparse.Namespace, out: Path, init: Path, train_file: Path, device: str) -> dict[str, Any]:
    from flasht5.train.finetune import finetune

    cfg = flasht5_config(args, out, init, train_file, device)
    _reset_gpu()
    base = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0
    t0 = time.perf_counter()
    finetune(cfg)
    wall = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() - base if torch.cuda.is_available() else None
    run = Path(cfg.train.out_dir)
    steps = [json.loads(line) for line in (run / "steps.jsonl").read_text().splitlines()]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "tokens_per_s" in r]
    # The loop's own clock: each metrics row's window (the steps since the previous row) took its tokens divided by
    # its tokens/s, measured between two log rows, each of which waits for the GPU. Summed over the windows after
    # --skip: the time of steps skip+1..N.
    tokens = {r["step"]: r["input_tokens"] + r["target_tokens"] for r in steps}
    timed, prev = 0.0, 0
    for r in rows:
        if r["step"] > args.skip:
            timed += sum(tokens[s] for s in range(prev + 1, r["step"] + 1)) / r["tokens_per_s"]
        prev = r["step"]
    return {
        "losses": [r["loss"] for r in steps],
        "lrs": [r["lr"] for r in steps],
        "groups": [[doc for _, doc, _ in r["examples"]] for r in steps],
        "tokens": [tokens[r["step"]] for r in steps],
        "timed_s": timed,
        "wall_s": wall,
        "peak_mem_gb": peak / 2**30 if peak is not None else None,
        "graphed": rows[-1].get("graphed") if rows else None,
        "backend": cfg.model.attn_implementation or ("flash" if device == "cuda" else "sdpa"),  # the loop's default
    }


def run_hf(args: argparse.Namespace, out: Path, init: Path, examples: Any, groups: list[list[int]],
           device: str) -> dict[str, Any]:  # fmt: skip
    """transformers' Seq2SeqTrainer on the recorded batches, as a user runs it: its default AdamW and its own step;
    only the data order (a batch sampler of the recorded groups) and the learning-rate multiplier (flasht5's, which
    differs from get_linear_schedule_with_warmup during the warm-up only, see notes) are given to it."""
    import numpy as np
    import transformers
    from torch.utils.data import DataLoader

    from flasht5.train.optim import lr_at

    cuda = device == "cuda"
    pad = 0  # T5's pad id (the demo tokenizer's too; checked in main)
    n, skip = args.steps, args.skip

    def item(i: int) -> dict[str, np.ndarray]:
        return {"input_ids": examples.input(i).astype(np.int64), "labels": examples.target(i).astype(np.int64)}

    def collate(batch: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
        li, ld = max(len(b["input_ids"]) for b in batch), max(len(b["labels"]) for b in batch)
        ids = torch.full((len(batch), li), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), li), dtype=torch.long)
        labels = torch.full((len(batch), ld), -100, dtype=torch.long)
        for r, b in enumerate(batch):
            ids[r, : len(b["input_ids"])] = torch.from_numpy(b["input_ids"])
            mask[r, : len(b["input_ids"])] = 1
            labels[r, : len(b["labels"])] = torch.from_numpy(b["labels"])
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    class Plan(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(examples)

        def __getitem__(self, i: int) -> dict[str, np.ndarray]:
            return item(i)

    class Clock(transformers.TrainerCallback):
        def __init__(self) -> None:
            self.t = {}

        def _tick(self, step: int) -> None:
            if cuda:
                torch.cuda.synchronize()
            self.t[step] = time.perf_counter()

        def on_train_begin(self, targs, state, control, **kw):
            self._tick(0)

        def on_step_end(self, targs, state, control, **kw):
            if state.global_step in (skip, n):
                self._tick(state.global_step)

    class Trainer(transformers.Seq2SeqTrainer):
        losses: list[torch.Tensor]  # set below: each step's loss, on the device

        def get_train_dataloader(self) -> DataLoader:
            return DataLoader(self.train_dataset, batch_sampler=groups, collate_fn=collate, pin_memory=cuda)

        def create_scheduler(self, num_training_steps: int, optimizer=None):
            if self.lr_scheduler is None:
                mult = lambda s: lr_at(s, total=n, warmup=args.warmup, schedule="linear", final_ratio=0.0)  # noqa: E731
                self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer or self.optimizer, mult)
            return self.lr_scheduler

        def training_step(self, model, inputs, num_items_in_batch=None):
            loss = super().training_step(model, inputs, num_items_in_batch)
            self.losses.append(loss.detach())  # no sync: read once at the end
            return loss

    targs = transformers.Seq2SeqTrainingArguments(
        output_dir=str(out / "hf"), max_steps=n, learning_rate=args.lr, weight_decay=0.0, adam_beta1=0.9,
        adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=args.grad_clip, warmup_steps=args.warmup,
        lr_scheduler_type="linear", logging_steps=10, save_strategy="no", eval_strategy="no", report_to=[],
        bf16=args.precision == "bf16", use_cpu=not cuda, seed=args.seed, disable_tqdm=True, remove_unused_columns=False,
        dataloader_num_workers=0,
    )  # fmt: skip
    _reset_gpu()
    base = torch.cuda.memory_allocated() if cuda else 0
    t0 = time.perf_counter()
    model = transformers.T5ForConditionalGeneration.from_pretrained(init, attn_implementation=args.hf_attn)
    clock = Clock()
    trainer = Trainer(model=model, args=targs, train_dataset=Plan(), callbacks=[clock])
    trainer.losses = []
    trainer.train()
    wall = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() - base if cuda else None
    lrs = [lr_at(s, total=n, warmup=args.warmup, schedule="linear", final_ratio=0.0) * args.lr for s in range(n)]
    enc, dec = examples.lengths()
    padded = sum(len(g) * (int(enc[g].max()) + int(dec[g].max())) for g in groups)
    info = {
        "losses": torch.stack(trainer.losses).float().tolist(),
        "padding_frac": 1 - sum(int(enc[g].sum() + dec[g].sum()) for g in groups) / padded,
        "lrs": lrs,
        "timed_s": clock.t[n] - clock.t[skip],
        "wall_s": wall,
        "peak_mem_gb": peak / 2**30 if peak is not None else None,
        "optimizer": type(
            trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
        ).__name__,  # fmt: skip
        "optim": str(targs.optim),
        "attn_implementation": model.config._attn_implementation,
    }
    del trainer, model
    _reset_gpu()
    return info


# ----------------------------------------------------------------------------------------------------------------
# Comparison and report
# ----------------------------------------------------------------------------------------------------------------


def compare(ft: dict[str, Any], hf: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    a, b = torch.tensor(ft["losses"], dtype=torch.float64), torch.tensor(hf["losses"], dtype=torch.float64)
    diff = (a - b).abs()
    k = min(50, len(a))

    def noise(x: torch.Tensor) -> float:
        # batch-to-batch fluctuation of one curve: median |loss - median of its 11-step neighbourhood|
        if len(x) < 11:
            return math.nan
        windows = x.unfold(0, 11, 1).median(dim=1).values
        return float((x[5:-5] - windows).abs().median())

    timed_tokens = sum(ft["tokens"][args.skip :])
    res = {
        "steps": len(a),
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "first_step_diff": float(diff[0]),
        "mean_abs_diff_last50": float(diff[-k:].mean()),
        "final50_mean_loss": {"flasht5": float(a[-k:].mean()), "hf": float(b[-k:].mean())},
        "final50_rel_diff": float((a[-k:].mean() - b[-k:].mean()).abs() / b[-k:].mean()),
        "curve_noise": {"flasht5": noise(a), "hf": noise(b)},
        "lr_max_abs_diff": max(abs(x - y) for x, y in zip(ft["lrs"], hf["lrs"])),
        "timed_steps": f"{args.skip + 1}..{len(a)}",
        "timed_tokens": timed_tokens,
    }
    for side, r in (("flasht5", ft), ("hf", hf)):
        res[f"{side}_tokens_per_s"] = timed_tokens / r["timed_s"] if r["timed_s"] > 0 else math.nan
        res[f"{side}_ms_per_step"] = 1e3 * r["timed_s"] / max(len(a) - args.skip, 1)
    res["speedup"] = res["flasht5_tokens_per_s"] / res["hf_tokens_per_s"]
    # Agreement: the final losses within 1 % and the mean per-step difference within the curves' own batch-to-batch
    # fluctuation (on the CPU in fp32 both are ~1e-6: the same arithmetic up to rounding).
    ref_noise = max(v for v in res["curve_noise"].values() if not math.isnan(v)) if len(a) >= 11 else math.inf
    res["agree"] = bool(res["final50_rel_diff"] < 0.01 and res["mean_abs_diff"] <= max(ref_noise, 1e-4))
    return res


def notes(device: str, args: argparse.Namespace, ft: dict[str, Any], hf: dict[str, Any]) -> list[str]:
    """What the two sides do differently (so the comparison is read for what it is)."""
    bf16 = args.precision == "bf16"
    out = [
        "Same initial weights (one stock transformers T5 folder), same tokenized examples (flasht5's tokenization, "
        "given to both), same examples per step in the same order (flasht5's train.record_steps), dropout 0.",
        f"flasht5: AdamWScale(scale_by_rms=False) = torch.optim.AdamW's update (optim.name=adamw); transformers: "
        f"its default optimizer ({hf.get('optim')}, {hf.get('optimizer')}). Both: lr {args.lr:g}, betas (0.9, 0.999), "
        f"eps 1e-8, weight decay 0, global grad-norm clip {args.grad_clip:g}, fp32 master weights"
        + (", bf16 autocast." if bf16 else ", fp32 arithmetic."),
        "Learning rate: both use flasht5's multiplier (warm-up (s+1)/W, then linear decay to 0 at the last step); "
        "transformers' own get_linear_schedule_with_warmup is the same after the warm-up but starts it at s/W (its "
        "first step has lr 0), so the transformers side is given flasht5's LambdaLR to keep the updates comparable.",
        f"Batches: flasht5 packs the examples padding-free ({args.mode}); transformers gets the same examples as "
        "padded rows (DataCollatorForSeq2Seq-style: pad ids + attention mask, labels -100). The loss is the mean "
        "over the batch's target tokens on both sides; tokens/s counts real (non-padding) encoder + decoder tokens "
        f"for both. {hf['padding_frac']:.0%} of the positions transformers computes are padding: the speed ratio "
        "includes what packing saves.",
        f"flasht5 runs its step as `flasht5 finetune` does ({'CUDA-graph replay' if ft.get('graphed') else 'eager'}, "
        f"backend {ft.get('backend')}); transformers runs its own eager step with attn_implementation="
        f"{hf.get('attn_implementation')}.",
        f"Timing: steps {args.skip + 1}..{args.steps} of each side (start-up, Triton compilation and CUDA-graph "
        "capture excluded). flasht5: the loop's log windows (each ends in a GPU sync); transformers: a callback that "
        "synchronises at step --skip and at the last step. Both sides sync to log every 10 steps; flasht5 also "
        "writes a checkpoint and final/ at the end (outside the timed steps, inside its wall time).",
    ]
    if not bf16:
        out.append("fp32 on both sides: the curves must agree to rounding (the CPU parity test runs this).")
    return out


def plot(ft: dict[str, Any], hf: dict[str, Any], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = list(range(1, len(ft["losses"]) + 1))
    fig, (ax, dx) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1.4]})
    ax.plot(steps, hf["losses"], lw=1.2, label="transformers Seq2SeqTrainer")
    ax.plot(steps, ft["losses"], lw=1.0, ls="--", label="flasht5 finetune")
    ax.set_ylabel("training loss (nats/token)")
    ax.set_title("\n".join(textwrap.fill(line, 110) for line in title.splitlines()), fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend()
    dx.plot(steps, [x - y for x, y in zip(ft["losses"], hf["losses"])], lw=0.8, color="C2")
    dx.axhline(0, color="k", lw=0.5)
    dx.set_ylabel("flasht5 - HF")
    dx.set_xlabel("step")
    dx.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(
    res: dict[str, Any], ft: dict[str, Any], hf: dict[str, Any], meta: dict[str, Any], notes_: list[str]
) -> str:
    def f(x: Any, spec: str = ".4g") -> str:
        return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)

    lines = [
        f"# Fine-tuning parity: flasht5 finetune vs transformers Seq2SeqTrainer ({meta['device_name']})",
        "",
        f"Command: `{meta['command']}`",
        "",
        f"Versions: {meta['versions']}",
        "",
        f"Model: {meta['model']}; data: {meta['data']}",
        "",
        "| side | timed steps | ms/step | tokens/s | peak GPU memory (GiB) | wall incl. start-up (s) "
        "| final-50 mean loss |",
        "|---|---|---|---|---|---|---|",
    ]
    for side, r in (("flasht5", ft), ("transformers", hf)):
        key = "flasht5" if side == "flasht5" else "hf"
        lines.append(
            f"| {side} | {res['timed_steps']} | {f(res[f'{key}_ms_per_step'], '.1f')} | "
            f"{f(res[f'{key}_tokens_per_s'], ',.0f')} | {f(r['peak_mem_gb'], '.2f')} | {f(r['wall_s'], '.1f')} | "
            f"{f(res['final50_mean_loss'][key])} |"
        )
    lines += [
        "",
        f"**Speed-up (tokens/s, flasht5 / transformers): {res['speedup']:.2f}x**",
        "",
        "| parity | value |",
        "|---|---|",
        f"| steps | {res['steps']} |",
        f"| max abs loss difference (per step) | {f(res['max_abs_diff'])} |",
        f"| mean abs loss difference (per step) | {f(res['mean_abs_diff'])} |",
        f"| mean abs loss difference, last 50 steps | {f(res['mean_abs_diff_last50'])} |",
        f"| first-step loss difference | {f(res['first_step_diff'])} |",
        f"| final-50 mean loss, relative difference | {f(res['final50_rel_diff'])} |",
        f"| batch-to-batch noise of the curves (flasht5 / HF) | {f(res['curve_noise']['flasht5'])} / "
        f"{f(res['curve_noise']['hf'])} |",
        f"| max lr difference | {f(res['lr_max_abs_diff'])} |",
        f"| agree (final-50 within 1 %, mean abs diff within the curves' noise) | {res['agree']} |",
        "",
        "What differs between the two sides:",
        "",
        *[f"- {n}" for n in notes_],
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    import importlib.util

    if importlib.util.find_spec("accelerate") is None:  # before any GPU time is spent
        raise SystemExit(
            "transformers' Trainer needs the accelerate package (pure Python; it also needs psutil): pip install "
            "accelerate, or offline: pip install --no-index --no-deps --target .wheels/site "
            ".wheels/accelerate-*.whl .wheels/psutil-*.whl and PYTHONPATH=src:.wheels/site"
        )
    if args.device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    else:
        device = torch.device(args.device).type
    if args.precision == "auto":
        args.precision = "bf16" if device == "cuda" else "fp32"
    out = Path(args.out)
    for old in ("init", "tokenizer", "flasht5", "hf"):  # this benchmark's own folders of an earlier run
        shutil.rmtree(out / old, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    examples, init, train_file = prepare(args, out, device)
    from flasht5.data.tokenizer import load_tokenizer

    if load_tokenizer(out / "tokenizer").pad_token_id != 0:
        raise SystemExit("the demo tokenizer's pad id is not 0 (T5's)")
    print(f"[parity] set-up {time.perf_counter() - t_start:.1f} s; flasht5 finetune, {args.steps} steps", flush=True)
    ft = run_flasht5(args, out, init, train_file, device)
    (out / "flasht5_side.json").write_text(json.dumps(ft))  # kept if the transformers side fails
    print(f"[parity] flasht5 done ({ft['wall_s']:.1f} s); transformers Seq2SeqTrainer on the same batches", flush=True)
    hf = run_hf(args, out, init, examples, ft["groups"], device)
    res = compare(ft, hf, args)

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from utils import versions

    cfg = json.loads((init / "config.json").read_text())
    from safetensors import safe_open

    with safe_open(str(init / "model.safetensors"), "pt") as f:
        n_params = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118 - no keys() iterator
    meta = {
        "command": " ".join(["python", *sys.argv]) if argv is None else "main(" + repr(argv) + ")",
        "versions": versions(),
        "device_name": torch.cuda.get_device_name() if device == "cuda" else "CPU",
        "model": f"random T5 v1.1 {args.preset} shape (d_model {cfg['d_model']}, d_ff {cfg['d_ff']}, "
        f"{cfg['num_layers']}+{cfg['num_decoder_layers']} layers, {cfg['num_heads']} heads, vocab "
        f"{cfg['vocab_size']}, {n_params / 1e6:.3g}M parameters), dropout 0",
        "data": f"the demo task (restore masked words), {len(examples)} training examples, "
        f"{sum(len(g) for g in ft['groups']) / len(ft['groups']):.1f} examples and "
        f"{sum(ft['tokens']) / len(ft['tokens']):.0f} real tokens per step ({args.mode} budget {args.max_tokens} "
        f"encoder tokens), lr {args.lr:g}, warm-up {args.warmup}, linear decay to 0",
        "total_wall_s": time.perf_counter() - t_start,
    }
    notes_ = notes(device, args, ft, hf)
    report = {"args": vars(args), "meta": meta, "result": res, "notes": notes_,
              "flasht5": {k: v for k, v in ft.items() if k != "groups"}, "hf": hf}  # fmt: skip
    (out / "parity.json").write_text(json.dumps(report, indent=2))
    (out / "parity.md").write_text(markdown(res, ft, hf, meta, notes_))
    plot(ft, hf, out / "parity.png", f"{meta['model']}\n{meta['device_name']}, speed-up {res['speedup']:.2f}x")
    print((out / "parity.md").read_text())
    print(f"[parity] wrote {out / 'parity.json'}, parity.md, parity.png in {meta['total_wall_s']:.0f} s", flush=True)
    return report


if __name__ == "__main__":
    main()

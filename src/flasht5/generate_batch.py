"""``flasht5 generate``: texts from the command line, stdin or a file (text lines or JSONL) to text or JSONL out.

Batch mode (``--input FILE``): every input is tokenized once, the requests are sorted by length (longest first, so
an out-of-memory shows at the first batch, and rows of one batch have nearly the same length: little padding, and
none at all in the flash backend's encoder), generated ``--batch-size`` at a time with a progress bar on stderr,
and written back in input order: one JSON object per input, ``{"input": ..., "output": ...}`` for text lines, the
input record plus ``"output"`` for JSONL (a list of strings with ``--num-return-sequences`` > 1). The generation
options are transformers' ``generate`` arguments under their own names; ``model.generate`` picks flasht5's fast
decoding loop for them (:mod:`flasht5.generation`).

This module adds the subcommand's arguments (:func:`add_arguments`) and runs it (:func:`run`); ``flasht5.cli``
owns the checkpoint-folder and device checks. Nothing heavy is imported at module level.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from flasht5.data.text import json_object

JSONL_SUFFIXES = (".jsonl", ".ndjson")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="checkpoint folder (flasht5 or transformers T5)")
    p.add_argument("text", nargs="*", help="input texts (default: --input FILE, or one per line on stdin)")
    p.add_argument("--tokenizer", help="tokenizer folder (default: the model folder)")
    io = p.add_argument_group("batch mode")
    io.add_argument("--input", metavar="FILE", help="inputs: text lines, or JSONL (.jsonl / .ndjson or --input-field)")
    io.add_argument("--input-field", metavar="NAME", help="the JSONL field holding the input text (default: text)")
    io.add_argument("--output", metavar="FILE.jsonl", help="write one JSON object per input here (input order)")
    io.add_argument("--batch-size", type=int, default=32, help="requests per generate call (default 32)")
    io.add_argument("--max-input-tokens", type=int, help="truncate longer inputs to this many tokens")
    io.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    io.add_argument("--tensorboard", metavar="DIR", help="TensorBoard scalars per batch (requests, tokens/s) in DIR")
    g = p.add_argument_group("generation (transformers' generate arguments)")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--min-new-tokens", type=int, default=0)
    g.add_argument("--do-sample", "--sample", dest="sample", action="store_true", help="sample (default: greedy/beam)")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=50, help="sampling: keep the k likeliest tokens (0: all)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--num-beams", type=int, default=1)
    g.add_argument("--num-return-sequences", type=int, default=1)
    g.add_argument("--seed", type=int, help="seed torch's generator first (sampling reproducible)")
    o = p.add_argument_group("output")
    o.add_argument("--keep-special", action="store_true", help="keep sentinels and special tokens in the output")
    o.add_argument("--json", action="store_true", help="one JSON object per line on stdout")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda if present)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: bfloat16 on CUDA, float32")


def check_options(args: argparse.Namespace) -> None:
    """Every flag's value, before anything is loaded: a ``ValueError`` naming the flag."""
    for name, value, ok, valid in (
        ("--max-new-tokens", args.max_new_tokens, args.max_new_tokens >= 1, ">= 1"),
        ("--min-new-tokens", args.min_new_tokens, 0 <= args.min_new_tokens <= args.max_new_tokens,
         f">= 0 and <= --max-new-tokens ({args.max_new_tokens})"),
        ("--num-beams", args.num_beams, args.num_beams >= 1, ">= 1 (1: greedy)"),
        ("--num-return-sequences", args.num_return_sequences, args.num_return_sequences >= 1, ">= 1"),
        ("--temperature", args.temperature, args.temperature > 0, "> 0"),
        ("--top-p", args.top_p, 0 < args.top_p <= 1, "in (0, 1]"),
        ("--top-k", args.top_k, args.top_k >= 0, ">= 0 (0: no top-k filter)"),
        ("--batch-size", args.batch_size, args.batch_size >= 1, ">= 1"),
        ("--max-input-tokens", args.max_input_tokens, args.max_input_tokens is None or args.max_input_tokens >= 1,
         ">= 1"),
    ):  # fmt: skip
        if not ok:
            raise ValueError(f"{name} must be {valid}, got {value}")
    if not args.sample and args.num_return_sequences > args.num_beams:
        raise ValueError(
            f"--num-return-sequences {args.num_return_sequences} needs --num-beams >= {args.num_return_sequences} "
            "(beam search returns its best beams) or --do-sample"
        )
    if args.input is not None and args.text:
        raise ValueError("give input TEXT arguments or --input FILE, not both")
    if args.input_field is not None and args.input is None:
        raise ValueError("--input-field needs --input FILE (a JSONL file)")
    if args.input is not None and args.input != "-" and not Path(args.input).is_file():
        what = "is a folder" if Path(args.input).is_dir() else "does not exist"
        raise ValueError(f"--input {args.input!r} {what}; give a text or JSONL file")
    if args.output is not None and Path(args.output).is_dir():
        raise ValueError(f"--output {args.output!r} is a folder; give a file name (e.g. out.jsonl)")


def generation_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    kw: dict[str, Any] = dict(max_new_tokens=args.max_new_tokens, min_new_tokens=args.min_new_tokens,
                              num_beams=args.num_beams, num_return_sequences=args.num_return_sequences,
                              do_sample=args.sample)  # fmt: skip
    if args.sample:
        kw.update(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    return kw


def read_inputs(path: str, field: str | None) -> tuple[list[str], list[dict] | None]:
    """(the input texts, the JSONL records or None for text lines). Text: every non-blank line is one input.
    JSONL (a .jsonl / .ndjson name, or ``field`` given): one object per non-blank line, ``field`` (default
    ``text``) a string. Errors name the file, the line and what was expected."""
    text = sys.stdin.read() if path == "-" else _read_text(path)
    jsonl = field is not None or path.lower().endswith(JSONL_SUFFIXES)
    field = field or "text"
    texts: list[str] = []
    records: list[dict] | None = [] if jsonl else None
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if not jsonl:
            texts.append(line)
            continue
        rec = json_object(line, f"--input {path}: line {n}")
        if field not in rec:
            keys = ", ".join(sorted(rec)[:8]) or "none"
            raise ValueError(f"--input {path}: line {n} has no field {field!r} (its fields: {keys}); set --input-field")
        if not isinstance(rec[field], str):
            raise ValueError(
                f"--input {path}: line {n}: field {field!r} is a {type(rec[field]).__name__}, not a string"
            )
        texts.append(rec[field])
        records.append(rec)
    if not texts:
        raise ValueError(f"--input {path} holds no inputs (only blank lines)")
    return texts, records


def _read_text(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"--input {path} is not UTF-8 text (byte {e.start}); give text lines or JSONL") from None


def length_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices of the requests in batches of ``batch_size``, longest first (ties keep input order)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def generate_texts(
    model: Any, tokenizer: Any, texts: list[str], gen_kwargs: dict[str, Any], *, batch_size: int,
    max_input_tokens: int | None = None, skip_special: bool = True, progress: bool = False, scalars: Any = None,
) -> list[list[str]]:  # fmt: skip
    """Every text's ``num_return_sequences`` outputs, in input order; requests batched by length. ``scalars``
    (:class:`flasht5.events.Scalars`) receives, after every batch (step = batches done), the requests done, the
    batch's new tokens per second (decoder start and padding after a row's end excluded) and the requests per
    second so far."""
    import time

    import torch

    enc = tokenizer(texts, truncation=max_input_tokens is not None, max_length=max_input_tokens)["input_ids"]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    n_ret = gen_kwargs.get("num_return_sequences", 1)
    results: list[list[str]] = [[] for _ in texts]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(texts), unit="req", file=sys.stderr, desc="generate", dynamic_ncols=True)
    done, t0 = 0, time.perf_counter()
    try:
        for step, batch in enumerate(length_batches([len(ids) for ids in enc], batch_size), 1):
            t_batch = time.perf_counter()
            width = max(1, max(len(enc[i]) for i in batch))
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):
                ids[row, : len(enc[i])] = torch.tensor(enc[i], dtype=torch.long)
                mask[row, : len(enc[i])] = 1
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **gen_kwargs)
            decoded = tokenizer.batch_decode(out, skip_special_tokens=skip_special)
            for row, i in enumerate(batch):
                results[i] = decoded[row * n_ret : (row + 1) * n_ret]
            done += len(batch)
            if scalars is not None:
                now = time.perf_counter()
                new_tokens = int((out[:, 1:] != pad).sum())  # a host sync, after the batch anyway
                scalars.add(step, {"generate/requests": done, "generate/requests_per_s": done / (now - t0),
                                   "generate/new_tokens_per_s": new_tokens / max(now - t_batch, 1e-9)})  # fmt: skip
            if bar is not None:
                bar.update(len(batch))
    finally:
        if bar is not None:
            bar.close()
    return results


def _write_jsonl(path: str, rows: list[dict]) -> None:
    """All rows, written aside and moved into place (no half-written output file)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def run(args: argparse.Namespace, device: Any) -> int:
    """The subcommand, once ``flasht5.cli`` has checked the model folder and resolved the device."""
    import torch

    from flasht5.data.tokenizer import load_tokenizer
    from flasht5.modeling import FlashT5ForConditionalGeneration

    check_options(args)
    try:
        tokenizer = load_tokenizer(args.tokenizer or args.model)
    except ValueError as e:
        if args.tokenizer:
            raise ValueError(f"--tokenizer: {e}") from None
        raise ValueError(f"{e}; pass --tokenizer DIR (e.g. the run's final/ folder or its tokenizer folder)") from None
    records = None
    if args.input is not None:
        texts, records = read_inputs(args.input, args.input_field)
    else:
        texts = args.text or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not texts:
        raise ValueError("give TEXT arguments, --input FILE or lines on stdin")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else None)
    model = FlashT5ForConditionalGeneration.from_pretrained(args.model, dtype=dtype).to(device).eval()
    if args.seed is not None:
        torch.manual_seed(args.seed)
    from flasht5.events import Scalars

    scalars = Scalars(args.tensorboard)
    try:
        results = generate_texts(
            model, tokenizer, texts, generation_kwargs(args), batch_size=args.batch_size,
            max_input_tokens=args.max_input_tokens, skip_special=not args.keep_special,
            progress=args.input is not None and not args.no_progress, scalars=scalars,
        )  # fmt: skip
    finally:
        scalars.close()
    single = args.num_return_sequences == 1
    rows = []
    for i, (text, outs) in enumerate(zip(texts, results)):
        value = outs[0] if single else outs
        rows.append({**records[i], "output": value} if records is not None else {"input": text, "output": value})
    if args.output is not None:
        _write_jsonl(args.output, rows)
        print(f"wrote {len(rows)} outputs to {args.output}", file=sys.stderr)
        return 0
    for row in rows:
        if args.json or args.input is not None:
            print(json.dumps(row, ensure_ascii=False))
        else:
            for value in [row["output"]] if single else row["output"]:
                print(value)
    return 0

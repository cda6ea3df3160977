"""The flasht5 command: train, finetune, convert, generate, tokenizer, pretokenize.

Subcommands whose arguments belong to one module (``tokenizer``, ``pretokenize``) are configured by that module's
``configure_cli(parser)``, which adds the arguments and sets ``func``. Heavy imports happen inside the commands so
that ``flasht5 --help`` stays fast.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any


def _quiet_transformers() -> None:
    """No per-call noise from transformers in the commands: its "Loading weights" / "Writing model shards" bars
    appear at every load and save (the commands show their own progress where there is any)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _train(args: argparse.Namespace) -> int:
    from flasht5.train.config import config_yaml, load_config

    if args.print_config:  # the values are checked; the input paths need not exist yet
        print(config_yaml(load_config(args.config, args.overrides, check_paths_too=False)), end="")
        return 0
    cfg = load_config(args.config, args.overrides)  # every value and input path checked before anything is built
    from flasht5.train.loop import train

    _quiet_transformers()
    summary = train(cfg)
    if not _main_rank():
        return 0  # under torchrun every rank returns rank 0's summary: rank 0 alone prints it
    print()
    print(f"held-out loss: step 0 {summary['initial_eval_loss']:.4f} -> step {summary['steps']} "
          f"{summary['final_eval_loss']:.4f}")  # fmt: skip
    print(f"model saved to {summary['model_dir']}; metrics {summary['metrics']}; loss curve {summary['loss_plot']}")
    for i, s in enumerate(summary["samples"]):
        print(f"\n--- span filling {i + 1} ---\ninput : {s['input']}\ntruth : {s['truth']}\nmodel : {s['model']}")
    return 0


def _finetune(args: argparse.Namespace) -> int:
    from flasht5.train.config import FinetuneConfig, config_yaml, load_config

    if args.print_config:
        print(config_yaml(load_config(args.config, args.overrides, check_paths_too=False, schema=FinetuneConfig)),
              end="")  # fmt: skip
        return 0
    cfg = load_config(args.config, args.overrides, schema=FinetuneConfig)
    from flasht5.train.finetune import finetune

    _quiet_transformers()
    s = finetune(cfg)
    if not _main_rank():
        return 0
    print()
    first, last = s["initial_metrics"], s["final_metrics"]
    if last:
        show = lambda m: ", ".join(f"{k.removeprefix('eval_')} {v:.4f}" for k, v in m.items())
        print(f"held-out: step 0 {show(first) if first else '(not evaluated again on resume)'}")
        print(f"       -> step {s['steps']} {show(last)}")
    if s["best"]:
        b = s["best"]
        print(f"best {b['metric']} {b['value']:.4f} at step {b['step']}: {cfg.train.out_dir}/best")
    print(f"model saved to {s['model_dir']}; metrics {s['metrics']}; loss curve {s['loss_plot']}")
    if s["predictions"]:
        print(f"predictions {s['predictions']}")
    for i, row in enumerate(s["samples"]):
        print(f"\n--- held-out example {i + 1} ---")
        for k, v in row.items():
            v = str(v)  # a long input is shown by its ends (predictions/*.jsonl has it whole)
            print(f"{k:10s}: {v if len(v) <= 400 else f'{v[:200]} [... {len(v) - 400} characters ...] {v[-200:]}'}")
    return 0


def _main_rank() -> bool:
    """Rank 0 of a torchrun launch, or a plain process (``RANK`` unset)."""
    return os.environ.get("RANK", "0") == "0"


def _convert(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from flasht5 import convert
    from flasht5.modeling import FlashT5ForConditionalGeneration

    _require_folder(args.src, "src")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out {args.out!r} is a file, not a folder")
    _quiet_transformers()
    direction = args.to or ("flasht5" if convert.is_hf_t5_folder(args.src) else "hf")
    dtype = getattr(torch, args.dtype) if args.dtype else None
    model = FlashT5ForConditionalGeneration.from_pretrained(args.src, dtype=dtype)
    if direction == "hf":
        convert.to_hf(model, out)  # removes stale weight files and indexes from out
    else:
        out.mkdir(parents=True, exist_ok=True)
        convert.remove_weight_files(out)  # save_pretrained would leave an old index or .bin next to the new file
        model.save_pretrained(out)
    _copy_tokenizer(args.src, args.out)
    print(f"wrote {direction} checkpoint to {args.out}")
    return 0


def _require_folder(path: str, what: str) -> None:
    """Nothing here downloads: a path that is not a local checkpoint folder is an error, not a hub lookup."""
    from pathlib import Path

    from flasht5.convert import local_checkpoint

    if not (Path(path) / "config.json").is_file():
        raise ValueError(f"{what} {path!r} is not a checkpoint folder (no config.json there)")
    local_checkpoint(path)  # a T5-family config.json, weights present, shard names inside the folder


def _copy_tokenizer(src: str, out: str) -> None:
    from pathlib import Path

    from flasht5.convert import safe_copy

    for name in ("tokenizer.json", "tokenizer_config.json", "spiece.model", "special_tokens_map.json"):
        safe_copy(Path(src) / name, Path(out) / name)  # no links out of src, nothing copied onto itself


def _generate(args: argparse.Namespace) -> int:
    from flasht5.generate_batch import check_options, run

    check_options(args)  # every flag before the folder and the device
    _require_folder(args.model, "model")
    device = _device(args.device)
    _quiet_transformers()
    return run(args, device)


def _device(name: str | None):
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device must be cpu, cuda or cuda:N, got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name} but no CUDA device is available (use cpu)")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu, cuda or cuda:N, got {name!r}")
    return device


class _Parser(argparse.ArgumentParser):
    """Help texts come from docstrings and comments written for Sphinx: no RST markup on the terminal."""

    def format_help(self) -> str:
        return _plain(super().format_help())

    def format_usage(self) -> str:
        return _plain(super().format_usage())


def _plain(text: str) -> str:
    import re

    text = re.sub(r":(?:class|func|meth|mod|attr|data):`~?([^`]+)`", r"\1", text)
    return re.sub(r"``?([^`\n]+?)``?", r"\1", text)


def _config_command(sub: Any, name: str, schema: type, example: str, func: Any, help: str, what: str) -> None:
    """``train`` and ``finetune``: CONFIG, overrides, --print-config; the help lists every config key."""
    import textwrap

    from flasht5.train.config import format_config_help

    data = "--data.corpus=[a.txt]" if name == "train" else "--data.train=[a.jsonl]"
    keys = ("Every key below can be set in the YAML file or overridden on the command line (--section.key=value, the "
            f"value read as YAML: --train.steps=100, {data}).")  # fmt: skip
    p = sub.add_parser(
        name, help=help, description=f"{textwrap.fill(what, 100)}\n\n{textwrap.fill(keys, 100)}",
        epilog=format_config_help(schema), formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    p.add_argument("config", help=f"YAML file, e.g. {example}")
    p.add_argument("overrides", nargs="*", help="--section.key=value overrides, e.g. --train.steps=100")
    p.add_argument("--print-config", action="store_true", help="print the resolved config (YAML + overrides), exit")
    p.set_defaults(func=func)


def build_parser() -> argparse.ArgumentParser:
    from flasht5.train.config import Config, FinetuneConfig

    parser = _Parser(prog="flasht5", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    _config_command(
        sub, "train", Config, "configs/pretrain/demo.yaml", _train, "pretrain from a YAML config",
        "Pretrain a T5 / UL2 model: corpus -> tokenizer -> pretokenized store -> denoised, packed batches.",
    )  # fmt: skip
    _config_command(
        sub, "finetune", FinetuneConfig, "configs/finetune/demo.yaml", _finetune,
        "fine-tune on (input, target) examples: text to text or classification",
        "Supervised fine-tuning from JSONL / CSV / TSV files or datasets folders (task: seq2seq | classification), "
        "with packed batches, held-out loss and generation metrics, best-model keeping and exact resume.",
    )  # fmt: skip

    p = sub.add_parser("convert", help="Hugging Face T5/mT5/umT5 folder <-> flasht5 folder")
    p.add_argument("src", help="checkpoint folder (stock transformers or flasht5)")
    p.add_argument("out", help="output folder")
    p.add_argument("--to", choices=["flasht5", "hf"], help="target format (default: the other one)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="cast weights (wo stays fp32)")
    p.set_defaults(func=_convert)

    from flasht5.generate_batch import add_arguments as generate_arguments

    p = sub.add_parser("generate", help="generate text with a checkpoint (arguments, stdin, or a file: --input)")
    generate_arguments(p)
    p.set_defaults(func=_generate)

    from flasht5.data.store import configure_cli as store_cli
    from flasht5.data.tokenizer import configure_cli as tokenizer_cli

    tokenizer_cli(sub.add_parser("tokenizer", help="train a SentencePiece tokenizer (T5 sentinels, UL2 mode tokens)"))
    store_cli(sub.add_parser("pretokenize", help="tokenize text/JSONL/Parquet/datasets into a token store"))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if args.command in ("train", "finetune"):
        args.overrides = list(args.overrides) + unknown  # --section.key=value look like options to argparse
    elif unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if os.environ.get("FLASHT5_DEBUG") == "1":  # the full traceback, for a bug report
        return int(args.func(args) or 0)
    import warnings

    def show(message, category, filename, lineno, file=None, line=None):  # one line, not the source location
        print(f"flasht5 {args.command}: warning: {message}", file=sys.stderr)

    warnings.showwarning = show
    try:
        return int(args.func(args) or 0)
    except ValueError as e:  # bad input: a clear message, not a traceback
        print(f"flasht5 {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the file system: a missing or unreadable path, no space left, a read-only folder
        where = f": {e.filename!r}" if getattr(e, "filename", None) and str(e.filename) not in str(e) else ""
        print(f"flasht5 {args.command}: error: {e}{where} (set FLASHT5_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"flasht5 {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

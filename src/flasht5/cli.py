"""The ``flasht5`` command: train, convert, generate, tokenizer, pretokenize, bench.

Subcommands whose arguments belong to one module (``tokenizer``, ``pretokenize``) are configured by that module's
``configure_cli(parser)``, which adds the arguments and sets ``func``; modules are imported lazily so that
``flasht5 --help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys


def _add_tokenizer(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tokenizer", help="train a SentencePiece tokenizer with T5 sentinels and UL2 mode tokens")
    from flasht5.data.tokenizer import configure_cli

    configure_cli(p)


def _add_pretokenize(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pretokenize", help="tokenize text/JSONL/Parquet/datasets into a memory-mapped token store")
    from flasht5.data.store import configure_cli

    configure_cli(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flasht5", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_tokenizer(sub)
    _add_pretokenize(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

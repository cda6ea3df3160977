"""SentencePiece tokenizers with T5's special tokens, sentinels and UL2's mode tokens — ``flasht5 tokenizer train``.

Layout of a trained tokenizer (the T5 convention, so that stock T5 code and checkpoints line up):

- ``<pad>`` = 0 (also the decoder start token), ``</s>`` = 1, ``<unk>`` = 2, no BOS;
- the UL2 mode tokens ``[R] [S] [X] [NLU] [NLG] [S2S]`` (``ul2_tokens=True``) as SentencePiece user-defined
  symbols, ids 3..8, never split;
- the SentencePiece pieces, ``vocab_size`` in all (counting the tokens above);
- ``num_sentinels`` sentinels appended after them in reverse: ``<extra_id_0>`` has the highest id,
  ``vocab_size + num_sentinels - 1``.

The output folder holds ``tokenizer.json`` + ``tokenizer_config.json`` (what ``AutoTokenizer.from_pretrained``
loads, offline), the SentencePiece model ``spiece.model`` and ``flasht5_tokenizer.json`` (how it was trained).
Unigram models load as ``T5Tokenizer``; BPE models as the generic tokenizers-backed class.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from flasht5.data.text import ReadStats, add_reader_arguments, iter_documents
from flasht5.data.ul2 import MODE_TOKENS

MODEL_TYPES = ("unigram", "bpe")
PAD, EOS, UNK = "<pad>", "</s>", "<unk>"
_MAX_SENTENCE_CHARS = 2000  # SentencePiece skips longer "sentences" (max_sentence_length is in bytes: 4 x 2000 fits)


def _sentences(docs: Iterable[str]) -> Iterator[str]:
    """Lines of each document, long lines cut at a space, so that SentencePiece sees all the text."""
    for doc in docs:
        for line in doc.splitlines():
            line = line.strip()
            while len(line) > _MAX_SENTENCE_CHARS:
                cut = line.rfind(" ", 0, _MAX_SENTENCE_CHARS)
                cut = cut if cut > 0 else _MAX_SENTENCE_CHARS
                yield line[:cut]
                line = line[cut:].lstrip()
            if line:
                yield line


def _reservoir(items: Iterable[str], k: int, seed: int) -> list[str]:
    """Uniform sample of k items in one pass (Vitter's Algorithm R), in stream order, reproducible for a seed."""
    rng = np.random.default_rng(seed)
    sample: list[str] = []
    idx: list[int] = []
    for i, item in enumerate(items):
        if i < k:
            sample.append(item)
            idx.append(i)
        else:
            j = int(rng.integers(0, i + 1))
            if j < k:
                sample[j], idx[j] = item, i
    order = np.argsort(idx, kind="stable")
    return [sample[i] for i in order]


def _bpe_merges(vocab: dict[str, int]) -> list[tuple[str, str]]:
    """Merges of a SentencePiece BPE vocabulary: every split of a piece into two pieces, by the piece's rank."""
    ranked = []
    for piece, rank in vocab.items():
        for i in range(1, len(piece)):
            left, right = piece[:i], piece[i:]
            if left in vocab and right in vocab:
                ranked.append((rank, vocab[left], vocab[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _hf_tokenizer_from_proto(proto: Any, *, num_sentinels: int) -> Any:
    """A transformers tokenizer equivalent to a SentencePiece model proto, with T5 sentinels appended."""
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE

    sentinels = [f"<extra_id_{i}>" for i in range(num_sentinels)]
    user_defined = [p.piece for p in proto.pieces if p.type == 4]
    charsmap = proto.normalizer_spec.precompiled_charsmap or None
    if proto.trainer_spec.model_type == 1:  # unigram: T5's own class, sentinels in the model vocabulary, reversed
        from transformers import T5Tokenizer

        vocab = [(p.piece, p.score) for p in proto.pieces] + [(s, 0.0) for s in reversed(sentinels)]
        return T5Tokenizer(
            vocab=vocab,
            _spm_precompiled_charsmap=charsmap,
            extra_ids=num_sentinels,
            additional_special_tokens=sentinels + user_defined,
        )
    if proto.trainer_spec.model_type != 2:
        raise ValueError(
            f"only unigram and BPE SentencePiece models are supported, got type {proto.trainer_spec.model_type}"
        )
    from transformers import PreTrainedTokenizerFast

    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    tok = Tokenizer(BPE(vocab=vocab, merges=_bpe_merges(vocab), unk_token=UNK, fuse_unk=True, byte_fallback=False))
    if charsmap:
        tok.normalizer = normalizers.Precompiled(charsmap)
    # As T5Tokenizer: whitespace runs collapse (SentencePiece's remove_extra_whitespaces), "▁" marks word starts.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")]
    )
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    # Reversed, so that <extra_id_0> gets the highest id as in T5.
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in [PAD, EOS, UNK, *user_defined]])
    tok.add_special_tokens([AddedToken(s, normalized=False, special=True) for s in reversed(sentinels)])
    tok.post_processor = processors.TemplateProcessing(
        single=f"$A {EOS}", pair=f"$A {EOS} $B {EOS}", special_tokens=[(EOS, vocab[EOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        eos_token=EOS,
        unk_token=UNK,
        additional_special_tokens=sentinels + user_defined,
    )


def train_tokenizer(
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    *,
    vocab_size: int = 32000,
    model_type: str = "unigram",
    num_sentinels: int = 100,
    ul2_tokens: bool = True,
    text_key: str = "text",
    max_sentences: int | None = None,
    seed: int = 0,
    text_split: str = "line",
    encoding_errors: str = "strict",
    character_coverage: float = 0.9999,
    num_threads: int | None = None,
) -> Path:
    """Train a SentencePiece tokenizer on text / JSONL / Parquet / `datasets` inputs and save it for AutoTokenizer.

    ``vocab_size`` counts the SentencePiece vocabulary (special and mode tokens included); the full tokenizer has
    ``vocab_size + num_sentinels`` ids. ``max_sentences`` trains on a reproducible uniform sample of that many
    lines (seeded by ``seed``); ``None`` uses every line. On a corpus too small for ``vocab_size`` the vocabulary
    comes out smaller (SentencePiece's soft limit) and the real size is recorded. Returns ``out_dir``.
    """
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as model_pb2

    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type must be one of {MODEL_TYPES}, got {model_type!r}")
    mode_tokens = list(MODE_TOKENS) if ul2_tokens else []
    if int(vocab_size) != vocab_size or vocab_size < 3 + len(mode_tokens) + 2:
        raise ValueError(f"vocab_size must be an integer > {3 + len(mode_tokens) + 1}, got {vocab_size!r}")
    if int(num_sentinels) != num_sentinels or num_sentinels < 0:
        raise ValueError(f"num_sentinels must be an integer >= 0, got {num_sentinels!r}")
    if max_sentences is not None and max_sentences < 1:
        raise ValueError(f"max_sentences must be None or >= 1, got {max_sentences!r}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"tokenizer output {str(out)!r} is a file, not a folder")
    stats = ReadStats()
    t0 = time.perf_counter()
    sentences: Iterable[str] = _sentences(
        iter_documents(inputs, text_key=text_key, text_split=text_split, encoding_errors=encoding_errors, stats=stats)
    )
    if max_sentences is not None:
        sentences = _reservoir(sentences, max_sentences, seed)
    counted = {"sentences": 0}

    def counting(it: Iterable[str]) -> Iterator[str]:
        for s in it:
            counted["sentences"] += 1
            yield s

    model = io.BytesIO()
    spm.set_random_generator_seed(seed)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=counting(sentences),
            model_writer=model,
            model_type=model_type,
            vocab_size=vocab_size,
            hard_vocab_limit=False,
            character_coverage=character_coverage,
            pad_id=0,
            eos_id=1,
            unk_id=2,
            bos_id=-1,
            pad_piece=PAD,
            eos_piece=EOS,
            unk_piece=UNK,
            user_defined_symbols=mode_tokens,
            byte_fallback=False,
            max_sentence_length=4 * _MAX_SENTENCE_CHARS + 16,
            shuffle_input_sentence=False,
            num_threads=num_threads or os.cpu_count() or 1,
            minloglevel=2,
        )
    except RuntimeError as e:
        if counted["sentences"] == 0:
            raise ValueError(f"no text found in inputs {[str(i) for i in inputs]} (empty files or documents)") from e
        raise
    proto = model_pb2.ModelProto()
    proto.ParseFromString(model.getvalue())
    tok = _hf_tokenizer_from_proto(proto, num_sentinels=num_sentinels)
    # Written into a private folder next to `out`, checked, then moved into place: a reader (another run that
    # found `out`) never sees a half-written tokenizer, and two runs training the same tokenizer at once do not mix
    # their files (the later one replaces each file atomically with its own, identical, copy).
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        tok.save_pretrained(str(tmp))
        (tmp / "spiece.model").write_bytes(model.getvalue())
        info = {
            "model_type": model_type,
            "vocab_size_requested": vocab_size,
            "spm_vocab_size": len(proto.pieces),
            "num_sentinels": num_sentinels,
            "total_vocab_size": len(tok),
            "mode_tokens": mode_tokens,
            "sentences": counted["sentences"],
            "max_sentences": max_sentences,
            "seed": seed,
            "documents": stats.documents,
            "empty_documents": stats.empty_documents,
            "empty_files": stats.empty_files,
            "inputs": [str(p) for p in inputs],
            "seconds": round(time.perf_counter() - t0, 3),
        }
        (tmp / "flasht5_tokenizer.json").write_text(json.dumps(info, indent=2) + "\n")
        check = load_tokenizer(tmp)
        ids = sentinel_ids(check) if num_sentinels else np.zeros(0, dtype=np.int64)
        if num_sentinels and (ids[0] != len(check) - 1 or np.any(np.diff(ids) != -1)):
            raise RuntimeError(f"sentinel layout broken after save: {ids[:3]}... (tokenizer size {len(check)})")
        _move_into_place(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# What makes a folder a tokenizer: the files transformers' tokenizer classes are built from. A checkpoint folder
# without them (``config.json`` + weights only: a weights-only repo, a ``checkpoints/step-N`` folder) is not one:
# AutoTokenizer would build an empty tokenizer (every word <unk>) or fail with an unrelated message.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "spiece.model", "tokenizer.model", "sentencepiece.bpe.model",
    "vocab.json", "vocab.txt",
)  # fmt: skip


def _move_into_place(tmp: Path, out: Path) -> None:
    """``tmp``'s files become ``out``: one atomic rename when ``out`` does not exist, else file by file."""
    try:
        tmp.rename(out)
        return
    except OSError:
        if not out.is_dir():
            raise
    for f in sorted(tmp.iterdir()):
        os.replace(f, out / f.name)


def check_tokenizer_path(path: str | Path) -> Path:
    """``path`` as a ``Path`` if it can be a tokenizer (a folder holding one of :data:`TOKENIZER_FILES`, or a
    SentencePiece ``.model`` file); otherwise a ``ValueError`` naming what was looked for."""
    p = Path(path)
    if not p.exists():
        raise ValueError(f"tokenizer path {str(path)!r} does not exist")
    if p.is_file():
        if p.suffix != ".model":
            raise ValueError(f"tokenizer path {p} must be a folder or a SentencePiece .model file")
        return p
    if not any((p / name).is_file() for name in TOKENIZER_FILES):
        raise ValueError(
            f"{p} holds no tokenizer files (looked for {', '.join(TOKENIZER_FILES)}): it is not a tokenizer folder"
        )
    return p


def load_tokenizer(path: str | Path) -> Any:
    """Load a tokenizer folder (ours or any Hugging Face T5 / mT5 / UL2 folder) offline through AutoTokenizer.

    A bare SentencePiece ``.model`` file is accepted too; it gets T5's 100 sentinels. A folder holding none of
    :data:`TOKENIZER_FILES` is an error naming them.
    """
    p = check_tokenizer_path(path)
    if p.is_file():
        from sentencepiece import sentencepiece_model_pb2 as model_pb2

        proto = model_pb2.ModelProto()
        try:
            proto.ParseFromString(p.read_bytes())
        except Exception as e:  # protobuf's DecodeError
            raise ValueError(f"{p} is not a SentencePiece model ({e})") from None
        return _hf_tokenizer_from_proto(proto, num_sentinels=100)
    from transformers import AutoTokenizer, PretrainedConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    kwargs: dict[str, Any] = {}
    model_type = _model_type(p)
    if model_type is not None and model_type not in CONFIG_MAPPING_NAMES:
        # A flasht5 folder: AutoTokenizer would read config.json to pick a class, warn that model type `flasht5`
        # is unknown, and fall back to the tokenizer files anyway. Say so directly.
        kwargs["config"] = PretrainedConfig()
    try:
        return AutoTokenizer.from_pretrained(str(p), local_files_only=True, **kwargs)
    except (ValueError, OSError, TypeError) as e:
        files = sorted(f.name for f in p.iterdir() if f.name in TOKENIZER_FILES)
        raise ValueError(f"could not load a tokenizer from {p} (it holds {files}): {e}") from None


def _model_type(folder: Path) -> str | None:
    try:
        value = json.loads((folder / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def sentinel_ids(tokenizer: Any, n: int | None = None) -> np.ndarray:
    """Ids of ``<extra_id_0>``, ``<extra_id_1>``, ... (descending in T5), as an int64 array of length n (default:
    every sentinel the tokenizer has)."""
    vocab = tokenizer.get_vocab()
    if n is None:
        n = 0
        while f"<extra_id_{n}>" in vocab:
            n += 1
    missing = [i for i in range(n) if f"<extra_id_{i}>" not in vocab]
    if missing:
        raise ValueError(f"tokenizer has no sentinel <extra_id_{missing[0]}> (asked for n={n})")
    if n == 0:
        raise ValueError("tokenizer has no <extra_id_N> sentinel tokens")
    return np.array([vocab[f"<extra_id_{i}>"] for i in range(n)], dtype=np.int64)


def mode_token_ids(tokenizer: Any, prefixes: Iterable[str]) -> dict[str, list[int]]:
    """Token ids of each mode prefix (``"[R]"`` ...): one id when the tokenizer has the token, else its pieces
    (stock T5 tokenizers spell ``[NLU]`` in several pieces, as UL2's released checkpoints saw it). ``""`` -> []."""
    vocab = tokenizer.get_vocab()
    out: dict[str, list[int]] = {}
    for prefix in prefixes:
        if not prefix:
            out[prefix] = []
        elif prefix in vocab:
            out[prefix] = [vocab[prefix]]
        else:
            out[prefix] = list(tokenizer.encode(prefix, add_special_tokens=False))
    return out


# ---------------------------------------------------------------------------------------------------------------
# CLI: flasht5 tokenizer train INPUT... --out DIR


def _cli_train(args: argparse.Namespace) -> int:
    out = train_tokenizer(
        args.inputs,
        args.out,
        vocab_size=args.vocab_size,
        model_type=args.model_type,
        num_sentinels=args.num_sentinels,
        ul2_tokens=not args.no_ul2_tokens,
        text_key=args.text_key,
        max_sentences=args.max_sentences,
        seed=args.seed,
        text_split=args.text_split,
        encoding_errors=args.encoding_errors,
        character_coverage=args.character_coverage,
    )
    info = json.loads((out / "flasht5_tokenizer.json").read_text())
    print(
        f"tokenizer saved to {out}: {info['total_vocab_size']} ids ({info['spm_vocab_size']} pieces + "
        f"{info['num_sentinels']} sentinels), trained on {info['sentences']} lines of {info['documents']} documents "
        f"in {info['seconds']:.1f} s"
    )
    if info["empty_documents"] or info["empty_files"]:
        print(f"note: skipped {info['empty_documents']} empty documents; {info['empty_files']} inputs had no text")
    if not info["num_sentinels"]:
        print("note: no <extra_id_N> sentinels: the span corruption of flasht5 train (t5, ul2, fat5) needs them")
    return 0


def configure_cli(parser: argparse.ArgumentParser) -> None:
    """Add ``flasht5 tokenizer train`` to the given ``tokenizer`` subparser."""
    sub = parser.add_subparsers(dest="tokenizer_command", required=True, metavar="ACTION")
    p = sub.add_parser("train", help="train a SentencePiece tokenizer with T5 sentinels and UL2 mode tokens")
    add_reader_arguments(p)
    p.add_argument("--out", required=True, help="output folder (loadable by AutoTokenizer.from_pretrained)")
    p.add_argument("--vocab-size", type=int, default=32000, help="SentencePiece pieces incl. special and mode tokens")
    p.add_argument("--model-type", choices=MODEL_TYPES, default="unigram")
    p.add_argument("--num-sentinels", type=int, default=100, help="<extra_id_N> tokens appended (default 100)")
    p.add_argument("--no-ul2-tokens", action="store_true", help="leave out [R] [S] [X] [NLU] [NLG] [S2S]")
    p.add_argument("--max-sentences", type=int, default=None, help="train on a uniform sample of this many lines")
    p.add_argument("--character-coverage", type=float, default=0.9999)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cli_train)

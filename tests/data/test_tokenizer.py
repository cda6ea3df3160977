"""Tokenizer training: T5 layout (pad/eos/unk, reversed sentinels, mode tokens), AutoTokenizer round trip."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from flasht5.data import tokenizer as T
from flasht5.data.ul2 import MODE_TOKENS


def _check_layout(tok) -> None:
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    ids = T.sentinel_ids(tok)
    assert len(ids) == 100 and ids[0] == len(tok) - 1 and np.all(np.diff(ids) == -1)  # <extra_id_0> highest
    modes = T.mode_token_ids(tok, MODE_TOKENS)
    assert [modes[m] for m in MODE_TOKENS] == [[3], [4], [5], [6], [7], [8]]


def test_unigram_round_trip_through_autotokenizer(tiny_tokenizer_dir: Path, corpus_docs: list[str]) -> None:
    import sentencepiece as spm
    from transformers import AutoTokenizer, T5Tokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir), local_files_only=True)
    assert isinstance(tok, T5Tokenizer)
    _check_layout(tok)
    sp = spm.SentencePieceProcessor(model_file=str(tiny_tokenizer_dir / "spiece.model"))
    for doc in corpus_docs[:10]:
        ids = tok(doc, add_special_tokens=False).input_ids
        assert ids == sp.encode(doc)  # the HF tokenizer is the SentencePiece model
        assert tok.decode(ids) == doc
    ids = tok("[X] And God said <extra_id_0> light").input_ids
    assert ids[0] == 5 and ids[-1] == tok.eos_token_id and T.sentinel_ids(tok, 1)[0] in ids


def test_bpe_tokenizer_via_cli(tmp_path: Path, corpus_file: Path, corpus_docs: list[str]) -> None:
    from flasht5.cli import main

    out = tmp_path / "bpe"
    assert (
        main(
            [
                "tokenizer",
                "train",
                str(corpus_file),
                "--out",
                str(out),
                "--vocab-size",
                "300",
                "--model-type",
                "bpe",
                "--max-sentences",
                "500",
            ]
        )
        == 0
    )
    tok = T.load_tokenizer(out)
    _check_layout(tok)
    for doc in corpus_docs[:5]:
        assert tok.decode(tok(doc, add_special_tokens=False).input_ids) == doc


def test_reservoir_sample_is_reproducible_and_ordered() -> None:
    items = [str(i) for i in range(1000)]
    a, b = T._reservoir(items, 50, seed=1), T._reservoir(items, 50, seed=1)
    assert a == b and len(a) == 50 and a == sorted(a, key=int)
    assert a != T._reservoir(items, 50, seed=2)
    assert T._reservoir(items[:10], 50, seed=1) == items[:10]


def test_long_lines_are_cut_for_sentencepiece() -> None:
    doc = " ".join(["word"] * 3000)
    parts = list(T._sentences([doc]))
    assert all(len(p) <= T._MAX_SENTENCE_CHARS for p in parts) and " ".join(parts) == doc


def test_errors(tmp_path: Path) -> None:
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(ValueError, match="no text"):
        T.train_tokenizer([tmp_path / "empty.txt"], tmp_path / "out", vocab_size=100)
    with pytest.raises(ValueError, match="model_type"):
        T.train_tokenizer([tmp_path / "empty.txt"], tmp_path / "out", model_type="wordpiece")
    with pytest.raises(ValueError, match="does not exist"):
        T.load_tokenizer(tmp_path / "missing")


def test_sentinel_errors(tiny_tokenizer_dir: Path) -> None:
    tok = T.load_tokenizer(tiny_tokenizer_dir)
    with pytest.raises(ValueError, match="extra_id_100"):
        T.sentinel_ids(tok, 101)
    assert T.sentinel_ids(tok, 3).tolist() == [len(tok) - 1, len(tok) - 2, len(tok) - 3]


def test_folder_without_tokenizer_files_is_not_a_tokenizer(tmp_path: Path, tiny_tokenizer_dir: Path, capfd) -> None:
    """D8: a weights-only checkpoint folder became an empty T5Tokenizer (every word <unk>); a flasht5 checkpoint
    folder or an empty folder failed with "install sentencepiece or tiktoken" although sentencepiece is there."""
    import json
    import shutil

    weights_only = tmp_path / "hf_t5"
    weights_only.mkdir()
    (weights_only / "config.json").write_text(json.dumps({"model_type": "t5", "vocab_size": 512}))
    (weights_only / "model.safetensors").write_bytes(b"\0" * 16)
    empty = tmp_path / "empty"
    empty.mkdir()
    ckpt = tmp_path / "step-0000010"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"model_type": "flasht5"}))
    for folder in (weights_only, empty, ckpt):
        with pytest.raises(ValueError, match=r"holds no tokenizer files \(looked for tokenizer.json, "):
            T.load_tokenizer(folder)
    # A flasht5 run's final/ folder (config.json of model_type flasht5 + tokenizer files) loads without the
    # "You are using a model of type flasht5 to instantiate a model of type ``" warning.
    final = tmp_path / "final"
    shutil.copytree(tiny_tokenizer_dir, final)
    (final / "config.json").write_text(json.dumps({"model_type": "flasht5", "d_model": 64}))
    capfd.readouterr()
    tok = T.load_tokenizer(final)
    assert len(tok) == len(T.load_tokenizer(tiny_tokenizer_dir))
    assert "instantiate a model of type" not in capfd.readouterr().err


def test_tokenizer_output_that_is_a_file(tmp_path: Path, corpus_file: Path) -> None:
    """D18: `tokenizer train --out FILE` trained first, then failed with a FileExistsError traceback."""
    (tmp_path / "out").write_text("x")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        T.train_tokenizer([corpus_file], tmp_path / "out", vocab_size=100)


def test_tokenizer_appears_complete_or_not_at_all(tmp_path: Path, corpus_file: Path, monkeypatch) -> None:
    """D1 (the tokenizer two concurrent `flasht5 train` runs both train): written aside and moved into place, so a
    reader never sees a half-written folder; a failed training leaves nothing behind."""
    out = tmp_path / "tok"

    def broken(*args, **kwargs):
        raise RuntimeError("killed mid-save")

    with monkeypatch.context() as m:
        m.setattr(T, "load_tokenizer", broken)  # fails after the files are written, before they are moved
        with pytest.raises(RuntimeError, match="killed mid-save"):
            T.train_tokenizer([corpus_file], out, vocab_size=120)
    assert list(tmp_path.iterdir()) == []  # no tokenizer folder, no temporary folder
    T.train_tokenizer([corpus_file], out, vocab_size=120)
    T.train_tokenizer([corpus_file], out, vocab_size=120)  # again into the existing folder: files replaced
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    assert len(T.load_tokenizer(out)) == 220
